//! Training logs and knobs: metrics.csv, loss.png, TensorBoard event files read back by the
//! `tensorboard` package, and the schedule, free-bits and clipping flags.

mod common;

use common::{ok, stderr, stdout, vae, TINY_MODEL};
use std::path::Path;
use std::process::Command;

// 40 steps per epoch: the per-step log (every 25) fires once an epoch.
const DATA: &[&str] = &["--train-size", "640", "--test-size", "64", "--batch-size", "16"];

const KNOBS: &[&str] = &[
    "--kl-warmup-epochs",
    "1",
    "--free-bits",
    "0.1",
    "--clip-grad",
    "5",
    "--lr-schedule",
    "cosine",
    "--warmup-steps",
    "5",
    "--weight-decay",
    "0.0001",
];

fn train(run: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--epochs", "2", "--out", run.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    args.extend_from_slice(extra);
    vae(&args)
}

/// Scalar tags with their steps and image tags with (step, width, height), as TensorBoard's
/// own reader sees the run folder.
fn read_events(run: &Path) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} missing: run scripts/setup", python.display());
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
ea.Reload()
tags = ea.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in tags["scalars"]},
    "images": {t: [[e.step, e.width, e.height] for e in ea.Images(t)] for t in tags["images"]},
}))
"#;
    let out = Command::new(python).args(["-c", script, run.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_run_logs_metrics_a_plot_and_tensorboard_events() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(train(&run, KNOBS));

    let metrics = vae::metrics::MetricsLog::new(&run.join("metrics.csv")).read().unwrap();
    assert_eq!(metrics.len(), 2);
    let get = |row: usize, k: &str| metrics[row].iter().find(|(h, _)| h == k).unwrap().1;
    assert_eq!((get(0, "epoch"), get(0, "step"), get(1, "step")), (1.0, 40.0, 80.0));
    // Cosine: part way down after the first epoch, near 0 at the last step.
    assert!(get(0, "lr") < 1e-3 && get(0, "lr") > 2e-4, "{}", get(0, "lr"));
    assert!(get(1, "lr") < 1e-5, "{}", get(1, "lr"));
    assert!((0.0..=4.0).contains(&get(1, "active_dims")));
    assert_eq!(image::image_dimensions(run.join("loss.png")).unwrap(), (640, 400));

    let events = read_events(&run);
    let steps = |kind: &str, tag: &str| -> Vec<u64> {
        let entries = events[kind][tag].as_array().unwrap_or_else(|| panic!("no {tag} in {events}"));
        entries.iter().map(|e| e[0].as_u64().unwrap()).collect()
    };
    assert_eq!(steps("scalars", "train/loss"), vec![25, 65]);
    assert_eq!(steps("scalars", "test/loss"), vec![40, 80]);
    for tag in [
        "train/kl",
        "train/lr",
        "train/beta",
        "train/grad_norm",
        "test/kl",
        "test/active_dims",
        "epoch/train_loss",
    ] {
        assert_eq!(steps("scalars", tag).len(), 2, "{tag}");
    }
    let norms = &events["scalars"]["train/grad_norm"];
    assert!((0..2).all(|i| norms[i][1].as_f64().is_some_and(|n| n.is_finite() && n > 0.0)), "{norms}");
    // KL warm-up over the first epoch: beta below 1 at step 25, 1 in the second epoch.
    let beta = &events["scalars"]["train/beta"];
    assert!(beta[0][1].as_f64().unwrap() < 1.0 && beta[1][1].as_f64().unwrap() == 1.0, "{beta}");
    let test_loss = events["scalars"]["test/loss"][1][1].as_f64().unwrap();
    assert!((test_loss - get(1, "test_loss")).abs() < 1e-3 * test_loss, "events and metrics.csv disagree");
    // The epoch's PSNR and SSIM of the test split are what `vae eval` measures on its checkpoint.
    let eval = ok(vae(&["eval", run.to_str().unwrap(), "--iw-samples", "0", "--json", "--device", "cpu"]));
    let report: serde_json::Value = serde_json::from_str(stdout(&eval).trim()).unwrap();
    for (tag, column, key) in [("test/psnr", "test_psnr", "psnr_db"), ("test/ssim", "test_ssim", "ssim")] {
        let logged = events["scalars"][tag][1][1].as_f64().unwrap_or_else(|| panic!("no {tag} in {events}"));
        let measured = report["quality"][key].as_f64().unwrap();
        assert!(
            (logged - get(1, column)).abs() < 1e-4,
            "{tag}: events {logged}, metrics.csv {}",
            get(1, column)
        );
        assert!(
            (measured - get(1, column)).abs() < 1e-3,
            "{column}: eval {measured}, metrics.csv {}",
            get(1, column)
        );
    }
    for tag in ["reconstructions", "samples"] {
        let images = events["images"][tag].as_array().unwrap();
        assert_eq!(images.len(), 2, "{tag}");
        let (w, h) = image::image_dimensions(run.join(format!("{tag}.png"))).unwrap();
        assert_eq!((images[1][1].as_u64().unwrap(), images[1][2].as_u64().unwrap()), (w as u64, h as u64));
    }

    let quiet = dir.path().join("quiet");
    ok(train(&quiet, &["--no-tensorboard"]));
    let names: Vec<String> = std::fs::read_dir(&quiet)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with("events.out.tfevents")), "{names:?}");

    // The knobs are part of the run's config; a resume may change them, says so, and the
    // checkpoint keeps the change. The seed may not change.
    let out = vae(&["train", "--resume", run.to_str().unwrap(), "--epochs", "3", "--seed", "9"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--seed 9 conflicts with the checkpoint"), "{}", stderr(&out));
    let out = ok(vae(&["train", "--resume", run.to_str().unwrap(), "--epochs", "3", "--free-bits", "0.5"]));
    assert!(
        stderr(&out).contains("changed settings: --epochs 2 -> 3, --free-bits 0.1 -> 0.5"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("no longer bitwise"), "{}", stderr(&out));
    let info = stdout(&ok(vae(&["info", run.to_str().unwrap()])));
    assert!(info.contains("resumed at epoch 2, step 80: --epochs 2 -> 3, --free-bits 0.1 -> 0.5"), "{info}");
}

/// A run killed between checkpoints has logged steps its continuation takes again;
/// TensorBoard shows the continuation's alone (the resume's session start purges them).
#[test]
fn a_resumed_run_shows_one_curve_in_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args = vec!["train", "--epochs", "2", "--out", run.to_str().unwrap(), "--threads", "1"];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    // Killed after step 66: last saved at 40, the window of step 65 logged.
    let out =
        Command::new(env!("CARGO_BIN_EXE_vae")).args(&args).env("VAE_FAULT", "step:66").output().unwrap();
    assert!(stderr(&out).contains("VAE_FAULT: aborting"), "{}", stderr(&out));
    assert_eq!(read_events(&run)["scalars"]["train/loss"].as_array().unwrap().len(), 2);
    ok(vae(&["train", "--resume", run.to_str().unwrap(), "--threads", "1", "--quiet"]));
    let events = read_events(&run);
    for (tag, steps) in [("train/loss", [25, 65]), ("test/loss", [40, 80])] {
        let logged: Vec<u64> =
            events["scalars"][tag].as_array().unwrap().iter().map(|e| e[0].as_u64().unwrap()).collect();
        assert_eq!(logged, steps, "{tag}");
    }
}

#[test]
fn nonsensical_knobs_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value, message) in [
        ("--clip-grad", "0", "--clip-grad must be positive, found 0"),
        ("--free-bits", "-1", "--free-bits must be >= 0, found -1"),
        ("--kl-warmup-epochs", "-2", "--kl-warmup-epochs must be >= 0, found -2"),
        ("--weight-decay", "-0.1", "--weight-decay must be >= 0, found -0.1"),
    ] {
        let run = dir.path().join(flag.trim_start_matches('-'));
        let out = train(&run, &[flag, value]);
        assert!(!out.status.success(), "{flag} {value} accepted");
        assert!(stderr(&out).contains(message), "{flag}: {}", stderr(&out));
        assert!(!run.exists(), "{flag}: the run folder was created");
        assert!(stdout(&out).is_empty(), "{flag}: training started: {}", stdout(&out));
    }
}
