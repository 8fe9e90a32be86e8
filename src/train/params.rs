//! The trainable parameters as one flat f32 buffer and one table of (name, shape, offset):
//! weights, gradients and optimizer moments are each a buffer of this layout, so AdamW,
//! clipping, checkpoints and the all-reduce walk one slice. Names and shapes are the
//! checkpoint's own (conv weights `(C, 1, W)`, `A_log` as stored), so a gradient file reads
//! like the weight file it belongs to.

use crate::config::{Arch, Config};
use crate::loader::Checkpoint;
use anyhow::{bail, Result};
use std::ops::Range;

/// The embedding's name in transformers' checkpoints (what training writes) and in mamba_ssm's.
pub const EMBEDDING_NAMES: [&str; 2] = ["backbone.embeddings.weight", "backbone.embedding.weight"];

/// One tensor of the table.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Whether AdamW decays it: weight matrices yes; norms, biases, `A_log`, `D`, `dt_bias` no
    /// (as the official modules mark them).
    pub decay: bool,
}

impl Param {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.shape.iter().product::<usize>()
    }
}

/// Where a Mamba-1 layer's tensors live.
pub struct Mamba1Params {
    pub norm: Range<usize>,           // (D)
    pub in_proj: Range<usize>,        // (2E, D)
    pub conv_w: Range<usize>,         // (E, 1, W)
    pub conv_b: Option<Range<usize>>, // (E)
    pub x_proj: Range<usize>,         // (R + 2N, E)
    pub dt_proj: Range<usize>,        // (E, R)
    pub dt_bias: Range<usize>,        // (E)
    pub a_log: Range<usize>,          // (E, N)
    pub d: Range<usize>,              // (E)
    pub out_proj: Range<usize>,       // (D, E)
}

/// Where a Mamba-2 layer's tensors live.
pub struct Mamba2Params {
    pub norm: Range<usize>,           // (D)
    pub in_proj: Range<usize>,        // (2·d_ssm + 2GN + H, D): [z, x, B, C, dt]
    pub conv_w: Range<usize>,         // (d_ssm + 2GN, 1, W)
    pub conv_b: Option<Range<usize>>, // (d_ssm + 2GN)
    pub dt_bias: Range<usize>,        // (H)
    pub a_log: Range<usize>,          // (H)
    pub d: Range<usize>,              // (H) or (H·P)
    pub norm_w: Range<usize>,         // (d_ssm)
    pub out_proj: Range<usize>,       // (D, d_ssm)
}

pub enum LayerParams {
    M1(Mamba1Params),
    M2(Mamba2Params),
}

impl LayerParams {
    /// The block's RMSNorm weight.
    pub fn norm(&self) -> &Range<usize> {
        match self {
            LayerParams::M1(m) => &m.norm,
            LayerParams::M2(m) => &m.norm,
        }
    }
}

/// The layout of one model's parameters.
pub struct Layout {
    pub cfg: Config,
    pub table: Vec<Param>,
    /// f32 values in all.
    pub len: usize,
    pub embedding: Range<usize>, // (V_pad, D)
    /// The LM head: the embedding itself when tied.
    pub lm_head: Range<usize>, // (V_pad, D)
    pub norm_f: Range<usize>,    // (D)
    pub layers: Vec<LayerParams>,
}

