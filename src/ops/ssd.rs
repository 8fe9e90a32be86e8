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
//! short blocks (16: faster than 64/128 when the products ran row by row, no slower than 32
//! as register tiles) keep the intra-block work small.
//! State layout is `(H, N, P)` so that every inner loop runs over contiguous P or Q.

use super::matmul::SendPtr;
use super::simd::{exp, Elem, Scalar, Simd};
use crate::dispatch;
use half::bf16;
use rayon::prelude::*;

/// What a state may be kept in: f32, or bf16 (half the bytes a decode step moves; the
/// official code keeps the state in the model's dtype). Arithmetic is f32 either way.
pub trait StateElem: Elem {
    /// # Safety
    /// As [`Simd`]: `p` valid for `S::LANES` elements, instruction set present.
    unsafe fn store<S: Simd>(p: *mut Self, v: S::V);
    fn from_f32(x: f32) -> Self;
    /// Runs `f` on the `len` values at `p` as f32 (a widened copy, narrowed back after).
    ///
    /// # Safety
    /// `p` valid for `len` elements.
    unsafe fn as_f32(p: *mut Self, len: usize, f: impl FnOnce(*mut f32));
}

impl StateElem for f32 {
    #[inline(always)]
    unsafe fn store<S: Simd>(p: *mut f32, v: S::V) {
        S::store(p, v)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
    unsafe fn as_f32(p: *mut f32, _len: usize, f: impl FnOnce(*mut f32)) {
        f(p)
    }
}

impl StateElem for bf16 {
    #[inline(always)]
    unsafe fn store<S: Simd>(p: *mut bf16, v: S::V) {
        S::store_bf16(p as *mut u16, v)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
    unsafe fn as_f32(p: *mut bf16, len: usize, f: impl FnOnce(*mut f32)) {
        let s = std::slice::from_raw_parts_mut(p, len);
        let mut wide: Vec<f32> = s.iter().map(|v| v.to_f32()).collect();
        f(wide.as_mut_ptr());
        s.iter_mut().zip(&wide).for_each(|(v, &w)| *v = bf16::from_f32(w));
    }
}

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

/// Mamba-2's step sizes and log-decays from the raw `dt` of `rows` rows (`raw[r·raw_rs + h]`):
/// `dt = clamp(softplus(raw + bias), limit)`, `da = dt·A` (both `rows × heads`).
#[allow(clippy::too_many_arguments)]
pub fn discretize(
    raw: &[f32],
    raw_rs: usize,
    rows: usize,
    bias: &[f32],
    a: &[f32],
    limit: (f32, f32),
    dt: &mut [f32],
    da: &mut [f32],
) {
    let heads = bias.len();
    for r in 0..rows {
        for h in 0..heads {
            let v = super::simd::softplus_f32(raw[r * raw_rs + h] + bias[h]).clamp(limit.0, limit.1);
            dt[r * heads + h] = v;
            da[r * heads + h] = v * a[h];
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
/// A bf16 state is rounded once per call: after each decode step, at the end of a prompt.
pub fn ssd<T: StateElem>(inp: &SsdInputs, l: usize, dims: SsdDims, state: &mut [T], y: &mut [f32], y_rs: usize) {
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
                dispatch!(ssd_step_head::<T>(inp, dims, h, st, yp.get()));
            } else {
                let run = |st| dispatch!(ssd_head(inp, l, dims, h, st, yp.get(), y_rs));
                unsafe { T::as_f32(st, n * p, run) };
            }
        }
    });
}

/// Gradients of one SSD pass, from [`ssd_backward`]; every output but `d` is written, at the
/// layout of its input (row strides as in [`SsdInputs`]).
pub struct SsdGrads<'a> {
    pub x: &'a mut [f32],
    pub x_rs: usize,
    pub dt: &'a mut [f32],
    pub da: &'a mut [f32],
    pub dt_rs: usize,
    pub b: &'a mut [f32],
    pub c: &'a mut [f32],
    pub bc_rs: usize,
    /// `∂/∂D`, added to (the shape of `inp.d`).
    pub d: Option<&'a mut [f32]>,
}

/// Steps whose states the backward recomputes and holds at once (per head).
const BACKWARD_CHUNK: usize = 32;

