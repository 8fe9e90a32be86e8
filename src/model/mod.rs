//! The language model: embedding → n × (x + Mixer(Norm(x))) → final norm → LM head, with the
//! residual stream in f32. One `forward` serves prefill (many rows per sequence) and the
//! recurrent step (one row per sequence); both read and advance a constant-size [`State`].

pub mod mamba1;
pub mod mamba2;

use crate::config::{Arch, Config};
use crate::loader::Checkpoint;
use crate::ops::cross_entropy;
use crate::ops::matmul::{add_bias, matmul_t, Rows};
use crate::ops::rms_norm::{layer_norm, rms_norm};
use crate::state::{LayerState, State};
use crate::tensor::{DType, Matrix};
use anyhow::{bail, Result};
use mamba1::Mamba1;
use mamba2::Mamba2;
use std::collections::BTreeSet;

/// Rows per pass when several sequences prefill together: enough for the GEMM's full rate,
/// few enough that a pass's activations stay small (~50 MB for a 130M model).
const PASS_ROWS: usize = 2048;

/// A linear layer `y = x·Wᵀ (+ b)`.
pub struct Linear {
    pub w: Matrix,
    pub b: Option<Vec<f32>>,
}

impl Linear {
    fn load(ck: &Checkpoint, name: &str, out: usize, inp: usize, bias: bool, dtype: DType) -> Result<Linear> {
        Ok(Linear {
            w: ck.matrix(&format!("{name}.weight"), out, inp, dtype)?,
            b: if bias { Some(ck.f32(&format!("{name}.bias"), &[out])?) } else { None },
        })
    }

    /// Contiguous input rows of `w.cols` → contiguous output rows of `w.rows`.
    pub fn forward(&self, x: &[f32], rows: Rows, y: &mut [f32]) {
        self.forward_strided(x, rows, self.w.cols, y, self.w.rows)
    }

    pub fn forward_strided(&self, x: &[f32], rows: Rows, x_rs: usize, y: &mut [f32], y_rs: usize) {
        matmul_t(x, rows, x_rs, &self.w, y, y_rs);
        if let Some(b) = &self.b {
            add_bias(y, rows.count(), y_rs, b);
        }
    }
}

/// RMSNorm, or LayerNorm when a bias is present.
pub struct Norm {
    pub(crate) w: Vec<f32>,
    pub(crate) b: Option<Vec<f32>>,
    pub(crate) eps: f32,
}

impl Norm {
    fn load(ck: &Checkpoint, name: &str, cfg: &Config) -> Result<Norm> {
        let d = cfg.d_model;
        Ok(Norm {
            w: ck.f32(&format!("{name}.weight"), &[d])?,
            b: if cfg.rms_norm { None } else { Some(ck.f32(&format!("{name}.bias"), &[d])?) },
            eps: cfg.norm_eps,
        })
    }

    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        match &self.b {
            None => rms_norm(x, &self.w, self.eps, out),
            Some(b) => layer_norm(x, &self.w, b, self.eps, out),
        }
    }
}

pub(crate) enum Mixer {
    M1(Mamba1),
    M2(Mamba2),
}

pub(crate) struct Layer {
    pub(crate) norm: Norm,
    pub(crate) mixer: Mixer,
}

/// A loaded model, ready to run on the CPU.
pub struct Model {
    pub cfg: Config,
    /// Storage type of the large matrices.
    pub dtype: DType,
    pub(crate) embedding: Matrix,
    /// `None` when tied to the embedding.
    pub(crate) lm_head: Option<Matrix>,
    pub(crate) norm_f: Norm,
    pub(crate) layers: Vec<Layer>,
}

/// Names of a mixer's tensors under prefix `p`: its own, plus the conv and projection biases
/// the config enables (for rejecting unexpected tensors).
fn mixer_tensor_names(p: &str, cfg: &Config, own: &[&str]) -> Vec<String> {
    let mut names: Vec<&str> = own.to_vec();
    if cfg.conv_bias {
        names.push("conv1d.bias");
    }
    if cfg.bias {
        names.extend(["in_proj.bias", "out_proj.bias"]);
    }
    names.iter().map(|s| format!("{p}{s}")).collect()
}

