//! The model bundled in the binary (`assets/default`): a Mamba-1 of ~9M parameters with its own
//! 4,096-entry BPE, trained by `scripts/train_default_model.sh` on Shakespeare's works. It is what
//! `--model default` (the default of `generate`, `score` and `info`) names. Its files are written
//! once under the cache directory and then load like any other model directory.

use anyhow::{Context, Result};
use std::path::PathBuf;

/// The `--model` value that names the bundled model.
pub const NAME: &str = "default";

const FILES: [(&str, &[u8]); 3] = [
    ("config.json", include_bytes!("../../assets/default/config.json")),
    ("tokenizer.json", include_bytes!("../../assets/default/tokenizer.json")),
    ("model.safetensors", include_bytes!("../../assets/default/model.safetensors")),
];

/// The bundled model's directory, written on first use. The directory's name carries a hash of
/// the files (the weights sampled every 4 KiB: a retrained model differs everywhere), so a binary
/// with other weights never reads a stale copy.
pub fn dir() -> Result<PathBuf> {
    let sampled: Vec<u8> = FILES[2].1.iter().step_by(4096).copied().collect();
    let key = crate::io::fnv1a(&[FILES[0].1, FILES[1].1, &sampled, &FILES[2].1.len().to_le_bytes()]);
    let base = crate::io::cache_base().unwrap_or_else(|| std::env::temp_dir().join("mamba-lm"));
    let dir = base.join(format!("default-model-{key:016x}"));
    let complete = FILES
        .iter()
        .all(|(name, bytes)| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64));
    if !complete {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Each file is renamed into place complete, so a concurrent start or a crash leaves no
        // partial file behind.
        for (name, bytes) in FILES {
            crate::io::write_file(&dir.join(name), bytes, true)?;
        }
    }
    Ok(dir)
}
