//! The commands that write a model or its latents elsewhere: `encode` and `decode` (latents
//! to and from a safetensors file), `export-diffusers` and `export-single-file`.

use super::inspect::{saved, Loaded, ModelArgs, Split, TileArgs};
use anyhow::{bail, ensure, Context, Result};
use clap::{ArgMatches, Args};
use std::path::PathBuf;
use vae::checkpoint::LatentScale;

/// Posterior means and log-variances (and labels, where the data has them) of a split, as a
/// safetensors file; of an image folder, its metadata `files` lists the file of each.
#[derive(Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum, default_value = "test")]
    split: EncodeSplit,
    #[arg(long)]
    out: PathBuf,
}

/// Which images `encode` encodes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EncodeSplit {
    Train,
    Test,
    /// The train split, then the test split: every image (of a folder, every file that
    /// decodes), as latents cached for a diffusion model want.
    All,
}

/// Images decoded from latents: those `vae encode` wrote, or a diffusion model's samples.
#[derive(Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A safetensors file of latents: `[N, C, h, w]` for --arch resnet (any h and w), `[N, D]`
    /// for --arch conv.
    latents: PathBuf,
    /// Which tensor of the file [default: its only one, or `mean`, as vae encode writes].
    #[arg(long)]
    key: Option<String>,
    /// The latents are scaled as a diffusion model takes them, by the latent scale the model
    /// declares (a diffusers folder's, or the one its run started from): undone before decoding.
    #[arg(long, conflicts_with = "scaling_factor")]
    scaled: bool,
    /// The latents were multiplied by this factor (a diffusion model's scale): divided out
    /// before decoding.
    #[arg(long)]
    scaling_factor: Option<f64>,
    /// Images in the grid.
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// PNG grid to write [default: decode.png in the checkpoint's folder].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write every image as a PNG of its own into this new or empty folder, named after
    /// the file vae encode lists for its latent (an image folder's), else numbered.
    #[arg(long)]
    each: Option<PathBuf>,
    #[command(flatten)]
    tiles: TileArgs,
}

/// A diffusers AutoencoderKL folder (config.json, diffusion_pytorch_model.safetensors) from a
/// checkpoint of --arch resnet, which `AutoencoderKL.from_pretrained(DIR)` loads.
#[derive(Args)]
pub struct ExportDiffusersArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The folder to write (new, or empty).
    out: PathBuf,
    /// The scaling_factor to write [default: the one the diffusers folder the run started from
    /// declares (with its shift_factor, latents_mean and latents_std), which a diffusion model
    /// trained on its latents expects; else 1 / the standard deviation of the latents of the
    /// first 2048 training images, which needs the run's data].
    #[arg(long)]
    scaling_factor: Option<f64>,
}

/// A single safetensors file in the original Stable Diffusion (LDM) layout from a checkpoint of
/// --arch resnet, as `vae-ft-mse-840000-ema-pruned.safetensors` is shared: what AUTOMATIC1111's
/// web UI and ComfyUI load as a VAE, and diffusers' `from_single_file`.
#[derive(Args)]
pub struct ExportSingleFileArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The file to write (new), e.g. my-vae.safetensors.
    out: PathBuf,
}

impl Loaded {
    /// The architecture of an autoencoder the exports write, and its weights (sorted by name).
    fn exported(&self) -> Result<(&vae::models::ResnetConfig, Vec<(String, tch::Tensor)>)> {
        let vae::models::ModelConfig::Resnet(arch) = &self.config.model else {
            bail!(
                "{} is an --arch conv model; only --arch resnet models are diffusers AutoencoderKLs",
                self.path.display()
            )
        };
        let mut weights: Vec<(String, tch::Tensor)> = self.vs.variables().into_iter().collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((arch, weights))
    }
}

impl ExportSingleFileArgs {
    pub fn run(&self, matches: &ArgMatches) -> Result<()> {
        let loaded = self.model.load(matches)?;
        let (arch, weights) = loaded.exported()?;
        vae::pretrained::write_single_file(&self.out, arch, &weights)?;
        // The layout has no field for it: the tool loading the file applies its diffusion
        // model's own scale.
        let scale = match &loaded.latent_scale {
            Some(kept) => {
                format!("{}, as the diffusers folder the weights come from declares", kept.scaling_factor)
            }
            None => "Stable Diffusion 1 and 2 use 0.18215".into(),
        };
        vae::say!(
            "wrote {} (the original Stable Diffusion layout; it holds no scaling_factor, so the tool that \
             loads it applies its diffusion model's own: {scale})",
            self.out.display()
        );
        Ok(())
    }
}

