//! `vae info`: what a checkpoint holds.

use anyhow::Result;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use vae::checkpoint::Checkpoint;

/// Print a checkpoint's config, progress, history, parameter count and tensors.
#[derive(Args)]
pub struct InfoArgs {
    /// A checkpoint file, a run folder, a diffusers AutoencoderKL folder, or latents vae encode
    /// wrote.
    checkpoint: PathBuf,
}

impl InfoArgs {
    pub fn run(&self) -> Result<()> {
        let latents =
            std::fs::File::open(&self.checkpoint).is_ok_and(|mut f| vae::export::is_latents(&mut f));
        let text = match vae::pretrained::diffusers_folder(&self.checkpoint) {
            Some(dir) => vae::pretrained::describe(&dir)?,
            None if latents => vae::export::describe_latents(&self.checkpoint)?,
            None => Checkpoint::load(&vae::run_dir::resolve(&self.checkpoint)?)?.describe()?,
        };
        // `vae info CKPT | head` ends quietly.
        let _ = std::io::stdout().write_all(text.as_bytes());
        Ok(())
    }
}
