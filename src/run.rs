//! A run: epochs of training in a run folder, with a test evaluation, checkpoints, pictures,
//! metrics and TensorBoard logs after each, and stops on request or divergence.

use crate::checkpoint::{self, Lineage, Metadata};
use crate::data::{Dataset, Loader, Splits};
use crate::dist::Backend;
use crate::eval::SplitFigures;
use crate::export::{self, GRID_COLS};
use crate::fsio::{duplicate, write_atomic};
use crate::loss::Stats;
use crate::metrics::{active_dimensions, EpochRow, MetricsLog};
use crate::models::Likelihood;
use crate::plot::{self, Series};
use crate::run_dir::{self, RunDir, BEFORE_EVAL, BEST, LOSS_PLOT, METRICS, RECONSTRUCTIONS, SAMPLES};
use crate::schedule::Schedule;
use crate::tensorboard::EventWriter;
use crate::train::{EpochEnd, Flow, PendingEvaluation, Trainer, Window};
use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Where a run writes, how it saves and reports: options of this process, not of the run
/// (a resumed run takes them anew).
#[derive(clap::Args, Debug, Clone)]
pub struct RunOptions {
    /// Run folder [default: checkpoints/<dataset>-<n>, the first n not taken].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run of this checkpoint or run folder with its saved config; knobs such as
    /// --lr, --epochs or --clip-grad may change, and --out writes the continuation elsewhere.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start a new run from these weights (a diffusers AutoencoderKL folder, whose config.json
    /// then gives the resnet architecture, or a checkpoint of ours of the same architecture):
    /// weights only, a fresh optimizer, any data and knobs; fine-tuning.
    #[arg(long, conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Continue the run in --out when it holds a checkpoint, start it there otherwise: one
    /// command for a job that is requeued or preempted (SLURM --requeue, spot instances)
    /// and runs again as it was. The flags are checked against the checkpoint's as with
    /// --resume; --init-from applies to the start only.
    #[arg(long, requires = "out", conflicts_with = "resume")]
    pub auto_resume: bool,
    /// Write epoch-NNNN.safetensors every this many epochs (0: never).
    #[arg(long, default_value_t = 1)]
    pub save_every: u64,
    /// Also rewrite last.safetensors every this many steps (0: once per epoch).
    #[arg(long, default_value_t = 0)]
    pub save_every_steps: u64,
    /// Also evaluate the test split every this many steps, mid-epoch, with all an epoch's end
    /// has (a metrics.csv row, last and best checkpoints, pictures): for epochs that take
    /// hours (0: at epoch ends only).
    #[arg(long, default_value_t = 0)]
    pub eval_every_steps: u64,
    /// Periodic checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    /// Print nothing but errors.
    #[arg(long)]
    pub quiet: bool,
    /// Write no TensorBoard event files.
    #[arg(long)]
    pub no_tensorboard: bool,
    /// Stop as diverged after this many steps in a row with a non-finite loss or gradient
    /// (each is skipped; the weights never see it).
    #[arg(long, default_value_t = 20)]
    pub max_bad_steps: u64,
    /// Start this many local ranks of a data-parallel run on torch.distributed (one GPU each
    /// on CUDA); `--batch-size` stays the global batch. torchrun and srun start their ranks
    /// themselves (another count here is refused under them).
    #[arg(long, default_value_t = 1)]
    pub nproc: usize,
    /// The collectives' backend [default: nccl on CUDA, gloo on the CPU]; given on one
    /// process, it forms a group of one (the multi-rank code path on one device).
    #[arg(long, value_enum)]
    pub dist_backend: Option<Backend>,
    /// Seconds a rank waits for the others, at the start and at each exchange, before it
    /// stops with an error (for rank 0's work alone, loading the data or writing checkpoints
    /// and pictures, it waits as long as that takes).
    #[arg(long, default_value_t = 600)]
    pub dist_timeout: u64,
    /// Set (by a signal handler) to stop after the current step with a checkpoint.
    #[arg(skip)]
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            out: None,
            resume: None,
            init_from: None,
            auto_resume: false,
            save_every: 1,
            save_every_steps: 0,
            eval_every_steps: 0,
            keep: 3,
            quiet: false,
            no_tensorboard: false,
            max_bad_steps: 20,
            nproc: 1,
            dist_backend: None,
            dist_timeout: 600,
            stop: None,
        }
    }
}

