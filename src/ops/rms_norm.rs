//! Normalisations, computed in f32: RMSNorm and LayerNorm over rows (the block and final norms)
//! and Mamba-2's gated RMSNorm, which normalises `y·silu(z)` per group of channels.

use super::simd::{silu, Simd};
use crate::dispatch;
use rayon::prelude::*;

/// `out = x / sqrt(mean(x²) + eps) · w` for each row of `x` (rows of `w.len()` values).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    rows(x, out, d, |xr, or| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        or.iter_mut().zip(xr).zip(w).for_each(|((o, v), w)| *o = v * r * w);
    });
}

/// `out = (x − mean) / sqrt(var + eps) · w + b` for each row.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    rows(x, out, d, |xr, or| {
        let mean = xr.iter().sum::<f32>() / d as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let r = 1.0 / (var + eps).sqrt();
        for (((o, v), w), b) in or.iter_mut().zip(xr).zip(w).zip(b) {
            *o = (v - mean) * r * w + b;
        }
    });
}

fn rows(x: &[f32], out: &mut [f32], d: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    assert_eq!(x.len(), out.len());
    if x.len() <= 16 * d {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(|(a, b)| f(a, b));
    } else {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(|(a, b)| f(a, b));
    }
}

/// Gated RMSNorm with the gate applied first (`norm_before_gate = false`, as every published
/// Mamba-2): per row `v = y·silu(z)`, then each group of `group` channels becomes
/// `v / sqrt(mean(v²) + eps) · w`. `y` rows have `w.len()` values and are overwritten;
/// `z` rows are `z_rs` apart.
pub fn gated_rms_norm(y: &mut [f32], z: &[f32], z_rs: usize, w: &[f32], group: usize, eps: f32) {
    let d = w.len();
    assert!(group > 0 && d.is_multiple_of(group));
    let n = y.len() / d;
    assert!(n == 0 || z.len() >= (n - 1) * z_rs + d);
    let body = |(i, yr): (usize, &mut [f32])| {
        let zr = &z[i * z_rs..i * z_rs + d];
        dispatch!(gate_row(yr, zr));
        for (yg, wg) in yr.chunks_mut(group).zip(w.chunks(group)) {
            let ms = yg.iter().map(|v| v * v).sum::<f32>() / group as f32;
            let r = 1.0 / (ms + eps).sqrt();
            yg.iter_mut().zip(wg).for_each(|(v, w)| *v *= r * w);
        }
    };
    if n <= 16 {
        y.chunks_mut(d).enumerate().for_each(body);
    } else {
        y.par_chunks_mut(d).enumerate().for_each(body);
    }
}

/// `y ← y·silu(z)` over one row.
pub fn gate(y: &mut [f32], z: &[f32]) {
    dispatch!(gate_row(y, z));
}

#[inline(always)]
unsafe fn gate_row<S: Simd>(y: &mut [f32], z: &[f32]) {
    let len = y.len().min(z.len());
    let (yp, zp) = (y.as_mut_ptr(), z.as_ptr());
    let mut i = 0;
    while i + S::LANES <= len {
        S::store(yp.add(i), S::mul(S::load(yp.add(i)), silu::<S>(S::load(zp.add(i)))));
        i += S::LANES;
    }
    for j in i..len {
        y[j] *= super::simd::silu_f32(z[j]);
    }
}

/// Fixed row ranges for sums over rows (weight gradients): as many as the pool could use, but
/// a constant, so the sums' order and so their rounding do not depend on the thread count.
const PARTS: usize = 8;

/// Runs `f(rows r0..r1, partial)` over `PARTS` contiguous row ranges in parallel, each adding
/// into its own zeroed partial of `len` values, and adds the partials into `acc` in order.
pub(crate) fn sum_over_row_parts(n: usize, len: usize, acc: &mut [f32], f: impl Fn(usize, usize, &mut [f32]) + Sync) {
    let per = n.div_ceil(PARTS).max(1);
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(per))
        .into_par_iter()
        .map(|p| {
            let mut part = vec![0.0f32; len];
            f(p * per, ((p + 1) * per).min(n), &mut part);
            part
        })
        .collect();
    for part in parts {
        acc.iter_mut().zip(&part).for_each(|(a, p)| *a += p);
    }
}

