//! Next-token choice with `mamba_ssm`'s parameters and order: repetition penalty, then greedy
//! (top-k 1 or temperature 0) or top-k → temperature → top-p within the top-k, or, with
//! top-k 0: temperature → min-p → top-p. Min-p keeps tokens with p ≥ min_p · p_max (the
//! correct rule; the official code compares logits against vocabulary entry 0 instead). With
//! top-k 0 and no top-p the draw walks the kept tokens in id order, as the GPU's sampler
//! (src/ops/sampling.cu) does, so from the same uniform number both pick the same token up to
//! rounding.

use rand::Rng;

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

/// Index of the largest value (the first on ties, as `argmax` does).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Picks the next token from `logits` (already restricted to the usable vocabulary), given
/// the tokens seen so far. `logits` is modified (penalty applied).
pub fn sample(logits: &mut [f32], history: &[u32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    if s.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in history {
            if let Some(f) = seen.get_mut(t as usize) {
                if !*f {
                    *f = true;
                    let l = &mut logits[t as usize];
                    *l = if *l < 0.0 { *l * s.repetition_penalty } else { *l / s.repetition_penalty };
                }
            }
        }
    }
    if s.is_greedy() {
        return argmax(logits) as u32;
    }
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    if s.top_k > 0 && s.top_k < cand.len() {
        cand.select_nth_unstable_by(s.top_k - 1, |a, b| b.1.total_cmp(&a.1));
        cand.truncate(s.top_k);
    }
    // Unnormalised probabilities after temperature; the most likely token has weight 1.
    let inv_t = 1.0 / s.temperature as f64;
    let max = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1)) as f64;
    let mut w: Vec<(u32, f64)> = cand.iter().map(|c| (c.0, ((c.1 as f64 - max) * inv_t).exp())).collect();
    if s.top_k == 0 && s.min_p > 0.0 {
        w.retain(|c| c.1 >= s.min_p as f64);
    }
    if s.top_p > 0.0 && s.top_p < 1.0 {
        nucleus(&mut w, s.top_p as f64);
    }
    let total: f64 = w.iter().map(|c| c.1).sum();
    let mut u = rng.random::<f64>() * total;
    for c in &w {
        u -= c.1;
        if u <= 0.0 {
            return c.0;
        }
    }
    w[w.len() - 1].0
}

/// Keeps the smallest set of most likely entries whose mass reaches `p` of the total (the one
/// that crosses the threshold included). Sorts only as many entries as it needs: a few dozen
/// usually carry the mass, so this is O(V) rather than a full sort of the vocabulary.
fn nucleus(w: &mut Vec<(u32, f64)>, p: f64) {
    let goal = p * w.iter().map(|c| c.1).sum::<f64>();
    let by_weight = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1);
    let mut k = w.len().min(64);
    loop {
        if k < w.len() {
            w.select_nth_unstable_by(k - 1, by_weight);
        }
        w[..k].sort_by(by_weight);
        let mut acc = 0.0;
        for i in 0..k {
            acc += w[i].1;
            if acc >= goal {
                w.truncate(i + 1);
                return;
            }
        }
        if k == w.len() {
            return;
        }
        k = (k * 4).min(w.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn draws(logits: &[f32], s: &Sampling, n: usize) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(7);
        (0..n).map(|_| sample(&mut logits.to_vec(), &[], s, &mut rng)).collect()
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
        let t = sample(&mut l, &[0, 0, 2], &s, &mut StdRng::seed_from_u64(0));
        assert_eq!(l, vec![1.0, 1.5, -2.0]);
        assert_eq!(t, 1);
    }
}
