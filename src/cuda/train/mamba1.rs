//! The Mamba-1 mixer's training forward and backward on the GPU (train/mamba1.rs's twin): the
//! projections through cuBLASLt, the conv and the scan forward through the inference kernels
//! (f32), their backward through the training kernels. The layer's activations live at
//! [`Slots`] offsets of the trainer's one allocation.

use super::ops::{self, ConvBwdParams, Gemms, Mat, ScanBwdParams};
use super::{at, Acts, Carve};
use crate::config::Config;
use crate::cuda::ops::{scan_workspace, selective_scan, ScanParams};
use crate::tensor::DType;
use crate::train::params::Mamba1Params;
use anyhow::Result;

/// Floats per row of what a layer keeps for its backward: xz (2E) | xdbl (R + 2N).
pub fn kept_width(cfg: &Config) -> usize {
    2 * cfg.d_inner + xdbl_width(cfg)
}

/// Floats per row of what the backward remakes from them (one layer at a time): xc (E) | dt (E)
/// | y (E). The activations' gradient scratch holds both: kept then remade.
pub fn remade_width(cfg: &Config) -> usize {
    3 * cfg.d_inner
}

fn xdbl_width(cfg: &Config) -> usize {
    cfg.dt_rank + 2 * cfg.d_state
}

/// Where a layer's activations (or their gradients) start.
struct Slots {
    xz: u64,
    xdbl: u64,
    xc: u64,
    dt: u64,
    y: u64,
}

/// The slots of `rows` rows, the kept ones at `kept`, the remade ones at `remade`.
fn slots(cfg: &Config, rows: usize, (kept, remade): (u64, u64)) -> Slots {
    let e = cfg.d_inner as u64;
    let r = 4 * rows as u64;
    Slots { xz: kept, xdbl: kept + r * 2 * e, xc: remade, dt: remade + r * e, y: remade + r * 2 * e }
}

/// The gradient scratch's slots (at `acts.g_mixer()`).
fn grad_slots(cfg: &Config, acts: &Acts) -> Slots {
    let g = acts.g_mixer();
    slots(cfg, acts.rows(), (g, g + 4 * (acts.rows() * kept_width(cfg)) as u64))
}

/// Floats of the layer workspace (shared by every layer): conv taps, A·log2(e), the zero conv
/// state, the scan's state and chunk work, the backward's kept states and partial sums.
pub fn work_len(cfg: &Config, seqs: usize, len: usize) -> usize {
    (work(cfg, seqs, len, 0).end / 4) as usize
}

struct Work {
    taps: u64,
    a2: u64,
    conv_state: u64,
    scan_state: u64,
    scan_work: u64,
    ckpt: u64,
    parts: u64,
    parts_a: u64,
    parts_dd: u64,
    end: u64,
}

/// The workspace's pieces from `base`, each on 16 bytes (the scan's backward reads its kept
/// states as float4).
fn work(cfg: &Config, seqs: usize, len: usize, base: u64) -> Work {
    let (e, n, w) = (cfg.d_inner, cfg.d_state, cfg.d_conv);
    let nblk = ops::scan_backward_blocks(e, n);
    let mut c = Carve(base);
    let taps = c.take(w * e);
    let a2 = c.take(n * e);
    let conv_state = c.take(seqs * (w - 1) * e);
    let scan_state = c.take(seqs * e * n);
    let scan_work = c.take(scan_workspace(seqs, e, n, len));
    let ckpt = c.take(seqs * len.div_ceil(ops::SCAN_BWD_SUB) * e * n);
    let parts = c.take((seqs * nblk * len * 2 * n).max(seqs * len.div_ceil(ops::CONV_RUN) * (w + 1) * e));
    let parts_a = c.take(seqs * e * n);
    let parts_dd = c.take(seqs * 2 * e);
    Work { taps, a2, conv_state, scan_state, scan_work, ckpt, parts, parts_a, parts_dd, end: c.0 - base }
}

