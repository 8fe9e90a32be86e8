//! The whole model's training step on the CPU, f32: embedding → layers → final norm → the LM
//! head's fused cross-entropy, then the backward in reverse. The forward keeps each layer's
//! input and its mixer's activations ([`Activations`], allocated once per batch shape); the
//! backward runs through one set of gradient scratch buffers.

use super::params::{LayerParams, Layout};
use super::{mamba1, mamba2};
use crate::ops::cross_entropy::{head_loss_backward, HeadGrads, IGNORE};
use crate::ops::matmul::{gemm_views, View};
use crate::ops::rms_norm::{rms_norm, rms_norm_backward};
use anyhow::{bail, Result};
use std::ops::Range;

/// A gradient buffer in a [`Layout`], handed out one tensor at a time.
pub struct Grads<'a>(pub &'a mut [f32]);

impl Grads<'_> {
    pub fn at(&mut self, r: &Range<usize>) -> &mut [f32] {
        &mut self.0[r.clone()]
    }
}

pub(super) fn add_to(acc: &mut [f32], v: &[f32]) {
    acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
}

/// `y = x·Wᵀ` for `rows` rows (`x` rows `x_rs` apart, `W` of `out × inp`, `y` rows `y_rs` apart).
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(
    x: &[f32],
    x_rs: usize,
    rows: usize,
    w: &[f32],
    out: usize,
    inp: usize,
    y: &mut [f32],
    y_rs: usize,
) {
    gemm_views(rows, out, inp, y, y_rs, View::rows(x, x_rs), View::t(w, inp), false);
}

/// Where [`linear_backward`] puts `g_x = g_y·W`: rows `rs` apart, written or added to.
pub(super) struct GradX<'a> {
    buf: &'a mut [f32],
    rs: usize,
    add: bool,
}

impl<'a> GradX<'a> {
    pub fn write(buf: &'a mut [f32], rs: usize) -> Self {
        GradX { buf, rs, add: false }
    }

    pub fn add(buf: &'a mut [f32], rs: usize) -> Self {
        GradX { buf, rs, add: true }
    }
}

/// Backward of [`linear`]: puts `g_x = g_y·W` where `g_x` says and adds `g_yᵀ·x` to `g_w`.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_backward(
    x: &[f32],
    x_rs: usize,
    g_y: &[f32],
    gy_rs: usize,
    rows: usize,
    w: &[f32],
    out: usize,
    inp: usize,
    g_x: GradX,
    g_w: &mut [f32],
) {
    gemm_views(rows, inp, out, g_x.buf, g_x.rs, View::rows(g_y, gy_rs), View::rows(w, inp), g_x.add);
    gemm_views(out, inp, rows, g_w, inp, View::t(g_y, gy_rs), View::rows(x, x_rs), true);
}

enum MixerActs {
    M1(mamba1::Acts),
    M2(mamba2::Acts),
}

enum MixerScratch {
    M1(mamba1::Scratch),
    M2(mamba2::Scratch),
}

/// What the forward keeps for the backward, for `seqs` sequences of `len` positions
/// (R = seqs·len rows), and the backward's scratch. With `recompute` only each layer's input
/// is kept and one set of the rest serves every layer: the backward recomputes the layer's
/// norm and mixer forward from its input first (one more forward in all, a layer's
/// activations instead of the model's).
pub struct Activations {
    pub seqs: usize,
    pub len: usize,
    pub recompute: bool,
    resid: Vec<Vec<f32>>,   // per layer (R, D): the layer's input
    h: Vec<Vec<f32>>,       // per layer, or one with recompute (R, D): the normed input
    mixers: Vec<MixerActs>, // per layer, or one with recompute
    inputs: Vec<u32>,       // (R) the fed tokens
    targets: Vec<u32>,      // (R) the tokens they predict
    resid_f: Vec<f32>,      // (R, D) the last layer's output
    h_f: Vec<f32>,          // (R, D) after the final norm: the LM head's input
    g_resid: Vec<f32>,      // (R, D)
    g_h: Vec<f32>,          // (R, D)
    scratch: MixerScratch,
}

