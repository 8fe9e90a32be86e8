//! Causal depthwise 1-D convolution + SiLU over time-major activations, with a carried state.
//!
//! `out[t, c] = silu(bias[c] + Σ_k w[k, c] · x[t − (W−1) + k, c])`, where times before the
//! first row come from `state` (the previous W−1 raw inputs, oldest first). Vectorised over
//! channels, parallel over blocks of time; reads L·C inputs once and writes L·C outputs.

use super::matmul::SendPtr;
use super::simd::{silu, Simd};
use crate::dispatch;
use rayon::prelude::*;

const TIME_BLOCK: usize = 32;

/// A checkpoint's conv weight `(C, 1, W)` as the kernels' tap-major `(W, C)`.
pub fn taps(w: &[f32], c: usize, width: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; width * c];
    for ch in 0..c {
        for k in 0..width {
            t[k * c + ch] = w[ch * width + k];
        }
    }
    t
}

/// Adds a tap-major `(W, C)` gradient to one laid out as the checkpoint's `(C, 1, W)`.
pub fn add_taps_to_checkpoint_layout(g_taps: &[f32], c: usize, width: usize, g: &mut [f32]) {
    for ch in 0..c {
        for k in 0..width {
            g[ch * width + k] += g_taps[k * c + ch];
        }
    }
}

/// Convolves `l` rows of `c` channels (`x[t·x_rs + ch]`) into `out` (`l × c`, contiguous) and
/// advances `state` (`(width−1) × c`) to the last `width−1` inputs.
/// `w` is tap-major: `w[k·c + ch]`, tap `width−1` multiplies the current input.
#[allow(clippy::too_many_arguments)]
pub fn causal_conv1d_silu(
    x: &[f32],
    l: usize,
    x_rs: usize,
    c: usize,
    w: &[f32],
    width: usize,
    bias: Option<&[f32]>,
    state: &mut [f32],
    out: &mut [f32],
) {
    let hist = width - 1;
    assert_eq!(w.len(), width * c);
    assert_eq!(state.len(), hist * c);
    assert!(out.len() >= l * c && (l == 0 || x.len() >= (l - 1) * x_rs + c));
    if let Some(b) = bias {
        assert_eq!(b.len(), c);
    }
    let op = SendPtr(out.as_mut_ptr());
    let run = |t0: usize| {
        let t1 = (t0 + TIME_BLOCK).min(l);
        dispatch!(conv_rows(x, x_rs, c, w, width, bias, state, op.get(), t0, t1));
    };
    if l <= TIME_BLOCK {
        run(0);
    } else {
        (0..l).into_par_iter().step_by(TIME_BLOCK).for_each(run);
    }
    // New history: the last `hist` rows of [state; x].
    let mut next = vec![0.0f32; hist * c];
    for j in 0..hist {
        let src = l + j; // index into the concatenation of the old history and x
        let row = if src < hist {
            &state[src * c..(src + 1) * c]
        } else {
            let t = src - hist;
            &x[t * x_rs..t * x_rs + c]
        };
        next[j * c..(j + 1) * c].copy_from_slice(row);
    }
    state.copy_from_slice(&next);
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn conv_rows<S: Simd>(
    x: &[f32],
    x_rs: usize,
    c: usize,
    w: &[f32],
    width: usize,
    bias: Option<&[f32]>,
    state: &[f32],
    out: *mut f32,
    t0: usize,
    t1: usize,
) {
    let hist = width - 1;
    let input = |t: usize, k: usize| -> *const f32 {
        // time t − hist + k in the concatenation [state; x]
        let s = t + k;
        if s < hist {
            state.as_ptr().add(s * c)
        } else {
            x.as_ptr().add((s - hist) * x_rs)
        }
    };
    for t in t0..t1 {
        let mut ch = 0;
        while ch + S::LANES <= c {
            let mut acc = match bias {
                Some(b) => S::load(b.as_ptr().add(ch)),
                None => S::splat(0.0),
            };
            for k in 0..width {
                acc = S::fma(S::load(w.as_ptr().add(k * c + ch)), S::load(input(t, k).add(ch)), acc);
            }
            S::store(out.add(t * c + ch), silu::<S>(acc));
            ch += S::LANES;
        }
        for ch in ch..c {
            let mut acc = bias.map_or(0.0, |b| b[ch]);
            for k in 0..width {
                acc += w[k * c + ch] * *input(t, k).add(ch);
            }
            *out.add(t * c + ch) = super::simd::silu_f32(acc);
        }
    }
}

/// Backward of [`causal_conv1d_silu`] over one sequence that started from a zero state: from
/// the output gradient `g_out` (`l × c`, contiguous) writes `g_x` (`g_x[t·g_rs + ch]`) and adds
/// the weight and bias gradients to `g_w` (tap-major, like `w`) and `g_b`. The pre-activation
/// is recomputed (W multiply-adds per value) rather than kept. Per channel:
/// `g_pre = g_out·silu'(pre)`, `g_x[t − (W−1) + k] += w[k]·g_pre[t]`, `g_w[k] += Σ_t x[t − (W−1) + k]·g_pre[t]`.
#[allow(clippy::too_many_arguments)]
pub fn causal_conv1d_silu_backward(
    x: &[f32],
    l: usize,
    x_rs: usize,
    c: usize,
    w: &[f32],
    width: usize,
    bias: Option<&[f32]>,
    g_out: &[f32],
    g_x: &mut [f32],
    g_rs: usize,
    g_w: &mut [f32],
    g_b: Option<&mut [f32]>,
) {
    assert!(w.len() == width * c && g_w.len() == width * c && g_out.len() >= l * c);
    assert!(l == 0 || (x.len() >= (l - 1) * x_rs + c && g_x.len() >= (l - 1) * g_rs + c));
    let hist = width - 1;
    let (gx, gw) = (SendPtr(g_x.as_mut_ptr()), SendPtr(g_w.as_mut_ptr()));
    let gb = g_b.map(|b| SendPtr(b.as_mut_ptr()));
    // Channels are independent: each task owns a block of them (disjoint columns everywhere).
    (0..c).into_par_iter().step_by(64).for_each(|c0| {
        let mut g_pre = vec![0.0f32; l];
        for ch in c0..(c0 + 64).min(c) {
            let at = |t: isize| if t < 0 { 0.0 } else { x[t as usize * x_rs + ch] };
            for t in 0..l {
                let mut pre = bias.map_or(0.0, |b| b[ch]);
                for k in 0..width {
                    pre += w[k * c + ch] * at(t as isize - hist as isize + k as isize);
                }
                let s = 1.0 / (1.0 + (-pre).exp());
                g_pre[t] = g_out[t * c + ch] * s * (1.0 + pre * (1.0 - s));
            }
            unsafe {
                for t in 0..l {
                    let mut acc = 0.0f32;
                    for k in 0..width {
                        // Input t feeds outputs t + (W−1) − k through tap k.
                        let o = t + hist - k;
                        if o < l {
                            acc += w[k * c + ch] * g_pre[o];
                        }
                    }
                    *gx.get().add(t * g_rs + ch) = acc;
                }
                for k in 0..width {
                    let s: f32 = (0..l).map(|t| at(t as isize - hist as isize + k as isize) * g_pre[t]).sum();
                    *gw.get().add(k * c + ch) += s;
                }
                if let Some(gb) = gb {
                    *gb.get().add(ch) += g_pre.iter().sum::<f32>();
                }
            }
        }
    });
}
