//! The commands that read a checkpoint: `eval` and the exports (`reconstruct`, `sample`,
//! `interpolate`, `traverse`, `encode`).

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use vae::checkpoint::Checkpoint;
use vae::train::TrainConfig;

/// A checkpoint to read, and where to run it.
#[derive(Args)]
pub struct ModelArgs {
    /// A checkpoint file or a run folder (its last.safetensors).
    checkpoint: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Where the dataset's files are, if not where the run found them.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Memory an image folder's decoded images may take before they stream from the cache
    /// file (e.g. 8G) [default: half the memory available].
    #[arg(long, value_parser = super::parse_size)]
    max_memory: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    Test,
}

/// A checkpoint's model on the chosen device, with its run config.
struct Loaded {
    ckpt: Checkpoint,
    model: vae::model::Vae,
    device: tch::Device,
    _vs: tch::nn::VarStore,
}

impl ModelArgs {
    fn load(&self) -> Result<Loaded> {
        let device = vae::device::parse_device(&self.device)?;
        let ckpt = Checkpoint::load(&Checkpoint::resolve(&self.checkpoint)?)?;
        let (vs, model) = ckpt.model(device)?;
        Ok(Loaded { ckpt, model, device, _vs: vs })
    }
}

impl Loaded {
    fn config(&self) -> &TrainConfig {
        &self.ckpt.meta.config
    }

    /// The run's data, as trained on (binarized the same way), from `--data-dir` if given.
    fn split(&self, args: &ModelArgs, split: Split) -> Result<vae::data::Dataset> {
        let mut data = self.config().data.clone();
        if args.data_dir.is_some() {
            data.data_dir = args.data_dir.clone();
        }
        data.max_memory = args.max_memory;
        let splits = data.load(self.config().seed)?;
        let raw = if split == Split::Train { splits.train } else { splits.test };
        Ok(vae::eval::prepared(&raw, self.config()))
    }

    /// `out`, or `name` beside the checkpoint.
    fn output(&self, out: &Option<PathBuf>, name: &str) -> PathBuf {
        out.clone().unwrap_or_else(|| self.ckpt.path.with_file_name(name))
    }
}

fn saved(path: &Path) {
    println!("wrote {}", path.display());
}

pub fn eval(args: &ModelArgs, split: Split, iw_samples: i64, json: bool) -> Result<()> {
    ensure!(iw_samples >= 0, "--iw-samples must be 0 or more, found {iw_samples}");
    let loaded = args.load()?;
    let data = loaded.split(args, split)?;
    let name = if split == Split::Train { "train" } else { "test" };
    let progress = if json || iw_samples == 0 {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(data.len() as u64)
    };
    let report = vae::eval::evaluate(
        &loaded.model,
        loaded.config(),
        &data,
        name,
        iw_samples,
        loaded.device,
        &progress,
    )?;
    progress.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} split of {}, {} images",
        loaded.ckpt.path.display(),
        name,
        loaded.config().data.name(),
        report.images
    );
    println!(
        "negative ELBO  {:.2} nats/image (reconstruction {:.2}, KL {:.2})  {:.4} bits/dim",
        report.negative_elbo, report.reconstruction, report.kl, report.elbo_bits_per_dim
    );
    if let (Some(nll), Some(bpd)) = (report.iwae_nll, report.iwae_bits_per_dim) {
        println!(
            "IWAE (K={})   {nll:.2} nats/image  {bpd:.4} bits/dim  ({:.1}s)",
            report.iw_samples, report.seconds
        );
    }
    Ok(())
}

pub fn reconstruct(args: &ModelArgs, n: usize, input: &[PathBuf], out: &Option<PathBuf>) -> Result<()> {
    ensure!(n > 0, "--n must be positive");
    let loaded = args.load()?;
    let x = if input.is_empty() {
        vae::export::first_images(&loaded.split(args, Split::Test)?, n, loaded.device)?
    } else {
        let m = &loaded.config().model;
        let images = input
            .iter()
            .map(|p| vae::data::image_file::load(p, m.in_channels, m.image_size))
            .collect::<Result<Vec<_>>>()?;
        vae::data::to_unit_float(&tch::Tensor::stack(&images, 0)).to_device(loaded.device)
    };
    let cols = vae::export::GRID_COLS.min(x.size()[0] as usize);
    let path = loaded.output(out, "reconstruct.png");
    vae::export::save_grid(&path, &vae::export::reconstruction_grid(&loaded.model, &x, cols), cols)?;
    saved(&path);
    Ok(())
}

