//! Launches of the inference kernels (their parameter structs mirror the `.cu` files'), each
//! beside its CPU twin in `crate::ops`: the selective scan (chunked, one pass of states, Mamba-2's
//! SSD on tensor cores), the causal conv, Mamba-2's gated norm and the argmax. The training
//! forward runs them too.

use super::consts::*;
use super::Gpu;
use crate::config::{Arch, Config};
use crate::tensor::DType;
use anyhow::{bail, Result};
use cudarc::driver::DeviceRepr;

/// Scan threads wanted in flight before the sequence is cut into chunks (about two per core).
const SCAN_THREADS: usize = 1 << 18;

/// Shortest chunk worth a pass of its own (measured: 16 beats 32 and 8 at L = 2K, D = 1024, and
/// on a 100-token prompt at mamba-130m).
const MIN_CHUNK: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct GatedNormParams {
    y: u64,
    z: u64,
    z_rs: i32,
    w: u64,
    gsize: i32,
    eps: f32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ConvParams {
    x: u64,
    x_rs: i32,
    w: u64,
    bias: u64,
    state: u64,
    y: u64,
    l: i32,
    c: i32,
    width: i32,
}

/// Mirrors `ScanParams` in selective_scan.cu (see the index formulas there).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ScanParams {
    pub u: u64,
    pub dt: u64,
    pub dt_bias: u64,
    pub a2: u64,
    pub b: u64,
    pub c: u64,
    pub d: u64,
    pub z: u64,
    pub state: u64,
    pub y: u64,
    pub chunk_h: u64,
    pub chunk_dt: u64,
    pub state_stride: i64,
    pub u_rs: i32,
    pub dt_rs: i32,
    pub dt_div: i32,
    pub a_ns: i32,
    pub a_div: i32,
    pub bc_rs: i32,
    pub g_ch: i32,
    pub d_div: i32,
    pub z_rs: i32,
    pub p_blk: i32,
    pub y_rs: i32,
    pub l: i32,
    pub e: i32,
    pub n: i32,
    pub chunk: i32,
    pub gpb: i32,
    pub dt_min: f32,
    pub dt_max: f32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ArgmaxParams {
    logits: u64,
    out: u64,
    stride: i32,
    limit: i32,
}

pub(super) fn suffix(t: DType) -> &'static str {
    match t {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I8 => unreachable!("GpuModel::new refuses 8-bit weights"),
    }
}

/// Chunks the scan cuts `l` steps into, for `seqs × channels` independent recurrences: enough
/// to fill the GPU, none shorter than [`MIN_CHUNK`]. Returns (chunks, chunk length).
pub fn scan_chunks(seqs: usize, channels: usize, l: usize) -> (usize, usize) {
    let want = SCAN_THREADS.div_ceil(seqs * channels).min(l / MIN_CHUNK).max(1);
    let len = l.div_ceil(want);
    (l.div_ceil(len), len)
}

