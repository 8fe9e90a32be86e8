//! Continuous batching: independent sequences share the slots of one [`Backend`]. Each call of
//! [`Scheduler::step`] admits queued jobs into free slots, feeds one bounded chunk of prompt
//! (several prompts at once when they sit in consecutive slots with chunks of one length, so a
//! batch of equal prompts prefills as one pass), then advances every decoding sequence by one token
//! together (weights read once for the batch). Sequences join and leave at any step; a
//! finished or cancelled one frees its slot for the next job. `mamba-lm generate` and the
//! server both run on it.

use crate::backend::Backend;
use crate::sampling::{before, sample, Sampling};
use crate::state::{Kept, Snapshot, State};
use crate::text_stream::TextStream;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::VecDeque;
use std::time::Instant;

/// How one sequence is generated.
#[derive(Clone, Debug)]
pub struct Params {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Seed of the sequence's own generator: its tokens do not depend on the other sequences.
    pub seed: u64,
    /// Generation stops after this token (not part of the text).
    pub eos: Option<u32>,
    /// Tokens at or above this id are never produced (the padded tail of the vocabulary).
    pub vocab_limit: usize,
    /// Text that ends the sequence (not part of the text); needs a tokenizer.
    pub stops: Vec<String>,
    /// Report each new token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
}

/// A sequence to run: a prompt from a fresh state, or more tokens after a saved snapshot.
pub struct Job {
    pub prompt: Vec<u32>,
    pub resume: Option<Snapshot>,
    pub params: Params,
    /// Prompt positions (1..=prompt.len()) after which the state is handed out as an
    /// [`Event::Mark`] (for a prefix cache): the prefill pauses there.
    pub marks: Vec<usize>,
    /// Whether its [`Output`] carries the final state (on the GPU, a copy off the device).
    pub keep_state: bool,
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It produced `max_new_tokens`.
    Length,
    /// It produced the end-of-sequence token.
    Eos,
    /// A stop string appeared, or the callback asked to stop.
    Stop,
    Cancelled,
}

/// A new token's log-probability under the model (before penalties and temperature) and the
/// most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct Logprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What one sequence produced.
#[derive(Clone, Debug)]
pub struct Output {
    pub prompt_ids: Vec<u32>,
    pub new_ids: Vec<u32>,
    /// The released text (with a tokenizer; empty without).
    pub text: String,
    pub finish: Finish,
    /// Time in the forward passes that fed its prompt.
    pub prefill_ms: f64,
    /// Wall time per new token as the caller sees it: from the end of the prefill to this
    /// sequence's last token, host work (sampling, the callback) included.
    pub decode_ms_per_token: f64,
    /// The part of it spent in the model's forward steps (waiting for the device included).
    pub device_ms_per_token: f64,
    /// The session after the last new token was fed back (every token consumed), if the
    /// job asked to keep it.
    pub snapshot: Option<Snapshot>,
}

/// What [`Scheduler::step`] reports about a sequence.
pub enum Event<'e> {
    /// The state after a prompt position asked for in [`Job::marks`], kept where the backend
    /// runs ([`Backend::keep`]).
    Mark(usize, Snapshot),
    /// A new token, with the text it makes final (held back while it may start a stop
    /// string or ends inside a character).
    Token { id: u32, text: &'e str, logprob: Option<Logprob> },
    /// Text released without a new token: what was held back when the sequence ended.
    Text(&'e str),
    /// The sequence ended; its slot is free.
    Done(Box<Output>),
}

/// Why a job was refused: a mistake in the request, not a failure of the model.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Sampling(String),
    #[error("no usable vocabulary")]
    NoVocabulary,
    #[error("empty prompt: give at least one token")]
    EmptyPrompt,
    #[error("token id {id} is out of range: the model's vocabulary has {vocab} entries")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the saved session does not match the model's shape")]
    StateShape,
    #[error("the saved session holds no logits for its next token: give some prompt to continue it")]
    NoLogits,
}

/// Whether the callback wants the sequence to go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Stop,
}

