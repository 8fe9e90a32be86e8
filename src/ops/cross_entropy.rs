//! Cross-entropy of logit rows against target ids, `−log softmax(x)[target] = lse(x) − x[target]`
//! over the padded vocabulary (as the official loss), without a softmax ever being stored.
//! Scoring uses it per position; the GPU twin is cross_entropy.cu.
//!
//! Per row: one pass for the maximum, one for `Σ exp(x − max)` with the vectorised `exp`,
//! summed in f32 over blocks of 256 values and across blocks in f64. Rows run in parallel.
//! Bytes: the row twice (the second read from cache); FLOPs: ~15 per value.
//!
//! [`head_nll`] fuses the LM head in front of it, so `[rows × vocab]` logits never exist: at
//! 1024 positions of a 50K vocabulary they are 200 MB, and writing and reading them back cost
//! more than the head's FLOPs on a CPU.

use super::matmul::gemm_f32;
use super::simd::{exp, Simd};
use crate::dispatch;
use crate::tensor::{Matrix, Store};
use rayon::prelude::*;

/// Vocabulary entries per tile of [`head_nll`], and rows per product: a block's logits
/// (`ROWS × TILE` f32, 256 KB) stay in L2 while they are folded in.
const TILE: usize = 512;
const ROWS: usize = 128;

/// Values summed in f32 before their sum joins the f64 total.
const BLOCK: usize = 256;

/// `lse(row) − row[target]` for each row of `v` values in `logits` with a target: rows past
/// `targets.len()` are skipped.
pub fn nll_rows(logits: &[f32], v: usize, targets: &[u32]) -> Vec<f64> {
    assert!(logits.len() >= targets.len() * v, "cross-entropy: fewer rows than targets");
    let row = |(r, &t): (usize, &u32)| {
        let x = &logits[r * v..(r + 1) * v];
        dispatch!(nll_row(x, t as usize))
    };
    if targets.len() < 4 {
        targets.iter().enumerate().map(row).collect()
    } else {
        targets.par_iter().enumerate().map(row).collect()
    }
}

/// [`nll_rows`] in plain f64, one value at a time: the reference the fast form is tested on.
pub fn nll_rows_slow(logits: &[f32], v: usize, targets: &[u32]) -> Vec<f64> {
    targets
        .iter()
        .enumerate()
        .map(|(r, &t)| {
            let x = &logits[r * v..(r + 1) * v];
            let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            m + x.iter().map(|&y| (y as f64 - m).exp()).sum::<f64>().ln() - x[t as usize] as f64
        })
        .collect()
}

/// One vocabulary tile's part of [`head_nll`]: per row the tile's maximum and `Σ exp(x − max)`,
/// and the (row, logit) of the targets that fall in the tile.
type TilePart = (Vec<(f32, f64)>, Vec<(usize, f32)>);

/// `lse(h · Wᵀ) − (h · Wᵀ)[target]` for each row of `h` (rows of `head.cols` values), the
/// logits never held whole. Each task takes one tile of `TILE` vocabulary entries (widened
/// to f32 once if stored narrower), multiplies it against the rows `ROWS` at a time and keeps
/// per row the tile's maximum and `Σ exp(x − max)`; the tiles' parts are then combined per row
/// in tile order, so the result does not depend on the number of threads.
/// Bytes: the head once, the rows once per tile (from cache); FLOPs: `2·rows·vocab·d`.
pub fn head_nll(h: &[f32], head: &Matrix, targets: &[u32]) -> Vec<f64> {
    let (vocab, d, n) = (head.rows, head.cols, targets.len());
    assert!(h.len() >= n * d, "cross-entropy: fewer rows than targets");
    assert!(targets.iter().all(|&t| (t as usize) < vocab), "cross-entropy: a target is past the vocabulary");
    if n == 0 {
        return vec![];
    }
    let tiles: Vec<TilePart> = (0..vocab.div_ceil(TILE))
        .into_par_iter()
        .map_init(
            || (Vec::new(), vec![0.0f32; ROWS * TILE]),
            |(wide, buf), t| {
                let (v0, v1) = (t * TILE, ((t + 1) * TILE).min(vocab));
                let m = v1 - v0;
                let w: &[f32] = match &head.data {
                    Store::F32(v) => &v[v0 * d..v1 * d],
                    other => {
                        wide.resize(m * d, 0.0);
                        other.read_f32(v0 * d, wide);
                        wide
                    }
                };
                let mut parts = Vec::with_capacity(n);
                let mut hits = Vec::new();
                for r0 in (0..n).step_by(ROWS) {
                    let rows = (n - r0).min(ROWS);
                    gemm_f32(&h[r0 * d..], rows, d, w, m, d, buf, m, gemm::Parallelism::None);
                    for (r, x) in buf.chunks(m).take(rows).enumerate() {
                        parts.push(dispatch!(max_and_sum(x)));
                        let target = targets[r0 + r] as usize;
                        if (v0..v1).contains(&target) {
                            hits.push((r0 + r, x[target - v0]));
                        }
                    }
                }
                (parts, hits)
            },
        )
        .collect();
    let mut target_logit = vec![0.0f32; n];
    tiles.iter().flat_map(|t| &t.1).for_each(|&(r, x)| target_logit[r] = x);
    (0..n)
        .map(|r| {
            let m = tiles.iter().fold(f32::NEG_INFINITY, |a, t| a.max(t.0[r].0)) as f64;
            let s: f64 = tiles.iter().map(|t| t.0[r].1 * (t.0[r].0 as f64 - m).exp()).sum();
            m + s.ln() - target_logit[r] as f64
        })
        .collect()
}

