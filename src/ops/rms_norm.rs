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
