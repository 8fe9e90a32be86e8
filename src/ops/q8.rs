//! 8-bit weights (`--dtype int8`): symmetric block quantization and the matrix-vector product
//! in integer arithmetic.
//!
//! A block is [`QBLOCK`] consecutive values of a row with one f32 scale `d = max|x| / 127`, each
//! value stored as `q = round(x / d)` in [−127, 127]. A decode step quantizes its activation row
//! the same way, so each block's dot product is an exact integer sum `Σ q_w·q_x` (at most
//! 32·127² < 2³¹) scaled once by `d_w·d_x`. Per block of 32 weights the kernels read 32 bytes of
//! weights and 4 of scale (1.125 bytes a weight, against 2 for bf16). The kernels: AVX-512 VNNI
//! (`vpdpbusd`, two blocks per instruction), AVX-VNNI (the same on 256 bits), AVX2
//! (`vpmaddubsw` + `vpmaddwd`) and scalar, picked at run time. The unsigned × signed
//! instructions take w + 128 (one xor) and x, and a per-row correction of x removes the offset;
//! AVX2, whose 16-bit pair sums would overflow with the offset, takes |w| and x with w's sign
//! moved onto it.

use super::matmul::SendPtr;
use crate::tensor::weight_vec;

/// Values per quantization block (a row's length must be a multiple of it).
pub const QBLOCK: usize = 32;

/// Quantized values and their block scales, row-major as the f32 matrix they stand for.
#[derive(Clone, Debug)]
pub struct Q8 {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
}

fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// A block's scales from its largest magnitude: the step `d = max|x| / 127`, its reciprocal,
/// and the reciprocal of the residual's step d/256 (zeros for a zero block).
fn block_scales(amax: f32) -> (f32, f32, f32) {
    let d = amax / 127.0;
    if d > 0.0 {
        (d, 1.0 / d, 256.0 / d)
    } else {
        (d, 0.0, 0.0)
    }
}

/// `v` in steps: rounded (half away from zero) into [−127, 127].
fn to_steps(v: f32) -> f32 {
    v.round().clamp(-127.0, 127.0)
}

/// Quantizes one block: its scale, and `q` filled.
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let (d, inv, _) = block_scales(amax(x));
    for (o, &v) in q.iter_mut().zip(x) {
        *o = to_steps(v * inv) as i8;
    }
    d
}

impl Q8 {
    /// `x` (a multiple of [`QBLOCK`] long) quantized block by block.
    pub fn quantize(x: &[f32]) -> Q8 {
        assert_eq!(x.len() % QBLOCK, 0, "8-bit quantization needs whole blocks of {QBLOCK}");
        let mut q = weight_vec(x.len(), std::iter::repeat_n(0i8, x.len()));
        let d = x.chunks_exact(QBLOCK).zip(q.chunks_exact_mut(QBLOCK)).map(|(b, o)| quantize_block(b, o)).collect();
        Q8 { q, d }
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Dequantizes `self[start..start + out.len()]` into `out`.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            let i = start + j;
            *o = self.q[i] as f32 * self.d[i / QBLOCK];
        }
    }
}

/// An activation row in two 8-bit terms: `x ≈ d·q + (d/256)·r` per block, `r` the rounding
/// residual of the first term on a 256 times finer step. Decode reads every weight once whatever
/// the arithmetic, so the second integer product costs no bandwidth, and it takes the
/// activations' rounding out of the result's error (what remains is the weights' own). With the
/// fixed ratio the two sums combine exactly in integers (`256·Σw·q + Σw·r`, below 2²⁸) and are
/// scaled once. Per block, as the vector kernels' 8 lanes of 4 values take them: `s8[8b..8b + 8]
/// = d_b/256`, and `corr` = −128·(256·Σq + Σr) over each lane's 4 values (the w + 128 offset's
/// share).
#[derive(Clone, Copy)]
pub struct XRow {
    pub q: *const i8,
    pub r: *const i8,
    pub s8: *const f32,
    pub corr: *const i32,
}

// Read-only views the threads of one gemv share while the buffers they point into live.
unsafe impl Send for XRow {}
unsafe impl Sync for XRow {}

/// `x` (whole blocks) quantized into `q`, `r`, the scales `s8` and the offsets' `corr` as
/// [`XRow`] holds them: by [`quantize_row_slow`]'s arithmetic, with AVX2 where the instruction
/// set in force has it (the same values, bit for bit).
fn quantize_row(x: &[f32], qr: (&mut [i8], &mut [i8]), s8: &mut [f32], corr: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::isa() >= super::simd::Isa::Avx2 {
        // Safety: AVX2 is in force; the slices hold x's blocks (checked in the callee).
        return unsafe { x86::quantize_row_avx2(x, qr, s8, corr) };
    }
    quantize_row_slow(x, qr, s8, corr)
}

