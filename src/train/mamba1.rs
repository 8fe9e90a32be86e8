//! The Mamba-1 mixer's training forward, which keeps what the backward needs, and the backward.

use super::model::{add_to, linear, linear_backward, GradX, Grads};
use super::params::Mamba1Params;
use crate::config::Config;
use crate::ops::causal_conv1d::{add_taps_to_checkpoint_layout, causal_conv1d_silu, causal_conv1d_silu_backward, taps};
use crate::ops::selective_scan::{a_from_log, selective_scan, selective_scan_backward, ScanGrads, ScanInputs};

/// What one layer's forward keeps (R = sequences × length rows).
pub struct Acts {
    pub xz: Vec<f32>,   // (R, 2E) in_proj output: x | z
    pub xc: Vec<f32>,   // (R, E) conv + SiLU of x: the scan's u
    pub xdbl: Vec<f32>, // (R, dt_rank + 2N) x_proj output: dt_low | B | C
    pub dt: Vec<f32>,   // (R, E) dt_proj output, before the bias and softplus
    pub y: Vec<f32>,    // (R, E) gated scan output: out_proj's input
}

/// Gradient scratch of one layer's backward, shared by all layers.
pub struct Scratch {
    pub g_xz: Vec<f32>,   // (R, 2E)
    pub g_xc: Vec<f32>,   // (R, E)
    pub g_xdbl: Vec<f32>, // (R, dt_rank + 2N)
    pub g_dt: Vec<f32>,   // (R, E)
    pub g_y: Vec<f32>,    // (R, E)
    pub g_bc: Vec<f32>,   // (2, L, N) one sequence's ∂/∂B, ∂/∂C
}

fn dims(cfg: &Config) -> (usize, usize, usize, usize) {
    (cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.dt_rank + 2 * cfg.d_state)
}

impl Acts {
    pub fn new(cfg: &Config, rows: usize) -> Acts {
        let (e, _, _, xd) = dims(cfg);
        let z = |n: usize| vec![0.0f32; rows * n];
        Acts { xz: z(2 * e), xc: z(e), xdbl: z(xd), dt: z(e), y: z(e) }
    }
}

impl Scratch {
    pub fn new(cfg: &Config, seqs: usize, len: usize) -> Scratch {
        let (e, n, _, xd) = dims(cfg);
        let z = |k: usize| vec![0.0f32; seqs * len * k];
        Scratch { g_xz: z(2 * e), g_xc: z(e), g_xdbl: z(xd), g_dt: z(e), g_y: z(e), g_bc: vec![0.0; 2 * len * n] }
    }
}

fn scan_inputs<'a>(
    cfg: &Config,
    p: &'a [f32],
    lp: &Mamba1Params,
    a: &'a [f32],
    acts: &'a Acts,
    s: usize,
    len: usize,
) -> ScanInputs<'a> {
    let (e, n, r, xd) = dims(cfg);
    let (c0, d0) = (s * len * e, s * len * xd);
    ScanInputs {
        u: &acts.xc[c0..],
        u_rs: e,
        dt: &acts.dt[c0..],
        dt_rs: e,
        dt_bias: &p[lp.dt_bias.clone()],
        a,
        b: &acts.xdbl[d0 + r..],
        c: &acts.xdbl[d0 + r + n..],
        bc_rs: xd,
        d: &p[lp.d.clone()],
        z: Some((&acts.xz[2 * c0 + e..], 2 * e)),
    }
}

/// `h` (`seqs × len` rows of d_model, the normed input) → `out`, each sequence from a zero state.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    cfg: &Config,
    p: &[f32],
    lp: &Mamba1Params,
    seqs: usize,
    len: usize,
    h: &[f32],
    acts: &mut Acts,
    out: &mut [f32],
) {
    let (dm, (e, n, r, xd), w) = (cfg.d_model, dims(cfg), cfg.d_conv);
    let rows = seqs * len;
    linear(h, dm, rows, &p[lp.in_proj.clone()], 2 * e, dm, &mut acts.xz, 2 * e);
    let taps = taps(&p[lp.conv_w.clone()], e, w);
    let bias = lp.conv_b.clone().map(|b| &p[b]);
    for s in 0..seqs {
        let mut state = vec![0.0f32; (w - 1) * e];
        causal_conv1d_silu(
            &acts.xz[s * len * 2 * e..],
            len,
            2 * e,
            e,
            &taps,
            w,
            bias,
            &mut state,
            &mut acts.xc[s * len * e..],
        );
    }
    linear(&acts.xc, e, rows, &p[lp.x_proj.clone()], xd, e, &mut acts.xdbl, xd);
    linear(&acts.xdbl, xd, rows, &p[lp.dt_proj.clone()], e, r, &mut acts.dt, e);
    let a = a_from_log(&p[lp.a_log.clone()], e, n);
    let mut y = std::mem::take(&mut acts.y);
    for s in 0..seqs {
        let inp = scan_inputs(cfg, p, lp, &a, acts, s, len);
        selective_scan(&inp, len, e, n, &mut vec![0.0f32; n * e], &mut y[s * len * e..]);
    }
    acts.y = y;
    linear(&acts.y, e, rows, &p[lp.out_proj.clone()], dm, e, out, dm);
}

