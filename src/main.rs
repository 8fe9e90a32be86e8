//! `mamba-lm`: generate, score, init, info and bench for Mamba-1/Mamba-2 language models.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mamba_lm::backend::Backend;
use mamba_lm::generate::{generate_text, GenerateOptions, Start};
use mamba_lm::sampling::Sampling;
use mamba_lm::tensor::DType;
use mamba_lm::{loader, tokenizer, Config, Model, Snapshot};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[cfg(feature = "cuda")]
mod gpu_bench;
mod serve;
mod train_cli;

#[derive(Parser)]
#[command(
    name = "mamba-lm",
    version,
    about = "Mamba-1 / Mamba-2 state-space language models: generate, score, train, init, info, bench."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (continuous batching, prefix cache).
    Serve(serve::ServeArgs),
    /// Mean next-token NLL and perplexity of text or token ids.
    Score(ScoreArgs),
    /// Write a randomly initialised checkpoint (official initialisation, transformers format).
    Init(InitArgs),
    /// Describe a model: architecture, sizes, parameters, state size, stored dtype.
    Info(InfoArgs),
    /// Rewrite a checkpoint with 8-bit (or 16-bit) large matrices that load without converting.
    Quantize(QuantizeArgs),
    /// Tokenize text files into the token shards `train` reads.
    Prepare(train_cli::PrepareArgs),
    /// Train or fine-tune a model on data made by `prepare` (checkpoints, metrics, resume).
    Train(train_cli::TrainArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Args)]
