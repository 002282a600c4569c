//! Training: the Trainer takes a step (a batch through the bound, the divergence guard and
//! Adam) and an epoch of shuffled mini-batches. It knows nothing of files: checkpoints
//! save and restore it.

use crate::adam::{self, Adam};
use crate::adversarial::{self, PatchGan};
use crate::config::TrainConfig;
use crate::data::{Binarize, Dataset, Loader};
use crate::dist::{self, ProcessGroup};
use crate::ema::Ema;
use crate::eval::{Measure, SplitFigures};
use crate::fid::Inception;
use crate::loss::{Elbo, KlWeight, Stats, SHARPNESS};
use crate::models::{Compute, Model};
use crate::perceptual::Lpips;
use crate::precision::{LossScale, Precision};
use crate::rng::{seed_torch, Stream};
use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, nn::VarStore, Device, Kind, Tensor};

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
    /// The mean gradient norm (before clipping) of the window's updates; NaN without any.
    pub grad_norm: f64,
}

/// Whether training goes on after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// How an epoch's training ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EpochEnd {
    /// Every batch trained, and the epoch count moved on: the statistics of the steps this
    /// call took, `None` when it took none (see [`Trainer::train_epoch`]).
    Complete(Option<Stats>),
    /// Stopped before its last batch: the statistics of the steps this call took, `None`
    /// when none was finite.
    Stopped(Option<Stats>),
}

/// What a test evaluation's metrics row needs of the training before it, kept in the
/// checkpoint saved just before the evaluation: a run killed during it (a preemption whose
/// grace ran out, an evaluation out of memory) loses only the evaluation, which its resume
/// makes first.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEvaluation {
    /// The figures of the steps since the previous evaluation; `None` when none had a finite
    /// loss.
    pub train: Option<Stats>,
    /// Images those steps trained on, and their seconds.
    pub images: usize,
    pub seconds: f64,
}

/// Steps between reads of the running loss for the progress bar: each read syncs the device.
const LOG_EVERY: usize = 25;

/// The discriminator side of the adversarial term (`--disc-weight`): the PatchGAN and its
/// Adam, and the pixel term's learned log-variance (trained by the autoencoder's Adam).
pub struct Adversary {
    /// `discriminator.*` (taming's state-dict names) and `loss.logvar`.
    pub vs: VarStore,
    pub net: PatchGan,
    pub adam: Adam,
    pub logvar: Tensor,
}

/// Name prefix of the discriminator's Adam state in a checkpoint.
pub const DISC_STATE_PREFIX: &str = "optimizer_disc.";

impl Adversary {
    /// Created on the CPU (from the seeded stream, after the model) and moved to `device`.
    fn new(cfg: &TrainConfig, device: Device) -> Self {
        let mut vs = VarStore::new(Device::Cpu);
        let [channels, _, _] = cfg.model.image_shape();
        let net = PatchGan::new(vs.root() / adversarial::PREFIX.trim_end_matches('.'), channels);
        let (path, name) = adversarial::LOGVAR.split_once('.').expect("loss.logvar");
        let logvar = (vs.root() / path).var(name, &[], nn::Init::Const(0.0));
        vs.set_device(device);
        let params = adam::trainable(&vs)
            .into_iter()
            .filter(|(name, _)| name.starts_with(adversarial::PREFIX))
            .collect();
        let adam = Adam::over(params, cfg.disc_adam, DISC_STATE_PREFIX);
        Self { vs, net, adam, logvar }
    }

    /// Its tensors under their checkpoint names.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        named.extend(self.adam.state());
        named
    }
}

