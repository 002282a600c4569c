//! `vae info`: what a checkpoint holds.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use vae::checkpoint::Checkpoint;

/// Print a checkpoint's config, progress, history, parameter count and tensors.
#[derive(Args)]
pub struct InfoArgs {
    /// A checkpoint file, a run folder, or a diffusers AutoencoderKL folder.
    checkpoint: PathBuf,
}

impl InfoArgs {
    pub fn run(&self) -> Result<()> {
        if let Some(dir) = vae::pretrained::diffusers_folder(&self.checkpoint) {
            print!("{}", vae::pretrained::describe(&dir)?);
            return Ok(());
        }
        let ckpt = Checkpoint::load(&vae::run_dir::resolve(&self.checkpoint)?)?;
        print!("{}", ckpt.describe()?);
        Ok(())
    }
}
