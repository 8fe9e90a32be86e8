//! Random initialisation exactly as the official code does it (spec §1.5, §2.7, §3.7), written
//! as a transformers-format checkpoint (`config.json` + `model.safetensors`) or kept in memory.

use crate::config::{Arch, Config};
use crate::loader::Checkpoint;
use crate::model::Model;
use crate::ops::q8::QBLOCK;
use crate::tensor::{DType, Store};
use anyhow::{bail, Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::tensor::TensorView;
use std::path::Path;

/// One named tensor (transformers names) in f32.
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

struct Init(StdRng);

impl Init {
    fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n).map(|_| ((self.0.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
    }
    /// nn.Linear's default: U(±1/√fan_in).
    fn linear(&mut self, out: usize, inp: usize) -> Vec<f32> {
        self.uniform(out * inp, 1.0 / (inp as f64).sqrt())
    }
    fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1 = 1.0 - self.0.random::<f64>();
                let u2 = self.0.random::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect()
    }
    /// Inverse-softplus of dt drawn log-uniformly in [dt_min, dt_max], floored.
    fn dt_bias(&mut self, n: usize, cfg: &Config) -> Vec<f32> {
        let p = &cfg.init;
        (0..n)
            .map(|_| {
                let u = self.0.random::<f64>();
                let dt = (u * (p.dt_max.ln() - p.dt_min.ln()) + p.dt_min.ln()).exp().max(p.dt_init_floor);
                (dt + (-(-dt).exp_m1()).ln()) as f32
            })
            .collect()
    }
}

/// Draws every weight of `cfg` with the official initialisation.
pub fn random_weights(cfg: &Config, seed: u64) -> Vec<NamedTensor> {
    let mut g = Init(StdRng::seed_from_u64(seed));
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, data: Vec<f32>| out.push(NamedTensor { name, shape, data });
    let (d, e, n, w) = (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv);
    push("backbone.embeddings.weight".into(), vec![cfg.vocab_padded, d], g.normal(cfg.vocab_padded * d, 0.02));
    let out_scale = 1.0 / (cfg.n_layer as f64).sqrt();
    for i in 0..cfg.n_layer {
        let p = format!("backbone.layers.{i}.");
        push(format!("{p}norm.weight"), vec![d], vec![1.0; d]);
        let m = format!("{p}mixer.");
        let conv_dim = cfg.conv_dim();
        let conv_bound = cfg.init.conv_init.unwrap_or(1.0 / (w as f64).sqrt());
        push(format!("{m}conv1d.weight"), vec![conv_dim, 1, w], g.uniform(conv_dim * w, conv_bound));
        if cfg.conv_bias {
            push(format!("{m}conv1d.bias"), vec![conv_dim], g.uniform(conv_dim, 1.0 / (w as f64).sqrt()));
        }
        push(format!("{m}in_proj.weight"), vec![cfg.d_in_proj(), d], g.linear(cfg.d_in_proj(), d));
        if cfg.bias {
            push(format!("{m}in_proj.bias"), vec![cfg.d_in_proj()], vec![0.0; cfg.d_in_proj()]);
            push(format!("{m}out_proj.bias"), vec![d], vec![0.0; d]);
        }
        let mut outw = g.linear(d, e);
        outw.iter_mut().for_each(|x| *x = (*x as f64 * out_scale) as f32);
        push(format!("{m}out_proj.weight"), vec![d, e], outw);
        match cfg.arch {
            Arch::Mamba1 => {
                let r = cfg.dt_rank;
                push(format!("{m}x_proj.weight"), vec![r + 2 * n, e], g.linear(r + 2 * n, e));
                let std = cfg.init.dt_scale / (r as f64).sqrt();
                let dtw = if cfg.init.dt_init_random { g.uniform(e * r, std) } else { vec![std as f32; e * r] };
                push(format!("{m}dt_proj.weight"), vec![e, r], dtw);
                push(format!("{m}dt_proj.bias"), vec![e], g.dt_bias(e, cfg));
                let a_log = (0..e * n).map(|j| ((j % n) as f32 + 1.0).ln()).collect();
                push(format!("{m}A_log"), vec![e, n], a_log);
                push(format!("{m}D"), vec![e], vec![1.0; e]);
            }
            Arch::Mamba2 => {
                let h = cfg.nheads();
                push(format!("{m}dt_bias"), vec![h], g.dt_bias(h, cfg));
                let (lo, hi) = cfg.init.a_init_range;
                let a_log = (0..h).map(|_| (lo + g.0.random::<f64>() * (hi - lo)).ln() as f32).collect();
                push(format!("{m}A_log"), vec![h], a_log);
                let dn = if cfg.d_has_hdim { cfg.d_ssm } else { h };
                push(format!("{m}D"), vec![dn], vec![1.0; dn]);
                push(format!("{m}norm.weight"), vec![cfg.d_ssm], vec![1.0; cfg.d_ssm]);
            }
        }
    }
    push("backbone.norm_f.weight".into(), vec![d], vec![1.0; d]);
    if !cfg.tie_embeddings {
        push("lm_head.weight".into(), vec![cfg.vocab_padded, d], g.linear(cfg.vocab_padded, d));
    }
    out
}

/// A randomly initialised model in memory (for benchmarks), large matrices in `dtype`.
pub fn random_model(cfg: &Config, seed: u64, dtype: DType) -> Result<Model> {
    let mut ck = Checkpoint::default();
    for t in random_weights(cfg, seed) {
        ck.insert_f32(&t.name, t.shape, &t.data);
    }
    Model::from_checkpoint(cfg.clone(), &ck, dtype)
}

/// Writes `config.json` and `model.safetensors` (tensors in `dtype`, as [`safetensors_bytes`]
/// stores them) into a new directory `out`.
pub fn write_checkpoint(cfg: &Config, seed: u64, dtype: DType, out: &Path) -> Result<()> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not empty; refusing to overwrite it", out.display());
    }
    let st = safetensors_bytes(random_weights(cfg, seed), dtype)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cfg_json = serde_json::to_string_pretty(&cfg.to_transformers_json())?;
    crate::io::write_file(&out.join("model.safetensors"), &st, false)?;
    crate::io::write_file(&out.join("config.json"), cfg_json.as_bytes(), false)?;
    Ok(())
}