/// Backward of [`forward`]: from `g_out` (the mixer output's gradient) adds every parameter's
/// gradient to `g` and writes `g_h` (the normed input's gradient).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    cfg: &Config,
    p: &[f32],
    lp: &Mamba1Params,
    g: &mut Grads,
    seqs: usize,
    len: usize,
    h: &[f32],
    acts: &Acts,
    sc: &mut Scratch,
    g_out: &[f32],
    g_h: &mut [f32],
) {
    let (dm, (e, n, r, xd), w) = (cfg.d_model, dims(cfg), cfg.d_conv);
    let rows = seqs * len;
    linear_backward(
        &acts.y,
        e,
        g_out,
        dm,
        rows,
        &p[lp.out_proj.clone()],
        dm,
        e,
        GradX::write(&mut sc.g_y, e),
        g.at(&lp.out_proj),
    );
    let a = a_from_log(&p[lp.a_log.clone()], e, n);
    let (mut g_a, mut g_d, mut g_bias) = (vec![0.0f32; n * e], vec![0.0f32; e], vec![0.0f32; e]);
    for s in 0..seqs {
        let (c0, d0) = (s * len * e, s * len * xd);
        let inp = scan_inputs(cfg, p, lp, &a, acts, s, len);
        let (gb, gc) = sc.g_bc.split_at_mut(len * n);
        let grads = ScanGrads {
            u: &mut sc.g_xc[c0..],
            dt: &mut sc.g_dt[c0..],
            z: Some((&mut sc.g_xz[2 * c0 + e..], 2 * e)),
            b: gb,
            c: gc,
            a: &mut g_a,
            d: &mut g_d,
            dt_bias: &mut g_bias,
        };
        selective_scan_backward(&inp, len, e, n, &sc.g_y[c0..], grads);
        for t in 0..len {
            let row = &mut sc.g_xdbl[d0 + t * xd + r..][..2 * n];
            row[..n].copy_from_slice(&gb[t * n..(t + 1) * n]);
            row[n..].copy_from_slice(&gc[t * n..(t + 1) * n]);
        }
    }
    add_to(g.at(&lp.d), &g_d);
    add_to(g.at(&lp.dt_bias), &g_bias);
    // A = −exp(A_log): ∂/∂A_log = ∂/∂A · A.
    let g_a_log = g.at(&lp.a_log);
    for c in 0..e {
        for k in 0..n {
            g_a_log[c * n + k] += g_a[k * e + c] * a[k * e + c];
        }
    }
    // dt_proj reads the first dt_rank columns of x_proj's output (and writes their gradient).
    linear_backward(
        &acts.xdbl,
        xd,
        &sc.g_dt,
        e,
        rows,
        &p[lp.dt_proj.clone()],
        e,
        r,
        GradX::write(&mut sc.g_xdbl, xd),
        g.at(&lp.dt_proj),
    );
    // The conv's output feeds both the scan (its gradient already in g_xc) and x_proj.
    linear_backward(
        &acts.xc,
        e,
        &sc.g_xdbl,
        xd,
        rows,
        &p[lp.x_proj.clone()],
        xd,
        e,
        GradX::add(&mut sc.g_xc, e),
        g.at(&lp.x_proj),
    );
    let taps = taps(&p[lp.conv_w.clone()], e, w);
    let mut g_taps = vec![0.0f32; w * e];
    let bias = lp.conv_b.clone().map(|b| &p[b]);
    let mut g_conv_b = vec![0.0f32; e];
    for s in 0..seqs {
        let (c0, x0) = (s * len * e, s * len * 2 * e);
        causal_conv1d_silu_backward(
            &acts.xz[x0..],
            len,
            2 * e,
            e,
            &taps,
            w,
            bias,
            &sc.g_xc[c0..],
            &mut sc.g_xz[x0..],
            2 * e,
            &mut g_taps,
            Some(&mut g_conv_b),
        );
    }
    add_taps_to_checkpoint_layout(&g_taps, e, w, g.at(&lp.conv_w));
    if let Some(b) = &lp.conv_b {
        add_to(g.at(b), &g_conv_b);
    }
    linear_backward(
        h,
        dm,
        &sc.g_xz,
        2 * e,
        rows,
        &p[lp.in_proj.clone()],
        2 * e,
        dm,
        GradX::write(g_h, dm),
        g.at(&lp.in_proj),
    );
}
