//! Model configuration: one [`Config`] read from either published `config.json` dialect
//! (`mamba_ssm`'s `MambaConfig` or transformers' `MambaConfig`/`Mamba2Config`), or built from a
//! named preset of the published shapes.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// Which mixer the blocks use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Mamba1,
    Mamba2,
}

/// Which project wrote the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    MambaSsm,
    Transformers,
}

/// Hyper-parameters used only to initialise new weights (§1.5, §2.7 of the spec).
#[derive(Clone, Debug, PartialEq)]
pub struct InitParams {
    pub dt_min: f64,
    pub dt_max: f64,
    pub dt_init_floor: f64,
    pub dt_scale: f64,
    pub dt_init_random: bool,
    pub a_init_range: (f64, f64),
    pub conv_init: Option<f64>,
}

impl Default for InitParams {
    fn default() -> Self {
        InitParams {
            dt_min: 0.001,
            dt_max: 0.1,
            dt_init_floor: 1e-4,
            dt_scale: 1.0,
            dt_init_random: true,
            a_init_range: (1.0, 16.0),
            conv_init: None,
        }
    }
}

/// Everything the model code needs to know about a checkpoint, in one normalised form.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub format: Format,
    pub d_model: usize,
    pub n_layer: usize,
    /// The tokenizer-facing vocabulary (unpadded when the config says so).
    pub vocab_size: usize,
    /// Rows of the embedding and of the logits.
    pub vocab_padded: usize,
    pub d_state: usize,
    pub d_conv: usize,
    /// E = expand · d_model.
    pub d_inner: usize,
    /// Mamba-1: rank of the Δ projection.
    pub dt_rank: usize,
    /// Mamba-2: head size P, groups G, SSM width (= d_inner unless an MLP branch takes part).
    pub headdim: usize,
    pub ngroups: usize,
    pub d_ssm: usize,
    pub chunk_size: usize,
    pub dt_limit: (f32, f32),
    pub d_has_hdim: bool,
    pub bias: bool,
    pub conv_bias: bool,
    /// RMSNorm blocks (else LayerNorm with bias).
    pub rms_norm: bool,
    pub norm_eps: f32,
    pub tie_embeddings: bool,
    pub eos_token_id: Option<u32>,
    pub init: InitParams,
}

impl Config {
    pub fn nheads(&self) -> usize {
        self.d_ssm / self.headdim
    }
    /// Width of Mamba-2's optional gated-MLP branch inside the mixer.
    pub fn d_mlp(&self) -> usize {
        self.d_inner - self.d_ssm
    }
    /// Channels through the causal conv: x for Mamba-1, [x | B | C] for Mamba-2.
    pub fn conv_dim(&self) -> usize {
        match self.arch {
            Arch::Mamba1 => self.d_inner,
            Arch::Mamba2 => self.d_ssm + 2 * self.ngroups * self.d_state,
        }
    }
    pub fn d_in_proj(&self) -> usize {
        match self.arch {
            Arch::Mamba1 => 2 * self.d_inner,
            Arch::Mamba2 => 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads(),
        }
    }
    /// f32 values of recurrent state per sequence (conv history + SSM state), all layers.
    pub fn state_floats(&self) -> usize {
        let ssm = match self.arch {
            Arch::Mamba1 => self.d_inner * self.d_state,
            Arch::Mamba2 => self.nheads() * self.headdim * self.d_state,
        };
        self.n_layer * ((self.d_conv - 1) * self.conv_dim() + ssm)
    }

    /// Parameter count (tied weights once).
    pub fn num_params(&self) -> usize {
        let c = self;
        let per_layer = match c.arch {
            Arch::Mamba1 => {
                let (e, n, r) = (c.d_inner, c.d_state, c.dt_rank);
                2 * e * c.d_model
                    + e * c.d_conv
                    + e * (r + 2 * n)
                    + e * r
                    + e
                    + e * n
                    + e
                    + c.d_model * e
                    + if c.conv_bias { e } else { 0 }
            }
            Arch::Mamba2 => {
                let h = c.nheads();
                c.d_in_proj() * c.d_model
                    + c.conv_dim() * c.d_conv
                    + if c.conv_bias { c.conv_dim() } else { 0 }
                    + 2 * h
                    + if c.d_has_hdim { c.d_ssm } else { h }
                    + c.d_ssm
                    + c.d_model * c.d_inner
            }
        } + c.d_model
            + if c.bias { c.d_in_proj() + c.d_model } else { 0 }
            + if c.rms_norm { 0 } else { c.d_model };
        c.n_layer * per_layer + c.vocab_padded * c.d_model * if c.tie_embeddings { 1 } else { 2 } + c.d_model
    }

