//! `prepare` and `train` end to end on the CPU: a run killed with SIGKILL and resumed logs
//! bitwise the losses of the uninterrupted run; what training writes loads in `generate`;
//! bad input is refused with the problem named and nothing of the user's touched.

use std::path::Path;
use std::process::{Command, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mamba-lm"))
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?}: {}", cmd, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// A prepared directory from the repository's own text, with a trained 384-entry tokenizer.
fn prepared(dir: &Path) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = dir.join("data");
    ok(bin()
        .args(["prepare", "--out", data.to_str().unwrap(), "--train-tokenizer", "--vocab-size", "384", "--input"])
        .args(["README.md", "BENCHMARKS.md", "src/train/run.rs", "src/ops/ssd.rs"].map(|f| root.join(f))));
    data
}

fn train_args(data: &Path, out: &Path) -> Vec<String> {
    [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--preset",
        "tiny-mamba2",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "40",
        "--batch-size",
        "2",
        "--seq-len",
        "48",
        "--grad-accum",
        "2",
        "--lr",
        "3e-3",
        "--warmup",
        "4",
        "--eval-every",
        "10",
        "--eval-tokens",
        "2000",
        "--save-every",
        "10",
        "--keep",
        "0",
        "--threads",
        "2",
        "--seed",
        "5",
    ]
    .map(String::from)
    .to_vec()
}

/// The logged records without their timing, one string per line.
fn records(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_s");
            v.to_string()
        })
        .collect()
}

#[test]
fn a_killed_run_resumes_to_the_same_losses() {
    let t = tempfile::tempdir().unwrap();
    let data = prepared(t.path());
    let whole = t.path().join("whole");
    let plot = t.path().join("loss.png");
    ok(bin().args(train_args(&data, &whole)).arg("--plot").arg(&plot));
    assert!(std::fs::read(&plot).unwrap().starts_with(b"\x89PNG"), "--plot draws a PNG");
    let want = records(&whole);
    assert_eq!(want.iter().filter(|r| r.contains("\"loss\"")).count(), 40);
    let first: f64 = serde_json::from_str::<serde_json::Value>(&want[0]).unwrap()["loss"].as_f64().unwrap();
    let last = want.iter().rev().find(|r| r.contains("\"loss\"")).unwrap();
    let last: f64 = serde_json::from_str::<serde_json::Value>(last).unwrap()["loss"].as_f64().unwrap();
    assert!(last < first - 0.5, "the loss should fall: {first} → {last}");

    // The same run, killed once its first checkpoint is complete, then resumed.
    let cut = t.path().join("cut");
    let mut child = bin().args(train_args(&data, &cut)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    while !cut.join("checkpoint-10").exists() {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!cut.join("final").exists());
    let mut resume = bin();
    resume.args(train_args(&data, &cut).into_iter().filter(|a| a != "--preset" && a != "tiny-mamba2")).arg("--resume");
    ok(&mut resume);
    assert_eq!(records(&cut), want, "a resumed run logs what the uninterrupted run logs");
    assert_eq!(
        std::fs::read(cut.join("final/model.safetensors")).unwrap(),
        std::fs::read(whole.join("final/model.safetensors")).unwrap(),
        "and ends with the same weights"
    );
    // What training writes is a model directory as generate takes it.
    let out = ok(bin().args([
        "generate",
        "-m",
        whole.join("final").to_str().unwrap(),
        "--prompt",
        "The",
        "--max-new-tokens",
        "5",
    ]));
    assert!(!out.is_empty());
}

#[test]
fn bad_training_input_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let data = prepared(t.path());
    let run = t.path().join("run");
    // A run directory that exists is never reused without --resume.
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    let e = fails(bin().args(train_args(&data, &run)));
    assert!(e.contains("already exists") && e.contains("--resume"), "{e}");
    assert_eq!(std::fs::read_to_string(run.join("notes.txt")).unwrap(), "mine");
    let e = fails(bin().args(train_args(&data, &t.path().join("r2"))).arg("--resume"));
    assert!(e.contains("--resume continues the model"), "{e}");
    let fresh = t.path().join("r3");
    let long: Vec<String> =
        train_args(&data, &fresh).into_iter().map(|a| if a == "48" { "100000".into() } else { a }).collect();
    let e = fails(bin().args(long));
    assert!(e.contains("lower --batch-size or --seq-len"), "{e}");
    // A model whose vocabulary is smaller than the data's.
    let small = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mamba1-hf");
    let mut args = train_args(&data, &t.path().join("r4"));
    let i = args.iter().position(|a| a == "--preset").unwrap();
    args.splice(i..i + 2, ["--model".to_string(), small.to_str().unwrap().to_string()]);
    let e = fails(bin().args(&args));
    assert!(e.contains("vocabulary (384) is larger than the model's (256)"), "{e}");
    // Truncated shards are named.
    let bad = t.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["meta.json", "tokenizer.json", "val.bin"] {
        std::fs::copy(data.join(f), bad.join(f)).unwrap();
    }
    std::fs::write(bad.join("train.bin"), [1u8, 0, 2]).unwrap();
    let e = fails(bin().args(train_args(&bad, &t.path().join("r5"))));
    assert!(e.contains("train.bin") && e.contains("truncated"), "{e}");
    let e = fails(bin().args(train_args(&data, &t.path().join("r6"))).args(["--seq-len-schedule", "32:10,16:5,64"]));
    assert!(e.contains("steps increasing"), "{e}");
    let e = fails(bin().args(train_args(&data, &t.path().join("r7"))).args(["--tokens", "1000"]));
    assert!(e.contains("cannot be used with"), "{e}");
    // bf16 is a GPU mode; nothing is left behind by a run that cannot start.
    let r8 = t.path().join("r8");
    let e = fails(bin().args(train_args(&data, &r8)).args(["--dtype", "bf16"]));
    assert!(e.contains("training on the CPU runs in f32"), "{e}");
    assert!(!r8.exists(), "no run directory left");
    // The loss scale is f16's, and a power of two.
    let e = fails(bin().args(train_args(&data, &t.path().join("r9"))).args(["--loss-scale", "1024"]));
    assert!(e.contains("--dtype f16 only"), "{e}");
    let e =
        fails(bin().args(train_args(&data, &t.path().join("r10"))).args(["--dtype", "f16", "--loss-scale", "1000"]));
    assert!(e.contains("power of two"), "{e}");
    // prepare never writes into a directory that holds files.
    let e = fails(bin().args(["prepare", "--input", "README.md", "--out", run.to_str().unwrap()]));
    assert!(e.contains("not empty"), "{e}");
}

