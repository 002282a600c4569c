//! The commands that read a checkpoint and judge or draw it: `eval`, and the pictures
//! (`reconstruct`, `sample`, `interpolate`, `traverse`); what every command that reads one
//! shares (`ModelArgs`, `Loaded`).

use anyhow::{bail, ensure, Result};
use clap::{ArgMatches, Args};
use std::path::{Path, PathBuf};
use vae::checkpoint::{Checkpoint, LatentScale};
use vae::config::TrainConfig;
use vae::data::DataArgs;
use vae::device::DeviceArgs;
use vae::eval::Options;
use vae::models::Model;

/// A checkpoint to read, and where to run it.
#[derive(Args)]
pub struct ModelArgs {
    /// A checkpoint file, a run folder (its last.safetensors), or a diffusers AutoencoderKL
    /// folder (or a pipeline's, with its vae/ folder), judged on the data --dataset chooses.
    checkpoint: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Use the trained weights, not their moving average (where the run kept one).
    #[arg(long)]
    no_ema: bool,
}

/// Encoding and decoding in tiles, for images and latents larger than memory allows whole.
#[derive(Args)]
pub struct TileArgs {
    /// Encode and decode in overlapping tiles of this side in pixels [bare: the model's training
    /// image size], blended as diffusers' enable_tiling() does: the memory of one tile at any
    /// size, for results a little different from untiled ones (each tile sees only itself).
    /// --arch resnet.
    #[arg(long, value_name = "PIXELS", num_args = 0..=1)]
    tile: Option<Option<i64>>,
}

impl TileArgs {
    /// The tiles asked for, checked against the model. Without them, images of `[h, w]` more
    /// than 4 times the model's area get a note: their memory grows with the area (an SD-sized
    /// VAE took 4.7 GiB for 1024 x 1024 on the CPU, 8.9 for 1536 x 1536), and the kernel's
    /// out-of-memory kill would say nothing.
    pub(super) fn tile(
        &self,
        model: &vae::models::ModelConfig,
        [h, w]: [i64; 2],
    ) -> Result<Option<vae::models::Tile>> {
        let Some(pixels) = self.tile else {
            let [_, side, _] = model.image_shape();
            if model.arch() == vae::models::Arch::Resnet && h * w > 4 * side * side {
                vae::note!(
                    "note: {w} x {h} images go through the model whole, in memory that grows with their area \
                     ({side} x {side} trained); --tile bounds it to one tile's"
                );
            }
            return Ok(None);
        };
        model.tile(pixels).map(Some)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    Test,
}

/// A model on the chosen device, with the config that judges it: a checkpoint's run config,
/// or, for a diffusers folder, one made from the data flags.
pub(super) struct Loaded {
    /// The checkpoint file, or the diffusers folder as given (a pipeline's, not its `vae/`).
    pub(super) path: PathBuf,
    pub(super) diffusers: bool,
    /// Whether `--dataset` was given: a diffusers folder is judged only on data named.
    pub(super) data_named: bool,
    /// The images the checkpoint's run trained on, where it says.
    pub(super) trained_on: Option<vae::data::Fingerprint>,
    /// How a diffusion model takes the latents: as the folder says, or as the diffusers
    /// folder the run started from said.
    pub(super) latent_scale: Option<LatentScale>,
    pub(super) config: TrainConfig,
    pub(super) model: Box<dyn Model>,
    pub(super) device: tch::Device,
    pub(super) vs: tch::nn::VarStore,
}

impl ModelArgs {
    /// `matches`: the command line, to tell the data flags given from their defaults.
    pub(super) fn load(&self, matches: &ArgMatches) -> Result<Loaded> {
        let device = self.device.init()?;
        if let Some(dir) = vae::pretrained::diffusers_folder(&self.checkpoint) {
            self.data.check_flags(matches)?;
            let arch = vae::pretrained::read_config(&dir)?;
            let config = TrainConfig::pretrained(arch, &self.data, &dir)?;
            let (vs, model) = vae::pretrained::model(&dir, &config, device)?;
            // Named in full, so that `.` or `dir/` still name the folder, not a place in it.
            let path = self.checkpoint.canonicalize().unwrap_or_else(|_| self.checkpoint.clone());
            let data_named = matches.value_source("dataset") == Some(clap::parser::ValueSource::CommandLine);
            return Ok(Loaded {
                path,
                diffusers: true,
                data_named,
                trained_on: None,
                latent_scale: vae::pretrained::latent_scale(&dir)?,
                config,
                model,
                device,
                vs,
            });
        }
        let ckpt = Checkpoint::load(&vae::run_dir::resolve(&self.checkpoint)?)?;
        let config = TrainConfig::located(&ckpt.meta.config, &self.data, matches, &ckpt.path)?;
        let (vs, model) = ckpt.model(device, !self.no_ema)?;
        let trained_on = ckpt.meta.data;
        let latent_scale = ckpt.meta.init_from.and_then(|o| o.latent_scale);
        Ok(Loaded {
            path: ckpt.path,
            diffusers: false,
            data_named: true,
            trained_on,
            latent_scale,
            config,
            model,
            device,
            vs,
        })
    }
}

impl Loaded {
    /// The data it is judged on, prepared as trained on (binarized the same way): the
    /// training split and the test split.
    pub(super) fn splits(&self) -> Result<[vae::data::Dataset; 2]> {
        ensure!(
            self.data_named,
            "{} is a diffusers folder, which has no data of its own: name the images to judge it on \
             with --dataset (your own: --dataset folder --data-dir DIR --image-size N)",
            self.path.display()
        );
        let splits = self.config.data.load(self.config.seed, false)?;
        // Figures on other images are not the run's (a folder that changed, another copy).
        if let Some(was) = self.trained_on {
            let now = splits.fingerprint()?;
            if now != was {
                let (data, path) = (self.config.data.name(), self.path.display());
                vae::note!("warning: the {data} images differ from those {path} was trained on ({was} then, {now} now)");
            }
        }
        Ok([splits.train, splits.test].map(|raw| vae::eval::prepared(&raw, &self.config)))
    }

