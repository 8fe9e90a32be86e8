//! The model on the GPU: the weights of a loaded [`Model`] uploaded in its storage type (which is
//! also the activation type: f32, bf16 or f16), the residual stream and the SSM state in f32.
//! [`GpuModel::forward`] enqueues one pass (prefill when `l > 1`, the recurrent step when
//! `l == 1`) without synchronising; [`Decoder`] runs the step, argmax included, as one launch:
//! decode.cu's persistent kernel for one sequence, a captured CUDA graph for several.

use super::consts::*;
use super::ops::*;
use super::pick::{needs_pick, Picker, PICK_HOST};
use super::{err, Gpu};
use crate::backend::Backend;
use crate::config::{Arch, Config};
use crate::model::{Linear, Mixer, Model, Norm};
use crate::sampling::{sample, Sampling};
use crate::state::{Kept, State};
use crate::tensor::{DType, Matrix};
use anyhow::{bail, Result};
use cudarc::driver::{CudaFunction, CudaGraph, CudaSlice, DeviceRepr};
use std::sync::{Arc, Mutex};

#[repr(C)]
#[derive(Clone, Copy)]
struct AddNormParams {
    resid: u64,
    delta: u64,
    table: u64,
    tokens: u64,
    w: u64,
    b: u64,
    out: u64,
    d: i32,
    l: i32,
    nsel: i32,
    eps: f32,
}

/// Mirrors `ScanStepParams` in selective_scan.cu (Mamba-1's batched decode step).
#[repr(C)]
#[derive(Clone, Copy)]
struct ScanStepParams {
    u: u64,
    z: u64,
    xdbl: u64,
    dt_w: u64,
    dt_bias: u64,
    a2: u64,
    d: u64,
    state: u64,
    y: u64,
    state_stride: i64,
    z_rs: i32,
    s: i32,
    e: i32,
    n: i32,
    r: i32,
}

/// Dynamic shared memory of scan_step (its layout is in selective_scan.cu): the x_proj rows of
/// its sequences in f32 and as stored, and its channels' dt_proj rows, each padded by 16 bytes.
fn scan_step_smem(es: usize, r: usize, xdw: usize) -> usize {
    SCAN_STEP_SEQS * xdw * (4 + es) + SCAN_STEP_CHANNELS * (r * es + 16)
}

/// Mirrors `NllParams` in cross_entropy.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct NllParams {
    logits: u64,
    targets: u64,
    nll: u64,
    stride: i32,
    v: i32,
}

/// Mirrors `StepLayer` in decode.cu: one layer's weights and state for the step kernel.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct StepLayer {
    norm_w: u64,
    norm_b: u64,
    in_proj: u64,
    conv_w: u64,
    conv_b: u64,
    x_proj: u64,
    dt_proj: u64,
    dt_bias: u64,
    a2: u64,
    d: u64,
    gnorm_w: u64,
    out_proj: u64,
    conv_state: u64,
    ssm_state: u64,
    eps: f32,
}

/// Mirrors `StepParams` in decode.cu.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct StepParams {
    layers: u64,
    embedding: u64,
    head: u64,
    normf_w: u64,
    normf_b: u64,
    token: u64,
    resid: u64,
    act: u64,
    part: u64,
    y: u64,
    logits: u64,
    best: u64,
    ids: u64,
    next_token: u64,
    bar: u64,
    mamba2: i32,
    n_layer: i32,
    d_model: i32,
    e: i32,
    n: i32,
    r: i32,
    w: i32,
    h: i32,
    p: i32,
    g: i32,
    conv_dim: i32,
    in_rows: i32,
    d_per_channel: i32,
    head_rows: i32,
    limit: i32,
    groups: i32,
    smem_dt: i32,
    smem_wx: i32,
    smem_xc: i32,
    smem_res: i32,
    normf_eps: f32,
    gnorm_eps: f32,
    dt_min: f32,
    dt_max: f32,
}

/// decode.cu's bytes of shared memory of its rings (RING_PIECES, AUX_WORDS), and its limits.
const STEP_RING_BYTES: usize = (STEP_THREADS / 32 * STEP_NST * (STEP_PF + 1) * 32) * 16;
const STEP_MAX_WIDTH: usize = 12288;
const STEP_SMEM_MAX: usize = 227 * 1024;

unsafe impl DeviceRepr for StepLayer {}
unsafe impl DeviceRepr for StepParams {}
unsafe impl DeviceRepr for AddNormParams {}
unsafe impl DeviceRepr for ScanStepParams {}
unsafe impl DeviceRepr for NllParams {}

struct DNorm {
    w: CudaSlice<f32>,
    b: Option<CudaSlice<f32>>,
    eps: f32,
}

/// A weight matrix `(out × inp)` in the model's type.
struct DMatrix {
    w: CudaSlice<u8>,
    out: usize,
    inp: usize,
}

struct DMamba1 {
    in_proj: DMatrix,
    conv_w: CudaSlice<f32>,
    conv_b: Option<CudaSlice<f32>>,
    x_proj: DMatrix,
    dt_proj: DMatrix,
    dt_bias: CudaSlice<f32>,
    /// A·log2(e), `(N, E)`.
    a2: CudaSlice<f32>,
    d: CudaSlice<f32>,
    out_proj: DMatrix,
}

struct DMamba2 {
    in_proj: DMatrix,
    conv_w: CudaSlice<f32>,
    conv_b: Option<CudaSlice<f32>>,
    dt_bias: CudaSlice<f32>,
    /// A·log2(e) per head.
    a2: CudaSlice<f32>,
    d: CudaSlice<f32>,
    norm_w: CudaSlice<f32>,
    out_proj: DMatrix,
}

enum DMixer {
    M1(DMamba1),
    M2(DMamba2),
}

/// Recurrent state of `seqs` sequences on the device: `conv` is `(layers, seqs, W−1, C)`, `ssm`
/// `(layers, seqs, len)` in the CPU's per-layer layouts, so moving a [`State`] is a copy.
pub struct GpuStates {
    conv: CudaSlice<f32>,
    ssm: CudaSlice<f32>,
    pub seqs: usize,
    conv_len: usize,
    ssm_len: usize,
}

impl GpuStates {
    /// Where slot `i`'s conv and ssm rows start, and the bytes between layers: one row per
    /// layer.
    fn slot_rows(&self, g: &Gpu, i: usize) -> ((u64, usize), (u64, usize)) {
        let (c, s) = (g.ptr(&self.conv), g.ptr(&self.ssm));
        let (cl, sl) = (4 * self.conv_len, 4 * self.ssm_len);
        ((c + (i * cl) as u64, self.seqs * cl), (s + (i * sl) as u64, self.seqs * sl))
    }
}

