//! `y = x · Wᵀ` for a batch of activation rows against a stored weight matrix.
//!
//! Decode steps (one row per sequence) and few rows: a streaming matrix-vector kernel that
//! reads every weight exactly once, widening bf16/f16 on the fly, rows split across threads —
//! bound by memory bandwidth (`rows × cols × sizeof(weight)` bytes per call). Each row's dot
//! products are the same whatever other rows share the call, so a sequence's tokens do not
//! depend on the batch it decodes in. Many positions of one sequence (prefill): the `gemm` crate's
//! blocked f32 kernel, compute bound (`2 · n · rows · cols` FLOPs); bf16 weights go through
//! the AVX-512-BF16 kernel where the CPU has it, other half-precision weights are widened once
//! per call into a scratch matrix first.

use super::simd::{Elem, Simd};
use crate::dispatch;
use crate::tensor::{Matrix, Store};
use rayon::prelude::*;

/// Runs of up to this many positions use the streaming kernel.
const GEMV_MAX_ROWS: usize = 4;

/// Matrices of at most this many rows take stacked sequences one at a time.
const THIN_ROWS: usize = 64;

/// Bytes ahead of the current weight that the streaming kernels prefetch, into every cache
/// level: with the non-temporal hint instead, decode ran 5–15 % faster on an AMD EPYC but the
/// streaming products ran 1.4–2.7× slower on a Xeon with a large L3 (measured), so T0 it is.
const PREFETCH: usize = 1024;

/// Prefetches the weights `PREFETCH` bytes past `w`. May point past the matrix: a prefetch
/// never faults, and wrapping_add keeps the address computation itself defined.
#[inline(always)]
pub(crate) fn prefetch_ahead<T>(w: *const T) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((w as *const i8).wrapping_add(PREFETCH))
    };
}

/// A raw pointer that may cross into rayon tasks writing disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method call, so closures capture the whole `Send` wrapper).
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// What the rows of a product are, which picks its kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// `seqs` runs of `len` consecutive positions (prefill, scoring): the blocked GEMM when a
    /// run is longer than a few rows. The kernel depends on `len` alone, and for matrices of
    /// more than `THIN_ROWS` rows neither kernel's sums depend on the row count (the GEMM's
    /// depth blocking is set by the depth; a test checks it), so stacking sequences in one
    /// product leaves each one's numbers as they are alone.
    Positions { seqs: usize, len: usize },
    /// One row per sequence (a decode step): the streaming kernel at any count, so each row's
    /// result does not depend on the others.
    Sequences(usize),
}

impl Rows {
    /// The rows of `seqs` sequences of `l` tokens each (`l == 1`: a decode step).
    pub fn of(seqs: usize, l: usize) -> Rows {
        if l == 1 {
            Rows::Sequences(seqs)
        } else {
            Rows::Positions { seqs, len: l }
        }
    }

    pub fn count(self) -> usize {
        match self {
            Rows::Positions { seqs, len } => seqs * len,
            Rows::Sequences(n) => n,
        }
    }

    /// Whether the streaming kernel takes these rows.
    fn streamed(self) -> bool {
        match self {
            Rows::Positions { len, .. } => len <= GEMV_MAX_ROWS,
            Rows::Sequences(_) => true,
        }
    }
}

