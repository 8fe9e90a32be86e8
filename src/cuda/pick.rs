//! Next-token picks on the GPU for every sampling setting but plain greedy (which the decode
//! step's argmax already gives): sampling.cu's `sample_rows` (temperature / min-p, id order)
//! and `pick_top` (top-k / top-p, and greedy under a repetition penalty), by the CPU's rules
//! with the host's uniform numbers. The repetition penalty reads a bitmask of seen ids per
//! sequence kept on the device, to which each pick adds the ids fed since the last one. Kept
//! sets too large for `pick_top`'s sort go by radix selection (`pick_wide`); a row without a
//! finite logit comes back as [`PICK_HOST`] and is picked on the host from its logits.

use super::{err, Gpu};
use crate::sampling::Sampling;
use anyhow::Result;
use cudarc::driver::{CudaSlice, DeviceRepr};

/// Candidates `pick_top` sorts in shared memory (a power of two).
pub const PICK_CAP: usize = 2048;
/// Histogram bins of `pick_top`, and bins per unit of the weight exponent (w = 2^−d): the bins
/// cover weights down to 2^−32 of the most likely token's.
pub const PICK_BINS: usize = 1024;
pub const PICK_BINS_PER_UNIT: usize = 32;
/// Loads each thread of a pick kernel keeps in flight.
pub const PICK_LOADS: usize = 8;
/// A row's pick when the host must make it.
pub const PICK_HOST: u32 = u32::MAX;

/// The `#define`s sampling.cu takes from here.
pub fn defines() -> String {
    format!(
        "#define PICK_CAP {PICK_CAP}\n#define PICK_BINS {PICK_BINS}\n#define PICK_BINS_PER_UNIT \
         {PICK_BINS_PER_UNIT}\n#define PICK_HOST {PICK_HOST}u\n#define PICK_LOADS {PICK_LOADS}\n"
    )
}

/// Mirrors `PickParams` in sampling.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct PickParams {
    logits: u64,
    out: u64,
    u: u64,
    seen: u64,
    new_ids: u64,
    new_at: u64,
    seen_words: i32,
    stride: i32,
    limit: i32,
    inv_t_log2e: f32,
    min_p: f32,
    top_p: f32,
    penalty: f32,
    top_k: i32,
}

unsafe impl DeviceRepr for PickParams {}

/// The device buffers of picks over `rows` sequences.
pub struct Picker {
    rows: usize,
    u: CudaSlice<f32>,
    out: CudaSlice<u32>,
    /// `(rows, words)` bits of the ids each row has seen; allocated on the first penalised pick.
    seen: Option<CudaSlice<u32>>,
    words: usize,
    new_ids: CudaSlice<u32>,
    new_at: CudaSlice<i32>,
    /// History entries of each row already in `seen`.
    marked: Vec<usize>,
}

/// Whether `s` needs a pick beyond the decode step's argmax.
pub fn needs_pick(s: &Sampling) -> bool {
    !s.is_greedy() || s.repetition_penalty != 1.0
}

impl Picker {
    pub fn new(gpu: &Gpu, rows: usize, vocab: usize) -> Result<Picker> {
        Ok(Picker {
            rows,
            u: gpu.alloc(rows)?,
            out: gpu.alloc(rows)?,
            seen: None,
            words: vocab.div_ceil(32),
            new_ids: gpu.alloc(rows)?,
            new_at: gpu.alloc(rows + 1)?,
            marked: vec![0; rows],
        })
    }

    /// Picks each row's next token from `logits` (`rows × stride` f32 on the device, ids below
    /// `limit`) by `s`, with `u[r]` and, for the penalty, `history[r]` (every id row `r` has
    /// seen; empty for rows not in play). Rows marked [`PICK_HOST`] are left to the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn pick(
        &mut self,
        gpu: &Gpu,
        logits: u64,
        stride: usize,
        limit: usize,
        s: &Sampling,
        u: &[f32],
        history: &[&[u32]],
    ) -> Result<Vec<u32>> {
        assert!(u.len() == self.rows && history.len() == self.rows);
        gpu.stream.memcpy_htod(u, &mut self.u).map_err(err)?;
        let penalty = s.repetition_penalty != 1.0;
        if penalty {
            if self.seen.is_none() {
                self.seen = Some(gpu.stream.alloc_zeros(self.rows * self.words).map_err(err)?);
            }
            // The ids each row was fed since its last pick (all of its history at the first).
            let mut ids = Vec::new();
            let mut at = vec![0i32];
            for (r, h) in history.iter().enumerate() {
                let from = self.marked[r].min(h.len());
                ids.extend_from_slice(&h[from..]);
                self.marked[r] = h.len();
                at.push(ids.len() as i32);
            }
            if ids.len() > self.new_ids.len() {
                self.new_ids = gpu.alloc(ids.len().next_power_of_two())?;
            }
            if !ids.is_empty() {
                gpu.stream.memcpy_htod(&ids, &mut self.new_ids.slice_mut(..ids.len())).map_err(err)?;
            }
            gpu.stream.memcpy_htod(&at, &mut self.new_at).map_err(err)?;
        }
        let greedy = s.is_greedy();
        let top_p = s.top_p > 0.0 && s.top_p < 1.0;
        let p = PickParams {
            logits,
            out: gpu.ptr(&self.out),
            u: gpu.ptr(&self.u),
            seen: self.seen.as_ref().map_or(0, |b| gpu.ptr(b)),
            new_ids: gpu.ptr(&self.new_ids),
            new_at: gpu.ptr(&self.new_at),
            seen_words: self.words as i32,
            stride: stride as i32,
            limit: limit as i32,
            // Greedy (under a penalty) is top-k 1, where any finite scale ranks alike.
            inv_t_log2e: if greedy { std::f32::consts::LOG2_E } else { std::f32::consts::LOG2_E / s.temperature },
            min_p: if s.top_k == 0 { s.min_p } else { 0.0 },
            top_p: if top_p { s.top_p } else { 1.0 },
            penalty: s.repetition_penalty,
            top_k: if greedy { 1 } else { s.top_k as i32 },
        };
        let kernel = if !greedy && s.top_k == 0 && !top_p { "sample_rows" } else { "pick_top" };
        gpu.launch(kernel, (self.rows as u32, 1, 1), 1024, &p, None)?;
        gpu.download(&self.out, self.rows)
    }
}
