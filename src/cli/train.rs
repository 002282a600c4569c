//! `vae train`: the flags, a fresh or resumed trainer, and the run with its interrupts.

use anyhow::{bail, ensure, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use vae::adam::AdamConfig;
use vae::checkpoint::Checkpoint;
use vae::data::{Binarize, DataConfig, DatasetKind};
use vae::loss::Likelihood;
use vae::model::VaeConfig;
use vae::precision::Precision;
use vae::run::{self, RunOptions};
use vae::schedule::LrSchedule;
use vae::train::{TrainConfig, Trainer};

#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
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
    /// Memory a folder's decoded images may take (bytes, or with K, M, G, T: 512M, 8G); a
    /// larger set streams from its cache file, the next batch read while one trains
    /// [default: half the memory available].
    #[arg(long, value_parser = super::parse_size)]
    max_memory: Option<u64>,
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
            max_memory: self.max_memory,
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
    let last = out_dir.join(run::LAST);
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
    cfg.data.max_memory = args.max_memory;
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let out_dir = args.out.clone().unwrap_or(folder);
    // Continuing an older checkpoint in place would overwrite a newer last.safetensors.
    let last = out_dir.join(run::LAST);
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

pub fn train(args: TrainArgs, matches: &ArgMatches) -> Result<()> {
    crate::set_threads(args.threads)?;
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
    let summary = run::run(&mut trainer, &splits, &opts)?;
    if summary.interrupted {
        eprintln!(
            "interrupted: saved {} at epoch {}, step {}\nresume with: vae train --resume {}",
            out_dir.join(run::LAST).display(),
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