fn quantize_row_slow(x: &[f32], (q, r): (&mut [i8], &mut [i8]), s8: &mut [f32], corr: &mut [i32]) {
    for (b, xb) in x.chunks_exact(QBLOCK).enumerate() {
        let (qb, rb) = (&mut q[b * QBLOCK..(b + 1) * QBLOCK], &mut r[b * QBLOCK..(b + 1) * QBLOCK]);
        let (d, inv, inv_r) = block_scales(amax(xb));
        for ((oq, or), &v) in qb.iter_mut().zip(rb.iter_mut()).zip(xb) {
            let qv = to_steps(v * inv);
            *oq = qv as i8;
            // |x − d·q| ≤ d/2: at most 128 steps of d/256; the clamp costs at most one step.
            *or = to_steps((v - d * qv) * inv_r) as i8;
        }
        s8[8 * b..8 * b + 8].fill(d / 256.0);
        for (lane, c) in corr[8 * b..8 * b + 8].iter_mut().enumerate() {
            let sum = |v: &[i8]| v[4 * lane..4 * lane + 4].iter().map(|&t| t as i32).sum::<i32>();
            *c = -128 * (256 * sum(qb) + sum(rb));
        }
    }
}

/// The dot-product kernels, widest last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    Avx2,
    AvxVnni,
    Avx512Vnni,
}

impl Kernel {
    /// The kernels this CPU runs, narrowest first.
    pub fn available() -> &'static [Kernel] {
        static AVAILABLE: std::sync::OnceLock<Vec<Kernel>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(Kernel::detect)
    }

    fn detect() -> Vec<Kernel> {
        let mut v = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                v.push(Kernel::Avx2);
                if has!("avxvnni") {
                    v.push(Kernel::AvxVnni);
                }
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vnni") {
                v.push(Kernel::Avx512Vnni);
            }
        }
        v
    }

    /// The widest kernel within the instruction set in force ([`super::simd::isa`]).
    pub fn pick() -> Kernel {
        use super::simd::{isa, Isa};
        let allowed = |k: &Kernel| match k {
            Kernel::Scalar => true,
            Kernel::Avx2 | Kernel::AvxVnni => isa() >= Isa::Avx2,
            Kernel::Avx512Vnni => isa() >= Isa::Avx512,
        };
        Kernel::available().iter().copied().rfind(allowed).unwrap_or(Kernel::Scalar)
    }

    /// `Σ_b wd[b]·(d_b/256)·(256·Σ_j w·x.q + Σ_j w·x.r)` over the `nb` blocks of one weight row.
    ///
    /// # Safety
    /// The kernel must be one of [`Kernel::available`]; `w` and `x`'s rows hold `32·nb` values,
    /// `wd` and `x`'s scales `nb`.
    pub unsafe fn dot(self, w: *const i8, wd: *const f32, x: XRow, nb: usize) -> f32 {
        match self {
            Kernel::Scalar => dot_scalar(w, wd, x, nb),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => x86::dot_avx2(w, wd, x, nb),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => x86::dot_avx_vnni(w, wd, x, nb),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => x86::dot_avx512_vnni(w, wd, x, nb),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("not available on this CPU"),
        }
    }
}

/// Block `b`'s two integer dot products, combined and scaled.
unsafe fn block_dot(w: *const i8, wd: *const f32, x: XRow, b: usize) -> f32 {
    let o = b * QBLOCK;
    let (mut sq, mut sr) = (0i32, 0i32);
    for j in o..o + QBLOCK {
        sq += *w.add(j) as i32 * *x.q.add(j) as i32;
        sr += *w.add(j) as i32 * *x.r.add(j) as i32;
    }
    *wd.add(b) * (*x.s8.add(8 * b) * ((sq << 8) + sr) as f32)
}

