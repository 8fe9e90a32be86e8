//! Every CUDA kernel compiles with NVRTC for Hopper (sm_90a) and for an older architecture, on a
//! machine with no GPU (NVRTC needs none), so a kernel that does not compile fails here before
//! any GPU time is spent. Needs libnvrtc.so: `.ci/run` installs it from PyPI.
#![cfg(feature = "cuda")]

use mamba_lm::cuda::kernels::{all_units, compile, nvrtc_present};

#[test]
fn every_kernel_compiles_for_hopper_and_ampere() {
    assert!(
        nvrtc_present(),
        "libnvrtc.so not found: pip install nvidia-cuda-nvrtc and add its lib folder to LD_LIBRARY_PATH"
    );
    let units = all_units();
    std::thread::scope(|s| {
        for arch in ["sm_90a", "sm_80"] {
            for u in &units {
                s.spawn(move || {
                    let bin = compile(&u.name, &u.src, arch).unwrap_or_else(|e| panic!("{e:#}"));
                    assert!(bin.starts_with(b"\x7fELF"), "{} for {arch}: NVRTC gave no CUBIN", u.name);
                });
            }
        }
    });
}

#[test]
fn a_broken_kernel_fails_with_the_compiler_log() {
    assert!(nvrtc_present());
    let e = compile("broken", "extern \"C\" __global__ void k() { undefined_name(); }", "sm_90a").unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("broken.cu") && msg.contains("undefined_name"), "{msg}");
}
