//! Convolutional variational auto-encoders on libtorch. The modules read as the pipeline:
//! data -> model -> loss -> adam -> train (a step, an epoch) -> run (the run folder) ->
//! checkpoint -> export and eval.

pub mod adam;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod eval;
pub mod export;
pub mod fault;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod precision;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod tensorboard;
pub mod train;

/// The libtorch that tch =0.24.0 binds (torch-sys refuses any other at build time).
pub const LIBTORCH_VERSION: &str = "2.11.0";
