//! Mamba-2's scan backward on the GPU (ssd_backward.cu; `crate::ops::ssd::ssd_backward`'s
//! twin): one Mamba-1 scan backward ([`ops::scan_backward`]) per (group, slice of states) over
//! the group's channels, with the kernels that spread δ, A and dt_bias to the channels before
//! and gather the slices' gradients after.

use super::ops::{self, ScanBwdParams, SCAN_BWD_SUB};
use super::{Acts, Carve};
use crate::config::Config;
use crate::cuda::Gpu;
use anyhow::Result;
use cudarc::driver::DeviceRepr;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SsdBwdParams {
    raw_dt: u64,
    gy: u64,
    bias: u64,
    a_log: u64,
    dp: u64,
    dt_e: u64,
    gy_g: u64,
    bias_e: u64,
    alog_e: u64,
    zero_e: u64,
    gu: u64,
    gdt: u64,
    gbc: u64,
    gx: u64,
    graw: u64,
    ga_e: u64,
    gd_e: u64,
    gbias_e: u64,
    ga: u64,
    gd: u64,
    gbias: u64,
    r: i32,
    e: i32,
    h: i32,
    p: i32,
    n: i32,
    ns: i32,
    g: i32,
    group: i32,
    k: i32,
    dt_rs: i32,
    gx_rs: i32,
    graw_rs: i32,
    d_per_channel: i32,
}

unsafe impl DeviceRepr for SsdBwdParams {}

/// States per slice: a power of two dividing N, at most the Mamba-1 backward's 32.
pub fn slice_states(n: usize) -> usize {
    1 << n.trailing_zeros().min(5)
}

/// The workspace of one layer's SSD backward (byte addresses).
pub struct Work {
    dt_e: u64,    // (R, Eg) raw δ per channel
    gy_g: u64,    // (R, Eg) a group's ∂y (several groups)
    gu: u64,      // (R, Eg) a slice's ∂u
    gdt: u64,     // (R, Eg) a slice's ∂(raw δ) per channel
    y: u64,       // (R, Eg) the Mamba-1 backward's output, unused here
    gbc: u64,     // (R, 2·NS) a slice's ∂B | ∂C
    bias_e: u64,  // (Eg)
    alog_e: u64,  // (Eg, NS)
    zero_e: u64,  // (Eg)
    ga_e: u64,    // (E, NS)
    gd_e: u64,    // (E)
    gbias_e: u64, // (E)
    spare: u64,   // (Eg) where the slices after the first put their (repeated) Σ ∂y·x
    ckpt: u64,    // (S, ⌈L/SUB⌉, Eg, NS)
    parts_bc: u64,
    parts_a: u64,
    parts_dd: u64,
    pub end: u64,
}

impl Work {
    /// The pieces, from where `c` is.
    pub fn new(cfg: &Config, seqs: usize, len: usize, mut c: Carve) -> Work {
        let (e, gr) = (cfg.d_ssm, cfg.ngroups);
        let (eg, ns, rows) = (e / gr, slice_states(cfg.d_state), seqs * len);
        let nblk = ops::scan_backward_blocks(eg, ns);
        Work {
            dt_e: c.take(rows * eg),
            gy_g: c.take(if gr > 1 { rows * eg } else { 0 }),
            gu: c.take(rows * eg),
            gdt: c.take(rows * eg),
            y: c.take(rows * eg),
            gbc: c.take(rows * 2 * ns),
            bias_e: c.take(eg),
            alog_e: c.take(eg * ns),
            zero_e: c.take(eg),
            ga_e: c.take(e * ns),
            gd_e: c.take(e),
            gbias_e: c.take(e),
            spare: c.take(eg),
            ckpt: c.take(seqs * len.div_ceil(SCAN_BWD_SUB) * eg * ns),
            parts_bc: c.take(seqs * nblk * len * 2 * ns),
            parts_a: c.take(seqs * eg * ns),
            parts_dd: c.take(seqs * 2 * eg),
            end: c.0,
        }
    }
}

