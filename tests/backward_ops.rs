//! Each op's hand-written backward against central finite differences of an independent f64
//! forward written here from the formulas (training-spec §2, mamba-spec): for random inputs
//! and a random output gradient G, the directional derivative of ⟨G, f(X)⟩ along random
//! directions V must equal Σ ∂/∂X · V from the backward (f32) to 1e-3 relative.

use mamba_lm::ops::causal_conv1d::causal_conv1d_silu_backward;
use mamba_lm::ops::cross_entropy::{head_loss_backward, HeadGrads};
use mamba_lm::ops::rms_norm::{gated_rms_norm_backward, rms_norm_backward};
use mamba_lm::ops::selective_scan::{selective_scan_backward, ScanGrads, ScanInputs};
use mamba_lm::ops::ssd::{ssd_backward, SsdDims, SsdGrads, SsdInputs};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// Checks `grads` (the backward's, one per input) against central differences of `loss`
/// (⟨G, f(X)⟩ in f64) along 3 random directions. The inputs are rounded to f32 first, so
/// both sides see the same point.
fn check(
    what: &str,
    inputs: &mut [Vec<f64>],
    loss: impl Fn(&[Vec<f64>]) -> f64,
    grads: impl Fn(&[Vec<f32>]) -> Vec<Vec<f32>>,
) {
    for x in inputs.iter_mut() {
        x.iter_mut().for_each(|v| *v = *v as f32 as f64);
    }
    let g = grads(&inputs.iter().map(|x| f32s(x)).collect::<Vec<_>>());
    assert_eq!(g.len(), inputs.len());
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..3 {
        let dir: Vec<Vec<f64>> = inputs.iter().map(|x| random(&mut rng, x.len(), -1.0, 1.0)).collect();
        let at = |s: f64| -> Vec<Vec<f64>> {
            inputs.iter().zip(&dir).map(|(x, d)| x.iter().zip(d).map(|(a, b)| a + s * b).collect()).collect()
        };
        let eps = 1e-6;
        let numeric = (loss(&at(eps)) - loss(&at(-eps))) / (2.0 * eps);
        let analytic: f64 = g.iter().zip(&dir).flat_map(|(g, d)| g.iter().zip(d).map(|(a, b)| *a as f64 * b)).sum();
        let err = (numeric - analytic).abs() / numeric.abs().max(1e-3);
        assert!(err < 1e-3, "{what}: finite differences {numeric:.6e}, backward {analytic:.6e} (rel {err:.1e})");
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn rms_norm_backward_matches_finite_differences() {
    let (n, d, eps) = (5, 24, 1e-5);
    let mut rng = StdRng::seed_from_u64(1);
    let g = random(&mut rng, n * d, -1.0, 1.0);
    let mut inputs = vec![random(&mut rng, n * d, -2.0, 2.0), random(&mut rng, d, 0.5, 1.5)];
    let loss = |x: &[Vec<f64>]| {
        let mut y = vec![0.0; n * d];
        for r in 0..n {
            let row = &x[0][r * d..(r + 1) * d];
            let rstd = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            (0..d).for_each(|i| y[r * d + i] = row[i] * rstd * x[1][i]);
        }
        dot(&y, &g)
    };
    check("rms_norm", &mut inputs, loss, |x| {
        let (mut gx, mut gw) = (vec![0.0; n * d], vec![0.0; d]);
        rms_norm_backward(&x[0], &x[1], eps as f32, &f32s(&g), &mut gx, &mut gw);
        vec![gx, gw]
    });
}

#[test]
fn gated_rms_norm_backward_matches_finite_differences() {
    let (n, d, group, eps) = (4, 32, 8, 1e-5);
    let mut rng = StdRng::seed_from_u64(2);
    let g = random(&mut rng, n * d, -1.0, 1.0);
    let mut inputs =
        vec![random(&mut rng, n * d, -2.0, 2.0), random(&mut rng, n * d, -3.0, 3.0), random(&mut rng, d, 0.5, 1.5)];
    let loss = |x: &[Vec<f64>]| {
        let mut out = vec![0.0; n * d];
        for r in 0..n {
            let v: Vec<f64> = (0..d).map(|i| x[0][r * d + i] * silu(x[1][r * d + i])).collect();
            for g0 in (0..d).step_by(group) {
                let rstd = 1.0 / (v[g0..g0 + group].iter().map(|a| a * a).sum::<f64>() / group as f64 + eps).sqrt();
                (g0..g0 + group).for_each(|i| out[r * d + i] = v[i] * rstd * x[2][i]);
            }
        }
        dot(&out, &g)
    };
    check("gated_rms_norm", &mut inputs, loss, |x| {
        let (mut gy, mut gz, mut gw) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; d]);
        gated_rms_norm_backward(&x[0], &x[1], d, &x[2], group, eps as f32, &f32s(&g), &mut gy, &mut gz, &mut gw);
        vec![gy, gz, gw]
    });
}