    pub(super) fn split(&self, split: Split) -> Result<vae::data::Dataset> {
        let [train, test] = self.splits()?;
        Ok(if split == Split::Train { train } else { test })
    }

    /// `out`, or `name` beside the checkpoint (beside a diffusers folder, after its name: the
    /// model's folder is left as it is); a picture replaces only a picture.
    pub(super) fn output(&self, out: &Option<PathBuf>, name: &str) -> Result<PathBuf> {
        let path = out.clone().unwrap_or_else(|| match (self.diffusers, self.path.file_name()) {
            (true, Some(folder)) => self.path.with_file_name(format!("{}-{name}", folder.to_string_lossy())),
            _ => self.path.with_file_name(name),
        });
        vae::fsio::check_replaceable(&path, "a picture", vae::export::is_picture)?;
        Ok(path)
    }
}

/// The negative ELBO and the importance-weighted bound on a split, in nats per image and
/// bits per dimension.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_enum, default_value = "test")]
    split: Split,
    /// Importance samples per image for the IWAE bound (0: ELBO only).
    #[arg(long, default_value_t = 1000)]
    iw_samples: i64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// LPIPS (VGG, v0.1) weights, to report the perceptual distance of the reconstructions
    /// [default: the run's own, if it computed LPIPS (--perceptual-weight, --best-by lpips)].
    #[arg(long)]
    lpips_weights: Option<PathBuf>,
    /// pytorch-fid's Inception weights (scripts/fid_weights.py writes them), to report the
    /// rFID between the split's images and their reconstructions [default: the run's own, if
    /// it measured rFID (vae train --fid-weights)].
    #[arg(long)]
    fid_weights: Option<PathBuf>,
}

/// Originals above their reconstructions: test images, or your own image files.
#[derive(Args)]
pub struct ReconstructArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// How many test images.
    #[arg(long, default_value_t = 24)]
    n: usize,
    /// Image files to reconstruct instead, preprocessed like the training data.
    #[arg(long, num_args = 1..)]
    input: Vec<PathBuf>,
    /// PNG to write [default: reconstruct.png in the checkpoint's folder].
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    tiles: TileArgs,
}

