//! End-to-end runs of the binary: greedy generation through the CLI reproduces the reference
//! tokens, sessions saved with --save-state continue exactly, scoring writes the reference
//! logits, and `init` writes a checkpoint that loads.

mod common;
use common::*;
use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mamba-lm")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn new_ids(json_line: &str) -> Vec<u32> {
    let v: serde_json::Value = serde_json::from_str(json_line.trim()).unwrap();
    v["new_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn greedy_generation_matches_reference() {
    for name in ["mamba1-ssm", "mamba1-hf", "mamba2-hf"] {
        let e = expected(name);
        let dir = fixture(name);
        let n = e.greedy_new.len().to_string();
        let p = ids_arg(&e.greedy_prompt);
        let out = run(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &p,
            "--max-new-tokens",
            &n,
            "--ignore-eos",
            "--json",
        ]);
        assert_eq!(new_ids(&out), e.greedy_new, "{name}");
    }
}

#[test]
fn cli_sessions_continue_exactly() {
    let dir = fixture("mamba2-hf");
    let m = dir.to_str().unwrap();
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("session.st");
    let f = f.to_str().unwrap();
    let base = ["generate", "--model", m, "--ignore-eos", "--json"];
    let whole = new_ids(&run(&[&base[..], &["--prompt-ids", "7,8,9", "--max-new-tokens", "9"]].concat()));
    let a =
        new_ids(&run(&[&base[..], &["--prompt-ids", "7,8,9", "--max-new-tokens", "4", "--save-state", f]].concat()));
    let b = new_ids(&run(&[&base[..], &["--load-state", f, "--max-new-tokens", "5"]].concat()));
    assert_eq!([a, b].concat(), whole);
    // Continuing with more prompt tokens equals running the whole history in one go.
    let c =
        new_ids(&run(&[&base[..], &["--load-state", f, "--prompt-ids", "11,12", "--max-new-tokens", "3"]].concat()));
    let hist = ids_arg(&[&[7, 8, 9][..], &whole[..4], &[11, 12]].concat());
    let d = new_ids(&run(&[&base[..], &["--prompt-ids", &hist, "--max-new-tokens", "3"]].concat()));
    assert_eq!(c, d);
}

#[test]
fn score_writes_reference_logits_and_nll() {
    let name = "mamba2-ssm";
    let e = expected(name);
    let t = tempfile::tempdir().unwrap();
    let ids = t.path().join("ids.json");
    std::fs::write(&ids, serde_json::to_string(&e.ids).unwrap()).unwrap();
    let out = t.path().join("logits.safetensors");
    let dir = fixture(name);
    let args = ["score", "--model", dir.to_str().unwrap(), "--ids-file", ids.to_str().unwrap()];
    let s = run(&[&args[..], &["--chunk", "6", "--json", "--logits-out", out.to_str().unwrap()]].concat());
    let v: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
    for (got, want) in v["sequences"].as_array().unwrap().iter().zip(&e.nll) {
        assert!((got["nll_per_token"].as_f64().unwrap() - want).abs() <= 1e-4);
    }
    let (logits, shape) = read_tensor(&out, "logits");
    assert_eq!(shape, vec![e.ids.len(), e.ids[0].len(), e.vocab]);
    let l32: Vec<f32> = logits.iter().map(|&x| x as f32).collect();
    assert!(rel_l2(&l32, &e.logits) <= 1e-4);
}

#[test]
fn init_then_generate_and_info() {
    let t = tempfile::tempdir().unwrap();
    for preset in ["tiny", "tiny-mamba2"] {
        let dir = t.path().join(preset);
        run(&["init", "--preset", preset, "--out", dir.to_str().unwrap(), "--dtype", "bf16"]);
        let text = run(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hello", "--max-new-tokens", "5"]);
        assert!(text.starts_with("Hello"), "{text}");
        let info: serde_json::Value =
            serde_json::from_str(&run(&["info", "--model", dir.to_str().unwrap(), "--json"])).unwrap();
        assert_eq!(info["n_layer"], 2);
        assert!(info["stored_dtype"].as_str().unwrap().contains("bf16"));
    }
}

fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mamba-lm")).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(out.stdout.is_empty(), "{args:?} printed output before failing");
    String::from_utf8(out.stderr).unwrap()
}

/// Asking for the GPU where there is none (or in a build without CUDA) is one clear error line.
#[test]
fn cuda_device_without_gpu_or_support_is_a_clear_error() {
    if cfg!(feature = "cuda") && std::path::Path::new("/proc/driver/nvidia").exists() {
        return; // a GPU machine: tests/cuda_gpu.rs covers it
    }
    let dir = fixture("mamba1-hf");
    let err = fails(&["generate", "-m", dir.to_str().unwrap(), "--device", "cuda", "--prompt-ids", "1,2"]);
    let want = if cfg!(feature = "cuda") { "no CUDA driver found" } else { "built without CUDA support" };
    assert!(err.starts_with("error:") && err.contains(want) && err.lines().count() == 1, "{err}");
    let err = fails(&["bench", "decode", "--preset", "tiny"]);
    assert!(
        err.contains(if cfg!(feature = "cuda") { "no CUDA driver found" } else { "built with CUDA support" }),
        "{err}"
    );
    let err = fails(&["generate", "-m", dir.to_str().unwrap(), "--device", "tpu", "--prompt-ids", "1"]);
    assert!(err.contains("unknown device 'tpu'"), "{err}");
}

/// A model the GPU path cannot run says why before a GPU is opened, so on any machine.
#[cfg(feature = "cuda")]
#[test]
fn configs_the_gpu_lacks_are_named_before_a_gpu_is_opened() {
    use mamba_lm::config::Config;
    use mamba_lm::cuda::model::check_supported;
    let config = |d_model: usize, ssm: &str| {
        format!(r#"{{"d_model": {d_model}, "n_layer": 1, "vocab_size": 32, "ssm_cfg": {{{ssm}}}}}"#)
    };
    for (d_model, ssm, want) in [
        (64, r#""d_conv": 9"#, "d_conv 9 is not supported on the GPU (at most 8)"),
        (64, r#""bias": true"#, "projection biases (bias = true) are not supported on the GPU yet"),
        (8200, "", "d_model 8200 is not supported on the GPU (at most 8192)"),
        (64, r#""layer": "Mamba2", "headdim": 16, "d_ssm": 64"#, "with an MLP branch (d_ssm < d_inner)"),
    ] {
        let text = config(d_model, ssm);
        let err = check_supported(&Config::from_json(&text).unwrap()).unwrap_err().to_string();
        assert!(err.contains(want), "{text}: {err}");
    }
    assert!(check_supported(&Config::preset("mamba2-130m").unwrap()).is_ok());
    // Through the CLI: the config's message, not the missing GPU's.
    let t = tempfile::tempdir().unwrap();
    let (json, dir) = (t.path().join("config.json"), t.path().join("m"));
    std::fs::write(&json, config(64, r#""d_conv": 9"#)).unwrap();
    run(&["init", "--config", json.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
    let err = fails(&["generate", "-m", dir.to_str().unwrap(), "--device", "cuda", "--prompt-ids", "1,2"]);
    assert!(err.starts_with("error:") && err.contains("d_conv 9 is not supported on the GPU"), "{err}");
}