#[test]
fn causal_conv1d_backward_matches_finite_differences() {
    let (l, c, width) = (19, 10, 4);
    let mut rng = StdRng::seed_from_u64(3);
    let g = random(&mut rng, l * c, -1.0, 1.0);
    let mut inputs = vec![
        random(&mut rng, l * c, -2.0, 2.0),
        random(&mut rng, width * c, -0.5, 0.5),
        random(&mut rng, c, -0.5, 0.5),
    ];
    let loss = |x: &[Vec<f64>]| {
        let mut s = 0.0;
        for t in 0..l {
            for ch in 0..c {
                let mut pre = x[2][ch];
                for k in 0..width {
                    if let Some(src) = (t + k).checked_sub(width - 1) {
                        pre += x[1][k * c + ch] * x[0][src * c + ch];
                    }
                }
                s += g[t * c + ch] * silu(pre);
            }
        }
        s
    };
    check("causal_conv1d", &mut inputs, loss, |x| {
        let (mut gx, mut gw, mut gb) = (vec![0.0; l * c], vec![0.0; width * c], vec![0.0; c]);
        causal_conv1d_silu_backward(
            &x[0],
            l,
            c,
            c,
            &x[1],
            width,
            Some(&x[2]),
            &f32s(&g),
            &mut gx,
            c,
            &mut gw,
            Some(&mut gb),
        );
        vec![gx, gw, gb]
    });
}

#[test]
fn selective_scan_backward_matches_finite_differences() {
    // 150 steps: more than two of the backward's recompute chunks.
    let (l, e, n) = (150, 5, 4);
    let mut rng = StdRng::seed_from_u64(4);
    let g = random(&mut rng, l * e, -1.0, 1.0);
    // u, dt, dt_bias, A (N, E), B, C (L, N), D, z
    let mut inputs = vec![
        random(&mut rng, l * e, -1.0, 1.0),
        random(&mut rng, l * e, -3.0, 0.0),
        random(&mut rng, e, -1.0, 0.0),
        random(&mut rng, n * e, -2.0, -0.2),
        random(&mut rng, l * n, -1.0, 1.0),
        random(&mut rng, l * n, -1.0, 1.0),
        random(&mut rng, e, 0.5, 1.5),
        random(&mut rng, l * e, -2.0, 2.0),
    ];
    let loss = |x: &[Vec<f64>]| {
        let mut s = 0.0;
        for c in 0..e {
            let mut h = vec![0.0; n];
            for t in 0..l {
                let delta = softplus(x[1][t * e + c] + x[2][c]);
                let u = x[0][t * e + c];
                let mut y = x[6][c] * u;
                for k in 0..n {
                    h[k] = (delta * x[3][k * e + c]).exp() * h[k] + delta * x[4][t * n + k] * u;
                    y += x[5][t * n + k] * h[k];
                }
                s += g[t * e + c] * y * silu(x[7][t * e + c]);
            }
        }
        s
    };
    check("selective_scan", &mut inputs, loss, |x| {
        let inp = ScanInputs {
            u: &x[0],
            u_rs: e,
            dt: &x[1],
            dt_rs: e,
            dt_bias: &x[2],
            a: &x[3],
            b: &x[4],
            c: &x[5],
            bc_rs: n,
            d: &x[6],
            z: Some((&x[7], e)),
        };
        let mut o: [Vec<f32>; 8] = std::array::from_fn(|i| vec![0.0; x[i].len()]);
        let [gu, gdt, gbias, ga, gb, gc, gd, gz] = o.each_mut();
        let grads = ScanGrads { u: gu, dt: gdt, z: Some((gz, e)), b: gb, c: gc, a: ga, d: gd, dt_bias: gbias };
        selective_scan_backward(&inp, l, e, n, &f32s(&g), grads);
        o.to_vec()
    });
}

