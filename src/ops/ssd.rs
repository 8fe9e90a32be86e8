//! Mamba-2 state-space duality (SSD): the chunked form of the scalar-decay scan.
//!
//! Per head h (group g = h / heads-per-group) with state S ∈ R^{N×P}:
//!   S ← exp(da_t)·S + B_t ⊗ (dt_t·x_t),   y_t = Sᵀ C_t + D·x_t.
//! Time is cut into blocks of Q; within a block with Λ the inclusive cumsum of da:
//!   y_i = exp(Λ_i)·S_inᵀ C_i + Σ_{j≤i} (C_i·B_j)·exp(Λ_i − Λ_j)·dt_j·x_j + D·x_i
//!   S_out = exp(Λ_end)·S_in + Σ_j B_j ⊗ exp(Λ_end − Λ_j)·dt_j·x_j
//! (the block size changes rounding only). Heads run in parallel, blocks sequentially. Per
//! token and head: Q·N/2 + Q·P/2 MACs for the intra-block "attention" and 2·N·P for the state
//! in and out; bytes: x, y (P each), B, C (N each). Blocks of 64 keep the scratch in L1.
//! State layout is `(H, N, P)` so that every inner loop runs over contiguous P or Q.

use super::matmul::SendPtr;
use super::simd::{exp, Scalar, Simd};
use crate::dispatch;
use rayon::prelude::*;

/// Block length used when the caller has no preference.
pub const DEFAULT_BLOCK: usize = 64;

/// Inputs of one SSD pass over `l` time steps; every `*_rs` is a row stride.
pub struct SsdInputs<'a> {
    /// `x[t·x_rs + h·P + p]`.
    pub x: &'a [f32],
    pub x_rs: usize,
    /// Input scale `dt[t·dt_rs + h]` and log-decay `da[t·dt_rs + h]` (= dt·A_h in the model).
    pub dt: &'a [f32],
    pub da: &'a [f32],
    pub dt_rs: usize,
    /// `B[t·bc_rs + g·N + n]`, `C[t·bc_rs + g·N + n]`.
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub bc_rs: usize,
    /// Skip connection: one value per head (`H`) or per channel (`H·P`).
    pub d: Option<&'a [f32]>,
}

/// Sizes of an SSD problem.
#[derive(Clone, Copy, Debug)]
pub struct SsdDims {
    pub heads: usize,
    pub headdim: usize,
    pub groups: usize,
    pub d_state: usize,
    pub block: usize,
}

/// Runs SSD over `l` steps, updating `state` (`(H, N, P)`) and writing `y[t·y_rs + h·P + p]`.
pub fn ssd(inp: &SsdInputs, l: usize, dims: SsdDims, state: &mut [f32], y: &mut [f32], y_rs: usize) {
    let SsdDims { heads, headdim: p, groups, d_state: n, block } = dims;
    assert!(groups > 0 && heads % groups == 0 && block > 0);
    assert_eq!(state.len(), heads * n * p);
    if let Some(d) = inp.d {
        assert!(d.len() == heads || d.len() == heads * p);
    }
    if l == 0 {
        return;
    }
    assert!(y.len() >= (l - 1) * y_rs + heads * p);
    let sp = SendPtr(state.as_mut_ptr());
    let yp = SendPtr(y.as_mut_ptr());
    let min_len = if l == 1 { heads.div_ceil(2 * rayon::current_num_threads()) } else { 1 };
    (0..heads).into_par_iter().with_min_len(min_len).for_each(|h| {
        let (sp, yp) = (sp, yp);
        let st = unsafe { sp.0.add(h * n * p) };
        dispatch!(ssd_head(inp, l, dims, h, st, yp.0, y_rs));
    });
}