/// Backward of [`ssd`] over one sequence that started from a zero state, given the output
/// gradient `g_y[t·gy_rs + h·P + p]`. Per head, in the recurrent form (the chunked form's
/// result, exactly): a forward pass keeps the state at every `BACKWARD_CHUNK`-th step; then
/// chunk by chunk from the end the chunk's states are recomputed and the state gradient
/// `G_t = C_t ⊗ g_y_t + exp(da_{t+1})·G_{t+1}` runs backwards, giving
/// `g_x_t = D·g_y_t + dt_t·G_tᵀB_t`, `g_B_t = dt_t·G_t x_t`, `g_C_t = S_t g_y_t`,
/// `g_dt_t = B_t·G_t x_t` (the input term) and `g_da_t = exp(da_t)·⟨G_t, S_{t−1}⟩`.
/// 4·N·P multiply-adds per step and head; heads share B and C within a group, so their
/// gradients are summed over the group's heads in head order.
pub fn ssd_backward(inp: &SsdInputs, l: usize, dims: SsdDims, g_y: &[f32], gy_rs: usize, g: SsdGrads) {
    let SsdDims { heads, headdim: p, groups, d_state: n, .. } = dims;
    if l == 0 {
        return;
    }
    assert!(g_y.len() >= (l - 1) * gy_rs + heads * p && g.x.len() >= (l - 1) * g.x_rs + heads * p);
    assert!(g.dt.len() >= (l - 1) * g.dt_rs + heads && g.da.len() >= (l - 1) * g.dt_rs + heads);
    assert!(g.b.len() >= (l - 1) * g.bc_rs + groups * n && g.c.len() >= (l - 1) * g.bc_rs + groups * n);
    let ptr = |s: &mut [f32]| SendPtr(s.as_mut_ptr());
    let (gx, gdt, gda) = (ptr(g.x), ptr(g.dt), ptr(g.da));
    let gd = g.d.map(|d| (d.len(), SendPtr(d.as_mut_ptr())));
    let (g_x_rs, g_dt_rs) = (g.x_rs, g.dt_rs);
    let parts: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let mut bc = vec![0.0f32; 2 * l * n];
            // Each head writes only its own columns of g_x, g_dt, g_da and g_d.
            unsafe { head_backward(inp, l, dims, h, g_y, gy_rs, &mut bc, (gx, g_x_rs), (gdt, gda, g_dt_rs), gd) };
            bc
        })
        .collect();
    for gi in 0..groups {
        for t in 0..l {
            let (rb, rc) = (&mut g.b[t * g.bc_rs + gi * n..][..n], &mut g.c[t * g.bc_rs + gi * n..][..n]);
            rb.fill(0.0);
            rc.fill(0.0);
            for part in &parts[gi * heads / groups..(gi + 1) * heads / groups] {
                rb.iter_mut().zip(&part[t * n..(t + 1) * n]).for_each(|(a, v)| *a += v);
                rc.iter_mut().zip(&part[(l + t) * n..(l + t + 1) * n]).for_each(|(a, v)| *a += v);
            }
        }
    }
}

