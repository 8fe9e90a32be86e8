//! The hand-written backward against the fixtures' float64 gradients (made by the reference
//! path of the official code): every tensor within 1e-4 relative L2, and the loss. Through
//! `score --grads-out` (each row alone, under every instruction set) and through the library
//! with all rows in one batch.

mod common;
use common::*;
use mamba_lm::config::Config;
use mamba_lm::loader::Checkpoint;
use mamba_lm::train::model::{forward_backward, Activations};
use mamba_lm::train::params::Layout;

#[test]
fn score_grads_out_matches_the_reference() {
    let tmp = std::env::temp_dir().join(format!("mamba-lm-grads-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // Every instruction set the forward's kernels dispatch to (clamped to what this CPU has).
    for (name, isa) in FIXTURES.iter().flat_map(|n| ["scalar", "avx2", "avx512"].map(|i| (n, i))) {
        let ids = tmp.join(format!("{name}.json"));
        std::fs::write(&ids, serde_json::to_string(&expected(name).ids).unwrap()).unwrap();
        let out = tmp.join(format!("{name}-{isa}.safetensors"));
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_mamba-lm"))
            .env("MAMBA_LM_ISA", isa)
            .args(["score", "-m", fixture(name).to_str().unwrap(), "--ids-file", ids.to_str().unwrap(), "--grads-out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        let bytes = std::fs::read(&out).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let loss: f64 = meta.metadata().as_ref().unwrap()["loss"].parse().unwrap();
        assert_eq!(reference(name).1.len(), safetensors::SafeTensors::deserialize(&bytes).unwrap().names().len());
        let worst = compare(name, loss, |t| {
            let (v, shape) = read_tensor(&out, t);
            (v.iter().map(|&x| x as f32).collect(), shape)
        });
        println!("{name} ({isa}): score --grads-out loss {loss:.6}, worst rel L2 {:.2e} ({})", worst.0, worst.1);
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn a_batch_of_rows_gives_the_reference_gradient_with_and_without_recompute() {
    for (name, recompute) in FIXTURES.iter().flat_map(|n| [(n, false), (n, true)]) {
        let dir = fixture(name);
        let cfg = Config::from_file(&dir.join("config.json")).unwrap();
        let ck = Checkpoint::open_dir(&dir).unwrap();
        let layout = Layout::of_checkpoint(&cfg, &ck).unwrap();
        let params = layout.load(&ck).unwrap();
        let ids = expected(name).ids;
        let len = ids[0].len() - 1;
        let mut acts = Activations::new(&layout, ids.len(), len, recompute);
        let mut grads = vec![0.0f32; layout.len];
        let count = ids.len() * len;
        let loss =
            forward_backward(&layout, &params, &mut grads, &mut acts, &ids.concat(), 1.0 / count as f32).unwrap();
        let worst = compare(name, loss / count as f64, |t| {
            let p = layout.table.iter().find(|p| p.name == t).unwrap_or_else(|| panic!("{name}: no {t} in our table"));
            (grads[p.range()].to_vec(), p.shape.clone())
        });
        println!(
            "{name}: batch of {} rows, recompute {recompute}, worst rel L2 {:.2e} ({})",
            ids.len(),
            worst.0,
            worst.1
        );
    }
}