pub fn sample(
    args: &ModelArgs,
    n: usize,
    temperature: f64,
    seed: Option<u64>,
    out: &Option<PathBuf>,
) -> Result<()> {
    ensure!(n > 0, "--n must be positive");
    ensure!(
        temperature > 0.0 && temperature.is_finite(),
        "--temperature must be positive, found {temperature}"
    );
    let loaded = args.load()?;
    vae::rng::seed_torch(seed.unwrap_or(loaded.config().seed), vae::rng::Stream::Eval, u64::MAX);
    let images = vae::export::samples(&loaded.model, n as i64, temperature, loaded.device);
    let path = loaded.output(out, "sample.png");
    vae::export::save_grid(&path, &images, (n as f64).sqrt().ceil() as usize)?;
    saved(&path);
    Ok(())
}

pub fn interpolate(
    args: &ModelArgs,
    pairs: usize,
    steps: i64,
    slerp: bool,
    out: &Option<PathBuf>,
) -> Result<()> {
    ensure!(pairs > 0, "--pairs must be positive");
    ensure!(steps >= 2, "--steps must be at least 2 (the two ends), found {steps}");
    let loaded = args.load()?;
    let test = loaded.split(args, Split::Test)?;
    ensure!(
        test.len() >= 2 * pairs,
        "--pairs {pairs} needs {} test images, the split has {}",
        2 * pairs,
        test.len()
    );
    let x = vae::export::first_images(&test, 2 * pairs, loaded.device)?;
    let (first, second) = (x.narrow(0, 0, pairs as i64), x.narrow(0, pairs as i64, pairs as i64));
    let grid = vae::export::interpolation_grid(&loaded.model, &first, &second, steps, slerp);
    let path = loaded.output(out, "interpolate.png");
    vae::export::save_grid(&path, &grid, steps as usize + 2)?;
    saved(&path);
    Ok(())
}

pub fn traverse(
    args: &ModelArgs,
    dims: &[i64],
    index: usize,
    steps: i64,
    out: &Option<PathBuf>,
) -> Result<()> {
    ensure!(steps >= 2, "--steps must be at least 2, found {steps}");
    let loaded = args.load()?;
    let latent = loaded.config().model.latent_dim;
    if let Some(bad) = dims.iter().find(|&&d| d < 0 || d >= latent) {
        bail!("--dims {bad} is not a latent dimension: the model has {latent} (0..{})", latent - 1);
    }
    let test = loaded.split(args, Split::Test)?;
    ensure!(index < test.len(), "--index {index} is past the test split's {} images", test.len());
    let dims = if dims.is_empty() {
        let (mean, logvar) = vae::export::encode_all(&loaded.model, &test, loaded.device)?;
        let kl = vae::export::kl_per_dimension(&mean, &logvar);
        let mut order: Vec<i64> = (0..latent).collect();
        order.sort_by(|&a, &b| kl[b as usize].total_cmp(&kl[a as usize]));
        order
    } else {
        dims.to_vec()
    };
    let image = vae::data::to_unit_float(&test.images(index, 1)?).to_device(loaded.device);
    let grid = vae::export::traversal_grid(&loaded.model, &image, &dims, steps, 3.0);
    let path = loaded.output(out, "traverse.png");
    vae::export::save_grid(&path, &grid, steps as usize)?;
    saved(&path);
    Ok(())
}

pub fn encode(args: &ModelArgs, split: Split, out: &Path) -> Result<()> {
    let loaded = args.load()?;
    let data = loaded.split(args, split)?;
    let (mean, logvar) = vae::export::encode_all(&loaded.model, &data, loaded.device)?;
    let mut named = vec![("mean", mean), ("logvar", logvar)];
    if let Some(labels) = &data.labels {
        named.push(("labels", labels.shallow_clone()));
    }
    tch::Tensor::write_safetensors(&named, out).with_context(|| format!("writing {}", out.display()))?;
    saved(out);
    Ok(())
}