    /// Reads `config.json` in either dialect; errors name the file.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Config::from_json(&text).with_context(|| format!("invalid model config {}", path.display()))
    }

    /// Parses a config in either dialect. Non-standard `Infinity`/`NaN` literals and
    /// `{"__float__": "Infinity"}` objects are accepted.
    pub fn from_json(text: &str) -> Result<Config> {
        let v: Value = serde_json::from_str(&quote_nonfinite(text)).context("not valid JSON")?;
        let obj = v.as_object().ok_or_else(|| anyhow!("top level is not a JSON object"))?;
        let cfg = if obj.contains_key("model_type") || obj.contains_key("hidden_size") {
            from_transformers(obj)?
        } else {
            from_mamba_ssm(obj)?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let pos = |name: &str, v: usize| if v == 0 { Err(anyhow!("{name} must be positive")) } else { Ok(()) };
        pos("d_model", self.d_model)?;
        pos("n_layer", self.n_layer)?;
        pos("vocab_size", self.vocab_size)?;
        pos("d_state", self.d_state)?;
        pos("d_conv", self.d_conv)?;
        pos("expand·d_model", self.d_inner)?;
        // Bounds far above any published model, so that a corrupt config fails here instead of
        // asking for absurd allocations later.
        for (name, v, max) in [
            ("n_layer", self.n_layer, 1 << 10),
            ("d_model", self.d_model, 1 << 16),
            ("expand·d_model", self.d_inner, 1 << 18),
            ("vocab_size", self.vocab_padded, 1 << 24),
        ] {
            if v > max {
                bail!("{name} {v} is implausibly large (limit {max})");
            }
        }
        if self.d_state > crate::ops::selective_scan::MAX_D_STATE {
            bail!("d_state {} exceeds the supported maximum {}", self.d_state, crate::ops::selective_scan::MAX_D_STATE);
        }
        if self.d_conv > 16 {
            bail!("d_conv {} is larger than supported (16)", self.d_conv);
        }
        if self.vocab_padded < self.vocab_size {
            bail!("padded vocabulary {} is smaller than vocab_size {}", self.vocab_padded, self.vocab_size);
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            bail!("norm epsilon must be positive");
        }
        match self.arch {
            Arch::Mamba1 => pos("dt_rank", self.dt_rank)?,
            Arch::Mamba2 => {
                pos("headdim", self.headdim)?;
                pos("ngroups", self.ngroups)?;
                pos("chunk_size", self.chunk_size)?;
                if self.d_ssm == 0 || self.d_ssm > self.d_inner {
                    bail!("d_ssm {} must be in 1..={} (expand·d_model)", self.d_ssm, self.d_inner);
                }
                if !self.d_ssm.is_multiple_of(self.headdim) {
                    bail!("d_ssm {} is not a multiple of headdim {}", self.d_ssm, self.headdim);
                }
                if !self.nheads().is_multiple_of(self.ngroups) {
                    bail!("{} heads cannot be split into ngroups {}", self.nheads(), self.ngroups);
                }
                if !(self.d_inner - self.d_ssm).is_multiple_of(2) && self.d_inner != self.d_ssm {
                    bail!("expand·d_model − d_ssm must be even");
                }
                if self.dt_limit.0.is_nan() || self.dt_limit.1.is_nan() || self.dt_limit.0 > self.dt_limit.1 {
                    bail!("dt_limit {:?} is not an interval", self.dt_limit);
                }
            }
        }
        Ok(())
    }

    /// A transformers-format `config.json` for this model (what `init` writes).
    pub fn to_transformers_json(&self) -> Value {
        let mut v = json!({
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.vocab_padded,
            "state_size": self.d_state,
            // transformers validates expand as an integer: write one when it is whole.
            "expand": if self.d_inner.is_multiple_of(self.d_model) {
                json!(self.d_inner / self.d_model)
            } else {
                json!(self.d_inner as f64 / self.d_model as f64)
            },
            "conv_kernel": self.d_conv,
            "use_bias": self.bias,
            "use_conv_bias": self.conv_bias,
            "hidden_act": "silu",
            "layer_norm_epsilon": self.norm_eps,
            "residual_in_fp32": true,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 0,
            "eos_token_id": self.eos_token_id.unwrap_or(0),
            "pad_token_id": 0,
            "time_step_min": self.init.dt_min,
            "time_step_max": self.init.dt_max,
            "time_step_floor": self.init.dt_init_floor,
        });
        let m = v.as_object_mut().expect("object");
        match self.arch {
            Arch::Mamba1 => {
                m.insert("architectures".into(), json!(["MambaForCausalLM"]));
                m.insert("model_type".into(), json!("mamba"));
                m.insert("intermediate_size".into(), json!(self.d_inner));
                m.insert("time_step_rank".into(), json!(self.dt_rank));
                m.insert("time_step_scale".into(), json!(self.init.dt_scale));
                m.insert(
                    "time_step_init_scheme".into(),
                    json!(if self.init.dt_init_random { "random" } else { "constant" }),
                );
            }
            Arch::Mamba2 => {
                m.insert("architectures".into(), json!(["Mamba2ForCausalLM"]));
                m.insert("model_type".into(), json!("mamba2"));
                m.insert("num_heads".into(), json!(self.nheads()));
                m.insert("head_dim".into(), json!(self.headdim));
                m.insert("n_groups".into(), json!(self.ngroups));
                m.insert("chunk_size".into(), json!(self.chunk_size));
                m.insert("rms_norm".into(), json!(true));
                let hi =
                    if self.dt_limit.1.is_finite() { json!(self.dt_limit.1) } else { json!({"__float__": "Infinity"}) };
                m.insert("time_step_limit".into(), json!([self.dt_limit.0, hi]));
            }
        }
        v
    }

    /// The published shapes (random weights via `init`), plus `tiny` and `tiny-mamba2`.
    pub fn preset(name: &str) -> Result<Config> {
        let (arch, d_model, n_layer) = match name {
            "tiny" => (Arch::Mamba1, 64, 2),
            "tiny-mamba2" => (Arch::Mamba2, 64, 2),
            "mamba-130m" => (Arch::Mamba1, 768, 24),
            "mamba-370m" => (Arch::Mamba1, 1024, 48),
            "mamba-790m" => (Arch::Mamba1, 1536, 48),
            "mamba-1.4b" => (Arch::Mamba1, 2048, 48),
            "mamba-2.8b" => (Arch::Mamba1, 2560, 64),
            "mamba2-130m" => (Arch::Mamba2, 768, 24),
            "mamba2-370m" => (Arch::Mamba2, 1024, 48),
            "mamba2-780m" => (Arch::Mamba2, 1536, 48),
            "mamba2-1.3b" => (Arch::Mamba2, 2048, 48),
            "mamba2-2.7b" => (Arch::Mamba2, 2560, 64),
            _ => bail!("unknown preset '{name}' (known: {})", PRESETS.join(", ")),
        };
        let mut ssm = Map::new();
        if arch == Arch::Mamba2 {
            ssm.insert("layer".into(), json!("Mamba2"));
            if name == "tiny-mamba2" {
                ssm.insert("d_state".into(), json!(16));
                ssm.insert("headdim".into(), json!(16));
                ssm.insert("chunk_size".into(), json!(64));
            }
        }
        let pad = if arch == Arch::Mamba2 { 16 } else { 8 };
        let obj = json!({
            "d_model": d_model, "n_layer": n_layer, "vocab_size": 50277, "ssm_cfg": ssm,
            "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true,
            "pad_vocab_size_multiple": pad, "tie_embeddings": true,
        });
        let cfg = from_mamba_ssm(obj.as_object().expect("object"))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Names accepted by [`Config::preset`].
pub const PRESETS: &[&str] = &[
    "tiny",
    "tiny-mamba2",
    "mamba-130m",
    "mamba-370m",
    "mamba-790m",
    "mamba-1.4b",
    "mamba-2.8b",
    "mamba2-130m",
    "mamba2-370m",
    "mamba2-780m",
    "mamba2-1.3b",
    "mamba2-2.7b",
];

const MAMBA_SSM_KEYS: &[&str] = &[
    "d_model",
    "d_intermediate",
    "n_layer",
    "vocab_size",
    "ssm_cfg",
    "attn_layer_idx",
    "attn_cfg",
    "rms_norm",
    "residual_in_fp32",
    "fused_add_norm",
    "pad_vocab_size_multiple",
    "tie_embeddings",
];
const MAMBA1_SSM_CFG_KEYS: &[&str] = &[
    "layer",
    "d_state",
    "d_conv",
    "expand",
    "dt_rank",
    "dt_min",
    "dt_max",
    "dt_init",
    "dt_scale",
    "dt_init_floor",
    "conv_bias",
    "bias",
    "use_fast_path",
];
const MAMBA2_SSM_CFG_KEYS: &[&str] = &[
    "layer",
    "d_state",
    "d_conv",
    "conv_init",
    "expand",
    "headdim",
    "d_ssm",
    "ngroups",
    "A_init_range",
    "D_has_hdim",
    "rmsnorm",
    "norm_before_gate",
    "dt_min",
    "dt_max",
    "dt_init_floor",
    "dt_limit",
    "bias",
    "conv_bias",
    "chunk_size",
    "use_mem_eff_path",
];

/// Typed access to a JSON object's fields with defaults and clear errors.
struct Fields<'a>(&'a Map<String, Value>, &'a str);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn usize_or(&self, k: &str, default: usize) -> Result<usize> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| anyhow!("{}{k} must be a non-negative integer, got {v}", self.1)),
        }
    }
    fn usize_req(&self, k: &str) -> Result<usize> {
        if self.get(k).is_none() {
            bail!("missing required key {}{k}", self.1);
        }
        self.usize_or(k, 0)
    }
    fn f64_or(&self, k: &str, default: f64) -> Result<f64> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => float(v).ok_or_else(|| anyhow!("{}{k} must be a number, got {v}", self.1)),
        }
    }
    fn bool_or(&self, k: &str, default: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| anyhow!("{}{k} must be true or false, got {v}", self.1)),
        }
    }
    fn pair_or(&self, k: &str, default: (f64, f64)) -> Result<(f64, f64)> {
        match self.get(k) {
            None => Ok(default),
            Some(Value::Array(a)) if a.len() == 2 => match (float(&a[0]), float(&a[1])) {
                (Some(x), Some(y)) => Ok((x, y)),
                _ => bail!("{}{k} must hold two numbers", self.1),
            },
            Some(v) => bail!("{}{k} must be a pair of numbers, got {v}", self.1),
        }
    }
    fn eos(&self) -> Result<Option<u32>> {
        match self.get("eos_token_id") {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(a.first().and_then(Value::as_u64).map(|x| x as u32)),
            Some(v) => {
                v.as_u64().map(|x| Some(x as u32)).ok_or_else(|| anyhow!("eos_token_id must be an integer, got {v}"))
            }
        }
    }
}

