//! Tokenizer: the model's own `tokenizer.json` when it ships one, else the GPT-NeoX-20B
//! tokenizer that all state-spaces checkpoints use (bundled in the binary).

use anyhow::{anyhow, Context, Result};
use std::path::Path;
pub use tokenizers::Tokenizer;

static NEOX: &[u8] = include_bytes!("../tokenizers/gpt-neox-20b.json");

/// The bundled GPT-NeoX-20B tokenizer.
pub fn neox() -> Tokenizer {
    Tokenizer::from_bytes(NEOX).expect("bundled tokenizer is valid")
}

/// `explicit` if given, else `model_dir/tokenizer.json` if present, else GPT-NeoX-20B.
pub fn load(explicit: Option<&Path>, model_dir: Option<&Path>) -> Result<Tokenizer> {
    let path =
        explicit.map(Path::to_path_buf).or_else(|| model_dir.map(|d| d.join("tokenizer.json")).filter(|p| p.is_file()));
    match path {
        Some(p) => {
            let bytes = std::fs::read(&p).with_context(|| format!("cannot read tokenizer {}", p.display()))?;
            Tokenizer::from_bytes(&bytes).map_err(|e| anyhow!("invalid tokenizer {}: {e}", p.display()))
        }
        None => Ok(neox()),
    }
}

pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(text, true).map_err(|e| anyhow!("tokenizer failed: {e}"))?.get_ids().to_vec())
}

pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, false).map_err(|e| anyhow!("tokenizer failed: {e}"))
}
