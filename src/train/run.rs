//! The training loop: micro-batches with gradient accumulation, global-norm clipping, AdamW on
//! the warmup + cosine schedule, periodic evaluation and checkpoints, `RUN/metrics.jsonl` and a
//! live progress line. A stop request (SIGINT/SIGTERM) ends the step in progress, saves a
//! checkpoint and returns; a non-finite loss stops the run before it touches the weights.

use super::checkpoint::{self, TrainerState};
use super::data::{next_batch, Data, Position};
use super::engine::Engine;
use super::model::shifted;
use super::optim::{clip_factor, AdamW, Schedule};
use super::params::Layout;
use super::tasks::{self, Task};
use crate::ops::cross_entropy::IGNORE;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How to train (the CLI's flags).
#[derive(Clone, Debug)]
pub struct Options {
    pub steps: u64,
    pub batch: usize,
    /// Tokens per sequence, after the stages of `seq_len_schedule`.
    pub seq_len: usize,
    /// Shorter lengths first: `(length, until step)`, in order (long-context training).
    pub seq_len_schedule: Vec<(usize, u64)>,
    /// Recompute each layer's activations in the backward instead of keeping them.
    pub recompute: bool,
    pub grad_accum: usize,
    pub schedule: Schedule,
    pub adamw: AdamW,
    /// Global gradient-norm limit (0: none).
    pub clip: f64,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: u64,
    pub eval_tokens: usize,
    /// Save every this many steps (0: only at the end).
    pub save_every: u64,
    /// Checkpoints kept (0: all).
    pub keep: usize,
    /// Print each metrics record to stdout.
    pub json: bool,
    /// Draw train and validation loss against tokens here after each checkpoint.
    pub plot: Option<PathBuf>,
    /// The GPU to train on (None: the CPU).
    pub device: Option<usize>,
    /// f32, or bf16 / f16 products on a GPU (f16: with `run.state.loss_scale`).
    pub dtype: crate::tensor::DType,
}

/// A run's model and optimizer state, and where it lives.
pub struct Run {
    pub dir: PathBuf,
    pub layout: Layout,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub state: TrainerState,
}

impl Options {
    /// The sequence length of step `it` (0-based).
    pub fn seq_len_at(&self, it: u64) -> usize {
        self.seq_len_schedule.iter().find(|s| it < s.1).map_or(self.seq_len, |s| s.0)
    }

    /// Tokens trained on in steps `0..steps`.
    pub fn tokens_before(&self, steps: u64) -> u64 {
        (0..steps).map(|i| (self.batch * self.seq_len_at(i) * self.grad_accum) as u64).sum()
    }
}

/// Appends one JSON record to `RUN/metrics.jsonl` (and stdout with `--json`).
struct Metrics {
    file: std::fs::File,
    echo: bool,
}

impl Metrics {
    fn open(dir: &Path, echo: bool) -> Result<Metrics> {
        let p = dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .with_context(|| format!("cannot open {}", p.display()))?;
        Ok(Metrics { file, echo })
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        if self.echo {
            println!("{v}");
        }
        Ok(())
    }
}

/// Keeps only the records of steps up to `step` in `RUN/metrics.jsonl` (a resumed run re-runs
/// the steps after its checkpoint and logs them again).
pub fn truncate_metrics(dir: &Path, step: u64) -> Result<()> {
    let p = dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&p) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::io::write_file(&p, kept.as_bytes(), true)
}

/// What a run trains on.
pub enum Source<'a> {
    /// Token shards made by `prepare`.
    Tokens(&'a Data),
    /// A synthetic task, its accuracy also evaluated at `eval_lens`.
    Task { task: Task, eval_lens: Vec<usize> },
}

/// The evaluation records of step `step`.
fn evaluate(run: &Run, eng: &mut Engine, source: &Source, o: &Options, step: u64) -> Result<Vec<serde_json::Value>> {
    let t = o.seq_len_at(step.saturating_sub(1));
    match source {
        Source::Tokens(data) => Ok(validation_loss(run, eng, data, o, t)?
            .map(|v| json!({"step": step, "val_loss": v}))
            .into_iter()
            .collect()),
        Source::Task { task, eval_lens } => {
            let mut out = Vec::new();
            for (k, &len) in std::iter::once(&t).chain(eval_lens).enumerate() {
                let (loss, acc) = task_accuracy(run, eng, *task, o, len)?;
                out.push(if k == 0 {
                    json!({"step": step, "val_loss": loss, "accuracy": acc})
                } else {
                    json!({"step": step, "eval_len": len, "accuracy": acc})
                });
            }
            Ok(out)
        }
    }
}