/// A JSON number, or a non-finite float spelled as a string or `{"__float__": "..."}`.
fn float(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "Infinity" | "inf" | "Inf" => Some(f64::INFINITY),
            "-Infinity" | "-inf" | "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" | "nan" => Some(f64::NAN),
            _ => None,
        },
        Value::Object(o) if o.len() == 1 => o.get("__float__").and_then(float),
        _ => None,
    }
}

/// Rewrites the bare JSON extensions `Infinity`, `-Infinity` and `NaN` (as Python's json writes
/// them) into strings, leaving string contents untouched.
fn quote_nonfinite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(ch) = rest.chars().next() {
        if in_str {
            out.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_str = false;
            }
            rest = &rest[ch.len_utf8()..];
            continue;
        }
        if ch == '"' {
            in_str = true;
        }
        let word = ["-Infinity", "Infinity", "NaN"].into_iter().find(|w| rest.starts_with(w));
        if let Some(w) = word {
            out.push('"');
            out.push_str(w);
            out.push('"');
            rest = &rest[w.len()..];
        } else {
            out.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
    }
    out
}

fn check_keys(obj: &Map<String, Value>, known: &[&str], what: &str) -> Result<()> {
    let unknown: Vec<&str> = obj.keys().map(String::as_str).filter(|k| !known.contains(k)).collect();
    if !unknown.is_empty() {
        bail!("unknown {what} key(s): {} (known: {})", unknown.join(", "), known.join(", "));
    }
    Ok(())
}

