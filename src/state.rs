//! Per-sequence recurrent state: for every layer the last W−1 conv inputs and the SSM state.
//! Its size is constant in the sequence length, so a session can be saved to a file and
//! continued later without re-reading the prompt.

use crate::config::{Arch, Config};
use anyhow::{anyhow, bail, Context, Result};
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::any::Any;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// One layer's state. `conv` is time-major `(W−1, conv_dim)`; `ssm` is `(N, E)` for Mamba-1 and
/// `(H, N, P)` for Mamba-2 (layouts chosen for the CPU kernels; files use the official ones).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerState {
    pub conv: Vec<f32>,
    pub ssm: Ssm,
}

/// An SSM state's values: f32, or bf16 where a CPU model keeps it so (Mamba-2 in bf16 and int8
/// modes). Each model converts a state to its own kind when it first runs it; files and the
/// GPU take f32.
#[derive(Clone, Debug, PartialEq)]
pub enum Ssm {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Ssm {
    pub fn len(&self) -> usize {
        match self {
            Ssm::F32(v) => v.len(),
            Ssm::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        match self {
            Ssm::F32(v) => 4 * v.len(),
            Ssm::Bf16(v) => 2 * v.len(),
        }
    }

    /// The values as f32 (exact).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Ssm::F32(v) => Cow::Borrowed(v),
            Ssm::Bf16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        }
    }

    /// The values as f32, a bf16 state widened in place (exact).
    pub fn f32_mut(&mut self) -> &mut [f32] {
        if let Ssm::Bf16(v) = self {
            *self = Ssm::F32(v.iter().map(|x| x.to_f32()).collect());
        }
        match self {
            Ssm::F32(v) => v,
            Ssm::Bf16(_) => unreachable!(),
        }
    }

    /// The values as bf16, an f32 state rounded in place (to nearest even).
    pub fn bf16_mut(&mut self) -> &mut [bf16] {
        if let Ssm::F32(v) = self {
            *self = Ssm::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect());
        }
        match self {
            Ssm::Bf16(v) => v,
            Ssm::F32(_) => unreachable!(),
        }
    }
}

/// The state of one sequence after `pos` tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    pub layers: Vec<LayerState>,
    pub pos: u64,
}

/// Sizes that a state must agree with, from the config.
fn dims(cfg: &Config) -> (usize, usize, usize, usize) {
    let ssm_rows = match cfg.arch {
        Arch::Mamba1 => cfg.d_inner,
        Arch::Mamba2 => cfg.nheads(),
    };
    (cfg.d_conv - 1, cfg.conv_dim(), ssm_rows, cfg.d_state)
}

/// Floats of a layer's conv and SSM state.
pub fn layer_floats(cfg: &Config) -> (usize, usize) {
    let (hist, conv_dim, _, _) = dims(cfg);
    (hist * conv_dim, cfg.state_floats() / cfg.n_layer - hist * conv_dim)
}

impl State {
    pub fn new(cfg: &Config) -> State {
        let (conv, ssm) = layer_floats(cfg);
        let layer = LayerState { conv: vec![0.0; conv], ssm: Ssm::F32(vec![0.0; ssm]) };
        State { layers: vec![layer; cfg.n_layer], pos: 0 }
    }

    /// Whether the state has the model's shape (checked on every forward: no allocation).
    pub fn check(&self, cfg: &Config) -> Result<()> {
        let (conv, ssm) = layer_floats(cfg);
        let ok =
            self.layers.len() == cfg.n_layer && self.layers.iter().all(|l| l.conv.len() == conv && l.ssm.len() == ssm);
        if !ok {
            bail!("state does not match the model's shape");
        }
        Ok(())
    }

    /// Bytes of state as held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| 4 * l.conv.len() + l.ssm.bytes()).sum()
    }
}

/// A state as a backend handed it out: in host memory, or in the memory of the device that
/// made it (the GPU's copy: device to device in microseconds, where a copy to the host and
/// back costs milliseconds a direction). Only the backend that made a device state reads it.
#[derive(Clone, Debug)]
pub enum Kept {
    Host(State),
    Device { data: Arc<dyn Any + Send + Sync>, pos: u64, bytes: usize },
}