impl Activations {
    pub fn new(layout: &Layout, seqs: usize, len: usize, recompute: bool) -> Activations {
        let cfg = &layout.cfg;
        let rows = seqs * len;
        let z = || vec![0.0f32; rows * cfg.d_model];
        let kept = if recompute { 1 } else { cfg.n_layer };
        let mixers = layout
            .layers
            .iter()
            .take(kept)
            .map(|l| match l {
                LayerParams::M1(_) => MixerActs::M1(mamba1::Acts::new(cfg, rows)),
                LayerParams::M2(_) => MixerActs::M2(mamba2::Acts::new(cfg, rows)),
            })
            .collect();
        let scratch = match layout.layers.first() {
            Some(LayerParams::M2(_)) => MixerScratch::M2(mamba2::Scratch::new(cfg, rows)),
            _ => MixerScratch::M1(mamba1::Scratch::new(cfg, seqs, len)),
        };
        Activations {
            seqs,
            len,
            recompute,
            resid: (0..cfg.n_layer).map(|_| z()).collect(),
            h: (0..kept).map(|_| z()).collect(),
            mixers,
            inputs: vec![],
            targets: vec![],
            resid_f: z(),
            h_f: z(),
            g_resid: z(),
            g_h: z(),
            scratch,
        }
    }
}

/// The rows of `seqs` sequences of `len + 1` tokens (row-major) as inputs (positions
/// `0..len`) and the targets they predict (`1..=len`).
pub fn shifted(tokens: &[u32], seqs: usize, len: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    if tokens.len() != seqs * (len + 1) {
        bail!("training step: {} tokens for {seqs} rows of {}", tokens.len(), len + 1);
    }
    Ok((0..seqs)
        .flat_map(|s| (0..len).map(move |t| (tokens[s * (len + 1) + t], tokens[s * (len + 1) + t + 1])))
        .unzip())
}

/// The forward over `acts.seqs` sequences of `acts.len` `inputs` (row-major), each position
/// predicting its `targets` entry ([`IGNORE`]: not graded). Keeps in `acts` what [`backward`]
/// needs.
pub fn forward(
    layout: &Layout,
    params: &[f32],
    acts: &mut Activations,
    inputs: Vec<u32>,
    targets: Vec<u32>,
) -> Result<()> {
    let cfg = &layout.cfg;
    let (seqs, len, dm) = (acts.seqs, acts.len, cfg.d_model);
    check_tokens(layout, seqs, len, &inputs, &targets)?;
    assert!(params.len() == layout.len);
    (acts.inputs, acts.targets) = (inputs, targets);
    let emb = &params[layout.embedding.clone()];
    let mut x = std::mem::take(&mut acts.resid_f);
    for (r, &t) in acts.inputs.iter().enumerate() {
        x[r * dm..(r + 1) * dm].copy_from_slice(&emb[t as usize * dm..(t as usize + 1) * dm]);
    }
    let mut out = vec![0.0f32; seqs * len * dm];
    for i in 0..layout.layers.len() {
        acts.resid[i].copy_from_slice(&x);
        layer_forward(layout, params, acts, i, &mut out);
        add_to(&mut x, &out);
    }
    acts.resid_f = x;
    rms_norm(&acts.resid_f, &params[layout.norm_f.clone()], cfg.norm_eps, &mut acts.h_f);
    Ok(())
}

/// Checks a step's tokens: `seqs × len` inputs and targets, each in the vocabulary (a target
/// may be [`IGNORE`]).
pub fn check_tokens(layout: &Layout, seqs: usize, len: usize, inputs: &[u32], targets: &[u32]) -> Result<()> {
    let v = layout.cfg.vocab_padded;
    if inputs.len() != seqs * len || targets.len() != inputs.len() {
        bail!("training step: {} inputs and {} targets for {seqs} rows of {len}", inputs.len(), targets.len());
    }
    if let Some(&t) = inputs.iter().chain(targets.iter().filter(|&&t| t != IGNORE)).find(|&&t| t as usize >= v) {
        bail!("token id {t} is out of range: the model's vocabulary has {v} entries");
    }
    Ok(())
}