fn from_mamba_ssm(obj: &Map<String, Value>) -> Result<Config> {
    check_keys(obj, MAMBA_SSM_KEYS, "mamba_ssm config")?;
    let f = Fields(obj, "");
    let empty = Map::new();
    let ssm = match f.get("ssm_cfg") {
        None => &empty,
        Some(Value::Object(o)) => o,
        Some(v) => bail!("ssm_cfg must be an object, got {v}"),
    };
    let s = Fields(ssm, "ssm_cfg.");
    let layer = match s.get("layer") {
        None => "Mamba1",
        Some(Value::String(l)) => l.as_str(),
        Some(v) => bail!("ssm_cfg.layer must be a string, got {v}"),
    };
    let arch = match layer {
        "Mamba1" => Arch::Mamba1,
        "Mamba2" => Arch::Mamba2,
        "Mamba3" => bail!("ssm_cfg.layer \"Mamba3\" is not supported yet (Mamba-1 and Mamba-2 are)"),
        other => bail!("unknown ssm_cfg.layer \"{other}\" (expected Mamba1 or Mamba2)"),
    };
    check_keys(ssm, if arch == Arch::Mamba1 { MAMBA1_SSM_CFG_KEYS } else { MAMBA2_SSM_CFG_KEYS }, "ssm_cfg")?;
    if let Some(Value::Array(a)) = f.get("attn_layer_idx") {
        if !a.is_empty() {
            bail!("hybrid attention layers (attn_layer_idx {a:?}) are not supported yet");
        }
    }
    if f.usize_or("d_intermediate", 0)? > 0 {
        bail!("d_intermediate > 0 (a gated MLP after each mixer) is not supported yet");
    }
    let d_model = f.usize_req("d_model")?;
    let vocab = f.usize_req("vocab_size")?;
    let pad = f.usize_or("pad_vocab_size_multiple", 8)?.max(1);
    let expand = s.f64_or("expand", 2.0)?;
    let d_inner = (expand * d_model as f64) as usize;
    let m2 = arch == Arch::Mamba2;
    let dt_rank = match s.get("dt_rank") {
        None => d_model.div_ceil(16),
        Some(Value::String(a)) if a == "auto" => d_model.div_ceil(16),
        Some(_) => s.usize_or("dt_rank", 0)?,
    };
    if m2 && s.bool_or("norm_before_gate", false)? {
        bail!("ssm_cfg.norm_before_gate = true is not supported (published Mamba-2 models use false)");
    }
    if m2 && !s.bool_or("rmsnorm", true)? {
        bail!("ssm_cfg.rmsnorm = false is not supported (published Mamba-2 models use the gated RMSNorm)");
    }
    let dt_limit = s.pair_or("dt_limit", (0.0, f64::INFINITY))?;
    let dt_init = match s.get("dt_init") {
        None => true,
        Some(Value::String(x)) if x == "random" => true,
        Some(Value::String(x)) if x == "constant" => false,
        Some(v) => bail!("ssm_cfg.dt_init must be \"random\" or \"constant\", got {v}"),
    };
    Ok(Config {
        arch,
        format: Format::MambaSsm,
        d_model,
        n_layer: f.usize_req("n_layer")?,
        vocab_size: vocab,
        vocab_padded: vocab.checked_next_multiple_of(pad).ok_or_else(|| anyhow!("vocab_size {vocab} is too large"))?,
        d_state: s.usize_or("d_state", if m2 { 128 } else { 16 })?,
        d_conv: s.usize_or("d_conv", 4)?,
        d_inner,
        dt_rank,
        headdim: if m2 { s.usize_or("headdim", 64)? } else { 0 },
        ngroups: if m2 { s.usize_or("ngroups", 1)? } else { 1 },
        d_ssm: if m2 { s.usize_or("d_ssm", d_inner)? } else { d_inner },
        chunk_size: if m2 { s.usize_or("chunk_size", 256)? } else { 0 },
        dt_limit: (dt_limit.0 as f32, dt_limit.1 as f32),
        d_has_hdim: s.bool_or("D_has_hdim", false)?,
        bias: s.bool_or("bias", false)?,
        conv_bias: s.bool_or("conv_bias", true)?,
        rms_norm: f.bool_or("rms_norm", true)?,
        norm_eps: 1e-5,
        tie_embeddings: f.bool_or("tie_embeddings", true)?,
        eos_token_id: None,
        init: InitParams {
            dt_min: s.f64_or("dt_min", 0.001)?,
            dt_max: s.f64_or("dt_max", 0.1)?,
            dt_init_floor: s.f64_or("dt_init_floor", 1e-4)?,
            dt_scale: s.f64_or("dt_scale", 1.0)?,
            dt_init_random: dt_init,
            a_init_range: s.pair_or("A_init_range", (1.0, 16.0))?,
            conv_init: s.get("conv_init").and_then(float),
        },
    })
}