/// Loss per graded position and accuracy of `task` over fixed examples of `len` tokens:
/// `o.eval_tokens / len` of them, at least 8 and at most 256, run `o.batch·seq_len / len`
/// (at least one) at a time.
fn task_accuracy(run: &Run, eng: &mut Engine, task: Task, o: &Options, len: usize) -> Result<(f64, f64)> {
    let examples = (o.eval_tokens / len).clamp(8, 256);
    let per = (o.batch * o.seq_len / len).clamp(1, examples);
    let mut rng = tasks::eval_rng(run.state.seed, len);
    let (mut sum, mut hit, mut graded) = (0.0, 0usize, 0usize);
    for e0 in (0..examples).step_by(per) {
        let seqs = per.min(examples - e0);
        let (inputs, targets) = task.batch(&mut rng, seqs, len)?;
        eng.forward(run, (seqs, len, o.recompute), inputs, targets)?;
        sum += eng.backward(run, None)?;
        let h = eng.hits(run)?;
        hit += h.iter().filter(|&&x| x).count();
        graded += h.len();
    }
    Ok((sum / graded as f64, hit as f64 / graded as f64))
}

/// Mean next-token loss over the first `o.eval_tokens` tokens of the validation shard, in rows
/// of `t + 1`. `None` when the shard is shorter than one row.
fn validation_loss(run: &Run, eng: &mut Engine, data: &Data, o: &Options, t: usize) -> Result<Option<f64>> {
    let rows = (o.eval_tokens / t).max(1).min(data.val.len().saturating_sub(1) / t);
    if rows == 0 {
        return Ok(None);
    }
    let (mut sum, mut pos) = (0.0, Position::default());
    for r0 in (0..rows).step_by(o.batch) {
        let seqs = o.batch.min(rows - r0);
        let (inputs, targets) = shifted(&next_batch(&data.val, &mut pos, seqs, t)?, seqs, t)?;
        eng.forward(run, (seqs, t, o.recompute), inputs, targets)?;
        sum += eng.backward(run, None)?;
    }
    Ok(Some(sum / (rows * t) as f64))
}

/// What one optimizer step reports.
pub struct Stepped {
    /// The mean loss over the graded positions.
    pub loss: f64,
    /// The gradient norm before clipping (unscaled).
    pub norm: f64,
    pub lr: f64,
    /// f16 runs: the step's gradients overflowed, so the weights were left alone.
    pub skipped: bool,
}

/// One optimizer step of `run` on `eng`: `o.grad_accum` micro-batches of `seqs × len` from
/// `next(micro)` (inputs and targets), global-norm clipping, AdamW at the schedule's rate. In
/// an f16 run the loss's gradient is scaled by `run.state.loss_scale`, and a step whose
/// gradients overflow is counted but skipped. A non-finite loss stops it before the update.
pub fn step(
    run: &mut Run,
    o: &Options,
    eng: &mut Engine,
    (seqs, len): (usize, usize),
    mut next: impl FnMut(usize) -> Result<(Vec<u32>, Vec<u32>)>,
) -> Result<Stepped> {
    let batches = (0..o.grad_accum).map(&mut next).collect::<Result<Vec<_>>>()?;
    let count = batches.iter().map(|b| b.1.iter().filter(|&&t| t != IGNORE).count()).sum::<usize>().max(1) as f64;
    let scale = run.state.loss_scale.map_or(1.0, |ls| ls.scale());
    eng.zero_grads()?;
    let mut sum = 0.0;
    for (inputs, targets) in batches {
        eng.forward(run, (seqs, len, o.recompute), inputs, targets)?;
        sum += eng.backward(run, Some((scale / count) as f32))?;
    }
    let loss = sum / count;
    if !loss.is_finite() {
        bail!("the loss is {loss} at step {}: stopping before the update", run.state.step + 1);
    }
    let norm = eng.grad_norm()? / scale;
    let lr = o.schedule.lr(run.state.step);
    run.state.step += 1;
    let go = match &mut run.state.loss_scale {
        Some(ls) => ls.update(norm.is_finite()).map_err(|e| anyhow!("{e} at step {}", run.state.step))?,
        None => true,
    };
    if go {
        eng.update(run, &o.adamw, lr as f32, (clip_factor(norm, o.clip) as f64 / scale) as f32)?;
    }
    Ok(Stepped { loss, norm, lr, skipped: !go })
}