unsafe fn dot_scalar(w: *const i8, wd: *const f32, x: XRow, nb: usize) -> f32 {
    (0..nb).map(|b| block_dot(w, wd, x, b)).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{block_dot, XRow, QBLOCK};
    use crate::ops::matmul::prefetch_ahead;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// A block per 256-bit step, two steps per turn into two accumulators: `$sums(w, q, r, b)`
    /// gives block b's combined sums 256·Σw·q + Σw·r as 8 × i32 lanes; the loop AVX2 and
    /// AVX-VNNI share.
    macro_rules! dot256 {
        ($w:expr, $wd:expr, $x:expr, $nb:expr, $sums:expr) => {{
            let step = |b: usize, acc: __m256| {
                let o = b * QBLOCK;
                prefetch_ahead($w.wrapping_add(o));
                let wv = _mm256_loadu_si256($w.add(o) as *const __m256i);
                let q = _mm256_loadu_si256($x.q.add(o) as *const __m256i);
                let r = _mm256_loadu_si256($x.r.add(o) as *const __m256i);
                let t = _mm256_cvtepi32_ps($sums(wv, q, r, b));
                let xs = _mm256_mul_ps(t, _mm256_loadu_ps($x.s8.add(8 * b)));
                _mm256_fmadd_ps(xs, _mm256_broadcast_ss(&*$wd.add(b)), acc)
            };
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut b = 0;
            while b + 2 <= $nb {
                a0 = step(b, a0);
                a1 = step(b + 1, a1);
                b += 2;
            }
            if b < $nb {
                a0 = step(b, a0);
            }
            hsum256(_mm256_add_ps(a0, a1))
        }};
    }

    /// [`super::to_steps`] on 8 lanes.
    #[inline(always)]
    unsafe fn round_clamp(v: __m256) -> __m256 {
        let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        let sign = _mm256_and_ps(v, _mm256_set1_ps(-0.0));
        let half =
            _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0), _mm256_sub_ps(v, t)), _mm256_set1_ps(0.5), _CMP_GE_OQ);
        let r = _mm256_add_ps(t, _mm256_and_ps(half, _mm256_or_ps(sign, _mm256_set1_ps(1.0))));
        _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0)), _mm256_set1_ps(127.0))
    }

    /// Four vectors of 8 whole numbers in ±127 as 32 bytes, in order.
    #[inline(always)]
    unsafe fn pack_i8(v: [__m256; 4]) -> __m256i {
        let i = v.map(|x| _mm256_cvttps_epi32(x));
        let p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// `quantize_row_slow` with a block per turn of 4 vectors.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_row_avx2(x: &[f32], (q, r): (&mut [i8], &mut [i8]), s8: &mut [f32], corr: &mut [i32]) {
        let nb = x.len() / QBLOCK;
        assert!(q.len() >= nb * QBLOCK && r.len() >= nb * QBLOCK && s8.len() >= 8 * nb && corr.len() >= 8 * nb);
        let abs = |v| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
        let (ones8, ones16) = (_mm256_set1_epi8(1), _mm256_set1_epi16(1));
        for b in 0..nb {
            let xb = x.as_ptr().add(b * QBLOCK);
            let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(xb.add(8 * j)));
            let m = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let (d, inv, inv_r) = super::block_scales(_mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))));
            let (dv, iv, irv) = (_mm256_set1_ps(d), _mm256_set1_ps(inv), _mm256_set1_ps(inv_r));
            let qv = v.map(|x| round_clamp(_mm256_mul_ps(x, iv)));
            let rv: [__m256; 4] =
                std::array::from_fn(|j| round_clamp(_mm256_mul_ps(_mm256_sub_ps(v[j], _mm256_mul_ps(dv, qv[j])), irv)));
            let (qb, rb) = (pack_i8(qv), pack_i8(rv));
            _mm256_storeu_si256(q.as_mut_ptr().add(b * QBLOCK) as *mut __m256i, qb);
            _mm256_storeu_si256(r.as_mut_ptr().add(b * QBLOCK) as *mut __m256i, rb);
            _mm256_storeu_ps(s8.as_mut_ptr().add(8 * b), _mm256_set1_ps(d / 256.0));
            // Sums of each lane's 4 bytes; corr = −128·(256·Σq + Σr).
            let sum4 = |t| _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, t), ones16);
            let c = _mm256_add_epi32(_mm256_slli_epi32(sum4(qb), 8), sum4(rb));
            _mm256_storeu_si256(
                corr.as_mut_ptr().add(8 * b) as *mut __m256i,
                _mm256_mullo_epi32(c, _mm256_set1_epi32(-128)),
            );
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(w: *const i8, wd: *const f32, x: XRow, nb: usize) -> f32 {
        let ones = _mm256_set1_epi16(1);
        // |w| · (x with w's sign): pairs of u8·i8 products fit i16 (2·127² < 2¹⁵).
        let sums = |wv: __m256i, q: __m256i, r: __m256i, _b: usize| {
            let aw = _mm256_sign_epi8(wv, wv);
            let dot = |v| _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(v, wv)), ones);
            _mm256_add_epi32(_mm256_slli_epi32(dot(q), 8), dot(r))
        };
        dot256!(w, wd, x, nb, sums)
    }

    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub unsafe fn dot_avx_vnni(w: *const i8, wd: *const f32, x: XRow, nb: usize) -> f32 {
        let offset = _mm256_set1_epi8(-128);
        let sums = |wv: __m256i, q: __m256i, r: __m256i, b: usize| {
            let wu = _mm256_xor_si256(wv, offset);
            let t = _mm256_slli_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wu, q), 8);
            let t = _mm256_dpbusd_avx_epi32(t, wu, r);
            _mm256_add_epi32(t, _mm256_loadu_si256(x.corr.add(8 * b) as *const __m256i))
        };
        dot256!(w, wd, x, nb, sums)
    }

    /// Two blocks per 512-bit step (lanes 0–7 block b, 8–15 block b + 1), two steps per turn
    /// into two accumulators; an odd last block by the scalar sum.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
    pub unsafe fn dot_avx512_vnni(w: *const i8, wd: *const f32, x: XRow, nb: usize) -> f32 {
        let (zero, offset) = (_mm512_setzero_si512(), _mm512_set1_epi8(-128));
        let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let step = |b: usize, acc: __m512| {
            let o = b * QBLOCK;
            prefetch_ahead(w.wrapping_add(o));
            let wu = _mm512_xor_si512(_mm512_loadu_si512(w.add(o) as *const __m512i), offset);
            let q = _mm512_loadu_si512(x.q.add(o) as *const __m512i);
            let r = _mm512_loadu_si512(x.r.add(o) as *const __m512i);
            let t = _mm512_slli_epi32(_mm512_dpbusd_epi32(zero, wu, q), 8);
            let t = _mm512_dpbusd_epi32(t, wu, r);
            let t = _mm512_add_epi32(t, _mm512_loadu_si512(x.corr.add(8 * b) as *const __m512i));
            let xs = _mm512_mul_ps(_mm512_cvtepi32_ps(t), _mm512_loadu_ps(x.s8.add(8 * b)));
            // wd[b], wd[b + 1] spread over the two halves.
            let pair = _mm512_castpd_ps(_mm512_castpd128_pd512(_mm_load_sd(wd.add(b) as *const f64)));
            _mm512_fmadd_ps(xs, _mm512_permutexvar_ps(halves, pair), acc)
        };
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut b = 0;
        while b + 4 <= nb {
            a0 = step(b, a0);
            a1 = step(b + 2, a1);
            b += 4;
        }
        if b + 2 <= nb {
            a0 = step(b, a0);
            b += 2;
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        if b < nb {
            sum += block_dot(w, wd, x, b);
        }
        sum
    }
}

