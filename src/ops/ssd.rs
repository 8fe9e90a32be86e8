//! Mamba-2 state-space duality (SSD): the chunked form of the scalar-decay scan.
//!
//! Per head h (group g = h / heads-per-group) with state S ∈ R^{N×P}:
//!   S ← exp(da_t)·S + B_t ⊗ (dt_t·x_t),   y_t = Sᵀ C_t + D·x_t.
//! Time is cut into blocks of Q; within a block with Λ the inclusive cumsum of da:
//!   y_i = exp(Λ_i)·S_inᵀ C_i + Σ_{j≤i} (C_i·B_j)·exp(Λ_i − Λ_j)·dt_j·x_j + D·x_i
//!   S_out = exp(Λ_end)·S_in + Σ_j B_j ⊗ exp(Λ_end − Λ_j)·dt_j·x_j
//! (the block size changes rounding only). Heads run in parallel, blocks sequentially. Per
//! token and head: Q·N/2 + Q·P/2 MACs for the intra-block "attention" and 2·N·P for the state
//! in and out; bytes: x, y (P each), B, C (N each). On the CPU the in/out terms dominate and
//! short blocks (16, measured fastest against 32/64/128) keep the intra-block work small.
//! State layout is `(H, N, P)` so that every inner loop runs over contiguous P or Q.

use super::matmul::SendPtr;
use super::simd::{exp, Scalar, Simd};
use crate::dispatch;

/// Block length used when the caller has no preference.
pub const DEFAULT_BLOCK: usize = 16;

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

impl SsdInputs<'_> {
    /// The skip coefficient D for head `h`, channel `pp` of `p` (0 without D).
    fn skip(&self, heads: usize, p: usize, h: usize, pp: usize) -> f32 {
        match self.d {
            Some(d) if d.len() == heads => d[h],
            Some(d) => d[h * p + pp],
            None => 0.0,
        }
    }
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
    let per_task = if l == 1 { heads.div_ceil(2 * rayon::current_num_threads()) } else { 1 };
    super::pool::parallel_for(heads.div_ceil(per_task), &|task| {
        for h in task * per_task..((task + 1) * per_task).min(heads) {
            let st = unsafe { sp.get().add(h * n * p) };
            if l == 1 {
                dispatch!(ssd_step_head(inp, dims, h, st, yp.get()));
            } else {
                dispatch!(ssd_head(inp, l, dims, h, st, yp.get(), y_rs));
            }
        }
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
    let mut coef = vec![0.0f32; q_max];
    let d_of = |pp: usize| inp.skip(heads, p, h, pp);
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
        let x0 = xp(t0);
        for i in 0..q {
            let ci = inp.c.as_ptr().add((t0 + i) * inp.bc_rs + g * n);
            // wrow[j] = (C_i·B_j)·exp(Λ_i − Λ_j)·dt_j for j ≤ i
            let w = wrow.as_mut_ptr();
            w.write_bytes(0, i + 1);
            acc_rows::<S>(w, i + 1, ci, bt.as_ptr(), q, n);
            decay_weights::<S>(w, cum.as_ptr(), dtc.as_ptr(), cum[i], i + 1);
            // off-diagonal exp(Λ_i)·Sᵀ C_i, then the intra-block terms
            let yr = yrow.as_mut_ptr();
            yr.write_bytes(0, p);
            acc_rows::<S>(yr, p, ci, st, p, n);
            scale::<S>(yr, cum[i].exp(), p);
            acc_rows::<S>(yr, p, w, x0, inp.x_rs, i + 1);
            let xi = xp(t0 + i);
            let out = y.add((t0 + i) * y_rs + h * p);
            for pp in 0..p {
                *out.add(pp) = *yr.add(pp) + d_of(pp) * *xi.add(pp);
            }
        }
        // S_out = exp(Λ_end)·S_in + Σ_j B_j ⊗ exp(Λ_end − Λ_j)·dt_j·x_j
        let end = cum[q - 1];
        wrow[..q].fill(1.0);
        decay_weights::<S>(wrow.as_mut_ptr(), cum.as_ptr(), dtc.as_ptr(), end, q);
        let dend = end.exp();
        for k in 0..n {
            for j in 0..q {
                coef[j] = bt[k * q + j] * wrow[j];
            }
            let sk = st.add(k * p);
            scale::<S>(sk, dend, p);
            acc_rows::<S>(sk, p, coef.as_ptr(), x0, inp.x_rs, q);
        }
        t0 += q;
    }
}