fn from_transformers(obj: &Map<String, Value>) -> Result<Config> {
    let f = Fields(obj, "");
    let model_type = obj.get("model_type").and_then(Value::as_str).unwrap_or("");
    let archs: Vec<&str> = match obj.get("architectures") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let arch = if model_type == "mamba" || archs.contains(&"MambaForCausalLM") {
        Arch::Mamba1
    } else if model_type == "mamba2" || archs.contains(&"Mamba2ForCausalLM") {
        Arch::Mamba2
    } else {
        bail!("model_type \"{model_type}\" is not a Mamba model (expected \"mamba\" or \"mamba2\")");
    };
    if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            bail!("hidden_act \"{act}\" is not supported (Mamba uses silu)");
        }
    }
    let d_model = f.usize_req("hidden_size")?;
    let vocab = f.usize_req("vocab_size")?;
    let expand = f.f64_or("expand", 2.0)?;
    let m2 = arch == Arch::Mamba2;
    let d_inner = if m2 {
        (expand * d_model as f64) as usize
    } else {
        f.usize_or("intermediate_size", (expand * d_model as f64) as usize)?
    };
    let (headdim, nheads) = if m2 { (f.usize_req("head_dim")?, f.usize_req("num_heads")?) } else { (0, 0) };
    if m2 && headdim * nheads != d_inner {
        bail!("num_heads {nheads} × head_dim {headdim} ≠ expand·hidden_size {d_inner}");
    }
    if m2 && !f.bool_or("rms_norm", true)? {
        bail!("rms_norm = false is not supported (published Mamba-2 models use the gated RMSNorm)");
    }
    let dt_limit = f.pair_or("time_step_limit", (0.0, f64::INFINITY))?;
    let scheme = obj.get("time_step_init_scheme").and_then(Value::as_str).unwrap_or("random");
    Ok(Config {
        arch,
        format: Format::Transformers,
        d_model,
        n_layer: f.usize_req("num_hidden_layers")?,
        vocab_size: vocab,
        vocab_padded: vocab,
        d_state: f.usize_or("state_size", if m2 { 128 } else { 16 })?,
        d_conv: f.usize_or("conv_kernel", 4)?,
        d_inner,
        dt_rank: if m2 { 0 } else { f.usize_or("time_step_rank", d_model.div_ceil(16))? },
        headdim,
        ngroups: if m2 { f.usize_or("n_groups", 1)? } else { 1 },
        d_ssm: d_inner,
        chunk_size: if m2 { f.usize_or("chunk_size", 256)? } else { 0 },
        dt_limit: (dt_limit.0 as f32, dt_limit.1 as f32),
        d_has_hdim: false,
        bias: f.bool_or("use_bias", false)?,
        conv_bias: f.bool_or("use_conv_bias", true)?,
        rms_norm: true,
        norm_eps: f.f64_or("layer_norm_epsilon", 1e-5)? as f32,
        tie_embeddings: f.bool_or("tie_word_embeddings", !m2)?,
        eos_token_id: f.eos()?,
        init: InitParams {
            dt_min: f.f64_or("time_step_min", 0.001)?,
            dt_max: f.f64_or("time_step_max", 0.1)?,
            dt_init_floor: f.f64_or("time_step_floor", 1e-4)?,
            dt_scale: f.f64_or("time_step_scale", 1.0)?,
            dt_init_random: scheme != "constant",
            ..InitParams::default()
        },
    })
}
