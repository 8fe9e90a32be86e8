//! What generation and scoring need from a model, so one loop serves the CPU and the GPU: a set
//! of sequence slots, each with its recurrent state, fed tokens in parallel.

use crate::config::Config;
use crate::model::Model;
use crate::ops::cross_entropy;
use crate::sampling::Sampling;
use crate::state::{Kept, State};
use anyhow::{bail, Result};

pub trait Backend {
    fn cfg(&self) -> &Config;
    /// Starts over with one slot per state.
    fn begin(&mut self, states: Vec<State>) -> Result<()>;
    /// Puts `state` in slot `i` (which [`Backend::begin`] made), for a new sequence: the
    /// slot is live again if it was retired.
    fn set_state(&mut self, i: usize, state: Kept) -> Result<()>;
    /// Puts the empty state in slot `i`, for a new sequence (on the GPU, without a copy from
    /// the host).
    fn reset(&mut self, i: usize) -> Result<()> {
        let empty = State::new(self.cfg());
        self.set_state(i, Kept::Host(empty))
    }
    /// Feeds `l` tokens to each slot in `slots` (ascending; `tokens` row-major, one row per
    /// slot) and returns the logits of each slot's last `n_logits` positions. Slots of one call
    /// with `l > 1` are consecutive.
    fn forward(&mut self, tokens: &[u32], l: usize, slots: &[usize], n_logits: usize) -> Result<Vec<f32>>;
    /// The state of slot `i` now, in host memory.
    fn state(&mut self, i: usize) -> Result<State>;
    /// A copy of slot `i`'s state now, kept where the backend runs (the GPU keeps it in
    /// device memory), to be put back by [`Backend::set_state`].
    fn keep(&mut self, i: usize) -> Result<Kept> {
        Ok(Kept::Host(self.state(i)?))
    }
    /// Slot `i`'s state will be neither read nor fed again (its sequence finished), so the
    /// backend may step it along with the others (the GPU's decode step advances every slot).
    fn retire(&mut self, _i: usize) {}
    /// Feeds `tokens` to slot `slot` and returns, for each of the first `targets.len()`
    /// positions, `−log p(target)`: the log-sum-exp of the position's logits over the padded
    /// vocabulary minus the target's logit (f64). Backends with the logits elsewhere (the GPU)
    /// compute it there and hand back 8 bytes a position.
    fn forward_nll(&mut self, tokens: &[u32], slot: usize, targets: &[u32]) -> Result<Vec<f64>> {
        let l = tokens.len();
        let logits = self.forward(tokens, l, &[slot], l)?;
        Ok(cross_entropy::nll_rows(&logits, self.cfg().vocab_padded, targets))
    }
    /// Whether [`Backend::forward_pick`] picks next tokens itself (on the GPU: no logits
    /// copied out per step).
    fn picks(&self, _sampling: &Sampling) -> bool {
        false
    }
    /// [`Backend::forward`] of one token per slot that hands back each slot's next token
    /// instead of its logits: picked below `limit` by `sampling`'s rules with the uniform
    /// number `us[j]` for slot `j` (unused when greedy), the repetition penalty over
    /// `history[j]` (every token slot `j` has seen, those fed now included).
    fn forward_pick(
        &mut self,
        _tokens: &[u32],
        _slots: &[usize],
        _limit: usize,
        _sampling: &Sampling,
        _us: &[f64],
        _history: &[&[u32]],
    ) -> Result<Vec<u32>> {
        bail!("this backend does not pick tokens itself")
    }
    /// The logits after the last [`Backend::forward_pick`] step of slot `i`.
    fn picked_logits(&mut self, _i: usize) -> Result<Vec<f32>> {
        bail!("this backend does not pick tokens itself")
    }
}

/// The CPU model with its states in host memory.
pub struct Cpu<'m> {
    model: &'m Model,
    states: Vec<State>,
}

impl<'m> Cpu<'m> {
    pub fn new(model: &'m Model) -> Cpu<'m> {
        Cpu { model, states: vec![] }
    }
}

impl Backend for Cpu<'_> {
    fn cfg(&self) -> &Config {
        &self.model.cfg
    }

    fn begin(&mut self, states: Vec<State>) -> Result<()> {
        self.states = states;
        Ok(())
    }