impl RunOptions {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.max_bad_steps >= 1, "--max-bad-steps must be at least 1, found {}", self.max_bad_steps);
        ensure!(self.nproc >= 1, "--nproc must be at least 1, found {}", self.nproc);
        ensure!(
            self.dist_timeout >= 1,
            "--dist-timeout must be at least 1 second, found {}",
            self.dist_timeout
        );
        Ok(())
    }

    fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// Whether the run evaluates after `trainer`'s latest step even inside an epoch: at its
    /// `--max-steps`, and every `--eval-every-steps`.
    fn evaluates_within_epoch(&self, trainer: &Trainer) -> bool {
        let every = self.eval_every_steps;
        trainer.cfg.reached_max_steps(trainer.step) || (every > 0 && trainer.step.is_multiple_of(every))
    }
}

/// What a run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Train and test statistics at each test evaluation of this invocation: epochs' ends,
    /// and those inside epochs (`--eval-every-steps`, `--max-steps`).
    pub epochs: Vec<(Stats, Stats)>,
    /// Stopped by `RunOptions::stop` before the last epoch; `last.safetensors` holds the state.
    pub interrupted: bool,
    /// Stopped in a test evaluation, which `last.safetensors` owes.
    pub in_evaluation: bool,
}

/// The run folder's writers: checkpoints, metrics, events and pictures, in one place.
struct Outputs<'a> {
    folder: &'a RunDir,
    lineage: &'a Lineage,
    metrics: MetricsLog,
    events: Option<EventWriter>,
    /// Whether the save as the current evaluation began made the folder's first `last`.
    first_last: bool,
}