struct Seq<'t> {
    id: u64,
    params: Params,
    prompt: Vec<u32>,
    /// Prompt tokens fed so far.
    fed: usize,
    marks: Vec<usize>,
    keep_state: bool,
    /// Every token the state has seen or will see next (prompt, resumed history, new ids).
    history: Vec<u32>,
    new_ids: Vec<u32>,
    /// Logits of the next token on the host; empty when the backend picked it (`next`).
    logits: Vec<f32>,
    next: Option<u32>,
    rng: StdRng,
    stream: Option<TextStream<'t>>,
    finish: Option<Finish>,
    prefill_ms: f64,
    decode_from: Option<Instant>,
    last_ms: f64,
    device_ms: f64,
}

impl Seq<'_> {
    fn prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }

    /// Past its prompt with no tokens asked for.
    fn done_before_start(&self) -> bool {
        !self.prefilling() && self.params.max_new_tokens == 0
    }

    /// Where the next prefill chunk of at most `chunk` tokens ends.
    fn chunk_end(&self, chunk: usize) -> usize {
        let end = (self.fed + chunk).min(self.prompt.len());
        self.marks.iter().copied().filter(|&m| m > self.fed).min().map_or(end, |m| m.min(end))
    }
}

/// Sequences of one backend, queued and running.
pub struct Scheduler<'b, 't> {
    be: &'b mut dyn Backend,
    tok: Option<&'t Tokenizer>,
    slots: Vec<Option<Seq<'t>>>,
    queue: VecDeque<(u64, Job)>,
    /// Jobs cancelled while queued, reported by the next step.
    cancelled: Vec<(u64, Job)>,
    next_id: u64,
    /// Prompt tokens fed per step at most while other sequences decode (bounds their
    /// per-token latency); with none decoding, prompts are fed until one is ready.
    pub prefill_budget: usize,
    /// Prompt tokens per forward pass (bounds activation memory).
    pub chunk: usize,
    /// Where the steps' time went so far.
    pub busy: Busy,
}

/// Seconds spent in the backend, by kind of work: prompt passes, decode steps, and states
/// copied in or out (resumed sessions and cached prefixes, snapshots for the cache).
#[derive(Clone, Copy, Debug, Default)]
pub struct Busy {
    pub prefill: f64,
    pub decode: f64,
    pub states: f64,
}

/// Runs `f`, adding its wall time to `acc` (seconds).
fn timed<T>(acc: &mut f64, f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let out = f();
    *acc += t0.elapsed().as_secs_f64();
    out
}

/// Prompt tokens per prefill pass: long enough to run at full GEMM speed, short enough that
/// activations stay small (about 50 MB for a 130M model).
pub const PREFILL_CHUNK: usize = 2048;

impl<'b, 't> Scheduler<'b, 't> {
    /// A scheduler of `capacity` slots. With a tokenizer, tokens come with their text and stop
    /// strings apply.
    pub fn new(be: &'b mut dyn Backend, capacity: usize, tok: Option<&'t Tokenizer>) -> Result<Self> {
        if capacity == 0 {
            bail!("a scheduler needs at least one slot");
        }
        let cfg = be.cfg().clone();
        be.begin(vec![State::new(&cfg); capacity])?;
        (0..capacity).for_each(|i| be.retire(i));
        let slots = (0..capacity).map(|_| None).collect();
        Ok(Scheduler {
            be,
            tok,
            slots,
            queue: VecDeque::new(),
            cancelled: Vec::new(),
            next_id: 0,
            prefill_budget: usize::MAX,
            chunk: PREFILL_CHUNK,
            busy: Busy::default(),
        })
    }