    fn set_state(&mut self, i: usize, state: Kept) -> Result<()> {
        let state = state.into_host()?;
        state.check(&self.model.cfg)?;
        self.states[i] = state;
        Ok(())
    }

    fn forward(&mut self, tokens: &[u32], l: usize, slots: &[usize], n_logits: usize) -> Result<Vec<f32>> {
        let mut want = vec![false; self.states.len()];
        slots.iter().for_each(|&i| want[i] = true);
        let mut picked: Vec<&mut State> =
            self.states.iter_mut().zip(want).filter(|(_, w)| *w).map(|(s, _)| s).collect();
        self.model.forward(tokens, l, &mut picked, n_logits)
    }

    fn state(&mut self, i: usize) -> Result<State> {
        Ok(self.states[i].clone())
    }

    fn forward_nll(&mut self, tokens: &[u32], slot: usize, targets: &[u32]) -> Result<Vec<f64>> {
        self.model.forward_nll(tokens, &mut self.states[slot], targets)
    }
}

/// A backend that runs every sequence on its own single-slot backend, so a sequence's numbers
/// never depend on the others of its batch: the same kernels, with the same reduction order,
/// as when it runs alone (the GPU's batched GEMMs pick their algorithm by the batch size). It
/// gives up batching: each step costs the sum of the sequences' single-sequence steps.
pub struct PerSequence<'m, B> {
    cfg: Config,
    make: Box<dyn Fn() -> B + 'm>,
    runs: Vec<B>,
}

impl<'m, B: Backend> PerSequence<'m, B> {
    pub fn new(cfg: Config, make: impl Fn() -> B + 'm) -> PerSequence<'m, B> {
        PerSequence { cfg, make: Box::new(make), runs: vec![] }
    }
}

impl<B: Backend> Backend for PerSequence<'_, B> {
    fn cfg(&self) -> &Config {
        &self.cfg
    }

    fn begin(&mut self, states: Vec<State>) -> Result<()> {
        self.runs.clear();
        for s in states {
            let mut run = (self.make)();
            run.begin(vec![s])?;
            self.runs.push(run);
        }
        Ok(())
    }

    fn set_state(&mut self, i: usize, state: Kept) -> Result<()> {
        let mut run = (self.make)();
        match state {
            Kept::Host(s) => run.begin(vec![s])?,
            device => {
                run.begin(vec![State::new(&self.cfg)])?;
                run.set_state(0, device)?;
            }
        }
        self.runs[i] = run;
        Ok(())
    }

    fn forward(&mut self, tokens: &[u32], l: usize, slots: &[usize], n_logits: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(slots.len() * n_logits * self.cfg.vocab_padded);
        for (&i, row) in slots.iter().zip(tokens.chunks(l)) {
            out.extend(self.runs[i].forward(row, l, &[0], n_logits)?);
        }
        Ok(out)
    }

    fn state(&mut self, i: usize) -> Result<State> {
        self.runs[i].state(0)
    }

    fn keep(&mut self, i: usize) -> Result<Kept> {
        self.runs[i].keep(0)
    }

    fn retire(&mut self, i: usize) {
        self.runs[i].retire(0)
    }

    fn forward_nll(&mut self, tokens: &[u32], slot: usize, targets: &[u32]) -> Result<Vec<f64>> {
        self.runs[slot].forward_nll(tokens, 0, targets)
    }

    fn picks(&self, sampling: &Sampling) -> bool {
        self.runs.first().is_some_and(|r| r.picks(sampling))
    }

    fn forward_pick(
        &mut self,
        tokens: &[u32],
        slots: &[usize],
        limit: usize,
        sampling: &Sampling,
        us: &[f64],
        history: &[&[u32]],
    ) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(slots.len());
        for (j, &i) in slots.iter().enumerate() {
            let one = j..j + 1;
            out.extend(self.runs[i].forward_pick(
                &tokens[one.clone()],
                &[0],
                limit,
                sampling,
                &us[one.clone()],
                &history[one],
            )?);
        }
        Ok(out)
    }

    fn picked_logits(&mut self, i: usize) -> Result<Vec<f32>> {
        self.runs[i].picked_logits(0)
    }
}