struct ModelArgs {
    /// Model: `default` (bundled: ~9M parameters trained on Shakespeare), a local directory
    /// (config.json + weights) or a Hugging Face repo id such as state-spaces/mamba-130m (resolved
    /// through the HF cache; set HF_HUB_OFFLINE=1 to never download).
    #[arg(long, short = 'm', default_value = "default")]
    model: String,
    /// Storage type of the large weight matrices (on the GPU also of the activations); the
    /// residual stream and the recurrent state are f32, except Mamba-2's SSM state on the CPU in
    /// bf16 and int8, kept in bf16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    /// Where to run: cpu, or cuda / cuda:N (needs a binary built with --features cuda).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// tokenizer.json to use instead of the model's own or the bundled GPT-NeoX-20B one.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct QuantizeArgs {
    /// The model to convert: a local directory or a Hugging Face repo id.
    #[arg(long, short = 'm')]
    model: String,
    /// The new model's directory (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Storage type of the large matrices: int8 (blocks of 32 with f32 scales), bf16 or f16.
    #[arg(long, default_value = "int8", value_parser = parse_dtype)]
    dtype: DType,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Prompt text.
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 510,2852,273.
    #[arg(long, group = "input", value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// File with one prompt per line, run together as a batch.
    #[arg(long, group = "input")]
    prompt_file: Option<PathBuf>,
    /// Tokens to generate per prompt (fewer if EOS or a stop string comes first).
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep only the k most likely tokens; 1 is greedy (the mamba_ssm default), 0 disables.
    #[arg(long, default_value_t = 1)]
    top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    top_p: f32,
    /// With --top-k 0: drop tokens less likely than min_p × the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    /// Penalise tokens already seen (CTRL rule); 1 = off.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop a sequence when its text contains this string (repeatable); the string is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object per prompt instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Save the session (state after every token) to this file when done.
    #[arg(long)]
    save_state: Option<PathBuf>,
    /// Continue a session saved with --save-state; the prompt, if any, is appended to it.
    #[arg(long)]
    load_state: Option<PathBuf>,
    /// Allow --save-state to replace an existing file.
    #[arg(long)]
    force: bool,
    /// Make each sequence's tokens independent of the others in its batch on the GPU in bf16/f16:
    /// every sequence decodes through the single-sequence kernels (the CPU, and the GPU in f32,
    /// always do). Costs the batching: a step of n sequences takes n single-sequence steps.
    #[arg(long)]
    deterministic: bool,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// A text file, scored as one sequence.
    #[arg(long, group = "input", required = true)]
    text_file: Option<PathBuf>,
    /// A JSON file holding a list of token-id lists, one sequence each.
    #[arg(long, group = "input")]
    ids_file: Option<PathBuf>,
    /// Tokens per forward pass; the state carries across chunks (1 = pure recurrence).
    #[arg(long, default_value_t = 1024)]
    chunk: usize,
    /// Write float32 logits [batch, length, padded_vocab] as tensor `logits` to this safetensors file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Write the gradient of the mean next-token cross-entropy (over every position of every
    /// sequence, the padded vocabulary) with respect to every weight to this safetensors file,
    /// f32 under the checkpoint's tensor names (a tied embedding holds the sum of both uses).
    /// Computed in f32 (on --device); with --device cuda --dtype bf16 the products run in bf16.
    #[arg(long)]
    grads_out: Option<PathBuf>,
    /// Allow --logits-out / --grads-out to replace an existing file.
    #[arg(long)]
    force: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InitArgs {
    /// One of the published shapes (mamba-130m … mamba-2.8b, mamba2-130m … mamba2-2.7b) or tiny, tiny-mamba2.
    #[arg(long, group = "shape", required = true)]
    preset: Option<String>,
    /// A config.json (either dialect) giving the shape.
    #[arg(long, group = "shape")]
    config: Option<PathBuf>,
    /// Output directory (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage type of the written weights (A_log, D and dt biases stay f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
}

#[derive(Args)]
struct InfoArgs {
    /// `default` (bundled), a model directory or a Hugging Face repo id.
    #[arg(long, short = 'm', default_value = "default")]
    model: String,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// CPU prefill and decode speed at batch 1 on random weights of a preset.
    Cpu(BenchCpuArgs),
    /// Training steps per second and peak memory on random weights of a preset.
    Train(train_cli::BenchTrainArgs),
    /// GPU: the selective scan alone (D channels, N states, batch 1, bf16) over sequence lengths.
    Scan(BenchScanArgs),
    /// GPU: batch-1 first-token latency (prompt + prefill) and per-token decode latency.
    Decode(BenchGpuArgs),
    /// GPU: prefill rate at batch 1.
    Prefill(BenchGpuArgs),
    /// GPU: generation throughput, prompt + generated tokens, over batch sizes (paper App. E.5).
    Generate(BenchGpuArgs),
    /// GPU: device memory for generation against batch and tokens generated.
    Memory(BenchGpuArgs),
    /// Draw the plots from JSON-lines figure files (ours and scripts/gpu_baselines.py's).
    Plot(BenchPlotArgs),
}

#[derive(Args)]
struct BenchPlotArgs {
    /// JSON-lines files of figures.
    #[arg(long, required = true, value_delimiter = ',')]
    input: Vec<PathBuf>,
    /// PNG to write.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct BenchScanArgs {
    #[arg(long, default_value_t = 1024)]
    d: usize,
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// Sequence lengths (default 2^9 … 2^19).
    #[arg(long, value_delimiter = ',')]
    lengths: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    reps: usize,
    #[command(flatten)]
    out: BenchOut,
}

#[derive(Args)]
struct BenchOut {
    /// GPU to run on.
    #[arg(long, default_value = "cuda", value_parser = parse_device)]
    device: Device,
    /// One JSON object per figure instead of a table.
    #[arg(long)]
    json: bool,
    /// Also append the figures as JSON lines to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Draw the figure into this PNG (scan: time vs length; generate: throughput vs batch).
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Args)]
struct BenchGpuArgs {
    /// Presets with random weights made in memory (repeatable).
    #[arg(long, group = "what")]
    preset: Vec<String>,
    /// A model directory or Hugging Face repo id instead of presets.
    #[arg(long, group = "what")]
    model: Option<String>,
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    dtype: DType,
    /// Prompt length (decode: 100, prefill: 512, generate: 2048).
    #[arg(long)]
    prompt_len: Option<usize>,
    /// Tokens generated (decode, generate: 128; memory: the largest of 128, 1024, 8192).
    #[arg(long)]
    gen: Option<usize>,
    /// Batch sizes (generate: 1,16,64,128; memory: 1,64).
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    #[command(flatten)]
    out: BenchOut,
}