/// Whether a checkpoint tensor is one of the large matrices `--dtype int8` quantizes (the model
/// loads them as matrices: the embedding, the LM head, the projections).
fn is_large_matrix(name: &str) -> bool {
    name.ends_with("_proj.weight")
        || name.ends_with("embeddings.weight")
        || name.ends_with("embedding.weight")
        || name == "lm_head.weight"
}

/// A safetensors file of `tensors`: in `dtype`, except A_log, D and the dt biases, which stay
/// f32 as the official modules keep them; in int8, the large matrices whose rows are whole
/// blocks are 8-bit with their block scales beside them (`<name>_scale`, f32, rows × blocks)
/// and everything else f32.
pub fn safetensors_bytes(tensors: Vec<NamedTensor>, dtype: DType) -> Result<Vec<u8>> {
    let mut stores: Vec<(String, Vec<usize>, Store)> = vec![];
    for t in tensors {
        let keep_f32 = [".A_log", ".D", "dt_proj.bias", ".dt_bias"].iter().any(|s| t.name.ends_with(s));
        let dt = match dtype {
            _ if keep_f32 => DType::F32,
            DType::I8 if is_large_matrix(&t.name) && t.shape.len() == 2 && t.shape[1] % QBLOCK == 0 => DType::I8,
            DType::I8 => DType::F32,
            d => d,
        };
        let store = Store::from_f32(t.data, dt);
        if let Store::I8(q) = &store {
            let shape = vec![t.shape[0], t.shape[1] / QBLOCK];
            stores.push((Checkpoint::scale_name(&t.name), shape, Store::F32(q.d.clone())));
        }
        stores.push((t.name, t.shape, store));
    }
    let bytes: Vec<Vec<u8>> = stores.iter().map(|(_, _, s)| s.to_le_bytes()).collect();
    let views = stores
        .iter()
        .zip(&bytes)
        .map(|((name, shape, s), b)| {
            let dt = match s.dtype() {
                DType::F32 => safetensors::Dtype::F32,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::F16 => safetensors::Dtype::F16,
                DType::I8 => safetensors::Dtype::I8,
            };
            Ok((name.clone(), TensorView::new(dt, shape.clone(), b)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(views, Some(meta))?)
}
