//! Where a run's steps execute: on the CPU, over the weights and moments the [`Run`] holds, or
//! on a GPU, over device copies that [`Engine::sync`] brings back into the run before a
//! checkpoint. Both take the same calls, so the loop in [`super::run`] is written once.

use super::model::{self, Activations};
use super::optim::{grad_norm, scale_grads, AdamW};
use super::run::Run;
use crate::tensor::DType;
use anyhow::Result;

#[allow(clippy::large_enum_variant)] // one per run
pub enum Engine {
    Cpu {
        acts: Option<Activations>,
        grads: Vec<f32>,
    },
    #[cfg(feature = "cuda")]
    Gpu(Box<crate::cuda::train::GpuTrainer>),
}

impl Engine {
    /// An engine for `run` on the CPU (`device` None) or on GPU `device`, which gets a copy
    /// of the run's weights and moments; `dtype` is f32, or bf16 / f16 on a GPU (the products'
    /// type; f16 runs with loss scaling).
    pub fn new(run: &Run, device: Option<usize>, dtype: DType) -> Result<Engine> {
        match device {
            None if dtype != DType::F32 => anyhow::bail!("training on the CPU runs in f32: drop --dtype {dtype}"),
            None => Ok(Engine::Cpu { acts: None, grads: vec![0.0; run.layout.len] }),
            #[cfg(feature = "cuda")]
            Some(n) => {
                if dtype == DType::I8 {
                    anyhow::bail!("int8 is for inference on the CPU; train in f32, bf16 or f16");
                }
                let gpu = crate::cuda::Gpu::open(n)?;
                let t = crate::cuda::train::GpuTrainer::new(gpu, &run.layout, &run.params, &run.m, &run.v, dtype)?;
                Ok(Engine::Gpu(Box::new(t)))
            }
            #[cfg(not(feature = "cuda"))]
            Some(_) => anyhow::bail!(
                "this mamba-lm was built without CUDA support: rebuild with `cargo build --release --features cuda`"
            ),
        }
    }

    /// The forward over `seqs × len` `inputs`, each predicting its `targets` entry.
    pub fn forward(
        &mut self,
        run: &Run,
        (seqs, len, recompute): (usize, usize, bool),
        inputs: Vec<u32>,
        targets: Vec<u32>,
    ) -> Result<()> {
        match self {
            Engine::Cpu { acts, .. } => {
                let a = match acts.take() {
                    Some(a) if (a.seqs, a.len, a.recompute) == (seqs, len, recompute) => a,
                    _ => Activations::new(&run.layout, seqs, len, recompute),
                };
                model::forward(&run.layout, &run.params, acts.insert(a), inputs, targets)
            }
            #[cfg(feature = "cuda")]
            Engine::Gpu(t) => t.forward(&run.layout, (seqs, len, recompute), inputs, targets),
        }
    }

    /// After [`Engine::forward`], the summed loss of the graded positions; with `scale`, the
    /// backward too, adding `scale` times the loss's gradient to the gradients.
    pub fn backward(&mut self, run: &Run, scale: Option<f32>) -> Result<f64> {
        match self {
            Engine::Cpu { acts, grads } => {
                let acts = acts.as_mut().ok_or_else(|| anyhow::anyhow!("backward before forward"))?;
                Ok(match scale {
                    Some(s) => model::backward(&run.layout, &run.params, grads, acts, s),
                    None => model::graded_loss(&run.layout, &run.params, acts),
                })
            }
            #[cfg(feature = "cuda")]
            Engine::Gpu(t) => t.backward(&run.layout, scale),
        }
    }

    /// After [`Engine::forward`], whether each graded position's most likely token is its target.
    pub fn hits(&mut self, run: &Run) -> Result<Vec<bool>> {
        match self {
            Engine::Cpu { acts, .. } => {
                let acts = acts.as_ref().ok_or_else(|| anyhow::anyhow!("hits before forward"))?;
                Ok(model::hits(&run.layout, &run.params, acts))
            }
            #[cfg(feature = "cuda")]
            Engine::Gpu(t) => t.hits(&run.layout),
        }
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        match self {
            Engine::Cpu { grads, .. } => {
                grads.fill(0.0);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Engine::Gpu(t) => t.zero_grads(),
        }
    }

    pub fn grad_norm(&mut self) -> Result<f64> {
        match self {
            Engine::Cpu { grads, .. } => Ok(grad_norm(grads)),
            #[cfg(feature = "cuda")]
            Engine::Gpu(t) => t.grad_norm(),
        }
    }

    /// AdamW at step `run.state.step` (already counted) and rate `lr`, the gradients first
    /// scaled by `clip` ([`super::optim::clip_factor`]).
    pub fn update(&mut self, run: &mut Run, adamw: &AdamW, lr: f32, clip: f32) -> Result<()> {
        match self {
            Engine::Cpu { grads, .. } => {
                scale_grads(grads, clip);
                adamw.step(&run.layout, run.state.step, lr, &mut run.params, grads, &mut run.m, &mut run.v);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Engine::Gpu(t) => t.update(&run.layout, adamw, run.state.step, lr, clip),
        }
    }

    /// Brings the weights and moments into `run` (a no-op on the CPU, where they live).
    pub fn sync(&mut self, run: &mut Run) -> Result<()> {
        match self {
            Engine::Cpu { .. } => {
                let _ = run;
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Engine::Gpu(t) => {
                (run.params, run.m, run.v) = t.download()?;
                Ok(())
            }
        }
    }

    /// Bytes the engine holds on its device (GPU), if it can tell.
    pub fn device_bytes(&self) -> Option<usize> {
        match self {
            Engine::Cpu { .. } => None,
            #[cfg(feature = "cuda")]
            Engine::Gpu(t) => Some(t.bytes()),
        }
    }
}
