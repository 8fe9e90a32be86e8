//! `mamba-lm prepare` and `mamba-lm train`: flags, starting or resuming a run, the stop signals.

use anyhow::{bail, Result};
use clap::Args;
use mamba_lm::config::{Arch, Config};
use mamba_lm::loader;
use mamba_lm::tensor::DType;
use mamba_lm::train::checkpoint::{self, TrainerState};
use mamba_lm::train::data::Data;
use mamba_lm::train::optim::{AdamW, LossScale, Schedule};
use mamba_lm::train::params::{Layout, EMBEDDING_NAMES};
use mamba_lm::train::run::{self, Options, Run, Source};
use mamba_lm::train::tasks::Task;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Args)]
pub struct TrainArgs {
    /// A directory made by `prepare` (train.bin, val.bin, meta.json, tokenizer.json).
    #[arg(long, required_unless_present = "task", conflicts_with = "task")]
    data: Option<PathBuf>,
    /// Train on a synthetic task made on the fly instead: selective-copying or induction-heads
    /// (the Mamba paper's §4.1; graded only at the answers; evaluations report accuracy).
    #[arg(long, value_parser = clap::value_parser!(Task))]
    task: Option<Task>,
    /// With --task: also evaluate the accuracy at these sequence lengths (e.g. 4096,65536).
    #[arg(long, value_delimiter = ',', requires = "task")]
    eval_lens: Vec<usize>,
    /// Start from this checkpoint: a local directory or a Hugging Face repo id (fine-tuning).
    #[arg(long, group = "init")]
    model: Option<String>,
    /// Start from random weights of a preset's shape (tiny, tiny-mamba2, mamba-130m, ...), with the data's vocabulary.
    #[arg(long, group = "init")]
    preset: Option<String>,
    /// Start from random weights of a config.json's shape, with the data's vocabulary.
    #[arg(long, group = "init")]
    config: Option<PathBuf>,
    /// Run directory: checkpoints, metrics.jsonl, final/. Must not exist (or be empty) unless --resume.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its newest complete checkpoint.
    #[arg(long)]
    resume: bool,
    /// Optimizer steps in all (default 1000).
    #[arg(long, conflicts_with = "tokens")]
    steps: Option<u64>,
    /// Train on this many tokens in all instead of a number of steps.
    #[arg(long)]
    tokens: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Sequence-length stages for long-context training, e.g. 512:2000,1024:4000,2048: length
    /// 512 until step 2000, 1024 until step 4000, then 2048 (replaces --seq-len).
    #[arg(long, value_parser = parse_schedule)]
    seq_len_schedule: Option<(Vec<(usize, u64)>, usize)>,
    /// Recompute each layer's activations in the backward instead of keeping them (less
    /// memory, one more forward).
    #[arg(long)]
    recompute: bool,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 6e-4)]
    lr: f64,
    /// Learning rate at the end of the cosine decay (default: --lr / 10).
    #[arg(long)]
    min_lr: Option<f64>,
    /// Linear warmup steps (default: a tenth of --steps, at most 2,000).
    #[arg(long)]
    warmup: Option<u64>,
    /// Decoupled weight decay of the weight matrices (not of norms, biases, A_log, D, dt_bias).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// AdamW's betas.
    #[arg(long, default_value = "0.9,0.95", value_delimiter = ',', num_args = 2)]
    betas: Vec<f32>,
    /// Global gradient-norm limit (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Validation loss every this many steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Validation tokens per evaluation.
    #[arg(long, default_value_t = 65536)]
    eval_tokens: usize,
    /// A checkpoint every this many steps (0: only at the end); also on SIGINT / SIGTERM.
    #[arg(long, default_value_t = 500)]
    save_every: u64,
    /// Checkpoints kept (0: all).
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Seed of the initial weights (--preset / --config).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// f32, or bf16 / f16 on a GPU (products in 16 bits with f32 sums; weights, moments and
    /// everything else in f32; f16 with dynamic loss scaling).
    #[arg(long, default_value = "f32", value_parser = crate::parse_dtype)]
    dtype: mamba_lm::tensor::DType,
    /// With --dtype f16: the initial loss scale, a power of two (halved after a step whose
    /// gradients overflow, which is skipped; doubled after 2,000 good steps). A resumed run
    /// keeps its checkpoint's scale unless this is given.
    #[arg(long)]
    loss_scale: Option<f64>,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: crate::Device,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print each metrics record (one JSON object per line) to stdout.
    #[arg(long)]
    json: bool,
    /// Draw train and validation loss against tokens into this PNG (redrawn at each checkpoint).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// `L:S,L:S,...,L`: lengths until steps, then the final length.
