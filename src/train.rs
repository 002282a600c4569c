//! The training loop: shuffled mini-batches, the bound, Adam, a test evaluation and a
//! checkpoint per epoch.

use crate::adam::{self, Adam, AdamConfig};
use crate::checkpoint::{self, Checkpoint, Metadata};
use crate::data::{Binarize, DataConfig, Dataset, Loader, Splits};
use crate::export::{self, GRID_COLS};
use crate::loss::{Elbo, KlWeight};
use crate::metrics::{active_dimensions, EpochRow, MetricsLog};
use crate::model::{Compute, Vae, VaeConfig};
use crate::plot::{self, Series, LOSS_PLOT};
use crate::precision::{LossScale, Precision};
use crate::rng::{seed_torch, Stream};
use crate::schedule::{LrSchedule, Schedule};
use crate::tensorboard::EventWriter;
use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Everything that determines a run's numbers; saved in each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: VaeConfig,
    pub data: DataConfig,
    pub adam: AdamConfig,
    /// Total epochs of the run (a resumed run continues up to this).
    pub epochs: u64,
    pub batch_size: usize,
    /// Weight of the KL term; 1 is the ELBO.
    pub beta: f64,
    pub seed: u64,
    pub binarize: Binarize,
    /// What the convs and matmuls compute in; may change when a run is resumed.
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Steps of linear learning-rate warm-up.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Epochs over which the KL weight rises linearly from 0 to beta.
    #[serde(default)]
    pub kl_warmup_epochs: f64,
    /// Free bits: nats per latent dimension not penalised.
    #[serde(default)]
    pub free_bits: f64,
    /// Largest global gradient norm; larger gradients are scaled down to it.
    #[serde(default)]
    pub clip_grad: Option<f64>,
    /// Random left-right flips of the training images.
    #[serde(default)]
    pub hflip: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: VaeConfig::default(),
            data: DataConfig::default(),
            adam: AdamConfig::default(),
            epochs: 10,
            batch_size: 128,
            beta: 1.0,
            seed: 0,
            binarize: Binarize::None,
            precision: Precision::F32,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            kl_warmup_epochs: 0.0,
            free_bits: 0.0,
            clip_grad: None,
            hflip: false,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        ensure!(self.batch_size > 0, "--batch-size must be positive, found {}", self.batch_size);
        ensure!(self.epochs > 0, "--epochs must be positive, found {}", self.epochs);
        ensure!(
            self.adam.lr > 0.0 && self.adam.lr.is_finite(),
            "--lr must be positive, found {}",
            self.adam.lr
        );
        ensure!(self.beta >= 0.0 && self.beta.is_finite(), "--beta must be >= 0, found {}", self.beta);
        ensure!(
            self.kl_warmup_epochs >= 0.0 && self.kl_warmup_epochs.is_finite(),
            "--kl-warmup-epochs must be >= 0, found {}",
            self.kl_warmup_epochs
        );
        ensure!(
            self.free_bits >= 0.0 && self.free_bits.is_finite(),
            "--free-bits must be >= 0, found {}",
            self.free_bits
        );
        if let Some(clip) = self.clip_grad {
            ensure!(clip > 0.0 && clip.is_finite(), "--clip-grad must be positive, found {clip}");
        }
        let wd = self.adam.weight_decay;
        ensure!(wd >= 0.0 && wd.is_finite(), "--weight-decay must be >= 0, found {wd}");
        Ok(())
    }

    /// The learning-rate and KL-weight curves for a split of `train_images` images.
    pub fn schedule(&self, train_images: usize) -> Schedule {
        let steps_per_epoch = train_images.div_ceil(self.batch_size.max(1)) as u64;
        Schedule {
            lr: self.adam.lr,
            lr_schedule: self.lr_schedule,
            warmup_steps: self.warmup_steps,
            total_steps: self.epochs * steps_per_epoch,
            beta: self.beta,
            kl_warmup_steps: (self.kl_warmup_epochs * steps_per_epoch as f64).round() as u64,
        }
    }
}

/// Means over an epoch or a split, in nats per image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub loss: f64,
    pub reconstruction: f64,
    pub kl: f64,
}