/// Activation buffers for up to `rows` rows (`seqs` sequences) of one forward pass.
struct Buffers {
    rows: usize,
    seqs: usize,
    /// Rows of logits.
    logit_rows: usize,
    tokens: CudaSlice<u32>,
    resid: CudaSlice<f32>,
    h: CudaSlice<u8>,
    xz: CudaSlice<u8>,
    xc: CudaSlice<u8>,
    xdbl: CudaSlice<u8>,
    dt: CudaSlice<u8>,
    y: CudaSlice<u8>,
    out: CudaSlice<u8>,
    logits: CudaSlice<f32>,
    ids: CudaSlice<u32>,
    scan: CudaSlice<f32>,
}

pub struct GpuModel {
    pub gpu: Gpu,
    pub cfg: Config,
    /// Weights and activations.
    pub dtype: DType,
    embedding: DMatrix,
    lm_head: Option<DMatrix>,
    norm_f: DNorm,
    layers: Vec<(DNorm, DMixer)>,
    /// Buffers of the last eager forward, reused while large enough.
    bufs: Mutex<Option<Buffers>>,
}

/// What a model needs that the GPU path lacks, as an error naming it; checked before a GPU is
/// opened, so a model that cannot run there says why on any machine.
pub fn check_supported(cfg: &Config) -> Result<()> {
    if cfg.bias {
        bail!("projection biases (bias = true) are not supported on the GPU yet");
    }
    if cfg.d_conv > CONV_MAX_W {
        bail!("d_conv {} is not supported on the GPU (at most {CONV_MAX_W})", cfg.d_conv);
    }
    if cfg.d_model > NORM_VALUES * 1024 {
        bail!("d_model {} is not supported on the GPU (at most {})", cfg.d_model, NORM_VALUES * 1024);
    }
    if cfg.arch == Arch::Mamba2 && cfg.d_mlp() > 0 {
        bail!("Mamba-2 layers with an MLP branch (d_ssm < d_inner) are not supported on the GPU yet");
    }
    Ok(())
}

impl GpuModel {
    /// Uploads `model` to `gpu`. Its weights keep their storage type, which becomes the
    /// activation type.
    pub fn new(gpu: Gpu, model: &Model) -> Result<GpuModel> {
        let cfg = model.cfg.clone();
        check_supported(&cfg)?;
        if model.dtype == DType::I8 {
            bail!("--dtype int8 runs on the CPU; on the GPU use bf16 or f16");
        }
        let up = |v: &[f32]| gpu.upload(v);
        let mat = |m: &Matrix| -> Result<DMatrix> {
            Ok(DMatrix { w: gpu.upload(&m.data.to_le_bytes())?, out: m.rows, inp: m.cols })
        };
        let lin = |l: &Linear| mat(&l.w);
        let norm = |n: &Norm| -> Result<DNorm> {
            Ok(DNorm { w: up(&n.w)?, b: n.b.as_deref().map(up).transpose()?, eps: n.eps })
        };
        let log2e = std::f32::consts::LOG2_E;
        let mut layers = Vec::with_capacity(model.layers.len());
        for layer in &model.layers {
            let mixer = match &layer.mixer {
                Mixer::M1(m) => DMixer::M1(DMamba1 {
                    in_proj: lin(&m.in_proj)?,
                    conv_w: up(&m.conv_w)?,
                    conv_b: m.conv_b.as_deref().map(up).transpose()?,
                    x_proj: lin(&m.x_proj)?,
                    dt_proj: lin(&m.dt_proj)?,
                    dt_bias: up(&m.dt_bias)?,
                    a2: up(&m.a.iter().map(|a| a * log2e).collect::<Vec<_>>())?,
                    d: up(&m.d)?,
                    out_proj: lin(&m.out_proj)?,
                }),
                Mixer::M2(m) => DMixer::M2(DMamba2 {
                    in_proj: lin(&m.in_proj)?,
                    conv_w: up(&m.conv_w)?,
                    conv_b: m.conv_b.as_deref().map(up).transpose()?,
                    dt_bias: up(&m.dt_bias)?,
                    a2: up(&m.a.iter().map(|a| a * log2e).collect::<Vec<_>>())?,
                    d: up(&m.d)?,
                    norm_w: up(&m.norm_w)?,
                    out_proj: lin(&m.out_proj)?,
                }),
            };
            layers.push((norm(&layer.norm)?, mixer));
        }
        let embedding = mat(&model.embedding)?;
        let lm_head = model.lm_head.as_ref().map(mat).transpose()?;
        let norm_f = norm(&model.norm_f)?;
        gpu.sync()?;
        Ok(GpuModel { cfg, dtype: model.dtype, embedding, lm_head, norm_f, layers, bufs: Mutex::default(), gpu })
    }

    /// Zeroed state for `seqs` sequences.
    pub fn new_states(&self, seqs: usize) -> Result<GpuStates> {
        let mut st = self.uninit_states(seqs)?;
        self.zero_states(&mut st)?;
        Ok(st)
    }

    /// State for `seqs` sequences that the caller overwrites whole.
    fn uninit_states(&self, seqs: usize) -> Result<GpuStates> {
        let (conv_len, ssm_len) = crate::state::layer_floats(&self.cfg);
        let n = self.cfg.n_layer * seqs;
        Ok(GpuStates {
            conv: self.gpu.alloc(n * conv_len.max(1))?,
            ssm: self.gpu.alloc(n * ssm_len)?,
            seqs,
            conv_len,
            ssm_len,
        })
    }

    /// Resets every slot of `states` to the empty state.
    pub fn zero_states(&self, states: &mut GpuStates) -> Result<()> {
        self.gpu.stream.memset_zeros(&mut states.conv).map_err(err)?;
        self.gpu.stream.memset_zeros(&mut states.ssm).map_err(err)
    }

    /// Bytes of recurrent state per sequence.
    pub fn state_bytes(&self) -> usize {
        4 * self.cfg.state_floats()
    }

    /// Copies `state` into slot `i` of `states`, straight from its per-layer vectors.
    pub fn set_state(&self, states: &mut GpuStates, i: usize, state: &State) -> Result<()> {
        state.check(&self.cfg)?;
        let (conv, ssm) = states.slot_rows(&self.gpu, i);
        self.gpu.upload_rows(conv.0, conv.1, &state.layers.iter().map(|l| &l.conv[..]).collect::<Vec<_>>())?;
        let ssm_f32: Vec<_> = state.layers.iter().map(|l| l.ssm.to_f32()).collect();
        self.gpu.upload_rows(ssm.0, ssm.1, &ssm_f32.iter().map(|s| &s[..]).collect::<Vec<_>>())
    }