/// The mixer over the normed input `acts.h` into slot `slot`; with `out`, out_proj's product is
/// added to it (the residual stream).
pub fn forward(
    mm: &Gemms,
    cfg: &Config,
    lp: &Mamba1Params,
    p: u64,
    acts: &Acts,
    slot: u64,
    out: Option<u64>,
) -> Result<()> {
    let (g, seqs, len, rows) = (mm.g, acts.seqs, acts.len, acts.rows());
    let (dm, e, n, r) = (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank);
    let xd = xdbl_width(cfg);
    let s = slots(cfg, rows, (slot, acts.remade()));
    let wk = work(cfg, seqs, len, acts.work());
    mm.linear(rows, (2 * e, dm), Mat::new(acts.h(), dm), at(p, &lp.in_proj), Mat::new(s.xz, 2 * e), false)?;
    mm.timed("conv", || ops::conv_taps(g, at(p, &lp.conv_w), wk.taps, e, cfg.d_conv))?;
    conv_and_dt(mm, cfg, lp, p, acts, (&s, &wk), false)?;
    mm.timed("scan", || {
        ops::scan_a2(g, at(p, &lp.a_log), wk.a2, e, n)?;
        acts.zero(wk.scan_state, seqs * e * n)
    })?;
    let mut sp = ScanParams {
        u: s.xc,
        dt: s.dt,
        dt_bias: at(p, &lp.dt_bias),
        a2: wk.a2,
        b: s.xdbl + 4 * r as u64,
        c: s.xdbl + 4 * (r + n) as u64,
        d: at(p, &lp.d),
        z: s.xz + 4 * e as u64,
        state: wk.scan_state,
        y: s.y,
        state_stride: (e * n) as i64,
        u_rs: e as i32,
        dt_rs: e as i32,
        dt_div: 1,
        a_ns: e as i32,
        a_div: 1,
        bc_rs: xd as i32,
        g_ch: e as i32,
        d_div: 1,
        z_rs: 2 * e as i32,
        p_blk: e as i32,
        y_rs: e as i32,
        l: len as i32,
        e: e as i32,
        n: n as i32,
        dt_min: 0.0,
        dt_max: f32::INFINITY,
        ..Default::default()
    };
    mm.timed("scan", || selective_scan(g, DType::F32, &mut sp, seqs, false, wk.scan_work))?;
    if let Some(out) = out {
        mm.linear(rows, (dm, e), Mat::new(s.y, e), at(p, &lp.out_proj), Mat::new(out, dm), true)?;
    }
    Ok(())
}

/// The conv + SiLU over x (from `s.xz`, taps in `wk.taps`) into `s.xc`, then x_proj into
/// `s.xdbl` and dt_proj into `s.dt`; from `s.xdbl` on with `only_remake` (the backward remaking
/// what the forward did not keep, as it made it).
fn conv_and_dt(
    mm: &Gemms,
    cfg: &Config,
    lp: &Mamba1Params,
    p: u64,
    acts: &Acts,
    (s, wk): (&Slots, &Work),
    only_remake: bool,
) -> Result<()> {
    let (seqs, len, rows) = (acts.seqs, acts.len, acts.rows());
    let (e, r, w) = (cfg.d_inner, cfg.dt_rank, cfg.d_conv);
    let xd = xdbl_width(cfg);
    mm.timed("conv", || {
        acts.zero(wk.conv_state, seqs * (w - 1) * e)?;
        let bias = lp.conv_b.as_ref().map(|b| at(p, b));
        crate::cuda::ops::conv_silu(
            mm.g,
            DType::F32,
            (s.xz, 2 * e),
            wk.taps,
            bias,
            wk.conv_state,
            s.xc,
            (seqs, len, e, w),
        )
    })?;
    if !only_remake {
        mm.linear(rows, (xd, e), Mat::new(s.xc, e), at(p, &lp.x_proj), Mat::new(s.xdbl, xd), false)?;
    }
    mm.linear(rows, (e, r), Mat::new(s.xdbl, xd), at(p, &lp.dt_proj), Mat::new(s.dt, e), false)
}