/// Enqueues the selective scan of `p` (its `l`, `e`, `n` set) for `seqs` sequences: one pass, or
/// the three chunked passes when that fills the GPU better. `work` must hold
/// `seqs · chunks · e · (n + 1)` floats.
pub fn selective_scan(gpu: &Gpu, t: DType, p: &mut ScanParams, seqs: usize, scalar_a: bool, work: u64) -> Result<()> {
    if states_fit(t, p, seqs, scalar_a) {
        let grid = ((p.e / STATES_CH) as u32, seqs as u32, 1);
        return gpu.launch_smem(&format!("scan_states_{}", suffix(t)), grid, 128, states_smem(t), p, None);
    }
    let (k, len) = scan_chunks(seqs, p.e as usize, p.l as usize);
    p.chunk = len as i32;
    set_chunk_work(p, seqs, k, work);
    let nmax = match (scalar_a, p.n) {
        (_, 0..=16) => 16,
        (_, 17..=64) => 64,
        (true, 65..=128) => 128,
        _ => bail!("d_state {} is not supported on the GPU (at most 64 for Mamba-1, 128 for Mamba-2)", p.n),
    };
    // Mamba-1 splits each channel over two lanes when chunking leaves the GPU short of threads
    // (short prompts: measured faster at L ≤ 2K, slower from 4K at D = 1024); Mamba-2 always
    // splits (see selective_scan.cu).
    let kind = match (scalar_a, seqs * p.e as usize * k < SCAN_THREADS / 2) {
        (true, _) => 's',
        (false, true) => 'w',
        (false, false) => 'v',
    };
    let lanes = super::kernels::scan_lanes(kind, nmax).expect("a scan kind");
    let kind = format!("{}_{nmax}{kind}", suffix(t));
    let block = 128;
    let grid = ((p.e as u32 * lanes).div_ceil(block), k as u32, seqs as u32);
    // A block stages the B, C rows of the groups its channels touch: SCAN_STAGE steps of them.
    let (channels, groups) = ((block / lanes) as i32, p.e / p.g_ch);
    p.gpb = ((channels - 1) / p.g_ch + 2).min(groups);
    let stage = if nmax <= 16 { 32 } else { 8 };
    let smem = (stage * p.gpb as u32 * 2 * nmax * 4) as u32;
    if k > 1 {
        gpu.launch_smem(&format!("scan_end_{kind}"), grid, block, smem, p, None)?;
        scan_carry(gpu, p, seqs, k)?;
    }
    gpu.launch_smem(&format!("scan_out_{kind}"), grid, block, smem, p, None)
}

/// Channels per block of selective_scan.cu's scan_states (STATES_CH), and the shortest sequence
/// it takes (one tile; shorter ones would mostly compute masked steps).
const STATES_CH: i32 = 8;

const STATES_MIN_LEN: i32 = 32;

/// Whether `p` runs as scan_states, one lane per state in one pass: Mamba-1 with N = 16, when a
/// thread per channel would leave the GPU short (the chunked passes compute each exp2 twice),
/// and when every row it copies starts on 16 bytes (its cp.async pieces).
fn states_fit(t: DType, p: &ScanParams, seqs: usize, scalar_a: bool) -> bool {
    let es = t.size() as u64;
    let aligned = |ptr: u64, rs: i32| ptr.is_multiple_of(16) && (rs as u64 * es).is_multiple_of(16);
    !scalar_a
        && p.n == 16
        && p.l >= STATES_MIN_LEN
        && seqs * (p.e as usize) < SCAN_THREADS / 2
        && (p.dt_div, p.a_div, p.d_div) == (1, 1, 1)
        && p.g_ch >= p.e
        && p.e % STATES_CH == 0
        && aligned(p.u, p.u_rs)
        && aligned(p.dt, p.dt_rs)
        && (p.z == 0 || aligned(p.z, p.z_rs))
        && aligned(p.y, p.y_rs)
        && aligned(p.b, p.bc_rs)
        && aligned(p.c, p.bc_rs)
}

/// Bytes of scan_states's shared memory (`StatesSmem<T>`): a ring of 4 tiles of 32 steps of u,
/// δ, z (8 channels) and B, C (16 states) in T; two tiles each of (B, C) and (δ, δ·u) in f32;
/// the readout transpose (8 × 656 floats); two tiles of outputs in T.
fn states_smem(t: DType) -> u32 {
    let es = t.size() as u32;
    4 * 32 * (3 * 8 + 2 * 16) * es + 2 * (32 * 16 * 8 + 8 * 32 * 8) + 8 * 656 * 4 + 2 * 32 * 8 * es
}

/// Points the chunk summaries of `p` at `work`: `seqs · k · e · n` states, then `seqs · k · e` Σδ.
fn set_chunk_work(p: &mut ScanParams, seqs: usize, k: usize, work: u64) {
    p.chunk_h = work;
    p.chunk_dt = work + 4 * (seqs * k * p.e as usize * p.n as usize) as u64;
}

