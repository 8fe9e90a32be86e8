//! Autoregressive generation: prefill the prompts in parallel over their tokens (equal-length
//! prompts together), then decode all live sequences together one step at a time (weights read
//! once per step for the batch).

use crate::backend::{Backend, Cpu};
use crate::model::Model;
use crate::sampling::{sample, Sampling};
use crate::state::{Snapshot, State};
use crate::text_stream::TextStream;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
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
    /// Sequence `i` of the batch draws from its own generator seeded with `seed + i`, so its
    /// tokens do not depend on which other sequences share the batch.
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
    /// Wall time per new token as the caller sees it: from the end of the prefill to this
    /// sequence's last token, host work (sampling, the `on_token` callback) included.
    pub decode_ms_per_token: f64,
    /// The part of it spent in the model's forward steps (waiting for the device included).
    pub device_ms_per_token: f64,
    /// The session after the last new token was fed back (every token consumed).
    pub snapshot: Snapshot,
}

/// Why `on_token` wants to stop a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

/// Generates for each start on the CPU. `on_token(seq, token)` is called for every new token and
/// may stop that sequence (stop strings, streaming). Sequences finish independently.
pub fn generate(
    model: &Model,
    starts: Vec<Start>,
    opts: &GenerateOptions,
    on_token: impl FnMut(usize, u32) -> Control,
) -> Result<Vec<Output>> {
    generate_on(&mut Cpu::new(model), starts, opts, on_token)
}

