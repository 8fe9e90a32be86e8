//! Shared helpers for the integration tests: fixture paths and reference tensors.
#![allow(dead_code)]

use std::path::PathBuf;

pub const FIXTURES: &[&str] = &["mamba1-ssm", "mamba1-hf", "mamba2-hf", "mamba2-ssm"];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A tensor from a safetensors file as f64 values plus its shape (f32, f64 or i64 data).
pub fn read_tensor(path: &std::path::Path, name: &str) -> (Vec<f64>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let v = match t.dtype() {
        safetensors::Dtype::F32 => {
            t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        }
        safetensors::Dtype::F64 => {
            t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
        }
        safetensors::Dtype::I64 => {
            t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
        }
        d => panic!("unexpected dtype {d:?}"),
    };
    (v, t.shape().to_vec())
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

pub struct Expected {
    pub ids: Vec<Vec<u32>>,
    pub logits: Vec<f64>,
    pub vocab: usize,
    pub nll: Vec<f64>,
    pub greedy_prompt: Vec<u32>,
    pub greedy_new: Vec<u32>,
}

impl Expected {
    /// Greedy generation of the reference's new tokens, as the reference made them.
    pub fn greedy_options(&self, vocab_limit: usize) -> mamba_lm::generate::GenerateOptions {
        mamba_lm::generate::GenerateOptions {
            max_new_tokens: self.greedy_new.len(),
            sampling: mamba_lm::sampling::Sampling::default(),
            seed: 0,
            eos: None,
            vocab_limit,
        }
    }
}

pub fn expected(name: &str) -> Expected {
    let dir = fixture(name);
    let (ids, shape) = read_tensor(&dir.join("expected.safetensors"), "input_ids");
    let (logits, lshape) = read_tensor(&dir.join("expected.safetensors"), "logits");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let list = |k: &str| -> Vec<u32> { j[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    Expected {
        ids: ids.chunks(shape[1]).map(|r| r.iter().map(|&x| x as u32).collect()).collect(),
        logits,
        vocab: lshape[2],
        nll: j["nll_per_token"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(),
        greedy_prompt: list("greedy_prompt"),
        greedy_new: list("greedy_new_tokens"),
    }
}

/// Every row's logits (and NLL per token), each scored in chunks of `chunk` tokens on `be`.
pub fn scored_logits(be: &mut dyn mamba_lm::backend::Backend, ids: &[Vec<u32>], chunk: usize) -> (Vec<f32>, Vec<f64>) {
    let mut all = Vec::new();
    let mut nll = Vec::new();
    for row in ids {
        let s = mamba_lm::score::score_on(be, row, chunk, true, |_, l| {
            all.extend_from_slice(l);
            Ok(())
        })
        .unwrap();
        nll.push(s.nll_per_token());
    }
    (all, nll)
}

/// Each row's NLL per token scored on `be` in chunks of `chunk`, the logits kept where they are
/// computed (the fused cross-entropy path).
pub fn fused_nll(be: &mut dyn mamba_lm::backend::Backend, ids: &[Vec<u32>], chunk: usize) -> Vec<f64> {
    ids.iter()
        .map(|row| mamba_lm::score::score_on(be, row, chunk, false, |_, _| Ok(())).unwrap().nll_per_token())
        .collect()
}

/// The reference's loss and its tensors' names.
pub fn reference(name: &str) -> (f64, Vec<String>) {
    let bytes = std::fs::read(fixture(name).join("grads.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let loss = meta.metadata().as_ref().unwrap()["loss"].parse().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    (loss, st.names().into_iter().map(|s| s.to_string()).collect())
}

/// Checks the loss and every tensor (`ours(name)` → values and shape) against the reference;
/// returns the worst error.
pub fn compare(name: &str, loss: f64, ours: impl Fn(&str) -> (Vec<f32>, Vec<usize>)) -> (f64, String) {
    let (want, names) = reference(name);
    assert!((loss - want).abs() < 1e-5 * want, "{name}: loss {loss} vs {want}");
    let file = fixture(name).join("grads.safetensors");
    let mut worst = (0.0f64, String::new());
    for t in &names {
        let (reference, shape) = read_tensor(&file, t);
        let (got, got_shape) = ours(t);
        assert_eq!(got_shape, shape, "{name}: {t}");
        let err = rel_l2(&got, &reference);
        assert!(err <= 1e-4, "{name}: {t} rel L2 {err:.2e}");
        if err > worst.0 {
            worst = (err, t.clone());
        }
    }
    worst
}

/// Each row's logits at every position, prefilled alone from a fresh state.
pub fn prefill_logits(m: &mamba_lm::model::Model, ids: &[Vec<u32>]) -> Vec<f32> {
    ids.iter()
        .flat_map(|row| {
            let mut st = m.new_state();
            m.forward(row, row.len(), &mut [&mut st], row.len()).unwrap()
        })
        .collect()
}

/// Continuous batching keeps sequences independent: seven jobs through four slots of `be`
/// (prompts of 1 to 70 tokens, 3 to 20 new tokens, a prefill budget of 8 tokens per step so long
/// prompts feed across steps beside decoding ones, and later jobs taking freed slots) each get
/// the greedy tokens `m` gives that job alone on the CPU. On the GPU this walks decode steps of
/// several widths and live slots kept through a step that does not feed them.
pub fn staggered_jobs_equal_each_alone(be: &mut dyn mamba_lm::backend::Backend, m: &mamba_lm::model::Model) {
    use mamba_lm::scheduler::{Control, Event, Job, Params, Scheduler};
    let lens = [5usize, 70, 3, 30, 1, 40, 12];
    let news = [6usize, 20, 10, 15, 8, 3, 12];
    let prompt = |s: usize| (0..lens[s] as u32).map(|i| (i * 7919 + s as u32 * 104729) % 249 + 1).collect::<Vec<_>>();
    let params = |s: usize| Params {
        max_new_tokens: news[s],
        sampling: mamba_lm::sampling::Sampling::default(),
        seed: 0,
        eos: None,
        vocab_limit: m.cfg.vocab_size,
        stops: vec![],
        logprobs: None,
    };
    let job = |s: usize| Job { prompt: prompt(s), resume: None, params: params(s), marks: vec![], keep_state: true };
    let run = |be: &mut dyn mamba_lm::backend::Backend, jobs: &[usize], slots: usize, budget: usize| {
        let mut sched = Scheduler::new(be, slots, None).unwrap();
        sched.prefill_budget = budget;
        let ids: Vec<u64> = jobs.iter().map(|&s| sched.submit(job(s)).unwrap()).collect();
        let mut got = vec![vec![]; jobs.len()];
        while sched
            .step(&mut |id, ev| {
                if let Event::Done(out) = ev {
                    got[ids.iter().position(|&i| i == id).unwrap()] = out.new_ids;
                }
                Control::Continue
            })
            .unwrap()
        {}
        got
    };
    let together = run(be, &(0..lens.len()).collect::<Vec<_>>(), 4, 8);
    for (s, got) in together.iter().enumerate() {
        let alone = run(&mut mamba_lm::backend::Cpu::new(m), &[s], 1, usize::MAX).remove(0);
        assert_eq!(got.len(), news[s], "job {s}: length");
        assert_eq!(*got, alone, "job {s}: tokens beside others differ from alone");
    }
}
