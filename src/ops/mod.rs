//! Numerical operators on explicit f32 buffers, one concern per module. Each CPU kernel is
//! written once against [`simd::Simd`] and dispatched at run time to AVX-512, AVX2 or scalar.

pub mod causal_conv1d;
pub mod cross_entropy;
pub mod gemm_bf16;
pub mod matmul;
pub mod pool;
pub mod q8;
pub mod rms_norm;
pub mod selective_scan;
pub mod simd;
pub mod ssd;
