//! The Mamba-1 mixer: in_proj → (x, z); causal conv + SiLU on x; x_proj → (δ, B, C);
//! dt_proj; selective scan with D skip and SiLU(z) gate; out_proj.

use super::Linear;
use crate::config::Config;
use crate::loader::Checkpoint;
use crate::ops::causal_conv1d::causal_conv1d_silu;
use crate::ops::matmul::Rows;
use crate::ops::selective_scan::{selective_scan, ScanInputs};
use crate::state::LayerState;
use crate::tensor::DType;
use anyhow::Result;

pub struct Mamba1 {
    pub(crate) in_proj: Linear,
    /// Tap-major `(W, E)`.
    pub(crate) conv_w: Vec<f32>,
    pub(crate) conv_b: Option<Vec<f32>>,
    pub(crate) x_proj: Linear,
    pub(crate) dt_proj: Linear,
    pub(crate) dt_bias: Vec<f32>,
    /// `A = −exp(A_log)` transposed to `(N, E)`.
    pub(crate) a: Vec<f32>,
    pub(crate) d: Vec<f32>,
    pub(crate) out_proj: Linear,
    pub(crate) e: usize,
    pub(crate) n: usize,
    pub(crate) r: usize,
    pub(crate) w: usize,
}

impl Mamba1 {
    pub fn load(ck: &Checkpoint, p: &str, cfg: &Config, dtype: DType) -> Result<Mamba1> {
        let (dm, e, n, r, w) = (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv);
        let a = crate::ops::selective_scan::a_from_log(&ck.f32(&format!("{p}A_log"), &[e, n])?, e, n);
        let (conv_w, conv_b) = super::load_conv(ck, p, cfg, e)?;
        Ok(Mamba1 {
            in_proj: Linear::load(ck, &format!("{p}in_proj"), 2 * e, dm, cfg.bias, dtype)?,
            conv_w,
            conv_b,
            x_proj: Linear::load(ck, &format!("{p}x_proj"), r + 2 * n, e, false, dtype)?,
            dt_proj: Linear::load(ck, &format!("{p}dt_proj"), e, r, false, dtype)?,
            dt_bias: ck.f32(&format!("{p}dt_proj.bias"), &[e])?,
            a,
            d: ck.f32(&format!("{p}D"), &[e])?,
            out_proj: Linear::load(ck, &format!("{p}out_proj"), dm, e, cfg.bias, dtype)?,
            e,
            n,
            r,
            w,
        })
    }

    /// Tensor names this mixer reads (for rejecting unexpected tensors).
    pub fn tensor_names(p: &str, cfg: &Config) -> Vec<String> {
        super::mixer_tensor_names(
            p,
            cfg,
            &[
                "A_log",
                "D",
                "in_proj.weight",
                "conv1d.weight",
                "x_proj.weight",
                "dt_proj.weight",
                "dt_proj.bias",
                "out_proj.weight",
            ],
        )
    }

    pub fn weight_bytes(&self) -> usize {
        [&self.in_proj, &self.x_proj, &self.dt_proj, &self.out_proj].iter().map(|l| l.w.bytes()).sum::<usize>()
            + 4 * (self.conv_w.len() + self.dt_bias.len() + self.a.len() + self.d.len())
    }

    /// `h`: `states.len()` sequences × `l` rows of d_model; writes the mixer output to `out`.
    pub fn forward(&self, h: &[f32], l: usize, states: &mut [&mut LayerState], out: &mut [f32]) {
        let (e, n, r) = (self.e, self.n, self.r);
        let rows = states.len() * l;
        let kind = Rows::of(states.len(), l);
        let mut xz = vec![0.0f32; rows * 2 * e];
        self.in_proj.forward(h, kind, &mut xz);
        let mut xc = vec![0.0f32; rows * e];
        let xdw = r + 2 * n;
        let mut xdbl = vec![0.0f32; rows * xdw];
        let mut dt = vec![0.0f32; rows * e];
        let mut y = vec![0.0f32; rows * e];
        for (s, st) in states.iter_mut().enumerate() {
            let (x0, c0) = (s * l * 2 * e, s * l * e);
            causal_conv1d_silu(
                &xz[x0..],
                l,
                2 * e,
                e,
                &self.conv_w,
                self.w,
                self.conv_b.as_deref(),
                &mut st.conv,
                &mut xc[c0..],
            );
        }
        self.x_proj.forward(&xc, kind, &mut xdbl);
        self.dt_proj.forward_strided(&xdbl, kind, xdw, &mut dt, e);
        for (s, st) in states.iter_mut().enumerate() {
            let (x0, c0, d0) = (s * l * 2 * e, s * l * e, s * l * xdw);
            let inp = ScanInputs {
                u: &xc[c0..],
                u_rs: e,
                dt: &dt[c0..],
                dt_rs: e,
                dt_bias: &self.dt_bias,
                a: &self.a,
                b: &xdbl[d0 + r..],
                c: &xdbl[d0 + r + n..],
                bc_rs: xdw,
                d: &self.d,
                z: Some((&xz[x0 + e..], 2 * e)),
            };
            selective_scan(&inp, l, e, n, st.ssm.f32_mut(), &mut y[c0..]);
        }
        self.out_proj.forward(&y, kind, out);
    }
}