#[derive(Args)]
struct BenchCpuArgs {
    /// Presets to measure (repeatable).
    #[arg(long, default_values_t = ["mamba-130m".to_string(), "mamba2-130m".to_string()])]
    preset: Vec<String>,
    /// Weight storage types to measure (repeatable).
    #[arg(long, default_values_t = [DType::F32, DType::BF16, DType::I8], value_parser = parse_dtype)]
    dtype: Vec<DType>,
    /// Prompt length for the prefill figure.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens decoded for the decode figure (and per sequence for the generate figure).
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Batch sizes for a generation-throughput figure as `bench generate` counts it on the GPU
    /// (batch × gen new tokens over the whole time, prefill included), e.g. 1,4,16.
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Prompt length of each sequence in the generate figure.
    #[arg(long, default_value_t = 2048)]
    generate_prompt_len: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object per figure instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    s.parse()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Device {
    Cpu,
    Cuda(usize),
}

fn parse_device(s: &str) -> Result<Device, String> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s {
        "cuda" => Some(0),
        _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
    };
    ordinal.map(Device::Cuda).ok_or_else(|| format!("unknown device '{s}' (expected cpu, cuda or cuda:N)"))
}

/// A loaded model on the device the user chose (one per run, so its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Placed {
    Cpu(Model),
    #[cfg(feature = "cuda")]
    Gpu(mamba_lm::cuda::model::GpuModel),
}

impl Placed {
    fn new(model: Model, device: Device) -> Result<Placed> {
        check_device(&model.cfg, device)?;
        match device {
            Device::Cpu => Ok(Placed::Cpu(model)),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let gpu = mamba_lm::cuda::Gpu::open(n)?;
                Ok(Placed::Gpu(mamba_lm::cuda::model::GpuModel::new(gpu, &model)?))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => unreachable!("check_device refuses cuda in a build without it"),
        }
    }

    fn cfg(&self) -> &Config {
        match self {
            Placed::Cpu(m) => &m.cfg,
            #[cfg(feature = "cuda")]
            Placed::Gpu(m) => &m.cfg,
        }
    }

    /// The model as a backend. `deterministic`: a sequence's numbers do not depend on its batch
    /// (the CPU's always hold that; the GPU's batched GEMMs hold it only in f32 with one
    /// sequence per batch, so there each sequence runs alone).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn backend(&self, deterministic: bool) -> Box<dyn Backend + '_> {
        match self {
            Placed::Cpu(m) => Box::new(mamba_lm::backend::Cpu::new(m)),
            #[cfg(feature = "cuda")]
            Placed::Gpu(m) if deterministic || m.dtype == DType::F32 => {
                Box::new(mamba_lm::backend::PerSequence::new(m.cfg.clone(), || mamba_lm::cuda::model::GpuRun::new(m)))
            }
            #[cfg(feature = "cuda")]
            Placed::Gpu(m) => Box::new(mamba_lm::cuda::model::GpuRun::new(m)),
        }
    }
}

pub(crate) fn set_threads(n: Option<usize>) -> Result<()> {
    if let Some(n) = n {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow!("cannot start threads: {e}"))?;
    }
    Ok(())
}

/// What `device` needs of a model, from its config alone: checked before the weights load (and
/// before a GPU is opened), so a model that cannot run there says why at once, on any machine.
fn check_device(cfg: &Config, device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => mamba_lm::cuda::model::check_supported(cfg),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = cfg;
            bail!("this mamba-lm was built without CUDA support: rebuild with `cargo build --release --features cuda`")
        }
    }
}

fn load_model(m: &ModelArgs) -> Result<(Placed, PathBuf)> {
    set_threads(m.threads)?;
    if m.dtype == DType::I8 && m.device != Device::Cpu {
        bail!("--dtype int8 runs on the CPU; on the GPU use bf16 or f16");
    }
    let dir = loader::hub::resolve(&m.model)?;
    check_device(&Config::from_file(&dir.join("config.json"))?, m.device)?;
    // Loading a multi-GB checkpoint takes seconds: show that something is happening (on a
    // terminal only; indicatif draws nothing when stderr is not one).
    let spin = indicatif::ProgressBar::new_spinner().with_message(format!("loading {}", dir.display()));
    spin.enable_steady_tick(std::time::Duration::from_millis(120));
    let model = Model::load_dir(&dir, m.dtype).and_then(|model| Placed::new(model, m.device));
    spin.finish_and_clear();
    Ok((model?, dir))
}

