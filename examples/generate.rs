//! Library walk-through: load a checkpoint, prefill a prompt, step the recurrence, and generate.
//!
//! cargo run --release --example generate -- tests/fixtures/mamba1-hf

use mamba_lm::generate::{generate, Control, GenerateOptions, Start};
use mamba_lm::sampling::{argmax, Sampling};
use mamba_lm::tensor::DType;
use mamba_lm::Model;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "tests/fixtures/mamba1-hf".into());
    let model = Model::load_dir(dir.as_ref(), DType::F32)?;
    println!("{:?}, {} layers, {} parameters", model.cfg.arch, model.cfg.n_layer, model.cfg.num_params());

    // Prefill: the whole prompt in one parallel pass; logits for the last position only.
    let prompt = [3u32, 14, 15, 92, 65];
    let mut state = model.new_state();
    let logits = model.forward(&prompt, prompt.len(), &mut [&mut state], 1)?;
    // Step: one token through the constant-size recurrent state.
    let next = argmax(&logits) as u32;
    let logits = model.forward(&[next], 1, &mut [&mut state], 1)?;
    println!("after {} tokens: next token {}, state {} bytes", state.pos, argmax(&logits), state.bytes());

    // Or let `generate` run the loop (greedy by default, as mamba_ssm).
    let opts = GenerateOptions {
        max_new_tokens: 8,
        sampling: Sampling::default(),
        seed: 0,
        eos: None,
        vocab_limit: model.cfg.vocab_size,
    };
    let out = generate(&model, vec![Start { prompt: prompt.to_vec(), resume: None }], &opts, |_, _| Control::Continue)?;
    println!("generated {:?} ({:.2} ms/token)", out[0].new_ids, out[0].decode_ms_per_token);
    Ok(())
}
