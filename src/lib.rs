//! # mamba-lm
//!
//! Mamba-1 (S6) and Mamba-2 (SSD) selective state-space language models in Rust: load the
//! published checkpoints (mamba_ssm or transformers format), run them on the CPU with
//! run-time-dispatched SIMD kernels, generate, score, and save/restore the constant-size
//! recurrent state.
//!
//! ```no_run
//! use mamba_lm::{Model, tensor::DType};
//! let model = Model::load_dir("path/to/mamba-130m".as_ref(), DType::F32)?;
//! let mut state = model.new_state();
//! // Prefill three tokens, keep the logits of the last position.
//! let logits = model.forward(&[510, 2852, 273], 3, &mut [&mut state], 1)?;
//! // One recurrent step with the argmax token.
//! let next = mamba_lm::sampling::argmax(&logits) as u32;
//! let logits = model.forward(&[next], 1, &mut [&mut state], 1)?;
//! # let _ = logits; Ok::<(), anyhow::Error>(())
//! ```

pub mod backend;
pub mod bench;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod generate;
pub mod init;
pub mod io;
pub mod loader;
pub mod model;
pub mod ops;
pub mod plot;
pub mod quantize;
pub mod sampling;
pub mod scheduler;
pub mod score;
pub mod state;
pub mod tensor;
pub mod text_stream;
pub mod tokenizer;
pub mod train;

pub use config::Config;
pub use model::Model;
pub use state::{Kept, Snapshot, State};
