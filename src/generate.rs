//! Generation of a fixed set of sequences (what `mamba-lm generate` and the benches run):
//! every start is queued on a [`Scheduler`] with one slot each, so prompts of equal length
//! prefill together and all sequences then decode together one step at a time (weights read
//! once per step for the batch).

use crate::backend::{Backend, Cpu};
use crate::model::Model;
pub use crate::scheduler::{Control, Output};
use crate::scheduler::{Event, Job, Params, Scheduler};
use crate::state::Snapshot;
use crate::tokenizer::Tokenizer;
use anyhow::Result;

/// Options for [`generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: crate::sampling::Sampling,
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
    run(be, starts, opts, None, &[], |i, ev| match ev {
        Event::Token { id, .. } => on_token(i, id),
        _ => Control::Continue,
    })
}

/// [`generate_on`] with each sequence's text streamed (the loop `mamba-lm generate` runs):
/// `on_text(seq, piece)` gets text as it becomes final, never part of a stop string or of an
/// incomplete character; a stop string ends its sequence, and the end-of-sequence token is
/// not part of the text ([`Output::text`] holds it all).
pub fn generate_text(
    be: &mut dyn Backend,
    starts: Vec<Start>,
    opts: &GenerateOptions,
    tok: &Tokenizer,
    stops: &[String],
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<Output>> {
    run(be, starts, opts, Some(tok), stops, |i, ev| {
        if let Event::Token { text, .. } | Event::Text(text) = ev {
            if !text.is_empty() {
                on_text(i, text);
            }
        }
        Control::Continue
    })
}

/// Runs every start to its end on a scheduler with a slot each; `on(seq, event)` sees every
/// event but the last.
fn run(
    be: &mut dyn Backend,
    starts: Vec<Start>,
    opts: &GenerateOptions,
    tok: Option<&Tokenizer>,
    stops: &[String],
    mut on: impl FnMut(usize, Event) -> Control,
) -> Result<Vec<Output>> {
    let n = starts.len();
    if n == 0 {
        return Ok(vec![]);
    }
    let mut sched = Scheduler::new(be, n, tok)?;
    // Slots in order of prompt length, so prompts of equal length sit in consecutive slots.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| starts[i].prompt.len());
    let mut starts: Vec<Option<Start>> = starts.into_iter().map(Some).collect();
    let mut seq_of = vec![0; n];
    for &i in &order {
        let s = starts[i].take().unwrap();
        let params = Params {
            max_new_tokens: opts.max_new_tokens,
            sampling: opts.sampling.clone(),
            seed: opts.seed.wrapping_add(i as u64),
            eos: opts.eos,
            vocab_limit: opts.vocab_limit,
            stops: stops.to_vec(),
            logprobs: None,
        };
        let id = sched.submit(Job { prompt: s.prompt, resume: s.resume, params, marks: vec![], keep_state: true })?;
        seq_of[id as usize] = i;
    }
    let mut outs: Vec<Option<Output>> = vec![None; n];
    let mut each = |id: u64, ev: Event| {
        let i = seq_of[id as usize];
        match ev {
            Event::Done(o) => {
                outs[i] = Some(*o);
                Control::Continue
            }
            ev => on(i, ev),
        }
    };
    while sched.step(&mut each)? {}
    Ok(outs.into_iter().map(|o| o.expect("every sequence ends")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::init::random_model;
    use crate::sampling::Sampling;
    use crate::state::{Kept, State};
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
        fn set_state(&mut self, i: usize, state: Kept) -> Result<()> {
            self.retired[i] = false;
            self.cpu.set_state(i, state)
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
            assert_eq!(a.snapshot.as_ref().unwrap().state.pos(), b.snapshot.as_ref().unwrap().state.pos());
        }
    }
}