/// A model, its optimizer and where the run stands.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub device: Device,
    pub vs: VarStore,
    pub model: Box<dyn Model>,
    pub adam: Adam,
    /// Epochs completed.
    pub epoch: u64,
    /// Batches trained on, skipped updates included: the position in the run, which fixes
    /// each step's batch and noise. Adam counts only the updates it made.
    pub step: u64,
    /// The best test figure so far, of the kind `cfg.best_by` names.
    pub best: Option<f64>,
    /// Test evaluations in a row, up to the latest, that did not better `best`.
    pub evaluations_since_best: u64,
    /// Present when computing in float16.
    pub loss_scale: Option<LossScale>,
    /// The test evaluation owed at this step, in a trainer restored from a checkpoint saved
    /// just before it.
    pub pending_evaluation: Option<PendingEvaluation>,
    /// Steps in a row, up to now, whose loss or gradients were not finite (and were skipped).
    pub bad_steps: u64,
    /// Steps skipped so far by this process.
    pub skipped_steps: u64,
    /// The global L2 norm of the autoencoder's gradients at the latest step that updated the
    /// weights (before clipping), left on the device for the log.
    grad_norm: Option<Tensor>,
    /// The other ranks of a data-parallel run: each step trains on this rank's share of the
    /// global batch and averages the gradients with them.
    pub group: Option<ProcessGroup>,
    /// Seconds this process spent in the steps' all-reduce (waiting for the others included).
    pub all_reduce_seconds: f64,
    /// Set from outside (a signal handler) to ask for a stop after the current step.
    pub stop: Option<Arc<AtomicBool>>,
    /// Whether a stop was asked for by the last step's end, on any rank: the ranks learn it
    /// from the step's all-reduce, so they all stop at the same step.
    pub stopping: bool,
    /// The weights' moving average, with `--ema-decay`.
    pub ema: Option<Ema>,
    /// The perceptual term's network, with `--perceptual-weight`.
    pub lpips: Option<Lpips>,
    /// The FID Inception, for the test evaluation's rFID, when the run was given its weights.
    pub fid: Option<Inception>,
    /// The discriminator, with `--disc-weight`.
    pub adversary: Option<Adversary>,
}