/// End-of-sequence id: the config's, then generation_config.json's, then the tokenizer's.
fn eos_id(cfg: &Config, dir: &Path, tok: &tokenizer::Tokenizer) -> Option<u32> {
    cfg.eos_token_id
        .or_else(|| {
            let text = std::fs::read_to_string(dir.join("generation_config.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            v.get("eos_token_id")?.as_u64().map(|x| x as u32)
        })
        .or_else(|| tok.token_to_id("<|endoftext|>"))
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let sampling = Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
    };
    sampling.validate().map_err(anyhow::Error::msg)?;
    if let Some(p) = &a.save_state {
        if p.exists() && !a.force {
            bail!("{} already exists; refusing to overwrite it (pass --force to replace it)", p.display());
        }
    }
    let (model, dir) = load_model(&a.m)?;
    let tok = tokenizer::load(a.m.tokenizer.as_deref(), Some(&dir))?;
    let prompts: Vec<Vec<u32>> = if let Some(text) = &a.prompt {
        vec![tokenizer::encode(&tok, text)?]
    } else if let Some(ids) = &a.prompt_ids {
        vec![ids.clone()]
    } else if let Some(f) = &a.prompt_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read prompt file {}", f.display()))?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            bail!("prompt file {} has no prompts", f.display());
        }
        lines.iter().map(|l| tokenizer::encode(&tok, l)).collect::<Result<_>>()?
    } else if a.load_state.is_some() {
        vec![vec![]]
    } else {
        bail!("give a prompt: --prompt, --prompt-ids or --prompt-file (or --load-state to continue a session)");
    };
    if prompts.len() > 1 && (a.save_state.is_some() || a.load_state.is_some()) {
        bail!("--save-state and --load-state work with a single prompt");
    }
    let resume = match &a.load_state {
        Some(p) => Some(Snapshot::load(model.cfg(), p)?),
        None => None,
    };
    let tok_vocab = tok.get_vocab_size(true);
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        seed: a.seed,
        eos: if a.ignore_eos { None } else { eos_id(model.cfg(), &dir, &tok) },
        vocab_limit: model.cfg().vocab_size.min(tok_vocab),
    };
    let stream = prompts.len() == 1 && !a.json;
    let mut out = std::io::stdout().lock();
    if stream && !prompts[0].is_empty() {
        write!(out, "{}", tokenizer::decode(&tok, &prompts[0])?)?;
        out.flush()?;
    }
    let starts: Vec<Start> = match resume {
        Some(snap) => vec![Start { prompt: prompts[0].clone(), resume: Some(snap) }],
        None => prompts.iter().map(|p| Start { prompt: p.clone(), resume: None }).collect(),
    };
    let outs = generate_text(model.backend(a.deterministic).as_mut(), starts, &opts, &tok, &a.stop, |_, text| {
        if stream {
            let _ = write!(out, "{text}").and_then(|_| out.flush());
        }
    })?;
    for o in &outs {
        let text = &o.text;
        if a.json {
            let v = json!({
                "prompt_ids": o.prompt_ids, "new_ids": o.new_ids, "text": text,
                "prefill_ms": o.prefill_ms, "decode_ms_per_token": o.decode_ms_per_token,
                "device_ms_per_token": o.device_ms_per_token,
            });
            writeln!(out, "{v}")?;
        } else if stream {
            writeln!(out)?;
        } else {
            writeln!(out, "{}{}\n", tokenizer::decode(&tok, &o.prompt_ids)?, text)?;
        }
    }
    if let Some(p) = &a.save_state {
        let snap = outs[0].snapshot.as_ref().ok_or_else(|| anyhow!("generation kept no final state"))?;
        snap.save(model.cfg(), p, a.force)?;
        eprintln!("saved session ({} tokens) to {}", snap.tokens.len(), p.display());
    }
    Ok(())
}

