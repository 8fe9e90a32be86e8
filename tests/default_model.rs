//! The bundled model: `generate`, `score` and `info` with no `--model` use it, offline, and it is
//! the trained one (a random model of its vocabulary scores ln 4096 ≈ 8.3 nats per token).

use std::process::Command;

fn run(cache: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mamba-lm"))
        .args(args)
        .env("MAMBA_LM_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn no_model_flag_uses_the_bundled_model() {
    let cache = tempfile::tempdir().unwrap();
    let text = run(cache.path(), &["generate", "--prompt", "ROMEO:", "--max-new-tokens", "24"]);
    assert!(text.starts_with("ROMEO:") && text.trim().len() > "ROMEO:".len() + 20, "{text:?}");
    // The second start finds its files in the cache and gives the same greedy text.
    assert_eq!(run(cache.path(), &["generate", "--prompt", "ROMEO:", "--max-new-tokens", "24"]), text);

    let info: serde_json::Value = serde_json::from_str(&run(cache.path(), &["info", "--json"])).unwrap();
    assert_eq!(info["vocab_size"], 4096);
    assert!(info["files"][0].as_str().unwrap().starts_with(cache.path().to_str().unwrap()));

    // Sonnet 18: the trained model's loss is far below a random one's (8.3) and near its
    // validation loss (3.9 nats per token).
    let sonnet = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/sonnet18.txt");
    let s: serde_json::Value =
        serde_json::from_str(&run(cache.path(), &["score", "--text-file", sonnet, "--json"])).unwrap();
    let nll = s["nll_per_token"].as_f64().unwrap();
    assert!(nll < 4.5, "bundled model scores Sonnet 18 at {nll} nats per token");
}

#[test]
fn model_default_names_it_explicitly() {
    let cache = tempfile::tempdir().unwrap();
    let a = run(cache.path(), &["generate", "--model", "default", "--prompt", "Rom.", "--max-new-tokens", "8"]);
    let b = run(cache.path(), &["generate", "--prompt", "Rom.", "--max-new-tokens", "8"]);
    assert_eq!(a, b);
}
