//! `bench train`: the speed and memory of training steps on random weights of a preset and
//! random tokens, timed through [`super::run::step`] (what `train` runs per step), on the CPU
//! or a GPU.

use super::checkpoint::TrainerState;
use super::engine::Engine;
use super::optim::LossScale;
use super::optim::{AdamW, Schedule};
use super::params::{Layout, EMBEDDING_NAMES};
use super::run::{step, Options, Run};
use crate::bench::Figure;
use crate::config::Config;
use anyhow::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// The dense bf16 tensor-core peak of an H100 / H200 SXM (FLOP/s), the MFU's denominator.
const HOPPER_BF16_PEAK: f64 = 989e12;

/// FLOPs of the products per trained token: every projection and the LM head, 2 per weight
/// forward and 4 backward (the scan, conv and norms are not counted).
fn gemm_flops_per_token(layout: &Layout) -> f64 {
    let proj: usize = layout.table.iter().filter(|p| p.name.ends_with("proj.weight")).map(|p| p.range().len()).sum();
    6.0 * (proj + layout.lm_head.len()) as f64
}

/// Times `steps` training steps (after one untimed) of `preset` at `batch × seq_len` tokens in
/// `dtype` on the CPU (`device` None) or a GPU (`recompute`: per-layer activation recompute);
/// reports the median step's tokens/s and time, the peak memory and, on a GPU, the MFU.
pub fn train(
    preset: &str,
    batch: usize,
    seq_len: usize,
    steps: usize,
    recompute: bool,
    (device, dtype): (Option<usize>, crate::tensor::DType),
) -> Result<Vec<Figure>> {
    if batch == 0 || seq_len == 0 || steps == 0 {
        bail!("--batch, --seq-len and --steps must be at least 1");
    }
    let cfg = Config::preset(preset)?;
    let layout = Layout::new(&cfg, EMBEDDING_NAMES[0])?;
    let mut params = vec![0.0f32; layout.len];
    for t in crate::init::random_weights(&cfg, 0) {
        if let Some(p) = layout.table.iter().find(|p| p.name == t.name) {
            params[p.range()].copy_from_slice(&t.data);
        }
    }
    let n = layout.len;
    let mut run = Run {
        dir: std::env::temp_dir(),
        layout,
        params,
        m: vec![0.0; n],
        v: vec![0.0; n],
        state: TrainerState {
            step: 0,
            pos: Default::default(),
            seed: 0,
            loss_scale: (dtype == crate::tensor::DType::F16).then(|| LossScale::new(LossScale::INIT_LOG2)),
        },
    };
    let o = Options {
        steps: steps as u64 + 1,
        batch,
        seq_len,
        seq_len_schedule: vec![],
        recompute,
        grad_accum: 1,
        schedule: Schedule { max: 6e-4, min: 6e-5, warmup: 0, decay_steps: steps as u64 + 1 },
        adamw: AdamW::default(),
        clip: 1.0,
        eval_every: 0,
        eval_tokens: 0,
        save_every: 0,
        keep: 0,
        json: false,
        plot: None,
        device,
        dtype,
    };
    let mut eng = Engine::new(&run, device, dtype)?;
    let mut rng = StdRng::seed_from_u64(1);
    let vocab = cfg.vocab_size as u32;
    let mut times = Vec::with_capacity(steps);
    for i in 0..=steps {
        let tokens: Vec<u32> = (0..batch * (seq_len + 1)).map(|_| rng.random_range(0..vocab)).collect();
        let t = Instant::now();
        step(&mut run, &o, &mut eng, (batch, seq_len), |_| super::model::shifted(&tokens, batch, seq_len))?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let fig = |figure: &str, value: f64, unit: &str| Figure {
        bench: "train".into(),
        model: preset.into(),
        dtype: dtype.to_string(),
        batch,
        length: seq_len,
        figure: figure.into(),
        value,
        unit: unit.into(),
    };
    let tps = (batch * seq_len) as f64 / median;
    let mut out = vec![fig("tokens_per_s", tps, "tokens/s"), fig("step_ms", median * 1e3, "ms")];
    // One more step, profiled: where its time goes (each piece between synchronisations).
    #[cfg(feature = "cuda")]
    if let Engine::Gpu(t) = &mut eng {
        t.set_profile(true);
        let tokens: Vec<u32> = (0..batch * (seq_len + 1)).map(|_| rng.random_range(0..vocab)).collect();
        step(&mut run, &o, &mut eng, (batch, seq_len), |_| super::model::shifted(&tokens, batch, seq_len))?;
        if let Engine::Gpu(t) = &mut eng {
            for (what, secs) in t.take_profile() {
                out.push(fig(&format!("profiled_{}_ms", what.replace(' ', "_")), secs * 1e3, "ms"));
            }
            t.set_profile(false);
        }
    }
    match eng.device_bytes() {
        Some(b) => {
            out.push(fig("peak_memory_gb", b as f64 / 1e9, "GB"));
            out.push(fig("mfu_percent", 100.0 * tps * gemm_flops_per_token(&run.layout) / HOPPER_BF16_PEAK, "%"));
        }
        None => out.extend(peak_rss().map(|b| fig("peak_memory_gb", b / 1e9, "GB"))),
    }
    Ok(out)
}