/// The sequences `score` reads: a text file's tokens or a JSON list of id lists.
fn score_inputs(a: &ScoreArgs, dir: &Path) -> Result<Vec<Vec<u32>>> {
    let seqs: Vec<Vec<u32>> = if let Some(f) = &a.text_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        let tok = tokenizer::load(a.m.tokenizer.as_deref(), Some(dir))?;
        vec![tokenizer::encode(&tok, &text)?]
    } else {
        let f = a.ids_file.as_ref().expect("clap requires one input");
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: expected a JSON list of lists of token ids", f.display()))?
    };
    if seqs.is_empty() {
        bail!("nothing to score");
    }
    Ok(seqs)
}

fn cmd_score(a: ScoreArgs) -> Result<()> {
    for p in [&a.logits_out, &a.grads_out].into_iter().flatten() {
        if p.exists() && !a.force {
            bail!("{} already exists; refusing to overwrite it (pass --force to replace it)", p.display());
        }
    }
    if a.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    if a.grads_out.is_some() {
        return score_with_grads(&a);
    }
    let (model, dir) = load_model(&a.m)?;
    let seqs = score_inputs(&a, &dir)?;
    if a.logits_out.is_some() && seqs.iter().any(|s| s.len() != seqs[0].len()) {
        bail!("--logits-out needs sequences of equal length (it writes one [batch, length, vocab] tensor)");
    }
    let mut all_logits: Vec<f32> = Vec::new();
    let mut results = Vec::new();
    let bar = indicatif::ProgressBar::new(seqs.iter().map(|s| s.len() as u64).sum());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tokens {per_sec} eta {eta}").expect("template"),
    );
    for (i, s) in seqs.iter().enumerate() {
        let keep = a.logits_out.is_some();
        let r = mamba_lm::score::score_on(model.backend(false).as_mut(), s, a.chunk, keep, |n, l| {
            bar.inc(n as u64);
            all_logits.extend_from_slice(l);
            Ok(())
        })
        .with_context(|| format!("sequence {i}"))?;
        results.push(r);
    }
    bar.finish_and_clear();
    if let Some(p) = &a.logits_out {
        let bytes: Vec<u8> = all_logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        let shape = vec![seqs.len(), seqs[0].len(), model.cfg().vocab_padded];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)?;
        let data = safetensors::serialize([("logits".to_string(), view)], None)?;
        mamba_lm::io::write_file(p, &data, a.force)?;
    }
    report_scores(&results, &seqs, a.json)
}

/// `score --grads-out`: the loss and its gradient by the training forward and backward.
fn score_with_grads(a: &ScoreArgs) -> Result<()> {
    if a.logits_out.is_some() {
        bail!("--grads-out and --logits-out cannot be combined: run score twice");
    }
    set_threads(a.m.threads)?;
    let dir = loader::hub::resolve(&a.m.model)?;
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let ck = loader::Checkpoint::open_dir(&dir)?;
    let layout = mamba_lm::train::params::Layout::of_checkpoint(&cfg, &ck)?;
    let params = layout.load(&ck)?;
    let seqs = score_inputs(a, &dir)?;
    let v = cfg.vocab_padded;
    if let Some(t) = seqs.iter().flatten().find(|&&t| t as usize >= v) {
        bail!("token id {t} is out of range: the model's vocabulary has {v} entries");
    }
    let bar = indicatif::ProgressBar::new(seqs.iter().map(|s| s.len() as u64).sum());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tokens {per_sec} eta {eta}").expect("template"),
    );
    let on_row = |n: usize| bar.inc(n as u64);
    let (losses, grads) = match a.m.device {
        Device::Cpu => mamba_lm::train::model::gradients(&layout, &params, &seqs, on_row)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let gpu = mamba_lm::cuda::Gpu::open(n)?;
            mamba_lm::cuda::train::gradients(gpu, a.m.dtype, &layout, &params, &seqs, on_row)?
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            bail!("this mamba-lm was built without CUDA support: rebuild with `cargo build --release --features cuda`")
        }
    };
    bar.finish_and_clear();
    let results: Vec<_> =
        losses.iter().zip(&seqs).map(|(&l, s)| mamba_lm::score::Score { nll_sum: l, predicted: s.len() - 1 }).collect();
    let count: usize = seqs.iter().map(|s| s.len() - 1).sum();
    let meta = std::collections::HashMap::from([
        ("what".to_string(), "d(mean next-token cross-entropy)/d(weight), f32".to_string()),
        ("loss".to_string(), (losses.iter().sum::<f64>() / count as f64).to_string()),
    ]);
    let p = a.grads_out.as_ref().expect("checked by the caller");
    mamba_lm::io::write_file(p, &layout.to_safetensors(&grads, Some(meta))?, a.force)?;
    report_scores(&results, &seqs, a.json)
}