/// Loads a causal conv's weight `(C, 1, W)` as tap-major `(W, C)` and its optional bias.
fn load_conv(ck: &Checkpoint, p: &str, cfg: &Config, c: usize) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let w = cfg.d_conv;
    let t = crate::ops::causal_conv1d::taps(&ck.f32(&format!("{p}conv1d.weight"), &[c, 1, w])?, c, w);
    let b = if cfg.conv_bias { Some(ck.f32(&format!("{p}conv1d.bias"), &[c])?) } else { None };
    Ok((t, b))
}

impl Model {
    /// Builds the model from a checkpoint's tensors, validating every name and shape against
    /// the config. Large matrices are stored in `dtype`; everything else in f32.
    pub fn from_checkpoint(cfg: Config, ck: &Checkpoint, dtype: DType) -> Result<Model> {
        let emb_name = if ck.contains("backbone.embeddings.weight") {
            "backbone.embeddings.weight"
        } else {
            "backbone.embedding.weight"
        };
        let mut expected: BTreeSet<String> =
            [emb_name, "backbone.norm_f.weight"].iter().map(|s| s.to_string()).collect();
        let embedding = ck.matrix(emb_name, cfg.vocab_padded, cfg.d_model, dtype)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            expected.insert("lm_head.weight".into());
            Some(ck.matrix("lm_head.weight", cfg.vocab_padded, cfg.d_model, dtype)?)
        };
        // A tied checkpoint may still store lm_head (mamba_ssm does); it must then be the
        // embedding itself.
        if cfg.tie_embeddings && ck.contains("lm_head.weight") {
            expected.insert("lm_head.weight".into());
            let shape = [cfg.vocab_padded, cfg.d_model];
            if ck.f32("lm_head.weight", &shape)? != ck.f32(emb_name, &shape)? {
                bail!("lm_head.weight differs from {emb_name} but the config ties them (tie_embeddings / tie_word_embeddings)");
            }
        }
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("backbone.layers.{i}.mixer.");
            expected.insert(format!("backbone.layers.{i}.norm.weight"));
            if !cfg.rms_norm {
                expected.insert(format!("backbone.layers.{i}.norm.bias"));
            }
            let mixer = match cfg.arch {
                Arch::Mamba1 => {
                    expected.extend(Mamba1::tensor_names(&p, &cfg));
                    Mixer::M1(Mamba1::load(ck, &p, &cfg, dtype)?)
                }
                Arch::Mamba2 => {
                    expected.extend(Mamba2::tensor_names(&p, &cfg));
                    Mixer::M2(Mamba2::load(ck, &p, &cfg, dtype)?)
                }
            };
            layers.push(Layer { norm: Norm::load(ck, &format!("backbone.layers.{i}.norm"), &cfg)?, mixer });
        }
        let norm_f = Norm::load(ck, "backbone.norm_f", &cfg)?;
        if !cfg.rms_norm {
            expected.insert("backbone.norm_f.bias".into());
        }
        if let Some(extra) = ck.names().find(|n| !expected.contains(*n) && !ck.is_scale(n)) {
            let files: Vec<String> = ck.files.iter().map(|f| f.display().to_string()).collect();
            bail!("unexpected tensor {extra} in {} (does config.json match the weights?)", files.join(", "));
        }
        Ok(Model { cfg, dtype, embedding, lm_head, norm_f, layers })
    }

    /// Loads `config.json` and the weights from a directory.
    pub fn load_dir(dir: &std::path::Path, dtype: DType) -> Result<Model> {
        let cfg = Config::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open_dir(dir)?;
        Model::from_checkpoint(cfg, &ck, dtype)
    }

    /// A fresh, zeroed recurrent state for one sequence.
    pub fn new_state(&self) -> State {
        State::new(&self.cfg)
    }

    /// Bytes of weights read per decoded token.
    pub fn weight_bytes(&self) -> usize {
        let mixers: usize = self
            .layers
            .iter()
            .map(|l| match &l.mixer {
                Mixer::M1(m) => m.weight_bytes(),
                Mixer::M2(m) => m.weight_bytes(),
            })
            .sum();
        mixers + self.lm_head.as_ref().unwrap_or(&self.embedding).bytes()
    }

    /// Runs `states.len()` sequences of `l` tokens each (`tokens` row-major, `states.len() × l`),
    /// starting from and advancing their states. Returns the logits of the last `n_logits`
    /// positions of each sequence: `states.len() × n_logits × vocab_padded`.
    /// `l == 1` is the recurrent step; larger `l` is a parallel prefill.
    pub fn forward(&self, tokens: &[u32], l: usize, states: &mut [&mut State], n_logits: usize) -> Result<Vec<f32>> {
        let b = states.len();
        if tokens.len() != b * l {
            bail!("forward: {} tokens for {b} sequences of {l}", tokens.len());
        }
        if n_logits > l {
            bail!("forward: {n_logits} logits asked from {l} positions");
        }
        let v = self.cfg.vocab_padded;
        if l > 1 && b * l > PASS_ROWS && b > 1 {
            // Stacked sequences go through in passes of about PASS_ROWS rows (each sequence's
            // numbers are the same in any pass: see `Rows::Positions`).
            let per = (PASS_ROWS / l).max(1);
            let mut logits = Vec::with_capacity(b * n_logits * v);
            for (k, part) in states.chunks_mut(per).enumerate() {
                let at = k * per * l;
                logits.extend(self.forward(&tokens[at..at + part.len() * l], l, part, n_logits)?);
            }
            return Ok(logits);
        }
        let resid = self.layers_forward(tokens, l, states)?;
        if n_logits == 0 {
            return Ok(vec![]);
        }
        let d = self.cfg.d_model;
        // Only the asked-for positions go through the final norm and the LM head.
        let mut last = Vec::with_capacity(b * n_logits * d);
        for s in 0..b {
            last.extend_from_slice(&resid[(s * l + l - n_logits) * d..(s * l + l) * d]);
        }
        let mut normed = vec![0.0f32; last.len()];
        self.norm_f.forward(&last, &mut normed);
        let head = self.lm_head.as_ref().unwrap_or(&self.embedding);
        let mut logits = vec![0.0f32; b * n_logits * v];
        let rows = if l == 1 { Rows::Sequences(b) } else { Rows::Positions { seqs: b, len: n_logits } };
        matmul_t(&normed, rows, d, head, &mut logits, v);
        Ok(logits)
    }

    /// Feeds `tokens` to one sequence and returns `−log p(target)` for each of its first
    /// `targets.len()` positions (f64), the logits never held whole (see
    /// [`cross_entropy::head_nll`]).
    pub fn forward_nll(&self, tokens: &[u32], state: &mut State, targets: &[u32]) -> Result<Vec<f64>> {
        if targets.len() > tokens.len() {
            bail!("forward: {} targets for {} positions", targets.len(), tokens.len());
        }
        let v = self.cfg.vocab_padded;
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
            bail!("token id {t} is out of range: the model's vocabulary has {v} entries");
        }
        let resid = self.layers_forward(tokens, tokens.len(), &mut [state])?;
        let d = self.cfg.d_model;
        let mut normed = vec![0.0f32; targets.len() * d];
        self.norm_f.forward(&resid[..normed.len()], &mut normed);
        Ok(cross_entropy::head_nll(&normed, self.lm_head.as_ref().unwrap_or(&self.embedding), targets))
    }

    /// The residual stream after every layer (`states.len() × l` rows of d_model).
    fn layers_forward(&self, tokens: &[u32], l: usize, states: &mut [&mut State]) -> Result<Vec<f32>> {
        let (b, d) = (states.len(), self.cfg.d_model);
        let v = self.cfg.vocab_padded;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= v) {
            bail!("token id {t} is out of range: the model's vocabulary has {v} entries");
        }
        for s in states.iter() {
            s.check(&self.cfg)?;
        }
        let rows = b * l;
        let mut resid = vec![0.0f32; rows * d];
        for (r, &t) in tokens.iter().enumerate() {
            self.embedding.row_f32(t as usize, &mut resid[r * d..(r + 1) * d]);
        }
        let mut h = vec![0.0f32; rows * d];
        let mut out = vec![0.0f32; rows * d];
        for (i, layer) in self.layers.iter().enumerate() {
            layer.norm.forward(&resid, &mut h);
            let mut ls: Vec<&mut LayerState> = states.iter_mut().map(|s| &mut s.layers[i]).collect();
            match &layer.mixer {
                Mixer::M1(m) => m.forward(&h, l, &mut ls, &mut out),
                Mixer::M2(m) => m.forward(&h, l, &mut ls, &mut out),
            }
            resid.iter_mut().zip(&out).for_each(|(r, o)| *r += o);
        }
        for s in states.iter_mut() {
            s.pos += l as u64;
        }
        Ok(resid)
    }
}
