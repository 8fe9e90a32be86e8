//! The Mamba-2 mixer's training forward and backward on the GPU (train/mamba2.rs's twin): the
//! projections through cuBLASLt, the conv, the scan (its exact recurrence, f32) and the gated
//! norm forward through the inference kernels, their backward through the training kernels
//! (the scan's in [`super::ssd_backward`]). A layer keeps in_proj's output and the scan's; the
//! backward remakes the conv and the gated norm from them.

use super::ops::{self, ConvBwdParams, GatedNormTrainParams, Gemms, Mat, NORM_SLICES};
use super::ssd_backward::{self, ssd_backward};
use super::{at, Acts, Carve};
use crate::config::Config;
use crate::cuda::ops::{gated_norm, m2_scan_params, scan_workspace, selective_scan};
use crate::tensor::DType;
use crate::train::params::Mamba2Params;
use anyhow::Result;

/// Floats per row of what a layer keeps for its backward: zx (in_proj's z | xBC | δ) | y (E).
pub fn kept_width(cfg: &Config) -> usize {
    cfg.d_in_proj() + cfg.d_ssm
}

/// Floats per row of what the backward remakes (one layer at a time): xbc (conv) | yn (E).
pub fn remade_width(cfg: &Config) -> usize {
    cfg.conv_dim() + cfg.d_ssm
}

/// Where a layer's activations (or their gradients) start.
struct Slots {
    zx: u64,
    y: u64,
    xbc: u64,
    yn: u64,
}

fn slots(cfg: &Config, rows: usize, (kept, remade): (u64, u64)) -> Slots {
    let r = 4 * rows as u64;
    Slots { zx: kept, y: kept + r * cfg.d_in_proj() as u64, xbc: remade, yn: remade + r * cfg.conv_dim() as u64 }
}

fn grad_slots(cfg: &Config, acts: &Acts) -> Slots {
    let g = acts.g_mixer();
    slots(cfg, acts.rows(), (g, g + 4 * (acts.rows() * kept_width(cfg)) as u64))
}

/// Floats of the layer workspace (shared by every layer).
pub fn work_len(cfg: &Config, seqs: usize, len: usize) -> usize {
    (work(cfg, seqs, len, 0).ssd.end / 4) as usize
}

struct Work {
    taps: u64,
    a2: u64,
    conv_state: u64,
    scan_state: u64,
    scan_work: u64,
    parts: u64,
    rstd: u64,
    ssd: ssd_backward::Work,
}

fn work(cfg: &Config, seqs: usize, len: usize, base: u64) -> Work {
    let (e, n, w, conv) = (cfg.d_ssm, cfg.d_state, cfg.d_conv, cfg.conv_dim());
    let mut c = Carve(base);
    let taps = c.take(w * conv);
    let a2 = c.take(cfg.nheads());
    let conv_state = c.take(seqs * (w - 1) * conv);
    let scan_state = c.take(seqs * e * n);
    let scan_work = c.take(scan_workspace(seqs, e, n, len));
    let parts = c.take((seqs * len.div_ceil(ops::CONV_RUN) * (w + 1) * conv).max(NORM_SLICES * e));
    let rstd = c.take(seqs * len * cfg.ngroups);
    let ssd = ssd_backward::Work::new(cfg, seqs, len, c);
    Work { taps, a2, conv_state, scan_state, scan_work, parts, rstd, ssd }
}

/// The mixer over the normed input `acts.h` into slot `slot`; with `out`, out_proj's product is
/// added to it (the residual stream).
pub fn forward(
    mm: &Gemms,
    cfg: &Config,
    lp: &Mamba2Params,
    p: u64,
    acts: &Acts,
    slot: u64,
    out: Option<u64>,
) -> Result<()> {
    let (g, seqs, len, rows) = (mm.g, acts.seqs, acts.len, acts.rows());
    let (dm, e, n, w_in, conv) = (cfg.d_model, cfg.d_ssm, cfg.d_state, cfg.d_in_proj(), cfg.conv_dim());
    let s = slots(cfg, rows, (slot, acts.remade()));
    let wk = work(cfg, seqs, len, acts.work());
    mm.linear(rows, (w_in, dm), Mat::new(acts.h(), dm), at(p, &lp.in_proj), Mat::new(s.zx, w_in), false)?;
    mm.timed("conv", || ops::conv_taps(g, at(p, &lp.conv_w), wk.taps, conv, cfg.d_conv))?;
    remake_conv(mm, cfg, lp, p, acts, (&s, &wk))?;
    mm.timed("scan", || {
        ops::scan_a2(g, at(p, &lp.a_log), wk.a2, cfg.nheads(), 1)?;
        acts.zero(wk.scan_state, seqs * e * n)
    })?;
    let weights = (at(p, &lp.dt_bias), wk.a2, at(p, &lp.d));
    let mut sp = m2_scan_params(cfg, DType::F32, (s.zx, s.xbc, s.y), weights, (wk.scan_state, e * n), len);
    mm.timed("scan", || selective_scan(g, DType::F32, &mut sp, seqs, true, wk.scan_work))?;
    remake_norm(mm, cfg, lp, p, acts, &s)?;
    if let Some(out) = out {
        mm.linear(rows, (dm, e), Mat::new(s.yn, e), at(p, &lp.out_proj), Mat::new(out, dm), true)?;
    }
    Ok(())
}