    /// The state in slot `i`, after `pos` tokens.
    pub fn get_state(&self, states: &GpuStates, i: usize, pos: u64) -> Result<State> {
        let mut st = State::new(&self.cfg);
        st.pos = pos;
        let (conv, ssm) = states.slot_rows(&self.gpu, i);
        self.gpu.download_rows(
            conv.0,
            conv.1,
            &mut st.layers.iter_mut().map(|l| &mut l.conv[..]).collect::<Vec<_>>(),
        )?;
        self.gpu.download_rows(ssm.0, ssm.1, &mut st.layers.iter_mut().map(|l| l.ssm.f32_mut()).collect::<Vec<_>>())?;
        Ok(st)
    }

    /// Resets slot `i` of `states` to the empty state, on the device.
    pub fn zero_slot(&self, states: &GpuStates, i: usize) -> Result<()> {
        let (conv, ssm) = states.slot_rows(&self.gpu, i);
        let n = self.cfg.n_layer;
        self.gpu.zero_rows(conv.0, conv.1, states.conv_len, n)?;
        self.gpu.zero_rows(ssm.0, ssm.1, states.ssm_len, n)
    }

    /// Copies slot `i` of `from` to slot `j` of `to`, on the device.
    pub fn copy_slot(&self, to: &GpuStates, j: usize, from: &GpuStates, i: usize) -> Result<()> {
        let ((dc, dcp), (ds, dsp)) = to.slot_rows(&self.gpu, j);
        let ((sc, scp), (ss, ssp)) = from.slot_rows(&self.gpu, i);
        let n = self.cfg.n_layer;
        self.gpu.copy_rows(dc, dcp, sc, scp, 4 * from.conv_len, n)?;
        self.gpu.copy_rows(ds, dsp, ss, ssp, 4 * from.ssm_len, n)
    }

    /// Bytes of weights read per decoded token.
    pub fn weight_bytes(&self) -> usize {
        let m = |x: &DMatrix| x.w.len();
        let mix: usize = self
            .layers
            .iter()
            .map(|(_, mx)| match mx {
                DMixer::M1(a) => m(&a.in_proj) + m(&a.x_proj) + m(&a.dt_proj) + m(&a.out_proj),
                DMixer::M2(a) => m(&a.in_proj) + m(&a.out_proj),
            })
            .sum();
        mix + m(self.lm_head.as_ref().unwrap_or(&self.embedding))
    }

    fn alloc_buffers(&self, seqs: usize, l: usize, n_logits: usize) -> Result<Buffers> {
        self.alloc_buffers_for(seqs, seqs * l, seqs * n_logits, self.scan_work(seqs, l))
    }