fn parse_schedule(s: &str) -> Result<(Vec<(usize, u64)>, usize), String> {
    let bad = || {
        format!("--seq-len-schedule {s:?}: expected LEN:UNTIL_STEP,...,LEN with steps increasing, e.g. 512:2000,1024:4000,2048")
    };
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let (last, stages) = parts.split_last().ok_or_else(bad)?;
    let mut out: Vec<(usize, u64)> = Vec::new();
    for p in stages {
        let (l, until) = p.split_once(':').ok_or_else(bad)?;
        let (l, until): (usize, u64) = (l.parse().map_err(|_| bad())?, until.parse().map_err(|_| bad())?);
        if l == 0 || out.last().is_some_and(|q| q.1 >= until) {
            return Err(bad());
        }
        out.push((l, until));
    }
    let last: usize = last.parse().map_err(|_| bad())?;
    if last == 0 {
        return Err(bad());
    }
    Ok((out, last))
}

/// The vocabulary training feeds the model: the data's or the task's, and what it is called.
struct Vocab {
    size: usize,
    eos: Option<u32>,
    what: String,
}

/// The run to continue or to start.
fn open_run(a: &TrainArgs, data: &Vocab) -> Result<Run> {
    let dir = a.out.clone();
    let has_files = std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if a.resume {
        if a.model.is_some() || a.preset.is_some() || a.config.is_some() {
            bail!("--resume continues the model in {}: drop --model / --preset / --config", dir.display());
        }
        for (_, ck) in checkpoint::list(&dir) {
            let cfg = Config::from_file(&ck.join("config.json"));
            let loaded = cfg.and_then(|cfg| {
                let layout = Layout::new(&cfg, EMBEDDING_NAMES[0])?;
                Ok((checkpoint::load(&ck, &layout)?, layout))
            });
            match loaded {
                Ok((l, layout)) => {
                    eprintln!("resuming from {} (step {})", ck.display(), l.state.step);
                    check_vocab(&layout.cfg, data)?;
                    run::truncate_metrics(&dir, l.state.step)?;
                    return Ok(Run { dir, layout, params: l.params, m: l.m, v: l.v, state: l.state });
                }
                Err(e) => eprintln!("skipping {}: {e:#}", ck.display()),
            }
        }
        bail!("--resume: no complete checkpoint in {}", dir.display());
    }
    if has_files {
        bail!(
            "{} already exists and is not empty: pass --resume to continue that run, or choose another --out",
            dir.display()
        );
    }
    let (layout, params) = initial_model(a, data)?;
    let n = layout.len;
    Ok(Run {
        dir,
        layout,
        params,
        m: vec![0.0; n],
        v: vec![0.0; n],
        state: TrainerState { step: 0, pos: Default::default(), seed: a.seed, loss_scale: None },
    })
}

fn check_vocab(cfg: &Config, data: &Vocab) -> Result<()> {
    if data.size > cfg.vocab_padded {
        bail!(
            "{}: the data's vocabulary ({}) is larger than the model's ({}): prepare it with the model's tokenizer (--model)",
            data.what,
            data.size,
            cfg.vocab_padded
        );
    }
    Ok(())
}

/// The starting weights: a checkpoint's, or random ones with the data's vocabulary.
fn initial_model(a: &TrainArgs, data: &Vocab) -> Result<(Layout, Vec<f32>)> {
    if let Some(m) = &a.model {
        let dir = loader::hub::resolve(m)?;
        let cfg = Config::from_file(&dir.join("config.json"))?;
        check_vocab(&cfg, data)?;
        let ck = loader::Checkpoint::open_dir(&dir)?;
        let layout = Layout::new(&cfg, EMBEDDING_NAMES[0])?;
        let params = layout.load(&ck)?;
        return Ok((layout, params));
    }
    let mut cfg = match (&a.preset, &a.config) {
        (Some(p), _) => Config::preset(p)?,
        (_, Some(f)) => Config::from_file(f)?,
        _ => bail!("give --model, --preset or --config (or --resume)"),
    };
    cfg.vocab_size = data.size;
    cfg.vocab_padded = data.size.next_multiple_of(if cfg.arch == Arch::Mamba2 { 16 } else { 8 });
    cfg.eos_token_id = data.eos;
    let layout = Layout::new(&cfg, EMBEDDING_NAMES[0])?;
    let mut params = vec![0.0f32; layout.len];
    for t in mamba_lm::init::random_weights(&cfg, a.seed) {
        let p = layout.table.iter().find(|p| p.name == t.name);
        let Some(p) = p.filter(|p| p.shape == t.shape) else {
            bail!("initial tensor {} {:?} has no place in the training layout", t.name, t.shape)
        };
        params[p.range()].copy_from_slice(&t.data);
    }
    Ok((layout, params))
}