impl Stats {
    /// From a device tensor of `[loss, reconstruction, kl]` sums over `count` images.
    pub(crate) fn from_sums(sums: &Tensor, count: usize) -> Self {
        let v = Vec::<f64>::try_from(sums.to_kind(Kind::Double).to_device(Device::Cpu)).expect("three sums");
        let n = count.max(1) as f64;
        Self { loss: v[0] / n, reconstruction: v[1] / n, kl: v[2] / n }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} (recon {:.2}, kl {:.2})", self.loss, self.reconstruction, self.kl)
    }
}

/// The parts of a training step, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Start,
    /// Gathering the batch on the device (and binarizing it).
    Data,
    /// The model and the loss.
    Forward,
    Backward,
    /// Loss-scale checks and Adam.
    Optimizer,
}

/// Seconds spent in each phase of the steps measured.
#[derive(Debug, Clone, Default)]
pub struct StepTimes {
    pub data: f64,
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
    pub steps: u64,
    last: Option<Instant>,
}

impl StepTimes {
    /// Ends `phase` (all phases but `Start`), once the device has finished its work.
    fn mark(&mut self, phase: Phase, device: Device) {
        crate::device::synchronize(device);
        let now = Instant::now();
        let seconds = self.last.map_or(0.0, |t| (now - t).as_secs_f64());
        self.last = Some(now);
        match phase {
            Phase::Start => {}
            Phase::Data => self.data += seconds,
            Phase::Forward => self.forward += seconds,
            Phase::Backward => self.backward += seconds,
            Phase::Optimizer => {
                self.optimizer += seconds;
                self.steps += 1;
            }
        }
    }
}

/// Training statistics over the steps since the previous window, every `LOG_EVERY` steps.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub stats: Stats,
    pub images_per_s: f64,
}

/// Whether training goes on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Steps between reads of the running loss for the progress bar: each read syncs the device.
const LOG_EVERY: usize = 25;

/// A model, its optimizer and where the run stands.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub device: Device,
    pub vs: VarStore,
    pub model: Vae,
    pub adam: Adam,
    /// Epochs completed.
    pub epoch: u64,
    /// Batches trained on, skipped updates included: the position in the run, which fixes
    /// each step's batch and noise. Adam counts only the updates it made.
    pub step: u64,
    pub best_test_loss: Option<f64>,
    /// Present when computing in float16.
    pub loss_scale: Option<LossScale>,
    /// Steps in a row, up to now, whose loss or gradients were not finite (and were skipped).
    pub bad_steps: u64,
    /// Steps skipped so far by this process.
    pub skipped_steps: u64,
}