/// One head of [`ssd_backward`]; `bc` receives its `∂/∂B` (`l × N`) then `∂/∂C`.
#[allow(clippy::too_many_arguments)]
unsafe fn head_backward(
    inp: &SsdInputs,
    l: usize,
    dims: SsdDims,
    h: usize,
    g_y: &[f32],
    gy_rs: usize,
    bc: &mut [f32],
    (gx, gx_rs): (SendPtr<f32>, usize),
    (gdt, gda, gdt_rs): (SendPtr<f32>, SendPtr<f32>, usize),
    gd: Option<(usize, SendPtr<f32>)>,
) {
    let SsdDims { heads, headdim: p, groups, d_state: n, .. } = dims;
    let g = h / (heads / groups);
    let np = n * p;
    let x = |t: usize| &inp.x[t * inp.x_rs + h * p..][..p];
    let b = |t: usize| &inp.b[t * inp.bc_rs + g * n..][..n];
    let c = |t: usize| &inp.c[t * inp.bc_rs + g * n..][..n];
    let (dt, da) = (|t: usize| inp.dt[t * inp.dt_rs + h], |t: usize| inp.da[t * inp.dt_rs + h]);
    let step = |t: usize, from: &[f32], to: &mut [f32]| {
        let (ea, xt, bt, dtt) = (da(t).exp(), x(t), b(t), dt(t));
        for k in 0..n {
            for pp in 0..p {
                to[k * p + pp] = ea * from[k * p + pp] + bt[k] * dtt * xt[pp];
            }
        }
    };
    let chunks = l.div_ceil(BACKWARD_CHUNK);
    let mut starts = vec![0.0f32; chunks * np];
    let mut s = vec![0.0f32; 2 * np];
    for t in 0..l {
        if t % BACKWARD_CHUNK == 0 {
            starts[t / BACKWARD_CHUNK * np..][..np].copy_from_slice(&s[..np]);
        }
        let (cur, next) = s.split_at_mut(np);
        step(t, cur, next);
        cur.copy_from_slice(next);
    }
    let (gb, gc) = bc.split_at_mut(l * n);
    let mut gs = vec![0.0f32; np];
    let mut gxt = vec![0.0f32; p];
    let mut states = vec![0.0f32; (BACKWARD_CHUNK + 1) * np];
    for k0 in (0..chunks).rev() {
        let (t0, t1) = (k0 * BACKWARD_CHUNK, ((k0 + 1) * BACKWARD_CHUNK).min(l));
        states[..np].copy_from_slice(&starts[k0 * np..(k0 + 1) * np]);
        for t in t0..t1 {
            let (prev, next) = states[(t - t0) * np..].split_at_mut(np);
            step(t, prev, &mut next[..np]);
        }
        for t in (t0..t1).rev() {
            let (prev, cur) = (&states[(t - t0) * np..][..np], &states[(t - t0 + 1) * np..][..np]);
            let (gyt, xt, bt, ct, dtt) = (&g_y[t * gy_rs + h * p..][..p], x(t), b(t), c(t), dt(t));
            for pp in 0..p {
                gxt[pp] = inp.skip(heads, p, h, pp) * gyt[pp];
            }
            if let Some((len, gd)) = gd {
                for pp in 0..p {
                    *gd.get().add(if len == heads { h } else { h * p + pp }) += gyt[pp] * xt[pp];
                }
            }
            let (mut g_dt, mut g_da) = (0.0f32, 0.0f32);
            for k in 0..n {
                let (sk, gk, pk) = (&cur[k * p..][..p], &mut gs[k * p..][..p], &prev[k * p..][..p]);
                let mut g_c = 0.0f32;
                let mut gx_k = 0.0f32;
                for pp in 0..p {
                    g_c += gyt[pp] * sk[pp];
                    gk[pp] += ct[k] * gyt[pp];
                    gxt[pp] += dtt * bt[k] * gk[pp];
                    gx_k += gk[pp] * xt[pp];
                    g_da += gk[pp] * pk[pp];
                }
                gc[t * n + k] = g_c;
                gb[t * n + k] = dtt * gx_k;
                g_dt += bt[k] * gx_k;
            }
            let ea = da(t).exp();
            gs.iter_mut().for_each(|v| *v *= ea);
            std::ptr::copy_nonoverlapping(gxt.as_ptr(), gx.get().add(t * gx_rs + h * p), p);
            *gdt.get().add(t * gdt_rs + h) = g_dt;
            *gda.get().add(t * gdt_rs + h) = g_da * ea;
        }
    }
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
    let mut w = vec![0.0f32; q_max * q_max]; // the block's W, (Q, Q)
    let mut wend = vec![0.0f32; q_max]; // exp(Λ_end − Λ_j)·dt_j
    let mut coef = vec![0.0f32; n * q_max]; // B_j[k]·exp(Λ_end − Λ_j)·dt_j, (N, Q)
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
        let c0 = inp.c.as_ptr().add(t0 * inp.bc_rs + g * n);
        let y0 = y.add(t0 * y_rs + h * p);
        // The block's outputs as three small products: the off-diagonal terms Sᵀ C_i (the state
        // read once a block, not once a row), the weights W[i][j] = (C_i·B_j)·exp(Λ_i − Λ_j)·dt_j
        // (zero for j > i: adding their exact zeros changes no bit), then W·X.
        for i in 0..q {
            y0.add(i * y_rs).write_bytes(0, p);
        }
        acc_tile::<S>(Product { c: y0, c_rs: y_rs, a: c0, a_rs: inp.bc_rs, b: st, b_rs: p, depth: n }, q, p);
        let wm = w.as_mut_ptr();
        wm.write_bytes(0, q * q);
        acc_tile::<S>(Product { c: wm, c_rs: q, a: c0, a_rs: inp.bc_rs, b: bt.as_ptr(), b_rs: q, depth: n }, q, q);
        for i in 0..q {
            let wi = wm.add(i * q);
            decay_weights::<S>(wi, cum.as_ptr(), dtc.as_ptr(), cum[i], i + 1);
            wi.add(i + 1).write_bytes(0, q - i - 1);
            scale::<S>(y0.add(i * y_rs), cum[i].exp(), p);
        }
        acc_tile::<S>(Product { c: y0, c_rs: y_rs, a: wm, a_rs: q, b: x0, b_rs: inp.x_rs, depth: q }, q, p);
        for i in 0..q {
            let (out, xi) = (y0.add(i * y_rs), xp(t0 + i));
            for pp in 0..p {
                *out.add(pp) += d_of(pp) * *xi.add(pp);
            }
        }
        // S_out = exp(Λ_end)·S_in + Σ_j B_j ⊗ exp(Λ_end − Λ_j)·dt_j·x_j, as one product.
        let end = cum[q - 1];
        wend[..q].fill(1.0);
        decay_weights::<S>(wend.as_mut_ptr(), cum.as_ptr(), dtc.as_ptr(), end, q);
        for k in 0..n {
            for j in 0..q {
                coef[k * q + j] = bt[k * q + j] * wend[j];
            }
        }
        scale::<S>(st, end.exp(), n * p);
        acc_tile::<S>(Product { c: st, c_rs: p, a: coef.as_ptr(), a_rs: q, b: x0, b_rs: inp.x_rs, depth: q }, n, p);
        t0 += q;
    }
}