#[inline(always)]
unsafe fn ssd_head<S: Simd>(
    inp: &SsdInputs,
    l: usize,
    dims: SsdDims,
    h: usize,
    st: *mut f32,
    y: *mut f32,
    y_rs: usize,
) {
    let SsdDims { heads, headdim: p, groups, d_state: n, block } = dims;
    let g = h / (heads / groups);
    let q_max = block.min(l);
    let mut bt = vec![0.0f32; n * q_max]; // B of the block, transposed to (N, Q)
    let mut cum = vec![0.0f32; q_max];
    let mut dtc = vec![0.0f32; q_max];
    let mut wrow = vec![0.0f32; q_max];
    let mut yrow = vec![0.0f32; p];
    let d_of = |pp: usize| match inp.d {
        Some(d) if d.len() == heads => d[h],
        Some(d) => d[h * p + pp],
        None => 0.0,
    };
    let xp = |t: usize| inp.x.as_ptr().add(t * inp.x_rs + h * p);
    let mut t0 = 0;
    while t0 < l {
        let q = q_max.min(l - t0);
        let mut s = 0.0f32;
        for i in 0..q {
            s += inp.da[(t0 + i) * inp.dt_rs + h];
            cum[i] = s;
            dtc[i] = inp.dt[(t0 + i) * inp.dt_rs + h];
            let bj = inp.b.as_ptr().add((t0 + i) * inp.bc_rs + g * n);
            for k in 0..n {
                bt[k * q + i] = *bj.add(k);
            }
        }
        for i in 0..q {
            let ci = inp.c.as_ptr().add((t0 + i) * inp.bc_rs + g * n);
            // wrow[j] = (C_i·B_j)·exp(Λ_i − Λ_j)·dt_j for j ≤ i
            let w = wrow.as_mut_ptr();
            w.write_bytes(0, i + 1);
            for k in 0..n {
                axpy::<S>(w, *ci.add(k), bt.as_ptr().add(k * q), i + 1);
            }
            decay_weights::<S>(w, cum.as_ptr(), dtc.as_ptr(), cum[i], i + 1);
            // off-diagonal: exp(Λ_i)·Sᵀ C_i
            let yr = yrow.as_mut_ptr();
            yr.write_bytes(0, p);
            for k in 0..n {
                axpy::<S>(yr, *ci.add(k), st.add(k * p), p);
            }
            scale::<S>(yr, cum[i].exp(), p);
            for j in 0..=i {
                axpy::<S>(yr, wrow[j], xp(t0 + j), p);
            }
            let xi = xp(t0 + i);
            let out = y.add((t0 + i) * y_rs + h * p);
            for pp in 0..p {
                *out.add(pp) = yrow[pp] + d_of(pp) * *xi.add(pp);
            }
        }
        // S_out = exp(Λ_end)·S_in + Σ_j B_j ⊗ exp(Λ_end − Λ_j)·dt_j·x_j
        let end = cum[q - 1];
        wrow[..q].fill(1.0);
        decay_weights::<S>(wrow.as_mut_ptr(), cum.as_ptr(), dtc.as_ptr(), end, q);
        let dend = end.exp();
        for k in 0..n {
            let sk = st.add(k * p);
            scale::<S>(sk, dend, p);
            for j in 0..q {
                axpy::<S>(sk, bt[k * q + j] * wrow[j], xp(t0 + j), p);
            }
        }
        t0 += q;
    }
}

/// `w[j] ← w[j]·exp(min(λ − cum[j], 0))·dt[j]` for j < len (the clamp guards rounding, as the
/// official kernels do).
#[inline(always)]
unsafe fn decay_weights<S: Simd>(w: *mut f32, cum: *const f32, dt: *const f32, lambda: f32, len: usize) {
    let mut j = 0;
    if S::LANES > 1 {
        let lv = S::splat(lambda);
        while j + S::LANES <= len {
            let e = exp::<S>(S::min(S::sub(lv, S::load(cum.add(j))), S::splat(0.0)));
            S::store(w.add(j), S::mul(S::mul(S::load(w.add(j)), e), S::load(dt.add(j))));
            j += S::LANES;
        }
    }
    while j < len {
        let e = exp::<Scalar>((lambda - *cum.add(j)).min(0.0));
        *w.add(j) *= e * *dt.add(j);
        j += 1;
    }
}

/// `y[i] += a·x[i]` for i < len.
#[inline(always)]
pub(crate) unsafe fn axpy<S: Simd>(y: *mut f32, a: f32, x: *const f32, len: usize) {
    let av = S::splat(a);
    let mut i = 0;
    while i + S::LANES <= len {
        S::store(y.add(i), S::fma(av, S::load(x.add(i)), S::load(y.add(i))));
        i += S::LANES;
    }
    while i < len {
        *y.add(i) = a.mul_add(*x.add(i), *y.add(i));
        i += 1;
    }
}

/// `y[i] *= a` for i < len.
#[inline(always)]
unsafe fn scale<S: Simd>(y: *mut f32, a: f32, len: usize) {
    let av = S::splat(a);
    let mut i = 0;
    while i + S::LANES <= len {
        S::store(y.add(i), S::mul(av, S::load(y.add(i))));
        i += S::LANES;
    }
    while i < len {
        *y.add(i) *= a;
        i += 1;
    }
}