    /// Buffers for up to `seqs` sequences, `rows` positions, `logit_rows` rows of logits and
    /// `scan` floats of scan workspace.
    fn alloc_buffers_for(&self, seqs: usize, rows: usize, logit_rows: usize, scan: usize) -> Result<Buffers> {
        let c = &self.cfg;
        let es = self.dtype.size();
        let g = &self.gpu;
        let (xz_w, xc_w, xdbl_w, dt_w, y_w) = match c.arch {
            Arch::Mamba1 => (2 * c.d_inner, c.d_inner, c.dt_rank + 2 * c.d_state, c.d_inner, c.d_inner),
            Arch::Mamba2 => (c.d_in_proj(), c.conv_dim(), 0, 0, c.d_ssm),
        };
        Ok(Buffers {
            rows,
            seqs,
            logit_rows,
            tokens: g.alloc(rows)?,
            resid: g.alloc(rows * c.d_model)?,
            h: g.alloc(rows * c.d_model * es)?,
            xz: g.alloc(rows * xz_w * es)?,
            xc: g.alloc(rows * xc_w * es)?,
            xdbl: g.alloc(rows * xdbl_w * es)?,
            dt: g.alloc(rows * dt_w * es)?,
            y: g.alloc(rows * y_w * es)?,
            out: g.alloc(rows * c.d_model * es)?,
            logits: g.alloc(logit_rows * c.vocab_padded)?,
            ids: g.alloc(seqs)?,
            scan: g.alloc(scan)?,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, w: &DMatrix, x: u64, x_rs: usize, rows: usize, y: u64, y_rs: usize, y_f32: bool) -> Result<()> {
        let g = &self.gpu;
        g.gemm.matmul(g.stream.cu_stream(), self.dtype, g.ptr(&w.w), w.out, w.inp, x, x_rs, rows, y, y_rs, y_f32)
    }

    #[allow(clippy::too_many_arguments)]
    fn add_norm(
        &self,
        n: &DNorm,
        b: &Buffers,
        seqs: usize,
        delta: Option<u64>,
        embed: bool,
        l: usize,
        nsel: usize,
        out: u64,
    ) -> Result<()> {
        let g = &self.gpu;
        let p = AddNormParams {
            resid: g.ptr(&b.resid),
            delta: delta.unwrap_or(0),
            table: if embed { g.ptr(&self.embedding.w) } else { 0 },
            tokens: if embed { g.ptr(&b.tokens) } else { 0 },
            w: g.ptr(&n.w),
            b: n.b.as_ref().map_or(0, |b| g.ptr(b)),
            out,
            d: self.cfg.d_model as i32,
            l: l as i32,
            nsel: nsel as i32,
            eps: n.eps,
        };
        let threads = self.cfg.d_model.div_ceil(NORM_VALUES).next_multiple_of(32);
        g.launch_early(&format!("add_norm_{}", suffix(self.dtype)), ((seqs * nsel) as u32, 1, 1), threads as u32, 0, &p)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        &self,
        x: u64,
        x_rs: usize,
        w: &CudaSlice<f32>,
        bias: &Option<CudaSlice<f32>>,
        state: u64,
        y: u64,
        seqs: usize,
        l: usize,
        ch: usize,
    ) -> Result<()> {
        let g = &self.gpu;
        let bias = bias.as_ref().map(|b| g.ptr(b));
        conv_silu(g, self.dtype, (x, x_rs), g.ptr(w), bias, state, y, (seqs, l, ch, self.cfg.d_conv))
    }

    /// The scan parameters of a Mamba-2 layer, reading in_proj's output `zx` and the conv
    /// output `xbc` ([`m2_scan_params`]).
    fn m2_scan_params(
        &self,
        m: &DMamba2,
        (zx, xbc, y): (u64, u64, u64),
        state: u64,
        st: &GpuStates,
        l: usize,
    ) -> ScanParams {
        let g = &self.gpu;
        let weights = (g.ptr(&m.dt_bias), g.ptr(&m.a2), g.ptr(&m.d));
        m2_scan_params(&self.cfg, self.dtype, (zx, xbc, y), weights, (state, st.ssm_len), l)
    }

    /// Enqueues one pass over `seqs` sequences of `l` tokens (already in `b.tokens`), advancing
    /// slots `first..first + seqs` of `st`; the last `n_logits` positions' logits of each go to
    /// `b.logits`.
    fn forward(&self, b: &Buffers, st: &GpuStates, first: usize, seqs: usize, l: usize, n_logits: usize) -> Result<()> {
        let c = &self.cfg;
        let g = &self.gpu;
        let (rows, es, dm) = (seqs * l, self.dtype.size() as u64, c.d_model);
        let (h, out) = (g.ptr(&b.h), g.ptr(&b.out));
        for (i, (norm, mixer)) in self.layers.iter().enumerate() {
            let delta = if i == 0 { None } else { Some(out) };
            self.add_norm(norm, b, seqs, delta, i == 0, l, l, h)?;
            let conv_state = g.ptr(&st.conv) + 4 * ((i * st.seqs + first) * st.conv_len) as u64;
            let ssm_state = g.ptr(&st.ssm) + 4 * ((i * st.seqs + first) * st.ssm_len) as u64;
            match mixer {
                DMixer::M1(m) => {
                    let (e, n, r) = (c.d_inner, c.d_state, c.dt_rank);
                    let (xz, xc, xdbl, dt, y) = (g.ptr(&b.xz), g.ptr(&b.xc), g.ptr(&b.xdbl), g.ptr(&b.dt), g.ptr(&b.y));
                    let xdw = r + 2 * n;
                    self.gemm(&m.in_proj, h, dm, rows, xz, 2 * e, false)?;
                    self.conv(xz, 2 * e, &m.conv_w, &m.conv_b, conv_state, xc, seqs, l, e)?;
                    self.gemm(&m.x_proj, xc, e, rows, xdbl, xdw, false)?;
                    let piece = 16 / self.dtype.size();
                    let smem = scan_step_smem(es as usize, r, xdw);
                    let step_fits =
                        n <= SCAN_STEP_N && r.is_multiple_of(piece) && xdw.is_multiple_of(piece) && smem <= 96 << 10;
                    if l == 1 && step_fits {
                        // The decode step of a batch: dt_proj fused into the scan.
                        let p = ScanStepParams {
                            u: xc,
                            z: xz + es * e as u64,
                            xdbl,
                            dt_w: g.ptr(&m.dt_proj.w),
                            dt_bias: g.ptr(&m.dt_bias),
                            a2: g.ptr(&m.a2),
                            d: g.ptr(&m.d),
                            state: ssm_state,
                            y,
                            state_stride: st.ssm_len as i64,
                            z_rs: 2 * e as i32,
                            s: seqs as i32,
                            e: e as i32,
                            n: n as i32,
                            r: r as i32,
                        };
                        let grid = (e.div_ceil(SCAN_STEP_CHANNELS) as u32, seqs.div_ceil(SCAN_STEP_SEQS) as u32, 1);
                        let name = format!("scan_step_{}", suffix(self.dtype));
                        g.launch_early(&name, grid, SCAN_STEP_CHANNELS as u32, smem as u32, &p)?;
                    } else {
                        self.gemm(&m.dt_proj, xdbl, xdw, rows, dt, e, false)?;
                        let mut p = ScanParams {
                            u: xc,
                            dt,
                            dt_bias: g.ptr(&m.dt_bias),
                            a2: g.ptr(&m.a2),
                            b: xdbl + es * r as u64,
                            c: xdbl + es * (r + n) as u64,
                            d: g.ptr(&m.d),
                            z: xz + es * e as u64,
                            state: ssm_state,
                            y,
                            state_stride: st.ssm_len as i64,
                            u_rs: e as i32,
                            dt_rs: e as i32,
                            dt_div: 1,
                            a_ns: e as i32,
                            a_div: 1,
                            bc_rs: xdw as i32,
                            g_ch: e as i32,
                            d_div: 1,
                            z_rs: 2 * e as i32,
                            p_blk: e as i32,
                            y_rs: e as i32,
                            l: l as i32,
                            e: e as i32,
                            n: n as i32,
                            dt_min: 0.0,
                            dt_max: f32::INFINITY,
                            ..Default::default()
                        };
                        selective_scan(g, self.dtype, &mut p, seqs, false, g.ptr(&b.scan))?;
                    }
                    self.gemm(&m.out_proj, y, e, rows, out, dm, false)?;
                }
                DMixer::M2(m) => {
                    let (gr, ds) = (c.ngroups, c.d_ssm);
                    let (w_in, cd) = (c.d_in_proj(), c.conv_dim());
                    let (zx, xbc, y) = (g.ptr(&b.xz), g.ptr(&b.xc), g.ptr(&b.y));
                    self.gemm(&m.in_proj, h, dm, rows, zx, w_in, false)?;
                    self.conv(zx + es * ds as u64, w_in, &m.conv_w, &m.conv_b, conv_state, xbc, seqs, l, cd)?;
                    let mut p = self.m2_scan_params(m, (zx, xbc, y), ssm_state, st, l);
                    if l == 1 && c.d_state <= SSD_STEP_NMAX && (ds / gr).is_multiple_of(SSD_STEP_CHANNELS) {
                        // The decode step of a batch (a block's channels share one group).
                        let grid = (ds.div_ceil(SSD_STEP_CHANNELS) as u32, seqs as u32, 1);
                        let name = format!("ssd_step_{}", suffix(self.dtype));
                        g.launch(&name, grid, (SSD_STEP_CHANNELS * SSD_STEP_SPLIT) as u32, &p, None)?;
                    } else if ssd_fits(c, self.dtype, l) {
                        ssd(g, self.dtype, &mut p, seqs, g.ptr(&b.scan))?;
                    } else {
                        selective_scan(g, self.dtype, &mut p, seqs, true, g.ptr(&b.scan))?;
                    }
                    gated_norm(g, self.dtype, y, (zx, w_in), g.ptr(&m.norm_w), (rows, gr, ds / gr), c.norm_eps)?;
                    self.gemm(&m.out_proj, y, ds, rows, out, dm, false)?;
                }
            }
        }
        if n_logits == 0 {
            return Ok(());
        }
        // Only the positions that give logits go through the final norm and the head.
        self.add_norm(&self.norm_f, b, seqs, Some(out), false, l, n_logits, h)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embedding);
        self.gemm(head, h, dm, seqs * n_logits, g.ptr(&b.logits), c.vocab_padded, true)
    }

    /// Floats of scan workspace a pass of `seqs` sequences of `l` steps needs.
    fn scan_work(&self, seqs: usize, l: usize) -> usize {
        let (e, n) = (self.scan_channels(), self.cfg.d_state);
        let ssd = if ssd_fits(&self.cfg, self.dtype, l) { ssd_workspace(seqs, e, n, l) } else { 0 };
        scan_workspace(seqs, e, n, l).max(ssd)
    }

    /// Channels of the selective scan: d_inner for Mamba-1, d_ssm (heads × headdim) for Mamba-2.
    fn scan_channels(&self) -> usize {
        match self.cfg.arch {
            Arch::Mamba1 => self.cfg.d_inner,
            Arch::Mamba2 => self.cfg.d_ssm,
        }
    }

    /// Whether the batch-1 step fits decode.cu's persistent kernel (its register and
    /// shared-memory layouts); other shapes decode through the general path.
    fn step_kernel_ok(&self) -> bool {
        let c = &self.cfg;
        let v = 16 / self.dtype.size();
        let e = self.scan_channels();
        let mixer_ok = match c.arch {
            Arch::Mamba1 => c.d_state <= STEP_M1_N && c.dt_rank + 2 * c.d_state <= 2 * STEP_M2_MAX_N,
            Arch::Mamba2 => c.d_state <= STEP_M2_MAX_N && c.ngroups * c.d_state <= STEP_M2_MAX_N,
        };
        // Epochs per token (3 hand-overs per layer and the final barrier) within the kernel's
        // EPOCHS.
        mixer_ok
            && 3 * c.n_layer < STEP_EPOCHS
            && self.step_smem().total <= STEP_SMEM_MAX
            && c.d_model <= STEP_NORM_PT * STEP_THREADS
            && c.d_model.is_multiple_of(v)
            && e.is_multiple_of(v)
            && c.d_model.max(e) <= STEP_MAX_WIDTH
            && c.d_conv <= 8
    }

    /// decode.cu's shared memory: the byte offsets of Mamba-1's dt_proj rows, x_proj slices and
    /// x channels' conv outputs (after the rings and x), of the residual stream's copy, and the
    /// total.
    fn step_smem(&self) -> StepSmem {
        let c = &self.cfg;
        let e = self.scan_channels();
        let grid = self.gpu.sm_count().unwrap_or(1) as usize;
        // Groups of 16 x channels per block, and the dt_proj rows, states and A of the warps
        // with scan channels (32 channels each, m1_scan).
        let (groups, dt_rows) = match c.arch {
            Arch::Mamba1 => {
                let lane = (c.dt_rank * self.dtype.size()).div_ceil(16) * 16 + 2 * STEP_M1_N * 4;
                (e.div_ceil(16 * grid), e.div_ceil(32 * grid) * 32 * lane)
            }
            Arch::Mamba2 => (0, 0),
        };
        let x_proj_slices = groups * (c.dt_rank + 2 * c.d_state) * 16 * self.dtype.size();
        let dt = STEP_RING_BYTES + 4 * c.d_model.max(e).max(4 * STEP_THREADS);
        let (wx, xc) = (dt + dt_rows, dt + dt_rows + x_proj_slices);
        let res = xc + 64 * groups;
        StepSmem { groups, dt, wx, xc, res, total: res + 4 * c.d_model }
    }

    /// The persistent step kernel's parameters for slot 0 of `st` (one sequence), with its
    /// layer table and scratch (x_proj partials, argmax, barrier) allocated alongside.
    fn step_kernel(&self, b: &Buffers, st: &GpuStates, vocab_limit: usize) -> Result<StepKernel> {
        let c = &self.cfg;
        let g = &self.gpu;
        let opt = |v: &Option<CudaSlice<f32>>| v.as_ref().map_or(0, |x| g.ptr(x));
        let e = self.scan_channels();
        let mut table = Vec::with_capacity(self.layers.len());
        for (i, (norm, mixer)) in self.layers.iter().enumerate() {
            let at = i * st.seqs;
            let mut l = StepLayer {
                norm_w: g.ptr(&norm.w),
                norm_b: opt(&norm.b),
                eps: norm.eps,
                conv_state: g.ptr(&st.conv) + 4 * (at * st.conv_len) as u64,
                ssm_state: g.ptr(&st.ssm) + 4 * (at * st.ssm_len) as u64,
                ..Default::default()
            };
            match mixer {
                DMixer::M1(m) => {
                    l.in_proj = g.ptr(&m.in_proj.w);
                    l.conv_w = g.ptr(&m.conv_w);
                    l.conv_b = opt(&m.conv_b);
                    l.x_proj = g.ptr(&m.x_proj.w);
                    l.dt_proj = g.ptr(&m.dt_proj.w);
                    l.dt_bias = g.ptr(&m.dt_bias);
                    l.a2 = g.ptr(&m.a2);
                    l.d = g.ptr(&m.d);
                    l.out_proj = g.ptr(&m.out_proj.w);
                }
                DMixer::M2(m) => {
                    l.in_proj = g.ptr(&m.in_proj.w);
                    l.conv_w = g.ptr(&m.conv_w);
                    l.conv_b = opt(&m.conv_b);
                    l.dt_bias = g.ptr(&m.dt_bias);
                    l.a2 = g.ptr(&m.a2);
                    l.d = g.ptr(&m.d);
                    l.gnorm_w = g.ptr(&m.norm_w);
                    l.out_proj = g.ptr(&m.out_proj.w);
                }
            }
            table.push(l);
        }
        let layers = g.upload(&table)?;
        let grid = g.sm_count()?;
        let sm = self.step_smem();
        // The argmax word, then the barrier's flag per block and base epoch (u32 each).
        let sync = self.gpu.stream.alloc_zeros::<u64>(2 + grid as usize / 2).map_err(err)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embedding);
        let (in_rows, conv_dim) = match c.arch {
            Arch::Mamba1 => (2 * e, e),
            Arch::Mamba2 => (c.d_in_proj(), c.conv_dim()),
        };
        // The flagged words handed between phases (zero: epoch 0, never one a phase waits for):
        // the residual stream, in_proj's outputs, y. Mamba-1's x_proj partials are plain f32.
        let words = self.gpu.stream.alloc_zeros::<u64>(c.d_model + in_rows + e).map_err(err)?;
        let word = |i: usize| g.ptr(&words) + 8 * i as u64;
        let part = g.alloc::<f32>(grid as usize * (c.dt_rank + 2 * c.d_state).next_multiple_of(4))?;
        let p = StepParams {
            layers: g.ptr(&layers),
            embedding: g.ptr(&self.embedding.w),
            head: g.ptr(&head.w),
            normf_w: g.ptr(&self.norm_f.w),
            normf_b: opt(&self.norm_f.b),
            token: g.ptr(&b.tokens),
            resid: word(0),
            act: word(c.d_model),
            part: g.ptr(&part),
            y: word(c.d_model + in_rows),
            logits: g.ptr(&b.logits),
            best: g.ptr(&sync),
            ids: g.ptr(&b.ids),
            next_token: g.ptr(&b.tokens),
            bar: g.ptr(&sync) + 8,
            mamba2: (c.arch == Arch::Mamba2) as i32,
            n_layer: c.n_layer as i32,
            d_model: c.d_model as i32,
            e: e as i32,
            n: c.d_state as i32,
            r: c.dt_rank as i32,
            w: c.d_conv as i32,
            h: if c.arch == Arch::Mamba2 { c.nheads() as i32 } else { 0 },
            p: c.headdim as i32,
            g: c.ngroups as i32,
            conv_dim: conv_dim as i32,
            in_rows: in_rows as i32,
            d_per_channel: c.d_has_hdim as i32,
            head_rows: head.out as i32,
            limit: vocab_limit.min(head.out) as i32,
            groups: sm.groups as i32,
            smem_dt: sm.dt as i32,
            smem_wx: sm.wx as i32,
            smem_xc: sm.xc as i32,
            smem_res: sm.res as i32,
            normf_eps: self.norm_f.eps,
            gnorm_eps: c.norm_eps,
            dt_min: c.dt_limit.0,
            dt_max: c.dt_limit.1,
        };
        let name = format!("decode_step_{}", suffix(self.dtype));
        let smem = sm.total as u32;
        let k = StepKernel {
            func: g.kernel(&name, smem)?,
            name,
            grid,
            smem,
            p,
            _layers: layers,
            _words: words,
            _part: part,
            _sync: sync,
        };
        Ok(k)
    }

