//! Scoring: mean next-token negative log-likelihood of a token sequence, run in chunks that
//! carry the recurrent state (constant memory in the sequence length).

use crate::backend::{Backend, Cpu};
use crate::model::Model;
use crate::ops::cross_entropy;
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

/// Scores `ids` in chunks of `chunk` tokens (`chunk == 1` is the pure recurrence).
/// `on_chunk(tokens, logits)` is called after each chunk with its token count and, if
/// `keep_logits`, its logits (`len × vocab_padded`; otherwise empty, and the logits never leave
/// the backend: each position's cross-entropy is computed where they are).
pub fn score(
    model: &Model,
    ids: &[u32],
    chunk: usize,
    keep_logits: bool,
    on_chunk: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<Score> {
    score_on(&mut Cpu::new(model), ids, chunk, keep_logits, on_chunk)
}

/// [`score`] on any backend.
pub fn score_on(
    be: &mut dyn Backend,
    ids: &[u32],
    chunk: usize,
    keep_logits: bool,
    mut on_chunk: impl FnMut(usize, &[f32]) -> Result<()>,
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
        // Each position predicts the next token; the sequence's last has nothing to predict.
        let targets = &ids[start + 1..(end + 1).min(ids.len())];
        let (nll, logits) = if keep_logits {
            let logits = be.forward(&ids[start..end], len, &[0], len)?;
            (cross_entropy::nll_rows(&logits, v, targets), logits)
        } else {
            (be.forward_nll(&ids[start..end], 0, targets)?, vec![])
        };
        s.nll_sum += nll.iter().sum::<f64>();
        s.predicted += nll.len();
        on_chunk(len, &logits)?;
    }
    Ok(s)
}
