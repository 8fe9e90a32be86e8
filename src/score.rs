//! Scoring: mean next-token negative log-likelihood of a token sequence, run in chunks that
//! carry the recurrent state (constant memory in the sequence length).

use crate::backend::{Backend, Cpu};
use crate::model::Model;
use crate::state::State;
use anyhow::{bail, Result};

/// Summed NLL over the `predicted` positions (every token after the first).
#[derive(Clone, Copy, Debug, Default)]
pub struct Score {
    pub nll_sum: f64,
    pub predicted: usize,
}

impl Score {
    pub fn nll_per_token(&self) -> f64 {
        self.nll_sum / self.predicted.max(1) as f64
    }
    pub fn perplexity(&self) -> f64 {
        self.nll_per_token().exp()
    }
}

/// `log Σ exp(v)` in f64.
pub fn log_sum_exp(v: &[f32]) -> f64 {
    let m = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// Scores `ids` in chunks of `chunk` tokens (`chunk == 1` is the pure recurrence). Each chunk's
/// logits (`len × vocab_padded`) are passed to `on_logits` as they are produced.
pub fn score(model: &Model, ids: &[u32], chunk: usize, on_logits: impl FnMut(&[f32]) -> Result<()>) -> Result<Score> {
    score_on(&mut Cpu::new(model), ids, chunk, on_logits)
}

/// [`score`] on any backend.
pub fn score_on(
    be: &mut dyn Backend,
    ids: &[u32],
    chunk: usize,
    mut on_logits: impl FnMut(&[f32]) -> Result<()>,
) -> Result<Score> {
    if chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    if ids.len() < 2 {
        bail!("a sequence needs at least 2 tokens to be scored, got {}", ids.len());
    }
    let v = be.cfg().vocab_padded;
    be.begin(vec![State::new(be.cfg())])?;
    let mut s = Score::default();
    for start in (0..ids.len()).step_by(chunk) {
        let end = (start + chunk).min(ids.len());
        let len = end - start;
        let logits = be.forward(&ids[start..end], len, &[0], len)?;
        for (j, row) in logits.chunks(v).enumerate() {
            if let Some(&target) = ids.get(start + j + 1) {
                s.nll_sum += log_sum_exp(row) - row[target as usize] as f64;
                s.predicted += 1;
            }
        }
        on_logits(&logits)?;
    }
    Ok(s)
}