/// [`generate`] on any backend.
pub fn generate_on(
    be: &mut dyn Backend,
    starts: Vec<Start>,
    opts: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32) -> Control,
) -> Result<Vec<Output>> {
    opts.sampling.validate().map_err(anyhow::Error::msg)?;
    let v = be.cfg().vocab_padded;
    let limit = opts.vocab_limit.min(v);
    if limit == 0 {
        bail!("no usable vocabulary");
    }
    let n = starts.len();
    let mut rngs: Vec<StdRng> = (0..n as u64).map(|i| StdRng::seed_from_u64(opts.seed.wrapping_add(i))).collect();
    let mut states: Vec<State> = Vec::with_capacity(n);
    let mut logits: Vec<Vec<f32>> = Vec::with_capacity(n);
    let mut history: Vec<Vec<u32>> = Vec::with_capacity(n);
    let mut prompts = Vec::with_capacity(n);
    for s in starts {
        let (state, last, mut hist) = match s.resume {
            Some(snap) => (snap.state, snap.next_logits, snap.tokens),
            None if s.prompt.is_empty() => bail!("empty prompt: give at least one token"),
            None => (State::new(be.cfg()), vec![], vec![]),
        };
        hist.extend_from_slice(&s.prompt);
        prompts.push(s.prompt);
        states.push(state);
        logits.push(last);
        history.push(hist);
    }
    // Slots are ordered by prompt length, so prompts of equal length sit in consecutive slots.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut slot = vec![0; n];
    order.iter().enumerate().for_each(|(s, &i)| slot[i] = s);
    be.begin(order.iter().map(|&i| std::mem::replace(&mut states[i], State { layers: vec![], pos: 0 })).collect())?;
    // Prefill: prompts of equal length go through together (one GEMM per projection for the
    // group); long prompts in chunks carrying the state, so prefill memory stays bounded.
    let mut prefill_ms = vec![0.0f64; n];
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    order
        .iter()
        .filter(|&&i| !prompts[i].is_empty())
        .for_each(|&i| by_len.entry(prompts[i].len()).or_default().push(i));
    for (len, group) in by_len {
        let t0 = Instant::now();
        let slots: Vec<usize> = group.iter().map(|&i| slot[i]).collect();
        for c0 in (0..len).step_by(PREFILL_CHUNK) {
            let c1 = (c0 + PREFILL_CHUNK).min(len);
            let toks: Vec<u32> = group.iter().flat_map(|&i| prompts[i][c0..c1].iter().copied()).collect();
            let out = be.forward(&toks, c1 - c0, &slots, 1)?;
            for (j, &i) in group.iter().enumerate() {
                logits[i].clear();
                logits[i].extend_from_slice(&out[j * v..(j + 1) * v]);
            }
        }

        let ms = t0.elapsed().as_secs_f64() * 1e3;
        group.iter().for_each(|&i| prefill_ms[i] = ms);
    }
    let mut new_ids: Vec<Vec<u32>> = vec![vec![]; n];
    let mut live: Vec<usize> = if opts.max_new_tokens == 0 { vec![] } else { order.clone() };
    let mut decode_time = vec![0.0f64; n];
    let mut last_at = vec![0.0f64; n];
    let decode_start = Instant::now();
    let greedy = opts.sampling.is_greedy();
    // A sequence's state once it has consumed everything (taken when it finishes).
    let mut finals: Vec<Option<State>> = vec![None; n];
    // The backend may pick the tokens itself (the GPU: no logits copied out per step), drawing
    // on the same random numbers, in the same order, as the host would; `next` holds what it
    // picked.
    let on_device = be.picks(&opts.sampling);
    let mut next: Vec<Option<u32>> = vec![None; n];
    while !live.is_empty() {
        let mut feed = Vec::with_capacity(live.len());
        let mut toks = Vec::with_capacity(live.len());
        let mut done = Vec::new();
        for &i in &live {
            let tok = match next[i].take() {
                Some(t) => t,
                None => {
                    let u = if greedy { 0.0 } else { rngs[i].random::<f64>() };
                    sample(&mut logits[i][..limit], &history[i], &opts.sampling, u)
                }
            };
            new_ids[i].push(tok);
            history[i].push(tok);
            if Some(tok) == opts.eos || new_ids[i].len() >= opts.max_new_tokens || on_token(i, tok) == Control::Stop {
                done.push(i);
            }
            last_at[i] = decode_start.elapsed().as_secs_f64() * 1e3;
            // Feed even the last token so the saved state has consumed everything.
            feed.push(slot[i]);
            toks.push(tok);
        }
        let t0 = Instant::now();
        if on_device {
            let us: Vec<f64> =
                live.iter().map(|&i| if greedy || done.contains(&i) { 0.0 } else { rngs[i].random::<f64>() }).collect();
            let hist: Vec<&[u32]> = live.iter().map(|&i| history[i].as_slice()).collect();
            let ids = be.forward_pick(&toks, &feed, limit, &opts.sampling, &us, &hist)?;
            live.iter().zip(ids).for_each(|(&i, t)| next[i] = Some(t));
        } else {
            let out = be.forward(&toks, 1, &feed, 1)?;
            for (j, &i) in live.iter().enumerate() {
                logits[i].clear();
                logits[i].extend_from_slice(&out[j * v..(j + 1) * v]);
            }
        }
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        live.iter().for_each(|&i| decode_time[i] += dt);
        for &i in &done {
            finals[i] = Some(be.state(slot[i])?);
            be.retire(slot[i]);
            if on_device {
                logits[i] = be.picked_logits(slot[i])?;
            }
        }
        live.retain(|i| !done.contains(i));
    }
    let mut outs = Vec::with_capacity(n);
    for i in 0..n {
        let state = match finals[i].take() {
            Some(s) => s,
            None => be.state(slot[i])?,
        };
        let k = new_ids[i].len().max(1);
        outs.push(Output {
            prompt_ids: std::mem::take(&mut prompts[i]),
            new_ids: std::mem::take(&mut new_ids[i]),
            prefill_ms: prefill_ms[i],
            decode_ms_per_token: last_at[i] / k as f64,
            device_ms_per_token: decode_time[i] / k as f64,
            snapshot: Snapshot {
                state,
                next_logits: std::mem::take(&mut logits[i]),
                tokens: std::mem::take(&mut history[i]),
            },
        });
    }
    Ok(outs)
}

