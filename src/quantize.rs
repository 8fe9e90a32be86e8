//! `mamba-lm quantize`: a checkpoint rewritten with its large matrices in another storage type,
//! so that loading it needs no conversion. In int8 each quantized matrix `W` (rows × cols) is an
//! I8 tensor under its own name and `W_scale` (f32, rows × cols/32) beside it, one scale per block
//! of 32 values of a row (`ops::q8`); every other tensor stays f32. `config.json` and the
//! tokenizer files are copied as they are.

use crate::config::Config;
use crate::init::{safetensors_bytes, NamedTensor};
use crate::loader::Checkpoint;
use crate::model::Model;
use crate::tensor::DType;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Files besides the weights that travel with a model.
const COMPANIONS: [&str; 5] =
    ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

/// Writes the model in `src` with its large matrices in `dtype` into the new directory `out`;
/// on failure nothing is left at `out`.
pub fn quantize_dir(src: &Path, out: &Path, dtype: DType) -> Result<()> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not empty; refusing to overwrite it", out.display());
    }
    let cfg = Config::from_file(&src.join("config.json"))?;
    let ck = Checkpoint::open_dir(src)?;
    // Every name and shape checked against the config before anything is written.
    Model::from_checkpoint(cfg, &ck, DType::F32)?;
    let mut tensors = vec![];
    for name in ck.names().filter(|n| !ck.is_scale(n)) {
        let shape = ck.shape_of(name).expect("listed").to_vec();
        tensors.push(NamedTensor { name: name.to_string(), data: ck.f32(name, &shape)?, shape });
    }
    let bytes = safetensors_bytes(tensors, dtype)?;
    let existed = out.exists();
    let res = (|| -> Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        crate::io::write_file(&out.join("model.safetensors"), &bytes, false)?;
        for f in COMPANIONS.iter().map(|f| src.join(f)).filter(|p| p.exists()) {
            let data = std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?;
            crate::io::write_file(&out.join(f.file_name().expect("a file")), &data, false)?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = if existed { clear(out) } else { std::fs::remove_dir_all(out) };
    }
    res
}

/// Empties a directory that was empty before we wrote into it.
fn clear(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        std::fs::remove_file(e?.path())?;
    }
    Ok(())
}
