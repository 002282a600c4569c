//! The `vae` command line: the table of subcommands; each lives in `cli/`.

mod cli;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::io::Write;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "vae", version, about = "Train convolutional variational auto-encoders on libtorch")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a VAE; writes checkpoints and pictures into a run folder.
    Train(Box<cli::train::TrainCommand>),
    /// Print a checkpoint's config, progress, history, parameter count and tensors.
    Info(cli::info::InfoArgs),
    /// Measure training throughput (scripts/bench compares it with PyTorch); prints one JSON
    /// line.
    Bench(Box<cli::bench::BenchArgs>),
    /// The negative ELBO and the importance-weighted bound on a split, in nats per image and
    /// bits per dimension.
    Eval(cli::inspect::EvalArgs),
    /// Originals above their reconstructions: test images, or your own image files.
    Reconstruct(cli::inspect::ReconstructArgs),
    /// Decoded draws from the prior.
    Sample(cli::inspect::SampleArgs),
    /// Paths between the latents of pairs of test images, one pair per row.
    Interpolate(cli::inspect::InterpolateArgs),
    /// One row per latent dimension: a test image's latent with that dimension swept over
    /// [-3, 3], the dimensions carrying the most KL first.
    Traverse(cli::inspect::TraverseArgs),
    /// Posterior means and log-variances (and labels, where the data has them) of a split, as
    /// a safetensors file; of an image folder, its metadata `files` names each image's file.
    Encode(cli::export::EncodeArgs),
    /// Images decoded from latents (vae encode's, or a diffusion model's samples), as a grid
    /// and, with --each, one PNG each.
    Decode(cli::export::DecodeArgs),
    /// A diffusers AutoencoderKL folder from a checkpoint of --arch resnet.
    ExportDiffusers(cli::export::ExportDiffusersArgs),
    /// One safetensors file in the original Stable Diffusion (LDM) layout from a checkpoint of
    /// --arch resnet: the VAE file AUTOMATIC1111's web UI and ComfyUI load.
    ExportSingleFile(cli::export::ExportSingleFileArgs),
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // In one write: ranks of a run share the terminal, and a message written in pieces
            // (as `fn main() -> Result` prints one) can be cut by another rank's.
            let _ = std::io::stderr().write_all(format!("Error: {e:?}\n").as_bytes());
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let matches = Cli::command().get_matches();
    let (_, sub) = matches.subcommand().expect("clap requires a subcommand");
    // Tiles are asked for to bound memory: glibc then frees as by default (a 1024 x 1024
    // decoding in tiles of 512: 25% less peak memory for 10% more time; BENCHMARKS.md).
    if !sub.try_contains_id("tile").unwrap_or(false) {
        cli::keep_freed_memory();
    }
    match Cli::from_arg_matches(&matches)?.command {
        Command::Train(args) => args.run(sub),
        Command::Info(args) => args.run(),
        Command::Bench(args) => args.run(sub),
        Command::Eval(args) => args.run(sub),
        Command::Reconstruct(args) => args.run(sub),
        Command::Sample(args) => args.run(sub),
        Command::Interpolate(args) => args.run(sub),
        Command::Traverse(args) => args.run(sub),
        Command::Encode(args) => args.run(sub),
        Command::Decode(args) => args.run(sub),
        Command::ExportDiffusers(args) => args.run(sub),
        Command::ExportSingleFile(args) => args.run(sub),
    }
}