/// Passes the states between the `k` chunks of each sequence (selective_scan.cu's scan_carry).
fn scan_carry(gpu: &Gpu, p: &ScanParams, seqs: usize, k: usize) -> Result<()> {
    let grid = (((p.e * p.n) as u32).div_ceil(128), seqs as u32, 1);
    gpu.launch("scan_carry", grid, 128, p, Some(&(k as i32)))
}

/// Dynamic shared memory of ssd_state and ssd_out (SSD_STATE_SMEM, SSD_OUT_SMEM).
const SSD_SMEM: (u32, u32) = {
    let (q, ns, ps, qs) = (SSD_Q, SSD_NMAX + 8, SSD_PMAX + 8, SSD_Q + 8);
    let state = 3 * q * 4 + q * (ns + ps) * 2;
    let out = 2 * q * 4 + (2 * q * ns + (SSD_NMAX + q) * ps + q * qs) * 2;
    (state as u32, out as u32)
};

/// Prompt pieces shorter than this take the recurrence, whose one launch costs less.
const SSD_MIN_LEN: usize = 16;

/// Whether Mamba-2's pass over `l` steps runs as the chunked SSD on tensor cores: in 16-bit
/// types (the f32 mode keeps the exact recurrence) and when N and P fit its tiles (multiples
/// of 16, which also start every x, B and C row on 16 bytes, as its cp.async copies need).
pub fn ssd_fits(cfg: &Config, t: DType, l: usize) -> bool {
    let (n, hp) = (cfg.d_state, cfg.headdim);
    cfg.arch == Arch::Mamba2
        && t != DType::F32
        && l >= SSD_MIN_LEN
        && n.is_multiple_of(16)
        && n <= SSD_NMAX
        && hp.is_multiple_of(16)
        && hp <= SSD_PMAX
}

/// Floats of SSD workspace for `seqs` sequences of `l` steps over `e` channels, `n` states.
pub fn ssd_workspace(seqs: usize, e: usize, n: usize, l: usize) -> usize {
    seqs * l.div_ceil(SSD_Q) * e * (n + 1)
}

/// Enqueues Mamba-2's SSD of `p` (as [`m2_scan_params`] makes it) for `seqs`
/// sequences in its chunked matrix form (ssd.cu): chunk states, the carry between chunks, the
/// outputs. `work` must hold [`ssd_workspace`] floats.
pub fn ssd(gpu: &Gpu, t: DType, p: &mut ScanParams, seqs: usize, work: u64) -> Result<()> {
    let k = (p.l as usize).div_ceil(SSD_Q);
    set_chunk_work(p, seqs, k, work);
    let grid = ((p.e / p.p_blk) as u32, k as u32, seqs as u32);
    let t = suffix(t);
    gpu.launch_smem(&format!("ssd_state_{t}"), grid, 128, SSD_SMEM.0, p, None)?;
    scan_carry(gpu, p, seqs, k)?;
    gpu.launch_smem(&format!("ssd_out_{t}"), grid, 128, SSD_SMEM.1, p, None)
}

/// Floats of scan workspace for `seqs` sequences of `l` steps over `e` channels, `n` states.
pub fn scan_workspace(seqs: usize, e: usize, n: usize, l: usize) -> usize {
    let (k, _) = scan_chunks(seqs, e, l);
    if k == 1 {
        0
    } else {
        seqs * k * e * (n + 1)
    }
}

