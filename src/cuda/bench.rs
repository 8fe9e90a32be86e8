//! GPU benchmarks (`mamba-lm bench scan|decode|generate|memory --device cuda`), timed with
//! device events or after a device synchronisation, medians of repeated runs after warm-up, on
//! random data (never zeros: they can run faster than real data). `decode`'s headline figure
//! runs through `mamba-lm generate`'s own loop ([`crate::bench::generation_loop`]).

use super::model::{GpuModel, GpuRun};
use super::ops::{scan_workspace, selective_scan, ScanParams};
use super::{err, Gpu};
use crate::bench::{generation_loop, median, Figure};
use crate::config::Config;
use crate::init::random_model;
use crate::tensor::DType;
use anyhow::Result;
use cudarc::driver::{sys::CUevent_flags, CudaGraph, CudaSlice};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

#[allow(clippy::too_many_arguments)]
fn fig(
    bench: &str,
    model: &str,
    dtype: DType,
    batch: usize,
    length: usize,
    figure: &str,
    value: f64,
    unit: &str,
) -> Figure {
    Figure {
        bench: bench.into(),
        model: model.into(),
        dtype: dtype.to_string(),
        batch,
        length,
        figure: figure.into(),
        value,
        unit: unit.into(),
    }
}

/// Mean device time of one graph of `graphs`, replayed round-robin `reps` times each (at least
/// 64 replays) between two events.
fn time_replays_ms(gpu: &Gpu, graphs: &[CudaGraph], reps: usize) -> Result<f64> {
    let ev = || gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(err);
    let (a, b) = (ev()?, ev()?);
    let n = (reps * graphs.len()).max(64);
    graphs.iter().try_for_each(|g| g.launch().map_err(err))?;
    a.record(&gpu.stream).map_err(err)?;
    for i in 0..n {
        graphs[i % graphs.len()].launch().map_err(err)?;
    }
    b.record(&gpu.stream).map_err(err)?;
    b.synchronize().map_err(err)?;
    Ok(a.elapsed_ms(&b).map_err(err)? as f64 / n as f64)
}

/// `len` random bf16 values in [−1, 1) on the device: a random block tiled (drawing every value
/// on the host would take longer than the benchmark).
fn random_bf16(gpu: &Gpu, len: usize, rng: &mut StdRng, scale: f32) -> Result<CudaSlice<u16>> {
    let block: Vec<u16> =
        (0..len.min(1 << 20)).map(|_| bf16::from_f32(scale * rng.random_range(-1.0f32..1.0)).to_bits()).collect();
    let mut out = gpu.alloc::<u16>(len)?;
    let src = gpu.upload(&block)?;
    for start in (0..len).step_by(block.len()) {
        let n = block.len().min(len - start);
        gpu.stream.memcpy_dtod(&src.slice(..n), &mut out.slice_mut(start..start + n)).map_err(err)?;
    }
    Ok(out)
}

