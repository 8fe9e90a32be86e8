//! CPU benchmark: prefill and decode speed of a preset with random weights made in memory, one
//! JSON object per figure. Both are timed through [`generate_text`], the loop `mamba-lm
//! generate` runs (token picks and streaming detokenization included), so what the benchmark
//! reports is what a user of the CLI gets.

use crate::backend::{Backend, Cpu};
use crate::config::Config;
use crate::generate::{generate_text, GenerateOptions, Output, Start};
use crate::init::random_model;
use crate::sampling::Sampling;
use crate::tensor::DType;
use anyhow::Result;
use serde::Serialize;

/// One measured figure (the schema shared by every `bench` subcommand).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Figure {
    pub bench: String,
    pub model: String,
    pub dtype: String,
    pub batch: usize,
    pub length: usize,
    pub figure: String,
    pub value: f64,
    pub unit: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Streaming read bandwidth of this machine on all worker threads, GB/s: the best of a few
/// passes summing a 1 GiB buffer (what decode at batch 1 is bound by: every weight once a token).
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1u64; 1 << 27];
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let sum: u64 = buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x))).sum();
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(8.0 * buf.len() as f64 / secs / 1e9);
    }
    best
}

/// Times a `prompt`-token prefill and `gen`-token greedy decode at batch 1, `reps` times each;
/// reports medians, the weight bandwidth decode achieves, and (given the machine's `read_gb_s`)
/// that bandwidth as a fraction of it.
pub fn cpu(preset: &str, dtype: DType, prompt: usize, gen: usize, reps: usize, read_gb_s: f64) -> Result<Vec<Figure>> {
    let cfg = Config::preset(preset)?;
    let model = random_model(&cfg, 0, dtype)?;
    let tokens: Vec<u32> = (0..prompt).map(|i| (i * 7919 % 50000) as u32 + 1).collect();
    let fig = |figure: &str, length: usize, value: f64, unit: &str| Figure {
        bench: "cpu".into(),
        model: preset.into(),
        dtype: dtype.to_string(),
        batch: 1,
        length,
        figure: figure.into(),
        value,
        unit: unit.into(),
    };
    let mut pre = Vec::new();
    let mut dec = Vec::new();
    for _ in 0..reps.max(1) {
        let be = &mut Cpu::new(&model);
        pre.push(prompt as f64 / (generation_loop(be, &tokens, 0)?.prefill_ms / 1e3));
        dec.push(1e3 / generation_loop(be, &tokens[..1], gen)?.decode_ms_per_token);
    }
    let (p, d) = (median(pre), median(dec));
    Ok(vec![
        fig("prefill_tok_s", prompt, p, "tok/s"),
        fig("decode_tok_s", gen, d, "tok/s"),
        fig("decode_weight_gb_s", gen, d * model.weight_bytes() as f64 / 1e9, "GB/s"),
        fig("decode_bandwidth_fraction", gen, d * model.weight_bytes() as f64 / 1e9 / read_gb_s, "of read bandwidth"),
    ])
}

/// `mamba-lm generate`'s loop at batch 1, greedy, past any end-of-sequence token, text
/// detokenized as it streams: `prompt`, then `gen` new tokens. Its output carries the prefill
/// time and the wall time per new token.
pub fn generation_loop(be: &mut dyn Backend, prompt: &[u32], gen: usize) -> Result<Output> {
    let tok = crate::tokenizer::neox();
    let opts = GenerateOptions {
        max_new_tokens: gen,
        sampling: Sampling::default(),
        seed: 0,
        eos: None,
        vocab_limit: be.cfg().vocab_size,
    };
    let start = Start { prompt: prompt.to_vec(), resume: None };
    Ok(generate_text(be, vec![start], &opts, &tok, &[], |_, _| {})?.remove(0))
}
