//! Next-token choice with `mamba_ssm`'s parameters and order: repetition penalty, then greedy
//! (top-k 1 or temperature 0) or top-k → temperature → top-p within the top-k, or, with
//! top-k 0: temperature → min-p → top-p. Min-p keeps tokens with p ≥ min_p · p_max (the
//! correct rule; the official code compares logits against vocabulary entry 0 instead).

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
    // Candidates as (token, logit), best first.
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let k = if s.top_k > 0 { s.top_k.min(cand.len()) } else { cand.len() };
    if k < cand.len() {
        cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        cand.truncate(k);
    }
    cand.sort_by(|a, b| b.1.total_cmp(&a.1));
    let inv_t = 1.0 / s.temperature;
    let max = cand[0].1 * inv_t;
    let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 * inv_t - max) as f64).exp()).collect();
    if s.top_k == 0 && s.min_p > 0.0 {
        // probs[0] is the maximum (unnormalised weight 1).
        let keep = probs.iter().take_while(|&&p| p >= s.min_p as f64 * probs[0]).count().max(1);
        probs.truncate(keep);
    }
    if s.top_p > 0.0 && s.top_p < 1.0 {
        let total: f64 = probs.iter().sum();
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p / total;
            if acc >= s.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, p) in probs.iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}
