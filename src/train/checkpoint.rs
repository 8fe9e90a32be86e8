//! Training checkpoints: `RUN/checkpoint-<step>/` holds `config.json`, `model.safetensors` and
//! the data's `tokenizer.json` (so `generate`, `score` and `info` take the directory as it is;
//! synthetic tasks have none) and
//! `trainer.safetensors` (the AdamW moments, with the step, data position, seed and, for f16
//! runs, the loss scale in its metadata). Each is written into a temporary directory, synced and renamed into place, so a
//! crash or a full disk leaves the previous checkpoint as it was and never a partial one under
//! a checkpoint's name.

use super::data::Position;
use super::optim::LossScale;
use super::params::Layout;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a run needs besides the weights to continue exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Where the next training batch starts.
    pub pos: Position,
    pub seed: u64,
    /// f16 runs: the loss scale.
    pub loss_scale: Option<LossScale>,
}

/// A loaded checkpoint.
pub struct Loaded {
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub state: TrainerState,
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("cannot write {}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes checkpoint `state.step` of `run` atomically and returns its directory.
pub fn save(
    run: &Path,
    layout: &Layout,
    params: &[f32],
    m: &[f32],
    v: &[f32],
    state: &TrainerState,
    tokenizer: Option<&Path>,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.step);
    let (tmp, dst) = (run.join(format!(".{name}.tmp")), run.join(&name));
    let res = (|| -> Result<()> {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        write_synced(
            &tmp.join("config.json"),
            serde_json::to_string_pretty(&layout.cfg.to_transformers_json())?.as_bytes(),
        )?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_synced(&tmp.join("model.safetensors"), &layout.to_safetensors(params, Some(meta))?)?;
        if let Some(t) = tokenizer {
            let tok = std::fs::read(t).with_context(|| format!("cannot read {}", t.display()))?;
            write_synced(&tmp.join("tokenizer.json"), &tok)?;
        }
        let (mb, vb) = (f32_bytes(m), f32_bytes(v));
        let views = [
            ("exp_avg".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![m.len()], &mb)?),
            (
                "exp_avg_sq".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![v.len()], &vb)?,
            ),
        ];
        let mut meta = HashMap::from([
            ("step".to_string(), state.step.to_string()),
            ("data_token".to_string(), state.pos.token.to_string()),
            ("data_epoch".to_string(), state.pos.epoch.to_string()),
            ("seed".to_string(), state.seed.to_string()),
        ]);
        if let Some(ls) = state.loss_scale {
            meta.insert("loss_scale_log2".to_string(), ls.log2.to_string());
            meta.insert("loss_scale_good".to_string(), ls.good.to_string());
        }
        write_synced(&tmp.join("trainer.safetensors"), &safetensors::serialize(views, Some(meta))?)?;
        // A checkpoint of this step may exist (a resumed run saving again): it is replaced.
        install(&tmp, &dst)
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res.with_context(|| format!("cannot save {}", dst.display()))?;
    Ok(dst)
}

/// Syncs the complete directory `tmp` and renames it to `dst` (a directory of the same parent),
/// replacing a `dst` that exists only once the new one is in place.
fn install(tmp: &Path, dst: &Path) -> Result<()> {
    sync_dir(tmp)?;
    let parent = dst.parent().expect("a directory inside the run");
    let old = parent.join(format!(".{}.old", dst.file_name().expect("named").to_string_lossy()));
    if dst.exists() {
        std::fs::rename(dst, &old)?;
    }
    std::fs::rename(tmp, dst)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    sync_dir(parent)
}

/// `RUN/final/`: the model files of `checkpoint` (no trainer state), replaced atomically.
pub fn write_final(run: &Path, checkpoint: &Path) -> Result<()> {
    let (tmp, dst) = (run.join(".final.tmp"), run.join("final"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    for f in ["config.json", "model.safetensors", "tokenizer.json"].into_iter().filter(|f| checkpoint.join(f).exists())
    {
        let bytes = std::fs::read(checkpoint.join(f))
            .with_context(|| format!("cannot read {f} of {}", checkpoint.display()))?;
        write_synced(&tmp.join(f), &bytes)?;
    }
    install(&tmp, &dst).with_context(|| format!("cannot write {}", dst.display()))
}

/// Loads a checkpoint directory written by [`save`] for `layout`.
pub fn load(dir: &Path, layout: &Layout) -> Result<Loaded> {
    let ck = crate::loader::Checkpoint::open_dir(dir)?;
    let params = layout.load(&ck)?;
    let path = dir.join("trainer.safetensors");
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let moment = |name: &str| -> Result<Vec<f32>> {
        let t = st.tensor(name).with_context(|| format!("{}: no tensor {name}", path.display()))?;
        if t.dtype() != safetensors::Dtype::F32 || t.shape() != [layout.len] {
            bail!("{}: {name} is not f32 [{}] (a checkpoint of another model?)", path.display(), layout.len);
        }
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let num = |k: &str| -> Result<u64> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{}: metadata {k} missing or not a number", path.display()))
    };
    let loss_scale = match meta.get("loss_scale_log2") {
        None => None,
        Some(v) => Some(LossScale {
            log2: v.parse().map_err(|_| anyhow!("{}: metadata loss_scale_log2 is not a number", path.display()))?,
            good: num("loss_scale_good")?,
        }),
    };
    let state = TrainerState {
        step: num("step")?,
        pos: Position { token: num("data_token")?, epoch: num("data_epoch")? },
        seed: num("seed")?,
        loss_scale,
    };
    Ok(Loaded { params, m: moment("exp_avg")?, v: moment("exp_avg_sq")?, state })
}

/// The run's checkpoint directories, newest (highest step) first.
pub fn list(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort_by_key(|c| std::cmp::Reverse(c.0));
    found
}

/// Removes all but the newest `keep` checkpoints (0 keeps all).
pub fn prune(run: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    for (_, dir) in list(run).into_iter().skip(keep) {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The trainer state comes back as it was saved, the loss scale of an f16 run included.
    #[test]
    fn trainer_state_round_trips() {
        let cfg = Config::preset("tiny").unwrap();
        let layout = Layout::new(&cfg, crate::train::params::EMBEDDING_NAMES[0]).unwrap();
        let params: Vec<f32> = (0..layout.len).map(|i| i as f32 * 1e-6).collect();
        let (m, v) = (vec![0.25f32; layout.len], vec![0.5f32; layout.len]);
        let t = tempfile::tempdir().unwrap();
        for loss_scale in [None, Some(LossScale { log2: 13, good: 1234 })] {
            let state = TrainerState { step: 7, pos: Position { token: 99, epoch: 2 }, seed: 5, loss_scale };
            let dir = save(t.path(), &layout, &params, &m, &v, &state, None).unwrap();
            let back = load(&dir, &layout).unwrap();
            assert_eq!(back.state, state);
            assert!(back.params == params && back.m == m && back.v == v);
        }
    }
}