    /// Runs `seqs` sequences of `l` tokens each (`tokens` row-major) from slots
    /// `first..first + seqs` of `st`, and returns the logits of each one's last `n_logits`
    /// positions.
    pub fn run(&self, tokens: &[u32], l: usize, st: &GpuStates, first: usize, n_logits: usize) -> Result<Vec<f32>> {
        let seqs = tokens.len() / l.max(1);
        self.run_then(tokens, l, st, first, n_logits, |b| {
            self.gpu.download(&b.logits, seqs * n_logits * self.cfg.vocab_padded)
        })
    }

    /// Runs `tokens` (one sequence) from slot `slot` of `st` and returns `−log p(target)` for
    /// each of its first `targets.len()` positions, computed on the device (cross_entropy.cu).
    pub fn run_nll(&self, tokens: &[u32], st: &GpuStates, slot: usize, targets: &[u32]) -> Result<Vec<f64>> {
        let (l, n, v) = (tokens.len(), targets.len(), self.cfg.vocab_padded);
        if n > l {
            bail!("GPU forward: {n} targets for {l} positions");
        }
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
            bail!("token id {t} is out of range: the model's vocabulary has {v} entries");
        }
        self.run_then(tokens, l, st, slot, l, |b| {
            if n == 0 {
                return Ok(vec![]);
            }
            let g = &self.gpu;
            let t = g.upload(targets)?;
            let nll = g.alloc::<f64>(n)?;
            let p = NllParams {
                logits: g.ptr(&b.logits),
                targets: g.ptr(&t),
                nll: g.ptr(&nll),
                stride: v as i32,
                v: v as i32,
            };
            g.launch("nll_rows", (n as u32, 1, 1), 1024, &p, None)?;
            g.download(&nll, n)
        })
    }

    /// Enqueues a forward pass as [`GpuModel::run`] describes, then hands its buffers to `then`.
    fn run_then<T>(
        &self,
        tokens: &[u32],
        l: usize,
        st: &GpuStates,
        first: usize,
        n_logits: usize,
        then: impl FnOnce(&Buffers) -> Result<T>,
    ) -> Result<T> {
        let seqs = tokens.len() / l.max(1);
        let v = self.cfg.vocab_padded;
        if l == 0 || tokens.len() != seqs * l || first + seqs > st.seqs || n_logits > l {
            bail!(
                "GPU forward: {} tokens do not make {seqs} sequences of {l} in slots from {first} of {}",
                tokens.len(),
                st.seqs
            );
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= v) {
            bail!("token id {t} is out of range: the model's vocabulary has {v} entries");
        }
        let mut guard = self.bufs.lock().unwrap();
        // (sequences, rows, rows of logits, scan workspace) this pass needs, and what the
        // buffers hold.
        let need = (seqs, seqs * l, seqs * n_logits, self.scan_work(seqs, l));
        let have = guard.as_ref().map_or((0, 0, 0, 0), |b| (b.seqs, b.rows, b.logit_rows, b.scan.len()));
        if have.0 < need.0 || have.1 < need.1 || have.2 < need.2 || have.3 < need.3 {
            // Free the old buffers before allocating larger ones, large enough for the old
            // shape too: a server alternating long single prompts and many short chunks would
            // otherwise reallocate on every pass.
            *guard = None;
            *guard = Some(self.alloc_buffers_for(
                need.0.max(have.0),
                need.1.max(have.1),
                need.2.max(have.2),
                need.3.max(have.3),
            )?);
        }
        let b = guard.as_mut().unwrap();
        let mut dst = b.tokens.slice_mut(..tokens.len());
        self.gpu.stream.memcpy_htod(tokens, &mut dst).map_err(err)?;
        self.forward(b, st, first, seqs, l, n_logits)?;
        then(b)
    }

    /// The decode step of slots `0..seqs` of `st` (the others are left alone): the persistent
    /// kernel of decode.cu for one sequence, otherwise the general path captured in a CUDA
    /// graph. Either ends with the greedy token (below `vocab_limit`) written as the next
    /// step's input.
    pub fn decoder(&self, st: &GpuStates, seqs: usize, vocab_limit: usize) -> Result<Decoder<'_>> {
        if seqs == 0 || seqs > st.seqs {
            bail!("a decoder of {seqs} sequences over states of {}", st.seqs);
        }
        let mut bufs = self.alloc_buffers(seqs, 1, 1)?;
        let g = &self.gpu;
        g.stream.memset_zeros(&mut bufs.tokens).map_err(err)?;
        if seqs == 1 && self.step_kernel_ok() {
            // One step on scratch states loads the kernel now rather than in the first step.
            let scratch = self.new_states(1)?;
            let warm = self.step_kernel(&bufs, &scratch, vocab_limit)?;
            warm.launch(g)?;
            g.stream.memset_zeros(&mut bufs.tokens).map_err(err)?;
            g.sync()?;
            drop(warm);
            let k = self.step_kernel(&bufs, st, vocab_limit)?;
            return Ok(Decoder {
                model: self,
                bufs,
                replay: Replay::Kernel(Box::new(k)),
                seqs,
                vocab_limit,
                picker: None,
            });
        }
        // Create every cuBLASLt plan and load every kernel before capture, on scratch states
        // (capture records work without running it; this warm-up runs it).
        self.forward(&bufs, &self.new_states(seqs)?, 0, seqs, 1, 1)?;
        g.sync()?;
        let graph = g.capture(|| {
            self.forward(&bufs, st, 0, seqs, 1, 1)?;
            let v = self.cfg.vocab_padded;
            argmax(g, g.ptr(&bufs.logits), g.ptr(&bufs.ids), seqs, v, vocab_limit.min(v))?;
            // The greedy token becomes the next step's input, so greedy decoding can run on the
            // device without the host in the loop.
            g.stream.memcpy_dtod(&bufs.ids, &mut bufs.tokens).map_err(err)
        })?;
        Ok(Decoder { model: self, bufs, replay: Replay::Graph(graph), seqs, vocab_limit, picker: None })
    }
}

