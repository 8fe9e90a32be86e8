//! The kernels' sources (the `.cu` files beside the CPU ops), compiled at run time by NVRTC for
//! the device's architecture and cached on disk as CUBIN, so only the first start pays for
//! compilation. Modules compile in parallel threads.

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use std::ffi::{CStr, CString};
use std::path::PathBuf;

const COMMON: &str = include_str!("../ops/common.cuh");

const RMS_NORM: &str = include_str!("../ops/rms_norm.cu");
const CONV: &str = include_str!("../ops/causal_conv1d.cu");
const SCAN: &str = include_str!("../ops/selective_scan.cu");
const SSD: &str = include_str!("../ops/ssd.cu");
const SAMPLING: &str = include_str!("../ops/sampling.cu");
const CROSS_ENTROPY: &str = include_str!("../ops/cross_entropy.cu");
const DECODE: &str = include_str!("../ops/decode.cu");
const SCAN_BACKWARD: &str = include_str!("../ops/selective_scan_backward.cu");
const SSD_BACKWARD: &str = include_str!("../ops/ssd_backward.cu");
const REDUCE: &str = include_str!("../ops/reduce.cu");
const ADAMW: &str = include_str!("../train/adamw.cu");
const CONVERT: &str = include_str!("../ops/convert.cu");

/// One NVRTC compilation: a module name and its source (common.cuh is prepended).
#[derive(Clone, Debug)]
pub struct Unit {
    pub name: String,
    pub src: String,
}

/// The selective scan's instances, `(type, NMAX, A kind)`, and the decode step's (type): each
/// is compiled on its own when a model first needs it, so a start compiles one instance of each
/// rather than all of them.
const TYPES: [&str; 3] = ["f32", "bf16", "f16"];
const SCAN_SIZES: [(u32, char); 7] = [(16, 'v'), (64, 'v'), (16, 'w'), (64, 'w'), (16, 's'), (64, 's'), (128, 's')];

/// Lanes per channel of a scan instance (`S` in selective_scan.cu): kind `v` one, `w` two (Mamba-1
/// on short sequences), `s` (Mamba-2) one per 16 states.
pub fn scan_lanes(kind: char, nmax: u32) -> Option<u32> {
    match kind {
        'v' => Some(1),
        'w' => Some(2),
        's' => Some(nmax / 16),
        _ => None,
    }
}

fn unit(name: &str, src: &str) -> Unit {
    Unit { name: name.into(), src: format!("{}{src}", super::consts::defines()) }
}

/// The unit that defines `kernel`.
pub fn unit_for(kernel: &str) -> Option<Unit> {
    if let Some(inst) = kernel.strip_prefix("scan_end_").or_else(|| kernel.strip_prefix("scan_out_")) {
        let (t, size) = inst.split_once('_')?;
        let (nmax, kind) = size.split_at(size.len().checked_sub(1)?);
        let lanes = scan_lanes(kind.chars().next()?, nmax.parse().ok()?)?;
        let scalar = kind == "s";
        let src = format!("{SCAN}\nSCAN_KERNELS({t}, {nmax}, {kind}, {scalar}, {lanes})\n");
        return Some(unit(&format!("scan_{inst}"), &src));
    }
    if let Some(t) = kernel.strip_prefix("scan_states_") {
        return Some(unit(kernel, &format!("{SCAN}\nSTATES_KERNEL({t})\n")));
    }
    if let Some(t) = kernel.strip_prefix("scan_step_") {
        return Some(unit(kernel, &format!("{SCAN}\nSCAN_STEP_KERNEL({t})\n")));
    }
    if let Some(t) = kernel.strip_prefix("ssd_step_") {
        return Some(unit(kernel, &format!("{SCAN}\nSSD_STEP_KERNEL({t})\n")));
    }
    if let Some(t) = kernel.strip_prefix("ssd_state_").or_else(|| kernel.strip_prefix("ssd_out_")) {
        return Some(unit(&format!("ssd_{t}"), &format!("{SCAN}\n{SSD}\nSSD_KERNELS({t})\n")));
    }
    if let Some(t) = kernel.strip_prefix("decode_step_") {
        return Some(unit(&format!("decode_{t}"), &format!("{DECODE}\nSTEP_KERNEL({t})\n")));
    }
    if matches!(kernel, "argmax" | "sample_rows" | "pick_top") {
        return Some(unit("sampling", &format!("{}{SAMPLING}", super::pick::defines())));
    }
    let (name, src) = match kernel {
        k if k.starts_with("add_norm_") || k.starts_with("gated_norm_") || k.starts_with("rms_norm_") => {
            ("rms_norm", RMS_NORM)
        }
        k if k.starts_with("conv1d_") || k == "conv_taps" => ("causal_conv1d", CONV),
        "scan_carry" => ("selective_scan", SCAN),
        "nll_rows" | "ce_grad_rows" => ("cross_entropy", CROSS_ENTROPY),
        k if k.starts_with("scan_backward") || k == "scan_a2" => ("selective_scan_backward", SCAN_BACKWARD),
        k if k.starts_with("ssd_bwd_") => ("ssd_backward", SSD_BACKWARD),
        "sum_parts" | "sum_squares" | "embed_rows" | "embed_backward" => ("reduce", REDUCE),
        "adamw" => ("adamw", ADAMW),
        "to_bf16" | "to_f16" => ("convert", CONVERT),
        _ => return None,
    };
    Some(unit(name, src))
}