/// Decoded draws from the prior.
#[derive(Args)]
pub struct SampleArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 64)]
    n: usize,
    /// Scales the prior's standard deviation (below 1: more typical, less varied).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Seed of the draws [default: the run's seed].
    #[arg(long)]
    seed: Option<u64>,
    /// PNG to write [default: sample.png in the checkpoint's folder].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Paths between the latents of pairs of test images, one pair per row.
#[derive(Args)]
pub struct InterpolateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Decoded points per path, ends included.
    #[arg(long, default_value_t = 10)]
    steps: i64,
    /// Spherical instead of linear interpolation.
    #[arg(long)]
    slerp: bool,
    /// PNG to write [default: interpolate.png in the checkpoint's folder].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One row per latent dimension: a test image's latent with that dimension swept over
/// [-3, 3], the dimensions carrying the most KL first.
#[derive(Args)]
pub struct TraverseArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Dimensions to sweep, in this order [default: all, by decreasing average KL].
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set)]
    dims: Vec<i64>,
    /// Which test image.
    #[arg(long, default_value_t = 0)]
    index: usize,
    #[arg(long, default_value_t = 11)]
    steps: i64,
    /// PNG to write [default: traverse.png in the checkpoint's folder].
    #[arg(long)]
    out: Option<PathBuf>,
}

pub(super) fn saved(path: &Path) {
    vae::say!("wrote {}", path.display());
}