impl ExportDiffusersArgs {
    pub fn run(&self, matches: &ArgMatches) -> Result<()> {
        let loaded = self.model.load(matches)?;
        let (arch, weights) = loaded.exported()?;
        let (scale, whence) = match (self.scaling_factor, &loaded.latent_scale) {
            (Some(scale), _) => {
                ensure!(scale.is_finite() && scale > 0.0, "--scaling-factor must be positive, found {scale}");
                (LatentScale::factor(scale), "")
            }
            (None, Some(kept)) => (kept.clone(), ", as the diffusers folder the weights come from declares"),
            (None, None) => {
                let train = loaded.split(Split::Train).context(
                    "measuring the latents' scale on the training split (or give --scaling-factor)",
                )?;
                let model = loaded.model.as_ref();
                let measured =
                    vae::eval::LatentMoments::measure(model, &train, loaded.config.seed, loaded.device)?
                        .scaling_factor();
                // A diffusion model already trained on these latents (a single-file VAE declares
                // no scale) expects its own, which no measurement recovers.
                let hint = ", 1 / the latents' standard deviation; for a diffusion model that already \
                            takes them, give its own with --scaling-factor (Stable Diffusion 1 and 2: 0.18215)";
                (LatentScale::factor(measured), hint)
            }
        };
        vae::pretrained::write_folder(&self.out, arch, &weights, &scale)?;
        vae::say!("wrote {} (scaling_factor {:.5}{whence})", self.out.display(), scale.scaling_factor);
        Ok(())
    }
}

impl DecodeArgs {
    pub fn run(&self, matches: &ArgMatches) -> Result<()> {
        let Self { model: args, latents, key, scaled, scaling_factor, n, out, each, tiles } = self;
        ensure!(*n > 0, "--n must be positive");
        if let Some(factor) = scaling_factor {
            ensure!(factor.is_finite() && *factor > 0.0, "--scaling-factor must be positive, found {factor}");
        }
        if let Some(dir) = each {
            vae::fsio::check_new_folder(dir).map_err(|e| anyhow::anyhow!("--each {e}"))?;
        }
        let loaded = args.load(matches)?;
        let latents = vae::export::Latents::open(latents, key.as_deref())?;
        let model = &loaded.config.model;
        let hw = model.decoded_size(&latents.shape).with_context(|| {
            let shape = model.latent_shape();
            let takes = if shape.len() == 1 { shape[0].to_string() } else { format!("{}, h, w", shape[0]) };
            format!(
                "{}: {} is {:?}; {} decodes latents of [N, {takes}]",
                latents.path.display(),
                latents.key,
                latents.shape,
                loaded.path.display()
            )
        })?;
        let tile = tiles.tile(model, hw)?;
        ensure!(
            !scaled || loaded.latent_scale.is_some(),
            "--scaled: {} declares no latent scale (a diffusers folder's scaling_factor, or the one the \
             folder its run started from declares); give the factor with --scaling-factor",
            loaded.path.display()
        );
        let unscale = |z: tch::Tensor| match (scaled, scaling_factor, &loaded.latent_scale) {
            (true, _, Some(scale)) => scale.unscale(&z),
            (_, Some(factor), _) => &z / *factor,
            _ => z,
        };
        let count = latents.count();
        let chunks =
            || vae::models::passes(count as i64, 64).map(|(first, len)| (first as usize, len as usize));
        if each.is_some() {
            // Every value checked (as it is read) before any picture of its own is written.
            for (first, len) in chunks() {
                drop(latents.rows(first, len)?);
            }
        }
        let names =
            each.as_ref().map(|_| vae::export::png_names(latents.files.as_deref(), count)).transpose()?;
        let mut grid = Vec::new();
        // A chunk at a time: a large file is never read or decoded whole.
        for (first, len) in chunks() {
            let z = unscale(latents.rows(first, len)?).to_device(loaded.device);
            let images = vae::export::decoded(loaded.model.as_ref(), &z, hw, tile);
            if first < *n {
                grid.push(images.narrow(0, 0, len.min(*n - first) as i64).to_device(tch::Device::Cpu));
            }
            if let (Some(dir), Some(names)) = (each, &names) {
                vae::export::save_each(dir, &names[first..], &images)?;
            }
            if each.is_none() && first + len >= *n {
                break;
            }
        }
        let grid = tch::Tensor::cat(&grid, 0);
        let path = loaded.output(out, "decode.png")?;
        let cols = vae::export::GRID_COLS.min(grid.size()[0] as usize);
        vae::export::save_grid(&path, &grid, cols)?;
        saved(&path);
        if let Some(dir) = each {
            vae::say!("wrote {count} images into {}", dir.display());
        }
        Ok(())
    }
}

impl EncodeArgs {
    pub fn run(&self, matches: &ArgMatches) -> Result<()> {
        let Self { model: args, split, out } = self;
        vae::fsio::check_replaceable(out, "latents of vae encode", vae::export::is_latents)?;
        let loaded = args.load(matches)?;
        let [train, test] = loaded.splits()?;
        let splits = match split {
            EncodeSplit::Train => vec![train],
            EncodeSplit::Test => vec![test],
            EncodeSplit::All => vec![train, test],
        };
        vae::export::write_latents(
            out,
            loaded.model.as_ref(),
            &splits,
            &loaded.config.model.latent_shape(),
            loaded.device,
        )?;
        saved(out);
        Ok(())
    }
}
