//! Model location: the bundled model (`default`), a local directory, or a Hugging Face repo id
//! resolved through the standard cache (`HF_HOME`, default `~/.cache/huggingface`) and downloaded
//! when allowed.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// Weight files tried in order, after `config.json`.
const WEIGHT_FILES: &[&str] = &["model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"];
/// Optional files fetched when present.
const EXTRA_FILES: &[&str] = &["tokenizer.json", "generation_config.json"];

fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Turns `--model` into a directory holding `config.json` and the weights.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    if spec == super::default_model::NAME {
        return super::default_model::dir(); // a directory of that name is ./default
    }
    let p = Path::new(spec);
    if p.is_dir() {
        if !p.join("config.json").is_file() {
            bail!("{} has no config.json", p.display());
        }
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        bail!("--model {spec}: expected a directory with config.json and weights, or a Hugging Face repo id");
    }
    if !is_repo_id(spec) {
        bail!("--model {spec}: no such directory (and not a Hugging Face repo id like state-spaces/mamba-130m)");
    }
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(spec.to_owned());
    let cached = |f: &str| repo.get(f);
    if let Some(cfg) = cached("config.json") {
        if WEIGHT_FILES.iter().any(|w| cached(w).is_some()) {
            return snapshot_dir(&cfg);
        }
    }
    let looked = cache.path().join(format!("models--{}", spec.replace('/', "--")));
    if offline() {
        bail!(
            "model {spec} is not in the Hugging Face cache (looked in {}) and HF_HUB_OFFLINE is set; \
             download it once with network access or pass a local directory",
            looked.display()
        );
    }
    download(spec).with_context(|| {
        format!("model {spec} is not cached (looked in {}) and could not be downloaded", looked.display())
    })
}

fn snapshot_dir(file: &Path) -> Result<PathBuf> {
    file.parent().map(Path::to_path_buf).ok_or_else(|| anyhow!("bad cache path {}", file.display()))
}

fn download(spec: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).build()?;
    let repo = api.model(spec.to_owned());
    let cfg = repo.get("config.json")?;
    let mut found = false;
    for w in WEIGHT_FILES {
        if let Ok(path) = repo.get(w) {
            if *w == "model.safetensors.index.json" {
                let text = std::fs::read_to_string(&path)?;
                let v: serde_json::Value = serde_json::from_str(&text)?;
                let mut shards: Vec<String> = v["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                for s in shards {
                    repo.get(&s)?;
                }
            }
            found = true;
            break;
        }
    }
    if !found {
        bail!("{spec} has none of {}", WEIGHT_FILES.join(", "));
    }
    for f in EXTRA_FILES {
        let _ = repo.get(f); // optional
    }
    snapshot_dir(&cfg)
}
