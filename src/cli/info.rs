//! `vae info`: what a checkpoint holds.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use vae::checkpoint::Checkpoint;

/// Print a checkpoint's config, progress, history, parameter count and tensors.
#[derive(Args)]
pub struct InfoArgs {
    /// A checkpoint file or a run folder.
    checkpoint: PathBuf,
}

impl InfoArgs {
    pub fn run(&self) -> Result<()> {
        let ckpt = Checkpoint::load(&vae::run_dir::resolve(&self.checkpoint)?)?;
        print!("{}", ckpt.describe()?);
        Ok(())
    }
}