impl Trainer {
    /// A fresh model; initialised on the CPU from the seed so every device starts alike.
    pub fn new(cfg: TrainConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        seed_torch(cfg.seed, Stream::Init, 0);
        if device.is_cuda() {
            // Our shapes are fixed per run: let cuDNN time its algorithms once and keep the best.
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let mut vs = VarStore::new(Device::Cpu);
        let mut model = Vae::new(vs.root(), &cfg.model);
        model.compute = Compute::for_device(cfg.precision.compute_kind(), device);
        vs.set_device(device);
        let adam = Adam::new(&vs, cfg.adam);
        let loss_scale = (cfg.precision == Precision::F16).then(LossScale::default);
        Ok(Self {
            cfg,
            device,
            vs,
            model,
            adam,
            epoch: 0,
            step: 0,
            best_test_loss: None,
            loss_scale,
            bad_steps: 0,
            skipped_steps: 0,
        })
    }

    /// The model, optimizer and position a checkpoint holds, on `device`, continuing with
    /// `cfg`: the checkpoint's config, or one that differs only in what a resume may change.
    pub fn from_checkpoint(ckpt: &Checkpoint, cfg: TrainConfig, device: Device) -> Result<Self> {
        let mut trainer = Self::new(cfg, device)?;
        ckpt.load_weights(&trainer.vs)?;
        ckpt.load_optimizer(&mut trainer.adam)?;
        ensure!(
            trainer.adam.step_count() <= ckpt.meta.step,
            "{}: optimizer step {} is beyond the metadata's training step {}",
            ckpt.path.display(),
            trainer.adam.step_count(),
            ckpt.meta.step
        );
        trainer.epoch = ckpt.meta.epoch;
        trainer.step = ckpt.meta.step;
        if trainer.loss_scale.is_some() {
            trainer.loss_scale = Some(ckpt.meta.loss_scale.clone().unwrap_or_default());
        }
        trainer.best_test_loss = ckpt.meta.best_test_loss;
        Ok(trainer)
    }

    pub fn metadata(&self) -> Metadata {
        Metadata {
            config: self.cfg.clone(),
            epoch: self.epoch,
            step: self.step,
            best_test_loss: self.best_test_loss,
            loss_scale: self.loss_scale.clone(),
        }
    }

    /// Trains the rest of the current epoch, from the batch the step count says it is at, so a
    /// run resumed mid-epoch replays exactly the batches it had left. `after_step` runs after
    /// every update and may stop the epoch early; then `None` is returned.
    pub fn train_epoch(
        &mut self,
        loader: &Loader,
        progress: &ProgressBar,
        mut after_step: impl FnMut(&Trainer, Option<&Window>) -> Result<Flow>,
    ) -> Result<Option<Stats>> {
        let batches = loader.shuffled_batches(self.cfg.seed, self.epoch);
        let epoch_start = self.epoch * batches.len() as u64;
        let done = self.step.checked_sub(epoch_start).filter(|&d| d < batches.len() as u64);
        let done = done.with_context(|| {
            format!(
                "step {} does not fall in epoch {} of {} batches: the data or batch size differ from \
                 the checkpoint's",
                self.step,
                self.epoch + 1,
                batches.len()
            )
        })? as usize;
        let mut sums = Tensor::zeros([3], (Kind::Float, self.device));
        let mut sums_at_log = sums.copy();
        let (mut seen, mut seen_at_log, mut log_time) = (0usize, 0usize, Instant::now());
        progress.set_position((done * loader.batch_size()).min(loader.len()) as u64);
        for (i, indices) in batches.iter().enumerate().skip(done) {
            let batch = indices.size()[0] as usize;
            if let Some(next) = batches.get(i + 1) {
                loader.prefetch(next);
            }
            if let Some(means) = self.step(loader, indices, None)? {
                sums += means * batch as f64;
                seen += batch;
            }
            progress.inc(batch as u64);
            let window = ((i + 1) % LOG_EVERY == 0).then(|| {
                let window = Window {
                    stats: Stats::from_sums(&(&sums - &sums_at_log), seen - seen_at_log),
                    images_per_s: (seen - seen_at_log) as f64 / log_time.elapsed().as_secs_f64(),
                };
                progress.set_message(format!("loss {}  {:.0} img/s", window.stats, window.images_per_s));
                (sums_at_log, seen_at_log, log_time) = (sums.copy(), seen, Instant::now());
                window
            });
            // At the epoch's end the run saves anyway, so a stop there is not early.
            if after_step(self, window.as_ref())? == Flow::Stop && i + 1 < batches.len() {
                return Ok(None);
            }
        }
        self.epoch += 1;
        Ok(Some(Stats::from_sums(&sums, seen)))
    }

    /// One update on the images at `indices`; returns the batch's `[loss, reconstruction, kl]`
    /// means, left on the device, or `None` when the loss itself was not finite. (A float16
    /// step whose gradients overflowed is skipped but still reports its finite loss.)
    /// `times`, when given, collects where the step's time goes (and syncs the device to
    /// measure it, so leave it out of real training).
    pub fn step(
        &mut self,
        loader: &Loader,
        indices: &Tensor,
        mut times: Option<&mut StepTimes>,
    ) -> Result<Option<Tensor>> {
        let mut mark = |phase: Phase| {
            if let Some(t) = times.as_deref_mut() {
                t.mark(phase, self.device)
            }
        };
        mark(Phase::Start);
        // Noise of step s depends on (seed, s) only: a resumed run draws the same.
        seed_torch(self.cfg.seed, Stream::Step, self.step);
        let mut x = loader.gather(indices)?;
        if self.cfg.hflip {
            x = crate::data::random_hflip(&x);
        }
        if self.cfg.binarize == Binarize::Dynamic {
            x = x.bernoulli();
        }
        mark(Phase::Data);
        let schedule = self.cfg.schedule(loader.len());
        let out = self.model.forward(&x);
        let weight = KlWeight { beta: schedule.beta_at(self.step), free_bits: self.cfg.free_bits };
        let elbo = Elbo::new(self.cfg.model.likelihood, &out, &x, weight);
        mark(Phase::Forward);
        self.adam.zero_grad();
        match &self.loss_scale {
            None => elbo.loss.backward(),
            Some(scaler) => (&elbo.loss * scaler.scale).backward(),
        }
        mark(Phase::Backward);
        // A non-finite loss or gradient never reaches the weights: the step is skipped. The
        // verdict costs one host sync per step, the price of that guarantee.
        let grads = self.adam.gradients();
        let unscaled = self.loss_scale.as_mut().is_none_or(|s| s.unscale(&grads));
        let norm = adam::global_norm(&grads, self.device);
        let verdict = tch::no_grad(|| {
            let flags = [elbo.loss.isfinite(), norm.isfinite()];
            Vec::<i64>::try_from(Tensor::stack(&flags, 0).to_kind(Kind::Int64)).expect("two flags")
        });
        let loss_finite = verdict[0] != 0;
        let finite = unscaled && loss_finite && verdict[1] != 0;
        if finite {
            if let Some(max_norm) = self.cfg.clip_grad {
                adam::clip_grad_norm(&grads, &norm, max_norm);
            }
            self.adam.cfg.lr = schedule.lr_at(self.step);
            self.adam.step();
            self.bad_steps = 0;
        } else {
            self.bad_steps += 1;
            self.skipped_steps += 1;
        }
        self.step += 1;
        mark(Phase::Optimizer);
        Ok(loss_finite.then(|| elbo.stacked()))
    }

    /// The bound on a split, with noise fixed per evaluation batch.
    /// The test statistics, and the posterior means of `data` (`[N, D]`) they came with.
    pub fn evaluate(&self, data: &Dataset) -> Result<(Stats, Tensor)> {
        let weight = KlWeight { beta: self.cfg.beta, free_bits: 0.0 };
        crate::eval::elbo(&self.model, data, self.cfg.seed, weight, self.device)
    }

    /// Test images (rows of `GRID_COLS`) each above its reconstruction from the posterior mean.
    pub fn save_reconstructions(&self, data: &Dataset, path: &Path, count: usize) -> Result<()> {
        let x = export::first_images(data, count, self.device)?;
        let cols = GRID_COLS.min(x.size()[0] as usize);
        export::save_grid(path, &export::reconstruction_grid(&self.model, &x, cols), cols)
    }
    /// Decodes draws from the prior, fixed by the seed.
    pub fn save_samples(&self, path: &Path, count: usize) -> Result<()> {
        seed_torch(self.cfg.seed, Stream::Eval, u64::MAX);
        let images = export::samples(&self.model, count as i64, 1.0, self.device);
        export::save_grid(path, &images, GRID_COLS.min(count))
    }
}

/// Where a run writes and how it reports.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub out_dir: PathBuf,
    /// Periodic `epoch-NNNN.safetensors` are written every this many epochs (0: never).
    pub save_every: u64,
    /// `last.safetensors` is also rewritten every this many steps (0: only per epoch), so an
    /// interruption loses at most that much work.
    pub save_every_steps: u64,
    /// How many periodic checkpoints to keep.
    pub keep: usize,
    pub quiet: bool,
    /// Set (by a signal handler) to stop after the current step with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    /// Write TensorBoard event files into the run folder.
    pub tensorboard: bool,
    /// Consecutive non-finite steps after which the run stops as diverged.
    pub max_bad_steps: u64,
}

