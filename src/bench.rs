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

/// The middle value (the mean of the two middle ones for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
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

/// What `bench cpu` measures of one preset and storage type.
pub struct CpuBench {
    pub prompt: usize,
    pub gen: usize,
    pub reps: usize,
    /// Batch sizes of the generation-throughput figure (none: not measured).
    pub batches: Vec<usize>,
    /// Prompt length of that figure.
    pub generate_prompt: usize,
    pub read_gb_s: f64,
}

/// Times a `prompt`-token prefill and `gen`-token greedy decode at batch 1, `reps` times each;
/// reports medians, the weight bandwidth decode achieves, and (given the machine's `read_gb_s`)
/// that bandwidth as a fraction of it. Then, for each batch size, generation throughput as
/// `bench generate` counts it on the GPU.
pub fn cpu(preset: &str, dtype: DType, b: &CpuBench) -> Result<Vec<Figure>> {
    let cfg = Config::preset(preset)?;
    let model = random_model(&cfg, 0, dtype)?;
    let tokens: Vec<u32> = (0..b.prompt).map(|i| (i * 7919 % 50000) as u32 + 1).collect();
    let fig = |figure: &str, batch: usize, length: usize, value: f64, unit: &str| Figure {
        bench: "cpu".into(),
        model: preset.into(),
        dtype: dtype.to_string(),
        batch,
        length,
        figure: figure.into(),
        value,
        unit: unit.into(),
    };
    let mut pre = Vec::new();
    let mut dec = Vec::new();
    for _ in 0..b.reps.max(1) {
        let be = &mut Cpu::new(&model);
        pre.push(b.prompt as f64 / (generation_loop(be, &tokens, 0)?.prefill_ms / 1e3));
        dec.push(1e3 / generation_loop(be, &tokens[..1], b.gen)?.decode_ms_per_token);
    }
    let (p, d) = (median(pre), median(dec));
    let bytes = model.weight_bytes() as f64;
    let mut figs = vec![
        fig("prefill_tok_s", 1, b.prompt, p, "tok/s"),
        fig("decode_tok_s", 1, b.gen, d, "tok/s"),
        fig("decode_weight_gb_s", 1, b.gen, d * bytes / 1e9, "GB/s"),
        fig("decode_bandwidth_fraction", 1, b.gen, d * bytes / 1e9 / b.read_gb_s, "of read bandwidth"),
    ];
    for &batch in &b.batches {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|s| (0..b.generate_prompt).map(|i| ((i * 7919 + s * 104729) % 50000) as u32 + 1).collect())
            .collect();
        let mut rates = Vec::new();
        for _ in 0..b.reps.max(1) {
            let t = std::time::Instant::now();
            generation(&mut Cpu::new(&model), &prompts, b.gen)?;
            rates.push((batch * b.gen) as f64 / t.elapsed().as_secs_f64());
        }
        figs.push(fig("generate_tok_s", batch, b.generate_prompt + b.gen, median(rates), "tok/s"));
    }
    Ok(figs)
}

/// `mamba-lm generate`'s loop at batch 1, greedy, past any end-of-sequence token, text
/// detokenized as it streams: `prompt`, then `gen` new tokens. Its output carries the prefill
/// time and the wall time per new token.
pub fn generation_loop(be: &mut dyn Backend, prompt: &[u32], gen: usize) -> Result<Output> {
    Ok(generation(be, std::slice::from_ref(&prompt.to_vec()), gen)?.remove(0))
}

/// The same loop over several prompts at once (one slot each).
fn generation(be: &mut dyn Backend, prompts: &[Vec<u32>], gen: usize) -> Result<Vec<Output>> {
    let tok = crate::tokenizer::neox();
    let opts = GenerateOptions {
        max_new_tokens: gen,
        sampling: Sampling::default(),
        seed: 0,
        eos: None,
        vocab_limit: be.cfg().vocab_size,
    };
    let starts = prompts.iter().map(|p| Start { prompt: p.clone(), resume: None }).collect();
    generate_text(be, starts, &opts, &tok, &[], |_, _| {})
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![4.0, 1.0]), 2.5);
        assert_eq!(super::median(vec![7.0]), 7.0);
    }
}
