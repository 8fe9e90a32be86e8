//! Training on one GPU (products in f32, bf16 or f16; everything else f32):
//! `crate::train::model`'s step with the same parameter layout. The weights, their gradients and
//! AdamW's moments are each one device buffer in the [`Layout`]; the activations one allocation
//! per (batch, length), its buffers at the offsets of [`Acts`]. The forward keeps each layer's
//! input and what its mixer needs ([`mamba1`], [`mamba2`]; with `recompute`, the inputs only);
//! the backward remakes each layer's norm and the rest of its mixer's activations (with
//! `recompute`, all of them) before running it backwards. Sums run in a fixed order, with no
//! atomics, so a step gives the same bits every run.

pub mod mamba1;
pub mod mamba2;
pub mod ops;
mod ssd_backward;

use super::{err, Gpu};
use crate::config::Arch;
use crate::ops::cross_entropy::IGNORE;
use crate::tensor::DType;
use crate::train::optim::AdamW;
use crate::train::params::{LayerParams, Layout};
use anyhow::{bail, Result};
use cudarc::driver::{result as drv, CudaSlice};
use ops::{Gemms, Mat};

/// Logit rows the head computes at once (bounds its f32 logits to ~256 MB).
const HEAD_FLOATS: usize = 64 << 20;

/// The activations of `seqs` sequences of `len` positions (R = seqs·len rows): offsets (in
/// floats) into one allocation.
pub struct Acts {
    pub seqs: usize,
    pub len: usize,
    pub recompute: bool,
    buf: CudaSlice<f32>,
    base: u64,
    resid: usize,        // (n_layer + 1, R, D): each layer's input, then the final norm's
    h: usize,            // (R, D): a layer's normed input; after the forward, the head's input
    mixer: usize,        // (kept layers, R, kept width): what each layer keeps for its backward
    remade: usize,       // (R, remade width): one layer's activations made again from those
    g_resid: usize,      // (R, D)
    g_h: usize,          // (R, D)
    g_mixer: usize,      // (R, kept + remade width): one layer's activation gradients
    rstd: usize,         // (R)
    parts: usize,        // (NORM_SLICES, D)
    logits: usize,       // (head rows, V)
    work: usize,         // the mixer's workspace
    scratch: [usize; 2], // 16-bit modes: two product operands in 16 bits (half as many floats each)
    head_rows: usize,
    width: usize,
    tokens: CudaSlice<u32>, // (5R + 1): inputs | targets | the embedding backward's lists
    ids: CudaSlice<u32>,    // (R) argmax of each row
    nll: CudaSlice<f64>,    // (R)
    inputs: Vec<u32>,
    targets: Vec<u32>,
    stream: cudarc::driver::sys::CUstream,
}

impl Acts {
    fn new(g: &Gpu, layout: &Layout, seqs: usize, len: usize, recompute: bool, half: bool) -> Result<Acts> {
        let cfg = &layout.cfg;
        let (rows, dm, v) = (seqs * len, cfg.d_model, cfg.vocab_padded);
        let (width, remade_width, widest, work_len) = match cfg.arch {
            Arch::Mamba1 => {
                (mamba1::kept_width(cfg), mamba1::remade_width(cfg), 2 * cfg.d_inner, mamba1::work_len(cfg, seqs, len))
            }
            Arch::Mamba2 => {
                (mamba2::kept_width(cfg), mamba2::remade_width(cfg), cfg.d_in_proj(), mamba2::work_len(cfg, seqs, len))
            }
        };
        let kept = if recompute { 1 } else { cfg.n_layer };
        let head_rows = (HEAD_FLOATS / v).clamp(1, rows);
        let mut n = 0usize;
        let mut take = |floats: usize| {
            let at = n;
            n += floats.next_multiple_of(64); // 256-byte aligned buffers
            at
        };
        let resid = take((cfg.n_layer + 1) * rows * dm);
        let h = take(rows * dm);
        let mixer = take(kept * rows * width);
        let remade = take(rows * remade_width);
        let g_resid = take(rows * dm);
        let g_h = take(rows * dm);
        let g_mixer = take(rows * (width + remade_width));
        let rstd = take(rows);
        let parts = take(ops::NORM_SLICES * dm);
        let logits = take(head_rows * v);
        let work = take(work_len);
        // The largest operand: a row block of in_proj's output (or input) or of the logits.
        let operand = if half { (rows * widest.max(dm)).max(head_rows * v).div_ceil(2) } else { 0 };
        let scratch = [take(operand), take(operand)];
        let buf = g.alloc::<f32>(n)?;
        let base = g.ptr(&buf);
        Ok(Acts {
            seqs,
            len,
            recompute,
            buf,
            base,
            resid,
            h,
            mixer,
            remade,
            g_resid,
            g_h,
            g_mixer,
            rstd,
            parts,
            logits,
            work,
            scratch,
            head_rows,
            width,
            tokens: g.alloc(5 * rows + 1)?,
            ids: g.alloc(rows)?,
            nll: g.alloc(rows)?,
            inputs: vec![],
            targets: vec![],
            stream: g.stream.cu_stream(),
        })
    }

