//! CPU benchmark: prefill and decode speed of a preset with random weights made in memory, the
//! figures the issue tracks, one JSON object per figure.

use crate::config::Config;
use crate::init::random_model;
use crate::model::Model;
use crate::tensor::DType;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

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

/// Times a `prompt`-token prefill and `gen`-token greedy decode at batch 1, `reps` times each;
/// reports medians, and the weight bandwidth decode achieves.
pub fn cpu(preset: &str, dtype: DType, prompt: usize, gen: usize, reps: usize) -> Result<Vec<Figure>> {
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
        pre.push(prompt as f64 / time_prefill(&model, &tokens)?);
        dec.push(gen as f64 / time_decode(&model, gen)?);
    }
    let (p, d) = (median(pre), median(dec));
    Ok(vec![
        fig("prefill_tok_s", prompt, p, "tok/s"),
        fig("decode_tok_s", gen, d, "tok/s"),
        fig("decode_weight_gb_s", gen, d * model.weight_bytes() as f64 / 1e9, "GB/s"),
    ])
}

fn time_prefill(model: &Model, tokens: &[u32]) -> Result<f64> {
    let mut st = model.new_state();
    let t = Instant::now();
    model.forward(tokens, tokens.len(), &mut [&mut st], 1)?;
    Ok(t.elapsed().as_secs_f64())
}

fn time_decode(model: &Model, gen: usize) -> Result<f64> {
    let mut st = model.new_state();
    let mut tok = 1u32;
    // One warm-up step, as llama-bench does.
    model.forward(&[tok], 1, &mut [&mut st], 1)?;
    let t = Instant::now();
    for _ in 0..gen {
        let logits = model.forward(&[tok], 1, &mut [&mut st], 1)?;
        tok = crate::sampling::argmax(&logits) as u32;
    }
    Ok(t.elapsed().as_secs_f64())
}