impl EvalArgs {
    pub fn run(&self, matches: &ArgMatches) -> Result<()> {
        let Self { model: args, split, iw_samples, json, lpips_weights, fid_weights } = self;
        let (split, iw_samples, json) = (*split, *iw_samples, *json);
        ensure!(iw_samples >= 0, "--iw-samples must be 0 or more, found {iw_samples}");
        let loaded = args.load(matches)?;
        let [train, test] = loaded.splits()?;
        let data = if split == Split::Train { &train } else { &test };
        let name = if split == Split::Train { "train" } else { "test" };
        let progress = if json || iw_samples == 0 {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(data.len() as u64)
        };
        let model = loaded.model.as_ref();
        let cfg = &loaded.config;
        // The figures the run measured, with its own weights unless told otherwise.
        let lpips = lpips_weights.as_ref().or(cfg.lpips_weights.as_ref().filter(|_| cfg.uses_lpips()));
        let lpips = lpips.map(|path| vae::perceptual::Lpips::load(path, loaded.device)).transpose()?;
        let fid = fid_weights.as_ref().or(cfg.fid_weights.as_ref());
        let fid = fid.map(|path| vae::fid::Inception::load(path, loaded.device)).transpose()?;
        let mut report = vae::eval::evaluate(
            model,
            cfg,
            data,
            name,
            Options { iw_samples, lpips: lpips.as_ref(), fid: fid.as_ref() },
            loaded.device,
            &progress,
        )?;
        let moments = vae::eval::LatentMoments::measure(model, &train, loaded.config.seed, loaded.device)?;
        report.scaling_factor = Some(moments.scaling_factor());
        if let Some(scale) = &loaded.latent_scale {
            let (offset, factor) = scale.per_channel(model.latent_channels() as usize);
            report.scaled_latents = Some(moments.mapped(&offset, &factor).summary());
        }
        progress.finish_and_clear();
        if json {
            vae::say!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
        vae::say!(
            "{}: {} split of {}, {} images",
            loaded.path.display(),
            name,
            loaded.config.data.name(),
            report.images
        );
        let unit = model.likelihood().unit();
        match report.elbo_bits_per_dim {
            Some(bpd) => vae::say!(
                "negative ELBO  {:.2} {unit} (reconstruction {:.2}, KL {:.2})  {bpd:.4} bits/dim",
                report.negative_elbo,
                report.reconstruction,
                report.kl
            ),
            None => {
                let cfg = &loaded.config;
                // The rest of the loss is the perceptual term, on a run that trained with one.
                let perceptual = report.negative_elbo - report.reconstruction - cfg.beta * report.kl;
                let perceptual = if cfg.perceptual_weight > 0.0 {
                    format!(" + perceptual {perceptual:.2}")
                } else {
                    String::new()
                };
                vae::say!(
                    "loss           {:.2} {unit}: reconstruction {:.2}{perceptual} + {:e} x KL {:.2} (the \
                     training loss; not a bound on log p(x), so no IWAE)",
                    report.negative_elbo,
                    report.reconstruction,
                    cfg.beta,
                    report.kl
                )
            }
        }
        if let (Some(nll), Some(bpd)) = (report.iwae_nll, report.iwae_bits_per_dim) {
            vae::say!(
                "IWAE (K={})   {nll:.2} nats/image  {bpd:.4} bits/dim  ({:.1}s)",
                report.iw_samples,
                report.seconds
            );
        }
        let q = &report.quality;
        let ssim = q.ssim.map_or("n/a (images under 11 pixels)".to_string(), |s| format!("{s:.4}"));
        let lpips = q.lpips.map(|d| format!("  LPIPS {d:.4}")).unwrap_or_default();
        vae::say!(
            "reconstructions  PSNR {:.2} dB  SSIM {ssim}  L1 {:.4}  MSE {:.5} (pixels in [0, 1]){lpips}",
            q.psnr_db,
            q.l1,
            q.mse
        );
        if let Some(rfid) = report.rfid {
            // FID's bias grows as the images get fewer; papers use 10,000 to 50,000.
            let few =
                if report.images < 10_000 { " (few images for FID: compare at the same count)" } else { "" };
            vae::say!("rFID  {rfid:.3} between the {} images and their reconstructions{few}", report.images);
        }
        vae::say!(
            "latents  KL {:.4} nats per element  scale factor {:.5} (1 / std over the training split)",
            report.kl_per_latent_element,
            report.scaling_factor.unwrap_or(f64::NAN)
        );
        if let (Some(scaled), Some(scale)) = (&report.scaled_latents, &loaded.latent_scale) {
            let whose =
                if loaded.diffusers { "the folder" } else { "the diffusers folder the run started from" };
            let stds: Vec<String> = scaled.channel_std.iter().map(|s| format!("{s:.3}")).collect();
            vae::say!(
                "         as a diffusion model takes them, {} ({whose} declares it): mean {:.4}  std {:.4}  \
                 (per channel std {})",
                scale.formula(),
                scaled.mean,
                scaled.std,
                stds.join(" ")
            );
        }
        Ok(())
    }
}

impl ReconstructArgs {
    pub fn run(&self, matches: &ArgMatches) -> Result<()> {
        let Self { model: args, n, input, out, tiles } = self;
        let n = *n;
        ensure!(n > 0, "--n must be positive");
        let loaded = args.load(matches)?;
        let x = if input.is_empty() {
            vae::export::first_images(&loaded.split(Split::Test)?, n, loaded.device)?
        } else {
            let [channels, side, _] = loaded.config.model.image_shape();
            let images = input
                .iter()
                .map(|p| match &loaded.config.model {
                    // Fully convolutional: each image at its own resolution.
                    vae::models::ModelConfig::Resnet(arch) => {
                        vae::data::image_file::load_native(p, channels, arch.downscale() as u32)
                    }
                    vae::models::ModelConfig::Conv(_) => vae::data::image_file::load(p, channels, side),
                })
                .collect::<Result<Vec<_>>>()?;
            if let Some((i, other)) = images.iter().enumerate().find(|(_, t)| t.size() != images[0].size()) {
                bail!(
                    "{} is {:?} (channels, height, width) after cropping, {} {:?}: one grid needs one size; \
                     reconstruct them one at a time",
                    input[i].display(),
                    other.size(),
                    input[0].display(),
                    images[0].size()
                );
            }
            vae::data::to_unit_float(&tch::Tensor::stack(&images, 0)).to_device(loaded.device)
        };
        let tile = tiles.tile(&loaded.config.model, [x.size()[2], x.size()[3]])?;
        let cols = vae::export::GRID_COLS.min(x.size()[0] as usize);
        let path = loaded.output(out, "reconstruct.png")?;
        vae::export::save_grid(
            &path,
            &vae::export::reconstruction_grid(loaded.model.as_ref(), &x, cols, tile),
            cols,
        )?;
        saved(&path);
        Ok(())
    }
}

impl SampleArgs {
    pub fn run(&self, matches: &ArgMatches) -> Result<()> {
        let Self { model: args, n, temperature, seed, out } = self;
        let (n, temperature, seed) = (*n, *temperature, *seed);
        ensure!(n > 0, "--n must be positive");
        ensure!(
            temperature > 0.0 && temperature.is_finite(),
            "--temperature must be positive, found {temperature}"
        );
        let loaded = args.load(matches)?;
        if loaded.diffusers || loaded.config.beta < 0.1 {
            let trained = if loaded.diffusers {
                "a KL-autoencoder (latent diffusion trains these with a KL weight of about 1e-6)".to_string()
            } else {
                format!("trained with a KL weight of {:e}", loaded.config.beta)
            };
            vae::note!(
                "note: this model is {trained}, so its latents are far from N(0, I) and it is not a \
                 generative model of its own: these are the decoder's images of prior draws, not samples \
                 of the data (latent diffusion trains a diffusion model on the latents for that)"
            );
        }
        vae::rng::seed_torch(seed.unwrap_or(loaded.config.seed), vae::rng::Stream::Eval, u64::MAX);
        let [_, h, w] = loaded.config.model.image_shape();
        let images =
            vae::export::samples(loaded.model.as_ref(), n as i64, temperature, [h, w], loaded.device);
        let path = loaded.output(out, "sample.png")?;
        vae::export::save_grid(&path, &images, (n as f64).sqrt().ceil() as usize)?;
        saved(&path);
        Ok(())
    }
}

impl InterpolateArgs {
    pub fn run(&self, matches: &ArgMatches) -> Result<()> {
        let Self { model: args, pairs, steps, slerp, out } = self;
        let (pairs, steps, slerp) = (*pairs, *steps, *slerp);
        ensure!(pairs > 0, "--pairs must be positive");
        ensure!(steps >= 2, "--steps must be at least 2 (the two ends), found {steps}");
        let loaded = args.load(matches)?;
        let test = loaded.split(Split::Test)?;
        ensure!(
            test.len() >= 2 * pairs,
            "--pairs {pairs} needs {} test images, the split has {}",
            2 * pairs,
            test.len()
        );
        let x = vae::export::first_images(&test, 2 * pairs, loaded.device)?;
        let (first, second) = (x.narrow(0, 0, pairs as i64), x.narrow(0, pairs as i64, pairs as i64));
        let grid = vae::export::interpolation_grid(loaded.model.as_ref(), &first, &second, steps, slerp);
        let path = loaded.output(out, "interpolate.png")?;
        vae::export::save_grid(&path, &grid, steps as usize + 2)?;
        saved(&path);
        Ok(())
    }
}

impl TraverseArgs {
    pub fn run(&self, matches: &ArgMatches) -> Result<()> {
        let Self { model: args, dims, index, steps, out } = self;
        let (index, steps) = (*index, *steps);
        ensure!(steps >= 2, "--steps must be at least 2, found {steps}");
        let loaded = args.load(matches)?;
        let model = loaded.model.as_ref();
        let units = model.latent_channels();
        if let Some(bad) = dims.iter().find(|&&d| d < 0 || d >= units) {
            let what = if units == model.latent_dim() { "latent dimension" } else { "latent channel" };
            bail!("--dims {bad} is not a {what}: the model has {units} (0..{})", units - 1);
        }
        let test = loaded.split(Split::Test)?;
        ensure!(index < test.len(), "--index {index} is past the test split's {} images", test.len());
        let dims = if dims.is_empty() {
            // The channels carrying the most KL first.
            let (mean, logvar) = vae::export::encode_all(model, &test, loaded.device)?;
            let kl = vae::export::kl_per_dimension(&mean, &logvar);
            let width = kl.len() / units as usize;
            let per_unit: Vec<f64> = kl.chunks(width).map(|c| c.iter().sum()).collect();
            let mut order: Vec<i64> = (0..units).collect();
            order.sort_by(|&a, &b| per_unit[b as usize].total_cmp(&per_unit[a as usize]));
            order
        } else {
            dims.to_vec()
        };
        let image = vae::data::to_unit_float(&test.images(index, 1)?).to_device(loaded.device);
        let grid = vae::export::traversal_grid(loaded.model.as_ref(), &image, &dims, steps, 3.0);
        let path = loaded.output(out, "traverse.png")?;
        vae::export::save_grid(&path, &grid, steps as usize)?;
        saved(&path);
        Ok(())
    }
}
