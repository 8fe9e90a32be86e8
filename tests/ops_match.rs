//! Operator-level checks against the official reference functions' outputs (ops.safetensors):
//! the Mamba-1 selective scan and the Mamba-2 chunked SSD, under every instruction set; and the
//! fused cross-entropy against its plain f64 form.

mod common;
use common::*;
use mamba_lm::ops::cross_entropy::{nll_rows, nll_rows_slow};
use mamba_lm::ops::selective_scan::{selective_scan, ScanInputs};
use mamba_lm::ops::simd::{set_isa, Isa};
use mamba_lm::ops::ssd::{ssd, SsdDims, SsdInputs};

fn ops(name: &str) -> (Vec<f32>, Vec<usize>) {
    let (v, s) = read_tensor(&fixture("ops.safetensors"), name);
    (v.into_iter().map(|x| x as f32).collect(), s)
}

/// Max |a − b| / max(1, max |b|).
fn max_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= Isa::detect()).collect()
}

#[test]
fn selective_scan_matches_reference() {
    let (u, us) = ops("s6.u");
    let (delta, _) = ops("s6.delta");
    let (z, _) = ops("s6.z");
    let (a, _) = ops("s6.A");
    let (b, _) = ops("s6.B");
    let (c, _) = ops("s6.C");
    let (d, _) = ops("s6.D");
    let (bias, _) = ops("s6.delta_bias");
    let (y_ref, _) = ops("s6.y");
    let (st_ref, _) = ops("s6.last_state");
    let (bat, e, l) = (us[0], us[1], us[2]);
    let n = a.len() / e;
    // (b, channel, time) → time-major per batch; A (E, N) → (N, E).
    let tm = |v: &[f32], rows: usize, bi: usize| -> Vec<f32> {
        let mut o = vec![0.0; rows * l];
        for r in 0..rows {
            for t in 0..l {
                o[t * rows + r] = v[(bi * rows + r) * l + t];
            }
        }
        o
    };
    let mut at = vec![0.0; n * e];
    for ch in 0..e {
        for k in 0..n {
            at[k * e + ch] = a[ch * n + k];
        }
    }
    for isa in isas() {
        set_isa(isa);
        for bi in 0..bat {
            let (ub, db, zb, bb, cb) = (tm(&u, e, bi), tm(&delta, e, bi), tm(&z, e, bi), tm(&b, n, bi), tm(&c, n, bi));
            let inp = ScanInputs {
                u: &ub,
                u_rs: e,
                dt: &db,
                dt_rs: e,
                dt_bias: &bias,
                a: &at,
                b: &bb,
                c: &cb,
                bc_rs: n,
                d: &d,
                z: Some((&zb, e)),
            };
            let mut state = vec![0.0; n * e];
            let mut y = vec![0.0; l * e];
            selective_scan(&inp, l, e, n, &mut state, &mut y);
            let yr = tm(&y_ref, e, bi);
            assert!(max_err(&y, &yr) <= 1e-5, "{}: y err {}", isa.name(), max_err(&y, &yr));
            let mut st = vec![0.0; n * e];
            for ch in 0..e {
                for k in 0..n {
                    st[k * e + ch] = st_ref[(bi * e + ch) * n + k];
                }
            }
            assert!(max_err(&state, &st) <= 1e-5, "{}: state err {}", isa.name(), max_err(&state, &st));
        }
    }
    set_isa(Isa::detect());
}

#[test]
fn ssd_matches_reference_for_any_block() {
    let (x, xs) = ops("ssd.X");
    let (a, _) = ops("ssd.A");
    let (b, _) = ops("ssd.B");
    let (c, _) = ops("ssd.C");
    let (y_ref, _) = ops("ssd.Y");
    let (st_ref, _) = ops("ssd.final_state");
    let (bat, l, h, p) = (xs[0], xs[1], xs[2], xs[3]);
    let n = b.len() / (bat * l * h);
    for isa in isas() {
        set_isa(isa);
        for block in [16, 5, 64] {
            for bi in 0..bat {
                let xb = &x[bi * l * h * p..(bi + 1) * l * h * p];
                let ab = &a[bi * l * h..(bi + 1) * l * h];
                let ones = vec![1.0f32; l * h];
                let bb = &b[bi * l * h * n..(bi + 1) * l * h * n];
                let cb = &c[bi * l * h * n..(bi + 1) * l * h * n];
                let inp =
                    SsdInputs { x: xb, x_rs: h * p, dt: &ones, da: ab, dt_rs: h, b: bb, c: cb, bc_rs: h * n, d: None };
                let dims = SsdDims { heads: h, headdim: p, groups: h, d_state: n, block };
                let mut state = vec![0.0; h * n * p];
                let mut y = vec![0.0; l * h * p];
                ssd(&inp, l, dims, &mut state, &mut y, h * p);
                let yr = &y_ref[bi * l * h * p..(bi + 1) * l * h * p];
                assert!(max_err(&y, yr) <= 1e-5, "{} block {block}: y err {}", isa.name(), max_err(&y, yr));
                // (H, N, P) → (H, P, N)
                let mut st = vec![0.0; h * p * n];
                for hh in 0..h {
                    for k in 0..n {
                        for pp in 0..p {
                            st[(hh * p + pp) * n + k] = state[(hh * n + k) * p + pp];
                        }
                    }
                }
                let sr = &st_ref[bi * h * p * n..(bi + 1) * h * p * n];
                assert!(max_err(&st, sr) <= 1e-5, "{} block {block}: state err {}", isa.name(), max_err(&st, sr));
            }
        }
    }
    set_isa(Isa::detect());
}