/// `x ← exp(x − shift)·scale` (softmax probabilities scaled, given the log-sum-exp).
#[inline(always)]
unsafe fn exp_shifted_scaled<S: Simd>(x: &mut [f32], shift: f32, scale: f32) {
    let (n, p, l) = (x.len(), x.as_mut_ptr(), S::LANES);
    let (sh, sc) = (S::splat(shift), S::splat(scale));
    let mut i = 0;
    while i + l <= n {
        S::store(p.add(i), S::mul(exp::<S>(S::sub(S::load(p.add(i)), sh)), sc));
        i += l;
    }
    for v in &mut x[i..] {
        *v = (*v - shift).exp() * scale;
    }
}

#[inline(always)]
unsafe fn nll_row<S: Simd>(x: &[f32], target: usize) -> f64 {
    let (m, total) = max_and_sum::<S>(x);
    m as f64 + total.ln() - x[target] as f64
}

/// The row's maximum and `Σ exp(x − max)`.
#[inline(always)]
unsafe fn max_and_sum<S: Simd>(x: &[f32]) -> (f32, f64) {
    let (n, p, l) = (x.len(), x.as_ptr(), S::LANES);
    let mut mv = S::splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i + l <= n {
        mv = S::max(mv, S::load(p.add(i)));
        i += l;
    }
    let mut lanes = [f32::NEG_INFINITY; 16];
    S::store(lanes.as_mut_ptr(), mv);
    let m = lanes[..l].iter().chain(&x[i..]).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let ms = S::splat(m);
    let mut total = 0.0f64;
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK).min(n);
        let mut acc = S::splat(0.0);
        while i + l <= end {
            acc = S::add(acc, exp::<S>(S::sub(S::load(p.add(i)), ms)));
            i += l;
        }
        let mut s = S::reduce_add(acc);
        for &y in &x[i..end] {
            s += (y - m).exp();
        }
        i = end;
        total += s as f64;
    }
    (m, total)
}

/// A target that takes no part in the loss (positions a task does not grade).
pub const IGNORE: u32 = u32::MAX;

/// What [`head_loss_backward`] computes besides the loss: `g_h = scale·(softmax − onehot)·W`
/// (written) and `scale·(softmax − onehot)ᵀ·h` (added to `g_w`).
pub struct HeadGrads<'a> {
    pub scale: f32,
    pub g_h: &'a mut [f32],
    pub g_w: &'a mut [f32],
}

/// The LM head's loss and its backward, fused (training-spec §2): for rows `h` (`n × d`)
/// against f32 weights `w` (`vocab × d`) returns `Σ_rows −log softmax(h·Wᵀ)[target]` (f64,
/// rows whose target is [`IGNORE`] left out) and, when asked, the gradients ([`HeadGrads`]).
/// `ROWS` rows at a time: their logits are computed, turned into `g_z` in place and used for
/// both products, so `[n × vocab]` logits never exist (128 × 50K f32 is 26 MB; all rows of a
/// training batch would be gigabytes).
pub fn head_loss_backward(h: &[f32], w: &[f32], vocab: usize, targets: &[u32], mut grads: Option<HeadGrads>) -> f64 {
    use super::matmul::{gemm_views, View};
    let n = targets.len();
    let d = w.len() / vocab;
    assert!(w.len() == vocab * d && h.len() >= n * d);
    if let Some(g) = &grads {
        assert!(g.g_h.len() >= n * d && g.g_w.len() == w.len());
    }
    let scale = grads.as_ref().map(|g| g.scale);
    assert!(
        targets.iter().all(|&t| t == IGNORE || (t as usize) < vocab),
        "cross-entropy: a target is past the vocabulary"
    );
    let mut z = vec![0.0f32; ROWS.min(n) * vocab];
    let mut loss = 0.0f64;
    for r0 in (0..n).step_by(ROWS) {
        let rows = (n - r0).min(ROWS);
        let (hc, z) = (&h[r0 * d..(r0 + rows) * d], &mut z[..rows * vocab]);
        gemm_views(rows, vocab, d, z, vocab, View::rows(hc, d), View::t(w, d), false);
        loss += z
            .par_chunks_mut(vocab)
            .zip(&targets[r0..r0 + rows])
            .map(|(x, &t)| {
                if t == IGNORE {
                    x.fill(0.0);
                    return 0.0;
                }
                let (m, total) = dispatch!(max_and_sum(x));
                let lse = m as f64 + total.ln();
                let nll = lse - x[t as usize] as f64;
                if let Some(scale) = scale {
                    dispatch!(exp_shifted_scaled(x, lse as f32, scale));
                    x[t as usize] -= scale;
                }
                nll
            })
            .collect::<Vec<f64>>()
            .iter()
            .sum::<f64>(); // in row order: the same whatever the threads
        if let Some(g) = &mut grads {
            gemm_views(rows, d, vocab, &mut g.g_h[r0 * d..], d, View::rows(z, vocab), View::rows(w, d), false);
            gemm_views(vocab, d, rows, g.g_w, d, View::t(z, vocab), View::rows(hc, d), true);
        }
    }
    loss
}
