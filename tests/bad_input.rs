//! Every class of bad input gets a clear error that names the file or flag, a non-zero exit,
//! and no panic.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mamba-lm"))
}

/// Runs the CLI, expects failure, returns stderr.
fn fails(args: &[&str]) -> String {
    let out = bin().args(args).env("HF_HUB_OFFLINE", "1").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err
}

fn copy_fixture(name: &str, dir: &Path) {
    for f in std::fs::read_dir(fixture(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
}

fn gen_args(model: &Path) -> Vec<String> {
    ["generate", "--model", model.to_str().unwrap(), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn fails_gen(model: &Path) -> String {
    let a = gen_args(model);
    fails(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn missing_model_directory() {
    let e = fails(&["generate", "--model", "/nonexistent/dir/x", "--prompt", "hi"]);
    assert!(e.contains("no such directory"), "{e}");
}

#[test]
fn directory_without_config_or_weights() {
    let t = tempfile::tempdir().unwrap();
    assert!(fails_gen(t.path()).contains("has no config.json"));
    std::fs::copy(fixture("mamba1-hf").join("config.json"), t.path().join("config.json")).unwrap();
    let e = fails_gen(t.path());
    assert!(e.contains("no weights in") && e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let t = tempfile::tempdir().unwrap();
    copy_fixture("mamba1-hf", t.path());
    let p = t.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails_gen(t.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn truncated_and_corrupt_pytorch_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    copy_fixture("mamba1-ssm", t.path());
    let p = t.path().join("pytorch_model.bin");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 5000]).unwrap();
    let e = fails_gen(t.path());
    assert!(e.contains("pytorch_model.bin") && e.contains("not a readable PyTorch checkpoint"), "{e}");
    std::fs::write(&p, b"not a zip at all").unwrap();
    let e = fails_gen(t.path());
    assert!(e.contains("not a readable PyTorch checkpoint"), "{e}");
}

#[test]
fn wrong_tensor_shape() {
    let t = tempfile::tempdir().unwrap();
    copy_fixture("mamba1-hf", t.path());
    let cfg = std::fs::read_to_string(t.path().join("config.json")).unwrap();
    std::fs::write(t.path().join("config.json"), cfg.replace("\"state_size\": 8", "\"state_size\": 4")).unwrap();
    let e = fails_gen(t.path());
    assert!(e.contains("has shape") && e.contains("expected") && e.contains("model.safetensors"), "{e}");
}

#[test]
fn config_errors_name_the_problem() {
    let t = tempfile::tempdir().unwrap();
    copy_fixture("mamba1-ssm", t.path());
    let cfgp = t.path().join("config.json");
    let orig = std::fs::read_to_string(&cfgp).unwrap();
    let cases = [
        (orig.replace("\"d_model\"", "\"d_modle\""), "unknown mamba_ssm config key(s): d_modle"),
        (orig.replace("\"ssm_cfg\": {}", "\"ssm_cfg\": {\"layer\": \"Mamba9\"}"), "unknown ssm_cfg.layer \"Mamba9\""),
        (orig.replace("\"ssm_cfg\": {}", "\"ssm_cfg\": {\"layer\": \"Mamba3\"}"), "Mamba3\" is not supported"),
        (orig.replace("\"ssm_cfg\": {}", "\"ssm_cfg\": {\"d_sate\": 16}"), "unknown ssm_cfg key(s): d_sate"),
        (orig.replace("\"attn_layer_idx\": []", "\"attn_layer_idx\": [1]"), "hybrid attention layers"),
        (orig.replace("\"n_layer\": 2", "\"n_layer\": \"two\""), "n_layer must be a non-negative integer"),
        (orig.replace("\"n_layer\": 2", "\"n_layer\": 1000000000"), "n_layer 1000000000 is implausibly large"),
        ("{ not json".to_string(), "not valid JSON"),
    ];
    for (text, want) in cases {
        std::fs::write(&cfgp, &text).unwrap();
        let e = fails_gen(t.path());
        assert!(e.contains(want) && e.contains("config.json"), "want '{want}', got: {e}");
    }
}

#[test]
fn nan_in_norm_weight() {
    let t = tempfile::tempdir().unwrap();
    copy_fixture("mamba1-hf", t.path());
    let p = t.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let name = "backbone.layers.0.norm.weight";
    let off = st.tensor(name).unwrap().data().as_ptr() as usize - bytes.as_ptr() as usize;
    drop(st);
    let mut bytes = bytes.clone();
    bytes[off..off + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    let e = fails_gen(t.path());
    assert!(e.contains(name) && e.contains("non-finite"), "{e}");
}

#[test]
fn missing_and_unexpected_tensors() {
    let t = tempfile::tempdir().unwrap();
    copy_fixture("mamba2-hf", t.path());
    let cfgp = t.path().join("config.json");
    let orig = std::fs::read_to_string(&cfgp).unwrap();
    // Tied config for untied weights.
    std::fs::write(&cfgp, orig.replace("\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true")).unwrap();
    let e = fails_gen(t.path());
    assert!(e.contains("lm_head.weight differs from backbone.embeddings.weight"), "{e}");
    // One layer more than stored: its tensors are missing.
    std::fs::write(&cfgp, orig.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3")).unwrap();
    let e = fails_gen(t.path());
    assert!(e.contains("tensor backbone.layers.2") && e.contains("not found"), "{e}");
}

#[test]
fn offline_hub_miss_says_where_it_looked() {
    let t = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["info", "--model", "state-spaces/mamba-130m"])
        .env("HF_HOME", t.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("not in the Hugging Face cache") && e.contains("models--state-spaces--mamba-130m"), "{e}");
}

#[test]
fn bad_flags_and_requests() {
    let m = fixture("mamba1-hf");
    let m = m.to_str().unwrap();
    let e = fails(&["generate", "--model", m, "--prompt-ids", "1", "--temperature=-1"]);
    assert!(e.contains("--temperature must be"), "{e}");
    let e = fails(&["generate", "--model", m, "--prompt-ids", "1", "--top-p", "1.5"]);
    assert!(e.contains("--top-p must be in [0, 1]"), "{e}");
    let e = fails(&["generate", "--model", m, "--prompt-ids", "1", "--dtype", "f8"]);
    assert!(e.contains("unknown dtype 'f8'"), "{e}");
    let e = fails(&["generate", "--model", m, "--prompt-ids", "1", "--threads", "0"]);
    assert!(e.contains("--threads must be at least 1"), "{e}");
    let e = fails(&["generate", "--model", m, "--prompt-ids", "999"]);
    assert!(e.contains("token id 999 is out of range"), "{e}");
    let e = fails(&["generate", "--model", m]);
    assert!(e.contains("give a prompt"), "{e}");
    let e = fails(&["score", "--model", m, "--ids-file", "/nonexistent.json"]);
    assert!(e.contains("cannot read /nonexistent.json"), "{e}");
    let t = tempfile::tempdir().unwrap();
    let ids = t.path().join("ids.json");
    std::fs::write(&ids, "[[1, 2], \"x\"]").unwrap();
    let e = fails(&["score", "--model", m, "--ids-file", ids.to_str().unwrap()]);
    assert!(e.contains("expected a JSON list of lists of token ids"), "{e}");
    let e = fails(&["init", "--preset", "mamba-9b", "--out", t.path().join("o").to_str().unwrap()]);
    assert!(e.contains("unknown preset 'mamba-9b'"), "{e}");
}

#[test]
fn outputs_never_overwrite_silently() {
    let m = fixture("mamba1-hf");
    let m = m.to_str().unwrap();
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("state.st");
    std::fs::write(&f, b"precious").unwrap();
    let e = fails(&["generate", "--model", m, "--prompt-ids", "1,2", "--save-state", f.to_str().unwrap()]);
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    let ids = fixture("mamba1-hf").join("expected.json");
    let e = fails(&["score", "--model", m, "--ids-file", ids.to_str().unwrap(), "--logits-out", f.to_str().unwrap()]);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&f).unwrap(), b"precious");
    let e = fails(&["init", "--preset", "tiny", "--out", t.path().to_str().unwrap()]);
    assert!(e.contains("not empty"), "{e}");
    // No temporary files left behind.
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
}

#[test]
fn state_file_for_another_model_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("s.st");
    let m1 = fixture("mamba1-hf");
    let out = bin()
        .args(["generate", "--model", m1.to_str().unwrap(), "--prompt-ids", "1,2", "--max-new-tokens", "2"])
        .args(["--save-state", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m2 = fixture("mamba2-hf");
    let e = fails(&["generate", "--model", m2.to_str().unwrap(), "--load-state", f.to_str().unwrap()]);
    assert!(e.contains("s.st") && e.contains("saved for a different model"), "{e}");
    std::fs::write(&f, b"garbage").unwrap();
    let e = fails(&["generate", "--model", m1.to_str().unwrap(), "--load-state", f.to_str().unwrap()]);
    assert!(e.contains("invalid state file") && e.contains("not a safetensors file"), "{e}");
}

#[test]
fn grads_out_refuses_what_it_cannot_do_and_keeps_existing_files() {
    let t = tempfile::tempdir().unwrap();
    let m = fixture("mamba1-hf");
    let m = m.to_str().unwrap();
    let ids = t.path().join("ids.json");
    std::fs::write(&ids, "[[1, 2, 3], [4]]").unwrap();
    let (ids, out) = (ids.to_str().unwrap(), t.path().join("g.safetensors"));
    let o = out.to_str().unwrap();
    let e = fails(&["score", "--model", m, "--ids-file", ids, "--grads-out", o]);
    assert!(e.contains("sequence 1 has 1 token(s)"), "{e}");
    assert!(!out.exists(), "no partial output");
    std::fs::write(&out, "mine").unwrap();
    let e = fails(&["score", "--model", m, "--ids-file", ids, "--grads-out", o]);
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "mine");
    let e = fails(&["score", "--model", m, "--ids-file", ids, "--grads-out", "x.st", "--logits-out", "y.st"]);
    assert!(e.contains("cannot be combined"), "{e}");
    // Projection biases have no training path yet: said before any work.
    let d = tempfile::tempdir().unwrap();
    copy_fixture("mamba1-hf", d.path());
    let cfgp = d.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfgp).unwrap();
    std::fs::write(&cfgp, cfg.replace("\"use_bias\": false", "\"use_bias\": true")).unwrap();
    std::fs::write(t.path().join("ok.json"), "[[1, 2, 3]]").unwrap();
    let ok = t.path().join("ok.json");
    let e = fails(&[
        "score",
        "--model",
        d.path().to_str().unwrap(),
        "--ids-file",
        ok.to_str().unwrap(),
        "--grads-out",
        "z.st",
    ]);
    assert!(e.contains("biases"), "{e}");
}
