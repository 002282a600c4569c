//! The `vae` command line: a thin layer of clap over the library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use vae::adam::AdamConfig;
use vae::data::{Binarize, DataConfig, DatasetKind};
use vae::loss::Likelihood;
use vae::model::VaeConfig;
use vae::train::{self, RunOptions, TrainConfig, Trainer};

#[derive(Parser)]
#[command(name = "vae", version, about = "Train convolutional variational auto-encoders on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a VAE; writes checkpoints and pictures into a run folder.
    Train(TrainArgs),
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct TrainArgs {
    /// Dataset to train on.
    #[arg(long, value_enum, default_value = "shapes")]
    dataset: DatasetKind,
    /// Folder of the dataset's files [default: the dataset's usual place, e.g.
    /// /usr/share/datasets/fashion-mnist].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Side of the generated images (shapes only) [default: 28].
    #[arg(long)]
    image_size: Option<i64>,
    /// Channels of the generated images (shapes only): 1 or 3.
    #[arg(long, default_value_t = 1)]
    channels: i64,
    /// Train images to use (shapes: how many to generate) [default: all; shapes 16000].
    #[arg(long)]
    train_size: Option<usize>,
    /// Test images to use (shapes: how many to generate) [default: all; shapes 2000].
    #[arg(long)]
    test_size: Option<usize>,
    /// How pixel intensities become targets.
    #[arg(long, value_enum, default_value = "none")]
    binarize: Binarize,
    /// Decoder distribution [default: bernoulli for 1 channel, gaussian for 3].
    #[arg(long, value_enum)]
    likelihood: Option<Likelihood>,
    /// Output channels of each stride-2 conv stage of the encoder.
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    conv_channels: Vec<i64>,
    /// Width of the hidden linear layer.
    #[arg(long, default_value_t = 256)]
    hidden: i64,
    /// Dimension of the latent space.
    #[arg(long, default_value_t = 16)]
    latent_dim: i64,
    #[arg(long, default_value_t = 10)]
    epochs: u64,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Weight of the KL term (1 gives the ELBO).
    #[arg(long, default_value_t = 1.0)]
    beta: f64,
    /// Seed of every random draw: initialisation, shuffling, noise, generated data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto, cpu, cuda or cuda:N; auto takes the first GPU when there is one.
    #[arg(long, default_value = "auto")]
    device: String,
    /// libtorch's intra-op threads [default: libtorch's choice, one per core].
    #[arg(long)]
    threads: Option<i32>,
    /// Run folder [default: checkpoints/<dataset>-<n>, the first n not taken].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write epoch-NNNN.safetensors every this many epochs (0: never).
    #[arg(long, default_value_t = 1)]
    save_every: u64,
    /// Periodic checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

impl TrainArgs {
    fn config(&self) -> TrainConfig {
        let data = DataConfig {
            kind: self.dataset,
            data_dir: self.data_dir.clone(),
            image_size: self.image_size.unwrap_or(28),
            channels: self.channels,
            train_size: self.train_size,
            test_size: self.test_size,
        };
        TrainConfig {
            model: VaeConfig {
                channels: self.conv_channels.clone(),
                hidden: self.hidden,
                latent_dim: self.latent_dim,
                ..VaeConfig::default()
            },
            data,
            adam: AdamConfig { lr: self.lr, ..AdamConfig::default() },
            epochs: self.epochs,
            batch_size: self.batch_size,
            beta: self.beta,
            seed: self.seed,
            binarize: self.binarize,
        }
    }
}

/// `checkpoints/<name>-<n>` with the first n whose folder does not exist yet.
fn fresh_run_dir(name: &str) -> PathBuf {
    (1..)
        .map(|n| Path::new("checkpoints").join(format!("{name}-{n}")))
        .find(|p| !p.exists())
        .expect("some n is free")
}

fn train(args: TrainArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        if threads < 1 {
            bail!("--threads must be at least 1, found {threads}");
        }
        tch::set_num_threads(threads);
    }
    let device = vae::device::parse_device(&args.device)?;
    let mut cfg = args.config();
    if args.image_size.is_some() && cfg.data.kind != DatasetKind::Shapes {
        bail!(
            "--image-size applies to the generated shapes only; {} images have a fixed size",
            cfg.data.name()
        );
    }
    // Validate what the flags alone decide before loading any data.
    cfg.model.image_size = cfg.data.image_size;
    cfg.model.in_channels = cfg.data.channels;
    cfg.validate()?;
    let splits = cfg.data.load(cfg.seed)?;
    let [c, h, _] = splits.train.image_shape();
    cfg.model.in_channels = c;
    cfg.model.image_size = h;
    cfg.model.likelihood =
        args.likelihood.unwrap_or(if c == 1 { Likelihood::Bernoulli } else { Likelihood::Gaussian });
    let out_dir = args.out.clone().unwrap_or_else(|| fresh_run_dir(cfg.data.name()));
    let last = out_dir.join(train::LAST);
    if last.exists() {
        bail!("{} already holds a checkpoint ({}); choose another --out", out_dir.display(), last.display());
    }
    let mut trainer = Trainer::new(cfg, device)?;
    let opts = RunOptions { out_dir, save_every: args.save_every, keep: args.keep, quiet: args.quiet };
    let summary = train::run(&mut trainer, &splits, &opts)?;
    if !args.quiet {
        let (_, test) = summary.epochs.last().context("no epoch ran")?;
        println!(
            "done: test loss {:.2} nats/image; checkpoints and pictures in {}",
            test.loss,
            summary.out_dir.display()
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Train(args) => train(args),
    }
}