/// `y[i·y_rs + j] = Σ_k x[i·x_rs + k] · w[j, k]` for `i < n`, `j < w.rows` (`n` rows).
pub fn matmul_t(x: &[f32], rows: Rows, x_rs: usize, w: &Matrix, y: &mut [f32], y_rs: usize) {
    let n = rows.count();
    if n == 0 {
        return;
    }
    let (m, k) = (w.rows, w.cols);
    assert!(x_rs >= k && x.len() >= (n - 1) * x_rs + k, "matmul: x too short");
    assert!(y_rs >= m && y.len() >= (n - 1) * y_rs + m, "matmul: y too short");
    if rows.streamed() {
        gemv(x, n, x_rs, w, y, y_rs);
        return;
    }
    if let Rows::Positions { seqs: seqs @ 2.., len } = rows {
        if m <= THIN_ROWS {
            // The `gemm` crate's sums against a matrix this thin depend on the row count (its
            // small-size paths): one sequence a call keeps each one's numbers. Such products
            // are cheap.
            for s in 0..seqs {
                let (xs, ys) = (&x[s * len * x_rs..], &mut y[s * len * y_rs..]);
                matmul_t(xs, Rows::Positions { seqs: 1, len }, x_rs, w, ys, y_rs);
            }
            return;
        }
    }
    if let Store::BF16(v) = &w.data {
        // Thin matrices (Mamba-1's x_proj and dt_proj) do not repay the packing.
        if m >= 256 && k >= 256 && super::gemm_bf16::available() {
            super::gemm_bf16::matmul(x, n, x_rs, v, m, k, y, y_rs);
            return;
        }
    }
    let widened;
    let wf: &[f32] = match &w.data {
        Store::F32(v) => v,
        other => {
            widened = widen_parallel(other);
            &widened
        }
    };
    gemm_f32(x, n, x_rs, wf, m, k, y, y_rs, gemm::Parallelism::Rayon(rayon::current_num_threads()));
}

/// An f32 matrix operand read through strides: element `(i, j)` is `data[i·rs + j·cs]`, so a
/// transposed view is the same slice with the strides swapped.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major rows `rs` apart.
    pub fn rows(data: &'a [f32], rs: usize) -> View<'a> {
        View { data, rs, cs: 1 }
    }

    /// The transpose of row-major rows `rs` apart.
    pub fn t(data: &'a [f32], rs: usize) -> View<'a> {
        View { data, rs: 1, cs: rs }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || self.data.len() > (rows - 1) * self.rs + (cols - 1) * self.cs
    }
}

/// `dst = a · b` (`accumulate`: `dst += a · b`) for `a` of `m × k` and `b` of `k × n`, `dst`
/// row-major with rows `dst_rs` apart, by the `gemm` crate on every thread. The training
/// products (forward, and the backward's `g_x = g_y·W` and `g_W += g_yᵀ·x`) are all this one
/// call with different views.
#[allow(clippy::too_many_arguments)]
pub fn gemm_views(m: usize, n: usize, k: usize, dst: &mut [f32], dst_rs: usize, a: View, b: View, accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.fits(m, k) && b.fits(k, n), "gemm: an operand is too short");
    assert!(dst.len() >= (m - 1) * dst_rs + n, "gemm: destination too short");
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| dst[i * dst_rs..i * dst_rs + n].fill(0.0));
        }
        return;
    }
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// The `gemm` crate's blocked f32 product `y[i, j] = Σ_k x[i, k] · w[j, k]` of `n` rows against
/// a contiguous `m × k` matrix (`Parallelism::None`: on the calling thread, for callers that run
/// many products in parallel themselves).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    x: &[f32],
    n: usize,
    x_rs: usize,
    w: &[f32],
    m: usize,
    k: usize,
    y: &mut [f32],
    y_rs: usize,
    par: gemm::Parallelism,
) {
    assert!(n > 0 && x.len() >= (n - 1) * x_rs + k && w.len() >= m * k && y.len() >= (n - 1) * y_rs + m);
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            y.as_mut_ptr(),
            1,
            y_rs as isize,
            false,
            x.as_ptr(),
            1,
            x_rs as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Adds `bias` to each of the `n` rows of `y`.
pub fn add_bias(y: &mut [f32], n: usize, y_rs: usize, bias: &[f32]) {
    for i in 0..n {
        y[i * y_rs..i * y_rs + bias.len()].iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    }
}

fn widen_parallel(s: &Store) -> Vec<f32> {
    let mut out = vec![0.0f32; s.len()];
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| s.read_f32(i << 16, c));
    out
}

