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
use rayon::prelude::*;
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

/// `A = −exp(A_log)` from the checkpoint's `(E, N)` `A_log`, transposed to the scan's `(N, E)`.
pub fn a_from_log(a_log: &[f32], e: usize, n: usize) -> Vec<f32> {
    let mut a = vec![0.0f32; n * e];
    for c in 0..e {
        for k in 0..n {
            a[k * e + c] = -a_log[c * n + k].exp();
        }
    }
    a
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

/// Gradients of one scan, from [`selective_scan_backward`].
pub struct ScanGrads<'a> {
    /// `∂/∂u` and `∂/∂dt` (before the bias), `l × e` contiguous; written.
    pub u: &'a mut [f32],
    pub dt: &'a mut [f32],
    /// `∂/∂z` at `z`'s positions (`t·rs + c`); written. Given when the scan has a gate.
    pub z: Option<(&'a mut [f32], usize)>,
    /// `∂/∂B`, `∂/∂C`, `l × n` contiguous; written.
    pub b: &'a mut [f32],
    pub c: &'a mut [f32],
    /// `∂/∂A` (`(N, E)` like `a`), `∂/∂D`, `∂/∂dt_bias`; added to.
    pub a: &'a mut [f32],
    pub d: &'a mut [f32],
    pub dt_bias: &'a mut [f32],
}

/// Steps whose states the backward recomputes and holds at once (per channel).
const BACKWARD_CHUNK: usize = 64;

/// Channel ranges of the backward, each with its own partial `∂/∂B`, `∂/∂C` (summed over
/// channels): a constant, so the sums' order does not depend on the thread count.
const BACKWARD_PARTS: usize = 8;

/// Backward of [`selective_scan`] over one sequence that started from a zero state, given the
/// output gradient `g_y` (`l × e`, contiguous). Per channel, a forward pass keeps the state at
/// every `BACKWARD_CHUNK`-th step; then chunk by chunk from the end, the chunk's states are
/// recomputed from its entry state and the recurrence runs backwards
/// (`gh_t = C_t·g_y_t + exp(Δ_{t+1}A)·gh_{t+1}`; see training-spec §2), so memory is
/// `O(L·N / BACKWARD_CHUNK)` per channel, never `L·E·N`. The output before the gate is
/// recomputed from the states. Costs ~3× the forward's exponentials.
pub fn selective_scan_backward(inp: &ScanInputs, l: usize, e: usize, n: usize, g_y: &[f32], g: ScanGrads) {
    assert!(n <= MAX_D_STATE && g_y.len() >= l * e && g.u.len() >= l * e && g.dt.len() >= l * e);
    assert!(g.b.len() >= l * n && g.c.len() >= l * n && g.a.len() == n * e && g.d.len() == e && g.dt_bias.len() == e);
    assert_eq!(inp.z.is_some(), g.z.is_some(), "a gated scan needs ∂/∂z and only it");
    let ptr = |s: &mut [f32]| SendPtr(s.as_mut_ptr());
    let (gu, gdt, ga, gd, gbias) = (ptr(g.u), ptr(g.dt), ptr(g.a), ptr(g.d), ptr(g.dt_bias));
    let gz = g.z.map(|(z, rs)| (SendPtr(z.as_mut_ptr()), rs));
    let per = e.div_ceil(BACKWARD_PARTS);
    let parts: Vec<Vec<f32>> = (0..e.div_ceil(per))
        .into_par_iter()
        .map(|p| {
            // ∂/∂B then ∂/∂C of this part's channels.
            let mut bc = vec![0.0f32; 2 * l * n];
            for ch in p * per..((p + 1) * per).min(e) {
                // Each channel writes only its own columns of the outputs.
                unsafe { channel_backward(inp, l, e, n, ch, g_y, &mut bc, [gu, gdt, ga, gd, gbias], gz) };
            }
            bc
        })
        .collect();
    g.b[..l * n].fill(0.0);
    g.c[..l * n].fill(0.0);
    for part in &parts {
        g.b.iter_mut().zip(&part[..l * n]).for_each(|(a, p)| *a += p);
        g.c.iter_mut().zip(&part[l * n..]).for_each(|(a, p)| *a += p);
    }
}

/// One channel of [`selective_scan_backward`]; `bc` holds the part's `∂/∂B` and `∂/∂C`.
#[allow(clippy::too_many_arguments)]
unsafe fn channel_backward(
    inp: &ScanInputs,
    l: usize,
    e: usize,
    n: usize,
    ch: usize,
    g_y: &[f32],
    bc: &mut [f32],
    [gu, gdt, ga, gd, gbias]: [SendPtr<f32>; 5],
    gz: Option<(SendPtr<f32>, usize)>,
) {
    let a: Vec<f32> = (0..n).map(|k| inp.a[k * e + ch]).collect();
    let (bias, d) = (inp.dt_bias[ch], inp.d[ch]);
    let u = |t: usize| inp.u[t * inp.u_rs + ch];
    let raw = |t: usize| inp.dt[t * inp.dt_rs + ch] + bias;
    let b = |t: usize, k: usize| inp.b[t * inp.bc_rs + k];
    let c = |t: usize, k: usize| inp.c[t * inp.bc_rs + k];
    let step = |t: usize, from: &[f32], to: &mut [f32]| {
        let delta = super::simd::softplus_f32(raw(t));
        for k in 0..n {
            to[k] = (delta * a[k]).exp() * from[k] + delta * u(t) * b(t, k);
        }
    };
    let chunks = l.div_ceil(BACKWARD_CHUNK);
    let mut starts = vec![0.0f32; chunks * n];
    let mut h = vec![0.0f32; 2 * n];
    for t in 0..l {
        if t % BACKWARD_CHUNK == 0 {
            starts[t / BACKWARD_CHUNK * n..][..n].copy_from_slice(&h[..n]);
        }
        let (cur, next) = h.split_at_mut(n);
        step(t, cur, next);
        cur.copy_from_slice(next);
    }
    let (gb, gc) = bc.split_at_mut(l * n);
    let (mut gh, mut g_a) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (mut g_d, mut g_bias) = (0.0f32, 0.0f32);
    // hs[j] is the state before step t0 + j of the chunk.
    let mut hs = vec![0.0f32; (BACKWARD_CHUNK + 1) * n];
    for k0 in (0..chunks).rev() {
        let (t0, t1) = (k0 * BACKWARD_CHUNK, ((k0 + 1) * BACKWARD_CHUNK).min(l));
        hs[..n].copy_from_slice(&starts[k0 * n..(k0 + 1) * n]);
        for t in t0..t1 {
            let (prev, next) = hs[(t - t0) * n..].split_at_mut(n);
            step(t, prev, &mut next[..n]);
        }
        for t in (t0..t1).rev() {
            let (prev, cur) = (&hs[(t - t0) * n..][..n], &hs[(t - t0 + 1) * n..][..n]);
            let (delta, ut) = (super::simd::softplus_f32(raw(t)), u(t));
            let y = (0..n).map(|k| c(t, k) * cur[k]).sum::<f32>() + d * ut;
            let mut gy = g_y[t * e + ch];
            if let (Some((z, z_rs)), Some((gz, gz_rs))) = (inp.z, gz) {
                let zt = z[t * z_rs + ch];
                let s = 1.0 / (1.0 + (-zt).exp());
                *gz.get().add(t * gz_rs + ch) = gy * y * s * (1.0 + zt * (1.0 - s));
                gy *= zt * s;
            }
            let (mut g_u, mut g_delta) = (d * gy, 0.0f32);
            g_d += gy * ut;
            for k in 0..n {
                gh[k] += c(t, k) * gy;
                gc[t * n + k] += gy * cur[k];
                let decay = (delta * a[k]).exp();
                gb[t * n + k] += gh[k] * delta * ut;
                g_u += gh[k] * delta * b(t, k);
                g_delta += gh[k] * (a[k] * decay * prev[k] + b(t, k) * ut);
                g_a[k] += gh[k] * delta * decay * prev[k];
                gh[k] *= decay;
            }
            let g_raw = g_delta / (1.0 + (-raw(t)).exp());
            *gu.get().add(t * e + ch) = g_u;
            *gdt.get().add(t * e + ch) = g_raw;
            g_bias += g_raw;
        }
    }
    for (k, g) in g_a.iter().enumerate() {
        *ga.get().add(k * e + ch) += g;
    }
    *gd.get().add(ch) += g_d;
    *gbias.get().add(ch) += g_bias;
}
