//! The Mamba paper's synthetic tasks (§4.1; training-spec §3), made on the fly and graded only
//! where they ask for an answer:
//! - selective copying: 16 data tokens (ids 1–16) at random positions among blanks (id 0),
//!   then 16 markers (id 17); at the k-th marker the model must give the k-th data token. The
//!   spacing varies, so a time-invariant model cannot solve it.
//! - induction heads: random tokens (ids 0–15) with a trigger (id 16) somewhere, followed by
//!   some token X; the sequence ends with the trigger again and the model must give X.

use anyhow::{bail, Result};
use rand::{rngs::StdRng, seq::index::sample, Rng, SeedableRng};
use std::str::FromStr;

use crate::ops::cross_entropy::IGNORE;

/// Data tokens of either task.
const DATA: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    SelectiveCopying,
    InductionHeads,
}

impl FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "selective-copying" => Ok(Task::SelectiveCopying),
            "induction-heads" => Ok(Task::InductionHeads),
            _ => Err(format!("unknown task '{s}' (known: selective-copying, induction-heads)")),
        }
    }
}

impl Task {
    /// Token ids the task uses.
    pub fn vocab(self) -> usize {
        DATA as usize + 2
    }

    /// The shortest sequence the task fits in.
    pub fn min_len(self) -> usize {
        match self {
            Task::SelectiveCopying => 2 * DATA as usize,
            Task::InductionHeads => 4,
        }
    }

    /// `seqs` examples of `len` positions: inputs and targets ([`IGNORE`] where not graded),
    /// row-major.
    pub fn batch(self, rng: &mut StdRng, seqs: usize, len: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        if len < self.min_len() {
            bail!("{self:?} needs sequences of at least {} tokens, got {len}", self.min_len());
        }
        let (mut inputs, mut targets) = (Vec::with_capacity(seqs * len), vec![IGNORE; seqs * len]);
        for s in 0..seqs {
            let t = &mut targets[s * len..(s + 1) * len];
            match self {
                Task::SelectiveCopying => {
                    let ctx = len - DATA as usize;
                    let mut at: Vec<usize> = sample(rng, ctx, DATA as usize).into_vec();
                    at.sort_unstable();
                    let mut row = vec![0u32; ctx];
                    for (k, &p) in at.iter().enumerate() {
                        let tok = rng.random_range(1..=DATA);
                        row[p] = tok;
                        t[ctx + k] = tok;
                    }
                    row.extend(std::iter::repeat_n(DATA + 1, DATA as usize));
                    inputs.extend(row);
                }
                Task::InductionHeads => {
                    let mut row: Vec<u32> = (0..len).map(|_| rng.random_range(0..DATA)).collect();
                    let p = rng.random_range(0..len - 2);
                    row[p] = DATA;
                    row[len - 1] = DATA;
                    t[len - 1] = row[p + 1];
                    inputs.extend(row);
                }
            }
        }
        Ok((inputs, targets))
    }
}

/// The generator of training step `step`'s micro-batch `micro`: a function of the seed and
/// the position alone, so a resumed run draws the same examples.
pub fn rng_for(seed: u64, step: u64, micro: usize) -> StdRng {
    let mix = (step.wrapping_mul(1_000_003).wrapping_add(micro as u64)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    StdRng::seed_from_u64(seed ^ mix)
}

/// The generator of the evaluation examples (the same at every evaluation).
pub fn eval_rng(seed: u64, len: usize) -> StdRng {
    StdRng::seed_from_u64(seed ^ 0xE7A1_0000 ^ len as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_grade_only_the_answers_and_hold_them() {
        let mut rng = StdRng::seed_from_u64(3);
        let (i, t) = Task::SelectiveCopying.batch(&mut rng, 2, 64).unwrap();
        for s in 0..2 {
            let (row, tr) = (&i[s * 64..(s + 1) * 64], &t[s * 64..(s + 1) * 64]);
            let data: Vec<u32> = row[..48].iter().copied().filter(|&x| x != 0).collect();
            let answers: Vec<u32> = tr.iter().copied().filter(|&x| x != IGNORE).collect();
            assert_eq!(data, answers, "the answers are the data tokens in order");
            assert!(tr[..48].iter().all(|&x| x == IGNORE) && row[48..].iter().all(|&x| x == 17));
        }
        let (i, t) = Task::InductionHeads.batch(&mut rng, 3, 32).unwrap();
        for s in 0..3 {
            let (row, tr) = (&i[s * 32..(s + 1) * 32], &t[s * 32..(s + 1) * 32]);
            let p = row.iter().position(|&x| x == 16).unwrap();
            assert_eq!(row[31], 16);
            assert_eq!(tr[31], row[p + 1]);
            assert_eq!(tr.iter().filter(|&&x| x != IGNORE).count(), 1);
        }
    }
}
