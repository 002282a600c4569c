//! What the speed work must not break: every precision trains, float16's loss scale survives a
//! checkpoint, and `scripts/bench --quick` runs both implementations. (Speed itself is
//! measured by scripts/bench, never asserted in tests.)

mod common;

use common::{ok, python_script, stderr, stdout, vae, TINY_MODEL};
use std::path::Path;
use tch::Device;
use vae::checkpoint::{self, Checkpoint};
use vae::config::TrainConfig;
use vae::data::{DataConfig, Loader};
use vae::models::{ConvConfig, ModelConfig, ResnetConfig};
use vae::precision::Precision;
use vae::train::{EpochEnd, Flow, Trainer};

const DATA: &[&str] = &["--train-size", "512", "--test-size", "64", "--batch-size", "32"];

fn epoch_losses(out: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.starts_with("epoch "))
        .map(|l| l.split_whitespace().nth(3).expect("train loss").parse().expect("a number"))
        .collect()
}

#[test]
fn float32_and_bfloat16_train_through_the_binary_and_f16_needs_cuda() {
    let dir = tempfile::tempdir().unwrap();
    for precision in ["f32", "bf16"] {
        let run = dir.path().join(precision);
        let mut args =
            vec!["train", "--epochs", "3", "--precision", precision, "--out", run.to_str().unwrap()];
        args.extend_from_slice(TINY_MODEL);
        args.extend_from_slice(DATA);
        let out = ok(vae(&args));
        let losses = epoch_losses(&stdout(&out));
        assert_eq!(losses.len(), 3, "{}", stdout(&out));
        assert!(losses[2] < losses[0] * 0.9, "{precision}: loss did not fall: {losses:?}");
        let ckpt = Checkpoint::load(&run.join("last.safetensors")).unwrap();
        assert_eq!(ckpt.meta.config.precision.to_string(), precision);
    }
    let refused = dir.path().join("f16");
    let mut args = vec!["train", "--precision", "f16", "--out", refused.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    let out = vae(&args);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--precision f16 needs a CUDA device"), "{}", stderr(&out));
    assert!(!refused.exists(), "a refused run leaves nothing behind");
}

/// The float16 path, loss scaling included, on the CPU: the binary refuses f16 there as it
/// would be slow, but the library computes it correctly, which is what this checks.
#[test]
fn float16_trains_with_a_loss_scale_that_is_checkpointed() {
    let cfg = TrainConfig {
        model: ModelConfig::Conv(ConvConfig {
            channels: vec![8, 16],
            hidden: 32,
            latent_dim: 4,
            ..ConvConfig::default()
        }),
        data: DataConfig { train_size: Some(256), test_size: Some(32), ..DataConfig::default() },
        batch_size: 32,
        precision: Precision::F16,
        ..TrainConfig::default()
    };
    let splits = cfg.data.load(cfg.seed, false).unwrap();
    let mut trainer = Trainer::new(cfg, Device::Cpu).unwrap();
    let loader = Loader::new(&splits.train, Device::Cpu, 32);
    let progress = indicatif::ProgressBar::hidden();
    let mut losses = Vec::new();
    // Six epochs: from PyTorch's (narrow) initialisation this tiny model sits on a plateau for
    // about three.
    for _ in 0..6 {
        let end = trainer.train_epoch(&loader, &progress, |_, _| Ok(Flow::Continue)).unwrap();
        let EpochEnd::Complete(Some(stats)) = end else { panic!("the epoch stopped early: {end:?}") };
        losses.push(stats.loss);
    }
    assert!(losses.iter().all(|l| l.is_finite()) && losses[5] < losses[0] * 0.9, "{losses:?}");
    assert_eq!(trainer.step, 48);
    let scaler = trainer.loss_scale.clone().expect("float16 keeps a loss scale");
    assert!(trainer.adam.step_count() + scaler.good_steps <= 48 + 2000);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f16.safetensors");
    let lineage =
        checkpoint::Lineage { run_id: "f16".into(), history: Vec::new(), init_from: None, data: None };
    let meta = checkpoint::Metadata::of(&trainer, &lineage);
    let bytes = checkpoint::trainer_bytes(&trainer, &meta).unwrap();
    vae::fsio::write_atomic(&path, &bytes).unwrap();
    let ckpt = Checkpoint::load(&path).unwrap();
    assert_eq!(ckpt.meta.loss_scale, Some(scaler.clone()));
    let resumed = ckpt.trainer(ckpt.meta.config.clone(), Device::Cpu).unwrap();
    assert_eq!((resumed.step, resumed.loss_scale), (48, Some(scaler)));
}

#[test]
fn the_quick_benchmark_runs_both_implementations() {
    let traces = tempfile::tempdir().unwrap();
    let text = stdout(&python_script(
        "bench.py",
        &["--quick", "--threads", "1", "--trace", traces.path().to_str().unwrap(), "--nproc", "2"],
    ));
    for case in [
        "cpu f32 batch 32",
        "cpu f32 batch 128",
        "cpu bf16 batch 128",
        "where a step's time goes",
        "image-folder loader",
        "second run, from cache",
        "full epoch",
    ] {
        assert!(text.contains(case), "no {case:?} in:\n{text}");
    }
    // Every row carries a figure for both sides and their ratio.
    let rows: Vec<&str> =
        text.lines().skip_while(|l| !l.contains("vae img/s")).skip(1).take_while(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 3, "{text}");
    for row in rows {
        let ratio = row.split_whitespace().nth(6).unwrap();
        let ratio: f64 = ratio.trim_end_matches('x').parse().unwrap_or_else(|_| panic!("{row}"));
        assert!(ratio > 0.0, "{row}");
    }
    // --nproc: our ranks, one process, and PyTorch's DDP, each with a figure.
    for run in ["2 ranks x 1 thread", "1 process x 2 threads", "pytorch DDP, 2 ranks x 1 thread"] {
        let row = text.lines().find(|l| l.trim_start().starts_with(run)).unwrap_or_else(|| panic!("{text}"));
        let figure: f64 = row[run.len() + 2..].split_whitespace().next().unwrap().parse().unwrap();
        assert!(figure > 0.0, "{row}");
    }
    // --trace: each case's two profiler traces, side by side; the convolutions' self time is
    // measured on both sides (two figures in ms on the row).
    for case in ["cpu f32 batch 32", "cpu f32 batch 128", "cpu bf16 batch 128"] {
        let table = text.split(&format!("{case}: where the time of 5 traced steps goes")).nth(1);
        let table = table.unwrap_or_else(|| panic!("no traces of {case} in:\n{text}"));
        let row = table.lines().find(|l| l.ends_with("   convolution")).unwrap_or_else(|| panic!("{table}"));
        let figures: Vec<f64> = row.split(" ms").filter_map(|f| f.trim().parse().ok()).collect();
        assert!(figures.len() == 2 && figures.iter().all(|&ms| ms > 0.0), "{row}");
        for side in ["vae", "pytorch"] {
            let file = traces.path().join(format!("{}-{side}.json", case.replace(' ', "-")));
            assert!(file.is_file(), "no {}", file.display());
        }
    }
}

/// `scripts/bench --tiles` decodes whole and in tiles beside diffusers' `enable_tiling()`: here
/// on a small VAE, 64 x 64 images in tiles of 32.
#[test]
fn the_tiles_benchmark_decodes_beside_diffusers() {
    let text =
        stdout(&python_script("bench.py", &["--tiles", "--quick", "--threads", "1", "--tile-sides", "64"]));
    for case in ["64x64 whole", "64x64 tiles of 32"] {
        let row =
            text.lines().find(|l| l.starts_with(case)).unwrap_or_else(|| panic!("no {case:?} in:\n{text}"));
        // Seconds and MiB of both sides.
        let figures: Vec<f64> = row[case.len()..]
            .split_whitespace()
            .filter_map(|f| f.trim_end_matches('s').parse().ok())
            .filter(|&f| f > 0.0)
            .collect();
        assert_eq!(figures.len(), 4, "{row}");
    }
}

/// scripts/gpu-check's resnet groups run this section on the GPU: here its CPU case, with every
/// option they use (the loss terms, checkpointing, traces), at 32 x 32.
#[test]
fn the_resnet_benchmark_runs_ours_beside_diffusers_with_every_option() {
    let traces = tempfile::tempdir().unwrap();
    let trace = traces.path().to_str().unwrap();
    let text = stdout(&python_script(
        "bench.py",
        &[
            "--arch",
            "resnet",
            "--quick",
            "--threads",
            "1",
            "--sizes",
            "32",
            "--precisions",
            "bf16",
            "--gradient-checkpointing",
            "--perceptual-weight",
            "1",
            "--disc-weight",
            "0.5",
            "--trace",
            trace,
        ],
    ));
    assert!(text.contains("LPIPS weight 1.0, PatchGAN weight 0.5, gradient checkpointing"), "{text}");
    let row = text.lines().find(|l| l.starts_with("cpu bf16 32x32 b16")).unwrap_or_else(|| panic!("{text}"));
    let ratio: f64 = row.split_whitespace().nth(5).unwrap().trim_end_matches('x').parse().unwrap();
    assert!(ratio > 0.0, "{row}");
    assert!(text.contains("cpu bf16 32x32 b16: where the time of 2 traced steps goes"), "{text}");
}

#[test]
fn a_trace_is_refused_where_it_would_replace_a_file_or_has_no_folder() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("last.safetensors");
    std::fs::write(&existing, b"a checkpoint").unwrap();
    let bench = |trace: &Path, extra: &[&str]| {
        let trace = trace.to_str().unwrap();
        vae(&[&["bench", "--dataset", "shapes", "--steps", "2", "--warmup", "1", "--trace", trace], extra]
            .concat())
    };
    for (trace, extra, expected) in [
        (existing.clone(), &[][..], "the file exists"),
        (dir.path().join("no/such/trace.json"), &[], "no folder"),
        (dir.path().join("t.json"), &["--full-epoch"], "does not go with --full-epoch"),
        (dir.path().join("t.json"), &["--trace-steps", "0"], "--trace-steps must be at least 1"),
    ] {
        let out = bench(&trace, extra);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("--trace") && err.contains(expected), "{err}");
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"a checkpoint");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a refused run left a file");
}

