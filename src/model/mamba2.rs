//! The Mamba-2 mixer: in_proj → [z0, x0, z, xBC, dt]; causal conv + SiLU on xBC; SSD over
//! heads (scalar decay per head, B/C shared per group) with D skip; gated RMSNorm per group;
//! optional SiLU-gated MLP branch; out_proj.

use super::Linear;
use crate::config::Config;
use crate::loader::Checkpoint;
use crate::ops::causal_conv1d::causal_conv1d_silu;
use crate::ops::matmul::Rows;
use crate::ops::rms_norm::{gate, gated_rms_norm};
use crate::ops::ssd::{discretize, ssd, SsdDims, SsdInputs, DEFAULT_BLOCK};
use crate::state::LayerState;
use crate::tensor::DType;
use anyhow::Result;

pub struct Mamba2 {
    pub(crate) in_proj: Linear,
    pub(crate) conv_w: Vec<f32>,
    pub(crate) conv_b: Option<Vec<f32>>,
    pub(crate) dt_bias: Vec<f32>,
    /// `A_h = −exp(A_log[h])`.
    pub(crate) a: Vec<f32>,
    pub(crate) d: Vec<f32>,
    pub(crate) norm_w: Vec<f32>,
    pub(crate) out_proj: Linear,
    pub(crate) dims: SsdDims,
    pub(crate) d_inner: usize,
    pub(crate) d_ssm: usize,
    pub(crate) d_mlp: usize,
    pub(crate) w: usize,
    pub(crate) eps: f32,
    pub(crate) dt_limit: (f32, f32),
    /// Keeps the SSM state in bf16 (bf16 and int8 weights): a decode step reads and writes half
    /// the state bytes.
    pub(crate) state_bf16: bool,
}

impl Mamba2 {
    pub fn load(ck: &Checkpoint, p: &str, cfg: &Config, dtype: DType) -> Result<Mamba2> {
        let h = cfg.nheads();
        let d_shape = if cfg.d_has_hdim { cfg.d_ssm } else { h };
        let (conv_w, conv_b) = super::load_conv(ck, p, cfg, cfg.conv_dim())?;
        Ok(Mamba2 {
            in_proj: Linear::load(ck, &format!("{p}in_proj"), cfg.d_in_proj(), cfg.d_model, cfg.bias, dtype)?,
            conv_w,
            conv_b,
            dt_bias: ck.f32(&format!("{p}dt_bias"), &[h])?,
            a: ck.f32(&format!("{p}A_log"), &[h])?.iter().map(|x| -x.exp()).collect(),
            d: ck.f32(&format!("{p}D"), &[d_shape])?,
            norm_w: ck.f32(&format!("{p}norm.weight"), &[cfg.d_ssm])?,
            out_proj: Linear::load(ck, &format!("{p}out_proj"), cfg.d_model, cfg.d_inner, cfg.bias, dtype)?,
            dims: SsdDims {
                heads: h,
                headdim: cfg.headdim,
                groups: cfg.ngroups,
                d_state: cfg.d_state,
                block: cfg.chunk_size.min(DEFAULT_BLOCK),
            },
            d_inner: cfg.d_inner,
            d_ssm: cfg.d_ssm,
            d_mlp: cfg.d_mlp(),
            w: cfg.d_conv,
            eps: cfg.norm_eps,
            dt_limit: cfg.dt_limit,
            state_bf16: matches!(dtype, DType::BF16 | DType::I8),
        })
    }

    pub fn tensor_names(p: &str, cfg: &Config) -> Vec<String> {
        super::mixer_tensor_names(
            p,
            cfg,
            &["dt_bias", "A_log", "D", "in_proj.weight", "conv1d.weight", "norm.weight", "out_proj.weight"],
        )
    }

    pub fn weight_bytes(&self) -> usize {
        self.in_proj.w.bytes() + self.out_proj.w.bytes() + 4 * (self.conv_w.len() + self.norm_w.len() + self.d.len())
    }

    pub fn forward(&self, hs: &[f32], l: usize, states: &mut [&mut LayerState], out: &mut [f32]) {
        let SsdDims { heads, groups, d_state: n, .. } = self.dims;
        let (d_ssm, d_mlp) = (self.d_ssm, self.d_mlp);
        let conv_dim = d_ssm + 2 * groups * n;
        let w_in = self.in_proj.w.rows;
        let rows = states.len() * l;
        let kind = Rows::of(states.len(), l);
        let mut zx = vec![0.0f32; rows * w_in];
        self.in_proj.forward(hs, kind, &mut zx);
        // Column offsets inside in_proj's output.
        let (z_at, xbc_at, dt_at) = (2 * d_mlp, 2 * d_mlp + d_ssm, 2 * d_mlp + d_ssm + conv_dim);
        let mut xbc = vec![0.0f32; rows * conv_dim];
        let mut dt = vec![0.0f32; rows * heads];
        let mut da = vec![0.0f32; rows * heads];
        discretize(&zx[dt_at..], w_in, rows, &self.dt_bias, &self.a, self.dt_limit, &mut dt, &mut da);
        let mut y = vec![0.0f32; rows * d_ssm];
        for (s, st) in states.iter_mut().enumerate() {
            let (r0, c0) = (s * l, s * l * conv_dim);
            causal_conv1d_silu(
                &zx[r0 * w_in + xbc_at..],
                l,
                w_in,
                conv_dim,
                &self.conv_w,
                self.w,
                self.conv_b.as_deref(),
                &mut st.conv,
                &mut xbc[c0..],
            );
            let inp = SsdInputs {
                x: &xbc[c0..],
                x_rs: conv_dim,
                dt: &dt[r0 * heads..],
                da: &da[r0 * heads..],
                dt_rs: heads,
                b: &xbc[c0 + d_ssm..],
                c: &xbc[c0 + d_ssm + groups * n..],
                bc_rs: conv_dim,
                d: Some(&self.d),
            };
            let y = &mut y[r0 * d_ssm..];
            if self.state_bf16 {
                ssd(&inp, l, self.dims, st.ssm.bf16_mut(), y, d_ssm);
            } else {
                ssd(&inp, l, self.dims, st.ssm.f32_mut(), y, d_ssm);
            }
        }
        gated_rms_norm(&mut y, &zx[z_at..], w_in, &self.norm_w, d_ssm / groups, self.eps);
        if d_mlp == 0 {
            self.out_proj.forward(&y, kind, out);
        } else {
            let mut cat = vec![0.0f32; rows * self.d_inner];
            for r in 0..rows {
                let row = &mut cat[r * self.d_inner..(r + 1) * self.d_inner];
                row[..d_mlp].copy_from_slice(&zx[r * w_in + d_mlp..r * w_in + 2 * d_mlp]);
                gate(&mut row[..d_mlp], &zx[r * w_in..r * w_in + d_mlp]);
                row[d_mlp..].copy_from_slice(&y[r * d_ssm..(r + 1) * d_ssm]);
            }
            self.out_proj.forward(&cat, kind, out);
        }
    }
}
