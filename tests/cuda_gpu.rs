//! The CUDA backend against the fixtures and the CPU. These need a GPU, so they are ignored in
//! CI (which has none) and run on the GPU machine by scripts/gpu_check_and_bench.sh with
//! `--include-ignored`.
#![cfg(feature = "cuda")]

mod common;
use common::*;
use mamba_lm::backend::{Backend, Cpu};
use mamba_lm::config::Config;
use mamba_lm::cuda::model::{GpuModel, GpuRun};
use mamba_lm::cuda::Gpu;
use mamba_lm::generate::{generate_on, Control, GenerateOptions, Start};
use mamba_lm::init::random_model;
use mamba_lm::sampling::Sampling;
use mamba_lm::state::State;
use mamba_lm::tensor::{DType, Store};
use mamba_lm::Model;

fn gpu_model(m: &Model) -> GpuModel {
    GpuModel::new(Gpu::open(0).expect("a GPU"), m).unwrap_or_else(|e| panic!("{e:#}"))
}

fn load(name: &str, dtype: DType) -> Model {
    Model::load_dir(&fixture(name), dtype).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

#[test]
#[ignore = "needs a GPU"]
fn fixtures_f32_prefill_recurrent_and_chunked() {
    for name in FIXTURES {
        let g = gpu_model(&load(name, DType::F32));
        let e = expected(name);
        for chunk in [1, 5, 13, 1024] {
            let (l, nll) = scored_logits(&mut GpuRun::new(&g), &e.ids, chunk);
            let err = rel_l2(&l, &e.logits);
            println!("{name} f32 chunk {chunk}: rel L2 {err:.2e}");
            assert!(err <= 1e-4, "{name}: chunk {chunk}: rel L2 {err:e}");
            // The cross-entropy computed on the device (score without --logits-out).
            let fused = fused_nll(&mut GpuRun::new(&g), &e.ids, chunk);
            for ((a, f), b) in nll.iter().zip(&fused).zip(&e.nll) {
                assert!((a - b).abs() <= 1e-4, "{name}: chunk {chunk}: nll {a} vs {b}");
                assert!((f - b).abs() <= 1e-4, "{name}: chunk {chunk}: device nll {f} vs {b}");
            }
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn fixtures_bf16_and_f16() {
    for name in FIXTURES {
        for dtype in [DType::BF16, DType::F16] {
            let g = gpu_model(&load(name, dtype));
            let e = expected(name);
            for chunk in [1, 1024] {
                let (l, _) = scored_logits(&mut GpuRun::new(&g), &e.ids, chunk);
                let err = rel_l2(&l, &e.logits);
                println!("{name} {dtype} chunk {chunk}: rel L2 {err:.2e}");
                assert!(err <= 2e-2, "{name} {dtype}: chunk {chunk}: rel L2 {err:e}");
            }
        }
    }
}

/// Fresh starts from `prompts`.
fn starts(prompts: &[Vec<u32>]) -> Vec<Start> {
    prompts.iter().map(|p| Start { prompt: p.clone(), resume: None }).collect()
}

#[test]
#[ignore = "needs a GPU"]
fn fixtures_greedy_tokens_identical() {
    for name in FIXTURES {
        let m = load(name, DType::F32);
        let g = gpu_model(&m);
        let e = expected(name);
        let opts = e.greedy_options(m.cfg.vocab_padded);
        // Alone (the persistent step kernel), then beside two shorter prompts (the batch graph;
        // an odd batch leaves the batched scan step's last block half past the batch).
        let short = e.greedy_prompt[..e.greedy_prompt.len() - 3].to_vec();
        let one = e.greedy_prompt[..1].to_vec();
        for prompts in [vec![e.greedy_prompt.clone()], vec![e.greedy_prompt.clone(), short, one]] {
            let out = generate_on(&mut GpuRun::new(&g), starts(&prompts), &opts, |_, _| Control::Continue).unwrap();
            assert_eq!(out[0].new_ids, e.greedy_new, "{name}: greedy tokens");
            // The session the GPU hands back continues on the CPU exactly as the CPU's own would.
            let cpu = generate_on(&mut Cpu::new(&m), starts(&prompts), &opts, |_, _| Control::Continue).unwrap();
            for (o, c) in out.iter().zip(&cpu) {
                assert_eq!(o.new_ids, c.new_ids, "{name}: greedy tokens of a batch");
                let (os, cs) = (o.snapshot.as_ref().unwrap(), c.snapshot.as_ref().unwrap());
                let (a, b) = (os.state.host().unwrap(), cs.state.host().unwrap());
                assert_eq!(a.pos, b.pos);
                for (la, lb) in a.layers.iter().zip(&b.layers) {
                    let (sa, sb) = (la.ssm.to_f32(), lb.ssm.to_f32());
                    let d = sa.iter().zip(sb.iter()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                    assert!(d <= 1e-4, "{name}: final state differs by {d}");
                }
                let want: Vec<f64> = cs.next_logits.iter().map(|&x| x as f64).collect();
                let err = rel_l2(&os.next_logits, &want);
                assert!(err <= 1e-4, "{name}: the session's next logits differ by {err:e}");
            }
        }
    }
}

/// Jobs joining and leaving the GPU's slots (decode steps of 1, 2 and 4 slots, prefilling
/// slots kept through steps) get the tokens each gets alone on the CPU.
#[test]
#[ignore = "needs a GPU"]
fn fixtures_staggered_jobs_match_each_alone() {
    for name in FIXTURES {
        let m = load(name, DType::F32);
        let g = gpu_model(&m);
        staggered_jobs_equal_each_alone(&mut GpuRun::new(&g), &m);
    }
}

/// A state kept in device memory is a copy, not the slot: put back in another slot after its
/// own slot moved on, it continues exactly as the same state through the host does.
#[test]
#[ignore = "needs a GPU"]
fn device_kept_states_continue_as_host_states() {
    use mamba_lm::Kept;
    for name in FIXTURES {
        let m = load(name, DType::F32);
        let g = gpu_model(&m);
        let mut run = GpuRun::new(&g);
        run.begin(vec![State::new(&m.cfg); 3]).unwrap();
        let (prompt, more) = ([5, 7, 11, 13, 17, 19], [23, 29, 31]);
        run.forward(&prompt, prompt.len(), &[0], 1).unwrap();
        let kept = run.keep(0).unwrap();
        assert!(matches!(kept, Kept::Device { pos: 6, .. }), "{name}: the GPU keeps states on the device");
        let host = run.state(0).unwrap();
        run.forward(&more, more.len(), &[0], 1).unwrap();
        run.set_state(1, kept).unwrap();
        run.set_state(2, Kept::Host(host.clone())).unwrap();
        let a = run.forward(&more, more.len(), &[1], more.len()).unwrap();
        let b = run.forward(&more, more.len(), &[2], more.len()).unwrap();
        assert_eq!(a, b, "{name}: logits after a device-kept state");
        assert_eq!(run.state(1).unwrap(), run.state(2).unwrap(), "{name}: states after a device-kept state");
        assert_eq!(run.state(1).unwrap().pos, host.pos + more.len() as u64);
    }
}

/// Every sampler on the GPU draws the same tokens as the CPU from the same seed: both walk the
/// kept tokens in the same order with the same uniform numbers.
fn sampling_rules() -> Vec<Sampling> {
    let s = Sampling::default();
    vec![
        Sampling { temperature: 0.8, top_k: 0, ..s },
        Sampling { temperature: 1.2, top_k: 0, min_p: 0.05, ..s },
        Sampling { temperature: 1.0, top_k: 20, top_p: 0.9, ..s },
        Sampling { temperature: 0.7, top_k: 40, ..s },
        Sampling { temperature: 1.0, top_k: 0, top_p: 0.6, ..s },
        Sampling { temperature: 1.0, top_k: 0, top_p: 0.8, min_p: 0.1, ..s },
        Sampling { repetition_penalty: 1.3, ..s },
        Sampling { temperature: 0.9, top_k: 40, top_p: 0.95, repetition_penalty: 1.2, ..s },
        Sampling { temperature: 1.1, top_k: 0, repetition_penalty: 0.8, ..s },
    ]
}

#[test]
#[ignore = "needs a GPU"]
fn fixtures_sampled_tokens_match_the_cpu() {
    let rules = sampling_rules();
    for name in FIXTURES {
        let m = load(name, DType::F32);
        let g = gpu_model(&m);
        let e = expected(name);
        let short = e.greedy_prompt[..e.greedy_prompt.len() - 3].to_vec();
        let prompts = [e.greedy_prompt.clone(), short];
        for sampling in &rules {
            let opts = GenerateOptions { sampling: sampling.clone(), seed: 3, ..e.greedy_options(m.cfg.vocab_padded) };
            let gpu = generate_on(&mut GpuRun::new(&g), starts(&prompts), &opts, |_, _| Control::Continue).unwrap();
            let cpu = generate_on(&mut Cpu::new(&m), starts(&prompts), &opts, |_, _| Control::Continue).unwrap();
            for (a, b) in gpu.iter().zip(&cpu) {
                assert_eq!(a.new_ids, b.new_ids, "{name} {sampling:?}: sampled tokens");
            }
        }
    }
}

/// Random 130M-size models: bf16 on the GPU against the CPU in f32 on the same (bf16-rounded)
/// weights, 2 sequences of 200 tokens, prefill and then 8 recurrent steps. Also 2 layers of a
/// Mamba-1 240 channels wide, so the batched decode step's scan (128 channels a block) ends in
/// a partial block.
#[test]
#[ignore = "needs a GPU"]
fn gpu_bf16_matches_cpu_on_random_130m_models() {
    let mut narrow = preset_with_layers("mamba-130m", Some(2));
    (narrow.d_model, narrow.d_inner, narrow.dt_rank) = (120, 240, 8);
    for (preset, cfg) in [
        ("mamba-130m", Config::preset("mamba-130m").unwrap()),
        ("mamba2-130m", Config::preset("mamba2-130m").unwrap()),
        ("mamba-1, 240 channels", narrow),
    ] {
        let cpu = random_model(&cfg, 7, DType::BF16).unwrap();
        let g = gpu_model(&cpu);
        let ids: Vec<Vec<u32>> =
            (0..2).map(|s| (0..208).map(|i| ((i * 7919 + s * 104729) % 50000) as u32).collect()).collect();
        for (what, chunk) in [("prefill", 1024), ("recurrent", 1), ("chunks of 100", 100)] {
            let (want, _) = scored_logits(&mut Cpu::new(&cpu), &ids, chunk);
            let (got, _) = scored_logits(&mut GpuRun::new(&g), &ids, chunk);
            let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
            let err = rel_l2(&got, &want);
            println!("{preset} bf16 {what}: GPU vs CPU rel L2 {err:.2e}");
            assert!(err <= 2e-2, "{preset} {what}: rel L2 {err:e}");
        }
    }
}

/// The persistent step kernel (batch-1 decode) against the CPU on random bf16 models of the
/// published shapes: 12 greedy steps after a 30-token prompt, then the session's next logits
/// against the CPU's over the same tokens. The 1.4B and 2.8B shapes (cut to 2 layers) give a
/// warp several scan channels and residual rows.
#[test]
#[ignore = "needs a GPU"]
fn step_kernel_matches_cpu_on_random_models() {
    let shapes = [
        ("mamba-130m", None),
        ("mamba2-130m", None),
        ("mamba-1.4b", Some(2)),
        ("mamba-2.8b", Some(2)),
        ("mamba2-1.3b", Some(2)),
    ];
    for (preset, layers) in shapes {
        let cfg = preset_with_layers(preset, layers);
        let cpu = random_model(&cfg, 5, DType::BF16).unwrap();
        let g = gpu_model(&cpu);
        let prompt: Vec<u32> = (0..30).map(|i| (i * 7919 % 50000) as u32).collect();
        let opts = GenerateOptions {
            max_new_tokens: 12,
            sampling: Sampling::default(),
            seed: 0,
            eos: None,
            vocab_limit: cfg.vocab_padded,
        };
        let out = generate_on(&mut GpuRun::new(&g), starts(&[prompt]), &opts, |_, _| Control::Continue).unwrap();
        let tokens = &out[0].snapshot.as_ref().unwrap().tokens;
        let (all, _) = scored_logits(&mut Cpu::new(&cpu), std::slice::from_ref(tokens), 1024);
        let got = &out[0].snapshot.as_ref().unwrap().next_logits;
        let want: Vec<f64> = all[all.len() - got.len()..].iter().map(|&x| x as f64).collect();
        let err = rel_l2(got, &want);
        println!("{preset} ({} layers) bf16 step kernel, 12 steps: GPU vs CPU rel L2 {err:.2e}", cfg.n_layer);
        assert!(err <= 2e-2, "{preset}: rel L2 {err:e}");
    }
}

/// Preset `name`, cut to `layers` layers if given.
fn preset_with_layers(name: &str, layers: Option<usize>) -> Config {
    let mut cfg = Config::preset(name).unwrap();
    cfg.n_layer = layers.unwrap_or(cfg.n_layer);
    cfg
}

/// Logits and final states of a random `cfg` model in `dtype` on the GPU against the CPU, for
/// prompts of 3001 tokens at batch 1 and 3: the worst relative L2 error of the logits and of
/// the SSM states, and the largest conv-state difference.
fn long_prompt_errors(preset: &str, cfg: &Config, dtype: DType) -> (f64, f64, f32) {
    let cpu = random_model(cfg, 11, dtype).unwrap();
    let g = gpu_model(&cpu);
    let mut worst = (0.0f64, 0.0f64, 0.0f32);
    for batch in [1usize, 3] {
        let l = 3001;
        let toks: Vec<u32> = (0..batch * l).map(|i| ((i * 7919) % cfg.vocab_size) as u32).collect();
        let mut states: Vec<State> = (0..batch).map(|_| cpu.new_state()).collect();
        let want = cpu.forward(&toks, l, &mut states.iter_mut().collect::<Vec<_>>(), 1).unwrap();
        let mut run = GpuRun::new(&g);
        run.begin((0..batch).map(|_| State::new(cfg)).collect()).unwrap();
        let slots: Vec<usize> = (0..batch).collect();
        let got = run.forward(&toks, l, &slots, 1).unwrap();
        let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        worst.0 = worst.0.max(rel_l2(&got, &want64));
        for (i, s) in states.iter().enumerate() {
            let gs = run.state(i).unwrap();
            for (a, b) in gs.layers.iter().zip(&s.layers) {
                let b64: Vec<f64> = b.ssm.to_f32().iter().map(|&x| x as f64).collect();
                worst.1 = worst.1.max(rel_l2(&a.ssm.to_f32(), &b64));
                let c = a.conv.iter().zip(&b.conv).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                worst.2 = worst.2.max(c);
            }
        }
        println!("{preset} {dtype} batch {batch} L {l}: logits rel L2 {:.2e}, states rel L2 {:.2e}", worst.0, worst.1);
    }
    worst
}

/// Long prompts take Mamba-1's one-lane-per-state scan (N = 16 with rows on 16 bytes) or the
/// chunked three-pass scan (anything else; fixtures are too short for it): f32 on the GPU must
/// match the CPU to 1e-4, for both architectures, at batch 1 and 3.
#[test]
#[ignore = "needs a GPU"]
fn long_prompt_scans_match_cpu() {
    // N = 8 at tiny widths takes the chunked scan with channels split over lanes, and 2 layers
    // of 130M's width with N = 8 the one-lane chunked kernel; N = 16 takes the state lanes.
    let shapes = [("tiny", None, 8), ("mamba-130m", Some(2), 8), ("tiny", None, 16), ("mamba-130m", Some(2), 16)];
    for (preset, layers, n) in shapes {
        let mut cfg = preset_with_layers(preset, layers);
        cfg.d_state = n;
        let (logits, ssm, conv) = long_prompt_errors(preset, &cfg, DType::F32);
        assert!(logits <= 1e-4, "{preset} N {n}: logits rel L2 {logits:e}");
        assert!(ssm <= 1e-4 && conv <= 1e-5, "{preset} N {n}: states differ by {ssm:e} (ssm, rel L2), {conv} (conv)");
    }
    let (logits, ssm, _) = long_prompt_errors("tiny-mamba2", &preset_with_layers("tiny-mamba2", None), DType::F32);
    assert!(logits <= 1e-4 && ssm <= 1e-4, "tiny-mamba2: rel L2 {logits:e} (logits), {ssm:e} (states)");
}

/// Long prompts in 16-bit types: Mamba-2's prefill runs the tensor-core SSD over 47 chunks of 64
/// (the last one partial) at mamba2-130m's head shape (N 128, P 64) and at the tiny one (N 16,
/// P 16); Mamba-1's the state-lane scan at 130M's width and the chunked one at tiny's (its B, C
/// rows are not on 16 bytes in 16-bit types).
#[test]
#[ignore = "needs a GPU"]
fn long_prompts_in_16_bit_match_cpu() {
    for (preset, layers) in [("tiny-mamba2", None), ("mamba2-130m", Some(2)), ("tiny", None), ("mamba-130m", Some(2))] {
        let cfg = preset_with_layers(preset, layers);
        for dtype in [DType::BF16, DType::F16] {
            let (logits, ssm, _) = long_prompt_errors(preset, &cfg, dtype);
            assert!(logits <= 2e-2 && ssm <= 2e-2, "{preset} {dtype}: rel L2 {logits:e} (logits), {ssm:e} (states)");
        }
    }
}

/// The projections (cuBLASLt, as the model calls it: strided rows, 16-bit or f32 output) against
/// f64 sums of the same rounded inputs, for shapes with partial tiles in every dimension.
#[test]
#[ignore = "needs a GPU"]
fn projections_match_f64_sums() {
    use rand::{Rng, SeedableRng};
    let gpu = Gpu::open(0).expect("a GPU");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let shapes = [(19, 96, 3), (50, 48, 1), (160, 4096, 7), (8192, 2048, 16), (2048, 4104, 16), (300, 264, 17)];
    for dtype in [DType::BF16, DType::F16] {
        for (out, inp, rows) in shapes {
            let mut rounded = |n: usize| Store::from_f32((0..n).map(|_| rng.random_range(-1.0..1.0)).collect(), dtype);
            let x_rs = inp + 8; // rows with a gap, as the model's strided inputs
            let (w, x) = (rounded(out * inp), rounded(rows * x_rs));
            let (dw, dx) = (gpu.upload(&w.to_le_bytes()).unwrap(), gpu.upload(&x.to_le_bytes()).unwrap());
            let (w, x) = (w.to_f32_vec(), x.to_f32_vec());
            let back = |b: u16| match dtype {
                DType::BF16 => half::bf16::from_bits(b).to_f64(),
                _ => half::f16::from_bits(b).to_f64(),
            };
            for y_f32 in [false, true] {
                let y_rs = out + 3;
                let dy = gpu.alloc::<u8>(rows * y_rs * 4).unwrap();
                let (pw, px, py) = (gpu.ptr(&dw), gpu.ptr(&dx), gpu.ptr(&dy));
                let s = gpu.stream.cu_stream();
                gpu.gemm.matmul(s, dtype, pw, out, inp, px, x_rs, rows, py, y_rs, y_f32).unwrap();
                let bytes = gpu.download(&dy, rows * y_rs * 4).unwrap();
                let mut worst = 0.0f64;
                for r in 0..rows {
                    for o in 0..out {
                        let (mut s, mut mag) = (0.0f64, 0.0f64);
                        for i in 0..inp {
                            let t = w[o * inp + i] as f64 * x[r * x_rs + i] as f64;
                            s += t;
                            mag += t.abs();
                        }
                        let k = r * y_rs + o;
                        let got = if y_f32 {
                            f32::from_le_bytes(bytes[4 * k..4 * k + 4].try_into().unwrap()) as f64
                        } else {
                            back(u16::from_le_bytes(bytes[2 * k..2 * k + 2].try_into().unwrap()))
                        };
                        let rounding = if y_f32 { 0.0 } else { 8e-3 * s.abs() };
                        worst = worst.max((got - s).abs() / (rounding + 1e-5 * mag));
                    }
                }
                println!("{dtype} {out}×{inp}, {rows} rows, f32 out {y_f32}: worst error / bound {worst:.3}");
                assert!(worst <= 1.0, "{dtype} {out}×{inp}, {rows} rows: error {worst} of the bound");
            }
        }
    }
}

/// The pick kernels against the CPU's `sample` on rows of random logits over a 50K vocabulary:
/// flat rows (where top-p alone keeps most of the vocabulary: radix selection), peaked rows,
/// rows rounded to bf16 (ties, broken by the lower id), each with a random history for the
/// penalty and many uniform numbers.
#[test]
#[ignore = "needs a GPU"]
fn pick_kernels_match_cpu_sampling() {
    use mamba_lm::cuda::pick::Picker;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let gpu = Gpu::open(0).expect("a GPU");
    let (rows, v, limit) = (6, 50_288, 50_277);
    let mut rng = StdRng::seed_from_u64(9);
    for trial in 0..12 {
        let mut logits = vec![0.0f32; rows * v];
        for (r, row) in logits.chunks_mut(v).enumerate() {
            let spread = [0.3f32, 1.0, 4.0, 8.0][(r + trial) % 4];
            for x in row.iter_mut() {
                *x = rng.random_range(-1.0..1.0f32) * spread;
            }
            if r % 3 == 2 {
                row.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
            }
        }
        let dev = gpu.upload(&logits).unwrap();
        let history: Vec<Vec<u32>> = (0..rows)
            .map(|_| (0..rng.random_range(0..300)).map(|_| rng.random_range(0..limit as u32)).collect())
            .collect();
        let hist: Vec<&[u32]> = history.iter().map(|h| h.as_slice()).collect();
        // Kept sets past pick_top's sort (PICK_CAP): flat rows' nuclei and a top-k of 3,000.
        let wide = [
            Sampling { temperature: 2.0, top_k: 0, top_p: 0.99, ..Sampling::default() },
            Sampling { temperature: 1.0, top_k: 3000, top_p: 0.97, ..Sampling::default() },
            Sampling { temperature: 0.8, top_k: 3000, repetition_penalty: 1.2, ..Sampling::default() },
        ];
        for s in sampling_rules().into_iter().chain(wide) {
            let mut picker = Picker::new(&gpu, rows, v).unwrap();
            for _ in 0..4 {
                let u: Vec<f32> = (0..rows).map(|_| rng.random::<f32>()).collect();
                let got = picker.pick(&gpu, gpu.ptr(&dev), v, limit, &s, &u, &hist).unwrap();
                for r in 0..rows {
                    let mut row = logits[r * v..r * v + limit].to_vec();
                    let want = mamba_lm::sampling::sample(&mut row, hist[r], &s, u[r] as f64);
                    assert_eq!(got[r], want, "trial {trial} row {r} {s:?} u {}", u[r]);
                }
            }
        }
    }
    // Time of one pick of one 50K row, transfers and the host's wait included.
    let row: Vec<f32> = (0..v).map(|_| rng.random_range(-4.0..4.0f32)).collect();
    let dev = gpu.upload(&row).unwrap();
    let s = Sampling::default();
    for (what, s) in [
        ("greedy + penalty", Sampling { repetition_penalty: 1.2, ..s.clone() }),
        ("top-k 0", Sampling { top_k: 0, ..s.clone() }),
        ("top-k 40 + top-p 0.95", Sampling { top_k: 40, top_p: 0.95, ..s.clone() }),
        (
            "top-k 0 + top-p 0.9, temperature 4 (a wide nucleus)",
            Sampling { temperature: 4.0, top_k: 0, top_p: 0.9, ..s.clone() },
        ),
    ] {
        let mut picker = Picker::new(&gpu, 1, v).unwrap();
        let t = std::time::Instant::now();
        for i in 0..200u32 {
            let h = [i % 1000];
            picker.pick(&gpu, gpu.ptr(&dev), v, limit, &s, &[0.5], &[&h[..]]).unwrap();
        }
        println!("pick of one row, {what}: {:.1} µs", t.elapsed().as_secs_f64() * 1e6 / 200.0);
    }
}

/// Under `--deterministic` (each sequence through its own single-slot run) a sequence's tokens
/// and final logits are bitwise those it gets alone, in bf16, whatever shares its batch: prompts
/// of unequal and equal lengths, greedy and sampled (the pick kernels).
#[test]
#[ignore = "needs a GPU"]
fn deterministic_batches_equal_each_sequence_alone() {
    use mamba_lm::backend::PerSequence;
    for preset in ["mamba-130m", "mamba2-130m"] {
        let cfg = preset_with_layers(preset, Some(4));
        let cpu = random_model(&cfg, 11, DType::BF16).unwrap();
        let g = gpu_model(&cpu);
        let lens = [700usize, 1, 90, 17, 90, 2000];
        let prompts: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(s, &l)| (0..l as u32).map(|i| (i * 7919 + s as u32 * 104729) % 50000).collect())
            .collect();
        let s = Sampling::default();
        for sampling in [s.clone(), Sampling { temperature: 0.9, top_k: 40, top_p: 0.95, repetition_penalty: 1.1, ..s }]
        {
            let opts =
                GenerateOptions { max_new_tokens: 24, sampling, seed: 3, eos: None, vocab_limit: cfg.vocab_size };
            let mut batched = PerSequence::new(cfg.clone(), || GpuRun::new(&g));
            let batch = generate_on(&mut batched, starts(&prompts), &opts, |_, _| Control::Continue).unwrap();
            for (i, (p, b)) in prompts.iter().zip(&batch).enumerate() {
                let alone = GenerateOptions { seed: opts.seed + i as u64, ..opts.clone() };
                let one = generate_on(&mut GpuRun::new(&g), starts(std::slice::from_ref(p)), &alone, |_, _| {
                    Control::Continue
                })
                .unwrap()
                .remove(0);
                assert_eq!(b.new_ids, one.new_ids, "{preset} {:?}: prompt {i}", opts.sampling);
                assert!(
                    b.snapshot.as_ref().unwrap().next_logits == one.snapshot.as_ref().unwrap().next_logits,
                    "{preset}: prompt {i}: logits differ"
                );
            }
        }
    }
}

/// The layout, weights and fixture rows of `name`'s checkpoint.
fn training_fixture(name: &str) -> (mamba_lm::train::params::Layout, Vec<f32>, Vec<Vec<u32>>) {
    let dir = fixture(name);
    let cfg = Config::from_file(&dir.join("config.json")).unwrap();
    let ck = mamba_lm::loader::Checkpoint::open_dir(&dir).unwrap();
    let layout = mamba_lm::train::params::Layout::of_checkpoint(&cfg, &ck).unwrap();
    let params = layout.load(&ck).unwrap();
    (layout, params, expected(name).ids)
}

fn trainer(layout: &mamba_lm::train::params::Layout, params: &[f32]) -> mamba_lm::cuda::train::GpuTrainer {
    let zeros = vec![0.0f32; layout.len];
    mamba_lm::cuda::train::GpuTrainer::new(Gpu::open(0).unwrap(), layout, params, &zeros, &zeros, DType::F32)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_gradients_match_the_reference_and_the_cpu() {
    use mamba_lm::train::model::{forward_backward, shifted, Activations};
    for name in ["mamba1-ssm", "mamba1-hf", "mamba2-ssm", "mamba2-hf"] {
        let (layout, params, ids) = training_fixture(name);
        // Each row alone (score --grads-out's path) against the float64 reference.
        let gradients = |dtype| {
            mamba_lm::cuda::train::gradients(Gpu::open(0).unwrap(), dtype, &layout, &params, &ids, |_| {})
                .unwrap_or_else(|e| panic!("{e:#}"))
        };
        let (losses, grads) = gradients(DType::F32);
        let count: usize = ids.iter().map(|r| r.len() - 1).sum();
        let worst = compare(name, losses.iter().sum::<f64>() / count as f64, |t| {
            let p = layout.table.iter().find(|p| p.name == t).unwrap();
            (grads[p.range()].to_vec(), p.shape.clone())
        });
        println!("{name} GPU f32 per row: worst rel L2 {:.2e} ({})", worst.0, worst.1);
        // 16-bit products against the f32 gradient.
        for dtype in [DType::BF16, DType::F16] {
            let (_, g16) = gradients(dtype);
            let worst = layout
                .table
                .iter()
                .map(|p| {
                    let want: Vec<f64> = grads[p.range()].iter().map(|&x| x as f64).collect();
                    (rel_l2(&g16[p.range()], &want), &p.name)
                })
                .fold((0.0f64, &layout.table[0].name), |a, b| if b.0 > a.0 { b } else { a });
            println!("{name} GPU {dtype} vs f32: worst rel L2 {:.2e} ({})", worst.0, worst.1);
            assert!(worst.0 <= 2e-2, "{name}: {dtype} {} rel L2 {:.2e}", worst.1, worst.0);
        }
        // All rows in one batch, with and without recompute, against the CPU's backward.
        let len = ids[0].len() - 1;
        let mut cpu = vec![0.0f32; layout.len];
        let mut acts = Activations::new(&layout, ids.len(), len, false);
        let scale = 1.0 / (ids.len() * len) as f32;
        let cpu_loss = forward_backward(&layout, &params, &mut cpu, &mut acts, &ids.concat(), scale).unwrap();
        for (recompute, slow) in [(false, false), (true, false), (false, true)] {
            let mut t = trainer(&layout, &params);
            t.set_slow_scan(slow);
            let (inputs, targets) = shifted(&ids.concat(), ids.len(), len).unwrap();
            t.forward(&layout, (ids.len(), len, recompute), inputs, targets).unwrap();
            let loss = t.backward(&layout, Some(scale)).unwrap();
            assert!((loss - cpu_loss).abs() <= 1e-5 * cpu_loss, "{name}: loss {loss} vs CPU {cpu_loss}");
            let what = format!("recompute {recompute}, plain scan backward {slow}");
            let gpu = t.gradients().unwrap();
            for p in &layout.table {
                let want: Vec<f64> = cpu[p.range()].iter().map(|&x| x as f64).collect();
                let err = rel_l2(&gpu[p.range()], &want);
                assert!(err <= 1e-4, "{name} ({what}): {} rel L2 {err:.2e} vs the CPU", p.name);
            }
        }
    }
}

#[test]
#[ignore = "needs a GPU"]
fn gpu_adamw_step_matches_the_cpu() {
    use mamba_lm::train::optim::AdamW;
    let (layout, params, _) = training_fixture("mamba1-hf");
    let n = layout.len;
    let grads: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4).collect();
    let m: Vec<f32> = (0..n).map(|i| ((i * 31 % 100) as f32 - 50.0) * 1e-5).collect();
    let v: Vec<f32> = (0..n).map(|i| (i * 17 % 100) as f32 * 1e-7).collect();
    let adamw = AdamW::default();
    let mut t =
        mamba_lm::cuda::train::GpuTrainer::new(Gpu::open(0).unwrap(), &layout, &params, &m, &v, DType::F32).unwrap();
    // The update rule alone: the same gradients on both sides.
    t.set_gradients(&grads).unwrap();
    let norm = t.grad_norm().unwrap();
    let want_norm = mamba_lm::train::optim::grad_norm(&grads);
    assert!((norm - want_norm).abs() <= 1e-9 * want_norm, "norm {norm} vs {want_norm}");
    t.update(&layout, &adamw, 3, 1e-3, 0.5).unwrap();
    let (mut p, mut mm, mut vv) = (params.clone(), m.clone(), v.clone());
    let clipped: Vec<f32> = grads.iter().map(|g| g * 0.5).collect();
    adamw.step(&layout, 3, 1e-3, &mut p, &clipped, &mut mm, &mut vv);
    let (gp, gm, gv) = t.download().unwrap();
    for (name, a, b) in [("params", &gp, &p), ("m", &gm, &mm), ("v", &gv, &vv)] {
        let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
        let err = rel_l2(a, &b64);
        assert!(err <= 1e-6, "{name}: rel L2 {err:.2e}");
    }
}

#[test]
#[ignore = "needs a GPU"]
fn mamba2_gradients_match_the_cpu_over_state_slices() {
    use mamba_lm::train::model::{forward_backward, shifted, Activations};
    use mamba_lm::train::params::{Layout, EMBEDDING_NAMES};
    // mamba2-130m's width, 2 layers: 128 states (four slices of 32), then 64 states in 2 groups.
    for (n, groups) in [(128, 1), (64, 2)] {
        let mut cfg = preset_with_layers("mamba2-130m", Some(2));
        (cfg.d_state, cfg.ngroups) = (n, groups);
        let layout = Layout::new(&cfg, EMBEDDING_NAMES[0]).unwrap();
        let mut params = vec![0.0f32; layout.len];
        for t in mamba_lm::init::random_weights(&cfg, 0) {
            if let Some(p) = layout.table.iter().find(|p| p.name == t.name) {
                params[p.range()].copy_from_slice(&t.data);
            }
        }
        let (seqs, len) = (2, 150);
        let tokens: Vec<u32> = (0..seqs * (len + 1)).map(|i| (i * 7919 % 50000) as u32).collect();
        let scale = 1.0 / (seqs * len) as f32;
        let mut cpu = vec![0.0f32; layout.len];
        let mut acts = Activations::new(&layout, seqs, len, false);
        let cpu_loss = forward_backward(&layout, &params, &mut cpu, &mut acts, &tokens, scale).unwrap();
        let mut t = trainer(&layout, &params);
        let (inputs, targets) = shifted(&tokens, seqs, len).unwrap();
        t.forward(&layout, (seqs, len, false), inputs, targets).unwrap();
        let loss = t.backward(&layout, Some(scale)).unwrap();
        assert!((loss - cpu_loss).abs() <= 1e-5 * cpu_loss, "N = {n}: loss {loss} vs CPU {cpu_loss}");
        let gpu = t.gradients().unwrap();
        let mut worst = 0.0f64;
        for p in &layout.table {
            let want: Vec<f64> = cpu[p.range()].iter().map(|&x| x as f64).collect();
            let err = rel_l2(&gpu[p.range()], &want);
            assert!(err <= 1e-4, "N = {n}, {groups} groups: {} rel L2 {err:.2e} vs the CPU", p.name);
            worst = worst.max(err);
        }
        println!("Mamba-2 N = {n}, {groups} groups: GPU vs CPU gradients, worst rel L2 {worst:.2e}");
    }
}

#[test]
#[ignore = "needs a GPU"]
fn f16_training_skips_overflowing_steps_and_lowers_the_scale() {
    use mamba_lm::train::checkpoint::TrainerState;
    use mamba_lm::train::engine::Engine;
    use mamba_lm::train::optim::{AdamW, LossScale, Schedule};
    use mamba_lm::train::run::{step, Options, Run};
    let (layout, params, ids) = training_fixture("mamba1-hf");
    let n = layout.len;
    // 2^40 overflows f16 in the first products of the backward.
    let state = TrainerState { step: 0, pos: Default::default(), seed: 0, loss_scale: Some(LossScale::new(40)) };
    let mut run = Run { dir: std::env::temp_dir(), layout, params, m: vec![0.0; n], v: vec![0.0; n], state };
    let len = ids[0].len() - 1;
    let o = Options {
        steps: 40,
        batch: ids.len(),
        seq_len: len,
        seq_len_schedule: vec![],
        recompute: false,
        grad_accum: 1,
        schedule: Schedule { max: 1e-3, min: 1e-4, warmup: 0, decay_steps: 40 },
        adamw: AdamW::default(),
        clip: 1.0,
        eval_every: 0,
        eval_tokens: 0,
        save_every: 0,
        keep: 0,
        json: false,
        plot: None,
        device: Some(0),
        dtype: DType::F16,
    };
    let mut eng = Engine::new(&run, Some(0), DType::F16).unwrap();
    let (mut skipped, mut losses) = (0, vec![]);
    for _ in 0..40 {
        let before = run.params.clone();
        let s = step(&mut run, &o, &mut eng, (ids.len(), len), |_| {
            mamba_lm::train::model::shifted(&ids.concat(), ids.len(), len)
        })
        .unwrap();
        eng.sync(&mut run).unwrap();
        assert!(s.loss.is_finite());
        if s.skipped {
            assert!(run.params == before, "a skipped step leaves the weights alone");
            skipped += 1;
        } else {
            assert!(s.norm.is_finite() && run.params != before);
            losses.push(s.loss);
        }
    }
    let ls = run.state.loss_scale.unwrap();
    println!(
        "f16: {skipped} steps skipped, scale 2^{}, loss {:.4} -> {:.4}",
        ls.log2,
        losses[0],
        losses.last().unwrap()
    );
    assert!(skipped > 0 && ls.log2 < 40 && ls.log2 == 40 - skipped, "{skipped} skipped, scale 2^{}", ls.log2);
    assert!(losses.len() >= 10 && losses.last().unwrap() < &losses[0], "{losses:?}");
}

#[test]
#[ignore = "needs a GPU"]
fn scan_backward_matches_its_plain_twin_on_long_rows() {
    use mamba_lm::train::params::{Layout, EMBEDDING_NAMES};
    // mamba-130m's width, 2 layers, rows of 700 steps (88 sub-chunks of 8, the last one short),
    // each state size the fast kernel takes.
    for n in [16, 8, 32] {
        let mut cfg = preset_with_layers("mamba-130m", Some(2));
        cfg.d_state = n;
        let layout = Layout::new(&cfg, EMBEDDING_NAMES[0]).unwrap();
        let mut params = vec![0.0f32; layout.len];
        for t in mamba_lm::init::random_weights(&cfg, 0) {
            if let Some(p) = layout.table.iter().find(|p| p.name == t.name) {
                params[p.range()].copy_from_slice(&t.data);
            }
        }
        let (seqs, len) = (2, 700);
        let tokens: Vec<u32> = (0..seqs * (len + 1)).map(|i| (i * 7919 % 50000) as u32).collect();
        let grads = |slow| {
            let mut t = trainer(&layout, &params);
            t.set_slow_scan(slow);
            let (inputs, targets) = mamba_lm::train::model::shifted(&tokens, seqs, len).unwrap();
            t.forward(&layout, (seqs, len, false), inputs, targets).unwrap();
            t.backward(&layout, Some(1.0 / (seqs * len) as f32)).unwrap();
            t.gradients().unwrap()
        };
        let (fast, slow) = (grads(false), grads(true));
        let mut worst = 0.0f64;
        for p in &layout.table {
            let want: Vec<f64> = slow[p.range()].iter().map(|&x| x as f64).collect();
            let err = rel_l2(&fast[p.range()], &want);
            assert!(err <= 1e-5, "N = {n}: {} rel L2 {err:.2e}", p.name);
            worst = worst.max(err);
        }
        println!("N = {n}: scan backward vs its plain twin, worst rel L2 {worst:.2e}");
    }
}