/// decode.cu's shared-memory layout (byte offsets) for a model.
struct StepSmem {
    groups: usize,
    dt: usize,
    wx: usize,
    xc: usize,
    res: usize,
    total: usize,
}

/// decode.cu's persistent step kernel, ready to launch: its parameters and what they point to
/// beyond the model and the decoder's buffers.
struct StepKernel {
    name: String,
    func: CudaFunction,
    grid: u32,
    smem: u32,
    p: StepParams,
    _layers: CudaSlice<StepLayer>,
    _words: CudaSlice<u64>,
    _part: CudaSlice<f32>,
    _sync: CudaSlice<u64>,
}

impl StepKernel {
    fn launch(&self, g: &Gpu) -> Result<()> {
        g.launch_with(
            &self.name,
            &self.func,
            (self.grid, 1, 1),
            STEP_THREADS as u32,
            self.smem,
            &self.p,
            Gpu::cooperative(),
        )
    }
}

/// How a decode step is replayed: one kernel launch, or a CUDA graph.
enum Replay {
    Kernel(Box<StepKernel>),
    Graph(CudaGraph),
}

/// The decode step of a fixed batch.
pub struct Decoder<'a> {
    model: &'a GpuModel,
    bufs: Buffers,
    replay: Replay,
    pub seqs: usize,
    /// The greedy pick is below this token id.
    pub vocab_limit: usize,
    /// Buffers of picks other than greedy, made when first needed.
    picker: Option<Picker>,
}

