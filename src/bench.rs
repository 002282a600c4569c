//! Training throughput as `scripts/bench` compares it with the PyTorch reference
//! (`scripts/bench_reference.py`): the real training step, timed after a warm-up between two
//! device syncs, and optionally a whole epoch with data loading and the test evaluation.

use crate::config::TrainConfig;
use crate::data::{DataConfig, Loader};
use crate::loss::Stats;
use crate::native;
use crate::train::{StepTimes, Trainer};
use anyhow::{ensure, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub warmup: usize,
    pub steps: usize,
    /// Also time loading the data, one epoch and the test evaluation.
    pub full_epoch: bool,
    /// Also split the timed steps into their phases (syncing the device between them).
    pub profile: bool,
    /// Then record the first `trace_steps` of the timed batches with libtorch's profiler into
    /// this file (a Chrome trace), after the timing, so the profiler's cost is not timed.
    pub trace: Option<PathBuf>,
    pub trace_steps: usize,
}

impl BenchOptions {
    /// Refuses a trace that could not be written before anything runs: an existing file is
    /// never replaced, and a missing folder would show only after minutes of steps.
    pub fn check(&self) -> Result<()> {
        let Some(path) = &self.trace else { return Ok(()) };
        ensure!(!self.full_epoch, "--trace records the timed steps; it does not go with --full-epoch");
        ensure!(self.trace_steps > 0, "--trace-steps must be at least 1");
        ensure!(!path.exists(), "--trace {}: the file exists; name a new one", path.display());
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        ensure!(dir.is_dir(), "--trace {}: no folder {}", path.display(), dir.display());
        Ok(())
    }
}

/// One JSON line of figures; the field names match the reference script's.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    pub device: String,
    pub precision: String,
    pub batch_size: usize,
    pub threads: i32,
    pub images_per_s: Option<f64>,
    pub train_loss: Option<f64>,
    pub epoch_s: Option<f64>,
    pub test_loss: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// The most GPU memory the timed steps held (the caching allocator's peak of allocated
    /// bytes, `torch.cuda.max_memory_allocated` in the PyTorch reference); None off CUDA.
    pub peak_cuda_mib: Option<f64>,
    /// Seconds to load (read, decode, or take from the cache) both splits.
    pub load_s: f64,
    /// Images of both splits per second of loading.
    pub load_images_per_s: f64,
    /// Milliseconds per step in each phase, from a separate profiled pass.
    pub profile_ms: Option<PhaseMs>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseMs {
    pub data: f64,
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
}

impl From<&StepTimes> for PhaseMs {
    fn from(t: &StepTimes) -> Self {
        let per_step = |s: f64| 1e3 * s / t.steps.max(1) as f64;
        Self {
            data: per_step(t.data),
            forward: per_step(t.forward),
            backward: per_step(t.backward),
            optimizer: per_step(t.optimizer),
        }
    }
}

/// The process's peak resident memory (VmHWM), as `getrusage`'s maxrss reports it to Python.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn run(mut cfg: TrainConfig, device: Device, opts: BenchOptions) -> Result<BenchReport> {
    opts.check()?;
    let started = Instant::now();
    let splits = DataConfig::load(&cfg.data, cfg.seed, false)?;
    let load_s = started.elapsed().as_secs_f64();
    let [c, h, _] = splits.train.image_shape();
    cfg.model.set_image_shape(c, h);
    let mut trainer = Trainer::new(cfg, device)?;
    let loader = Loader::new(&splits.train, device, trainer.cfg.batch_size);
    let mut report = BenchReport {
        implementation: "vae",
        device: crate::device::describe(device),
        precision: trainer.cfg.precision.to_string(),
        batch_size: trainer.cfg.batch_size,
        threads: tch::get_num_threads(),
        images_per_s: None,
        train_loss: None,
        epoch_s: None,
        test_loss: None,
        peak_rss_mib: None,
        peak_cuda_mib: None,
        load_s,
        load_images_per_s: (splits.train.len() + splits.test.len()) as f64 / load_s,
        profile_ms: None,
    };
    if opts.full_epoch {
        trainer.train_epoch(&loader, &indicatif::ProgressBar::hidden(), |_, _| {
            Ok(crate::train::Flow::Continue)
        })?;
        report.test_loss = trainer.evaluate(&splits.test)?.map(|f| f.stats.loss);
        report.epoch_s = Some(started.elapsed().as_secs_f64());
    } else {
        let batch = trainer.cfg.batch_size as i64;
        ensure!(loader.len() as i64 >= batch, "the training split holds no full batch of {batch}");
        let batches: Vec<Tensor> = (0..)
            .flat_map(|epoch| loader.shuffled_batches(trainer.cfg.seed, epoch))
            .filter(|b| b.size()[0] == batch)
            .take(opts.warmup + opts.steps)
            .collect();
        let (warmup, timed) = batches.split_at(opts.warmup);
        let mut sums = steps(&mut trainer, &loader, warmup, None)?;
        crate::device::synchronize(device);
        native::cuda_peak_mib(device, true);
        let start = Instant::now();
        sums += steps(&mut trainer, &loader, timed, None)?;
        crate::device::synchronize(device);
        let seconds = start.elapsed().as_secs_f64();
        report.peak_cuda_mib = native::cuda_peak_mib(device, false);
        report.images_per_s = Some((opts.steps as i64 * batch) as f64 / seconds);
        report.train_loss = Some(Stats::from_sums(&sums, batches.len()).loss);
        if opts.profile {
            let mut times = StepTimes::default();
            let _profiled = steps(&mut trainer, &loader, timed, Some(&mut times))?;
            report.profile_ms = Some(PhaseMs::from(&times));
        }
        if let Some(path) = &opts.trace {
            // The profiler's records take host memory: the figure is the steps' own.
            report.peak_rss_mib = peak_rss_mib();
            let trace = native::Trace::start(device)?;
            let _traced = steps(&mut trainer, &loader, &timed[..opts.trace_steps.min(timed.len())], None)?;
            crate::device::synchronize(device);
            trace.save(path)?;
            return Ok(report);
        }
    }
    report.peak_rss_mib = peak_rss_mib();
    Ok(report)
}

/// Trains on `batches` as `train_epoch` does (each read ahead: streamed sets read on a
/// background thread), summing the batch means.
fn steps(
    trainer: &mut Trainer,
    loader: &Loader,
    batches: &[Tensor],
    mut times: Option<&mut StepTimes>,
) -> Result<Tensor> {
    let mut sums = Tensor::zeros([trainer.stat_count()], (Kind::Float, trainer.device));
    for (i, indices) in batches.iter().enumerate() {
        loader.prefetch_next(batches, i);
        if let Some(means) = trainer.step(loader, indices, times.as_deref_mut())? {
            sums += means;
        }
    }
    Ok(sums)
}