impl Kept {
    pub fn pos(&self) -> u64 {
        match self {
            Kept::Host(s) => s.pos,
            Kept::Device { pos, .. } => *pos,
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Kept::Host(s) => s.bytes(),
            Kept::Device { bytes, .. } => *bytes,
        }
    }

    /// Whether the state has the model's shape.
    pub fn check(&self, cfg: &Config) -> Result<()> {
        match self {
            Kept::Host(s) => s.check(cfg),
            Kept::Device { bytes, .. } if *bytes == 4 * cfg.state_floats() => Ok(()),
            Kept::Device { .. } => bail!("state does not match the model's shape"),
        }
    }

    /// The host state (a device state is only read by its device's backend).
    pub fn host(&self) -> Result<&State> {
        match self {
            Kept::Host(s) => Ok(s),
            Kept::Device { .. } => bail!("the state is in device memory"),
        }
    }

    pub fn into_host(self) -> Result<State> {
        match self {
            Kept::Host(s) => Ok(s),
            Kept::Device { .. } => bail!("the state is in device memory"),
        }
    }
}

/// A saved session: the state after every token so far, the logits for the next token, and
/// the token history (used by the repetition penalty and for display).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub state: Kept,
    pub next_logits: Vec<f32>,
    pub tokens: Vec<u32>,
}

fn fingerprint(cfg: &Config) -> String {
    format!(
        "{:?} d_model={} n_layer={} d_inner={} d_state={} d_conv={} heads={} headdim={} groups={} vocab={}",
        cfg.arch,
        cfg.d_model,
        cfg.n_layer,
        cfg.d_inner,
        cfg.d_state,
        cfg.d_conv,
        cfg.nheads_or_zero(),
        cfg.headdim,
        cfg.ngroups,
        cfg.vocab_padded
    )
}

impl Config {
    fn nheads_or_zero(&self) -> usize {
        if self.arch == Arch::Mamba2 {
            self.nheads()
        } else {
            0
        }
    }
}

/// Transposes a row-major `rows × cols` block.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = v[r * cols + c];
        }
    }
    t
}

/// Converts one layer's SSM state between the kernel layout and the official one
/// (Mamba-1 `(E, N)`, Mamba-2 `(H, P, N)`).
fn ssm_to_file(cfg: &Config, ssm: &[f32]) -> Vec<f32> {
    match cfg.arch {
        Arch::Mamba1 => transpose(ssm, cfg.d_state, cfg.d_inner),
        Arch::Mamba2 => {
            let (n, p) = (cfg.d_state, cfg.headdim);
            ssm.chunks(n * p).flat_map(|h| transpose(h, n, p)).collect()
        }
    }
}