/// [`generate_on`] with each sequence's text streamed (the loop `mamba-lm generate` runs):
/// `on_text(seq, piece)` gets text as it becomes final, never part of a stop string or of an
/// incomplete character; a stop string ends its sequence, and the end-of-sequence token is
/// not part of the text. Returns each output with its whole text.
pub fn generate_text(
    be: &mut dyn Backend,
    starts: Vec<Start>,
    opts: &GenerateOptions,
    tok: &Tokenizer,
    stops: &[String],
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<(Output, String)>> {
    let mut streams: Vec<TextStream> = starts.iter().map(|_| TextStream::new(tok, stops)).collect();
    let mut err = None;
    let outs = generate_on(be, starts, opts, |i, id| {
        let step = if Some(id) == opts.eos { streams[i].finish().map(|t| (t, true)) } else { streams[i].push(id) };
        match step {
            Ok((text, stop)) => {
                if !text.is_empty() {
                    on_text(i, &text);
                }
                if stop {
                    Control::Stop
                } else {
                    Control::Continue
                }
            }
            Err(e) => {
                err = Some(e);
                Control::Stop
            }
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    // Sequences that reached their length limit release what they held back.
    for (i, s) in streams.iter_mut().enumerate() {
        let text = s.finish()?;
        if !text.is_empty() {
            on_text(i, &text);
        }
    }
    Ok(outs.into_iter().zip(streams).map(|(o, s)| (o, s.text().to_string())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::init::random_model;
    use crate::tensor::DType;

    /// The CPU backend, checking that generation keeps `Backend::retire`'s promise: a retired
    /// slot is never fed or read again (the GPU steps such slots with placeholder tokens).
    struct Strict<'m> {
        cpu: Cpu<'m>,
        retired: Vec<bool>,
    }

    impl Backend for Strict<'_> {
        fn cfg(&self) -> &Config {
            self.cpu.cfg()
        }
        fn begin(&mut self, states: Vec<State>) -> Result<()> {
            self.retired = vec![false; states.len()];
            self.cpu.begin(states)
        }
        fn forward(&mut self, tokens: &[u32], l: usize, slots: &[usize], n_logits: usize) -> Result<Vec<f32>> {
            assert!(slots.iter().all(|&i| !self.retired[i]), "a retired slot was fed");
            self.cpu.forward(tokens, l, slots, n_logits)
        }
        fn state(&mut self, i: usize) -> Result<State> {
            assert!(!self.retired[i], "a retired slot's state was read");
            self.cpu.state(i)
        }
        fn retire(&mut self, i: usize) {
            assert!(!self.retired[i], "slot {i} retired twice");
            self.retired[i] = true;
        }
    }

    #[test]
    fn finished_sequences_are_retired_and_left_alone() {
        let m = random_model(&Config::preset("tiny").unwrap(), 3, DType::F32).unwrap();
        let opts = GenerateOptions {
            max_new_tokens: 6,
            sampling: Sampling::default(), // greedy (top-k 1)
            seed: 1,
            eos: None,
            vocab_limit: m.cfg.vocab_size,
        };
        let prompts = [vec![5, 6, 7, 8, 9], vec![1, 2], vec![3], vec![4, 4, 4]];
        let starts = || prompts.iter().map(|p| Start { prompt: p.clone(), resume: None }).collect::<Vec<_>>();
        // Sequence i stops after i + 2 tokens, so slots retire one by one while others decode.
        let stop = |i: usize, n: &mut [usize; 4]| {
            n[i] += 1;
            if n[i] >= i + 2 {
                Control::Stop
            } else {
                Control::Continue
            }
        };
        let mut strict = Strict { cpu: Cpu::new(&m), retired: vec![] };
        let mut n = [0; 4];
        let got = generate_on(&mut strict, starts(), &opts, |i, _| stop(i, &mut n)).unwrap();
        assert!(strict.retired.iter().all(|&r| r), "every finished slot is retired");
        let mut n = [0; 4];
        let want = generate(&m, starts(), &opts, |i, _| stop(i, &mut n)).unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.new_ids.len(), (i + 2).min(6));
            assert_eq!(a.new_ids, b.new_ids);
            assert_eq!(a.snapshot.state.pos, b.snapshot.state.pos);
        }
    }
}
