//! The `vae` command line: a thin layer of clap over the library.

mod cli;

use anyhow::{ensure, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use cli::inspect::{self, ModelArgs, Split};
use cli::train::TrainArgs;
use std::path::{Path, PathBuf};
use vae::bench::BenchOptions;
use vae::checkpoint::Checkpoint;
use vae::data::{DataConfig, DatasetKind};
use vae::precision::Precision;
use vae::train::TrainConfig;

#[derive(Parser)]
#[command(name = "vae", version, about = "Train convolutional variational auto-encoders on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a VAE; writes checkpoints and pictures into a run folder.
    Train(Box<TrainArgs>),
    /// Print a checkpoint's config, progress, parameter count and tensors.
    Info {
        /// A checkpoint file or a run folder.
        checkpoint: PathBuf,
    },
    /// Measure training throughput of the default model (scripts/bench compares it with
    /// PyTorch); prints one JSON line.
    Bench(BenchArgs),
    /// The negative ELBO and the importance-weighted bound on a split, in nats per image and
    /// bits per dimension.
    Eval {
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
    },
    /// Originals above their reconstructions: test images, or your own image files.
    Reconstruct {
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
    },
    /// Decoded draws from the prior.
    Sample {
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
    },
    /// Paths between the latents of pairs of test images, one pair per row.
    Interpolate {
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
    },
    /// One row per latent dimension: a test image's latent with that dimension swept over
    /// [-3, 3], the dimensions carrying the most KL first.
    Traverse {
        #[command(flatten)]
        model: ModelArgs,
        /// Dimensions to sweep, in this order [default: all, by decreasing average KL].
        #[arg(long, value_delimiter = ',')]
        dims: Vec<i64>,
        /// Which test image.
        #[arg(long, default_value_t = 0)]
        index: usize,
        #[arg(long, default_value_t = 11)]
        steps: i64,
        /// PNG to write [default: traverse.png in the checkpoint's folder].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Posterior means and log-variances (and labels, where the data has them) of a split,
    /// as a safetensors file.
    Encode {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_enum, default_value = "test")]
        split: Split,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, value_enum, default_value = "fashion-mnist")]
    dataset: DatasetKind,
    /// Folder of the dataset's files [default: the dataset's usual place].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Side of a folder's crops.
    #[arg(long, default_value_t = 64)]
    image_size: i64,
    /// Where a folder's decoded images are cached (none: decode every time).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Memory a folder's decoded images may take before they stream from the cache file.
    #[arg(long, value_parser = cli::parse_size)]
    max_memory: Option<u64>,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[arg(long)]
    threads: Option<i32>,
    /// Untimed steps first (allocator, kernel choice, caches).
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Time loading the data, one epoch and the test evaluation instead.
    #[arg(long)]
    full_epoch: bool,
    /// Then run the timed steps again, split into data, forward, backward and optimizer.
    #[arg(long)]
    profile: bool,
}

pub(crate) fn set_threads(threads: Option<i32>) -> Result<()> {
    if let Some(threads) = threads {
        ensure!(threads >= 1, "--threads must be at least 1, found {threads}");
        tch::set_num_threads(threads);
    }
    Ok(())
}

fn info(path: &Path) -> Result<()> {
    let ckpt = Checkpoint::load(&Checkpoint::resolve(path)?)?;
    print!("{}", ckpt.describe()?);
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    set_threads(args.threads)?;
    let device = vae::device::parse_device(&args.device)?;
    args.precision.check_device(device)?;
    let cfg = TrainConfig {
        data: DataConfig {
            kind: args.dataset,
            data_dir: args.data_dir,
            image_size: args.image_size,
            channels: 3,
            cache_dir: args.cache_dir,
            max_memory: args.max_memory,
            ..DataConfig::default()
        },
        batch_size: args.batch_size,
        precision: args.precision,
        ..TrainConfig::default()
    };
    let opts = BenchOptions {
        warmup: args.warmup,
        steps: args.steps,
        full_epoch: args.full_epoch,
        profile: args.profile,
    };
    println!("{}", serde_json::to_string(&vae::bench::run(cfg, device, opts)?)?);
    Ok(())
}

/// Keeps glibc from returning large freed blocks to the kernel: libtorch frees and
/// reallocates same-sized tensors every step, and with glibc's defaults each one is a fresh
/// mmap whose pages fault in again. Measured on `vae eval --iw-samples 100`: 62 s (42 s of it
/// in the kernel) before, 37 s after; training steps are unchanged.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() -> Result<()> {
    keep_freed_memory();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Train(args) => {
            let sub = matches.subcommand_matches("train").expect("train was parsed");
            cli::train::train(*args, sub)
        }
        Command::Info { checkpoint } => info(&checkpoint),
        Command::Bench(args) => bench(args),
        Command::Eval { model, split, iw_samples, json } => inspect::eval(&model, split, iw_samples, json),
        Command::Reconstruct { model, n, input, out } => inspect::reconstruct(&model, n, &input, &out),
        Command::Sample { model, n, temperature, seed, out } => {
            inspect::sample(&model, n, temperature, seed, &out)
        }
        Command::Interpolate { model, pairs, steps, slerp, out } => {
            inspect::interpolate(&model, pairs, steps, slerp, &out)
        }
        Command::Traverse { model, dims, index, steps, out } => {
            inspect::traverse(&model, &dims, index, steps, &out)
        }
        Command::Encode { model, split, out } => inspect::encode(&model, split, &out),
    }
}
