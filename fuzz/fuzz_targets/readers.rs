//! Fuzzes every reader of untrusted input: config.json (both dialects), safetensors files,
//! the restricted unpickler, and PyTorch zip archives. The first byte picks the reader; any
//! input must give Ok or an error, never a panic, hang or out-of-bounds access.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mamba_lm::loader::Checkpoint;
use std::io::Write;

fn read_all(ck: &Checkpoint) {
    let names: Vec<String> = ck.names().map(str::to_owned).collect();
    for n in names {
        if let Some(shape) = ck.shape_of(&n) {
            let shape = shape.to_vec();
            if shape.iter().product::<usize>() <= 1 << 20 {
                let _ = ck.f32(&n, &shape);
            }
        }
    }
}

fn via_file(data: &[u8], add: impl Fn(&mut Checkpoint, &std::path::Path) -> anyhow::Result<()>) {
    let path = std::env::temp_dir().join(format!("mamba-lm-fuzz-{}", std::process::id()));
    std::fs::File::create(&path).and_then(|mut f| f.write_all(data)).unwrap();
    let mut ck = Checkpoint::default();
    if add(&mut ck, &path).is_ok() {
        read_all(&ck);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    match sel % 4 {
        0 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                let _ = mamba_lm::Config::from_json(s);
            }
        }
        1 => {
            let _ = mamba_lm::loader::pickle::parse_state_dict(rest);
        }
        2 => via_file(rest, |ck, p| ck.add_safetensors(p)),
        _ => via_file(rest, |ck, p| ck.add_torch_zip(p)),
    }
});