/// Layer `i`'s norm and mixer from its kept input into the layer's (or the shared) slot;
/// the mixer's output goes to `out`.
fn layer_forward(layout: &Layout, params: &[f32], acts: &mut Activations, i: usize, out: &mut [f32]) {
    let (cfg, lp, k) = (&layout.cfg, &layout.layers[i], acts.slot(i));
    let (seqs, len) = (acts.seqs, acts.len);
    rms_norm(&acts.resid[i], &params[lp.norm().clone()], cfg.norm_eps, &mut acts.h[k]);
    match (lp, &mut acts.mixers[k]) {
        (LayerParams::M1(p), MixerActs::M1(a)) => mamba1::forward(cfg, params, p, seqs, len, &acts.h[k], a, out),
        (LayerParams::M2(p), MixerActs::M2(a)) => mamba2::forward(cfg, params, p, seqs, len, &acts.h[k], a, out),
        _ => unreachable!("activations are made from the layout"),
    }
}

impl Activations {
    /// Where layer `i`'s activations live.
    fn slot(&self, i: usize) -> usize {
        if self.recompute {
            0
        } else {
            i
        }
    }
}

/// The LM head's loss after [`forward`] and the whole backward: adds `scale` times the
/// gradient of the summed next-token cross-entropy (over the padded vocabulary) to `grads` and
/// returns that sum (f64). `scale = 1 / (number of predicted positions)` makes it the mean's.
pub fn backward(layout: &Layout, params: &[f32], grads: &mut [f32], acts: &mut Activations, scale: f32) -> f64 {
    let cfg = &layout.cfg;
    let (seqs, len, dm, v) = (acts.seqs, acts.len, cfg.d_model, cfg.vocab_padded);
    assert!(grads.len() == layout.len);
    let mut g = Grads(grads);
    let grads = HeadGrads { scale, g_h: &mut acts.g_h, g_w: g.at(&layout.lm_head) };
    let loss = head_loss_backward(&acts.h_f, &params[layout.lm_head.clone()], v, &acts.targets, Some(grads));
    acts.g_resid.fill(0.0);
    let mut g_norm = vec![0.0f32; dm];
    rms_norm_backward(
        &acts.resid_f,
        &params[layout.norm_f.clone()],
        cfg.norm_eps,
        &acts.g_h,
        &mut acts.g_resid,
        &mut g_norm,
    );
    add_to(g.at(&layout.norm_f), &g_norm);
    let mut out = if acts.recompute { vec![0.0f32; seqs * len * dm] } else { vec![] };
    for (i, lp) in layout.layers.iter().enumerate().rev() {
        if acts.recompute {
            layer_forward(layout, params, acts, i, &mut out);
        }
        let k = acts.slot(i);
        // The residual stream's gradient passes the block unchanged and also feeds the mixer.
        match (lp, &acts.mixers[k], &mut acts.scratch) {
            (LayerParams::M1(p), MixerActs::M1(a), MixerScratch::M1(sc)) => {
                mamba1::backward(cfg, params, p, &mut g, seqs, len, &acts.h[k], a, sc, &acts.g_resid, &mut acts.g_h)
            }
            (LayerParams::M2(p), MixerActs::M2(a), MixerScratch::M2(sc)) => {
                mamba2::backward(cfg, params, p, &mut g, seqs, len, &acts.h[k], a, sc, &acts.g_resid, &mut acts.g_h)
            }
            _ => unreachable!("activations are made from the layout"),
        }
        let norm = lp.norm();
        g_norm.fill(0.0);
        rms_norm_backward(
            &acts.resid[i],
            &params[norm.clone()],
            cfg.norm_eps,
            &acts.g_h,
            &mut acts.g_resid,
            &mut g_norm,
        );
        add_to(g.at(norm), &g_norm);
    }
    let g_emb = g.at(&layout.embedding);
    for (r, &t) in acts.inputs.iter().enumerate() {
        add_to(&mut g_emb[t as usize * dm..(t as usize + 1) * dm], &acts.g_resid[r * dm..(r + 1) * dm]);
    }
    loss
}

