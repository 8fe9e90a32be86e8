//! bf16 × bf16 → f32 matrix product on AVX-512-BF16 (`vdpbf16ps`), for prefill with bf16
//! weights: `y = bf16(x) · Wᵀ`, the activations rounded to bf16 as the official bf16 model's
//! GEMMs take them, products accumulated in f32.
//!
//! Strategy: W is packed per call into panels of 16 output columns where each 32-bit lane holds
//! the bf16 pair (k, k+1) of one column, x into bf16 pairs per row; a 8-row × 32-column
//! micro-kernel keeps 16 accumulators in registers and per k-pair issues 2 panel loads, 8 pair
//! broadcasts and 16 `vdpbf16ps` (32 MACs each). Column panels run in parallel; a 32-column
//! panel pair (2·k·64 bytes, ~100 KB at k = 1536) stays in L2 while all row blocks pass.
//! FLOPs: 2·n·m·k at twice the f32 FMA rate; bytes: W once (packed), x once per panel pair.

use half::bf16;

/// Whether the CPU has the instructions this kernel needs.
fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this kernel should be used: the CPU has it and the instruction-set choice in force
/// (see [`super::simd::isa`]) is AVX-512.
pub fn available() -> bool {
    super::simd::isa() == super::simd::Isa::Avx512 && cpu_has_bf16()
}

/// Rounds to bf16 bits (nearest even; NaN kept quiet).
fn bits(x: f32) -> u32 {
    bf16::from_f32(x).to_bits() as u32
}

/// `y[i·y_rs + j] = Σ_k bf16(x[i·x_rs + k]) · w[j·k_len + k]` for `i < n`, `j < m`.
/// Callers check [`available`] first; only the CPU's support is required for soundness.
#[allow(clippy::too_many_arguments)]
pub fn matmul(x: &[f32], n: usize, x_rs: usize, w: &[bf16], m: usize, k: usize, y: &mut [f32], y_rs: usize) {
    assert!(cpu_has_bf16(), "this CPU has no AVX-512-BF16");
    assert!(w.len() == m * k && n > 0 && x.len() >= (n - 1) * x_rs + k && y.len() >= (n - 1) * y_rs + m);
    let kp = k.div_ceil(2);
    let pair = |lo: u32, hi: u32| lo | (hi << 16);
    let mut xp = vec![0u32; n * kp];
    for i in 0..n {
        let row = &x[i * x_rs..i * x_rs + k];
        for p in 0..kp {
            let hi = row.get(2 * p + 1).map_or(0, |&v| bits(v));
            xp[i * kp + p] = pair(bits(row[2 * p]), hi);
        }
    }
    let panels = m.div_ceil(16);
    let mut wp = vec![0u32; panels * kp * 16];
    for j in 0..m {
        let row = &w[j * k..(j + 1) * k];
        let base = (j / 16) * kp * 16 + j % 16;
        for p in 0..kp {
            let hi = row.get(2 * p + 1).map_or(0, |v| v.to_bits() as u32);
            wp[base + p * 16] = pair(row[2 * p].to_bits() as u32, hi);
        }
    }
    let yp = super::matmul::SendPtr(y.as_mut_ptr());
    super::pool::parallel_for(panels.div_ceil(2), &|task| {
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::panel_pair(&xp, n, kp, &wp, panels, 2 * task, m, yp.get(), y_rs)
        };
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    const ROWS: usize = 8;

    /// Output columns `16·panel .. 16·panel + 32` for every row.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn panel_pair(
        xp: &[u32],
        n: usize,
        kp: usize,
        wp: &[u32],
        panels: usize,
        panel: usize,
        m: usize,
        y: *mut f32,
        y_rs: usize,
    ) {
        let two = panel + 1 < panels;
        let w0 = wp.as_ptr().add(panel * kp * 16);
        let w1 = if two { wp.as_ptr().add((panel + 1) * kp * 16) } else { w0 };
        for r0 in (0..n).step_by(ROWS) {
            let rows = ROWS.min(n - r0);
            // Rows past the end repeat the last one; their results are not stored.
            let xrow: [*const u32; ROWS] = std::array::from_fn(|r| xp.as_ptr().add((r0 + r.min(rows - 1)) * kp));
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            for p in 0..kp {
                let a: __m512bh = std::mem::transmute(_mm512_loadu_si512(w0.add(p * 16) as *const _));
                let b: __m512bh = std::mem::transmute(_mm512_loadu_si512(w1.add(p * 16) as *const _));
                for r in 0..ROWS {
                    let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*xrow[r].add(p) as i32));
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xv, a);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xv, b);
                }
            }
            for (r, a) in acc.iter().enumerate().take(rows) {
                let out = y.add((r0 + r) * y_rs);
                for (h, v) in a.iter().enumerate().take(if two { 2 } else { 1 }) {
                    let j0 = (panel + h) * 16;
                    let cols = (m - j0).min(16);
                    let mask: __mmask16 = if cols == 16 { 0xffff } else { (1u16 << cols) - 1 };
                    _mm512_mask_storeu_ps(out.add(j0), mask, *v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_reference_on_bf16_inputs() {
        if !available() {
            return; // nothing to test on this CPU; the f32 path is used instead
        }
        let (n, m, k) = (11, 37, 23); // odd k, partial panels and row blocks
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let w: Vec<bf16> = (0..m * k).map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 29.0)).collect();
        let mut y = vec![0.0f32; n * m];
        matmul(&x, n, k, &w, m, k, &mut y, m);
        for i in 0..n {
            for j in 0..m {
                let r: f64 = (0..k).map(|t| bf16::from_f32(x[i * k + t]).to_f64() * w[j * k + t].to_f64()).sum();
                assert!(
                    (y[i * m + j] as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()),
                    "({i},{j}): {} vs {r}",
                    y[i * m + j]
                );
            }
        }
    }
}