/// The conv + SiLU over xBC (from `s.zx`, taps in `wk.taps`) into `s.xbc`.
fn remake_conv(
    mm: &Gemms,
    cfg: &Config,
    lp: &Mamba2Params,
    p: u64,
    acts: &Acts,
    (s, wk): (&Slots, &Work),
) -> Result<()> {
    let (seqs, len, w, conv) = (acts.seqs, acts.len, cfg.d_conv, cfg.conv_dim());
    mm.timed("conv", || {
        acts.zero(wk.conv_state, seqs * (w - 1) * conv)?;
        let bias = lp.conv_b.as_ref().map(|b| at(p, b));
        let x = (s.zx + 4 * cfg.d_ssm as u64, cfg.d_in_proj());
        crate::cuda::ops::conv_silu(mm.g, DType::F32, x, wk.taps, bias, wk.conv_state, s.xbc, (seqs, len, conv, w))
    })
}

/// The gated norm of the scan's output `s.y` (gate: in_proj's z) into `s.yn`: out_proj's input.
fn remake_norm(mm: &Gemms, cfg: &Config, lp: &Mamba2Params, p: u64, acts: &Acts, s: &Slots) -> Result<()> {
    let (rows, e, gr) = (acts.rows(), cfg.d_ssm, cfg.ngroups);
    mm.timed("norms", || {
        unsafe { cudarc::driver::result::memcpy_dtod_async(s.yn, s.y, 4 * rows * e, mm.g.stream.cu_stream()) }
            .map_err(|e| anyhow::anyhow!("copying the scan's output: {e:?}"))?;
        gated_norm(mm.g, DType::F32, s.yn, (s.zx, cfg.d_in_proj()), at(p, &lp.norm_w), (rows, gr, e / gr), cfg.norm_eps)
    })
}

/// Backward of [`forward`] (its activations in slot `slot`, its input in `acts.h`): from the
/// output's gradient `acts.g_resid` adds every parameter's gradient at `gp` and writes the
/// normed input's gradient to `acts.g_h`. `slow_scan`: the scan's backward through the plain
/// Mamba-1 kernel.
pub fn backward(
    mm: &Gemms,
    cfg: &Config,
    lp: &Mamba2Params,
    (p, gp): (u64, u64),
    acts: &Acts,
    slot: u64,
    slow_scan: bool,
) -> Result<()> {
    let (g, seqs, len, rows) = (mm.g, acts.seqs, acts.len, acts.rows());
    let (dm, e, w, w_in, conv, gr) = (cfg.d_model, cfg.d_ssm, cfg.d_conv, cfg.d_in_proj(), cfg.conv_dim(), cfg.ngroups);
    let (s, gs) = (slots(cfg, rows, (slot, acts.remade())), grad_slots(cfg, acts));
    let wk = work(cfg, seqs, len, acts.work());
    let f = |floats: usize| 4 * floats as u64;
    mm.timed("conv", || ops::conv_taps(g, at(p, &lp.conv_w), wk.taps, conv, w))?;
    if !acts.recompute {
        remake_conv(mm, cfg, lp, p, acts, (&s, &wk))?;
        remake_norm(mm, cfg, lp, p, acts, &s)?;
    }
    let g_out = mm.operand(Mat::new(acts.g_resid(), dm), (rows, dm), 0)?;
    mm.linear_grad_input(rows, (dm, e), g_out, at(p, &lp.out_proj), (Mat::new(gs.yn, e), false))?;
    let yn = mm.operand(Mat::new(s.yn, e), (rows, e), 1)?;
    mm.linear_grad_weight(rows, (dm, e), g_out, yn, at(gp, &lp.out_proj))?;
    let np = GatedNormTrainParams {
        y: s.y,
        z: s.zx,
        w: at(p, &lp.norm_w),
        gy: gs.yn,
        gx: gs.y,
        gz: gs.zx,
        rstd: wk.rstd,
        parts: wk.parts,
        z_rs: w_in as i32,
        gsize: (e / gr) as i32,
        groups: gr as i32,
        rows: rows as i32,
        eps: cfg.norm_eps,
    };
    mm.timed("norms", || ops::gated_norm_backward(g, &np, at(gp, &lp.norm_w)))?;
    let io = ssd_backward::Io {
        xbc: s.xbc,
        raw_dt: s.zx + f(e + conv),
        dt_rs: w_in,
        gy: gs.y,
        gxbc: gs.xbc,
        graw: gs.zx + f(e + conv),
        params: (at(p, &lp.a_log), at(p, &lp.dt_bias), at(p, &lp.d)),
        grads: (at(gp, &lp.a_log), at(gp, &lp.dt_bias), at(gp, &lp.d)),
    };
    mm.timed("scan backward", || ssd_backward(g, cfg, acts, &io, &wk.ssd, slow_scan))?;
    let cp = ConvBwdParams {
        x: s.zx + f(e),
        x_rs: w_in as i32,
        w: wk.taps,
        bias: lp.conv_b.as_ref().map_or(0, |b| at(p, b)),
        g: gs.xbc,
        gx: gs.zx + f(e),
        gx_rs: w_in as i32,
        parts: wk.parts,
        l: len as i32,
        c: conv as i32,
        width: w as i32,
    };
    let (gw, gb) = (at(gp, &lp.conv_w), lp.conv_b.as_ref().map(|b| at(gp, b)));
    mm.timed("conv", || ops::conv_backward(g, &cp, seqs, gw, gb))?;
    let in_proj = (Mat::new(gs.zx, w_in), Mat::new(acts.h(), dm), at(p, &lp.in_proj));
    mm.linear_backward(rows, (w_in, dm), in_proj, (Mat::new(acts.g_h(), dm), false), at(gp, &lp.in_proj))
}