/// [`forward`] of `tokens` ([`shifted`]) then [`backward`].
pub fn forward_backward(
    layout: &Layout,
    params: &[f32],
    grads: &mut [f32],
    acts: &mut Activations,
    tokens: &[u32],
    scale: f32,
) -> Result<f64> {
    let (inputs, targets) = shifted(tokens, acts.seqs, acts.len)?;
    forward(layout, params, acts, inputs, targets)?;
    Ok(backward(layout, params, grads, acts, scale))
}

/// After [`forward`], the summed cross-entropy of the graded positions (the LM head's fused
/// loss, no gradients).
pub fn graded_loss(layout: &Layout, params: &[f32], acts: &Activations) -> f64 {
    head_loss_backward(&acts.h_f, &params[layout.lm_head.clone()], layout.cfg.vocab_padded, &acts.targets, None)
}

/// After [`forward`], for each graded position in order whether its most likely token is the
/// target.
pub fn hits(layout: &Layout, params: &[f32], acts: &Activations) -> Vec<bool> {
    let (v, dm) = (layout.cfg.vocab_padded, layout.cfg.d_model);
    let graded: Vec<usize> = (0..acts.targets.len()).filter(|&r| acts.targets[r] != IGNORE).collect();
    let mut rows = vec![0.0f32; graded.len() * dm];
    for (k, &r) in graded.iter().enumerate() {
        rows[k * dm..(k + 1) * dm].copy_from_slice(&acts.h_f[r * dm..(r + 1) * dm]);
    }
    let mut logits = vec![0.0f32; graded.len() * v];
    linear(&rows, dm, graded.len(), &params[layout.lm_head.clone()], v, dm, &mut logits, v);
    graded.iter().zip(logits.chunks(v)).map(|(&r, z)| crate::sampling::argmax(z) as u32 == acts.targets[r]).collect()
}

/// The summed next-token cross-entropy of `tokens` (rows of `acts.len + 1`), no backward.
pub fn loss(layout: &Layout, params: &[f32], acts: &mut Activations, tokens: &[u32]) -> Result<f64> {
    let (inputs, targets) = shifted(tokens, acts.seqs, acts.len)?;
    forward(layout, params, acts, inputs, targets)?;
    Ok(graded_loss(layout, params, acts))
}

/// The positions `rows` predict (each row's length less one), checking every row has one.
pub fn predicted(rows: &[Vec<u32>]) -> Result<usize> {
    if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() < 2) {
        bail!("sequence {i} has {} token(s): a gradient needs at least 2", r.len());
    }
    Ok(rows.iter().map(|r| r.len() - 1).sum())
}

/// The gradient of the mean next-token cross-entropy over every position of every row of
/// `rows` (rows of any lengths ≥ 2, each run as a batch of one), f32 in `layout`, and each
/// row's summed loss. `on_row(tokens)` is called after each row.
pub fn gradients(
    layout: &Layout,
    params: &[f32],
    rows: &[Vec<u32>],
    mut on_row: impl FnMut(usize),
) -> Result<(Vec<f64>, Vec<f32>)> {
    let count = predicted(rows)?;
    let mut grads = vec![0.0f32; layout.len];
    let mut losses = Vec::with_capacity(rows.len());
    for r in rows {
        let mut acts = Activations::new(layout, 1, r.len() - 1, false);
        losses.push(forward_backward(layout, params, &mut grads, &mut acts, r, 1.0 / count as f32)?);
        on_row(r.len());
    }
    Ok((losses, grads))
}