impl Outputs<'_> {
    /// Writes `last.safetensors`.
    fn save_last(&self, trainer: &Trainer) -> Result<()> {
        self.write_last(trainer, &Metadata::of(trainer, self.lineage))
    }

    fn write_last(&self, trainer: &Trainer, meta: &Metadata) -> Result<()> {
        write_atomic(&self.folder.last(), &checkpoint::trainer_bytes(trainer, meta)?)
    }

    /// Saves the run as a test evaluation begins, the evaluation owed: a kill during it (which
    /// can outlast a preemption's grace) then costs only the evaluation. The `last` it
    /// replaces stays, as [`BEFORE_EVAL`] (a hard link: nothing copied), until
    /// [`Outputs::settle_evaluation`].
    fn save_before_evaluation(&mut self, trainer: &Trainer, pending: &PendingEvaluation) -> Result<()> {
        let (last, kept) = (self.folder.last(), self.folder.file(BEFORE_EVAL));
        self.first_last = !last.exists();
        if !self.first_last {
            duplicate(&last, &kept)?;
        }
        let meta = Metadata::of(trainer, self.lineage);
        self.write_last(trainer, &Metadata { pending_evaluation: Some(pending.clone()), ..meta })
    }

    /// After an evaluation that measured a test loss: the checkpoint kept through it goes
    /// when the loss is finite; when not, it comes back as `last` (and a first `last`, saved
    /// as the evaluation began, goes), so that `last` stays the latest checkpoint with a
    /// finite test loss. For a loss that is not finite, says what the folder then holds.
    fn settle_evaluation(&self, finite: bool) -> Result<String> {
        let (last, kept) = (self.folder.last(), self.folder.file(BEFORE_EVAL));
        let context = || format!("settling {} after the test evaluation", last.display());
        if finite {
            if kept.exists() {
                std::fs::remove_file(&kept).with_context(context)?;
            }
            return Ok(String::new());
        }
        if kept.exists() {
            std::fs::rename(&kept, &last).with_context(context)?;
            Ok(format!("{} keeps the last checkpoint with a finite one", last.display()))
        } else if self.first_last {
            std::fs::remove_file(&last).with_context(context)?;
            Ok("it had no checkpoint with a finite one".into())
        } else if last.exists() {
            // An owed evaluation resumed without the checkpoint before it.
            Ok(format!("{} holds the weights that gave it", last.display()))
        } else {
            // An owed evaluation resumed into another folder, which got nothing yet.
            Ok(format!("nothing was saved in {}", self.folder.path().display()))
        }
    }

    /// Per step, every `LOG_EVERY` steps: the training window's scalars, flushed so that
    /// TensorBoard shows an epoch of hours as it goes.
    fn log_window(&mut self, trainer: &Trainer, window: &Window, schedule: &Schedule) -> Result<()> {
        let Some(tb) = self.events.as_mut() else { return Ok(()) };
        let step = trainer.step;
        tb.scalar("train/loss", step, window.stats.loss)?;
        tb.scalar("train/reconstruction", step, window.stats.reconstruction)?;
        tb.scalar("train/kl", step, window.stats.kl)?;
        tb.scalar("train/images_per_s", step, window.images_per_s)?;
        if window.grad_norm.is_finite() {
            tb.scalar("train/grad_norm", step, window.grad_norm)?;
        }
        tb.scalar("train/lr", step, trainer.adam.cfg.lr)?;
        for (name, value) in window.stats.sharpness_named() {
            tb.scalar(&format!("train/{name}"), step, value)?;
        }
        tb.scalar("train/beta", step, schedule.beta_at(step.saturating_sub(1)))?;
        tb.flush()
    }

    /// After a test evaluation: `last`, `best` when the test loss improved, and at the end
    /// of an epoch (`complete`) the periodic checkpoint: written once, the others its hard
    /// links (for Stable Diffusion's VAE with Adam and EMA, 1.3 GB each that is not written).
    fn save_checkpoints(
        &self,
        trainer: &Trainer,
        improved: bool,
        complete: bool,
        opts: &RunOptions,
    ) -> Result<()> {
        self.save_last(trainer)?;
        let last = self.folder.last();
        if improved {
            duplicate(&last, &self.folder.file(BEST))?;
        }
        if complete && opts.save_every > 0 && trainer.epoch.is_multiple_of(opts.save_every) {
            duplicate(&last, &self.folder.file(&run_dir::periodic_name(trainer.epoch)))?;
            self.folder.prune_periodic(opts.keep)?;
        }
        Ok(())
    }

    /// Test images above their reconstructions, and draws from the prior fixed by the seed.
    fn draw_pictures(&self, trainer: &Trainer, test: &Dataset) -> Result<()> {
        let model = trainer.model.as_ref();
        let x = export::first_images(test, 2 * GRID_COLS, trainer.device)?;
        let cols = GRID_COLS.min(x.size()[0] as usize);
        let path = self.folder.file(RECONSTRUCTIONS);
        export::save_grid(&path, &export::reconstruction_grid(model, &x, cols, None), cols)?;
        crate::rng::seed_torch(trainer.cfg.seed, crate::rng::Stream::Eval, u64::MAX);
        let [_, h, w] = trainer.cfg.model.image_shape();
        let images = export::samples(model, 4 * GRID_COLS as i64, 1.0, [h, w], trainer.device);
        export::save_grid(&self.folder.file(SAMPLES), &images, GRID_COLS)
    }

    /// The epoch's scalars and pictures, for TensorBoard.
    fn log_epoch(&mut self, row: &EpochRow) -> Result<()> {
        let Some(tb) = self.events.as_mut() else { return Ok(()) };
        let step = row.step;
        let quality = &row.quality;
        let measured = [("test/ssim", quality.ssim), ("test/lpips", quality.lpips), ("test/rfid", row.rfid)];
        for (tag, value) in [
            ("epoch/train_loss", row.train.loss),
            ("test/loss", row.test.loss),
            ("test/reconstruction", row.test.reconstruction),
            ("test/kl", row.test.kl),
            ("test/psnr", quality.psnr_db),
            ("test/active_dims", row.active_dims as f64),
        ]
        .into_iter()
        .chain(measured.into_iter().filter_map(|(tag, v)| Some((tag, v?))))
        {
            tb.scalar(tag, step, value)?;
        }
        for (tag, file) in [("reconstructions", RECONSTRUCTIONS), ("samples", SAMPLES)] {
            let path = self.folder.file(file);
            let png = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let (w, h) = image::image_dimensions(&path)?;
            tb.image(tag, step, &png, w, h)?;
        }
        tb.flush()
    }

    /// `loss.png` from the whole of `metrics.csv`, earlier invocations of a resumed run
    /// included; the bound is in nats only when the reconstruction term `likelihood` is a density.
    fn plot_losses(&self, likelihood: Likelihood) -> Result<()> {
        let rows = self.metrics.read()?;
        let column = |name: &str| -> Vec<(f64, f64)> {
            rows.iter()
                .filter_map(|r| {
                    let get = |k: &str| r.iter().find(|(h, _)| h == k).map(|(_, v)| *v);
                    Some((get("epoch")?, get(name)?))
                })
                // Rows without training figures (NaN) are left out of their line.
                .filter(|(_, v)| v.is_finite())
                .collect()
        };
        let series = [
            Series { label: "train", color: plot::TRAIN_COLOR, points: column("train_loss") },
            Series { label: "test", color: plot::TEST_COLOR, points: column("test_loss") },
        ];
        let unit =
            if likelihood.is_density() { "loss (nats per image)" } else { "loss per image (not nats)" };
        plot::save_lines(&self.folder.file(LOSS_PLOT), &series, "epoch", unit)
    }
}

