//! `vae bench`: training throughput of any config the training flags describe, as one JSON
//! line (scripts/bench puts it beside PyTorch's).

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use vae::bench::BenchOptions;
use vae::config::TrainArgs;

/// Measure training throughput (scripts/bench compares it with PyTorch); prints one JSON line.
#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    settings: TrainArgs,
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
    /// Then record timed steps with libtorch's profiler (torch.profiler's engine) into FILE, a
    /// Chrome trace of every operator and, on CUDA, every kernel (scripts/trace_summary.py
    /// tabulates it; Perfetto shows it). FILE must not exist.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// How many of the timed steps --trace records.
    #[arg(long, default_value_t = 5)]
    trace_steps: usize,
}

impl BenchArgs {
    /// `matches`: the command line, to refuse data flags that do not apply.
    pub fn run(&self, matches: &clap::ArgMatches) -> Result<()> {
        self.settings.data.check_flags(matches)?;
        let device = self.settings.device.init()?;
        let cfg = self.settings.config();
        cfg.precision.check_device(device)?;
        let opts = BenchOptions {
            warmup: self.warmup,
            steps: self.steps,
            full_epoch: self.full_epoch,
            profile: self.profile,
            trace: self.trace.clone(),
            trace_steps: self.trace_steps,
        };
        vae::say!("{}", serde_json::to_string(&vae::bench::run(cfg, device, opts)?)?);
        Ok(())
    }
}
