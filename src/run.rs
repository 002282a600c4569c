//! A run: epochs of training in a run folder, with a test evaluation, checkpoints, pictures,
//! metrics and TensorBoard logs after each, and stops on request or divergence.

use crate::checkpoint;
use crate::data::{Loader, Splits};
use crate::export::GRID_COLS;
use crate::metrics::{active_dimensions, EpochRow, MetricsLog};
use crate::plot::{self, Series, LOSS_PLOT};
use crate::tensorboard::EventWriter;
use crate::train::{Flow, Stats, Trainer};
use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

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
