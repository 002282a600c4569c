//! Training: the run config, and the Trainer that takes a step (a batch through the bound,
//! the divergence guard and Adam) and an epoch of shuffled mini-batches.

use crate::adam::{self, Adam, AdamConfig};
use crate::checkpoint::{Checkpoint, Metadata};
use crate::data::{Binarize, DataConfig, Dataset, Loader};
use crate::export::{self, GRID_COLS};
use crate::loss::{Elbo, KlWeight};
use crate::model::{Compute, Vae, VaeConfig};
use crate::precision::{LossScale, Precision};
use crate::rng::{seed_torch, Stream};
use crate::schedule::{LrSchedule, Schedule};
use anyhow::{ensure, Context, Result};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::path::Path;
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
            loader.prefetch_next(&batches, i);
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
