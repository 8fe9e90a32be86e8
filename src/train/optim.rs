//! AdamW (decoupled weight decay, PyTorch's update order), the learning-rate schedule (linear
//! warmup, cosine decay to a floor) and global-norm gradient clipping, over the flat buffers
//! of a [`Layout`].

use super::params::Layout;
use rayon::prelude::*;

/// Optimizer settings (training-spec §1's defaults in [`AdamW::default`]).
#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// Elements per parallel task of the element-wise passes; sums over tasks go in task order, so
/// results do not depend on the thread count.
const TASK: usize = 1 << 16;

impl AdamW {
    /// One update of `params` from `grads` (already clipped) at step `t` (1-based) with
    /// learning rate `lr`, updating the moments `m` and `v`. Per element, as torch.optim.AdamW:
    /// `p ← p·(1 − lr·wd)` (decayed tensors only), `m ← β1·m + (1−β1)·g`,
    /// `v ← β2·v + (1−β2)·g²`, `p ← p − lr/(1−β1^t) · m / (√v/√(1−β2^t) + ε)`.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        layout: &Layout,
        t: u64,
        lr: f32,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) {
        let bc1 = 1.0 - (self.beta1 as f64).powi(t as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(t as i32);
        let (step_size, bc2_sqrt) = ((lr as f64 / bc1) as f32, bc2.sqrt() as f32);
        for p in &layout.table {
            let r = p.range();
            let decay = if p.decay { 1.0 - lr * self.weight_decay } else { 1.0 };
            params[r.clone()]
                .par_chunks_mut(TASK)
                .zip(grads[r.clone()].par_chunks(TASK))
                .zip(m[r.clone()].par_chunks_mut(TASK))
                .zip(v[r].par_chunks_mut(TASK))
                .for_each(|(((p, g), m), v)| {
                    for i in 0..p.len() {
                        p[i] *= decay;
                        m[i] += (g[i] - m[i]) * (1.0 - self.beta1);
                        v[i] = v[i] * self.beta2 + (1.0 - self.beta2) * g[i] * g[i];
                        p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + self.eps);
                    }
                });
        }
    }
}

/// The global L2 norm of `grads` (f64 sums).
pub fn grad_norm(grads: &[f32]) -> f64 {
    let parts: Vec<f64> = grads.par_chunks(TASK).map(|c| c.iter().map(|&g| g as f64 * g as f64).sum()).collect();
    parts.iter().sum::<f64>().sqrt()
}

/// The factor torch.nn.utils.clip_grad_norm_ scales gradients of global norm `norm` by so that
/// theirs is at most `max_norm`: `max / (norm + 1e-6)` when that is below 1, else 1 (and 1 for
/// `max_norm` 0: no clipping).
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    let factor = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && factor < 1.0 {
        factor as f32
    } else {
        1.0
    }
}

/// Dynamic loss scaling for f16 products (as `torch.cuda.amp.GradScaler` does it): the loss's
/// gradient is multiplied by 2^`log2` so that small gradients survive f16's range; a step whose
/// gradients come out non-finite is skipped and the scale halved; after
/// [`LossScale::GROWTH_INTERVAL`] finite steps in a row it doubles. Powers of two only, so
/// scaling and unscaling are exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LossScale {
    pub log2: i32,
    /// Finite steps since the last change.
    pub good: u64,
}

impl LossScale {
    pub const GROWTH_INTERVAL: u64 = 2000;
    /// GradScaler's default initial scale, 65,536.
    pub const INIT_LOG2: i32 = 16;

    pub fn new(log2: i32) -> LossScale {
        LossScale { log2, good: 0 }
    }

    pub fn scale(&self) -> f64 {
        2f64.powi(self.log2)
    }

    /// Records whether a step's gradients were finite; returns whether its update goes ahead.
    /// Fails when they overflow even unscaled (the run has diverged).
    pub fn update(&mut self, finite: bool) -> Result<bool, String> {
        if finite {
            self.good += 1;
            if self.good == Self::GROWTH_INTERVAL {
                (self.log2, self.good) = (self.log2 + 1, 0);
            }
            return Ok(true);
        }
        if self.log2 <= 0 {
            return Err("the gradients are not finite even without loss scaling".into());
        }
        (self.log2, self.good) = (self.log2 - 1, 0);
        Ok(false)
    }
}