    pub fn rows(&self) -> usize {
        self.seqs * self.len
    }

    fn ptr(&self, floats: usize) -> u64 {
        self.base + 4 * floats as u64
    }

    pub fn h(&self) -> u64 {
        self.ptr(self.h)
    }

    pub fn g_h(&self) -> u64 {
        self.ptr(self.g_h)
    }

    pub fn g_resid(&self) -> u64 {
        self.ptr(self.g_resid)
    }

    pub fn g_mixer(&self) -> u64 {
        self.ptr(self.g_mixer)
    }

    pub fn remade(&self) -> u64 {
        self.ptr(self.remade)
    }

    pub fn work(&self) -> u64 {
        self.ptr(self.work)
    }

    /// Layer `i`'s input (`i = n_layer`: the final norm's).
    fn resid(&self, i: usize, dm: usize) -> u64 {
        self.ptr(self.resid + i * self.rows() * dm)
    }

    /// Where layer `i`'s mixer activations live.
    fn slot(&self, i: usize) -> u64 {
        let k = if self.recompute { 0 } else { i };
        self.ptr(self.mixer + k * self.rows() * self.width)
    }

    /// Zeroes `floats` floats at `p`.
    pub fn zero(&self, p: u64, floats: usize) -> Result<()> {
        unsafe { drv::memset_d8_async(p, 0, 4 * floats, self.stream) }
            .map_err(|e| anyhow::anyhow!("zeroing {floats} floats on the GPU: {e:?}"))
    }

    fn bytes(&self) -> usize {
        self.buf.len() * 4
    }
}

/// Where parameter (or gradient) range `r` starts in the buffer at `base`.
fn at(base: u64, r: &std::ops::Range<usize>) -> u64 {
    base + 4 * r.start as u64
}

/// Hands out consecutive pieces of a workspace (byte addresses), each on 16 bytes (the scan's
/// backward reads its kept states as float4).
struct Carve(u64);

impl Carve {
    fn take(&mut self, floats: usize) -> u64 {
        let p = self.0;
        self.0 += 4 * floats.next_multiple_of(4) as u64;
        p
    }
}

/// A model's training state on the GPU.
pub struct GpuTrainer {
    pub gpu: Gpu,
    params: CudaSlice<f32>,
    grads: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    squares: CudaSlice<f64>,
    /// The products' type (f32, bf16 or f16) and, in 16 bits, the weights in it, remade after
    /// each update.
    dtype: DType,
    copy: Option<CudaSlice<u16>>,
    acts: Option<Acts>,
    profile: Option<ops::Profile>,
    slow_scan: bool,
}

