//! Launches of the training kernels (their parameter structs mirror the `.cu` files'), each
//! beside its CPU twin in `crate::ops` / `crate::train`: RMSNorm, the causal conv, the scan's
//! backward, the LM head's cross-entropy, the embedding, the reductions and AdamW. All f32.

use crate::cuda::consts::{SCAN_BWD_LANE_THREADS, SCAN_BWD_SPL, SCAN_BWD_THREADS};
use crate::cuda::gemm::Operand;
use crate::cuda::Gpu;
use crate::tensor::DType;
use anyhow::Result;
use cudarc::driver::DeviceRepr;

/// Row slices of the norm weights' gradient partial sums (rms_norm_weight_grad's blockIdx.y).
pub const NORM_SLICES: usize = 64;
pub use crate::cuda::consts::{CONV_RUN, SCAN_BWD_MAX_N, SCAN_BWD_SUB};
/// Blocks of sum_squares (its partial sums, added on the host in order).
pub const SQUARE_BLOCKS: usize = 528;

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct NormTrainParams {
    pub x: u64,
    pub w: u64,
    pub out: u64,
    pub rstd: u64,
    pub gy: u64,
    pub gx: u64,
    pub parts: u64,
    pub d: i32,
    pub rows: i32,
    pub eps: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct GatedNormTrainParams {
    pub y: u64,
    pub z: u64,
    pub w: u64,
    pub gy: u64,
    pub gx: u64,
    pub gz: u64,
    pub rstd: u64,
    pub parts: u64,
    pub z_rs: i32,
    pub gsize: i32,
    pub groups: i32,
    pub rows: i32,
    pub eps: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ConvBwdParams {
    pub x: u64,
    pub x_rs: i32,
    pub w: u64,
    pub bias: u64,
    pub g: u64,
    pub gx: u64,
    pub gx_rs: i32,
    pub parts: u64,
    pub l: i32,
    pub c: i32,
    pub width: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ScanBwdParams {
    pub u: u64,
    pub dt: u64,
    pub dt_bias: u64,
    pub a_log: u64,
    pub b: u64,
    pub c: u64,
    pub d: u64,
    pub z: u64,
    pub gy: u64,
    pub gu: u64,
    pub gdt: u64,
    pub gz: u64,
    pub y: u64,
    pub ckpt: u64,
    pub parts_bc: u64,
    pub parts_a: u64,
    pub parts_dd: u64,
    pub u_rs: i32,
    pub dt_rs: i32,
    pub bc_rs: i32,
    pub z_rs: i32,
    pub l: i32,
    pub e: i32,
    pub n: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SumPartsParams {
    parts: u64,
    out: u64,
    group_stride: i64,
    part_stride: i64,
    out_group: i64,
    nparts: i32,
    n: i32,
    width: i32,
    out_rs: i32,
    add: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SumSquaresParams {
    x: u64,
    n: i64,
    out: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EmbedParams {
    pub table: u64,
    pub tokens: u64,
    pub starts: u64,
    pub pos: u64,
    pub rows: u64,
    pub d: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CeGradParams {
    logits: u64,
    targets: u64,
    nll: u64,
    stride: i32,
    v: i32,
    grad: i32,
    scale: f32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct AdamWParams {
    pub p: u64,
    pub g: u64,
    pub m: u64,
    pub v: u64,
    pub n: i64,
    pub clip: f32,
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TwoPtrParams {
    src: u64,
    dst: u64,
    a: i32,
    b: i32,
}

unsafe impl DeviceRepr for NormTrainParams {}
unsafe impl DeviceRepr for GatedNormTrainParams {}
unsafe impl DeviceRepr for ConvBwdParams {}
unsafe impl DeviceRepr for ScanBwdParams {}
unsafe impl DeviceRepr for SumPartsParams {}
unsafe impl DeviceRepr for SumSquaresParams {}
unsafe impl DeviceRepr for EmbedParams {}
unsafe impl DeviceRepr for CeGradParams {}
unsafe impl DeviceRepr for AdamWParams {}
unsafe impl DeviceRepr for TwoPtrParams {}
unsafe impl DeviceRepr for ToHalfParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct ToHalfParams {
    src: u64,
    dst: u64,
    rows: i64,
    cols: i64,
    ld: i64,
}

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

/// Threads of a one-block-per-row kernel over rows of `d`.
fn row_threads(d: usize) -> u32 {
    d.next_multiple_of(32).min(1024) as u32
}

/// Where a step's time goes, by kind of work: each timed piece runs between two
/// synchronisations and its wall time is added to its kind (the syncs add ~10 µs a piece, so
/// a profiled step runs a little slower than a plain one).
#[derive(Default)]
pub struct Profile(std::cell::RefCell<Vec<(&'static str, f64)>>);

impl Profile {
    fn add(&self, what: &'static str, secs: f64) {
        let mut v = self.0.borrow_mut();
        match v.iter_mut().find(|e| e.0 == what) {
            Some(e) => e.1 += secs,
            None => v.push((what, secs)),
        }
    }

    /// Seconds per kind, in the order first seen.
    pub fn take(&self) -> Vec<(&'static str, f64)> {
        std::mem::take(&mut self.0.borrow_mut())
    }
}

/// The products of a step: in f32, or in bf16 / f16 ([`Half`]) with f32 sums and outputs; and
/// the step's [`Profile`], when one is kept.
#[derive(Clone, Copy)]
pub struct Gemms<'a> {
    pub g: &'a Gpu,
    pub half: Option<Half>,
    pub prof: Option<&'a Profile>,
}

/// Where a 16-bit mode's operands come from: a weight (a pointer into the f32 parameters) from
/// their 16-bit copy, anything else converted into one of two scratch buffers on the way in.
#[derive(Clone, Copy)]
pub struct Half {
    pub dtype: DType,
    pub params: u64,
    pub params_len: usize,
    pub copy: u64,
    pub scratch: [u64; 2],
}

impl Gemms<'_> {
    /// Runs `f` (work enqueued on the stream) as a piece of kind `what` of the profile.
    pub fn timed<T>(&self, what: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(p) = self.prof else { return f() };
        self.g.sync()?;
        let t = std::time::Instant::now();
        let r = f()?;
        self.g.sync()?;
        p.add(what, t.elapsed().as_secs_f64());
        Ok(r)
    }

    /// `y (rows × out) (+= when acc) = x (rows × in)·Wᵀ`, `W` stored `(out × in)` as a
    /// checkpoint's Linear weight.
    pub fn linear(&self, rows: usize, (out, inp): (usize, usize), x: Mat, w: u64, y: Mat, acc: bool) -> Result<()> {
        let (x, w) = (self.operand(x, (rows, inp), 0)?, self.weight(w, inp));
        self.product((rows, out, inp), Operand::n(x.ptr, x.ld), Operand::t(w.ptr, w.ld), y, acc)
    }

    /// Backward of [`Gemms::linear`]: `gx (+= when acc_gx) = gy·W` and `gW += gyᵀ·x` (in 16
    /// bits, `gy` converted once for both products).
    pub fn linear_backward(
        &self,
        rows: usize,
        (out, inp): (usize, usize),
        (gy, x, w): (Mat, Mat, u64),
        (gx, acc_gx): (Mat, bool),
        gw: u64,
    ) -> Result<()> {
        let gy = self.operand(gy, (rows, out), 0)?;
        self.linear_grad_input(rows, (out, inp), gy, w, (gx, acc_gx))?;
        let x = self.operand(x, (rows, inp), 1)?;
        self.linear_grad_weight(rows, (out, inp), gy, x, gw)
    }

    /// `m` (`rows × cols` f32) as the products take it: itself in f32, its 16-bit copy in
    /// scratch buffer `slot` (which the next operand of that slot replaces) in a 16-bit mode.
    pub fn operand(&self, m: Mat, (rows, cols): (usize, usize), slot: usize) -> Result<Mat> {
        match self.half {
            None => Ok(m),
            Some(h) => {
                let what = if h.dtype == DType::F16 { "f16 conversion" } else { "bf16 conversion" };
                self.timed(what, || h.convert(self.g, m, (rows, cols), slot))
            }
        }
    }

    /// `gx (+= when acc) = gy·W`, `gy` an [`Gemms::operand`].
    pub fn linear_grad_input(
        &self,
        rows: usize,
        (out, inp): (usize, usize),
        gy: Mat,
        w: u64,
        (gx, acc): (Mat, bool),
    ) -> Result<()> {
        let w = self.weight(w, inp);
        self.product((rows, inp, out), Operand::n(gy.ptr, gy.ld), Operand::n(w.ptr, w.ld), gx, acc)
    }

    /// `gW += gyᵀ·x`, `gy` and `x` [`Gemms::operand`]s.
    pub fn linear_grad_weight(&self, rows: usize, (out, inp): (usize, usize), gy: Mat, x: Mat, gw: u64) -> Result<()> {
        self.product((out, inp, rows), Operand::t(gy.ptr, gy.ld), Operand::n(x.ptr, x.ld), Mat::new(gw, inp), true)
    }

    /// The weight at `w` (`· × ld`) as the products take it.
    fn weight(&self, w: u64, ld: usize) -> Mat {
        self.half.map_or(Mat::new(w, ld), |h| h.weight(w, ld))
    }

    /// Row-major `C (m × n) (+= when acc) = op(A)·op(B)` in the mode's dtype, C in f32.
    fn product(&self, dims: (usize, usize, usize), a: Operand, b: Operand, c: Mat, acc: bool) -> Result<()> {
        let dtype = self.half.map_or(DType::F32, |h| h.dtype);
        let (g, s) = (self.g, self.g.stream.cu_stream());
        self.timed("products", || g.gemm.gemm(s, dtype, dims, a, b, c.ptr, c.ld, true, acc))
    }
}

/// A row-major matrix: where it starts and the elements between its rows.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: u64,
    pub ld: usize,
}

impl Mat {
    pub fn new(ptr: u64, ld: usize) -> Mat {
        Mat { ptr, ld }
    }
}

impl Half {
    /// The 16-bit copy of the weight at `w` (a pointer into the f32 parameters).
    fn weight(&self, w: u64, ld: usize) -> Mat {
        debug_assert!((self.params..self.params + 4 * self.params_len as u64).contains(&w));
        Mat::new(self.copy + (w - self.params) / 2, ld)
    }

    /// `m` (`rows × cols` f32) converted into scratch buffer `slot`, packed.
    fn convert(&self, g: &Gpu, m: Mat, (rows, cols): (usize, usize), slot: usize) -> Result<Mat> {
        to_half(g, self.dtype, m.ptr, m.ld, rows, cols, self.scratch[slot])?;
        Ok(Mat::new(self.scratch[slot], cols))
    }
}

/// `dst` (`t`: bf16 or f16, packed) = `src` (`rows` of `cols` f32, `ld` apart).
pub fn to_half(g: &Gpu, t: DType, src: u64, ld: usize, rows: usize, cols: usize, dst: u64) -> Result<()> {
    let p = ToHalfParams { src, dst, rows: rows as i64, cols: cols as i64, ld: ld as i64 };
    let grid = (rows * cols).div_ceil(4 * 256).min(8192) as u32;
    let kernel = if t == DType::F16 { "to_f16" } else { "to_bf16" };
    g.launch(kernel, (grid.max(1), 1, 1), 256, &p, None)
}

/// `out = x·rstd·w` over `rows` rows of `d`.
pub fn rms_norm(g: &Gpu, x: u64, w: u64, out: u64, rows: usize, d: usize, eps: f32) -> Result<()> {
    let p = NormTrainParams { x, w, out, d: d as i32, rows: rows as i32, eps, ..Default::default() };
    g.launch("rms_norm_train", (rows as u32, 1, 1), row_threads(d), &p, None)
}

/// Backward of [`rms_norm`]: adds ∂x to `gx`, and ∂w to `gw` (through `parts`, NORM_SLICES·d
/// floats, and `rstd`, `rows` floats).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward(
    g: &Gpu,
    x: u64,
    w: u64,
    gy: u64,
    gx: u64,
    gw: u64,
    (rstd, parts): (u64, u64),
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    let p = NormTrainParams { x, w, rstd, gy, gx, parts, d: d as i32, rows: rows as i32, eps, ..Default::default() };
    g.launch("rms_norm_backward", (rows as u32, 1, 1), row_threads(d), &p, None)?;
    g.launch("rms_norm_weight_grad", (blocks(d, 128), NORM_SLICES as u32, 1), 128, &p, None)?;
    sum_parts(g, parts, d, NORM_SLICES, d, gw, true)
}

/// Backward of Mamba-2's gated norm (`crate::cuda::ops::gated_norm`): writes ∂y to `p.gx`
/// and ∂z to `p.gz`, adds ∂w to `gw` (through `p.parts`, NORM_SLICES·width floats, and
/// `p.rstd`, rows·groups floats).
pub fn gated_norm_backward(g: &Gpu, p: &GatedNormTrainParams, gw: u64) -> Result<()> {
    let width = (p.groups * p.gsize) as usize;
    g.launch("gated_norm_backward", (p.rows as u32, p.groups as u32, 1), 256, p, None)?;
    g.launch("gated_norm_weight_grad", (blocks(width, 128), NORM_SLICES as u32, 1), 128, p, None)?;
    sum_parts(g, p.parts, width, NORM_SLICES, width, gw, true)
}

/// `out (+)= Σ_k parts[k·stride ..][..n]` (contiguous items).
pub fn sum_parts(g: &Gpu, parts: u64, stride: usize, nparts: usize, n: usize, out: u64, add: bool) -> Result<()> {
    sum_parts_strided(g, parts, (1, 0, 0), stride, nparts, (n, n, n), out, add)
}

/// [`sum_parts`] over `groups` groups (`group_stride` apart in `parts`, `out_group` in `out`),
/// item `i` of a group going to `out[(i / width)·out_rs + i % width]`.
#[allow(clippy::too_many_arguments)]
pub fn sum_parts_strided(
    g: &Gpu,
    parts: u64,
    (groups, group_stride, out_group): (usize, usize, usize),
    stride: usize,
    nparts: usize,
    (n, width, out_rs): (usize, usize, usize),
    out: u64,
    add: bool,
) -> Result<()> {
    let p = SumPartsParams {
        parts,
        out,
        group_stride: group_stride as i64,
        part_stride: stride as i64,
        out_group: out_group as i64,
        nparts: nparts as i32,
        n: n as i32,
        width: width as i32,
        out_rs: out_rs as i32,
        add: add as i32,
    };
    g.launch("sum_parts", (blocks(n, 256), groups as u32, 1), 256, &p, None)
}

/// The checkpoint's conv weight `(C, 1, W)` as tap-major `(W, C)` in `taps`.
pub fn conv_taps(g: &Gpu, w: u64, taps: u64, c: usize, width: usize) -> Result<()> {
    let p = TwoPtrParams { src: w, dst: taps, a: c as i32, b: width as i32 };
    g.launch("conv_taps", (blocks(c * width, 256), 1, 1), 256, &p, None)
}

/// The conv's backward: `p.g` from ∂output to ∂pre-activation in place, ∂x into `p.gx`, the
/// weight's and bias's gradient added to `gw`, `gb` (through `p.parts`).
pub fn conv_backward(g: &Gpu, p: &ConvBwdParams, seqs: usize, gw: u64, gb: Option<u64>) -> Result<()> {
    let (l, c, w) = (p.l as usize, p.c as usize, p.width as usize);
    let grid = (blocks(c, 128), blocks(l, CONV_RUN), seqs as u32);
    g.launch("conv1d_silu_grad_pre", grid, 128, p, None)?;
    g.launch("conv1d_grad_x", grid, 128, p, None)?;
    let (nparts, stride) = (seqs * l.div_ceil(CONV_RUN), (w + 1) * c);
    sum_parts(g, p.parts, stride, nparts, c * w, gw, true)?;
    match gb {
        Some(gb) => sum_parts(g, p.parts + 4 * (c * w) as u64, stride, nparts, c, gb, true),
        None => Ok(()),
    }
}

/// Channels a block of the scan's backward covers: the plain kernel one lane a state, the fast
/// one SCAN_BWD_SPL states a lane.
fn scan_block_channels(n: usize, slow: bool) -> usize {
    if slow {
        SCAN_BWD_THREADS / n
    } else {
        SCAN_BWD_SPL * SCAN_BWD_LANE_THREADS / n
    }
}

/// Blocks of the scan's backward per sequence, at most (the plain kernel's: it has the fewest
/// channels a block), which sizes its partial sums.
pub fn scan_backward_blocks(e: usize, n: usize) -> usize {
    e.div_ceil(scan_block_channels(n, true))
}

/// The scan's backward for `seqs` sequences (`p` complete but for the parts' reduction): ∂B
/// and ∂C written to `gbc` (rows `gbc_rs` apart, ∂B then ∂C), ∂A_log, ∂D, ∂dt_bias added.
/// `slow`: the plain kernel (the reference; also what state sizes other than 8, 16, 32 take).
pub fn scan_backward(
    g: &Gpu,
    p: &ScanBwdParams,
    seqs: usize,
    (gbc, gbc_rs): (u64, usize),
    (ga, gd, gbias): (u64, u64, u64),
    slow: bool,
) -> Result<()> {
    let (l, e, n) = (p.l as usize, p.e as usize, p.n as usize);
    let slow = slow || ![8, 16, 32].contains(&n);
    let nblk = e.div_ceil(scan_block_channels(n, slow));
    let grid = (nblk as u32, seqs as u32, 1);
    if slow {
        g.launch("scan_backward_slow", grid, SCAN_BWD_THREADS as u32, p, None)?;
    } else {
        g.launch(&format!("scan_backward_{n}"), grid, SCAN_BWD_LANE_THREADS as u32, p, None)?;
    }
    let bc = 2 * n;
    sum_parts_strided(
        g,
        p.parts_bc,
        (seqs, nblk * l * bc, l * gbc_rs),
        l * bc,
        nblk,
        (l * bc, bc, gbc_rs),
        gbc,
        false,
    )?;
    sum_parts(g, p.parts_a, e * n, seqs, e * n, ga, true)?;
    sum_parts(g, p.parts_dd, 2 * e, seqs, e, gd, true)?;
    sum_parts(g, p.parts_dd + 4 * e as u64, 2 * e, seqs, e, gbias, true)
}

/// `a2 = A·log2(e)` in the forward scan's (N, E) layout from `A_log` (E, N).
pub fn scan_a2(g: &Gpu, a_log: u64, a2: u64, e: usize, n: usize) -> Result<()> {
    let p = TwoPtrParams { src: a_log, dst: a2, a: e as i32, b: n as i32 };
    g.launch("scan_a2", (blocks(e * n, 256), 1, 1), 256, &p, None)
}

/// Per row of `logits` (`rows` of `v`, `stride` apart): the cross-entropy against `targets` into
/// `nll`, and with `scale` the rows replaced by their gradient times `scale`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    g: &Gpu,
    logits: u64,
    targets: u64,
    nll: u64,
    rows: usize,
    v: usize,
    stride: usize,
    scale: Option<f32>,
) -> Result<()> {
    let p = CeGradParams {
        logits,
        targets,
        nll,
        stride: stride as i32,
        v: v as i32,
        grad: scale.is_some() as i32,
        scale: scale.unwrap_or(0.0),
    };
    g.launch("ce_grad_rows", (rows as u32, 1, 1), 1024, &p, None)
}

pub fn embed_rows(g: &Gpu, table: u64, tokens: u64, rows: u64, n: usize, d: usize) -> Result<()> {
    let p = EmbedParams { table, tokens, starts: 0, pos: 0, rows, d: d as i32 };
    g.launch("embed_rows", (n as u32, 1, 1), row_threads(d), &p, None)
}

/// Adds row `pos[j]` of `rows` to `table`'s row `tokens[k]` for `j` in `starts[k]..starts[k+1]`.
pub fn embed_backward(g: &Gpu, p: &EmbedParams, distinct: usize) -> Result<()> {
    g.launch("embed_backward", (distinct as u32, 1, 1), row_threads(p.d as usize), p, None)
}

/// Σ x² over `n` floats as SQUARE_BLOCKS partial sums into `out` (f64).
pub fn sum_squares(g: &Gpu, x: u64, n: usize, out: u64) -> Result<()> {
    let p = SumSquaresParams { x, n: n as i64, out };
    g.launch("sum_squares", (SQUARE_BLOCKS as u32, 1, 1), 1024, &p, None)
}

pub fn adamw(g: &Gpu, p: &AdamWParams) -> Result<()> {
    let grid = (p.n as usize).div_ceil(256).min(4096) as u32;
    g.launch("adamw", (grid, 1, 1), 256, p, None)
}