fn gemv(x: &[f32], n: usize, x_rs: usize, w: &Matrix, y: &mut [f32], y_rs: usize) {
    let (m, k) = (w.rows, w.cols);
    if let Store::I8(q) = &w.data {
        return super::q8::gemv(x, n, x_rs, q, m, k, y, y_rs);
    }
    let tasks = rayon::current_num_threads() * 4;
    let block = m.div_ceil(tasks).max(16);
    let yp = SendPtr(y.as_mut_ptr());
    let xp = x.as_ptr() as usize;
    super::pool::parallel_for(m.div_ceil(block), &move |b| {
        let (r0, r1) = (b * block, ((b + 1) * block).min(m));
        let xp = xp as *const f32;
        match &w.data {
            Store::F32(v) => dispatch!(gemv_rows::<f32>(v.as_ptr(), k, r0, r1, xp, n, x_rs, yp.get(), y_rs)),
            Store::BF16(v) => {
                dispatch!(gemv_rows::<half::bf16>(v.as_ptr(), k, r0, r1, xp, n, x_rs, yp.get(), y_rs))
            }
            Store::F16(v) => {
                dispatch!(gemv_rows::<half::f16>(v.as_ptr(), k, r0, r1, xp, n, x_rs, yp.get(), y_rs))
            }
            Store::I8(_) => unreachable!("8-bit matrices take q8::gemv"),
        }
    });
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_rows<S: Simd, T: Elem>(
    w: *const T,
    k: usize,
    r0: usize,
    r1: usize,
    x: *const f32,
    n: usize,
    x_rs: usize,
    y: *mut f32,
    y_rs: usize,
) {
    for r in r0..r1 {
        let wr = w.add(r * k);
        for i in 0..n {
            *y.add(i * y_rs + r) = dot::<S, T>(wr, x.add(i * x_rs), k);
        }
    }
}

/// `Σ_i w[i]·x[i]` with four independent accumulators to hide FMA latency.
#[inline(always)]
pub(crate) unsafe fn dot<S: Simd, T: Elem>(w: *const T, x: *const f32, k: usize) -> f32 {
    let l = S::LANES;
    let (mut a0, mut a1, mut a2, mut a3) = (S::splat(0.0), S::splat(0.0), S::splat(0.0), S::splat(0.0));
    let mut i = 0;
    while i + 4 * l <= k {
        prefetch_ahead(w.wrapping_add(i));
        a0 = S::fma(T::load::<S>(w.add(i)), S::load(x.add(i)), a0);
        a1 = S::fma(T::load::<S>(w.add(i + l)), S::load(x.add(i + l)), a1);
        a2 = S::fma(T::load::<S>(w.add(i + 2 * l)), S::load(x.add(i + 2 * l)), a2);
        a3 = S::fma(T::load::<S>(w.add(i + 3 * l)), S::load(x.add(i + 3 * l)), a3);
        i += 4 * l;
    }
    while i + l <= k {
        a0 = S::fma(T::load::<S>(w.add(i)), S::load(x.add(i)), a0);
        i += l;
    }
    let mut s = S::reduce_add(S::add(S::add(a0, a1), S::add(a2, a3)));
    while i < k {
        s += (*w.add(i)).to_f32() * *x.add(i);
        i += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    /// Three sequences stacked in one product give each one the bits it gets alone, for thin
    /// and wide matrices, short and long runs, on both sides of the GEMM's size thresholds.
    #[test]
    fn stacked_sequences_equal_each_alone() {
        for dtype in [DType::F32, DType::BF16] {
            for (m, k) in [(20, 128), (36, 600), (64, 128), (65, 48), (80, 1536), (200, 768), (1536, 64)] {
                let w: Vec<f32> = (0..m * k).map(|i| (i * 7919 % 1000) as f32 / 1000.0 - 0.5).collect();
                let w = Matrix::new(m, k, Store::from_f32(w, dtype));
                for len in [2, 5, 7, 12, 33, 40, 65, 100] {
                    let x: Vec<f32> = (0..3 * len * k).map(|i| (i * 104729 % 997) as f32 / 997.0 - 0.5).collect();
                    let mut all = vec![0.0f32; 3 * len * m];
                    matmul_t(&x, Rows::Positions { seqs: 3, len }, k, &w, &mut all, m);
                    for s in 0..3 {
                        let mut one = vec![0.0f32; len * m];
                        matmul_t(&x[s * len * k..], Rows::Positions { seqs: 1, len }, k, &w, &mut one, m);
                        assert!(one == all[s * len * m..(s + 1) * len * m], "{dtype} {m}×{k}, run {len}, sequence {s}");
                    }
                }
            }
        }
    }
}