impl Decoder<'_> {
    /// Feeds one token per sequence (enqueued, not waited for).
    pub fn step(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.len() != self.seqs {
            bail!("decode step: {} tokens for {} sequences", tokens.len(), self.seqs);
        }
        let v = self.model.cfg.vocab_padded;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= v) {
            bail!("token id {t} is out of range: the model's vocabulary has {v} entries");
        }
        self.model.gpu.stream.memcpy_htod(tokens, &mut self.bufs.tokens).map_err(err)?;
        self.step_greedy()
    }

    /// Feeds each sequence its greedy token from the previous step (or what `step` gave).
    pub fn step_greedy(&mut self) -> Result<()> {
        match &self.replay {
            Replay::Kernel(k) => k.launch(&self.model.gpu),
            Replay::Graph(g) => g.launch().map_err(err),
        }
    }

    /// The greedy next token of each sequence after the last step.
    pub fn argmax(&self) -> Result<Vec<u32>> {
        self.model.gpu.download(&self.bufs.ids, self.seqs)
    }

    /// Each sequence's next token picked from the last step's logits by `s` (see
    /// [`Picker::pick`]; rows it leaves to the host come back as [`PICK_HOST`]).
    pub fn pick(&mut self, s: &Sampling, u: &[f32], history: &[&[u32]]) -> Result<Vec<u32>> {
        let g = &self.model.gpu;
        let v = self.model.cfg.vocab_padded;
        if self.picker.is_none() {
            self.picker = Some(Picker::new(g, self.seqs, v)?);
        }
        let logits = g.ptr(&self.bufs.logits);
        self.picker.as_mut().unwrap().pick(g, logits, v, self.vocab_limit.min(v), s, u, history)
    }

    /// The logits of sequences `seqs` after the last step, row after row.
    pub fn logits(&self, seqs: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let v = self.model.cfg.vocab_padded;
        self.model.gpu.download_at(&self.bufs.logits, seqs.start * v, seqs.len() * v)
    }
}

/// The GPU as a [`Backend`]: states on the device; prefill eager, decode steps by a [`Decoder`]
/// over slots `0..k`, `k` the power of two (at most the slot count) that covers the slots fed,
/// so a step costs what the live batch needs. In that range a retired slot gets a placeholder
/// token; a live one not fed keeps its state through the step by a copy to a spare slot and
/// back, on the device.
pub struct GpuRun<'m> {
    model: &'m GpuModel,
    states: Option<GpuStates>,
    pos: Vec<u64>,
    retired: Vec<bool>,
    /// Decoders of the batch sizes used so far, made when first needed.
    decoders: Vec<Decoder<'m>>,
    /// The decoder (index in `decoders`) that last stepped each slot: it holds the slot's logits.
    stepped_by: Vec<usize>,
    /// Where live slots not fed by a step wait it out, made when first needed.
    spare: Option<GpuStates>,
}

impl<'m> GpuRun<'m> {
    pub fn new(model: &'m GpuModel) -> GpuRun<'m> {
        GpuRun { model, states: None, pos: vec![], retired: vec![], decoders: vec![], stepped_by: vec![], spare: None }
    }

    /// The batch of the decode step that feeds `slots`.
    fn step_width(&self, slots: &[usize]) -> usize {
        let top = slots.iter().max().map_or(1, |&i| i + 1);
        top.next_power_of_two().min(self.pos.len())
    }

    /// Whether the decode step that feeds `slots` leaves every other slot as it may.
    fn step_spares_the_rest(&self, slots: &[usize]) -> bool {
        (0..self.step_width(slots)).all(|i| self.retired[i] || slots.contains(&i))
    }
}

impl Backend for GpuRun<'_> {
    fn cfg(&self) -> &Config {
        &self.model.cfg
    }

    fn begin(&mut self, states: Vec<State>) -> Result<()> {
        // The decoders' graphs hold the states' device addresses: they go first.
        self.decoders.clear();
        self.states = None;
        self.spare = None;
        let mut st = self.model.new_states(states.len())?;
        for (i, s) in states.iter().enumerate() {
            self.model.set_state(&mut st, i, s)?;
        }
        self.pos = states.iter().map(|s| s.pos).collect();
        self.retired = vec![false; states.len()];
        self.stepped_by = vec![usize::MAX; states.len()];
        self.states = Some(st);
        Ok(())
    }

    fn set_state(&mut self, i: usize, state: Kept) -> Result<()> {
        let st = self.states.as_mut().ok_or_else(|| anyhow::anyhow!("GPU run used before begin"))?;
        match &state {
            Kept::Host(s) => self.model.set_state(st, i, s)?,
            Kept::Device { data, .. } => {
                state.check(&self.model.cfg)?;
                let from = data.downcast_ref::<GpuStates>().ok_or_else(|| anyhow::anyhow!("not a GPU state"))?;
                self.model.copy_slot(st, i, from, 0)?;
            }
        }
        self.pos[i] = state.pos();
        self.retired[i] = false;
        Ok(())
    }