/// `y[i·y_rs + r] = Σ_k x[i·x_rs + k]·W[r, k]` for the `n` rows of `x` against the 8-bit
/// `m × k` matrix `w`: each row of `x` quantized once, weight rows split across threads, each
/// output the same whatever other rows share the call.
#[allow(clippy::too_many_arguments)]
pub fn gemv(x: &[f32], n: usize, x_rs: usize, w: &Q8, m: usize, k: usize, y: &mut [f32], y_rs: usize) {
    assert!(k.is_multiple_of(QBLOCK) && w.len() == m * k, "gemv: the 8-bit matrix is not {m} × {k} in blocks");
    let nb = k / QBLOCK;
    // Row i: q and r at [2ik, 2ik + 2k), s8 and corr at [8i·nb, 8(i + 1)·nb).
    let mut xq = vec![0i8; 2 * n * k];
    let mut xs = vec![0.0f32; 8 * n * nb];
    let mut xc = vec![0i32; 8 * n * nb];
    for (i, ((q, s8), c)) in
        xq.chunks_exact_mut(2 * k).zip(xs.chunks_exact_mut(8 * nb)).zip(xc.chunks_exact_mut(8 * nb)).enumerate()
    {
        quantize_row(&x[i * x_rs..i * x_rs + k], q.split_at_mut(k), s8, c);
    }
    let kernel = Kernel::pick();
    let block = m.div_ceil(rayon::current_num_threads() * 4).max(16);
    let yp = SendPtr(y.as_mut_ptr());
    let rows: Vec<XRow> = (0..n)
        .map(|i| {
            let q = xq[2 * i * k..].as_ptr();
            // Safety: r stays within row i's 2k values.
            XRow { q, r: unsafe { q.add(k) }, s8: xs[8 * i * nb..].as_ptr(), corr: xc[8 * i * nb..].as_ptr() }
        })
        .collect();
    let rows = &rows;
    super::pool::parallel_for(m.div_ceil(block), &move |t| {
        for r in t * block..((t + 1) * block).min(m) {
            let (wr, wdr) = (w.q[r * k..].as_ptr(), w.d[r * nb..].as_ptr());
            for (i, &x) in rows.iter().enumerate() {
                // Safety: the kernel is available; rows and scales are in bounds (asserted above).
                let v = unsafe { kernel.dot(wr, wdr, x, nb) };
                unsafe { *yp.get().add(i * y_rs + r) = v };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel this CPU has gives the sum of the dequantized values' products (exact per
    /// block; only the f32 scaling and the order of the block sums round).
    #[test]
    fn kernels_match_the_dequantized_sum() {
        let (k, nb) = (32 * 37, 37); // an odd number of blocks
        let w: Vec<f32> = (0..3 * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
        let x: Vec<f32> = (0..k).map(|i| ((i * 104729 % 911) as f32 - 455.0) / 31.0).collect();
        let wq = Q8::quantize(&w);
        let mut wf = vec![0.0; w.len()];
        wq.read_f32(0, &mut wf);
        let (mut q, mut s8, mut corr) = (vec![0i8; 2 * k], vec![0.0f32; 8 * nb], vec![0i32; 8 * nb]);
        quantize_row(&x, q.split_at_mut(k), &mut s8, &mut corr);
        // The two terms restore x to within half a step of the residual's scale (one step where
        // the residual sits on its clamp).
        let e = |j: usize| s8[8 * (j / 32)];
        let xf: Vec<f32> = (0..k).map(|j| e(j) * (256.0 * q[j] as f32 + q[k + j] as f32)).collect();
        for (j, (a, b)) in x.iter().zip(&xf).enumerate() {
            let steps = if q[k + j].abs() == 127 { 1.0001 } else { 0.5001 };
            assert!((a - b).abs() <= steps * e(j) + 1e-6 * a.abs(), "x[{j}]: {a} vs {b}");
        }
        let row = XRow { q: q.as_ptr(), r: q[k..].as_ptr(), s8: s8.as_ptr(), corr: corr.as_ptr() };
        for r in 0..3 {
            let exact = |xs: &[f32]| -> f64 { (0..k).map(|j| wf[r * k + j] as f64 * xs[j] as f64).sum() };
            let (want, scale) = (exact(&xf), (0..k).map(|j| (wf[r * k + j] as f64 * xf[j] as f64).abs()).sum::<f64>());
            for &kernel in Kernel::available() {
                let got = unsafe { kernel.dot(wq.q[r * k..].as_ptr(), wq.d[r * nb..].as_ptr(), row, nb) };
                assert!((got as f64 - want).abs() <= 1e-6 * scale, "{kernel:?} row {r}: {got} vs {want}");
            }
            // Against the unquantized activations: the weights' rounding alone.
            assert!((exact(&x) - want).abs() <= 1e-5 * scale, "row {r}: the activations' two terms lose accuracy");
        }
    }

    /// The AVX2 row quantizer writes what the plain one does, bit for bit, ties and zero blocks
    /// included.
    #[test]
    fn row_quantizers_agree() {
        if super::super::simd::isa() < super::super::simd::Isa::Avx2 {
            return;
        }
        let k = 32 * 9;
        let mut x: Vec<f32> = (0..k).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 37.0).collect();
        x[32..64].fill(0.0); // a zero block
                             // A block whose max is 127: its values land on whole steps and on ties of half a step.
        for (j, v) in x[64..96].iter_mut().enumerate() {
            *v = if j == 0 { 127.0 } else { j as f32 * 3.5 - 50.0 };
        }
        type Quantizer = fn(&[f32], (&mut [i8], &mut [i8]), &mut [f32], &mut [i32]);
        let run = |f: Quantizer| {
            let (mut q, mut s8, mut corr) = (vec![0i8; 2 * k], vec![0.0f32; 8 * k / 32], vec![0i32; 8 * k / 32]);
            f(&x, q.split_at_mut(k), &mut s8, &mut corr);
            (q, s8.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), corr)
        };
        assert_eq!(run(quantize_row), run(quantize_row_slow));
    }

    /// Quantization error is at most half a step of each block's scale.
    #[test]
    fn quantization_rounds_to_the_nearest_step() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.013).collect();
        let q = Q8::quantize(&x);
        let mut back = vec![0.0; x.len()];
        q.read_f32(0, &mut back);
        for (i, (a, b)) in x.iter().zip(&back).enumerate() {
            assert!((a - b).abs() <= 0.5 * q.d[i / QBLOCK] * 1.0001, "{i}: {a} vs {b}");
        }
        assert!(q.q.iter().all(|&v| v != -128));
    }
}
