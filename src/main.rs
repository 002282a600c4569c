//! The `vae` command line: a thin layer of clap over the library.

use anyhow::{bail, ensure, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use vae::adam::AdamConfig;
use vae::bench::BenchOptions;
use vae::checkpoint::Checkpoint;
use vae::data::{Binarize, DataConfig, DatasetKind};
use vae::loss::Likelihood;
use vae::model::VaeConfig;
use vae::precision::Precision;
use vae::schedule::LrSchedule;
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

/// A checkpoint to read, and where to run it.
#[derive(Args)]
struct ModelArgs {
    /// A checkpoint file or a run folder (its last.safetensors).
    checkpoint: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Where the dataset's files are, if not where the run found them.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Split {
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
    /// Side of the generated shapes or of a folder's crops [default: 28 for shapes, 64 for
    /// folder].
    #[arg(long)]
    image_size: Option<i64>,
    /// Channels of the generated shapes or of a folder's images, 1 or 3 [default: 1 for
    /// shapes, 3 for folder].
    #[arg(long)]
    channels: Option<i64>,
    /// Share of a folder's files held out as the test split, chosen by a hash of each path.
    #[arg(long, default_value_t = 0.05)]
    test_fraction: f64,
    /// Where decoded image folders are cached, keyed by the listing and the transform.
    #[arg(long, default_value = "checkpoints/.cache")]
    cache_dir: PathBuf,
    /// Decode an image folder every time instead.
    #[arg(long)]
    no_cache: bool,
    /// Flip each training image left-right with probability 1/2 each time it is seen.
    #[arg(long)]
    hflip: bool,
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
    /// Epochs over which the KL weight rises linearly from 0 to --beta (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    kl_warmup_epochs: f64,
    /// Nats per latent dimension (batch-averaged) that the KL term does not penalise.
    #[arg(long, default_value_t = 0.0)]
    free_bits: f64,
    /// Largest global L2 norm of the gradients; larger ones are scaled down to it.
    #[arg(long)]
    clip_grad: Option<f64>,
    #[arg(long, value_enum, default_value = "constant")]
    lr_schedule: LrSchedule,
    /// Steps of linear learning-rate warm-up from 0.
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    /// L2 penalty added to the gradients, as torch.optim.Adam's weight_decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Seed of every random draw: initialisation, shuffling, noise, generated data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto, cpu, cuda or cuda:N; auto takes the first GPU when there is one.
    #[arg(long, default_value = "auto")]
    device: String,
    /// What the convs and matmuls compute in (weights and Adam stay float32); f16 needs CUDA.
    /// A resumed run may change it.
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
    /// libtorch's intra-op threads [default: libtorch's choice, one per core].
    #[arg(long)]
    threads: Option<i32>,
    /// Run folder [default: checkpoints/<dataset>-<n>, the first n not taken].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write epoch-NNNN.safetensors every this many epochs (0: never).
    #[arg(long, default_value_t = 1)]
    save_every: u64,
    /// Also rewrite last.safetensors every this many steps (0: once per epoch).
    #[arg(long, default_value_t = 0)]
    save_every_steps: u64,
    /// Continue the run of this checkpoint or run folder with its saved config; --epochs may
    /// raise the total, and --out writes the continuation elsewhere.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Periodic checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
    /// Write no TensorBoard event files.
    #[arg(long)]
    no_tensorboard: bool,
    /// Stop as diverged after this many steps in a row with a non-finite loss or gradient
    /// (each is skipped; the weights never see it).
    #[arg(long, default_value_t = 20)]
    max_bad_steps: u64,
}

impl TrainArgs {
    fn config(&self) -> TrainConfig {
        let data = DataConfig {
            kind: self.dataset,
            data_dir: self.data_dir.clone(),
            image_size: self.image_size.unwrap_or(if self.dataset == DatasetKind::Folder { 64 } else { 28 }),
            channels: self.channels.unwrap_or(if self.dataset == DatasetKind::Folder { 3 } else { 1 }),
            test_fraction: self.test_fraction,
            cache_dir: (!self.no_cache).then(|| self.cache_dir.clone()),
            train_size: self.train_size,
            test_size: self.test_size,
        };
        TrainConfig {
            model: VaeConfig {
                channels: self.conv_channels.clone(),
                hidden: self.hidden,
                latent_dim: self.latent_dim,
                likelihood: self.likelihood.unwrap_or(Likelihood::Bernoulli),
                ..VaeConfig::default()
            },
            data,
            adam: AdamConfig { lr: self.lr, weight_decay: self.weight_decay, ..AdamConfig::default() },
            epochs: self.epochs,
            batch_size: self.batch_size,
            beta: self.beta,
            seed: self.seed,
            binarize: self.binarize,
            precision: self.precision,
            lr_schedule: self.lr_schedule,
            warmup_steps: self.warmup_steps,
            kl_warmup_epochs: self.kl_warmup_epochs,
            free_bits: self.free_bits,
            clip_grad: self.clip_grad,
            hflip: self.hflip,
        }
    }
}

/// The flags that set a run's config, each with the value it sets: on `--resume` they must
/// agree with the checkpoint's config, since that config is what the run continues with.
type ConfigField = (&'static str, fn(&TrainConfig) -> String);
const RESUME_FIXED: &[ConfigField] = &[
    ("dataset", |c| c.data.name().into()),
    ("image_size", |c| c.data.image_size.to_string()),
    ("channels", |c| c.data.channels.to_string()),
    ("test_fraction", |c| c.data.test_fraction.to_string()),
    ("hflip", |c| c.hflip.to_string()),
    ("train_size", |c| format!("{:?}", c.data.train_size)),
    ("test_size", |c| format!("{:?}", c.data.test_size)),
    ("binarize", |c| format!("{:?}", c.binarize)),
    ("likelihood", |c| format!("{:?}", c.model.likelihood)),
    ("conv_channels", |c| format!("{:?}", c.model.channels)),
    ("hidden", |c| c.model.hidden.to_string()),
    ("latent_dim", |c| c.model.latent_dim.to_string()),
    ("batch_size", |c| c.batch_size.to_string()),
    ("lr", |c| c.adam.lr.to_string()),
    ("beta", |c| c.beta.to_string()),
    ("kl_warmup_epochs", |c| c.kl_warmup_epochs.to_string()),
    ("free_bits", |c| c.free_bits.to_string()),
    ("clip_grad", |c| format!("{:?}", c.clip_grad)),
    ("lr_schedule", |c| format!("{:?}", c.lr_schedule)),
    ("warmup_steps", |c| c.warmup_steps.to_string()),
    ("weight_decay", |c| c.adam.weight_decay.to_string()),
    ("seed", |c| c.seed.to_string()),
];

/// `checkpoints/<name>-<n>` with the first n whose folder does not exist yet.
fn fresh_run_dir(name: &str) -> PathBuf {
    (1..)
        .map(|n| Path::new("checkpoints").join(format!("{name}-{n}")))
        .find(|p| !p.exists())
        .expect("some n is free")
}

/// What a run starts from: a fresh model, or a checkpoint's state.
fn fresh_trainer(args: &TrainArgs, device: tch::Device) -> Result<(Trainer, vae::data::Splits, PathBuf)> {
    let mut cfg = args.config();
    let sized = matches!(cfg.data.kind, DatasetKind::Shapes | DatasetKind::Folder);
    if (args.image_size.is_some() || args.channels.is_some()) && !sized {
        bail!(
            "--image-size and --channels apply to shapes and folder only; {} images have a fixed shape",
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
        bail!(
            "{} already holds a checkpoint ({}); continue it with --resume {0} or choose another --out",
            out_dir.display(),
            last.display()
        );
    }
    Ok((Trainer::new(cfg, device)?, splits, out_dir))
}

fn resumed_trainer(
    args: &TrainArgs,
    matches: &ArgMatches,
    from: &Path,
    device: tch::Device,
) -> Result<(Trainer, vae::data::Splits, PathBuf)> {
    let explicit = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let path = Checkpoint::resolve(from)?;
    let ckpt = Checkpoint::load(&path)?;
    let saved = &ckpt.meta.config;
    let asked = args.config();
    for (flag, value) in RESUME_FIXED {
        let (was, now) = (value(saved), value(&asked));
        ensure!(
            !explicit(flag) || was == now,
            "--{} {now} conflicts with the checkpoint {}, trained with {was}; a resumed run keeps its config",
            flag.replace('_', "-"),
            path.display()
        );
    }
    let mut cfg = saved.clone();
    if explicit("epochs") {
        ensure!(
            args.epochs >= ckpt.meta.epoch,
            "--epochs {} is below the {} epochs {} has already completed",
            args.epochs,
            ckpt.meta.epoch,
            path.display()
        );
        cfg.epochs = args.epochs;
    }
    if explicit("data_dir") {
        cfg.data.data_dir = args.data_dir.clone();
    }
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let out_dir = args.out.clone().unwrap_or(folder);
    // Continuing an older checkpoint in place would overwrite a newer last.safetensors.
    let last = out_dir.join(train::LAST);
    if last.is_file() && !same_file(&last, &path) {
        let newer = Checkpoint::load(&last).map(|l| l.meta.step > ckpt.meta.step).unwrap_or(true);
        ensure!(
            !newer,
            "{} holds a later checkpoint than {} (step {}); continuing here would overwrite it: pass --out NEW_FOLDER",
            last.display(),
            path.display(),
            ckpt.meta.step
        );
    }
    if explicit("precision") {
        cfg.precision = args.precision;
    }
    let splits = cfg.data.load(cfg.seed)?;
    Ok((Trainer::from_checkpoint(&ckpt, cfg, device)?, splits, out_dir))
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// First SIGINT/SIGTERM: set the flag, so training stops after its step with a checkpoint.
/// A second one exits at once (the checkpoint on disk is always a complete one).
fn install_stop_handler() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, INTERRUPTED, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    Ok(stop)
}

/// Exit code of an interrupted run, as a shell reports death by SIGINT.
const INTERRUPTED: i32 = 130;

fn set_threads(threads: Option<i32>) -> Result<()> {
    if let Some(threads) = threads {
        ensure!(threads >= 1, "--threads must be at least 1, found {threads}");
        tch::set_num_threads(threads);
    }
    Ok(())
}

fn train(args: TrainArgs, matches: &ArgMatches) -> Result<()> {
    set_threads(args.threads)?;
    ensure!(args.max_bad_steps >= 1, "--max-bad-steps must be at least 1, found {}", args.max_bad_steps);
    let device = vae::device::parse_device(&args.device)?;
    let (mut trainer, splits, out_dir) = match &args.resume {
        Some(from) => resumed_trainer(&args, matches, from, device)?,
        None => fresh_trainer(&args, device)?,
    };
    trainer.cfg.precision.check_device(device)?;
    if trainer.epoch >= trainer.cfg.epochs {
        println!(
            "the run in {} has completed its {} epochs; pass --epochs N to train further",
            out_dir.display(),
            trainer.cfg.epochs
        );
        return Ok(());
    }
    let opts = RunOptions {
        out_dir: out_dir.clone(),
        save_every: args.save_every,
        save_every_steps: args.save_every_steps,
        keep: args.keep,
        quiet: args.quiet,
        stop: Some(install_stop_handler()?),
        tensorboard: !args.no_tensorboard,
        max_bad_steps: args.max_bad_steps,
    };
    let summary = train::run(&mut trainer, &splits, &opts)?;
    if summary.interrupted {
        eprintln!(
            "interrupted: saved {} at epoch {}, step {}\nresume with: vae train --resume {}",
            out_dir.join(train::LAST).display(),
            trainer.epoch,
            trainer.step,
            out_dir.display()
        );
        std::process::exit(INTERRUPTED);
    }
    if !args.quiet {
        if let Some((_, test)) = summary.epochs.last() {
            println!(
                "done: test loss {:.2} nats/image; checkpoints and pictures in {}",
                test.loss,
                out_dir.display()
            );
        }
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

fn eval(args: &ModelArgs, split: Split, iw_samples: i64, json: bool) -> Result<()> {
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
    );
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

fn reconstruct(args: &ModelArgs, n: usize, input: &[PathBuf], out: &Option<PathBuf>) -> Result<()> {
    ensure!(n > 0, "--n must be positive");
    let loaded = args.load()?;
    let x = if input.is_empty() {
        vae::export::first_images(&loaded.split(args, Split::Test)?, n, loaded.device)
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

fn sample(
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

fn interpolate(args: &ModelArgs, pairs: usize, steps: i64, slerp: bool, out: &Option<PathBuf>) -> Result<()> {
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
    let x = vae::export::first_images(&test, 2 * pairs, loaded.device);
    let (first, second) = (x.narrow(0, 0, pairs as i64), x.narrow(0, pairs as i64, pairs as i64));
    let grid = vae::export::interpolation_grid(&loaded.model, &first, &second, steps, slerp);
    let path = loaded.output(out, "interpolate.png");
    vae::export::save_grid(&path, &grid, steps as usize + 2)?;
    saved(&path);
    Ok(())
}

fn traverse(args: &ModelArgs, dims: &[i64], index: usize, steps: i64, out: &Option<PathBuf>) -> Result<()> {
    ensure!(steps >= 2, "--steps must be at least 2, found {steps}");
    let loaded = args.load()?;
    let latent = loaded.config().model.latent_dim;
    if let Some(bad) = dims.iter().find(|&&d| d < 0 || d >= latent) {
        bail!("--dims {bad} is not a latent dimension: the model has {latent} (0..{})", latent - 1);
    }
    let test = loaded.split(args, Split::Test)?;
    ensure!(index < test.len(), "--index {index} is past the test split's {} images", test.len());
    let dims = if dims.is_empty() {
        let (mean, logvar) = vae::export::encode_all(&loaded.model, &test, loaded.device);
        let kl = vae::export::kl_per_dimension(&mean, &logvar);
        let mut order: Vec<i64> = (0..latent).collect();
        order.sort_by(|&a, &b| kl[b as usize].total_cmp(&kl[a as usize]));
        order
    } else {
        dims.to_vec()
    };
    let image = vae::data::to_unit_float(&test.images.narrow(0, index as i64, 1)).to_device(loaded.device);
    let grid = vae::export::traversal_grid(&loaded.model, &image, &dims, steps, 3.0);
    let path = loaded.output(out, "traverse.png");
    vae::export::save_grid(&path, &grid, steps as usize)?;
    saved(&path);
    Ok(())
}

fn encode(args: &ModelArgs, split: Split, out: &Path) -> Result<()> {
    let loaded = args.load()?;
    let data = loaded.split(args, split)?;
    let (mean, logvar) = vae::export::encode_all(&loaded.model, &data, loaded.device);
    let mut named = vec![("mean", mean), ("logvar", logvar)];
    if let Some(labels) = &data.labels {
        named.push(("labels", labels.shallow_clone()));
    }
    tch::Tensor::write_safetensors(&named, out).with_context(|| format!("writing {}", out.display()))?;
    saved(out);
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
            train(*args, sub)
        }
        Command::Info { checkpoint } => info(&checkpoint),
        Command::Bench(args) => bench(args),
        Command::Eval { model, split, iw_samples, json } => eval(&model, split, iw_samples, json),
        Command::Reconstruct { model, n, input, out } => reconstruct(&model, n, &input, &out),
        Command::Sample { model, n, temperature, seed, out } => sample(&model, n, temperature, seed, &out),
        Command::Interpolate { model, pairs, steps, slerp, out } => {
            interpolate(&model, pairs, steps, slerp, &out)
        }
        Command::Traverse { model, dims, index, steps, out } => traverse(&model, &dims, index, steps, &out),
        Command::Encode { model, split, out } => encode(&model, split, &out),
    }
}
