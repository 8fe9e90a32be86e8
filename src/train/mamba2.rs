//! The Mamba-2 mixer's training forward, which keeps what the backward needs, and the backward.

use super::model::{add_to, linear, linear_backward, GradX, Grads};
use super::params::Mamba2Params;
use crate::config::Config;
use crate::ops::causal_conv1d::{add_taps_to_checkpoint_layout, causal_conv1d_silu, causal_conv1d_silu_backward, taps};
use crate::ops::rms_norm::{gated_rms_norm, gated_rms_norm_backward};
use crate::ops::simd::softplus_f32;
use crate::ops::ssd::{discretize, ssd, ssd_backward, SsdDims, SsdGrads, SsdInputs, DEFAULT_BLOCK};

/// What one layer's forward keeps (R = sequences × length rows).
pub struct Acts {
    pub zx: Vec<f32>,  // (R, 2·d_ssm + 2GN + H) in_proj output: z | xBC | dt
    pub xbc: Vec<f32>, // (R, d_ssm + 2GN) conv + SiLU of xBC
    pub dt: Vec<f32>,  // (R, H) softplus(dt + dt_bias), clamped to dt_limit
    pub da: Vec<f32>,  // (R, H) dt·A
    pub y: Vec<f32>,   // (R, d_ssm) SSD output (with the D skip), before the gated norm
    pub yn: Vec<f32>,  // (R, d_ssm) gated norm output: out_proj's input
}

/// Gradient scratch of one layer's backward, shared by all layers.
pub struct Scratch {
    pub g_zx: Vec<f32>,  // (R, 2·d_ssm + 2GN + H)
    pub g_xbc: Vec<f32>, // (R, d_ssm + 2GN)
    pub g_yn: Vec<f32>,  // (R, d_ssm)
    pub g_y: Vec<f32>,   // (R, d_ssm)
    pub g_dt: Vec<f32>,  // (R, H)
    pub g_da: Vec<f32>,  // (R, H)
}

struct Dims {
    ssm: usize,
    conv: usize,
    w_in: usize,
    heads: usize,
    ssd: SsdDims,
}

fn dims(cfg: &Config) -> Dims {
    Dims {
        ssm: cfg.d_ssm,
        conv: cfg.conv_dim(),
        w_in: cfg.d_in_proj(),
        heads: cfg.nheads(),
        ssd: SsdDims {
            heads: cfg.nheads(),
            headdim: cfg.headdim,
            groups: cfg.ngroups,
            d_state: cfg.d_state,
            block: cfg.chunk_size.min(DEFAULT_BLOCK),
        },
    }
}

impl Acts {
    pub fn new(cfg: &Config, rows: usize) -> Acts {
        let d = dims(cfg);
        let z = |n: usize| vec![0.0f32; rows * n];
        Acts { zx: z(d.w_in), xbc: z(d.conv), dt: z(d.heads), da: z(d.heads), y: z(d.ssm), yn: z(d.ssm) }
    }
}

impl Scratch {
    pub fn new(cfg: &Config, rows: usize) -> Scratch {
        let d = dims(cfg);
        let z = |n: usize| vec![0.0f32; rows * n];
        Scratch { g_zx: z(d.w_in), g_xbc: z(d.conv), g_yn: z(d.ssm), g_y: z(d.ssm), g_dt: z(d.heads), g_da: z(d.heads) }
    }
}

fn ssd_inputs<'a>(d: &Dims, p: &'a [f32], lp: &Mamba2Params, acts: &'a Acts, s: usize, len: usize) -> SsdInputs<'a> {
    let (r0, gn) = (s * len, d.ssd.groups * d.ssd.d_state);
    let c0 = r0 * d.conv;
    SsdInputs {
        x: &acts.xbc[c0..],
        x_rs: d.conv,
        dt: &acts.dt[r0 * d.heads..],
        da: &acts.da[r0 * d.heads..],
        dt_rs: d.heads,
        b: &acts.xbc[c0 + d.ssm..],
        c: &acts.xbc[c0 + d.ssm + gn..],
        bc_rs: d.conv,
        d: Some(&p[lp.d.clone()]),
    }
}

