//! The four reference checkpoints: logits, NLL and greedy tokens must match the official code's
//! outputs through every execution path (parallel prefill, pure recurrence, chunked prefill
//! across SSD block boundaries), under every instruction set the CPU has.

mod common;
use common::*;
use mamba_lm::generate::{generate, Control, Start};
use mamba_lm::ops::simd::{set_isa, Isa};
use mamba_lm::tensor::DType;
use mamba_lm::Model;

fn load(name: &str) -> Model {
    Model::load_dir(&fixture(name), DType::F32).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

fn chunked_logits(m: &Model, ids: &[Vec<u32>], chunk: usize) -> (Vec<f32>, Vec<f64>) {
    scored_logits(&mut mamba_lm::backend::Cpu::new(m), ids, chunk)
}

#[test]
fn prefill_batch_matches_reference() {
    for name in FIXTURES {
        let m = load(name);
        let e = expected(name);
        assert_eq!(m.cfg.vocab_padded, e.vocab, "{name}: padded vocab");
        let l = e.ids[0].len();
        let flat: Vec<u32> = e.ids.concat();
        let mut states: Vec<_> = e.ids.iter().map(|_| m.new_state()).collect();
        let mut refs: Vec<_> = states.iter_mut().collect();
        let logits = m.forward(&flat, l, &mut refs, l).unwrap();
        let err = rel_l2(&logits, &e.logits);
        assert!(err <= 1e-4, "{name}: prefill rel L2 {err:e}");
    }
}

#[test]
fn recurrent_and_chunked_paths_match_reference() {
    for name in FIXTURES {
        let m = load(name);
        let e = expected(name);
        // 1 = pure recurrence; 5 and 13 cut across SSD blocks (8 or 16) and the conv window.
        for chunk in [1, 5, 13, 1024] {
            let (logits, nll) = chunked_logits(&m, &e.ids, chunk);
            let err = rel_l2(&logits, &e.logits);
            assert!(err <= 1e-4, "{name}: chunk {chunk}: rel L2 {err:e}");
            let fused = fused_nll(&mut mamba_lm::backend::Cpu::new(&m), &e.ids, chunk);
            for ((a, f), b) in nll.iter().zip(&fused).zip(&e.nll) {
                assert!((a - b).abs() <= 1e-4, "{name}: chunk {chunk}: nll {a} vs {b}");
                assert!((f - b).abs() <= 1e-4, "{name}: chunk {chunk}: fused nll {f} vs {b}");
            }
        }
    }
}

#[test]
fn every_instruction_set_matches_reference() {
    let detected = Isa::detect();
    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= detected) {
        set_isa(isa);
        for name in FIXTURES {
            let m = load(name);
            let e = expected(name);
            let (logits, _) = chunked_logits(&m, &e.ids, 7);
            let err = rel_l2(&logits, &e.logits);
            assert!(err <= 1e-4, "{name} under {}: rel L2 {err:e}", isa.name());
        }
    }
    set_isa(detected);
}

#[test]
fn greedy_tokens_match_reference() {
    for name in FIXTURES {
        let m = load(name);
        let e = expected(name);
        let opts = e.greedy_options(m.cfg.vocab_padded);
        let start = Start { prompt: e.greedy_prompt.clone(), resume: None };
        let out = generate(&m, vec![start], &opts, |_, _| Control::Continue).unwrap();
        assert_eq!(out[0].new_ids, e.greedy_new, "{name}: greedy tokens");
    }
}

#[test]
fn staggered_jobs_match_each_alone_on_the_cpu() {
    for name in FIXTURES {
        let m = load(name);
        staggered_jobs_equal_each_alone(&mut mamba_lm::backend::Cpu::new(&m), &m);
    }
}