impl Trainer {
    /// A fresh model; initialised on the CPU from the seed so every device starts alike.
    pub fn new(cfg: TrainConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        seed_torch(cfg.seed, Stream::Init, 0);
        if device.is_cuda() && !crate::native::is_deterministic() {
            // Our shapes are fixed per run: let cuDNN time its algorithms once and keep the best
            // (the fastest may differ between runs: not with --deterministic).
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let mut vs = VarStore::new(Device::Cpu);
        let mut model = cfg.model.build(vs.root());
        if cfg.freeze_encoder {
            // No gradient, so no backward through it, and no place in the optimizer.
            for (_, frozen) in vs.variables().into_iter().filter(|(name, _)| cfg.model.is_encoder(name)) {
                let _ = frozen.set_requires_grad(false);
            }
        }
        let compute = Compute::for_device(cfg.precision.compute_kind(), device);
        model.set_compute(Compute { checkpoint: cfg.gradient_checkpointing, ..compute });
        vs.set_device(device);
        let adversary = (cfg.disc_weight > 0.0).then(|| Adversary::new(&cfg, device));
        let mut params = adam::trainable(&vs);
        params.extend(adversary.iter().map(|a| (adversarial::LOGVAR.to_string(), a.logvar.shallow_clone())));
        let adam = Adam::over(params, cfg.adam, adam::STATE_PREFIX);
        let ema = (cfg.ema_decay > 0.0).then(|| Ema::new(&vs, cfg.ema_decay));
        let loss_scale = (cfg.precision == Precision::F16).then(LossScale::default);
        let lpips = match (&cfg.lpips_weights, cfg.uses_lpips()) {
            (Some(path), true) => Some(Lpips::load(path, device)?),
            _ => None,
        };
        let fid = cfg.fid_weights.as_deref().map(|path| Inception::load(path, device)).transpose()?;
        Ok(Self {
            cfg,
            device,
            vs,
            model,
            adam,
            epoch: 0,
            step: 0,
            best: None,
            evaluations_since_best: 0,
            loss_scale,
            pending_evaluation: None,
            bad_steps: 0,
            skipped_steps: 0,
            grad_norm: None,
            group: None,
            all_reduce_seconds: 0.0,
            stop: None,
            stopping: false,
            ema,
            lpips,
            fid,
            adversary,
        })
    }

    /// Entries of a step's statistics: `[loss, reconstruction, kl]`, then the [`SHARPNESS`]
    /// ones when the loss has a perceptual or adversarial term.
    pub fn stat_count(&self) -> i64 {
        let sharp = self.cfg.perceptual_weight > 0.0 || self.adversary.is_some();
        3 + if sharp { SHARPNESS.len() as i64 } else { 0 }
    }

    /// Trains the rest of the current epoch, from the batch the step count says it is at, so a
    /// run resumed mid-epoch replays exactly the batches it had left. `after_step` runs after
    /// every update and may stop the epoch early.
    pub fn train_epoch(
        &mut self,
        loader: &Loader,
        progress: &ProgressBar,
        mut after_step: impl FnMut(&Trainer, Option<&Window>) -> Result<Flow>,
    ) -> Result<EpochEnd> {
        let batches = loader.shuffled_batches(self.cfg.seed, self.epoch);
        let epoch_start = self.epoch * batches.len() as u64;
        let done = self.step.checked_sub(epoch_start).filter(|&d| d <= batches.len() as u64);
        let done = done.with_context(|| {
            format!(
                "step {} does not fall in epoch {} of {} batches: the data or batch size differ from \
                 the checkpoint's",
                self.step,
                self.epoch + 1,
                batches.len()
            )
        })? as usize;
        if done == batches.len() {
            // All its steps taken, its end not: a checkpoint that earlier versions saved at an
            // epoch's last step, before its test evaluation. Only the end remains to do.
            self.epoch += 1;
            return Ok(EpochEnd::Complete(None));
        }
        let mut sums = Tensor::zeros([self.stat_count()], (Kind::Float, self.device));
        let mut sums_at_log = sums.copy();
        let (mut seen, mut seen_at_log, mut log_time) = (0usize, 0usize, Instant::now());
        // The window's updates' gradient norms, kept on the device until the window is read:
        // nothing launched or synced per step for them.
        let mut norms: Vec<Tensor> = Vec::with_capacity(LOG_EVERY);
        progress.set_position((done * loader.batch_size()).min(loader.len()) as u64);
        for (i, indices) in batches.iter().enumerate().skip(done) {
            let batch = indices.size()[0] as usize;
            if let Some(next) = batches.get(i + 1) {
                // Read ahead this rank's rows only: a streamed split fetches no other's images.
                let (first, rows) = self.share(next.size()[0]);
                loader.prefetch(&next.narrow(0, first, rows));
            }
            if let Some(means) = self.step(loader, indices, None)? {
                sums += means * batch as f64;
                seen += batch;
            }
            norms.extend(self.grad_norm.take());
            progress.inc(batch as u64);
            let window = ((i + 1) % LOG_EVERY == 0).then(|| {
                let window = Window {
                    stats: Stats::from_sums(&(&sums - &sums_at_log), seen - seen_at_log),
                    images_per_s: (seen - seen_at_log) as f64 / log_time.elapsed().as_secs_f64(),
                    grad_norm: if norms.is_empty() {
                        f64::NAN
                    } else {
                        Tensor::stack(&norms, 0).mean(Kind::Double).double_value(&[])
                    },
                };
                norms.clear();
                progress.set_message(format!("loss {}  {:.0} img/s", window.stats, window.images_per_s));
                (sums_at_log, seen_at_log, log_time) = (sums.copy(), seen, Instant::now());
                window
            });
            // At the epoch's end the run saves anyway, so a stop there is not early.
            if after_step(self, window.as_ref())? == Flow::Stop && i + 1 < batches.len() {
                return Ok(EpochEnd::Stopped((seen > 0).then(|| Stats::from_sums(&sums, seen))));
            }
        }
        if seen == 0 {
            bail!(
                "epoch {} had no step with a finite loss: every batch was skipped, so it trained on \
                 nothing (lower --lr, or pass --clip-grad)",
                self.epoch + 1
            );
        }
        self.epoch += 1;
        Ok(EpochEnd::Complete(Some(Stats::from_sums(&sums, seen))))
    }

    /// One update on the images at `indices`; returns the batch's statistics (`[loss,
    /// reconstruction, kl]` means, then the sharpness ones if any), left on the device, or
    /// `None` when they were not finite. (A float16 step whose gradients overflowed is skipped
    /// but still reports its finite loss, unless the adversarial weight, taken from gradients,
    /// overflowed with them.) `times`, when given, collects where the step's time
    /// goes (and syncs the device to measure it, so leave it out of real training).
    pub fn step(
        &mut self,
        loader: &Loader,
        indices: &Tensor,
        mut times: Option<&mut StepTimes>,
    ) -> Result<Option<Tensor>> {
        if let Some(t) = times.as_deref_mut() {
            t.mark(Phase::Start, self.device);
        }
        // Noise of step s depends on (seed, s) only: a resumed run draws the same. Every
        // draw is made for the whole global batch, in the same order whatever the number of
        // ranks, and each rank keeps its rows (and reads only their images): a W-rank run
        // sees the 1-process run's draws.
        seed_torch(self.cfg.seed, Stream::Step, self.step);
        let global = indices.size()[0];
        let (first, rows) = self.share(global);
        let mut x = loader.gather(&indices.narrow(0, first, rows))?;
        let draw = |mut shape: Vec<i64>, normal: bool| {
            shape[0] = global;
            let options = (Kind::Float, self.device);
            let all = if normal {
                Tensor::randn(shape.as_slice(), options)
            } else {
                Tensor::rand(shape.as_slice(), options)
            };
            all.narrow(0, first, rows)
        };
        if self.cfg.hflip {
            x = crate::data::random_hflip(&x, &draw(vec![0], false));
        }
        if self.cfg.binarize == Binarize::Dynamic {
            // Bernoulli(x), as a uniform draw below x.
            x = draw(x.size(), false).lt_tensor(&x).to_kind(Kind::Float);
        }
        let eps = draw(vec![0, self.model.latent_dim()], true);
        if let Some(t) = times.as_deref_mut() {
            t.mark(Phase::Data, self.device);
        }
        self.update(&x, &eps, global, loader.len(), times)
    }

    /// The update of [`step`](Trainer::step) on this rank's images `x` and noise `eps`, rows
    /// of a global batch of `global` from a split of `train_images`.
    pub fn update(
        &mut self,
        x: &Tensor,
        eps: &Tensor,
        global: i64,
        train_images: usize,
        mut times: Option<&mut StepTimes>,
    ) -> Result<Option<Tensor>> {
        let device = self.device;
        let mut mark = |phase: Phase| {
            if let Some(t) = times.as_deref_mut() {
                t.mark(phase, device)
            }
        };
        let rows = x.size()[0];
        let schedule = self.cfg.schedule(train_images);
        let weight = KlWeight { beta: schedule.beta_at(self.step), free_bits: self.cfg.free_bits };
        let scale = self.loss_scale.as_ref().map(|s| s.scale);
        let backward = |loss: &Tensor| match scale {
            None => loss.backward(),
            Some(scale) => (loss * scale).backward(),
        };
        let kind = self.cfg.precision.compute_kind();
        // Latent diffusion's discriminator factor: 0 before --disc-start, 1 from it.
        let disc_on = self.adversary.is_some() && self.step >= self.cfg.disc_start;
        self.adam.zero_grad();
        // The discriminator's too, here: the generator's pass computes none for it, and a rank
        // without rows defines them all with its zero loss below.
        if let Some(adv) = &mut self.adversary {
            adv.adam.zero_grad();
        }
        // The rank's rows in micro-batches (--grad-accum), one after another, their gradients
        // summed. Each loss is its rows' mean weighted by their share of the global batch, so
        // the summed gradient is the global batch's mean's, whatever the ranks and micro-batches.
        let micro = micro_batches(rows, self.cfg.grad_accum);
        let of_batch =
            |loss: Tensor, len: i64| if len < global { loss * (len as f64 / global as f64) } else { loss };
        let perceptual = self.cfg.perceptual(self.lpips.as_ref())?;
        let mut stacked = Tensor::zeros([self.stat_count()], (Kind::Float, device));
        // Each micro-batch's images in [-1, 1] and reconstructions, for the discriminator once
        // it is on. Its batch statistics, the adaptive weight and its loss are each micro-batch's
        // own (what latent diffusion's Lightning loop computes per rank and accumulated batch):
        // N ranks train as --grad-accum N does, though not as the N-times-larger batch.
        let mut shown = Vec::new();
        for &(start, len) in &micro {
            let (x, eps) = (x.narrow(0, start, len), eps.narrow(0, start, len));
            let mut out = self.model.forward_with_noise(&x, &eps);
            let cut = disc_on.then(|| adversarial::Cut::new(&mut out.likelihood_params));
            let mut elbo =
                Elbo::new(self.model.likelihood(), &out, &x, weight).with_perceptual(perceptual, &out, &x);
            // The generator's adversarial loss and its adaptive weight, once the term is on.
            let mut adversarial_terms = None;
            let mut minimised = None;
            if let Some(adv) = &self.adversary {
                elbo = elbo.with_logvar(&adv.logvar, x.size()[1..].iter().product());
            }
            if let (Some(adv), Some(cut)) = (&self.adversary, &cut) {
                let recon = &out.likelihood_params;
                shown.push((x * 2.0 - 1.0, recon.detach(), len));
                let g = adversarial::generator_loss(&adv.net.forward(recon, kind));
                let (d_weight, generator) = cut.generator_step(
                    &elbo.nll,
                    &g,
                    &adv.logvar,
                    &self.model.last_layer(),
                    self.cfg.disc_weight,
                    scale,
                );
                elbo.loss = (&elbo.loss + &d_weight * &g).detach();
                minimised = Some(generator + &elbo.kl_penalty);
                adversarial_terms = Some([g.detach(), d_weight]);
            }
            let loss = of_batch(minimised.unwrap_or_else(|| elbo.loss.shallow_clone()), len);
            let share = len as f64 / rows as f64;
            stacked += self.statistics(&elbo, adversarial_terms) * share;
            mark(Phase::Forward);
            backward(&loss);
            mark(Phase::Backward);
        }
        let adversary = self.adversary.as_mut().filter(|_| disc_on);
        if micro.is_empty() {
            // No rows of a last batch smaller than the ranks: zero gradients, all defined.
            let zero = adversary.iter().fold(self.adam.zero_loss(), |z, a| z + a.adam.zero_loss());
            backward(&zero);
        }
        let mut disc_grads = Vec::new();
        if let Some(adv) = adversary {
            // d_loss, logits_real and logits_fake, for their places among the statistics.
            let mut values = Tensor::zeros([3], (Kind::Float, device));
            for (real, fake, len) in &shown {
                let (real, fake) = (adv.net.forward(real, kind), adv.net.forward(fake, kind));
                let d_loss = self.cfg.disc_loss.discriminator(&real, &fake);
                mark(Phase::Forward);
                backward(&of_batch(d_loss.shallow_clone(), *len));
                mark(Phase::Backward);
                let share = *len as f64 / rows as f64;
                values += Tensor::stack(&[d_loss, real.mean(None), fake.mean(None)], 0).detach() * share;
            }
            disc_grads = adv.adam.gradients();
            let d_loss_at =
                3 + SHARPNESS.iter().position(|&n| n == "d_loss").expect("d_loss is logged") as i64;
            stacked.narrow(0, d_loss_at, 3).copy_(&values);
        }
        let grads = self.adam.gradients();
        let means = match &self.group {
            None => stacked,
            Some(group) => {
                let started = Instant::now();
                let share = rows as f64 / global as f64;
                let all: Vec<Tensor> = grads.iter().chain(&disc_grads).map(Tensor::shallow_clone).collect();
                let (means, stopping) = all_reduce_step(group, &all, &stacked, share, self.stop_asked())?;
                self.stopping = stopping;
                self.all_reduce_seconds += started.elapsed().as_secs_f64();
                means
            }
        };
        let loss_finite = self.guarded_step(&grads, &disc_grads, &means, schedule.lr_at(self.step));
        self.step += 1;
        if self.group.is_none() {
            self.stopping = self.stop_asked();
        }
        mark(Phase::Optimizer);
        Ok(loss_finite.then_some(means))
    }

    /// The divergence guard, then the optimizers' steps at rate `lr`: a non-finite loss or
    /// gradient never reaches the weights, the step is skipped (both networks'). The verdict
    /// costs one host sync per step, the price of that guarantee. Whether the loss was finite.
    fn guarded_step(&mut self, grads: &[Tensor], disc_grads: &[Tensor], means: &Tensor, lr: f64) -> bool {
        let unscaled = self.loss_scale.as_mut().is_none_or(|s| {
            let all: Vec<Tensor> = grads.iter().chain(disc_grads).map(Tensor::shallow_clone).collect();
            s.unscale(&all)
        });
        let norm = adam::global_norm(grads, self.device);
        let verdict = tch::no_grad(|| {
            let mut flags = vec![means.isfinite().all(), norm.isfinite()];
            if !disc_grads.is_empty() {
                flags.push(adam::global_norm(disc_grads, self.device).isfinite());
            }
            Vec::<i64>::try_from(Tensor::stack(&flags, 0).to_kind(Kind::Int64)).expect("flags")
        });
        let loss_finite = verdict[0] != 0;
        let finite = unscaled && verdict.iter().all(|&f| f != 0);
        if finite {
            self.grad_norm = Some(norm.shallow_clone());
            if let Some(max_norm) = self.cfg.clip_grad {
                adam::clip_grad_norm(grads, &norm, max_norm);
            }
            self.adam.cfg.lr = lr;
            self.adam.step();
            if let Some(ema) = &mut self.ema {
                ema.update();
            }
            if let Some(adv) = &mut self.adversary {
                // Before its start latent diffusion steps the discriminator's Adam on zero
                // gradients (its loss is multiplied by 0): only the count moves.
                if disc_grads.is_empty() {
                    adv.adam.advance();
                } else {
                    adv.adam.step();
                }
            }
            self.bad_steps = 0;
        } else {
            self.bad_steps += 1;
            self.skipped_steps += 1;
        }
        loss_finite
    }

    /// A micro-batch's statistics: the bound's three, then, in runs that log them, the
    /// [`SHARPNESS`] ones the generator's pass knows (`[g_loss, d_weight]` once the
    /// adversarial term is on; the discriminator's are filled later).
    fn statistics(&self, elbo: &Elbo, adversarial_terms: Option<[Tensor; 2]>) -> Tensor {
        let bound = elbo.stacked();
        if self.stat_count() == 3 {
            return bound;
        }
        let zero = Tensor::zeros([], (Kind::Float, self.device));
        let zeros = || zero.shallow_clone();
        let lpips = elbo.lpips.as_ref().map_or_else(zeros, Tensor::detach);
        let logvar = self.adversary.as_ref().map_or_else(zeros, |a| a.logvar.detach());
        let [g_loss, d_weight] = adversarial_terms.unwrap_or_else(|| [zeros(), zeros()]);
        let sharp = Tensor::stack(&[lpips, g_loss, d_weight, zeros(), zeros(), zeros(), logvar], 0);
        Tensor::cat(&[bound, sharp], 0)
    }

    fn stop_asked(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// This rank's rows of a global batch of `global`: `(first, count)`; all of them alone.
    fn share(&self, global: i64) -> (i64, i64) {
        match &self.group {
            None => (0, global),
            Some(g) => {
                let (rank, world) = (g.rank as i64, g.world as i64);
                let first = global * rank / world;
                (first, global * (rank + 1) / world - first)
            }
        }
    }

    /// Takes a test evaluation's `figure` of the kind `cfg.best_by` names; whether it is the
    /// best yet (a figure that is not finite never is). Every rank holds the same figures, so
    /// every rank keeps the same count.
    pub fn judge(&mut self, figure: f64) -> bool {
        let improved =
            figure.is_finite() && self.best.is_none_or(|best| self.cfg.best_by.improves(figure, best));
        if improved {
            self.best = Some(figure);
            self.evaluations_since_best = 0;
        } else {
            self.evaluations_since_best += 1;
        }
        improved
    }

    /// Whether `--patience` evaluations in a row have not bettered the best.
    pub fn out_of_patience(&self) -> bool {
        self.cfg.patience > 0 && self.evaluations_since_best >= self.cfg.patience
    }

    /// Whether the run has nothing left to do: its epochs, `--max-steps` or `--patience` are
    /// used up, and no evaluation is owed.
    pub fn finished(&self) -> bool {
        self.pending_evaluation.is_none()
            && (self.epoch >= self.cfg.epochs
                || self.cfg.reached_max_steps(self.step)
                || self.out_of_patience())
    }

    /// Whether any rank says yes (one small all-reduce); this rank's word alone otherwise.
    pub fn any_rank(&self, yes: bool) -> Result<bool> {
        let Some(group) = &self.group else { return Ok(yes) };
        Ok(dist::ranks_saying(group, yes)? > 0)
    }

    /// Gives every rank rank 0's weights (all start from the seed alike; this makes sure).
    pub fn share_weights(&mut self) -> Result<()> {
        let Some(group) = &self.group else { return Ok(()) };
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        named.extend(self.adversary.iter().flat_map(|a| a.vs.variables()));
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let vars: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
        group.broadcast(&vars, 0)
    }

    /// Runs `f` with the weights' moving average in the model when one is kept (the trained
    /// weights put back after).
    pub fn averaged<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.ema {
            Some(ema) => ema.swapped(f),
            None => f(),
        }
    }

    /// The bound on a split (noise fixed per evaluation batch by the seed), the
    /// reconstructions' quality (LPIPS where the run computes it, rFID where it was given the
    /// Inception) and the posterior means' moments; every rank evaluates its share and the
    /// sums are exchanged, so all of them return the whole split's. `None` when a stop was
    /// asked for during it, on any rank (all of them agree before each round of batches).
    pub fn evaluate(&self, data: &Dataset) -> Result<Option<SplitFigures>> {
        let measure = Measure {
            seed: self.cfg.seed,
            weight: KlWeight { beta: self.cfg.beta, free_bits: 0.0 },
            perceptual: self.cfg.perceptual(self.lpips.as_ref())?,
            lpips: self.lpips.as_ref(),
            fid: self.fid.as_ref(),
        };
        let shard = self.group.as_ref().map_or((0, 1), |g| (g.rank, g.world));
        let mut keep_going = || Ok(!self.any_rank(self.stop_asked())?);
        let sums =
            crate::eval::split_sums(self.model.as_ref(), data, measure, self.device, shard, &mut keep_going)?;
        let Some(sums) = sums else { return Ok(None) };
        if let Some(group) = &self.group {
            group.all_reduce_sum(&sums.tensors())?;
        }
        sums.figures(data, self.lpips.is_some()).map(Some)
    }
}

/// `rows` split into `parts` consecutive micro-batches as even as can be, `(start, len)`, the
/// empty ones left out.
fn micro_batches(rows: i64, parts: usize) -> Vec<(i64, i64)> {
    let parts = parts.max(1) as i64;
    (0..parts)
        .map(|i| (rows * i / parts, rows * (i + 1) / parts - rows * i / parts))
        .filter(|&(_, len)| len > 0)
        .collect()
}

/// Sums the ranks' gradients, each weighted already by its rank's share of the batch, their
/// batch statistics (`[loss, reconstruction, kl]` means over `share` of the batch) and their
/// stop requests, in the same flat buckets (one all-reduce for a model under 25 MiB); writes
/// the summed gradients back and returns the global means and whether any rank asked to stop.
fn all_reduce_step(
    group: &ProcessGroup,
    grads: &[Tensor],
    means: &Tensor,
    share: f64,
    stop: bool,
) -> Result<(Tensor, bool)> {
    let mut parts: Vec<Tensor> = grads.iter().map(Tensor::shallow_clone).collect();
    let extra =
        tch::no_grad(|| [means * share, Tensor::from_slice(&[stop as u8 as f32]).to_device(means.device())]);
    parts.extend(extra);
    group.all_reduce_sum(&parts)?;
    let stop = parts[parts.len() - 1].double_value(&[0]) > 0.0;
    Ok((parts.swap_remove(parts.len() - 2), stop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BestBy;

    #[test]
    fn judging_keeps_the_best_and_counts_the_evaluations_since_it() {
        let cfg = TrainConfig { best_by: BestBy::Psnr, patience: 2, ..TrainConfig::default() };
        let mut t = Trainer::new(cfg, Device::Cpu).unwrap();
        // A figure that is not finite is never the best, not even the first.
        assert!(!t.judge(f64::NAN) && t.best.is_none());
        assert!(t.judge(20.0));
        assert!(!t.judge(19.0) && !t.out_of_patience());
        assert!(t.judge(21.0) && t.evaluations_since_best == 0);
        assert!(!t.judge(f64::INFINITY) && !t.judge(21.0));
        assert!(t.out_of_patience() && t.finished());
        assert_eq!((t.best, t.evaluations_since_best), (Some(21.0), 2));
    }
}