/// Backward of [`rms_norm`] given the output gradient `g_y`: adds `∂/∂x` to `g_x` and `∂/∂w` to
/// `g_w`. With `r = (mean(x²) + ε)^−½` (recomputed: one pass over the row) and `u = w ⊙ g_y`:
/// `g_x = r·u − x·r³·mean(u ⊙ x)`, `g_w = Σ_rows g_y ⊙ x·r`.
pub fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, g_y: &[f32], g_x: &mut [f32], g_w: &mut [f32]) {
    let d = w.len();
    let n = x.len() / d;
    assert!(x.len() == n * d && g_y.len() == x.len() && g_x.len() == x.len() && g_w.len() == d);
    let gx = super::matmul::SendPtr(g_x.as_mut_ptr());
    sum_over_row_parts(n, d, g_w, |r0, r1, gw| {
        for r in r0..r1 {
            let (xr, gr) = (&x[r * d..(r + 1) * d], &g_y[r * d..(r + 1) * d]);
            let rstd = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
            let dot = xr.iter().zip(gr).zip(w).map(|((x, g), w)| w * g * x).sum::<f32>() / d as f32;
            // Rows of g_x are disjoint between parts.
            let out = unsafe { std::slice::from_raw_parts_mut(gx.get().add(r * d), d) };
            for i in 0..d {
                out[i] += rstd * w[i] * gr[i] - xr[i] * rstd * rstd * rstd * dot;
                gw[i] += gr[i] * xr[i] * rstd;
            }
        }
    });
}

/// Backward of [`gated_rms_norm`] (`v = y·silu(z)`, normalised per group): from the output
/// gradient `g_out` and the un-normalised `y`, writes `g_y` (rows of `w.len()`) and `g_z` (rows
/// `z_rs` apart, the same columns as `z`) and adds `∂/∂w` to `g_w`.
#[allow(clippy::too_many_arguments)]
pub fn gated_rms_norm_backward(
    y: &[f32],
    z: &[f32],
    z_rs: usize,
    w: &[f32],
    group: usize,
    eps: f32,
    g_out: &[f32],
    g_y: &mut [f32],
    g_z: &mut [f32],
    g_w: &mut [f32],
) {
    let d = w.len();
    let n = y.len() / d;
    assert!(g_out.len() == y.len() && g_y.len() == y.len() && g_w.len() == d);
    assert!(n == 0 || (z.len() >= (n - 1) * z_rs + d && g_z.len() >= (n - 1) * z_rs + d));
    let (gy, gz) = (super::matmul::SendPtr(g_y.as_mut_ptr()), super::matmul::SendPtr(g_z.as_mut_ptr()));
    sum_over_row_parts(n, d, g_w, |r0, r1, gw| {
        let mut v = vec![0.0f32; d];
        for r in r0..r1 {
            let (yr, zr, gr) = (&y[r * d..(r + 1) * d], &z[r * z_rs..r * z_rs + d], &g_out[r * d..(r + 1) * d]);
            // Disjoint rows of g_y and g_z per part.
            let (gyr, gzr) = unsafe {
                (
                    std::slice::from_raw_parts_mut(gy.get().add(r * d), d),
                    std::slice::from_raw_parts_mut(gz.get().add(r * z_rs), d),
                )
            };
            v.iter_mut().zip(yr).zip(zr).for_each(|((v, y), z)| *v = y * super::simd::silu_f32(*z));
            for g0 in (0..d).step_by(group) {
                let c = g0..g0 + group;
                let rstd = 1.0 / (v[c.clone()].iter().map(|v| v * v).sum::<f32>() / group as f32 + eps).sqrt();
                let dot = c.clone().map(|i| w[i] * gr[i] * v[i]).sum::<f32>() / group as f32;
                for i in c {
                    let g_v = rstd * w[i] * gr[i] - v[i] * rstd * rstd * rstd * dot;
                    gw[i] += gr[i] * v[i] * rstd;
                    let s = 1.0 / (1.0 + (-zr[i]).exp());
                    gyr[i] = g_v * zr[i] * s;
                    gzr[i] = g_v * yr[i] * s * (1.0 + zr[i] * (1.0 - s));
                }
            }
        }
    });
}