/// The units every model needs, compiled when a GPU is opened.
pub fn base_units() -> Vec<Unit> {
    ["add_norm_f32", "conv1d_silu_f32", "scan_carry", "argmax"].iter().filter_map(|k| unit_for(k)).collect()
}

/// Every unit (CI compiles them all).
pub fn all_units() -> Vec<Unit> {
    let mut v = base_units();
    for t in TYPES {
        for (nmax, kind) in SCAN_SIZES {
            v.extend(unit_for(&format!("scan_out_{t}_{nmax}{kind}")));
        }
        v.extend(unit_for(&format!("scan_states_{t}")));
        v.extend(unit_for(&format!("scan_step_{t}")));
        v.extend(unit_for(&format!("ssd_step_{t}")));
        v.extend(unit_for(&format!("decode_step_{t}")));
    }
    v.extend(["bf16", "f16"].iter().filter_map(|t| unit_for(&format!("ssd_out_{t}"))));
    v.extend(
        ["nll_rows", "scan_backward_16", "ssd_bwd_in", "sum_parts", "adamw", "to_bf16"]
            .iter()
            .filter_map(|k| unit_for(k)),
    );
    v
}

/// NVRTC's `--gpu-architecture` for a compute capability: `sm_90a` on Hopper (its own
/// instructions), `sm_XY` elsewhere.
pub fn arch_for(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// The NVRTC library is loadable (checked before any call: cudarc panics on a missing library).
pub fn nvrtc_present() -> bool {
    unsafe { nvrtc_sys::is_culib_present() }
}

fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| anyhow!("NVRTC: {e:?}"))?;
    Ok((major, minor))
}

fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into(), "-lineinfo".into()]
}

/// Compiles one module to CUBIN; the error carries NVRTC's log.
pub fn compile(name: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    if !nvrtc_present() {
        bail!("NVRTC (libnvrtc.so) was not found: install the CUDA runtime libraries or set LD_LIBRARY_PATH");
    }
    let full = CString::new(format!("{COMMON}\n{src}"))?;
    let cname = CString::new(format!("{name}.cu"))?;
    let prog = nvrtc::create_program(&full, Some(&cname)).map_err(|e| anyhow!("NVRTC: {e:?}"))?;
    let opts = options(arch);
    let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
    let out = match compiled {
        Err(e) => {
            let log = unsafe { nvrtc::get_program_log(prog) }.unwrap_or_default();
            let log = unsafe { CStr::from_ptr(log.as_ptr()) }.to_string_lossy().into_owned();
            Err(anyhow!("kernel {name}.cu failed to compile for {arch} ({e:?}):\n{log}"))
        }
        Ok(()) => unsafe {
            let mut size = 0usize;
            nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| anyhow!("NVRTC: {e:?}"))?;
            let mut bin = vec![0u8; size];
            nvrtc_sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut _).result().map_err(|e| anyhow!("NVRTC: {e:?}"))?;
            Ok(bin)
        },
    };
    unsafe { nvrtc::destroy_program(prog) }.ok();
    out
}

/// `crate::io::cache_base()/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    crate::io::cache_base().map(|b| b.join("kernels"))
}

/// CUBINs of `units` for `arch`, from the disk cache where present, compiled otherwise (in
/// parallel) and then cached. A cache that cannot be written only costs the next start time.
pub fn load(units: &[Unit], arch: &str) -> Result<Vec<Vec<u8>>> {
    let ver = nvrtc_version()?;
    let dir = cache_dir();
    let key = |u: &Unit| {
        let v = format!("{}.{}", ver.0, ver.1);
        let h = crate::io::fnv1a(&[
            COMMON.as_bytes(),
            u.src.as_bytes(),
            arch.as_bytes(),
            v.as_bytes(),
            options(arch).join(" ").as_bytes(),
        ]);
        format!("{}-{arch}-{h:016x}.cubin", u.name)
    };
    std::thread::scope(|s| {
        let jobs: Vec<_> = units
            .iter()
            .map(|u| {
                let path = dir.as_ref().map(|d| d.join(key(u)));
                s.spawn(move || -> Result<Vec<u8>> {
                    if let Some(bin) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
                        return Ok(bin);
                    }
                    let bin = compile(&u.name, &u.src, arch)?;
                    if let Some(p) = &path {
                        let _ = p.parent().map(std::fs::create_dir_all);
                        let _ = crate::io::write_file(p, &bin, true);
                    }
                    Ok(bin)
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().map_err(|_| anyhow!("kernel compilation thread panicked"))?)
            .collect::<Result<Vec<_>>>()
    })
    .context("compiling the CUDA kernels")
}