/// `h` (`seqs × len` rows of d_model, the normed input) → `out`, each sequence from a zero state.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    cfg: &Config,
    p: &[f32],
    lp: &Mamba2Params,
    seqs: usize,
    len: usize,
    h: &[f32],
    acts: &mut Acts,
    out: &mut [f32],
) {
    let (dm, d, w) = (cfg.d_model, dims(cfg), cfg.d_conv);
    let rows = seqs * len;
    let (xbc_at, dt_at) = (d.ssm, d.ssm + d.conv);
    linear(h, dm, rows, &p[lp.in_proj.clone()], d.w_in, dm, &mut acts.zx, d.w_in);
    let a: Vec<f32> = p[lp.a_log.clone()].iter().map(|x| -x.exp()).collect();
    let bias = &p[lp.dt_bias.clone()];
    discretize(&acts.zx[dt_at..], d.w_in, rows, bias, &a, cfg.dt_limit, &mut acts.dt, &mut acts.da);
    let taps = taps(&p[lp.conv_w.clone()], d.conv, w);
    let cb = lp.conv_b.clone().map(|b| &p[b]);
    let mut y = std::mem::take(&mut acts.y);
    for s in 0..seqs {
        let (r0, c0) = (s * len, s * len * d.conv);
        let mut state = vec![0.0f32; (w - 1) * d.conv];
        causal_conv1d_silu(
            &acts.zx[r0 * d.w_in + xbc_at..],
            len,
            d.w_in,
            d.conv,
            &taps,
            w,
            cb,
            &mut state,
            &mut acts.xbc[c0..],
        );
        let inp = ssd_inputs(&d, p, lp, acts, s, len);
        let mut st = vec![0.0f32; d.ssd.heads * d.ssd.d_state * d.ssd.headdim];
        ssd(&inp, len, d.ssd, &mut st, &mut y[r0 * d.ssm..], d.ssm);
    }
    acts.yn.copy_from_slice(&y);
    acts.y = y;
    let group = d.ssm / d.ssd.groups;
    gated_rms_norm(&mut acts.yn, &acts.zx, d.w_in, &p[lp.norm_w.clone()], group, cfg.norm_eps);
    linear(&acts.yn, d.ssm, rows, &p[lp.out_proj.clone()], dm, d.ssm, out, dm);
}