/// Multiplies `grads` by `f` (skipped for 1).
pub fn scale_grads(grads: &mut [f32], f: f32) {
    if f != 1.0 {
        grads.par_chunks_mut(TASK).for_each(|c| c.iter_mut().for_each(|g| *g *= f));
    }
}

/// Learning-rate schedule: linear warmup from 0 over `warmup` steps (`max·it/warmup`), then
/// cosine from `max` to `min` at `decay_steps`, `min` after.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub max: f64,
    pub min: f64,
    pub warmup: u64,
    pub decay_steps: u64,
}

impl Schedule {
    /// The learning rate of step `it` (0-based).
    pub fn lr(&self, it: u64) -> f64 {
        if it < self.warmup {
            return self.max * it as f64 / self.warmup as f64;
        }
        if it >= self.decay_steps {
            return self.min;
        }
        let frac = (it - self.warmup) as f64 / (self.decay_steps - self.warmup).max(1) as f64;
        self.min + 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()) * (self.max - self.min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn adamw_steps_follow_the_formula_and_spare_the_undecayed() {
        let layout = Layout::new(&Config::preset("tiny").unwrap(), "backbone.embeddings.weight").unwrap();
        let n = layout.len;
        let (mut p, g, mut m, mut v) = (vec![1.0f32; n], vec![0.5f32; n], vec![0.0f32; n], vec![0.0f32; n]);
        let opt = AdamW { weight_decay: 0.1, ..AdamW::default() };
        // A constant gradient makes each bias-corrected step exactly lr: p ← p·(1 − lr·wd) − lr.
        for (t, decayed, plain) in [(1, 0.89, 0.9), (2, 0.89 * 0.99 - 0.1, 0.8)] {
            opt.step(&layout, t, 0.1, &mut p, &g, &mut m, &mut v);
            for e in &layout.table {
                let want = if e.decay { decayed } else { plain };
                assert!(p[e.range()].iter().all(|&x| (x as f64 - want).abs() < 1e-6), "{} after step {t}", e.name);
            }
        }
        let no_decay: Vec<&str> = layout.table.iter().filter(|e| !e.decay).map(|e| e.name.as_str()).collect();
        assert!(no_decay
            .iter()
            .all(|n| [".A_log", ".D", ".bias", "norm.weight", "norm_f.weight"].iter().any(|s| n.ends_with(s))));
        assert!(no_decay.iter().any(|n| n.ends_with("A_log")) && layout.table.iter().any(|e| e.decay));
    }

    #[test]
    fn schedule_warms_up_then_follows_the_cosine_to_the_floor() {
        let s = Schedule { max: 6e-4, min: 6e-5, warmup: 10, decay_steps: 110 };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 3e-4).abs() < 1e-12);
        assert!((s.lr(10) - 6e-4).abs() < 1e-12);
        assert!((s.lr(60) - 3.3e-4).abs() < 1e-12, "half way: the mean of max and min");
        assert!((s.lr(110) - 6e-5).abs() < 1e-12 && (s.lr(500) - 6e-5).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![3.0f32, 4.0];
        let norm = grad_norm(&g);
        assert!((norm - 5.0).abs() < 1e-9);
        scale_grads(&mut g, clip_factor(norm, 1.0));
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        assert_eq!(clip_factor(grad_norm(&[0.3, 0.4]), 1.0), 1.0);
        assert_eq!(clip_factor(5.0, 0.0), 1.0, "0: no clipping");
    }

    #[test]
    fn loss_scale_halves_on_overflow_and_doubles_after_good_steps() {
        let mut ls = LossScale::new(3);
        assert_eq!(ls.scale(), 8.0);
        assert_eq!(ls.update(false), Ok(false), "an overflowing step is skipped");
        assert_eq!(ls, LossScale { log2: 2, good: 0 });
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            assert_eq!(ls.update(true), Ok(true));
        }
        assert_eq!(ls.log2, 2, "not yet");
        ls.update(true).unwrap();
        assert_eq!(ls, LossScale { log2: 3, good: 0 });
        // An overflow restarts the count.
        ls.update(true).unwrap();
        ls.update(false).unwrap();
        assert_eq!(ls, LossScale { log2: 2, good: 0 });
        // Overflowing at scale 1 is a diverged run, not something a smaller scale fixes.
        let mut one = LossScale::new(0);
        assert!(one.update(false).is_err());
    }
}
