//! The `bench` subcommands that run on the GPU (a module of the binary): pick the model, run the
//! figure, print a table or JSON lines, optionally append them to a file and draw the plot.

use super::{BenchCmd, BenchGpuArgs, BenchOut, Device};
use anyhow::{bail, Context, Result};
use mamba_lm::bench::Figure;
use mamba_lm::cuda::bench;
use mamba_lm::cuda::model::GpuModel;
use mamba_lm::cuda::Gpu;
use mamba_lm::Model;
use std::io::Write;

fn open(out: &BenchOut) -> Result<Gpu> {
    let gpu = match out.device {
        Device::Cuda(n) => Gpu::open(n)?,
        Device::Cpu => bail!("this benchmark runs on a GPU: pass --device cuda[:N] (or use `bench cpu`)"),
    };
    eprintln!("# {} ({})", gpu.name, gpu.arch);
    Ok(gpu)
}

/// The models a GPU bench runs on: the presets asked for, else `default`, or one model directory.
fn models(a: &BenchGpuArgs, default: &[&str]) -> Result<Vec<(String, GpuModel)>> {
    if let Some(m) = &a.model {
        let dir = mamba_lm::loader::hub::resolve(m)?;
        let model = Model::load_dir(&dir, a.dtype)?;
        mamba_lm::cuda::model::check_supported(&model.cfg)?;
        return Ok(vec![(m.clone(), GpuModel::new(open(&a.out)?, &model)?)]);
    }
    let presets: Vec<String> =
        if a.preset.is_empty() { default.iter().map(|s| s.to_string()).collect() } else { a.preset.clone() };
    presets
        .iter()
        .map(|p| {
            Ok((p.clone(), bench::preset_model(open(&a.out)?, p, a.dtype).with_context(|| format!("preset {p}"))?))
        })
        .collect()
}

fn report(out: &BenchOut, figs: &[Figure], header: &mut bool) -> Result<()> {
    let mut so = std::io::stdout().lock();
    for f in figs {
        if out.json {
            writeln!(so, "{}", serde_json::to_string(f)?)?;
        } else {
            if !*header {
                writeln!(
                    so,
                    "{:<16} {:<5} {:>6} {:>8} {:<30} {:>12}",
                    "model", "dtype", "batch", "length", "figure", "value"
                )?;
                *header = true;
            }
            writeln!(
                so,
                "{:<16} {:<5} {:>6} {:>8} {:<30} {:>12.4} {}",
                f.model, f.dtype, f.batch, f.length, f.figure, f.value, f.unit
            )?;
        }
    }
    so.flush()?;
    if let Some(p) = &out.json_out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("cannot open {}", p.display()))?;
        for f in figs {
            writeln!(file, "{}", serde_json::to_string(f)?)?;
        }
    }
    Ok(())
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    let mut header = false;
    let mut all = Vec::new();
    let out = match cmd {
        BenchCmd::Cpu(_) | BenchCmd::Plot(_) | BenchCmd::Train(_) => unreachable!("handled by the caller"),
        BenchCmd::Scan(a) => {
            let gpu = open(&a.out)?;
            let lengths: Vec<usize> =
                if a.lengths.is_empty() { (9..=19).map(|k| 1 << k).collect() } else { a.lengths.clone() };
            for &l in &lengths {
                let figs = bench::scan(&gpu, a.d, a.n, &[l], a.reps)?;
                report(&a.out, &figs, &mut header)?;
                all.extend(figs);
            }
            a.out
        }
        BenchCmd::Decode(a) => {
            for (name, m) in models(&a, &["mamba-130m"])? {
                let figs = bench::decode(&m, &name, a.prompt_len.unwrap_or(100), a.gen.unwrap_or(128), a.reps)?;
                report(&a.out, &figs, &mut header)?;
                all.extend(figs);
            }
            a.out
        }
        BenchCmd::Prefill(a) => {
            for (name, m) in models(&a, &["mamba-130m"])? {
                let figs = bench::prefill(&m, &name, a.prompt_len.unwrap_or(512), a.reps)?;
                report(&a.out, &figs, &mut header)?;
                all.extend(figs);
            }
            a.out
        }
        BenchCmd::Generate(a) => {
            let batches = if a.batch.is_empty() { vec![1, 16, 64, 128] } else { a.batch.clone() };
            for (name, m) in models(&a, &["mamba-1.4b"])? {
                for &b in &batches {
                    let figs =
                        bench::generate(&m, &name, &[b], a.prompt_len.unwrap_or(2048), a.gen.unwrap_or(128), a.reps)?;
                    report(&a.out, &figs, &mut header)?;
                    all.extend(figs);
                }
            }
            a.out
        }
        BenchCmd::Memory(a) => {
            let batches = if a.batch.is_empty() { vec![1, 64] } else { a.batch.clone() };
            let top = a.gen.unwrap_or(8192);
            let gens: Vec<usize> = [128, 1024, 8192].into_iter().filter(|&g| g < top).chain([top]).collect();
            for (name, m) in models(&a, &["mamba-1.4b"])? {
                let figs = bench::memory(&m, &name, &batches, &gens)?;
                report(&a.out, &figs, &mut header)?;
                all.extend(figs);
            }
            a.out
        }
    };
    if let Some(p) = &out.plot {
        mamba_lm::plot::draw(&all, p)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