fn ssm_from_file(cfg: &Config, v: &[f32]) -> Vec<f32> {
    match cfg.arch {
        Arch::Mamba1 => transpose(v, cfg.d_inner, cfg.d_state),
        Arch::Mamba2 => {
            let (n, p) = (cfg.d_state, cfg.headdim);
            v.chunks(n * p).flat_map(|h| transpose(h, p, n)).collect()
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Snapshot {
    /// Serialises to safetensors: `layers.{i}.conv_state` `(conv_dim, W−1)`,
    /// `layers.{i}.ssm_state` (official layout), `next_logits`, `tokens` (u32), with the model
    /// fingerprint and position in the metadata.
    pub fn to_bytes(&self, cfg: &Config) -> Result<Vec<u8>> {
        let (hist, conv_dim, rows, n) = dims(cfg);
        let state = self.state.host()?;
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, l) in state.layers.iter().enumerate() {
            owned.push((
                format!("layers.{i}.conv_state"),
                Dtype::F32,
                vec![conv_dim, hist],
                f32_bytes(&transpose(&l.conv, hist, conv_dim)),
            ));
            let shape = match cfg.arch {
                Arch::Mamba1 => vec![rows, n],
                Arch::Mamba2 => vec![rows, cfg.headdim, n],
            };
            owned.push((
                format!("layers.{i}.ssm_state"),
                Dtype::F32,
                shape,
                f32_bytes(&ssm_to_file(cfg, &l.ssm.to_f32())),
            ));
        }
        owned.push(("next_logits".into(), Dtype::F32, vec![self.next_logits.len()], f32_bytes(&self.next_logits)));
        let tok: Vec<u8> = self.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        owned.push(("tokens".into(), Dtype::U32, vec![self.tokens.len()], tok));
        let views: Vec<(String, TensorView)> = owned
            .iter()
            .map(|(name, dt, shape, data)| Ok((name.clone(), TensorView::new(*dt, shape.clone(), data)?)))
            .collect::<Result<_, safetensors::SafeTensorError>>()?;
        let meta: HashMap<String, String> = [
            ("format".to_string(), "mamba-lm-state".to_string()),
            ("version".to_string(), "1".to_string()),
            ("model".to_string(), fingerprint(cfg)),
            ("pos".to_string(), state.pos.to_string()),
        ]
        .into();
        Ok(safetensors::serialize(views, Some(meta))?)
    }

    pub fn save(&self, cfg: &Config, path: &Path, overwrite: bool) -> Result<()> {
        crate::io::write_file(path, &self.to_bytes(cfg)?, overwrite)
    }

    pub fn load(cfg: &Config, path: &Path) -> Result<Snapshot> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read state file {}", path.display()))?;
        Snapshot::from_bytes(cfg, &bytes).with_context(|| format!("invalid state file {}", path.display()))
    }

    pub fn from_bytes(cfg: &Config, bytes: &[u8]) -> Result<Snapshot> {
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("not a safetensors file: {e}"))?;
        let m = meta.metadata().clone().unwrap_or_default();
        if m.get("format").map(String::as_str) != Some("mamba-lm-state") {
            bail!("not a mamba-lm state file (missing format metadata)");
        }
        if m.get("version").map(String::as_str) != Some("1") {
            bail!("unsupported state file version {:?}", m.get("version"));
        }
        let want = fingerprint(cfg);
        match m.get("model") {
            Some(f) if *f == want => {}
            other => bail!(
                "saved for a different model ({}), this model is ({want})",
                other.map_or("unknown", |s| s.as_str())
            ),
        }
        let pos: u64 = m.get("pos").and_then(|p| p.parse().ok()).ok_or_else(|| anyhow!("bad pos metadata"))?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| anyhow!("corrupt safetensors data: {e}"))?;
        let get = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>> {
            let t = st.tensor(name).map_err(|_| anyhow!("tensor {name} missing"))?;
            if t.dtype() != dtype || t.shape() != shape {
                bail!("tensor {name} is {:?} {:?}, expected {:?} {:?}", t.dtype(), t.shape(), dtype, shape);
            }
            Ok(t.data().to_vec())
        };
        let floats =
            |b: Vec<u8>| -> Vec<f32> { b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect() };
        let (hist, conv_dim, rows, n) = dims(cfg);
        let mut state = State::new(cfg);
        state.pos = pos;
        for (i, l) in state.layers.iter_mut().enumerate() {
            let conv = floats(get(&format!("layers.{i}.conv_state"), Dtype::F32, &[conv_dim, hist])?);
            l.conv = transpose(&conv, conv_dim, hist);
            let shape = match cfg.arch {
                Arch::Mamba1 => vec![rows, n],
                Arch::Mamba2 => vec![rows, cfg.headdim, n],
            };
            l.ssm = Ssm::F32(ssm_from_file(cfg, &floats(get(&format!("layers.{i}.ssm_state"), Dtype::F32, &shape)?)));
        }
        let next_logits = floats(get("next_logits", Dtype::F32, &[cfg.vocab_padded])?);
        let nt =
            st.tensor("tokens").map_err(|_| anyhow!("tensor tokens missing"))?.shape().first().copied().unwrap_or(0);
        let tokens = get("tokens", Dtype::U32, &[nt])?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if state.layers.iter().any(|l| l.conv.iter().chain(l.ssm.to_f32().iter()).any(|x| !x.is_finite())) {
            bail!("state contains non-finite values");
        }
        Ok(Snapshot { state: Kept::Host(state), next_logits, tokens })
    }
}