/// The recurrent form for one token, in a single pass over the state:
/// `S[k,:] ← exp(da)·S[k,:] + dt·B[k]·x`, `y += C[k]·S[k,:]` (bytes: the N×P state, read and
/// written once).
#[inline(always)]
unsafe fn ssd_step_head<S: Simd, T: StateElem>(inp: &SsdInputs, dims: SsdDims, h: usize, st: *mut T, y: *mut f32) {
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
            let s = S::fma(dv, T::load::<S>(sk), S::mul(S::splat(dt * *b.add(k)), xv));
            T::store::<S>(sk, s);
            acc = S::fma(S::splat(*c.add(k)), s, acc);
        }
        S::store(out.add(pp), acc);
        pp += S::LANES;
    }
    for pp in pp..p {
        let mut acc = 0.0f32;
        for k in 0..n {
            let sk = st.add(k * p + pp);
            let s = decay.mul_add((*sk).to_f32(), dt * *b.add(k) * *x.add(pp));
            *sk = T::from_f32(s);
            acc = (*c.add(k)).mul_add(s, acc);
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

/// `c[i·c_rs + col] += Σ_{k<depth} a[i·a_rs + k]·b[k·b_rs + col]`: the operands of a small
/// product, row-major with row strides.
#[derive(Clone, Copy)]
struct Product {
    c: *mut f32,
    c_rs: usize,
    a: *const f32,
    a_rs: usize,
    b: *const f32,
    b_rs: usize,
    depth: usize,
}

impl Product {
    /// The same product from row `i`, column `col` of `c` on.
    unsafe fn at(self, i: usize, col: usize) -> Product {
        Product { c: self.c.add(i * self.c_rs + col), a: self.a.add(i * self.a_rs), b: self.b.add(col), ..self }
    }
}

/// `p` over rows i < m and columns col < len, in register tiles of 4 rows × up to 4 vectors
/// (6 rows × 2 vectors with 8-lane vectors: 12 of AVX2's 16 registers, enough sums in flight to
/// cover the FMA latency), each entry summing over k in order.
#[inline(always)]
unsafe fn acc_tile<S: Simd>(p: Product, m: usize, len: usize) {
    let mut i = 0;
    if S::LANES == 8 {
        while i + 6 <= m {
            tile_cols::<S, 6>(p.at(i, 0), len);
            i += 6;
        }
    }
    while i + 4 <= m {
        tile_cols::<S, 4>(p.at(i, 0), len);
        i += 4;
    }
    for i in i..m {
        tile_cols::<S, 1>(p.at(i, 0), len);
    }
}

/// [`acc_tile`] for R rows: the widest tiles the registers hold (16 accumulators), then one
/// vector, then single columns.
#[inline(always)]
unsafe fn tile_cols<S: Simd, const R: usize>(p: Product, len: usize) {
    let l = S::LANES;
    let mut col = 0;
    if l >= 16 {
        while col + 4 * l <= len {
            tile::<S, R, 4>(p.at(0, col));
            col += 4 * l;
        }
    } else {
        while col + 2 * l <= len {
            tile::<S, R, 2>(p.at(0, col));
            col += 2 * l;
        }
    }
    while col + l <= len {
        tile::<S, R, 1>(p.at(0, col));
        col += l;
    }
    for col in col..len {
        tile::<Scalar, R, 1>(p.at(0, col));
    }
}

/// R rows × V vectors of a [`Product`], held in registers over the whole depth.
#[inline(always)]
unsafe fn tile<S: Simd, const R: usize, const V: usize>(p: Product) {
    let l = S::LANES;
    let mut acc = [[S::splat(0.0); V]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (v, x) in row.iter_mut().enumerate() {
            *x = S::load(p.c.add(r * p.c_rs + v * l));
        }
    }
    for k in 0..p.depth {
        let bk = p.b.add(k * p.b_rs);
        let mut bv = [S::splat(0.0); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = S::load(bk.add(v * l));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let ar = S::splat(*p.a.add(r * p.a_rs + k));
            for (x, bx) in row.iter_mut().zip(&bv) {
                *x = S::fma(ar, *bx, *x);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            S::store(p.c.add(r * p.c_rs + v * l), *x);
        }
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