/// Backward of [`forward`] (its activations in slot `slot`, its input in `acts.h`): from the
/// output's gradient `acts.g_resid` adds every parameter's gradient at `gp` and writes the
/// normed input's gradient to `acts.g_h`. `slow_scan`: the scan's backward through its plain
/// reference kernel.
pub fn backward(
    mm: &Gemms,
    cfg: &Config,
    lp: &Mamba1Params,
    (p, gp): (u64, u64),
    acts: &Acts,
    slot: u64,
    slow_scan: bool,
) -> Result<()> {
    let (g, seqs, len, rows) = (mm.g, acts.seqs, acts.len, acts.rows());
    let (dm, e, n, r, w) = (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv);
    let xd = xdbl_width(cfg);
    let (s, gs) = (slots(cfg, rows, (slot, acts.remade())), grad_slots(cfg, acts));
    let wk = work(cfg, seqs, len, acts.work());
    mm.timed("conv", || ops::conv_taps(g, at(p, &lp.conv_w), wk.taps, e, w))?;
    if !acts.recompute {
        conv_and_dt(mm, cfg, lp, p, acts, (&s, &wk), true)?;
    }
    let g_out = mm.operand(Mat::new(acts.g_resid(), dm), (rows, dm), 0)?;
    mm.linear_grad_input(rows, (dm, e), g_out, at(p, &lp.out_proj), (Mat::new(gs.y, e), false))?;
    let sb = ScanBwdParams {
        u: s.xc,
        dt: s.dt,
        dt_bias: at(p, &lp.dt_bias),
        a_log: at(p, &lp.a_log),
        b: s.xdbl + 4 * r as u64,
        c: s.xdbl + 4 * (r + n) as u64,
        d: at(p, &lp.d),
        z: s.xz + 4 * e as u64,
        gy: gs.y,
        gu: gs.xc,
        gdt: gs.dt,
        gz: gs.xz + 4 * e as u64,
        y: s.y,
        ckpt: wk.ckpt,
        parts_bc: wk.parts,
        parts_a: wk.parts_a,
        parts_dd: wk.parts_dd,
        u_rs: e as i32,
        dt_rs: e as i32,
        bc_rs: xd as i32,
        z_rs: 2 * e as i32,
        l: len as i32,
        e: e as i32,
        n: n as i32,
    };
    let grads = (at(gp, &lp.a_log), at(gp, &lp.d), at(gp, &lp.dt_bias));
    let gbc = (gs.xdbl + 4 * r as u64, xd);
    mm.timed("scan backward", || ops::scan_backward(g, &sb, seqs, gbc, grads, slow_scan))?;
    // out_proj's weight gradient needs the gated output, which the scan's backward remade.
    let y = mm.operand(Mat::new(s.y, e), (rows, e), 1)?;
    mm.linear_grad_weight(rows, (dm, e), g_out, y, at(gp, &lp.out_proj))?;
    // dt_proj reads the first dt_rank columns of x_proj's output (and writes their gradient).
    let dt_proj = (Mat::new(gs.dt, e), Mat::new(s.xdbl, xd), at(p, &lp.dt_proj));
    mm.linear_backward(rows, (e, r), dt_proj, (Mat::new(gs.xdbl, xd), false), at(gp, &lp.dt_proj))?;
    // The conv's output feeds both the scan (its gradient already in g_xc) and x_proj.
    let x_proj = (Mat::new(gs.xdbl, xd), Mat::new(s.xc, e), at(p, &lp.x_proj));
    mm.linear_backward(rows, (xd, e), x_proj, (Mat::new(gs.xc, e), true), at(gp, &lp.x_proj))?;
    let cp = ConvBwdParams {
        x: s.xz,
        x_rs: 2 * e as i32,
        w: wk.taps,
        bias: lp.conv_b.as_ref().map_or(0, |b| at(p, b)),
        g: gs.xc,
        gx: gs.xz,
        gx_rs: 2 * e as i32,
        parts: wk.parts,
        l: len as i32,
        c: e as i32,
        width: w as i32,
    };
    let (gw, gb) = (at(gp, &lp.conv_w), lp.conv_b.as_ref().map(|b| at(gp, b)));
    mm.timed("conv", || ops::conv_backward(g, &cp, seqs, gw, gb))?;
    let in_proj = (Mat::new(gs.xz, 2 * e), Mat::new(acts.h(), dm), at(p, &lp.in_proj));
    mm.linear_backward(rows, (2 * e, dm), in_proj, (Mat::new(acts.g_h(), dm), false), at(gp, &lp.in_proj))
}
