//! Training: the model's parameters as one flat buffer described by one table ([`params`]),
//! and a forward pass that keeps what its backward needs, with the backward written by hand
//! beside it ([`model`], one module per mixer). The ops' backwards live beside their forwards
//! in [`crate::ops`].

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod engine;
pub mod mamba1;
pub mod mamba2;
pub mod model;
pub mod optim;
pub mod params;
pub mod prepare;
pub mod run;
pub mod tasks;