/// The divergence guard: too many non-finite steps in a row stop the run, naming the way out.
fn guard(trainer: &Trainer, opts: &RunOptions, folder: Option<&RunDir>) -> Result<()> {
    if trainer.bad_steps >= opts.max_bad_steps {
        bail!(
            "training diverged at step {} (epoch {}): {} steps in a row gave a non-finite loss or \
             gradient and were skipped, so the weights are those of step {}. Lower --lr (now {}) or \
             pass --clip-grad; {} holds the last good checkpoint",
            trainer.step,
            trainer.epoch + 1,
            trainer.bad_steps,
            trainer.step - trainer.bad_steps,
            trainer.cfg.adam.lr,
            folder.map_or("rank 0's run folder".into(), |f| f.last().display().to_string())
        );
    }
    Ok(())
}

fn progress_bar(quiet: bool, len: usize, epoch: u64, epochs: u64) -> ProgressBar {
    let progress = if quiet { ProgressBar::hidden() } else { ProgressBar::new(len as u64) };
    progress.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    progress.set_prefix(format!("{}/{}", epoch + 1, epochs));
    progress
}

/// One epoch, and after each step: log, guard, periodic save, interrupt; it stops early when
/// a stop was asked for or the run evaluates within the epoch.
fn train_epoch(
    trainer: &mut Trainer,
    loader: &Loader,
    mut out: Option<&mut Outputs>,
    schedule: &Schedule,
    opts: &RunOptions,
) -> Result<EpochEnd> {
    let progress = progress_bar(opts.quiet, loader.len(), trainer.epoch, trainer.cfg.epochs);
    let skipped_before = trainer.skipped_steps;
    let train = trainer.train_epoch(loader, &progress, |t, window| {
        if let (Some(out), Some(window)) = (out.as_deref_mut(), window) {
            out.log_window(t, window, schedule)?;
        }
        guard(t, opts, out.as_deref().map(|o| o.folder))?;
        // The steps that evaluate save after their evaluation: saved before it, their step
        // would resume past the evaluation (or, at an epoch's end, not at all).
        let evaluates = t.step == (t.epoch + 1) * loader.steps_per_epoch() || opts.evaluates_within_epoch(t);
        if !evaluates && opts.save_every_steps > 0 && t.step.is_multiple_of(opts.save_every_steps) {
            if let Some(out) = out.as_deref() {
                out.save_last(t)?;
            }
            after_rank_0_writes(t, "saved", "save the checkpoint")?;
        }
        crate::fault::after_step(t.step);
        // Every rank stops at the same step, whichever was told.
        Ok(if t.stopping || opts.evaluates_within_epoch(t) { Flow::Stop } else { Flow::Continue })
    })?;
    progress.finish_and_clear();
    let skipped = trainer.skipped_steps - skipped_before;
    if skipped > 0 && !opts.quiet {
        note!(
            "warning: skipped {skipped} steps with a non-finite loss or gradient in epoch {}",
            trainer.epoch
        );
    }
    Ok(train)
}

