//! Convolutional variational auto-encoders on libtorch. The modules form layers, and every
//! import points to a lower one (tests/layers.rs checks it):
//!
//! 1. support: `fault`, `rng`, `fsio` (atomic writes), `run_dir` (the run folder's layout and
//!    lock), `native` (ATen calls tch lacks), `device`, `dist` (c10d process groups),
//!    `precision`, `plot`, `tensorboard`
//! 2. `data`: datasets, the image-folder cache, the loader
//! 3. `models`: the model interface and its families
//! 4. `loss`, `perceptual`, `ssim`, `adversarial`, `fid`: the bound and its statistics;
//!    LPIPS, the perceptual distance; SSIM; the PatchGAN discriminator and its losses; the FID
//!    Inception and the Fréchet distance, for rFID
//! 5. `adam`, `schedule`, `ema`: the optimizer, its curves, the weights' average
//! 6. `config`: every training setting, declared once
//! 7. `eval`, `export`: what a model computes on a split, as numbers and pictures
//! 8. `train`: a step and an epoch
//! 9. `checkpoint`: a trainer to and from a file
//! 10. `pretrained`: weights from and to diffusers folders, `--init-from`
//! 11. `metrics`: the run's learning curves
//! 12. `run`: the run loop in a run folder
//! 13. `bench`: throughput

/// `println!` for a run's lines, whose stdout may be gone (`vae train | head`, a pipe whose
/// reader died, a terminal hung up): the line is dropped and the run goes on, where
/// `println!` would panic and end it mid-epoch without its checkpoint.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` as `say!` is `println!`: a note or warning that a closed stderr drops.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod adam;
pub mod adversarial;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod ema;
pub mod eval;
pub mod export;
pub mod fault;
pub mod fid;
pub mod fsio;
pub mod loss;
pub mod metrics;
pub mod models;
pub mod native;
pub mod perceptual;
pub mod plot;
pub mod precision;
pub mod pretrained;
pub mod rng;
pub mod run;
pub mod run_dir;
pub mod schedule;
pub mod ssim;
pub mod tensorboard;
pub mod train;

/// The libtorch that tch =0.24.0 binds (torch-sys refuses any other at build time).
pub const LIBTORCH_VERSION: &str = "2.11.0";