/// Enqueues the causal conv + SiLU of `seqs` sequences of `l` steps over `ch` channels (input
/// rows `x_rs` apart, taps `(width, ch)`), carrying the last inputs in `state`; `l == 1` is the
/// decode step.
#[allow(clippy::too_many_arguments)]
pub fn conv_silu(
    g: &Gpu,
    t: DType,
    (x, x_rs): (u64, usize),
    w: u64,
    bias: Option<u64>,
    state: u64,
    y: u64,
    (seqs, l, ch, width): (usize, usize, usize, usize),
) -> Result<()> {
    let p = ConvParams {
        x,
        x_rs: x_rs as i32,
        w,
        bias: bias.unwrap_or(0),
        state,
        y,
        l: l as i32,
        c: ch as i32,
        width: width as i32,
    };
    let t = suffix(t);
    let cb = (ch as u32).div_ceil(128);
    if l == 1 {
        return g.launch_early(&format!("conv1d_step_{t}"), (cb, seqs as u32, 1), 128, 0, &p);
    }
    g.launch(&format!("conv1d_silu_{t}"), (cb, (l as u32).div_ceil(16), seqs as u32), 128, &p, None)?;
    g.launch(&format!("conv1d_state_{t}"), (cb, seqs as u32, 1), 128, &p, None)
}

/// The scan parameters of a Mamba-2 layer of `l` steps (channels = heads × headdim; δ and A per
/// head, B and C per group): in_proj's output `zx` and the conv output `xbc` in `t`, the output
/// `y`; `dt_bias`, `a2` (A·log2 e per head) and `d`; the state (`stride` floats a sequence).
pub fn m2_scan_params(
    c: &Config,
    t: DType,
    (zx, xbc, y): (u64, u64, u64),
    (dt_bias, a2, d): (u64, u64, u64),
    (state, stride): (u64, usize),
    l: usize,
) -> ScanParams {
    let es = t.size() as u64;
    let (n, hp, gr, ds) = (c.d_state, c.headdim, c.ngroups, c.d_ssm);
    let (w_in, cd) = (c.d_in_proj(), c.conv_dim());
    ScanParams {
        u: xbc,
        dt: zx + es * (ds + cd) as u64,
        dt_bias,
        a2,
        b: xbc + es * ds as u64,
        c: xbc + es * (ds + gr * n) as u64,
        d,
        z: 0,
        state,
        y,
        state_stride: stride as i64,
        u_rs: cd as i32,
        dt_rs: w_in as i32,
        dt_div: hp as i32,
        a_ns: 0,
        a_div: hp as i32,
        bc_rs: cd as i32,
        g_ch: (ds / gr) as i32,
        d_div: if c.d_has_hdim { 1 } else { hp as i32 },
        z_rs: 0,
        p_blk: hp as i32,
        y_rs: ds as i32,
        l: l as i32,
        e: ds as i32,
        n: n as i32,
        dt_min: c.dt_limit.0,
        dt_max: c.dt_limit.1,
        ..Default::default()
    }
}

/// Mamba-2's `y ← rmsnorm(y·silu(z))·w` in place over `rows` rows of `groups` groups of `gsize`
/// channels, z's rows `z_rs` apart.
pub fn gated_norm(
    g: &Gpu,
    t: DType,
    y: u64,
    (z, z_rs): (u64, usize),
    w: u64,
    (rows, groups, gsize): (usize, usize, usize),
    eps: f32,
) -> Result<()> {
    let p = GatedNormParams { y, z, z_rs: z_rs as i32, w, gsize: gsize as i32, eps };
    g.launch(&format!("gated_norm_{}", suffix(t)), (rows as u32, groups as u32, 1), 256, &p, None)
}

/// The index of the largest of the first `limit` logits of each of `rows` rows (`stride` apart)
/// into `out` (u32; sampling.cu's argmax).
pub fn argmax(g: &Gpu, logits: u64, out: u64, rows: usize, stride: usize, limit: usize) -> Result<()> {
    let p = ArgmaxParams { logits, out, stride: stride as i32, limit: limit as i32 };
    g.launch("argmax", (rows as u32, 1, 1), 1024, &p, None)
}

unsafe impl DeviceRepr for GatedNormParams {}
unsafe impl DeviceRepr for ConvParams {}
unsafe impl DeviceRepr for ScanParams {}
unsafe impl DeviceRepr for ArgmaxParams {}