/// Trains to the next test evaluation and saves the run as it begins, the evaluation owed (a
/// kill during it, which can outlast a preemption's grace, then costs only the evaluation);
/// or takes the evaluation a killed process owed. With whether it ends an epoch; `None` when
/// a stop came first (the run saved).
fn train_to_evaluation(
    trainer: &mut Trainer,
    loader: &Loader,
    out: Option<&mut Outputs>,
    schedule: &Schedule,
    opts: &RunOptions,
) -> Result<Option<(PendingEvaluation, bool)>> {
    let steps_per_epoch = loader.steps_per_epoch();
    if let Some(pending) = trainer.pending_evaluation.take() {
        if out.is_some() && !opts.quiet {
            note!("step {}: the test evaluation the run was stopped in comes first", trainer.step);
        }
        return Ok(Some((pending, trainer.step == trainer.epoch * steps_per_epoch)));
    }
    let started = Instant::now();
    // Images of the current epoch taken (before this call, in a run resumed mid-epoch; at its
    // end, by a run stopped inside it).
    let images_into =
        |t: &Trainer| ((t.step - t.epoch * steps_per_epoch) as usize * loader.batch_size()).min(loader.len());
    let images_before = images_into(trainer);
    let mut out = out;
    let (train, complete) = match train_epoch(trainer, loader, out.as_deref_mut(), schedule, opts)? {
        EpochEnd::Complete(train) => (train, true),
        EpochEnd::Stopped(train) if opts.evaluates_within_epoch(trainer) => (train, false),
        EpochEnd::Stopped(_) => {
            if let Some(out) = out {
                out.save_last(trainer)?;
            }
            return Ok(None);
        }
    };
    // Only a checkpoint saved at an epoch's last step completes an epoch without a step.
    if complete && train.is_none() && out.is_some() && !opts.quiet {
        note!(
            "epoch {} had taken all its steps but not reached its end (a checkpoint of an earlier vae, \
             saved before the epoch's test evaluation): evaluating it now; its metrics row has no \
             training figures",
            trainer.epoch
        );
    }
    let images = if complete { loader.len() } else { images_into(trainer) } - images_before;
    let pending = PendingEvaluation { train, images, seconds: started.elapsed().as_secs_f64() };
    if let Some(out) = out {
        out.save_before_evaluation(trainer, &pending)?;
    }
    after_rank_0_writes(trainer, "saved", "save the checkpoint")?;
    Ok(Some((pending, complete)))
}

/// The other ranks of a data-parallel run wait here for rank 0's writes at this step (`what`),
/// however long they take: a large checkpoint on a network file system can outlast
/// `--dist-timeout`, which the next collective would not wait out. `done` names the writes,
/// each at most once a step.
fn after_rank_0_writes(trainer: &Trainer, done: &str, what: &str) -> Result<()> {
    let key = format!("vae/{done}-{}", trainer.step);
    trainer.group.as_ref().map_or(Ok(()), |group| crate::dist::rank_0_done(group, &key, what))
}