/// `--loss-scale` as a power of two (GradScaler's 65,536 when not given).
fn loss_scale_log2(a: &TrainArgs) -> Result<i32> {
    match a.loss_scale {
        None => Ok(LossScale::INIT_LOG2),
        Some(_) if a.dtype != DType::F16 => bail!("--loss-scale applies to --dtype f16 only"),
        Some(v) if v >= 1.0 && v <= 2f64.powi(100) && v.log2().fract() == 0.0 => Ok(v.log2() as i32),
        Some(v) => bail!("--loss-scale must be a power of two from 1 to 2^100 (e.g. 65536), got {v}"),
    }
}

pub fn cmd_train(a: TrainArgs) -> Result<()> {
    if !(0.0..1.0).contains(&a.betas[0]) || !(0.0..1.0).contains(&a.betas[1]) {
        bail!("--betas must be two numbers in [0, 1), got {:?}", a.betas);
    }
    if a.lr <= 0.0 || a.min_lr.is_some_and(|m| m < 0.0 || m > a.lr) {
        bail!("--lr must be positive and --min-lr in [0, --lr]");
    }
    crate::set_threads(a.threads)?;
    let data = a.data.as_deref().map(Data::open).transpose()?;
    let (source, vocab) = match (&data, a.task) {
        (Some(d), _) => {
            let v = Vocab { size: d.meta.vocab_size, eos: Some(d.meta.eos_id), what: d.dir.display().to_string() };
            (Source::Tokens(d), v)
        }
        (None, Some(task)) => {
            let (stages, last) = a.seq_len_schedule.clone().unwrap_or((vec![], a.seq_len));
            let lens = stages.iter().map(|s| s.0).chain([last]).chain(a.eval_lens.iter().copied());
            if let Some(l) = lens.into_iter().find(|&l| l < task.min_len()) {
                bail!("{task:?} needs sequences of at least {} tokens, got {l}", task.min_len());
            }
            let v = Vocab { size: task.vocab(), eos: None, what: format!("task {task:?}") };
            (Source::Task { task, eval_lens: a.eval_lens.clone() }, v)
        }
        (None, None) => bail!("give --data or --task"),
    };
    let init_scale = loss_scale_log2(&a)?;
    let mut run = open_run(&a, &vocab)?;
    run.state.loss_scale = match (a.dtype, run.state.loss_scale) {
        (DType::F16, Some(ls)) if a.loss_scale.is_none() => Some(ls),
        (DType::F16, _) => Some(LossScale::new(init_scale)),
        _ => None,
    };
    let (stages, seq_len) = a.seq_len_schedule.clone().unwrap_or((vec![], a.seq_len));
    let mut o = Options {
        steps: 0,
        batch: a.batch_size,
        seq_len,
        seq_len_schedule: stages,
        recompute: a.recompute,
        grad_accum: a.grad_accum,
        schedule: Schedule { max: a.lr, min: a.min_lr.unwrap_or(a.lr / 10.0), warmup: 0, decay_steps: 0 },
        adamw: AdamW { beta1: a.betas[0], beta2: a.betas[1], weight_decay: a.weight_decay, ..AdamW::default() },
        clip: a.clip,
        eval_every: a.eval_every,
        eval_tokens: a.eval_tokens,
        save_every: a.save_every,
        keep: a.keep,
        json: a.json,
        plot: a.plot.clone(),
        device: gpu_ordinal(a.device),
        dtype: a.dtype,
    };
    o.steps = match (a.steps, a.tokens) {
        (_, Some(n)) => {
            let mut steps = 0;
            while o.tokens_before(steps) < n {
                steps += 1;
            }
            steps
        }
        (s, None) => s.unwrap_or(1000),
    };
    o.schedule.warmup = a.warmup.unwrap_or((o.steps / 10).min(2000));
    o.schedule.decay_steps = o.steps;
    // The first SIGINT / SIGTERM asks for a clean stop (checkpoint, then exit); a second one
    // exits at once.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))?;
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    if run::train(&mut run, &source, &o, &stop)? {
        eprintln!("trained {} steps: {}", run.state.step, final_dir(&run.dir).display());
    }
    Ok(())
}