/// Where the backward reads and writes (byte addresses; rows of the layer's activations).
pub struct Io {
    pub xbc: u64,    // the conv output x | B | C, rows `conv` floats apart
    pub raw_dt: u64, // in_proj's δ columns (before dt_bias), rows `dt_rs` apart
    pub dt_rs: usize,
    pub gy: u64,                 // (R, E) ∂ of the SSD output
    pub gxbc: u64,               // ∂ of the conv output, written, rows `conv` apart
    pub graw: u64,               // ∂ of in_proj's δ columns, written, rows `dt_rs` apart
    pub params: (u64, u64, u64), // A_log, dt_bias, D
    pub grads: (u64, u64, u64),  // their gradients, added to
}

/// The backward of the SSD of `acts`' rows: ∂x, ∂B, ∂C and ∂(raw δ) written to `io`, the
/// gradients of A_log, dt_bias and D added to `io.grads`. `slow`: each slice through the plain
/// Mamba-1 kernel.
pub fn ssd_backward(g: &Gpu, cfg: &Config, acts: &Acts, io: &Io, wk: &Work, slow: bool) -> Result<()> {
    let ((a_log, dt_bias, d), (ga, gbias, gd)) = (io.params, io.grads);
    let (seqs, len, rows) = (acts.seqs, acts.len, acts.rows());
    let (e, n, gr, hp) = (cfg.d_ssm, cfg.d_state, cfg.ngroups, cfg.headdim);
    let (eg, ns, conv) = (e / gr, slice_states(n), cfg.conv_dim());
    acts.zero(wk.ga_e, e * ns)?;
    acts.zero(wk.gd_e, e)?;
    acts.zero(wk.gbias_e, e)?;
    let mut sp = SsdBwdParams {
        raw_dt: io.raw_dt,
        gy: io.gy,
        bias: dt_bias,
        a_log,
        dp: d,
        dt_e: wk.dt_e,
        gy_g: if gr > 1 { wk.gy_g } else { 0 },
        bias_e: wk.bias_e,
        alog_e: wk.alog_e,
        zero_e: wk.zero_e,
        gu: wk.gu,
        gdt: wk.gdt,
        gbc: wk.gbc,
        gx: io.gxbc,
        graw: io.graw,
        ga_e: wk.ga_e,
        gd_e: wk.gd_e,
        gbias_e: wk.gbias_e,
        ga,
        gd,
        gbias,
        r: rows as i32,
        e: e as i32,
        h: cfg.nheads() as i32,
        p: hp as i32,
        n: n as i32,
        ns: ns as i32,
        g: gr as i32,
        group: 0,
        k: 0,
        dt_rs: io.dt_rs as i32,
        gx_rs: conv as i32,
        graw_rs: io.dt_rs as i32,
        d_per_channel: cfg.d_has_hdim as i32,
    };
    let f = |floats: usize| 4 * floats as u64;
    for group in 0..gr {
        sp.group = group as i32;
        sp.k = 0;
        let spread = (rows * eg).max(eg * ns);
        g.launch("ssd_bwd_in", (spread.div_ceil(256) as u32, 1, 1), 256, &sp, None)?;
        for k in 0..n / ns {
            sp.k = k as i32;
            let b = io.xbc + f(e + group * n + k * ns);
            let sb = ScanBwdParams {
                u: io.xbc + f(group * eg),
                dt: wk.dt_e,
                dt_bias: wk.bias_e,
                a_log: wk.alog_e,
                b,
                c: b + f(gr * n),
                d: wk.zero_e,
                gy: if gr > 1 { wk.gy_g } else { io.gy },
                gu: wk.gu,
                gdt: wk.gdt,
                y: wk.y,
                ckpt: wk.ckpt,
                parts_bc: wk.parts_bc,
                parts_a: wk.parts_a,
                parts_dd: wk.parts_dd,
                u_rs: conv as i32,
                dt_rs: eg as i32,
                bc_rs: conv as i32,
                l: len as i32,
                e: eg as i32,
                n: ns as i32,
                ..Default::default()
            };
            let gd_k = if k == 0 { wk.gd_e + f(group * eg) } else { wk.spare };
            let sums = (wk.ga_e + f(group * eg * ns), gd_k, wk.gbias_e + f(group * eg));
            ops::scan_backward(g, &sb, seqs, (wk.gbc, 2 * ns), sums, slow)?;
            g.launch("ssd_bwd_out", (rows as u32, 1, 1), 256, &sp, None)?;
        }
    }
    g.launch("ssd_bwd_params", (e.max(cfg.nheads()).div_ceil(256) as u32, 1, 1), 256, &sp, None)
}