/// Prints each sequence's score and, for several, the total (a table, or one JSON line).
fn report_scores(results: &[mamba_lm::score::Score], seqs: &[Vec<u32>], json: bool) -> Result<()> {
    let total = results.iter().fold(mamba_lm::score::Score::default(), |acc, r| mamba_lm::score::Score {
        nll_sum: acc.nll_sum + r.nll_sum,
        predicted: acc.predicted + r.predicted,
    });
    let mut out = std::io::stdout().lock();
    if json {
        let per: Vec<_> = results
            .iter()
            .zip(seqs)
            .map(|(r, s)| json!({"tokens": s.len(), "nll_per_token": r.nll_per_token(), "perplexity": r.perplexity()}))
            .collect();
        let v = json!({"sequences": per, "nll_per_token": total.nll_per_token(), "perplexity": total.perplexity()});
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{:>4} {:>8} {:>14} {:>12}", "seq", "tokens", "nll/token", "perplexity")?;
        for (i, (r, s)) in results.iter().zip(seqs).enumerate() {
            writeln!(out, "{i:>4} {:>8} {:>14.6} {:>12.4}", s.len(), r.nll_per_token(), r.perplexity())?;
        }
        if results.len() > 1 {
            writeln!(out, " all {:>8} {:>14.6} {:>12.4}", total.predicted, total.nll_per_token(), total.perplexity())?;
        }
    }
    Ok(())
}

fn cmd_init(a: InitArgs) -> Result<()> {
    let cfg = match (&a.preset, &a.config) {
        (Some(p), _) => Config::preset(p)?,
        (_, Some(f)) => Config::from_file(f)?,
        _ => bail!("give --preset or --config"),
    };
    mamba_lm::init::write_checkpoint(&cfg, a.seed, a.dtype, &a.out)?;
    eprintln!(
        "wrote {} ({:?}, {} layers, d_model {}) to {}",
        a.preset.as_deref().unwrap_or("model"),
        cfg.arch,
        cfg.n_layer,
        cfg.d_model,
        a.out.display()
    );
    Ok(())
}

fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    let dir = loader::hub::resolve(&a.model)?;
    mamba_lm::quantize::quantize_dir(&dir, &a.out, a.dtype)?;
    eprintln!("wrote {} with {} large matrices to {}", dir.display(), a.dtype, a.out.display());
    Ok(())
}

fn cmd_info(a: InfoArgs) -> Result<()> {
    let dir = loader::hub::resolve(&a.model)?;
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let ck = loader::Checkpoint::open_dir(&dir)?;
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for n in ck.names() {
        *counts.entry(ck.dtype_of(n).map_or("?", |d| d.name())).or_default() += 1;
    }
    let stored: Vec<String> = counts.iter().map(|(d, n)| format!("{d} ({n} tensors)")).collect();
    let state_bytes = cfg.state_floats() * 4;
    let files: Vec<String> = ck.files.iter().map(|f| f.display().to_string()).collect();
    let v = json!({
        "architecture": format!("{:?}", cfg.arch), "format": format!("{:?}", cfg.format),
        "d_model": cfg.d_model, "n_layer": cfg.n_layer, "d_inner": cfg.d_inner, "d_state": cfg.d_state,
        "d_conv": cfg.d_conv, "heads": if cfg.arch == mamba_lm::config::Arch::Mamba2 { cfg.nheads() } else { 0 },
        "headdim": cfg.headdim, "ngroups": cfg.ngroups, "dt_rank": cfg.dt_rank,
        "vocab_size": cfg.vocab_size, "vocab_padded": cfg.vocab_padded, "tied_embeddings": cfg.tie_embeddings,
        "parameters": cfg.num_params(), "state_bytes_per_sequence": state_bytes,
        "stored_dtype": stored.join(", "), "files": files,
    });
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{v}")?;
    } else {
        for (k, val) in v.as_object().expect("object") {
            let s = match val {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            writeln!(out, "{k:>26}: {s}")?;
        }
    }
    Ok(())
}