/// What a run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Train and test statistics of each epoch completed by this invocation.
    pub epochs: Vec<(Stats, Stats)>,
    /// Stopped by `RunOptions::stop` before the last epoch; `last.safetensors` holds the state.
    pub interrupted: bool,
}

pub const LAST: &str = "last.safetensors";
pub const BEST: &str = "best.safetensors";
pub const RECONSTRUCTIONS: &str = "reconstructions.png";
pub const SAMPLES: &str = "samples.png";

impl RunOptions {
    fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    fn save_last(&self, trainer: &Trainer) -> Result<Vec<u8>> {
        let bytes = checkpoint::to_bytes(&trainer.vs, &trainer.adam, &trainer.metadata())?;
        checkpoint::write_atomic(&self.out_dir.join(LAST), &bytes)?;
        Ok(bytes)
    }
}

/// Checks that the run folder exists and takes files, before any training is spent.
pub fn prepare_run_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating run folder {}", dir.display()))?;
    // A process killed mid-write leaves its temporary file behind (never a torn checkpoint).
    // A run folder serves one run at a time, so any such file found now is stale.
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') && (name.contains(".tmp-") || name.starts_with(".write-test-")) {
            std::fs::remove_file(&path).with_context(|| format!("removing stale {}", path.display()))?;
        }
    }
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("run folder {} is not writable", dir.display()))?;
    std::fs::remove_file(&probe).with_context(|| format!("cleaning up {}", probe.display()))
}