#[test]
fn ssd_backward_matches_finite_differences() {
    // 70 steps: more than two recompute chunks; 4 heads in 2 groups.
    let (l, heads, p, groups, n) = (70, 4, 3, 2, 5);
    let dims = SsdDims { heads, headdim: p, groups, d_state: n, block: 16 };
    let mut rng = StdRng::seed_from_u64(5);
    let g = random(&mut rng, l * heads * p, -1.0, 1.0);
    // x, dt, da, B, C, D
    let mut inputs = vec![
        random(&mut rng, l * heads * p, -1.0, 1.0),
        random(&mut rng, l * heads, 0.01, 0.5),
        random(&mut rng, l * heads, -0.5, -0.01),
        random(&mut rng, l * groups * n, -1.0, 1.0),
        random(&mut rng, l * groups * n, -1.0, 1.0),
        random(&mut rng, heads, 0.5, 1.5),
    ];
    let loss = |x: &[Vec<f64>]| {
        let mut s = 0.0;
        for h in 0..heads {
            let gi = h / (heads / groups);
            let mut st = vec![0.0; n * p];
            for t in 0..l {
                let (dt, ea) = (x[1][t * heads + h], x[2][t * heads + h].exp());
                for k in 0..n {
                    for pp in 0..p {
                        st[k * p + pp] = ea * st[k * p + pp]
                            + x[3][t * groups * n + gi * n + k] * dt * x[0][t * heads * p + h * p + pp];
                    }
                }
                for pp in 0..p {
                    let mut y = x[5][h] * x[0][t * heads * p + h * p + pp];
                    for k in 0..n {
                        y += x[4][t * groups * n + gi * n + k] * st[k * p + pp];
                    }
                    s += g[t * heads * p + h * p + pp] * y;
                }
            }
        }
        s
    };
    check("ssd", &mut inputs, loss, |x| {
        let inp = SsdInputs {
            x: &x[0],
            x_rs: heads * p,
            dt: &x[1],
            da: &x[2],
            dt_rs: heads,
            b: &x[3],
            c: &x[4],
            bc_rs: groups * n,
            d: Some(&x[5]),
        };
        let mut o: [Vec<f32>; 6] = std::array::from_fn(|i| vec![0.0; x[i].len()]);
        let [gx, gdt, gda, gb, gc, gd] = o.each_mut();
        let grads = SsdGrads {
            x: gx,
            x_rs: heads * p,
            dt: gdt,
            da: gda,
            dt_rs: heads,
            b: gb,
            c: gc,
            bc_rs: groups * n,
            d: Some(gd),
        };
        ssd_backward(&inp, l, dims, &f32s(&g), heads * p, grads);
        o.to_vec()
    });
}

#[test]
fn cross_entropy_head_backward_matches_finite_differences() {
    // 300 rows: more than two of the fused head's row blocks.
    let (n, d, vocab) = (300, 8, 40);
    let mut rng = StdRng::seed_from_u64(6);
    let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    let scale = 1.0 / n as f64;
    let mut inputs = vec![random(&mut rng, n * d, -1.0, 1.0), random(&mut rng, vocab * d, -1.0, 1.0)];
    let loss = |x: &[Vec<f64>]| {
        let mut s = 0.0;
        for r in 0..n {
            let z: Vec<f64> = (0..vocab).map(|v| dot(&x[0][r * d..(r + 1) * d], &x[1][v * d..(v + 1) * d])).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            s += m + z.iter().map(|a| (a - m).exp()).sum::<f64>().ln() - z[targets[r] as usize];
        }
        s * scale
    };
    let want = loss(&inputs) / scale;
    check("cross_entropy head", &mut inputs, loss, |x| {
        let (mut gh, mut gw) = (vec![0.0; n * d], vec![0.0; vocab * d]);
        let grads = HeadGrads { scale: scale as f32, g_h: &mut gh, g_w: &mut gw };
        let got = head_loss_backward(&x[0], &x[1], vocab, &targets, Some(grads));
        assert_eq!(got, head_loss_backward(&x[0], &x[1], vocab, &targets, None), "the loss alone is the same");
        assert!((got - want).abs() < 1e-4 * want, "summed loss {got} vs {want}");
        vec![gh, gw]
    });
}