/// Decode steps with the state kept in bf16: under every instruction set, bitwise the plain
/// loop below (f32 arithmetic in the kernel's order, the state rounded by `half` after each
/// step, y from the unrounded state), and within bf16 rounding of the reference outputs.
#[test]
fn ssd_decode_with_a_bf16_state_rounds_to_nearest_even() {
    use half::bf16;
    let (x, xs) = ops("ssd.X");
    let (a, _) = ops("ssd.A");
    let (b, _) = ops("ssd.B");
    let (c, _) = ops("ssd.C");
    let (y_ref, _) = ops("ssd.Y");
    let (l, h, p) = (xs[1], xs[2], xs[3]);
    let n = b.len() / (xs[0] * l * h);
    let dims = SsdDims { heads: h, headdim: p, groups: h, d_state: n, block: 16 };
    let ones = vec![1.0f32; h];
    let step = |t: usize| SsdInputs {
        x: &x[t * h * p..(t + 1) * h * p],
        x_rs: h * p,
        dt: &ones,
        da: &a[t * h..(t + 1) * h],
        dt_rs: h,
        b: &b[t * h * n..(t + 1) * h * n],
        c: &c[t * h * n..(t + 1) * h * n],
        bc_rs: h * n,
        d: None,
    };
    // The plain loop, state (H, N, P).
    let mut st = vec![bf16::ZERO; h * n * p];
    let mut want = vec![0.0f32; l * h * p];
    for t in 0..l {
        let inp = step(t);
        for hh in 0..h {
            let decay = inp.da[hh].exp();
            for pp in 0..p {
                let mut acc = 0.0f32;
                for k in 0..n {
                    let i = (hh * n + k) * p + pp;
                    let s = decay.mul_add(st[i].to_f32(), inp.b[hh * n + k] * inp.x[hh * p + pp]);
                    st[i] = bf16::from_f32(s);
                    acc = inp.c[hh * n + k].mul_add(s, acc);
                }
                want[t * h * p + hh * p + pp] = acc;
            }
        }
    }
    let err = max_err(&want, &y_ref[..l * h * p]);
    assert!(err <= 2e-2, "a bf16 state is {err} off the reference");
    for isa in isas() {
        set_isa(isa);
        let mut state = vec![bf16::ZERO; h * n * p];
        let mut y = vec![0.0f32; l * h * p];
        for t in 0..l {
            ssd(&step(t), 1, dims, &mut state, &mut y[t * h * p..], h * p);
        }
        assert!(y == want, "{}: outputs differ from the plain loop", isa.name());
        assert!(state == st, "{}: states differ from the plain loop", isa.name());
    }
    set_isa(Isa::detect());
}

#[test]
fn cross_entropy_matches_the_f64_reference() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(3);
    // A vocabulary that is no multiple of the vector width, logits spread over ±30.
    let (rows, v) = (9, 50_281);
    let logits: Vec<f32> = (0..rows * v).map(|_| rng.random_range(-30.0..30.0f32)).collect();
    let targets: Vec<u32> = (0..rows).map(|_| rng.random_range(0..v as u32)).collect();
    let want = nll_rows_slow(&logits, v, &targets);
    for isa in isas() {
        set_isa(isa);
        for (a, b) in nll_rows(&logits, v, &targets).iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{}: {a} vs {b}", isa.name());
        }
        // A one-hot row: the target's own probability is 1 to within e^-1e4.
        let mut one = vec![-1e4f32; 100];
        one[7] = 0.0;
        assert!(nll_rows(&one, 100, &[7])[0].abs() < 1e-12);
    }
    set_isa(Isa::detect());
}