impl Layout {
    /// The layout of `cfg`'s parameters, the embedding named `embedding_name` (the checkpoint
    /// format's spelling). Fails for what training does not support.
    pub fn new(cfg: &Config, embedding_name: &str) -> Result<Layout> {
        if !cfg.rms_norm {
            bail!("training needs RMSNorm blocks; this config uses LayerNorm (rms_norm: false)");
        }
        if cfg.bias {
            bail!("training does not support in_proj/out_proj biases (bias / use_bias: true)");
        }
        if cfg.arch == Arch::Mamba2 && cfg.d_mlp() > 0 {
            bail!("training does not support Mamba-2's MLP branch (d_inner {} > d_ssm {})", cfg.d_inner, cfg.d_ssm);
        }
        let mut t = Layout {
            cfg: cfg.clone(),
            table: vec![],
            len: 0,
            embedding: 0..0,
            lm_head: 0..0,
            norm_f: 0..0,
            layers: vec![],
        };
        let (d, v, e, n, w) = (cfg.d_model, cfg.vocab_padded, cfg.d_inner, cfg.d_state, cfg.d_conv);
        t.embedding = t.push(embedding_name, &[v, d], true);
        for i in 0..cfg.n_layer {
            let norm = t.push(&format!("backbone.layers.{i}.norm.weight"), &[d], false);
            let p = format!("backbone.layers.{i}.mixer.");
            let conv = cfg.conv_dim();
            let layer = match cfg.arch {
                Arch::Mamba1 => {
                    let r = cfg.dt_rank;
                    LayerParams::M1(Mamba1Params {
                        norm,
                        in_proj: t.push(&format!("{p}in_proj.weight"), &[2 * e, d], true),
                        conv_w: t.push(&format!("{p}conv1d.weight"), &[e, 1, w], true),
                        conv_b: cfg.conv_bias.then(|| t.push(&format!("{p}conv1d.bias"), &[e], false)),
                        x_proj: t.push(&format!("{p}x_proj.weight"), &[r + 2 * n, e], true),
                        dt_proj: t.push(&format!("{p}dt_proj.weight"), &[e, r], true),
                        dt_bias: t.push(&format!("{p}dt_proj.bias"), &[e], false),
                        a_log: t.push(&format!("{p}A_log"), &[e, n], false),
                        d: t.push(&format!("{p}D"), &[e], false),
                        out_proj: t.push(&format!("{p}out_proj.weight"), &[d, e], true),
                    })
                }
                Arch::Mamba2 => {
                    let h = cfg.nheads();
                    LayerParams::M2(Mamba2Params {
                        norm,
                        in_proj: t.push(&format!("{p}in_proj.weight"), &[cfg.d_in_proj(), d], true),
                        conv_w: t.push(&format!("{p}conv1d.weight"), &[conv, 1, w], true),
                        conv_b: cfg.conv_bias.then(|| t.push(&format!("{p}conv1d.bias"), &[conv], false)),
                        dt_bias: t.push(&format!("{p}dt_bias"), &[h], false),
                        a_log: t.push(&format!("{p}A_log"), &[h], false),
                        d: t.push(&format!("{p}D"), &[if cfg.d_has_hdim { cfg.d_ssm } else { h }], false),
                        norm_w: t.push(&format!("{p}norm.weight"), &[cfg.d_ssm], false),
                        out_proj: t.push(&format!("{p}out_proj.weight"), &[d, cfg.d_ssm], true),
                    })
                }
            };
            t.layers.push(layer);
        }
        t.norm_f = t.push("backbone.norm_f.weight", &[d], false);
        t.lm_head = if cfg.tie_embeddings { t.embedding.clone() } else { t.push("lm_head.weight", &[v, d], true) };
        Ok(t)
    }

    /// The layout of a checkpoint's parameters (its embedding's name decides the spelling).
    pub fn of_checkpoint(cfg: &Config, ck: &Checkpoint) -> Result<Layout> {
        Layout::new(cfg, EMBEDDING_NAMES.into_iter().find(|n| ck.contains(n)).unwrap_or(EMBEDDING_NAMES[1]))
    }

    fn push(&mut self, name: &str, shape: &[usize], decay: bool) -> Range<usize> {
        let p = Param { name: name.to_string(), shape: shape.to_vec(), offset: self.len, decay };
        self.len += shape.iter().product::<usize>();
        let r = p.range();
        self.table.push(p);
        r
    }

    /// The checkpoint's values in this layout (f32, whatever they are stored in); the embedding
    /// is found under either format's name.
    pub fn load(&self, ck: &Checkpoint) -> Result<Vec<f32>> {
        let mut v = vec![0.0f32; self.len];
        for p in &self.table {
            let name = match p.name.as_str() {
                n @ ("backbone.embeddings.weight" | "backbone.embedding.weight") if !ck.contains(n) => {
                    EMBEDDING_NAMES.into_iter().find(|&o| o != n).expect("two spellings")
                }
                n => n,
            };
            v[p.range()].copy_from_slice(&ck.f32(name, &p.shape)?);
        }
        Ok(v)
    }

    /// `values` (this layout) as a safetensors file of f32 tensors under the table's names.
    pub fn to_safetensors(
        &self,
        values: &[f32],
        meta: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Vec<u8>> {
        assert_eq!(values.len(), self.len);
        let bytes: Vec<Vec<u8>> =
            self.table.iter().map(|p| values[p.range()].iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views = self
            .table
            .iter()
            .zip(&bytes)
            .map(|(p, b)| {
                Ok((p.name.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, p.shape.clone(), b)?))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        Ok(safetensors::serialize(views, meta)?)
    }
}
