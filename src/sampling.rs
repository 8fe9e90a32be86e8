//! Next-token choice with `mamba_ssm`'s parameters and order: repetition penalty, then greedy
//! (top-k 1 or temperature 0) or top-k → temperature → top-p within the top-k, or, with
//! top-k 0: temperature → min-p → top-p. Min-p keeps tokens with p ≥ min_p · p_max (the
//! correct rule; the official code compares logits against vocabulary entry 0 instead). With
//! top-k 0 and no top-p the draw walks the kept tokens in id order, as the GPU's sampler
//! (src/ops/sampling.cu) does, so from the same uniform number both pick the same token up to
//! rounding.

/// Sampling parameters (names and defaults as in `mamba_ssm`'s `generate`).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 1.0, top_k: 1, top_p: 0.0, min_p: 0.0, repetition_penalty: 1.0 }
    }
}

impl Sampling {
    pub fn is_greedy(&self) -> bool {
        self.top_k == 1 || self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("--temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(format!("--top-p must be in [0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("--min-p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(format!("--repetition-penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// Index of the largest value (the first on ties, as `argmax` does; NaNs are passed over).
/// Two passes that vectorise: the largest value, then where it first occurs.
pub fn argmax(v: &[f32]) -> usize {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            if x > *m {
                *m = x;
            }
        }
    }
    let m = lanes.iter().chain(chunks.remainder()).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    v.iter().position(|&x| x == m).unwrap_or(0)
}

/// Applies the repetition penalty (CTRL rule) to every id in `history`, each once.
pub fn penalize(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in history {
        if let Some(f) = seen.get_mut(t as usize) {
            if !*f {
                *f = true;
                let l = &mut logits[t as usize];
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }
}

/// Candidate order for top-k, top-p and reported logprobs, shared with the GPU (sampling.cu):
/// larger logit first, the lower id first among equals.
pub(crate) fn before(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Picks the next token from `logits` (already restricted to the usable vocabulary), given the
/// tokens seen so far and a uniform number `u` in [0, 1) (unused when greedy). `logits` is
/// modified (penalty applied). The kept tokens are walked in id order with top-k 0 and no
/// top-p, else from the most likely down (the order of [`before`]); the pick is the first
/// where the running weight reaches `u` times the kept total.
pub fn sample(logits: &mut [f32], history: &[u32], s: &Sampling, u: f64) -> u32 {
    penalize(logits, history, s.repetition_penalty);
    if s.is_greedy() {
        return argmax(logits) as u32;
    }
    let inv_t = 1.0 / s.temperature as f64;
    let top_p = s.top_p > 0.0 && s.top_p < 1.0;
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &c| m.max(c)) as f64;
    // Unnormalised probabilities after temperature; the most likely token has weight 1.
    let weight = |l: f32| ((l as f64 - max) * inv_t).exp();
    let min_p = if s.top_k == 0 { s.min_p as f64 } else { 0.0 };
    if s.top_k == 0 && !top_p {
        let w: Vec<(u32, f64)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, weight(l))).filter(|c| c.1 >= min_p).collect();
        return draw(&w, u);
    }
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    if s.top_k > 0 {
        if s.top_k < cand.len() {
            cand.select_nth_unstable_by(s.top_k - 1, before);
            cand.truncate(s.top_k);
        }
    } else {
        cand.retain(|c| weight(c.1) >= min_p);
    }
    let mut w: Vec<Weighted> = cand.iter().map(|c| (c.0, c.1, weight(c.1))).collect();
    let kept = if top_p {
        let goal = s.top_p as f64 * w.iter().map(|c| c.2).sum::<f64>();
        first_reaching(&mut w, goal) + 1
    } else {
        w.len()
    };
    let total: f64 = w[..kept].iter().map(|c| c.2).sum();
    let j = first_reaching(&mut w[..kept], u * total);
    w[j].0
}

/// A candidate: id, logit, weight.
type Weighted = (u32, f32, f64);

/// The first entry where the running weight reaches `u` times the total, in id order (the
/// last on rounding).
fn draw(w: &[(u32, f64)], u: f64) -> u32 {
    let mut left = u * w.iter().map(|c| c.1).sum::<f64>();
    for c in w {
        left -= c.1;
        if left <= 0.0 {
            return c.0;
        }
    }
    w[w.len() - 1].0
}

/// The position `j` (in [`before`] order) of the first candidate whose running weight, counted
/// from the most likely, reaches `x` (the last on rounding); `c` is reordered so that `c[..=j]`
/// are the candidates up to it. A weighted quickselect: each round splits the range at its
/// median and keeps the half that holds the answer, so it takes O(n) rather than a sort — a
/// nucleus can hold most of a 50K vocabulary.
fn first_reaching(c: &mut [Weighted], x: f64) -> usize {
    let order = |a: &Weighted, b: &Weighted| before(&(a.0, a.1), &(b.0, b.1));
    let (mut lo, mut hi, mut acc) = (0, c.len(), 0.0);
    while hi - lo > 64 {
        let mid = lo + (hi - lo) / 2;
        c[lo..hi].select_nth_unstable_by(mid - lo, order);
        let left: f64 = c[lo..mid].iter().map(|e| e.2).sum();
        if acc + left >= x {
            hi = mid;
        } else if acc + left + c[mid].2 >= x {
            return mid;
        } else {
            acc += left + c[mid].2;
            lo = mid + 1;
        }
    }
    c[lo..hi].sort_unstable_by(order);
    for (j, e) in c[lo..hi].iter().enumerate() {
        acc += e.2;
        if acc >= x {
            return lo + j;
        }
    }
    hi.max(1) - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn draws(logits: &[f32], s: &Sampling, n: usize) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(7);
        (0..n).map(|_| sample(&mut logits.to_vec(), &[], s, rng.random())).collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let l = [0.1, 3.0, -2.0, 2.9];
        assert!(draws(&l, &Sampling::default(), 5).iter().all(|&t| t == 1));
        let cold = Sampling { temperature: 0.0, top_k: 0, ..Sampling::default() };
        assert!(draws(&l, &cold, 5).iter().all(|&t| t == 1));
    }

    #[test]
    fn top_k_and_top_p_bound_the_candidates() {
        let l = [0.0, 1.0, 2.0, 3.0, 4.0];
        let k2 = Sampling { top_k: 2, ..Sampling::default() };
        let d = draws(&l, &k2, 200);
        assert!(d.iter().all(|&t| t == 3 || t == 4) && d.contains(&3) && d.contains(&4));
        // softmax([0..4]): p4 = 0.636, p3 = 0.234: top-p 0.8 keeps exactly {4, 3}.
        let p = Sampling { top_k: 0, top_p: 0.8, ..Sampling::default() };
        let d = draws(&l, &p, 200);
        assert!(d.iter().all(|&t| t == 3 || t == 4) && d.contains(&3));
        let p = Sampling { top_k: 0, top_p: 0.5, ..Sampling::default() };
        assert!(draws(&l, &p, 50).iter().all(|&t| t == 4));
    }

    #[test]
    fn min_p_is_relative_to_the_most_likely_token() {
        // p_i / p_max = e^(l_i − 4): 1, 0.37, 0.135, 0.05, 0.018.
        let l = [0.0, 1.0, 2.0, 3.0, 4.0];
        let s = Sampling { top_k: 0, min_p: 0.2, ..Sampling::default() };
        let d = draws(&l, &s, 300);
        assert!(d.iter().all(|&t| t >= 3) && d.contains(&3));
    }

    #[test]
    fn repetition_penalty_follows_the_ctrl_rule() {
        let mut l = vec![2.0, 1.5, -1.0];
        let s = Sampling { repetition_penalty: 2.0, ..Sampling::default() };
        let t = sample(&mut l, &[0, 0, 2], &s, 0.5);
        assert_eq!(l, vec![1.0, 1.5, -2.0]);
        assert_eq!(t, 1);
    }

    #[test]
    fn weighted_select_agrees_with_a_sorted_walk() {
        let mut rng = StdRng::seed_from_u64(5);
        for n in [1, 3, 64, 65, 1000, 20_000] {
            // Logits on a coarse grid, so many are equal and the id decides their order.
            let c: Vec<Weighted> = (0..n)
                .map(|i| {
                    let l = (rng.random_range(-40..40) as f32) / 8.0;
                    (i as u32, l, (l as f64).exp())
                })
                .collect();
            let mut sorted = c.clone();
            sorted.sort_by(|a, b| before(&(a.0, a.1), &(b.0, b.1)));
            let total: f64 = c.iter().map(|e| e.2).sum();
            for _ in 0..20 {
                let x = rng.random::<f64>() * total;
                let mut acc = 0.0;
                let want = sorted.iter().position(|e| {
                    acc += e.2;
                    acc >= x
                });
                let mut got = c.clone();
                let j = first_reaching(&mut got, x);
                assert_eq!(Some(got[j].0), want.map(|k| sorted[k].0), "n {n} x {x}");
            }
        }
    }
}