/// Backward of [`forward`]: from `g_out` (the mixer output's gradient) adds every parameter's
/// gradient to `g` and writes `g_h` (the normed input's gradient).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    cfg: &Config,
    p: &[f32],
    lp: &Mamba2Params,
    g: &mut Grads,
    seqs: usize,
    len: usize,
    h: &[f32],
    acts: &Acts,
    sc: &mut Scratch,
    g_out: &[f32],
    g_h: &mut [f32],
) {
    let (dm, d, w) = (cfg.d_model, dims(cfg), cfg.d_conv);
    let rows = seqs * len;
    let (xbc_at, dt_at, gn) = (d.ssm, d.ssm + d.conv, d.ssd.groups * d.ssd.d_state);
    linear_backward(
        &acts.yn,
        d.ssm,
        g_out,
        dm,
        rows,
        &p[lp.out_proj.clone()],
        dm,
        d.ssm,
        GradX::write(&mut sc.g_yn, d.ssm),
        g.at(&lp.out_proj),
    );
    let group = d.ssm / d.ssd.groups;
    let mut g_norm = vec![0.0f32; d.ssm];
    gated_rms_norm_backward(
        &acts.y,
        &acts.zx,
        d.w_in,
        &p[lp.norm_w.clone()],
        group,
        cfg.norm_eps,
        &sc.g_yn,
        &mut sc.g_y,
        &mut sc.g_zx,
        &mut g_norm,
    );
    add_to(g.at(&lp.norm_w), &g_norm);
    let mut g_d = vec![0.0f32; lp.d.len()];
    let (mut gx, mut gb, mut gc) = (vec![0.0f32; len * d.ssm], vec![0.0f32; len * gn], vec![0.0f32; len * gn]);
    for s in 0..seqs {
        let r0 = s * len;
        let inp = ssd_inputs(&d, p, lp, acts, s, len);
        let grads = SsdGrads {
            x: &mut gx,
            x_rs: d.ssm,
            dt: &mut sc.g_dt[r0 * d.heads..],
            da: &mut sc.g_da[r0 * d.heads..],
            dt_rs: d.heads,
            b: &mut gb,
            c: &mut gc,
            bc_rs: gn,
            d: Some(&mut g_d),
        };
        ssd_backward(&inp, len, d.ssd, &sc.g_y[r0 * d.ssm..], d.ssm, grads);
        // x | B | C are the columns of the conv's output.
        for t in 0..len {
            let row = &mut sc.g_xbc[(r0 + t) * d.conv..(r0 + t + 1) * d.conv];
            row[..d.ssm].copy_from_slice(&gx[t * d.ssm..(t + 1) * d.ssm]);
            row[d.ssm..d.ssm + gn].copy_from_slice(&gb[t * gn..(t + 1) * gn]);
            row[d.ssm + gn..].copy_from_slice(&gc[t * gn..(t + 1) * gn]);
        }
    }
    add_to(g.at(&lp.d), &g_d);
    // dt = clamp(softplus(raw + bias)), da = dt·A with A = −exp(A_log); the clamp passes no
    // gradient where it is active.
    let (bias, a_log) = (&p[lp.dt_bias.clone()], &p[lp.a_log.clone()]);
    let (mut g_bias, mut g_a_log) = (vec![0.0f32; d.heads], vec![0.0f32; d.heads]);
    for r in 0..rows {
        for hh in 0..d.heads {
            let i = r * d.heads + hh;
            let a = -a_log[hh].exp();
            let g_da = sc.g_da[i];
            g_a_log[hh] += g_da * acts.dt[i] * a;
            let raw = acts.zx[r * d.w_in + dt_at + hh] + bias[hh];
            let sp = softplus_f32(raw);
            let g_raw = if sp < cfg.dt_limit.0 || sp > cfg.dt_limit.1 {
                0.0
            } else {
                (sc.g_dt[i] + g_da * a) / (1.0 + (-raw).exp())
            };
            sc.g_zx[r * d.w_in + dt_at + hh] = g_raw;
            g_bias[hh] += g_raw;
        }
    }
    add_to(g.at(&lp.dt_bias), &g_bias);
    add_to(g.at(&lp.a_log), &g_a_log);
    let taps = taps(&p[lp.conv_w.clone()], d.conv, w);
    let cb = lp.conv_b.clone().map(|b| &p[b]);
    let mut g_taps = vec![0.0f32; w * d.conv];
    let mut g_cb = vec![0.0f32; d.conv];
    for s in 0..seqs {
        let r0 = s * len;
        causal_conv1d_silu_backward(
            &acts.zx[r0 * d.w_in + xbc_at..],
            len,
            d.w_in,
            d.conv,
            &taps,
            w,
            cb,
            &sc.g_xbc[r0 * d.conv..],
            &mut sc.g_zx[r0 * d.w_in + xbc_at..],
            d.w_in,
            &mut g_taps,
            Some(&mut g_cb),
        );
    }
    add_taps_to_checkpoint_layout(&g_taps, d.conv, w, g.at(&lp.conv_w));
    if let Some(b) = &lp.conv_b {
        add_to(g.at(b), &g_cb);
    }
    linear_backward(
        h,
        dm,
        &sc.g_zx,
        d.w_in,
        rows,
        &p[lp.in_proj.clone()],
        d.w_in,
        dm,
        GradX::write(g_h, dm),
        g.at(&lp.in_proj),
    );
}