/// The selective scan alone (Mamba-1's fused kernel): D channels, N states, batch 1, bf16 inputs,
/// for each length; time and the HBM rate it reaches on the bytes it must move.
pub fn scan(gpu: &Gpu, d: usize, n: usize, lengths: &[usize], reps: usize) -> Result<Vec<Figure>> {
    let mut rng = StdRng::seed_from_u64(1);
    let mut figs = Vec::new();
    let model = format!("scan-d{d}-n{n}");
    // S4D-real A = −(1..N) per channel, δ bias from the official init range.
    let a2: Vec<f32> = (0..n * d).map(|i| -((i / d + 1) as f32) * std::f32::consts::LOG2_E).collect();
    let bias: Vec<f32> = (0..d).map(|_| (rng.random_range(0.001f32..0.1)).exp_m1().ln()).collect();
    let dvec: Vec<f32> = vec![1.0; d];
    let (a2, bias, dvec) = (gpu.upload(&a2)?, gpu.upload(&bias)?, gpu.upload(&dvec)?);
    for &l in lengths {
        // Inputs: several sets when one fits in L2, so the timing is of HBM, not cache.
        let set_bytes = l * (3 * d + 2 * n) * 2;
        let sets = (256usize << 20).div_ceil(set_bytes).clamp(1, 8);
        let inputs = (0..sets)
            .map(|_| {
                Ok((
                    random_bf16(gpu, l * d, &mut rng, 1.0)?,
                    random_bf16(gpu, l * d, &mut rng, 1.0)?,
                    random_bf16(gpu, l * d, &mut rng, 1.0)?,
                    random_bf16(gpu, l * n, &mut rng, 1.0)?,
                    random_bf16(gpu, l * n, &mut rng, 1.0)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let y = gpu.alloc::<u16>(l * d)?;
        let mut state = gpu.alloc::<f32>(n * d)?;
        gpu.stream.memset_zeros(&mut state).map_err(err)?;
        let work = gpu.alloc::<f32>(scan_workspace(1, d, n, l))?;
        let scan = |i: usize| {
            let (u, dt, z, b, c) = &inputs[i];
            let mut p = ScanParams {
                u: gpu.ptr(u),
                dt: gpu.ptr(dt),
                dt_bias: gpu.ptr(&bias),
                a2: gpu.ptr(&a2),
                b: gpu.ptr(b),
                c: gpu.ptr(c),
                d: gpu.ptr(&dvec),
                z: gpu.ptr(z),
                state: gpu.ptr(&state),
                y: gpu.ptr(&y),
                state_stride: (n * d) as i64,
                u_rs: d as i32,
                dt_rs: d as i32,
                dt_div: 1,
                a_ns: d as i32,
                a_div: 1,
                bc_rs: n as i32,
                g_ch: d as i32,
                d_div: 1,
                z_rs: d as i32,
                p_blk: d as i32,
                y_rs: d as i32,
                l: l as i32,
                e: d as i32,
                n: n as i32,
                dt_min: 0.0,
                dt_max: f32::INFINITY,
                ..Default::default()
            };
            selective_scan(gpu, DType::BF16, &mut p, 1, false, gpu.ptr(&work))
        };
        // As the official figures: CUDA graphs replayed back to back, so short scans are not
        // timed as the host's launch latency. One graph per input set (run once first, which
        // loads the kernels).
        let graphs = (0..sets)
            .map(|i| {
                scan(i)?;
                gpu.capture(|| scan(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let ms = time_replays_ms(gpu, &graphs, reps)?;
        let bytes = (l * (4 * d + 2 * n) * 2) as f64; // u, δ, z, B, C read; y written
        figs.push(fig("scan", &model, DType::BF16, 1, l, "scan_fwd_ms", ms, "ms"));
        figs.push(fig("scan", &model, DType::BF16, 1, l, "scan_gb_s", bytes / ms / 1e6, "GB/s"));
    }
    Ok(figs)
}

/// A preset with random weights (official init) on the GPU.
pub fn preset_model(gpu: Gpu, preset: &str, dtype: DType) -> Result<GpuModel> {
    let cfg = Config::preset(preset)?;
    GpuModel::new(gpu, &random_model(&cfg, 0, dtype)?)
}

fn prompt(len: usize, seed: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + seed * 104729 + 13) % vocab) as u32).collect()
}

/// Batch-1 latency: the first token after a `prompt_len`-token prompt (prefill + argmax, host to
/// host); per-token decode through `mamba-lm generate`'s loop (wall time, host work included);
/// and the decode step alone through the [`Decoder`](super::model::Decoder), fed on the device,
/// and with the host reading every token.
pub fn decode(m: &GpuModel, name: &str, prompt_len: usize, gen: usize, reps: usize) -> Result<Vec<Figure>> {
    let v = m.cfg.vocab_size;
    let mut st = m.new_states(1)?;
    let ids = prompt(prompt_len, 0, v);
    let mut first = Vec::new();
    for _ in 0..reps.max(1) + 1 {
        m.zero_states(&mut st)?;
        m.gpu.sync()?;
        let t = Instant::now();
        let logits = m.run(&ids, prompt_len, &st, 0, 1)?;
        let _tok = crate::sampling::argmax(&logits[..v]);
        first.push(t.elapsed().as_secs_f64() * 1e3);
    }
    first.remove(0); // the first run allocates buffers
    let mut through_loop = Vec::new();
    for _ in 0..reps.max(1) {
        through_loop.push(generation_loop(&mut GpuRun::new(m), &ids, gen)?.decode_ms_per_token);
    }
    let mut dec = m.decoder(&st, st.seqs, v)?;
    dec.step(&[1])?;
    let mut device_fed = Vec::new();
    let mut host_read = Vec::new();
    for _ in 0..reps.max(1) {
        m.gpu.sync()?;
        let t = Instant::now();
        for _ in 0..gen {
            dec.step_greedy()?;
        }
        m.gpu.sync()?;
        device_fed.push(t.elapsed().as_secs_f64() * 1e3 / gen as f64);
        let t = Instant::now();
        for _ in 0..gen {
            dec.step_greedy()?;
            let _ = dec.argmax()?;
        }
        host_read.push(t.elapsed().as_secs_f64() * 1e3 / gen as f64);
    }
    let (dt, per) = (m.dtype, median(device_fed));
    Ok(vec![
        fig("decode", name, dt, 1, prompt_len, "first_token_ms", median(first), "ms"),
        fig("decode", name, dt, 1, gen, "decode_ms_per_token", median(through_loop), "ms"),
        fig("decode", name, dt, 1, gen, "decode_ms_per_token_device_fed", per, "ms"),
        fig("decode", name, dt, 1, gen, "decode_ms_per_token_host_read", median(host_read), "ms"),
        fig("decode", name, dt, 1, gen, "decode_weight_gb_s", m.weight_bytes() as f64 / per / 1e6, "GB/s"),
    ])
}

/// Generation throughput as in the Mamba paper's Appendix E.5: `batch` prompts of `prompt_len`
/// tokens, then `gen` greedy tokens each; tokens/s = batch·gen / total time (prefill included).
/// Also the two parts of that time: the prefill (to the first token on the host) and a decode
/// step.
pub fn generate(
    m: &GpuModel,
    name: &str,
    batches: &[usize],
    prompt_len: usize,
    gen: usize,
    reps: usize,
) -> Result<Vec<Figure>> {
    let v = m.cfg.vocab_size;
    let vp = m.cfg.vocab_padded;
    let mut figs = Vec::new();
    for &b in batches {
        let mut st = m.new_states(b)?;
        let mut dec = m.decoder(&st, st.seqs, v)?;
        let ids: Vec<u32> = (0..b).flat_map(|s| prompt(prompt_len, s, v)).collect();
        let (mut times, mut prefills) = (Vec::new(), Vec::new());
        for _ in 0..reps.max(1) + 1 {
            m.zero_states(&mut st)?;
            m.gpu.sync()?;
            let t = Instant::now();
            let logits = m.run(&ids, prompt_len, &st, 0, 1)?;
            let next: Vec<u32> = (0..b).map(|s| crate::sampling::argmax(&logits[s * vp..s * vp + v]) as u32).collect();
            prefills.push(t.elapsed().as_secs_f64());
            dec.step(&next)?;
            for _ in 1..gen {
                dec.step_greedy()?;
            }
            let _ = dec.argmax()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0);
        prefills.remove(0);
        let steps: Vec<f64> = times.iter().zip(&prefills).map(|(t, p)| (t - p) / gen as f64).collect();
        let s = median(times);
        figs.push(fig("generate", name, m.dtype, b, prompt_len + gen, "tokens_per_s", (b * gen) as f64 / s, "tok/s"));
        figs.push(fig(
            "generate",
            name,
            m.dtype,
            b,
            prompt_len,
            "prefill_tokens_per_s_incl",
            (b * prompt_len) as f64 / s,
            "tok/s",
        ));
        figs.push(fig("generate", name, m.dtype, b, prompt_len, "prefill_s", median(prefills), "s"));
        figs.push(fig("generate", name, m.dtype, b, gen, "decode_ms_per_step", median(steps) * 1e3, "ms"));
    }
    Ok(figs)
}

/// Prefill rate at batch 1 for a `len`-token prompt (host to host, logits of the last position).
pub fn prefill(m: &GpuModel, name: &str, len: usize, reps: usize) -> Result<Vec<Figure>> {
    let st = m.new_states(1)?;
    let ids = prompt(len, 0, m.cfg.vocab_size);
    let mut times = Vec::new();
    for _ in 0..reps.max(1) + 1 {
        m.gpu.sync()?;
        let t = Instant::now();
        m.run(&ids, len, &st, 0, 1)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.remove(0);
    Ok(vec![fig("prefill", name, m.dtype, 1, len, "prefill_tok_s", len as f64 / median(times), "tok/s")])
}

/// Device memory in use (MiB) for generation: after the weights, and after decoding `gen` tokens
/// for each batch — it must not grow with the tokens generated (the state is constant-size).
pub fn memory(m: &GpuModel, name: &str, batches: &[usize], gens: &[usize]) -> Result<Vec<Figure>> {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let used = || -> Result<usize> {
        m.gpu.sync()?;
        let (free, total) = m.gpu.mem_info()?;
        Ok(total - free)
    };
    let base = used()?;
    let mut figs = vec![
        fig("memory", name, m.dtype, 0, 0, "weights_mib", mib(m.weight_bytes()), "MiB"),
        fig("memory", name, m.dtype, 0, 0, "device_used_after_load_mib", mib(base), "MiB"),
        fig("memory", name, m.dtype, 1, 0, "state_per_sequence_mib", mib(m.state_bytes()), "MiB"),
    ];
    for &b in batches {
        let st = m.new_states(b)?;
        let mut dec = m.decoder(&st, st.seqs, m.cfg.vocab_size)?;
        dec.step(&vec![1; b])?;
        let mut done = 1;
        for &g in gens {
            while done < g {
                dec.step_greedy()?;
                done += 1;
            }
            figs.push(fig("memory", name, m.dtype, b, g, "device_used_mib", mib(used()?), "MiB"));
        }
    }
    Ok(figs)
}