/// The recurrent form for one token, in a single pass over the state:
/// `S[k,:] ← exp(da)·S[k,:] + dt·B[k]·x`, `y += C[k]·S[k,:]` (bytes: the N×P state, read and
/// written once).
#[inline(always)]
unsafe fn ssd_step_head<S: Simd>(inp: &SsdInputs, dims: SsdDims, h: usize, st: *mut f32, y: *mut f32) {
    let SsdDims { heads, headdim: p, groups, d_state: n, .. } = dims;
    let g = h / (heads / groups);
    let decay = inp.da[h].exp();
    let dt = inp.dt[h];
    let x = inp.x.as_ptr().add(h * p);
    let b = inp.b.as_ptr().add(g * n);
    let c = inp.c.as_ptr().add(g * n);
    let out = y.add(h * p);
    let d_of = |pp: usize| inp.skip(heads, p, h, pp);
    let dv = S::splat(decay);
    let mut pp = 0;
    while pp + S::LANES <= p {
        let xv = S::load(x.add(pp));
        let mut acc = S::splat(0.0);
        for k in 0..n {
            let sk = st.add(k * p + pp);
            let s = S::fma(dv, S::load(sk), S::mul(S::splat(dt * *b.add(k)), xv));
            S::store(sk, s);
            acc = S::fma(S::splat(*c.add(k)), s, acc);
        }
        S::store(out.add(pp), acc);
        pp += S::LANES;
    }
    for pp in pp..p {
        let mut acc = 0.0f32;
        for k in 0..n {
            let sk = st.add(k * p + pp);
            *sk = decay.mul_add(*sk, dt * *b.add(k) * *x.add(pp));
            acc = (*c.add(k)).mul_add(*sk, acc);
        }
        *out.add(pp) = acc;
    }
    for pp in 0..p {
        *out.add(pp) += d_of(pp) * *x.add(pp);
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

/// `acc[c] += Σ_{j<count} coef[j]·base[j·stride + c]` for c < len, keeping a strip of `acc` in
/// registers while the rows stream by (a small matrix-vector product, register-blocked).
#[inline(always)]
unsafe fn acc_rows<S: Simd>(
    acc: *mut f32,
    len: usize,
    coef: *const f32,
    base: *const f32,
    stride: usize,
    count: usize,
) {
    let l = S::LANES;
    let mut c = 0;
    if l > 1 {
        while c + 4 * l <= len {
            let (mut a0, mut a1, mut a2, mut a3) = (
                S::load(acc.add(c)),
                S::load(acc.add(c + l)),
                S::load(acc.add(c + 2 * l)),
                S::load(acc.add(c + 3 * l)),
            );
            for j in 0..count {
                let k = S::splat(*coef.add(j));
                let r = base.add(j * stride + c);
                a0 = S::fma(k, S::load(r), a0);
                a1 = S::fma(k, S::load(r.add(l)), a1);
                a2 = S::fma(k, S::load(r.add(2 * l)), a2);
                a3 = S::fma(k, S::load(r.add(3 * l)), a3);
            }
            S::store(acc.add(c), a0);
            S::store(acc.add(c + l), a1);
            S::store(acc.add(c + 2 * l), a2);
            S::store(acc.add(c + 3 * l), a3);
            c += 4 * l;
        }
        while c + l <= len {
            let mut a = S::load(acc.add(c));
            for j in 0..count {
                a = S::fma(S::splat(*coef.add(j)), S::load(base.add(j * stride + c)), a);
            }
            S::store(acc.add(c), a);
            c += l;
        }
    }
    for c in c..len {
        let mut a = *acc.add(c);
        for j in 0..count {
            a = (*coef.add(j)).mul_add(*base.add(j * stride + c), a);
        }
        *acc.add(c) = a;
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
