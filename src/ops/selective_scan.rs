//! Mamba-1 selective scan (S6), prefill and single-step alike.
//!
//! Per channel c with state h_c ∈ R^N:
//! ```text
//!   Δ = softplus(dt[t,c] + dt_bias[c]),  h_c ← exp(Δ·A[c,:]) ⊙ h_c + (Δ·u[t,c])·B_t,
//!   y[t,c] = ⟨h_c, C_t⟩ + D[c]·u[t,c],   y ← y·silu(z[t,c]) when z is given.
//! ```
//! Strategy: channels are independent, so a vector holds LANES neighbouring channels and the
//! N states of a channel block live in registers/L1 while time runs sequentially; channel
//! blocks run in parallel. Costs L·E·N exponentials and 3·L·E·N FLOPs more; reads u, dt, z
//! (L·E each) and B, C (L·N) once, writes y (L·E). State layout is `(N, E)` so that a
//! channel block's state for one n is one contiguous vector.

use super::matmul::SendPtr;
use super::simd::{exp, silu, softplus, Scalar, Simd};
use crate::dispatch;
use std::mem::MaybeUninit;

/// Largest supported state size (the official CUDA kernel's limit).
pub const MAX_D_STATE: usize = 256;

/// Inputs of one scan over `l` time steps and `e` channels; every `*_rs` is a row stride
/// (elements between consecutive time steps).
pub struct ScanInputs<'a> {
    /// Convolved input `u[t·u_rs + c]`.
    pub u: &'a [f32],
    pub u_rs: usize,
    /// Pre-bias time step `dt[t·dt_rs + c]`.
    pub dt: &'a [f32],
    pub dt_rs: usize,
    pub dt_bias: &'a [f32],
    /// `A = −exp(A_log)`, transposed to `(N, E)`: `a[n·e + c]`.
    pub a: &'a [f32],
    /// `B[t·bc_rs + n]`, `C[t·bc_rs + n]` (they share a stride: both are slices of x_proj's output).
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub bc_rs: usize,
    pub d: &'a [f32],
    /// Gate `z[t·z_rs + c]`.
    pub z: Option<(&'a [f32], usize)>,
}

/// Runs the scan, reading and updating `state` (`(N, E)`) and writing `y` (`l × e`, contiguous).
pub fn selective_scan(inp: &ScanInputs, l: usize, e: usize, n: usize, state: &mut [f32], y: &mut [f32]) {
    assert!(n <= MAX_D_STATE, "d_state {n} exceeds {MAX_D_STATE}");
    assert_eq!(state.len(), n * e);
    assert!(y.len() >= l * e);
    assert!(inp.a.len() == n * e && inp.d.len() == e && inp.dt_bias.len() == e);
    if l == 0 {
        return;
    }
    let sp = SendPtr(state.as_mut_ptr());
    let yp = SendPtr(y.as_mut_ptr());
    // Channel blocks of a fixed width (the widest vector), whatever instruction set runs them,
    // so the partition can never disagree with the kernel's vector length.
    let blocks = e.div_ceil(BLOCK);
    // One task per channel block for long inputs; a few coarse tasks for a decode step.
    let per_task = if l == 1 { blocks.div_ceil(2 * rayon::current_num_threads()) } else { 1 };
    super::pool::parallel_for(blocks.div_ceil(per_task), &|task| {
        let c0 = task * per_task * BLOCK;
        let c1 = ((task + 1) * per_task * BLOCK).min(e);
        dispatch!(scan_range(inp, l, e, n, c0, c1, sp.get(), yp.get()));
    });
}

/// Channels per parallel block.
const BLOCK: usize = 16;

/// Channels `c0..c1`: whole vectors of `S`, then one channel at a time.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn scan_range<S: Simd>(
    inp: &ScanInputs,
    l: usize,
    e: usize,
    n: usize,
    c0: usize,
    c1: usize,
    state: *mut f32,
    y: *mut f32,
) {
    let mut c = c0;
    while c + S::LANES <= c1 {
        scan_block::<S>(inp, l, e, n, c, state, y);
        c += S::LANES;
    }
    for c in c..c1 {
        scan_block::<Scalar>(inp, l, e, n, c, state, y);
    }
}

#[inline(always)]
unsafe fn scan_block<S: Simd>(inp: &ScanInputs, l: usize, e: usize, n: usize, c0: usize, state: *mut f32, y: *mut f32) {
    // Only the first n entries are used; leaving the rest uninitialised spares a 2·16 KiB
    // memset per call, which a decode step (l = 1) would otherwise pay for every block.
    let mut h: [MaybeUninit<S::V>; MAX_D_STATE] = [const { MaybeUninit::uninit() }; MAX_D_STATE];
    let mut a: [MaybeUninit<S::V>; MAX_D_STATE] = [const { MaybeUninit::uninit() }; MAX_D_STATE];
    for k in 0..n {
        h[k].write(S::load(state.add(k * e + c0)));
        a[k].write(S::load(inp.a.as_ptr().add(k * e + c0)));
    }
    let bias = S::load(inp.dt_bias.as_ptr().add(c0));
    let d = S::load(inp.d.as_ptr().add(c0));
    for t in 0..l {
        let u = S::load(inp.u.as_ptr().add(t * inp.u_rs + c0));
        let delta = softplus::<S>(S::add(S::load(inp.dt.as_ptr().add(t * inp.dt_rs + c0)), bias));
        let du = S::mul(delta, u);
        let bt = inp.b.as_ptr().add(t * inp.bc_rs);
        let ct = inp.c.as_ptr().add(t * inp.bc_rs);
        let mut acc = S::mul(d, u);
        for k in 0..n {
            let da = exp::<S>(S::mul(delta, a[k].assume_init()));
            let hk = S::fma(da, h[k].assume_init(), S::mul(du, S::splat(*bt.add(k))));
            h[k].write(hk);
            acc = S::fma(hk, S::splat(*ct.add(k)), acc);
        }
        if let Some((z, z_rs)) = inp.z {
            acc = S::mul(acc, silu::<S>(S::load(z.as_ptr().add(t * z_rs + c0))));
        }
        S::store(y.add(t * e + c0), acc);
    }
    for (k, hk) in h.iter().enumerate().take(n) {
        S::store(state.add(k * e + c0), hk.assume_init());
    }
}