#[test]
fn sigint_stops_after_a_checkpoint_of_the_step_reached() {
    let t = tempfile::tempdir().unwrap();
    let data = prepared(t.path());
    let run = t.path().join("run");
    let args: Vec<String> =
        train_args(&data, &run).into_iter().map(|a| if a == "40" { "100000".into() } else { a }).collect();
    let mut child = bin().args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    while !run.join("checkpoint-10").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    let step: u64 = e.split("stopped at step ").nth(1).and_then(|s| s.split(':').next()).unwrap().parse().unwrap();
    assert!(step >= 10 && run.join(format!("checkpoint-{step}/trainer.safetensors")).exists(), "{e}");
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn synthetic_tasks_train_and_report_accuracy() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("copy");
    let common = ["--preset", "tiny", "--steps", "12", "--batch-size", "4", "--seq-len", "48", "--eval-every", "6"];
    ok(bin()
        .args(["train", "--task", "selective-copying", "--out", run.to_str().unwrap(), "--eval-lens", "96"])
        .args(common));
    let recs = records(&run);
    let acc: Vec<&String> = recs.iter().filter(|r| r.contains("accuracy")).collect();
    assert_eq!(acc.len(), 4, "accuracy at the training length and at 96, twice: {recs:?}");
    assert!(acc.iter().any(|r| r.contains("\"eval_len\":96")));
    assert!(run.join("final/model.safetensors").exists() && !run.join("final/tokenizer.json").exists());
    ok(bin().args(["info", "-m", run.join("final").to_str().unwrap()]));
    let short = common.map(|a| if a == "48" { "20" } else { a });
    let e = fails(
        bin().args(["train", "--task", "selective-copying", "--out", t.path().join("x").to_str().unwrap()]).args(short),
    );
    assert!(e.contains("at least 32 tokens") && !t.path().join("x").exists(), "{e}");
    let e = fails(bin().args(["train", "--task", "copying", "--out", "y"]).args(common));
    assert!(e.contains("unknown task 'copying'"), "{e}");
}

#[test]
fn fine_tuning_a_mamba_ssm_checkpoint_writes_a_transformers_one() {
    let t = tempfile::tempdir().unwrap();
    // Shards by hand: the fixture's vocabulary (250 ids) has no tokenizer of its own.
    let data = t.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let ids = |n: usize, k: u32| -> Vec<u8> {
        (0..n as u32).flat_map(|i| (((i * 7919 + k) % 250) as u16).to_le_bytes()).collect()
    };
    std::fs::write(data.join("train.bin"), ids(3000, 1)).unwrap();
    std::fs::write(data.join("val.bin"), ids(400, 2)).unwrap();
    std::fs::write(
        data.join("meta.json"),
        r#"{"dtype": "u16", "vocab_size": 250, "train_tokens": 3000, "val_tokens": 400, "eos_id": 0}"#,
    )
    .unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tokenizers/gpt-neox-20b.json"),
        data.join("tokenizer.json"),
    )
    .unwrap();
    for name in ["mamba1-ssm", "mamba2-ssm"] {
        let run = t.path().join(name);
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        ok(bin().args(["train", "--data", data.to_str().unwrap(), "--model", model.to_str().unwrap()]).args([
            "--out",
            run.to_str().unwrap(),
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--eval-every",
            "3",
        ]));
        let cfg = std::fs::read_to_string(run.join("final/config.json")).unwrap();
        assert!(cfg.contains("\"model_type\"") && cfg.contains("\"expand\": 2,"), "{cfg}");
        let info = ok(bin().args(["info", "-m", run.join("final").to_str().unwrap()]));
        assert!(info.contains("Transformers"), "{info}");
    }
}