fn cmd_bench(b: BenchCmd) -> Result<()> {
    let a = match b {
        BenchCmd::Cpu(a) => a,
        BenchCmd::Plot(p) => return cmd_plot(p),
        BenchCmd::Train(t) => return train_cli::cmd_bench_train(t),
        #[cfg(feature = "cuda")]
        other => return gpu_bench::run(other),
        #[cfg(not(feature = "cuda"))]
        _ => bail!("GPU benchmarks need a mamba-lm built with CUDA support: `cargo build --release --features cuda`"),
    };
    set_threads(a.threads)?;
    let mut out = std::io::stdout().lock();
    let isa = mamba_lm::ops::simd::isa();
    if !a.json {
        writeln!(out, "# CPU: {}, kernels: {}, threads: {}", cpu_model(), isa.name(), rayon::current_num_threads())?;
        writeln!(
            out,
            "{:<14} {:<6} {:<26} {:>5} {:>8} {:>12}",
            "model", "dtype", "figure", "batch", "length", "value"
        )?;
    }
    let read_gb_s = mamba_lm::bench::read_bandwidth();
    if a.json {
        let f = json!({"bench": "cpu", "model": "machine", "dtype": "", "batch": 1, "length": 0,
            "figure": "read_bandwidth_gb_s", "value": read_gb_s, "unit": "GB/s"});
        writeln!(out, "{f}")?;
    } else {
        writeln!(out, "# read bandwidth: {read_gb_s:.1} GB/s")?;
    }
    if a.batch.contains(&0) {
        bail!("--batch: batch sizes start at 1");
    }
    let b = mamba_lm::bench::CpuBench {
        prompt: a.prompt_len,
        gen: a.gen,
        reps: a.reps,
        batches: a.batch.clone(),
        generate_prompt: a.generate_prompt_len,
        read_gb_s,
    };
    for p in &a.preset {
        for &d in &a.dtype {
            for f in mamba_lm::bench::cpu(p, d, &b)? {
                if a.json {
                    writeln!(out, "{}", serde_json::to_string(&f)?)?;
                } else {
                    writeln!(
                        out,
                        "{:<14} {:<6} {:<26} {:>5} {:>8} {:>8.2} {}",
                        f.model, f.dtype, f.figure, f.batch, f.length, f.value, f.unit
                    )?;
                }
                out.flush()?;
            }
        }
    }
    Ok(())
}

fn cmd_plot(p: BenchPlotArgs) -> Result<()> {
    if p.out.exists() && !p.force {
        bail!("{} already exists; refusing to overwrite it (pass --force to replace it)", p.out.display());
    }
    let mut figs = Vec::new();
    for f in &p.input {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let fig: mamba_lm::bench::Figure = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a benchmark figure", f.display(), i + 1))?;
            figs.push(fig);
        }
    }
    mamba_lm::plot::draw(&figs, &p.out)?;
    eprintln!("wrote {}", p.out.display());
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Keeps freed activation memory in the process. glibc returns large blocks to the kernel on
/// free (blocks above its mmap threshold, and the heap's top beyond its trim threshold), so every
/// forward pass faulted its buffers in again and the kernel zeroed them page by page: ~15 % of a
/// 2,048-token prefill of a 130M model. What stays mapped is the largest pass's working set.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Serve(a) => serve::cmd_serve(a),
        Cmd::Score(a) => cmd_score(a),
        Cmd::Init(a) => cmd_init(a),
        Cmd::Info(a) => cmd_info(a),
        Cmd::Prepare(a) => train_cli::cmd_prepare(a),
        Cmd::Train(a) => train_cli::cmd_train(a),
        Cmd::Quantize(a) => cmd_quantize(a),
        Cmd::Bench(b) => cmd_bench(b),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