/// Trains `run` from its state to `o.steps` steps on `source`. Returns whether it finished
/// (false: stopped on request, after saving).
pub fn train(run: &mut Run, source: &Source, o: &Options, stop: &AtomicBool) -> Result<bool> {
    let b = o.batch;
    if b == 0 || o.seq_len == 0 || o.grad_accum == 0 || o.seq_len_schedule.iter().any(|s| s.0 == 0) {
        bail!("--batch-size, --seq-len and --grad-accum must be at least 1");
    }
    let tokenizer = match source {
        Source::Tokens(data) => Some(data.dir.join("tokenizer.json")),
        Source::Task { .. } => None,
    };
    // The device first: a run that cannot start leaves no directory behind.
    let mut eng = Engine::new(run, o.device, o.dtype)?;
    std::fs::create_dir_all(&run.dir).with_context(|| format!("cannot create {}", run.dir.display()))?;
    let mut metrics = Metrics::open(&run.dir, o.json)?;
    let mut tokens = o.tokens_before(run.state.step);
    let bar = indicatif::ProgressBar::new(o.steps).with_position(run.state.step);
    bar.set_style(
        indicatif::ProgressStyle::with_template("step {pos}/{len} {wide_bar} {msg} eta {eta}").expect("template"),
    );
    let mut last_saved = None;
    let save = |run: &mut Run, eng: &mut Engine| -> Result<PathBuf> {
        eng.sync(run)?;
        let dir =
            checkpoint::save(&run.dir, &run.layout, &run.params, &run.m, &run.v, &run.state, tokenizer.as_deref())?;
        checkpoint::prune(&run.dir, o.keep)?;
        if let Some(p) = &o.plot {
            plot_losses(&run.dir, p)?;
        }
        Ok(dir)
    };
    while run.state.step < o.steps {
        let t = o.seq_len_at(run.state.step);
        let started = Instant::now();
        let mut pos = run.state.pos;
        let (seed, at) = (run.state.seed, run.state.step);
        let next = |micro: usize| match source {
            Source::Tokens(data) => shifted(&next_batch(&data.train, &mut pos, b, t)?, b, t),
            Source::Task { task, .. } => task.batch(&mut tasks::rng_for(seed, at, micro), b, t),
        };
        let Stepped { loss, norm, lr, skipped } = match step(run, o, &mut eng, (b, t), next) {
            Ok(r) => r,
            Err(e) => {
                let last = checkpoint::list(&run.dir).first().map_or("none".to_string(), |c| c.1.display().to_string());
                return Err(e.context(format!("last good checkpoint: {last}")));
            }
        };
        run.state.pos = pos;
        let step = run.state.step;
        let step_tokens = (b * t * o.grad_accum) as u64;
        tokens += step_tokens;
        let tps = step_tokens as f64 / started.elapsed().as_secs_f64();
        let mut record =
            json!({"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tps, "tokens": tokens});
        if let Some(ls) = run.state.loss_scale {
            record["loss_scale"] = json!(ls.scale());
            record["skipped"] = json!(skipped);
        }
        metrics.write(record)?;
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} |g| {norm:.2} {:.0} tok/s", tps));
        let last = step == o.steps;
        if (o.eval_every > 0 && step.is_multiple_of(o.eval_every)) || last {
            for r in evaluate(run, &mut eng, source, o, step)? {
                let acc = r["accuracy"].as_f64().map_or(String::new(), |a| format!(", accuracy {:.2} %", 100.0 * a));
                match (r["val_loss"].as_f64(), r["eval_len"].as_u64()) {
                    (Some(v), _) => bar.println(format!("step {step}: val loss {v:.4}{acc}")),
                    (None, Some(len)) => bar.println(format!("step {step}: at length {len}{acc}")),
                    _ => {}
                }
                metrics.write(r)?;
            }
        }
        let stopping = stop.load(Ordering::Relaxed);
        if (o.save_every > 0 && step.is_multiple_of(o.save_every)) || last || stopping {
            last_saved = Some(save(run, &mut eng)?);
        }
        if stopping && !last {
            bar.abandon();
            eprintln!(
                "stopped at step {step}: saved {}; continue with --resume",
                last_saved.as_ref().expect("saved above").display()
            );
            return Ok(false);
        }
    }
    bar.finish_and_clear();
    let src = match last_saved {
        Some(d) => d,
        None => save(run, &mut eng)?,
    };
    checkpoint::write_final(&run.dir, &src)?;
    Ok(true)
}

/// Draws `RUN/metrics.jsonl`'s losses against tokens into `path` (a validation record at the
/// tokens of its step's record).
fn plot_losses(dir: &Path, path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl"))?;
    let (mut train, mut val) = (vec![], vec![]);
    let mut x = 0.0;
    for v in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        x = v["tokens"].as_f64().unwrap_or(x);
        if let Some(y) = v["loss"].as_f64() {
            train.push((x, y));
        }
        if let Some(y) = v["val_loss"].as_f64() {
            val.push((x, y));
        }
    }
    crate::plot::loss_curves(&train, &val, path)
}