/// scripts/trace_summary.py on CUDA traces (Kineto's format, as a GPU run writes them; no GPU
/// here): kernels by device time and category, how busy the device was, launches per step.
#[test]
fn the_trace_summary_tabulates_kernels_of_cuda_traces() {
    let dir = tempfile::tempdir().unwrap();
    let event = |cat: &str, name: &str, ts: f64, dur: f64| serde_json::json!({"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": 7, "ts": ts, "dur": dur});
    let conv = "sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nchw_tilesize128x128x32";
    let norm =
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*)";
    let add =
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>(int, float*)";
    let mut paths = Vec::new();
    for (side, conv_us) in [("ours", 3000.0), ("theirs", 3600.0)] {
        // Two steps, each one convolution, one norm and one add, back to back from t = 0.
        let mut events = vec![event("user_annotation", "ProfilerStep", 0.0, 10_000.0)];
        for step in 0..2 {
            let t = 5000.0 * step as f64;
            events.push(event("cpu_op", "aten::convolution", t, 50.0));
            if side == "theirs" {
                events.push(event("cpu_op", "aten::copy_", t + 60.0, 5.0));
            }
            for (cat, name) in [
                ("cuda_runtime", "cudaLaunchKernel"),
                ("cuda_runtime", "cudaLaunchKernel"),
                ("cuda_driver", "cuLaunchKernelEx"),
                ("cuda_runtime", "cudaMemcpyAsync"),
            ] {
                events.push(event(cat, name, t, 5.0));
            }
            events.push(event("kernel", conv, t + 100.0, conv_us));
            events.push(event("kernel", norm, t + 100.0 + conv_us, 200.0));
            events.push(event("kernel", add, t + 100.0 + conv_us + 100.0, 300.0));
            // overlaps the norm
        }
        let path = dir.path().join(format!("{side}.json"));
        std::fs::write(&path, serde_json::json!({"traceEvents": events}).to_string()).unwrap();
        paths.push(format!("{side}={}", path.display()));
    }
    let out = python_script("trace_summary.py", &["--steps", "2", &paths[0], &paths[1]]);
    let text = stdout(&out);
    let row = |title: &str| {
        let line = text
            .lines()
            .find(|l| l.ends_with(&format!("   {title}")))
            .unwrap_or_else(|| panic!("no {title}:\n{text}"));
        line.split_whitespace()
            .filter(|w| *w != "ms")
            .take(2)
            .map(|v| v.parse::<f64>().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(row("convolution"), [3.0, 3.6], "{text}");
    assert_eq!(row("normalisation"), [0.2, 0.2], "{text}");
    assert_eq!(row("elementwise and other"), [0.3, 0.3], "{text}");
    // Busy: the convolution, then the norm and the add that overlaps it, one span of 400 us.
    assert_eq!(row("device busy (kernels and copies)"), [3.4, 4.0], "{text}");
    assert_eq!(row("kernels launched"), [3.0, 3.0], "{text}");
    assert!(text.contains("RowwiseMomentsCUDAKernel<float>") && !text.contains("long, float"), "{text}");
    // Then the host's side: the operators that launched them.
    assert_eq!(row("aten::convolution"), [0.05, 0.05], "{text}");
    // And the operators one side calls more often than the other, per step.
    let counts =
        text.split("operators called most differently often:").nth(1).unwrap_or_else(|| panic!("{text}"));
    assert!(
        counts.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["0", "1", "aten::copy_"]),
        "{text}"
    );
    assert!(!counts.contains("aten::convolution"), "{text}");
}

/// The flag reaches the model the trainer builds (the runs with and without it are equal to the
/// bit, so only this shows it is in effect).
#[test]
fn gradient_checkpointing_reaches_the_trained_resnet() {
    for on in [false, true] {
        let model = ModelConfig::Resnet(ResnetConfig {
            block_channels: vec![8, 16],
            layers_per_block: 1,
            latent_channels: 2,
            norm_groups: 4,
            ..ResnetConfig::default()
        });
        let cfg = TrainConfig { model, gradient_checkpointing: on, ..TrainConfig::default() };
        let trainer = Trainer::new(cfg, Device::Cpu).unwrap();
        assert_eq!(trainer.model.compute().checkpoint, on);
    }
}
