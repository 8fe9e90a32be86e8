//! Autoregressive generation: prefill the prompts in parallel over their tokens (equal-length
//! prompts together), then decode all live sequences together one step at a time (weights read
//! once per step for the batch).

use crate::model::Model;
use crate::sampling::{sample, Sampling};
use crate::state::{Snapshot, State};
use anyhow::{bail, Result};
use rand::{rngs::StdRng, SeedableRng};
use std::collections::BTreeMap;
use std::time::Instant;

/// Prompt tokens per prefill pass: long enough to run at full GEMM speed, short enough that
/// activations stay small (about 50 MB for a 130M model).
pub const PREFILL_CHUNK: usize = 2048;

/// Options for [`generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// Generation of a sequence stops after it produces this token.
    pub eos: Option<u32>,
    /// Tokens at or above this id are never produced (the padded tail of the vocabulary).
    pub vocab_limit: usize,
}

/// Where a sequence starts: a fresh state and a prompt, or a saved session plus more tokens.
pub struct Start {
    pub prompt: Vec<u32>,
    pub resume: Option<Snapshot>,
}

/// What one sequence produced.
#[derive(Clone, Debug)]
pub struct Output {
    pub prompt_ids: Vec<u32>,
    pub new_ids: Vec<u32>,
    pub prefill_ms: f64,
    pub decode_ms_per_token: f64,
    /// The session after the last new token was fed back (every token consumed).
    pub snapshot: Snapshot,
}

/// Why `on_token` wants to stop a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Generates for each start. `on_token(seq, token)` is called for every new token and may stop
/// that sequence (stop strings, streaming). Sequences finish independently.
pub fn generate(
    model: &Model,
    starts: Vec<Start>,
    opts: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Control,
) -> Result<Vec<Output>> {
    opts.sampling.validate().map_err(anyhow::Error::msg)?;
    let v = model.cfg.vocab_padded;
    let limit = opts.vocab_limit.min(v);
    if limit == 0 {
        bail!("no usable vocabulary");
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let n = starts.len();
    let mut states: Vec<State> = Vec::with_capacity(n);
    let mut logits: Vec<Vec<f32>> = Vec::with_capacity(n);
    let mut history: Vec<Vec<u32>> = Vec::with_capacity(n);
    let mut prompts = Vec::with_capacity(n);
    for s in starts {
        let (state, last, mut hist) = match s.resume {
            Some(snap) => (snap.state, snap.next_logits, snap.tokens),
            None if s.prompt.is_empty() => bail!("empty prompt: give at least one token"),
            None => (model.new_state(), vec![], vec![]),
        };
        hist.extend_from_slice(&s.prompt);
        prompts.push(s.prompt);
        states.push(state);
        logits.push(last);
        history.push(hist);
    }
    // Prefill: prompts of equal length go through together (one GEMM per projection for the
    // group); long prompts in chunks carrying the state, so prefill memory stays bounded.
    let mut prefill_ms = vec![0.0f64; n];
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    (0..n).filter(|&i| !prompts[i].is_empty()).for_each(|i| by_len.entry(prompts[i].len()).or_default().push(i));
    for (len, group) in by_len {
        let t0 = Instant::now();
        for c0 in (0..len).step_by(PREFILL_CHUNK) {
            let c1 = (c0 + PREFILL_CHUNK).min(len);
            let toks: Vec<u32> = group.iter().flat_map(|&i| prompts[i][c0..c1].iter().copied()).collect();
            let out = model.forward(&toks, c1 - c0, &mut pick(&mut states, &group), 1)?;
            for (j, &i) in group.iter().enumerate() {
                logits[i] = out[j * v..(j + 1) * v].to_vec();
            }
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        group.iter().for_each(|&i| prefill_ms[i] = ms);
    }
    let mut new_ids: Vec<Vec<u32>> = vec![vec![]; n];
    let mut live: Vec<usize> = if opts.max_new_tokens == 0 { vec![] } else { (0..n).collect() };
    let mut decode_time = vec![0.0f64; n];
    // The token each live sequence feeds next.
    let mut pending: Vec<u32> = vec![0; n];
    while !live.is_empty() {
        let mut still = Vec::with_capacity(live.len());
        for &i in &live {
            let tok = sample(&mut logits[i][..limit], &history[i], &opts.sampling, &mut rng);
            new_ids[i].push(tok);
            history[i].push(tok);
            pending[i] = tok;
            let done =
                Some(tok) == opts.eos || new_ids[i].len() >= opts.max_new_tokens || on_token(i, tok) == Control::Stop;
            // Feed even the last token so the saved state has consumed everything.
            still.push((i, done));
        }
        let t0 = Instant::now();
        let feed: Vec<usize> = still.iter().map(|&(i, _)| i).collect();
        let toks: Vec<u32> = feed.iter().map(|&i| pending[i]).collect();
        let out = model.forward(&toks, 1, &mut pick(&mut states, &feed), 1)?;
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        for (j, &i) in feed.iter().enumerate() {
            logits[i] = out[j * v..(j + 1) * v].to_vec();
            decode_time[i] += dt;
        }
        live = still.into_iter().filter(|&(_, done)| !done).map(|(i, _)| i).collect();
    }
    let mut outs = Vec::with_capacity(n);
    for (i, ((state, last), hist)) in states.into_iter().zip(logits).zip(history).enumerate() {
        let k = new_ids[i].len().max(1);
        outs.push(Output {
            prompt_ids: std::mem::take(&mut prompts[i]),
            new_ids: std::mem::take(&mut new_ids[i]),
            prefill_ms: prefill_ms[i],
            decode_ms_per_token: decode_time[i] / k as f64,
            snapshot: Snapshot { state, next_logits: last, tokens: hist },
        });
    }
    Ok(outs)
}

/// Mutable references to `states[i]` for the ascending indices `idx`, in that order.
fn pick<'a>(states: &'a mut [State], idx: &[usize]) -> Vec<&'a mut State> {
    let mut want = vec![false; states.len()];
    idx.iter().for_each(|&i| want[i] = true);
    states.iter_mut().zip(want).filter(|(_, w)| *w).map(|(s, _)| s).collect()
}