    fn reset(&mut self, i: usize) -> Result<()> {
        let st = self.states.as_ref().ok_or_else(|| anyhow::anyhow!("GPU run used before begin"))?;
        self.model.zero_slot(st, i)?;
        self.pos[i] = 0;
        self.retired[i] = false;
        Ok(())
    }

    fn forward(&mut self, tokens: &[u32], l: usize, slots: &[usize], n_logits: usize) -> Result<Vec<f32>> {
        let st = self.states.as_ref().ok_or_else(|| anyhow::anyhow!("GPU run used before begin"))?;
        slots.iter().for_each(|&i| self.pos[i] += l as u64);
        let v = self.model.cfg.vocab_padded;
        // One token a slot goes through a decode step (which keeps the state of the live slots it
        // does not feed), except for consecutive slots while others are live: the prefill way
        // touches only its own slots, without copying the others' states.
        let consecutive = slots.windows(2).all(|w| w[1] == w[0] + 1);
        if l == 1 && n_logits == 1 && (self.step_spares_the_rest(slots) || !consecutive) {
            // Any pick limit does: these logits go back whole.
            let k = self.step(tokens, slots, None)?;
            let dec = &self.decoders[k];
            let logits = dec.logits(0..dec.seqs)?;
            return Ok(slots.iter().flat_map(|&i| logits[i * v..(i + 1) * v].iter().copied()).collect());
        }
        if !consecutive {
            bail!("GPU prefill needs consecutive slots");
        }
        self.model.run(tokens, l, st, slots[0], n_logits)
    }

    fn state(&mut self, i: usize) -> Result<State> {
        let st = self.states.as_ref().ok_or_else(|| anyhow::anyhow!("GPU run used before begin"))?;
        self.model.get_state(st, i, self.pos[i])
    }

    /// A one-slot copy in device memory, made on the stream: nothing waits for it.
    fn keep(&mut self, i: usize) -> Result<Kept> {
        let st = self.states.as_ref().ok_or_else(|| anyhow::anyhow!("GPU run used before begin"))?;
        let copy = self.model.uninit_states(1)?; // the copy writes every float
        self.model.copy_slot(&copy, 0, st, i)?;
        Ok(Kept::Device { data: Arc::new(copy), pos: self.pos[i], bytes: self.model.state_bytes() })
    }

    fn retire(&mut self, i: usize) {
        self.retired[i] = true;
    }

    fn forward_nll(&mut self, tokens: &[u32], slot: usize, targets: &[u32]) -> Result<Vec<f64>> {
        let st = self.states.as_ref().ok_or_else(|| anyhow::anyhow!("GPU run used before begin"))?;
        self.pos[slot] += tokens.len() as u64;
        self.model.run_nll(tokens, st, slot, targets)
    }

    fn picks(&self, _s: &Sampling) -> bool {
        true
    }

    fn forward_pick(
        &mut self,
        tokens: &[u32],
        slots: &[usize],
        limit: usize,
        sampling: &Sampling,
        us: &[f64],
        history: &[&[u32]],
    ) -> Result<Vec<u32>> {
        slots.iter().for_each(|&i| self.pos[i] += 1);
        let k = self.step(tokens, slots, Some(limit))?;
        let dec = &mut self.decoders[k];
        if !needs_pick(sampling) {
            let ids = dec.argmax()?;
            return Ok(slots.iter().map(|&i| ids[i]).collect());
        }
        let mut u = vec![0.0f32; dec.seqs];
        let mut hist: Vec<&[u32]> = vec![&[]; dec.seqs];
        for ((&i, &x), &h) in slots.iter().zip(us).zip(history) {
            u[i] = x as f32;
            hist[i] = h;
        }
        let ids = dec.pick(sampling, &u, &hist)?;
        let mut out = Vec::with_capacity(slots.len());
        for (j, &i) in slots.iter().enumerate() {
            out.push(match ids[i] {
                // A row without a finite logit: the host picks by its rules.
                PICK_HOST => sample(&mut dec.logits(i..i + 1)?[..limit], history[j], sampling, us[j]),
                t => t,
            });
        }
        Ok(out)
    }

    fn picked_logits(&mut self, i: usize) -> Result<Vec<f32>> {
        let dec =
            self.decoders.get(self.stepped_by[i]).ok_or_else(|| anyhow::anyhow!("no GPU decode step fed slot {i}"))?;
        dec.logits(i..i + 1)
    }
}

impl GpuRun<'_> {
    /// One decode step of slots `0..step_width(slots)` (those not in `slots` get a placeholder
    /// token), through a decoder whose greedy pick stays below `limit` (rebuilt if it was made
    /// for another; `None`: any will do). Returns the decoder's index.
    fn step(&mut self, tokens: &[u32], slots: &[usize], limit: Option<usize>) -> Result<usize> {
        let st = self.states.as_ref().ok_or_else(|| anyhow::anyhow!("GPU run used before begin"))?;
        let width = self.step_width(slots);
        let k = match self.decoders.iter().position(|d| d.seqs == width) {
            Some(k) if limit.is_none_or(|l| self.decoders[k].vocab_limit == l) => k,
            found => {
                let dec = self.model.decoder(st, width, limit.unwrap_or(self.model.cfg.vocab_size))?;
                match found {
                    Some(k) => {
                        self.decoders[k] = dec;
                        // Its logits are gone with the old one.
                        self.stepped_by.iter_mut().filter(|b| **b == k).for_each(|b| *b = usize::MAX);
                        k
                    }
                    None => {
                        self.decoders.push(dec);
                        self.decoders.len() - 1
                    }
                }
            }
        };
        // Live slots in the step's range not fed (prompts part-way through their prefill) keep
        // their state.
        let keep: Vec<usize> = (0..width).filter(|i| !self.retired[*i] && !slots.contains(i)).collect();
        if !keep.is_empty() && self.spare.is_none() {
            self.spare = Some(self.model.new_states(st.seqs)?);
        }
        for &i in &keep {
            self.model.copy_slot(self.spare.as_ref().unwrap(), i, st, i)?;
        }
        let mut all = vec![0u32; width];
        slots.iter().zip(tokens).for_each(|(&i, &t)| all[i] = t);
        self.decoders[k].step(&all)?;
        for &i in &keep {
            self.model.copy_slot(st, i, self.spare.as_ref().unwrap(), i)?;
        }
        slots.iter().for_each(|&i| self.stepped_by[i] = k);
        Ok(k)
    }
}