impl GpuTrainer {
    /// Uploads `params` and the moments `m`, `v` (all in `layout`). The products run in `dtype`
    /// (bf16 or f16: with f32 sums), everything else in f32 with f32 weights and moments.
    pub fn new(gpu: Gpu, layout: &Layout, params: &[f32], m: &[f32], v: &[f32], dtype: DType) -> Result<GpuTrainer> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!("training on the GPU runs in f32, bf16 or f16 (not {dtype})");
        }
        let (cfg, n) = (&layout.cfg, layout.cfg.d_state);
        match cfg.arch {
            Arch::Mamba1 if !n.is_power_of_two() || n > ops::SCAN_BWD_MAX_N => {
                bail!("training Mamba-1 on the GPU needs d_state a power of two up to {} (this model: {n})", ops::SCAN_BWD_MAX_N)
            }
            Arch::Mamba2 if n > 128 => bail!("training Mamba-2 on the GPU needs d_state up to 128 (this model: {n})"),
            Arch::Mamba2 if cfg.dt_limit.0 > 0.0 || cfg.dt_limit.1.is_finite() => bail!(
                "training Mamba-2 on the GPU does not clamp δ yet (this model's dt_limit / time_step_limit: {:?}); train it with --device cpu",
                cfg.dt_limit
            ),
            _ => {}
        }
        if layout.cfg.d_conv > 8 {
            bail!("training on the GPU supports conv widths up to 8 (this model: {})", layout.cfg.d_conv);
        }
        let t = GpuTrainer {
            params: gpu.upload(params)?,
            grads: gpu.alloc(layout.len)?,
            m: gpu.upload(m)?,
            v: gpu.upload(v)?,
            squares: gpu.alloc(ops::SQUARE_BLOCKS)?,
            copy: if dtype == DType::F32 { None } else { Some(gpu.alloc(layout.len)?) },
            dtype,
            acts: None,
            profile: None,
            slow_scan: false,
            gpu,
        };
        t.zero_grads()?;
        t.refresh_copy()?;
        Ok(t)
    }

    /// Runs the scan's backward through its plain reference kernel (tests compare the two).
    pub fn set_slow_scan(&mut self, on: bool) {
        self.slow_scan = on;
    }

    /// Keeps a [`ops::Profile`] of the work from now on (`on`), or stops.
    pub fn set_profile(&mut self, on: bool) {
        self.profile = on.then(ops::Profile::default);
    }

    /// Seconds per kind of work since profiling started.
    pub fn take_profile(&self) -> Vec<(&'static str, f64)> {
        self.profile.as_ref().map_or(vec![], ops::Profile::take)
    }

    /// Remakes the weights' 16-bit copy (16-bit modes).
    fn refresh_copy(&self) -> Result<()> {
        let n = self.params.len();
        match &self.copy {
            Some(c) => ops::to_half(&self.gpu, self.dtype, self.p(), n, 1, n, self.gpu.ptr(c)),
            None => Ok(()),
        }
    }

    /// The step's products, in 16 bits when the mode says so.
    fn gemms(&self) -> Gemms<'_> {
        let half = match (&self.copy, &self.acts) {
            (Some(c), Some(a)) => Some(ops::Half {
                dtype: self.dtype,
                params: self.p(),
                params_len: self.params.len(),
                copy: self.gpu.ptr(c),
                scratch: a.scratch.map(|s| a.ptr(s)),
            }),
            _ => None,
        };
        Gemms { g: &self.gpu, half, prof: self.profile.as_ref() }
    }

    fn p(&self) -> u64 {
        self.gpu.ptr(&self.params)
    }

    fn gp(&self) -> u64 {
        self.gpu.ptr(&self.grads)
    }

    pub fn zero_grads(&self) -> Result<()> {
        unsafe { drv::memset_d8_async(self.gp(), 0, 4 * self.grads.len(), self.gpu.stream.cu_stream()) }.map_err(err)
    }

    /// Device bytes of the weights, gradients, moments and the current activations.
    pub fn bytes(&self) -> usize {
        let copy = self.copy.as_ref().map_or(0, |c| 2 * c.len());
        4 * 4 * self.params.len() + copy + self.acts.as_ref().map_or(0, Acts::bytes)
    }

    /// Activations for `seqs × len` (kept when the shape is the same).
    fn shape(&mut self, layout: &Layout, seqs: usize, len: usize, recompute: bool) -> Result<&Acts> {
        let same = self.acts.as_ref().is_some_and(|a| (a.seqs, a.len, a.recompute) == (seqs, len, recompute));
        if !same {
            self.acts = None; // freed before the new one is taken
            self.acts = Some(Acts::new(&self.gpu, layout, seqs, len, recompute, self.copy.is_some())?);
        }
        Ok(self.acts.as_ref().expect("set above"))
    }

    /// The forward over `seqs` sequences of `len` `inputs` (row-major), each position predicting
    /// its `targets` entry ([`IGNORE`]: not graded); keeps what [`GpuTrainer::backward`] needs.
    pub fn forward(
        &mut self,
        layout: &Layout,
        (seqs, len, recompute): (usize, usize, bool),
        inputs: Vec<u32>,
        targets: Vec<u32>,
    ) -> Result<()> {
        crate::train::model::check_tokens(layout, seqs, len, &inputs, &targets)?;
        let cfg = &layout.cfg;
        let (p, dm) = (self.p(), cfg.d_model);
        self.shape(layout, seqs, len, recompute)?;
        let g = &self.gpu;
        let acts = self.acts.as_mut().expect("shaped");
        let rows = acts.rows();
        let both: Vec<u32> = inputs.iter().chain(&targets).copied().collect();
        g.stream
            .memcpy_htod(&both, &mut acts.tokens.slice_mut(0..2 * rows))
            .map_err(|e| anyhow::anyhow!("uploading {} tokens: {e:?}", both.len()))?;
        (acts.inputs, acts.targets) = (inputs, targets);
        let (acts, mm) = (self.acts.as_ref().expect("shaped"), self.gemms());
        mm.timed("embedding", || {
            ops::embed_rows(g, at(p, &layout.embedding), g.ptr(&acts.tokens), acts.resid(0, dm), rows, dm)
        })?;
        for (i, lp) in layout.layers.iter().enumerate() {
            let (x, out) = (acts.resid(i, dm), acts.resid(i + 1, dm));
            mm.timed("residual", || {
                unsafe { drv::memcpy_dtod_async(out, x, 4 * rows * dm, g.stream.cu_stream()) }
                    .map_err(|e| anyhow::anyhow!("copying the residual stream: {e:?}"))
            })?;
            layer_forward(&mm, layout, lp, p, acts, i, Some(out))?;
        }
        mm.timed("norms", || {
            ops::rms_norm(g, acts.resid(cfg.n_layer, dm), at(p, &layout.norm_f), acts.h(), rows, dm, cfg.norm_eps)
        })
    }

    /// The summed cross-entropy of the graded positions after [`GpuTrainer::forward`]; with
    /// `scale`, also adds `scale` times its gradient to the gradients, running the whole
    /// backward.
    pub fn backward(&mut self, layout: &Layout, scale: Option<f32>) -> Result<f64> {
        let cfg = &layout.cfg;
        let (p, gp, dm, v) = (self.p(), self.gp(), cfg.d_model, cfg.vocab_padded);
        let (g, mm) = (&self.gpu, self.gemms());
        let acts = self.acts.as_ref().ok_or_else(|| anyhow::anyhow!("backward before forward"))?;
        let rows = acts.rows();
        let (head, g_head) = (at(p, &layout.lm_head), at(gp, &layout.lm_head));
        let (logits, targets, nll) = (acts.ptr(acts.logits), g.ptr(&acts.tokens) + 4 * rows as u64, g.ptr(&acts.nll));
        for r0 in (0..rows).step_by(acts.head_rows) {
            let n = acts.head_rows.min(rows - r0);
            let h = acts.h() + 4 * (r0 * dm) as u64;
            mm.linear(n, (v, dm), Mat::new(h, dm), head, Mat::new(logits, v), false)?;
            mm.timed("cross-entropy", || {
                ops::cross_entropy(g, logits, targets + 4 * r0 as u64, nll + 8 * r0 as u64, n, v, v, scale)
            })?;
            if scale.is_some() {
                let gh = acts.g_h() + 4 * (r0 * dm) as u64;
                let head_grad = (Mat::new(logits, v), Mat::new(h, dm), head);
                mm.linear_backward(n, (v, dm), head_grad, (Mat::new(gh, dm), false), g_head)?;
            }
        }
        if scale.is_some() {
            let norm_work = (acts.ptr(acts.rstd), acts.ptr(acts.parts));
            acts.zero(acts.g_resid(), rows * dm)?;
            let (x, w) = (acts.resid(cfg.n_layer, dm), at(p, &layout.norm_f));
            let norm_backward = |x: u64, w: u64, gw: u64| {
                let (gy, gx, eps) = (acts.g_h(), acts.g_resid(), cfg.norm_eps);
                mm.timed("norms", || ops::rms_norm_backward(g, x, w, gy, gx, gw, norm_work, rows, dm, eps))
            };
            norm_backward(x, w, at(gp, &layout.norm_f))?;
            for (i, lp) in layout.layers.iter().enumerate().rev() {
                let norm = lp.norm();
                let (x, w) = (acts.resid(i, dm), at(p, norm));
                if acts.recompute {
                    layer_forward(&mm, layout, lp, p, acts, i, None)?;
                } else {
                    mm.timed("norms", || ops::rms_norm(g, x, w, acts.h(), rows, dm, cfg.norm_eps))?;
                }
                let (params, slot) = ((p, gp), acts.slot(i));
                match lp {
                    LayerParams::M1(m) => mamba1::backward(&mm, cfg, m, params, acts, slot, self.slow_scan)?,
                    LayerParams::M2(m) => mamba2::backward(&mm, cfg, m, params, acts, slot, self.slow_scan)?,
                }
                norm_backward(x, w, at(gp, norm))?;
            }
            mm.timed("embedding", || self.embedding_backward(layout))?;
        }
        let acts = self.acts.as_ref().expect("checked above");
        let nll = g.download(&acts.nll, rows)?;
        Ok(nll.iter().sum())
    }

    /// Adds each position's residual gradient to its token's embedding row, a block per
    /// distinct token summing its positions in order.
    fn embedding_backward(&self, layout: &Layout) -> Result<()> {
        let g = &self.gpu;
        let acts = self.acts.as_ref().expect("after forward");
        let rows = acts.rows();
        let mut order: Vec<u32> = (0..rows as u32).collect();
        order.sort_by_key(|&r| (acts.inputs[r as usize], r));
        let (mut distinct, mut starts) = (vec![], vec![]);
        for (j, &r) in order.iter().enumerate() {
            let t = acts.inputs[r as usize];
            if distinct.last() != Some(&t) {
                distinct.push(t);
                starts.push(j as u32);
            }
        }
        starts.push(rows as u32);
        let k = distinct.len();
        let lists: Vec<u32> = distinct.iter().chain(&starts).chain(&order).copied().collect();
        let base = g.ptr(&acts.tokens) + 8 * rows as u64;
        unsafe { drv::memcpy_htod_async(base, &lists[..], g.stream.cu_stream()) }
            .map_err(|e| anyhow::anyhow!("uploading the embedding's position lists: {e:?}"))?;
        let p = ops::EmbedParams {
            table: at(self.gp(), &layout.embedding),
            tokens: base,
            starts: base + 4 * k as u64,
            pos: base + 4 * (2 * k + 1) as u64,
            rows: acts.g_resid(),
            d: layout.cfg.d_model as i32,
        };
        ops::embed_backward(g, &p, k)?;
        // The host list must outlive the asynchronous copy.
        g.sync()
    }

    /// After [`GpuTrainer::forward`], for each graded position in order whether its most likely
    /// token is the target.
    pub fn hits(&mut self, layout: &Layout) -> Result<Vec<bool>> {
        let (p, dm, v) = (self.p(), layout.cfg.d_model, layout.cfg.vocab_padded);
        let (g, mm) = (&self.gpu, self.gemms());
        let acts = self.acts.as_ref().ok_or_else(|| anyhow::anyhow!("hits before forward"))?;
        let rows = acts.rows();
        let logits = acts.ptr(acts.logits);
        for r0 in (0..rows).step_by(acts.head_rows) {
            let n = acts.head_rows.min(rows - r0);
            let h = acts.h() + 4 * (r0 * dm) as u64;
            mm.linear(n, (v, dm), Mat::new(h, dm), at(p, &layout.lm_head), Mat::new(logits, v), false)?;
            crate::cuda::ops::argmax(g, logits, g.ptr(&acts.ids) + 4 * r0 as u64, n, v, v)?;
        }
        let ids = g.download(&acts.ids, rows)?;
        Ok(acts.targets.iter().zip(&ids).filter(|(&t, _)| t != IGNORE).map(|(t, i)| t == i).collect())
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(&self) -> Result<f64> {
        let squares = self.gemms().timed("optimizer", || {
            ops::sum_squares(&self.gpu, self.gp(), self.grads.len(), self.gpu.ptr(&self.squares))?;
            self.gpu.download(&self.squares, ops::SQUARE_BLOCKS)
        })?;
        Ok(squares.iter().sum::<f64>().sqrt())
    }

    /// One AdamW update at step `t` (1-based) with rate `lr`, the gradients first scaled by
    /// `clip` (optim.rs's clip_factor, then AdamW::step).
    pub fn update(&mut self, layout: &Layout, adamw: &AdamW, t: u64, lr: f32, clip: f32) -> Result<()> {
        self.gemms().timed("optimizer", || self.adamw(layout, adamw, t, lr, clip))
    }

    fn adamw(&self, layout: &Layout, adamw: &AdamW, t: u64, lr: f32, clip: f32) -> Result<()> {
        let bc1 = 1.0 - (adamw.beta1 as f64).powi(t as i32);
        let bc2 = 1.0 - (adamw.beta2 as f64).powi(t as i32);
        let g = &self.gpu;
        let (p, gp, m, v) = (self.p(), self.gp(), g.ptr(&self.m), g.ptr(&self.v));
        // Stretches of neighbouring tensors with the same decay go in one launch.
        let mut i = 0;
        while i < layout.table.len() {
            let decay = layout.table[i].decay;
            let start = layout.table[i].offset;
            let mut end = layout.table[i].range().end;
            while i + 1 < layout.table.len() && layout.table[i + 1].decay == decay && layout.table[i + 1].offset == end
            {
                i += 1;
                end = layout.table[i].range().end;
            }
            i += 1;
            let off = 4 * start as u64;
            ops::adamw(
                g,
                &ops::AdamWParams {
                    p: p + off,
                    g: gp + off,
                    m: m + off,
                    v: v + off,
                    n: (end - start) as i64,
                    clip,
                    decay: if decay { 1.0 - lr * adamw.weight_decay } else { 1.0 },
                    beta1: adamw.beta1,
                    beta2: adamw.beta2,
                    step_size: (lr as f64 / bc1) as f32,
                    bc2_sqrt: bc2.sqrt() as f32,
                    eps: adamw.eps,
                },
            )?;
        }
        self.refresh_copy()
    }

    /// The weights, the moments and the gradients, downloaded.
    pub fn download(&self) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let g = &self.gpu;
        Ok((
            g.download(&self.params, self.params.len())?,
            g.download(&self.m, self.m.len())?,
            g.download(&self.v, self.v.len())?,
        ))
    }

    /// Replaces the gradients (a resumed or tested step).
    pub fn set_gradients(&mut self, grads: &[f32]) -> Result<()> {
        self.gpu.stream.memcpy_htod(grads, &mut self.grads).map_err(err)
    }

    pub fn gradients(&self) -> Result<Vec<f32>> {
        self.gpu.download(&self.grads, self.grads.len())
    }
}