/// The test split's figures and active dimensions (every rank computes its share), or `None`
/// when a stop came during it (the run was saved as it began). A test loss that is not finite
/// ends the run on every rank, rank 0's `last` put back to the checkpoint before it.
fn evaluate(trainer: &Trainer, test: &Dataset, out: Option<&Outputs>) -> Result<Option<(SplitFigures, i64)>> {
    let Some(figures) = trainer.evaluate(test)? else { return Ok(None) };
    let finite = figures.stats.loss.is_finite();
    let kept = match out {
        Some(out) => out.settle_evaluation(finite)?,
        None => "rank 0's run folder keeps the last checkpoint with a finite one".into(),
    };
    if !finite {
        bail!(
            "epoch {}: the test loss is not finite ({}); the run has diverged, and {kept}",
            trainer.epoch,
            figures.stats.loss
        );
    }
    let active = active_dimensions(&figures.moments, test.len());
    Ok(Some((figures, active)))
}

/// Trains until `trainer.cfg.epochs` (or its `max_steps`) in `folder` (held by this process),
/// writing checkpoints of the run `lineage` names, and pictures. Without a folder (the ranks
/// of a data-parallel run but rank 0), it trains alongside and writes nothing.
pub fn run(
    trainer: &mut Trainer,
    splits: &Splits,
    folder: Option<&RunDir>,
    lineage: &Lineage,
    opts: &RunOptions,
) -> Result<RunSummary> {
    let cfg = trainer.cfg.clone();
    trainer.stop = opts.stop.clone();
    let shape = splits.train.image_shape();
    let expected = cfg.model.image_shape();
    ensure!(
        shape == expected,
        "the {} data has images of {shape:?} (channels, height, width) but the model expects {expected:?}",
        cfg.data.name(),
    );
    let test = crate::eval::prepared(&splits.test, &cfg);
    ensure!(
        trainer.fid.is_none() || test.len() >= 2,
        "--fid-weights: rFID needs at least 2 test images, the {} data has {}",
        cfg.data.name(),
        test.len()
    );
    let loader = Loader::new(&splits.train, trainer.device, cfg.batch_size);
    let schedule = cfg.schedule(loader.len());
    let mut out = match folder {
        Some(folder) => {
            let events = if opts.no_tensorboard {
                None
            } else {
                Some(EventWriter::create(folder.path(), trainer.step)?)
            };
            let metrics = MetricsLog::new(&folder.file(METRICS));
            Some(Outputs { folder, lineage, metrics, events, first_last: false })
        }
        None => None,
    };
    if let (false, Some(folder)) = (opts.quiet, folder) {
        let [c, h, w] = shape;
        say!(
            "training on {} images of {c}x{h}x{w} ({}{}), {} test images, on {}{}; run folder {}",
            loader.len(),
            cfg.data.name(),
            if splits.train.is_streamed() { ", streamed from disk" } else { "" },
            test.len(),
            crate::device::describe(trainer.device),
            if cfg.gradient_checkpointing { " with gradient checkpointing" } else { "" },
            folder.path().display()
        );
    }
    let mut summary = RunSummary { epochs: Vec::new(), interrupted: false, in_evaluation: false };
    let steps_per_epoch = loader.steps_per_epoch();
    // Steps of the current epoch taken.
    let steps_into = |t: &Trainer| t.step - t.epoch * steps_per_epoch;
    while !trainer.finished() {
        let all_reduce_before = trainer.all_reduce_seconds;
        let Some((pending, complete)) = train_to_evaluation(trainer, &loader, out.as_mut(), &schedule, opts)?
        else {
            summary.interrupted = true;
            return Ok(summary);
        };
        crate::fault::in_evaluation();
        let PendingEvaluation { train, images, seconds } = pending;
        // A step with a finite loss is needed for figures; none at all leaves them NaN.
        let train = train.unwrap_or(Stats {
            loss: f64::NAN,
            reconstruction: f64::NAN,
            kl: f64::NAN,
            sharpness: None,
        });
        // Epochs trained, with the fraction of the next one taken where the run stopped inside it.
        let epoch = trainer.epoch as f64 + steps_into(trainer) as f64 / steps_per_epoch as f64;
        // Judged (and pictured, below) with the weights' moving average, where one is kept.
        let Some((figures, active_dims)) = trainer.averaged(|| evaluate(trainer, &test, out.as_ref()))?
        else {
            (summary.interrupted, summary.in_evaluation) = (true, true);
            return Ok(summary);
        };
        let test_stats = figures.stats;
        let by = cfg.best_by;
        let figure =
            figures.figure(by).with_context(|| format!("--best-by: no test {} was measured", by.name()))?;
        let improved = trainer.judge(figure);
        // Rank 0 writes the evaluation's files; the others wait for it below.
        if let Some(out) = out.as_mut() {
            let row = EpochRow {
                epoch,
                step: trainer.step,
                train,
                test: test_stats,
                quality: figures.quality,
                rfid: figures.rfid,
                active_dims,
                lr: schedule.lr_at(trainer.step.saturating_sub(1)),
                images_per_s: images as f64 / seconds,
                seconds,
            };
            out.metrics.append(&row)?;
            out.save_checkpoints(trainer, improved, complete, opts)?;
            trainer.averaged(|| out.draw_pictures(trainer, &splits.test))?;
            out.log_epoch(&row)?;
            out.plot_losses(trainer.model.likelihood())?;
            if !opts.quiet {
                let all_reduce = match &trainer.group {
                    Some(g) => format!(
                        "  {} rank{}, all-reduce {:.0}% of the epoch",
                        g.world,
                        if g.world == 1 { "" } else { "s" },
                        100.0 * (trainer.all_reduce_seconds - all_reduce_before) / seconds
                    ),
                    None => String::new(),
                };
                // The epoch's peak of allocated GPU memory, training and evaluation.
                let gpu = crate::native::cuda_peak_mib(trainer.device, true)
                    .map(|mib| format!("  peak GPU {mib:.0} MiB"))
                    .unwrap_or_default();
                // The discriminator's terms once it has run (its start is a step count).
                let sharp = train.sharpness_summary(
                    cfg.perceptual_weight > 0.0,
                    cfg.disc_weight > 0.0 && trainer.step > cfg.disc_start,
                );
                let at = if complete {
                    format!("epoch {}/{}", trainer.epoch, cfg.epochs)
                } else if cfg.reached_max_steps(trainer.step) {
                    format!("epoch {epoch:.2}/{} (--max-steps {})", cfg.epochs, cfg.max_steps)
                } else {
                    format!("epoch {epoch:.2}/{}", cfg.epochs)
                };
                let rfid = row.rfid.map(|f| format!("  rFID {f:.3}")).unwrap_or_default();
                say!(
                    "{at}  train {train}{sharp}  test {test_stats}  {}{rfid}  {:.0} img/s  {seconds:.1}s  active dims {active_dims}/{}{all_reduce}{gpu}",
                    row.quality,
                    row.images_per_s,
                    cfg.model.latent_dim()
                );
            }
            summary.epochs.push((train, test_stats));
            if trainer.out_of_patience() && !opts.quiet {
                say!(
                    "stopping early: the test {} has not bettered {:.4} for {} evaluation(s) (--patience {})",
                    by.name(),
                    trainer.best.unwrap_or(f64::NAN),
                    trainer.evaluations_since_best,
                    cfg.patience
                );
            }
            crate::fault::in_writes();
        }
        after_rank_0_writes(trainer, "written", "write the evaluation's checkpoints and pictures")?;
        if !trainer.finished() && trainer.any_rank(opts.stop_requested())? {
            summary.interrupted = true;
            return Ok(summary);
        }
    }
    Ok(summary)
}