fn final_dir(run: &Path) -> PathBuf {
    run.join("final")
}

#[derive(Args)]
pub struct PrepareArgs {
    /// Text files (one document each) and .jsonl files (a "text" field per line).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Output directory (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// A tokenizer.json to use.
    #[arg(long, group = "tok")]
    tokenizer: Option<PathBuf>,
    /// Use this model's tokenizer (its tokenizer.json, else GPT-NeoX-20B as the state-spaces checkpoints).
    #[arg(long, group = "tok")]
    model: Option<String>,
    /// Train a byte-level BPE tokenizer on the inputs (with --vocab-size).
    #[arg(long, group = "tok", requires = "vocab_size")]
    train_tokenizer: bool,
    /// Vocabulary of the trained tokenizer.
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Share of the token stream kept for validation (the end of it).
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Seed of the document order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn cmd_prepare(a: PrepareArgs) -> Result<()> {
    use mamba_lm::train::prepare;
    let docs = prepare::read_documents(&a.input)?;
    let (tok, source) = if a.train_tokenizer {
        let n = a.vocab_size.expect("clap requires --vocab-size");
        eprintln!("training a byte-level BPE tokenizer of {n} entries on {} documents", docs.len());
        (prepare::train_tokenizer(&docs, n)?, format!("byte-level BPE trained on the inputs ({n})"))
    } else if let Some(p) = &a.tokenizer {
        (mamba_lm::tokenizer::load(Some(p), None)?, p.display().to_string())
    } else if let Some(m) = &a.model {
        let dir = loader::hub::resolve(m)?;
        (mamba_lm::tokenizer::load(None, Some(&dir))?, format!("{m}'s"))
    } else {
        (mamba_lm::tokenizer::neox(), "GPT-NeoX-20B (bundled)".to_string())
    };
    let eos = tok
        .token_to_id(prepare::EOS)
        .ok_or_else(|| anyhow::anyhow!("the tokenizer has no {} token to separate documents", prepare::EOS))?;
    let bar = indicatif::ProgressBar::new(docs.iter().map(|d| d.len() as u64).sum());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("template"),
    );
    let meta = prepare::prepare(docs, &tok, &source, eos, a.val_fraction, a.seed, &a.out, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    eprintln!(
        "{}: {} training and {} validation tokens, vocabulary {} ({})",
        a.out.display(),
        meta.train_tokens,
        meta.val_tokens,
        meta.vocab_size,
        meta.dtype
    );
    Ok(())
}

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Preset to train (random weights).
    #[arg(long, default_value = "mamba-130m")]
    preset: String,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Timed steps (after one untimed); the median is reported.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Recompute each layer's activations in the backward (as train --recompute).
    #[arg(long)]
    recompute: bool,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: crate::Device,
    /// f32, or bf16 / f16 on a GPU (as train --dtype).
    #[arg(long, default_value = "f32", value_parser = crate::parse_dtype)]
    dtype: mamba_lm::tensor::DType,
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object per figure instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn cmd_bench_train(a: BenchTrainArgs) -> Result<()> {
    crate::set_threads(a.threads)?;
    let device = gpu_ordinal(a.device);
    for f in mamba_lm::train::bench::train(&a.preset, a.batch, a.seq_len, a.steps, a.recompute, (device, a.dtype))? {
        if a.json {
            println!("{}", serde_json::to_string(&f)?);
        } else {
            println!(
                "{:<14} batch {:<3} seq {:<6} {:<16} {:>10.2} {}",
                f.model, f.batch, f.length, f.figure, f.value, f.unit
            );
        }
    }
    Ok(())
}

/// The GPU a `--device` names (None: the CPU).
fn gpu_ordinal(d: crate::Device) -> Option<usize> {
    match d {
        crate::Device::Cpu => None,
        crate::Device::Cuda(n) => Some(n),
    }
}