/// Layer `i`'s norm and mixer from its kept input; `out`: where out_proj adds its product.
fn layer_forward(
    mm: &Gemms,
    layout: &Layout,
    lp: &LayerParams,
    p: u64,
    acts: &Acts,
    i: usize,
    out: Option<u64>,
) -> Result<()> {
    let (g, cfg) = (mm.g, &layout.cfg);
    let (rows, dm) = (acts.rows(), cfg.d_model);
    mm.timed("norms", || ops::rms_norm(g, acts.resid(i, dm), at(p, lp.norm()), acts.h(), rows, dm, cfg.norm_eps))?;
    match lp {
        LayerParams::M1(m) => mamba1::forward(mm, cfg, m, p, acts, acts.slot(i), out),
        LayerParams::M2(m) => mamba2::forward(mm, cfg, m, p, acts, acts.slot(i), out),
    }
}

/// `crate::train::model::gradients` on the GPU: the gradient of the mean next-token
/// cross-entropy over every position of every row (each run as a batch of one) and each row's
/// summed loss.
pub fn gradients(
    gpu: Gpu,
    dtype: DType,
    layout: &Layout,
    params: &[f32],
    rows: &[Vec<u32>],
    mut on_row: impl FnMut(usize),
) -> Result<(Vec<f64>, Vec<f32>)> {
    let count = crate::train::model::predicted(rows)?;
    let zeros = vec![0.0f32; layout.len];
    let mut t = GpuTrainer::new(gpu, layout, params, &zeros, &zeros, dtype)?;
    let mut losses = Vec::with_capacity(rows.len());
    for r in rows {
        let (inputs, targets) = crate::train::model::shifted(r, 1, r.len() - 1)?;
        t.forward(layout, (1, r.len() - 1, false), inputs, targets)?;
        losses.push(t.backward(layout, Some(1.0 / count as f32))?);
        on_row(r.len());
    }
    Ok((losses, t.gradients()?))
}
