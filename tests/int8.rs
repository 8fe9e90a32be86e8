//! 8-bit weights (`--dtype int8`): logits close to the f32 reference on the fixtures (prefill
//! and the recurrent step) and on a random mamba-130m, and a quantized checkpoint that loads
//! without quantizing again.

mod common;
use common::{expected, fixture, prefill_logits, rel_l2};
use mamba_lm::config::Config;
use mamba_lm::model::Model;
use mamba_lm::tensor::DType;

/// Each row token by token (the decode path: activations quantized too).
fn step_logits(m: &Model, ids: &[Vec<u32>]) -> Vec<f64> {
    let mut out = vec![];
    for row in ids {
        mamba_lm::score::score(m, row, 1, true, |_, l| {
            out.extend(l.iter().map(|&x| x as f64));
            Ok(())
        })
        .unwrap();
    }
    out
}

#[test]
fn int8_logits_are_within_2e2_of_the_reference() {
    for name in ["mamba1-ssm", "mamba1-hf", "mamba2-ssm", "mamba2-hf"] {
        let e = expected(name);
        let m = Model::load_dir(&fixture(name), DType::I8).unwrap();
        let prefill = rel_l2(&prefill_logits(&m, &e.ids), &e.logits);
        let step: Vec<f32> = step_logits(&m, &e.ids).iter().map(|&x| x as f32).collect();
        let step = rel_l2(&step, &e.logits);
        println!("{name}: int8 logits rel L2 prefill {prefill:.2e}, step {step:.2e}");
        assert!(prefill <= 2e-2 && step <= 2e-2, "{name}: prefill {prefill:.2e}, step {step:.2e}");
    }
}

#[test]
fn int8_mamba_130m_is_within_2e2_of_f32() {
    let cfg = Config::preset("mamba-130m").unwrap();
    let f32_model = mamba_lm::init::random_model(&cfg, 1, DType::F32).unwrap();
    let i8_model = mamba_lm::init::random_model(&cfg, 1, DType::I8).unwrap();
    let ids = vec![(0..24).map(|i| (i * 7919 % 50000) as u32).collect::<Vec<u32>>()];
    let want = step_logits(&f32_model, &ids);
    let got: Vec<f32> = step_logits(&i8_model, &ids).iter().map(|&x| x as f32).collect();
    let err = rel_l2(&got, &want);
    println!("mamba-130m random weights: int8 step logits rel L2 {err:.2e}");
    assert!(err <= 2e-2, "{err:.2e}");
    let prefill = rel_l2(
        &prefill_logits(&i8_model, &ids),
        &prefill_logits(&f32_model, &ids).iter().map(|&x| x as f64).collect::<Vec<_>>(),
    );
    assert!(prefill <= 2e-2, "prefill {prefill:.2e}");
}

/// The bundled (trained) model over 1,500 tokens of Shakespeare, teacher-forced, through the
/// prompt path and the decode step: in int8 the most likely next token is f32's at ≥ 95 % of
/// positions and the perplexity is within 1 % of f32's.
#[test]
fn int8_bundled_model_predicts_as_f32() {
    use mamba_lm::ops::cross_entropy::nll_rows;
    let dir = mamba_lm::loader::default_model::dir().unwrap();
    let tok = mamba_lm::tokenizer::load(None, Some(&dir)).unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/speeches.txt")).unwrap();
    let ids = vec![mamba_lm::tokenizer::encode(&tok, &text).unwrap()];
    assert!(ids[0].len() >= 1000);
    let (f, q) = (Model::load_dir(&dir, DType::F32).unwrap(), Model::load_dir(&dir, DType::I8).unwrap());
    let v = f.cfg.vocab_padded;
    let argmax =
        |row: &[f32]| row.iter().enumerate().fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0;
    let steps = |m: &Model| step_logits(m, &ids).iter().map(|&x| x as f32).collect::<Vec<_>>();
    for (path, want, got) in
        [("prompt", prefill_logits(&f, &ids), prefill_logits(&q, &ids)), ("decode", steps(&f), steps(&q))]
    {
        let n = ids[0].len() - 1;
        let same = (0..n).filter(|&t| argmax(&want[t * v..(t + 1) * v]) == argmax(&got[t * v..(t + 1) * v])).count();
        let mean = |l: &[f32]| nll_rows(&l[..n * v], v, &ids[0][1..]).iter().sum::<f64>() / n as f64;
        let (agree, ppl) = (same as f64 / n as f64, (mean(&got) - mean(&want)).exp());
        println!("{path}: int8 agrees with f32 at {agree:.4} of {n} positions, perplexity ratio {ppl:.5}");
        assert!(agree >= 0.95 && (ppl - 1.0).abs() <= 0.01, "{path}: agreement {agree}, perplexity ratio {ppl}");
    }
}

fn mamba_lm(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mamba-lm")).args(args).output().unwrap()
}

#[test]
fn quantized_checkpoints_load_as_quantized_at_load() {
    let t = tempfile::tempdir().unwrap();
    for name in ["mamba1-ssm", "mamba2-hf"] {
        let out = t.path().join(name);
        let (src, dst) = (fixture(name), out.to_str().unwrap().to_string());
        let r = mamba_lm(&["quantize", "--model", src.to_str().unwrap(), "--out", &dst]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let ids = expected(name).ids;
        let at_load = prefill_logits(&Model::load_dir(&src, DType::I8).unwrap(), &ids);
        let stored = prefill_logits(&Model::load_dir(&out, DType::I8).unwrap(), &ids);
        assert_eq!(at_load, stored, "{name}: the stored 8-bit weights differ from quantizing at load");
        // In f32 the 8-bit checkpoint is dequantized: the same values, products in f32.
        let f32_logits = prefill_logits(&Model::load_dir(&out, DType::F32).unwrap(), &ids);
        assert!(rel_l2(&f32_logits, &expected(name).logits) <= 2e-2);
        let info = mamba_lm(&["info", "--model", &dst, "--json"]);
        assert!(String::from_utf8_lossy(&info.stdout).contains("int8"), "info does not show the 8-bit tensors");
        // The output directory is never overwritten.
        let again = mamba_lm(&["quantize", "--model", src.to_str().unwrap(), "--out", &dst]);
        assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    }
}

#[test]
fn corrupt_8bit_checkpoints_are_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("q");
    mamba_lm::quantize::quantize_dir(&fixture("mamba1-ssm"), &out, DType::I8).unwrap();
    // Drop one scale tensor: the error names it.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let gone = "backbone.layers.0.mixer.in_proj.weight_scale";
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != gone).collect();
    std::fs::write(out.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let err = Model::load_dir(&out, DType::I8).err().expect("a missing scale tensor must fail");
    assert!(format!("{err:#}").contains(gone), "{err:#}");
    // --dtype int8 on a GPU is refused before anything loads.
    let r = mamba_lm(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--dtype",
        "int8",
        "--device",
        "cuda",
        "--prompt-ids",
        "1",
    ]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("int8 runs on the CPU"));
}