/// Trains until `trainer.cfg.epochs`, writing checkpoints and pictures into the run folder.
pub fn run(trainer: &mut Trainer, splits: &Splits, opts: &RunOptions) -> Result<RunSummary> {
    let out = &opts.out_dir;
    prepare_run_dir(out)?;
    let cfg = trainer.cfg.clone();
    let [c, h, w] = splits.train.image_shape();
    ensure!(
        c == cfg.model.in_channels && h == cfg.model.image_size && w == cfg.model.image_size,
        "the {} data has images of {c}x{h}x{w} but the model expects {}x{s}x{s}",
        cfg.data.name(),
        cfg.model.in_channels,
        s = cfg.model.image_size
    );
    let test = crate::eval::prepared(&splits.test, &cfg);
    let loader = Loader::new(&splits.train, trainer.device, cfg.batch_size);
    let mut summary = RunSummary { epochs: Vec::new(), interrupted: false };
    let metrics = MetricsLog::new(out);
    let schedule = cfg.schedule(loader.len());
    let mut events = if opts.tensorboard { Some(EventWriter::create(out)?) } else { None };
    if !opts.quiet {
        println!(
            "training on {} images of {c}x{h}x{w} ({}{}), {} test images, on {}; run folder {}",
            loader.len(),
            cfg.data.name(),
            if splits.train.is_streamed() { ", streamed from disk" } else { "" },
            test.len(),
            crate::device::describe(trainer.device),
            out.display()
        );
    }
    while trainer.epoch < cfg.epochs {
        let started = Instant::now();
        let progress = if opts.quiet { ProgressBar::hidden() } else { ProgressBar::new(loader.len() as u64) };
        progress.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        progress.set_prefix(format!("{}/{}", trainer.epoch + 1, cfg.epochs));
        let skipped_before = trainer.skipped_steps;
        let train = trainer.train_epoch(&loader, &progress, |t, window| {
            let step = t.step;
            if let (Some(tb), Some(w)) = (events.as_mut(), window) {
                tb.scalar("train/loss", step, w.stats.loss)?;
                tb.scalar("train/reconstruction", step, w.stats.reconstruction)?;
                tb.scalar("train/kl", step, w.stats.kl)?;
                tb.scalar("train/images_per_s", step, w.images_per_s)?;
                tb.scalar("train/lr", step, t.adam.cfg.lr)?;
                tb.scalar("train/beta", step, schedule.beta_at(step.saturating_sub(1)))?;
            }
            if t.bad_steps >= opts.max_bad_steps {
                bail!(
                    "training diverged at step {step} (epoch {}): {} steps in a row gave a non-finite loss or \
                     gradient and were skipped, so the weights are those of step {}. Lower --lr (now {}) or \
                     pass --clip-grad; {} holds the last good checkpoint",
                    t.epoch + 1,
                    t.bad_steps,
                    step - t.bad_steps,
                    t.cfg.adam.lr,
                    out.join(LAST).display()
                );
            }
            if opts.save_every_steps > 0 && step.is_multiple_of(opts.save_every_steps) {
                opts.save_last(t)?;
            }
            crate::fault::after_step(step);
            Ok(if opts.stop_requested() { Flow::Stop } else { Flow::Continue })
        })?;
        progress.finish_and_clear();
        if trainer.skipped_steps > skipped_before && !opts.quiet {
            eprintln!(
                "warning: skipped {} steps with a non-finite loss or gradient in epoch {}",
                trainer.skipped_steps - skipped_before,
                trainer.epoch
            );
        }
        let Some(train) = train else {
            opts.save_last(trainer)?;
            summary.interrupted = true;
            return Ok(summary);
        };
        let seconds = started.elapsed().as_secs_f64();
        let (test_stats, test_means) = trainer.evaluate(&test)?;
        let active_dims = active_dimensions(&test_means);
        let images_per_s = loader.len() as f64 / seconds;
        metrics.append(&EpochRow {
            epoch: trainer.epoch,
            step: trainer.step,
            train,
            test: test_stats,
            active_dims,
            lr: schedule.lr_at(trainer.step.saturating_sub(1)),
            images_per_s,
            seconds,
        })?;
        let improved = trainer.best_test_loss.is_none_or(|best| test_stats.loss < best);
        if improved {
            trainer.best_test_loss = Some(test_stats.loss);
        }
        let bytes = opts.save_last(trainer)?;
        if improved {
            checkpoint::write_atomic(&out.join(BEST), &bytes)?;
        }
        if opts.save_every > 0 && trainer.epoch.is_multiple_of(opts.save_every) {
            checkpoint::write_atomic(&out.join(format!("epoch-{:04}.safetensors", trainer.epoch)), &bytes)?;
            prune_periodic(out, opts.keep)?;
        }
        trainer.save_reconstructions(&splits.test, &out.join(RECONSTRUCTIONS), 2 * GRID_COLS)?;
        trainer.save_samples(&out.join(SAMPLES), 4 * GRID_COLS)?;
        if let Some(tb) = events.as_mut() {
            let step = trainer.step;
            for (tag, value) in [
                ("epoch/train_loss", train.loss),
                ("test/loss", test_stats.loss),
                ("test/reconstruction", test_stats.reconstruction),
                ("test/kl", test_stats.kl),
                ("test/active_dims", active_dims as f64),
            ] {
                tb.scalar(tag, step, value)?;
            }
            for (tag, file) in [("reconstructions", RECONSTRUCTIONS), ("samples", SAMPLES)] {
                let png = std::fs::read(out.join(file)).with_context(|| format!("reading {file}"))?;
                let (w, h) = image::image_dimensions(out.join(file))?;
                tb.image(tag, step, &png, w, h)?;
            }
            tb.flush()?;
        }
        if !opts.quiet {
            println!(
                "epoch {}/{}  train {train}  test {test_stats}  {images_per_s:.0} img/s  {seconds:.1}s  \
                 active dims {active_dims}/{}",
                trainer.epoch, cfg.epochs, cfg.model.latent_dim
            );
        }
        summary.epochs.push((train, test_stats));
        plot_losses(&metrics, &out.join(LOSS_PLOT))?;
        if trainer.epoch < cfg.epochs && opts.stop_requested() {
            summary.interrupted = true;
            return Ok(summary);
        }
    }
    Ok(summary)
}

/// `loss.png` from the whole of `metrics.csv`, earlier invocations of a resumed run included.
fn plot_losses(metrics: &MetricsLog, path: &Path) -> Result<()> {
    let rows = metrics.read()?;
    let column = |name: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| {
                let get = |k: &str| r.iter().find(|(h, _)| h == k).map(|(_, v)| *v);
                Some((get("epoch")?, get(name)?))
            })
            .collect()
    };
    let train = Series { color: plot::TRAIN_COLOR, points: column("train_loss") };
    plot::save_lines(path, &[train, Series { color: plot::TEST_COLOR, points: column("test_loss") }])
}

/// Keeps the newest `keep` periodic checkpoints.
fn prune_periodic(dir: &Path, keep: usize) -> Result<()> {
    let mut periodic: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("epoch-") && name.ends_with(".safetensors")
        })
        .collect();
    periodic.sort();
    let excess = periodic.len().saturating_sub(keep);
    for old in &periodic[..excess] {
        std::fs::remove_file(old).with_context(|| format!("removing old checkpoint {}", old.display()))?;
    }
    Ok(())
}