    /// Checks a job and queues it; returns its id.
    pub fn submit(&mut self, job: Job) -> Result<u64, Refused> {
        job.params.sampling.validate().map_err(Refused::Sampling)?;
        let v = self.be.cfg().vocab_padded;
        if job.params.vocab_limit.min(v) == 0 {
            return Err(Refused::NoVocabulary);
        }
        match &job.resume {
            None if job.prompt.is_empty() => return Err(Refused::EmptyPrompt),
            Some(s) if s.state.check(self.be.cfg()).is_err() => return Err(Refused::StateShape),
            Some(s) if job.prompt.is_empty() && s.next_logits.len() != v => return Err(Refused::NoLogits),
            _ => {}
        }
        if let Some(&id) = job.prompt.iter().find(|&&t| t as usize >= v) {
            return Err(Refused::TokenOutOfRange { id, vocab: v });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.queue.push_back((id, job));
        Ok(id)
    }

    /// Jobs queued, running, or cancelled and not yet reported.
    pub fn len(&self) -> usize {
        self.queue.len() + self.cancelled.len() + self.running()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Jobs waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Jobs in slots.
    pub fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Ends a job at the next step, which reports it [`Finish::Cancelled`].
    pub fn cancel(&mut self, id: u64) {
        if let Some(s) = self.slots.iter_mut().flatten().find(|s| s.id == id) {
            s.finish.get_or_insert(Finish::Cancelled);
        } else if let Some(k) = self.queue.iter().position(|(i, _)| *i == id) {
            let job = self.queue.remove(k).unwrap();
            self.cancelled.push(job);
        }
    }

    /// Admits, prefills and decodes as described in the module's header, calling `on(id,
    /// event)` for what happened; `Control::Stop` from a token's callback ends that sequence.
    /// Returns whether jobs remain.
    pub fn step(&mut self, on: &mut dyn FnMut(u64, Event) -> Control) -> Result<bool> {
        for (id, job) in std::mem::take(&mut self.cancelled) {
            let cfg = self.be.cfg();
            let snapshot = job.keep_state.then(|| Snapshot {
                state: job.resume.map_or_else(|| Kept::Host(State::new(cfg)), |s| s.state),
                next_logits: vec![],
                tokens: vec![],
            });
            let out = Output {
                prompt_ids: job.prompt,
                new_ids: vec![],
                text: String::new(),
                finish: Finish::Cancelled,
                prefill_ms: 0.0,
                decode_ms_per_token: 0.0,
                device_ms_per_token: 0.0,
                snapshot,
            };
            on(id, Event::Done(Box::new(out)));
        }
        self.admit()?;
        self.prefill(on)?;
        self.decode(on)?;
        Ok(!self.is_empty())
    }

    fn admit(&mut self) -> Result<()> {
        while let Some(free) = self.slots.iter().position(|s| s.is_none()) {
            let Some((id, job)) = self.queue.pop_front() else { break };
            let (logits, mut history) = match job.resume {
                Some(snap) => {
                    timed(&mut self.busy.states, || self.be.set_state(free, snap.state))?;
                    (snap.next_logits, snap.tokens)
                }
                None => {
                    timed(&mut self.busy.states, || self.be.reset(free))?;
                    (vec![], vec![])
                }
            };
            history.extend_from_slice(&job.prompt);
            let stream = self.tok.map(|t| TextStream::new(t, &job.params.stops));
            let mut marks = job.marks;
            marks.retain(|&m| m >= 1 && m <= job.prompt.len());
            self.slots[free] = Some(Seq {
                id,
                rng: StdRng::seed_from_u64(job.params.seed),
                params: job.params,
                prompt: job.prompt,
                fed: 0,
                marks,
                keep_state: job.keep_state,
                history,
                new_ids: vec![],
                logits,
                next: None,
                stream,
                finish: None,
                prefill_ms: 0.0,
                decode_from: None,
                last_ms: 0.0,
                device_ms: 0.0,
            });
        }
        Ok(())
    }

    /// Feeds prompt chunks: consecutive slots whose next chunks have the same length go
    /// through as one pass, wherever each is in its prompt (each has its own state).
    fn prefill(&mut self, on: &mut dyn FnMut(u64, Event) -> Control) -> Result<()> {
        let v = self.be.cfg().vocab_padded;
        let mut fed = 0;
        loop {
            let decoding = self.slots.iter().flatten().any(|s| !s.prefilling() && s.finish.is_none());
            if decoding && fed >= self.prefill_budget {
                return Ok(());
            }
            let budget = if decoding { self.chunk.min(self.prefill_budget - fed) } else { self.chunk };
            // The length of a slot's next prompt chunk, if it is still prefilling.
            let next = |s: &Option<Seq>| {
                s.as_ref().filter(|s| s.prefilling() && s.finish.is_none()).map(|s| s.chunk_end(budget) - s.fed)
            };
            // The earliest job still prefilling leads the group.
            let Some((first, len)) = (0..self.slots.len())
                .filter_map(|i| next(&self.slots[i]).map(|len| (i, len)))
                .min_by_key(|&(i, _)| self.slots[i].as_ref().unwrap().id)
            else {
                return Ok(());
            };
            let lo = (0..first).rev().take_while(|&i| next(&self.slots[i]) == Some(len)).last().unwrap_or(first);
            let group: Vec<usize> = (lo..self.slots.len()).take_while(|&i| next(&self.slots[i]) == Some(len)).collect();
            let toks: Vec<u32> = group
                .iter()
                .flat_map(|&i| {
                    let s = self.slots[i].as_ref().unwrap();
                    s.prompt[s.fed..s.fed + len].iter().copied()
                })
                .collect();
            let t0 = Instant::now();
            let out = self.be.forward(&toks, len, &group, 1)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            self.busy.prefill += ms / 1e3;
            fed += group.len() * len;
            for (j, &i) in group.iter().enumerate() {
                let s = self.slots[i].as_mut().unwrap();
                s.fed += len;
                s.prefill_ms += ms;
                s.logits.clear();
                s.logits.extend_from_slice(&out[j * v..(j + 1) * v]);
                let end = s.fed;
                if s.marks.contains(&end) {
                    let keep = s.history.len() - (s.prompt.len() - end);
                    let snap = Snapshot {
                        state: timed(&mut self.busy.states, || self.be.keep(i))?,
                        next_logits: s.logits.clone(),
                        tokens: s.history[..keep].to_vec(),
                    };
                    on(s.id, Event::Mark(end, snap));
                }
            }
        }
    }

    /// One token for every sequence past its prompt: picked from its logits (or taken from
    /// the backend's pick), fed back in one forward step for all of them. A sequence that
    /// finishes is fed its last token too, so its final state has consumed everything.
    fn decode(&mut self, on: &mut dyn FnMut(u64, Event) -> Control) -> Result<()> {
        let v = self.be.cfg().vocab_padded;
        // Sequences ended before this step (cancelled, or asked for no tokens) hold the state
        // and logits of their last step.
        for i in 0..self.slots.len() {
            if self.slots[i].as_ref().is_some_and(|s| s.finish.is_some() || s.done_before_start()) {
                self.finalize(i, on)?;
            }
        }
        let mut feed = Vec::new();
        let mut toks = Vec::new();
        for i in 0..self.slots.len() {
            let Some(s) = self.slots[i].as_mut() else { continue };
            if s.prefilling() {
                continue;
            }
            let from = *s.decode_from.get_or_insert_with(Instant::now);
            let limit = s.params.vocab_limit.min(v);
            let (tok, lp) = match s.next.take() {
                Some(t) => (t, None),
                None => {
                    let u = if s.params.sampling.is_greedy() { 0.0 } else { s.rng.random::<f64>() };
                    let raw = s.params.logprobs.map(|n| (n, s.logits[..limit].to_vec()));
                    let t = sample(&mut s.logits[..limit], &s.history, &s.params.sampling, u);
                    (t, raw.map(|(n, l)| logprob(&l, t, n)))
                }
            };
            s.new_ids.push(tok);
            s.history.push(tok);
            let (text, stop) = match s.stream.as_mut() {
                None => (String::new(), false),
                Some(st) if Some(tok) == s.params.eos => (st.finish()?, false),
                Some(st) => st.push(tok)?,
            };
            let wants_stop = on(s.id, Event::Token { id: tok, text: &text, logprob: lp }) == Control::Stop;
            s.finish = if Some(tok) == s.params.eos {
                Some(Finish::Eos)
            } else if stop || wants_stop {
                Some(Finish::Stop)
            } else if s.new_ids.len() >= s.params.max_new_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            s.last_ms = from.elapsed().as_secs_f64() * 1e3;
            feed.push(i);
            toks.push(tok);
        }
        if feed.is_empty() {
            return Ok(());
        }
        let seqs: Vec<&Seq> = feed.iter().map(|&i| self.slots[i].as_ref().unwrap()).collect();
        let p = &seqs[0].params;
        let (sampling, limit) = (p.sampling.clone(), p.vocab_limit.min(v));
        // The backend picks only for a batch under one rule that wants no logprobs.
        let on_device = self.be.picks(&sampling)
            && seqs.iter().all(|s| s.params.sampling == sampling && s.params.vocab_limit.min(v) == limit)
            && seqs.iter().all(|s| s.params.logprobs.is_none());
        let t0 = Instant::now();
        if on_device {
            let mut us = Vec::with_capacity(feed.len());
            for &i in &feed {
                let s = self.slots[i].as_mut().unwrap();
                let draw = !sampling.is_greedy() && s.finish.is_none();
                us.push(if draw { s.rng.random::<f64>() } else { 0.0 });
            }
            let hist: Vec<&[u32]> = feed.iter().map(|&i| self.slots[i].as_ref().unwrap().history.as_slice()).collect();
            let ids = self.be.forward_pick(&toks, &feed, limit, &sampling, &us, &hist)?;
            for (&i, t) in feed.iter().zip(ids) {
                let s = self.slots[i].as_mut().unwrap();
                s.next = Some(t);
                s.logits.clear();
            }
        } else {
            let out = self.be.forward(&toks, 1, &feed, 1)?;
            for (j, &i) in feed.iter().enumerate() {
                let s = self.slots[i].as_mut().unwrap();
                s.logits.clear();
                s.logits.extend_from_slice(&out[j * v..(j + 1) * v]);
            }
        }
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        self.busy.decode += dt / 1e3;
        for &i in &feed {
            let s = self.slots[i].as_mut().unwrap();
            s.device_ms += dt;
            if s.finish.is_some() {
                self.finalize(i, on)?;
            }
        }
        Ok(())
    }

    /// Reports a finished sequence and frees its slot.
    fn finalize(&mut self, i: usize, on: &mut dyn FnMut(u64, Event) -> Control) -> Result<()> {
        let mut s = self.slots[i].take().unwrap();
        let finish = *s.finish.get_or_insert(Finish::Length);
        let mut text = String::new();
        if let Some(st) = s.stream.as_mut() {
            // What was held back (the start of a possible stop string, an incomplete
            // character) is final now.
            let tail = st.finish()?;
            if !tail.is_empty() {
                on(s.id, Event::Text(&tail));
            }
            text = st.text().to_string();
        }
        let mut snapshot = None;
        if s.keep_state {
            if s.logits.is_empty() && s.next.is_some() {
                s.logits = self.be.picked_logits(i)?;
            }
            let state = timed(&mut self.busy.states, || self.be.state(i))?;
            snapshot = Some(Snapshot { state: Kept::Host(state), next_logits: s.logits, tokens: s.history });
        }
        self.be.retire(i);
        let k = s.new_ids.len().max(1) as f64;
        let out = Output {
            prompt_ids: s.prompt,
            new_ids: s.new_ids,
            text,
            finish,
            prefill_ms: s.prefill_ms,
            decode_ms_per_token: s.last_ms / k,
            device_ms_per_token: s.device_ms / k,
            snapshot,
        };
        on(s.id, Event::Done(Box::new(out)));
        Ok(())
    }
}

/// `tok`'s log-probability under `logits` and the `n` most likely tokens' (larger first, the
/// lower id first among equals).
pub fn logprob(logits: &[f32], tok: u32, n: usize) -> Logprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let lse = max as f64 + logits.iter().map(|&x| ((x - max) as f64).exp()).sum::<f64>().ln();
    let lp = |x: f32| (x as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    if n > 0 && n < top.len() {
        top.select_nth_unstable_by(n - 1, before);
    }
    top.truncate(n);
    top.sort_by(before);
    Logprob { logprob: lp(logits[tok as usize]), top: top.into_iter().map(|(i, x)| (i, lp(x))).collect() }
}
