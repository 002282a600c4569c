//! Helpers shared by the integration tests that drive the `vae` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A model small enough to train in about a second on the CPU; each test adds its data.
#[allow(dead_code)]
pub const TINY_MODEL: &[&str] =
    &["--conv-channels", "8,16", "--hidden", "32", "--latent-dim", "4", "--device", "cpu"];

/// The same for the resnet family (diffusers' AutoencoderKL layout, two blocks).
#[allow(dead_code)]
pub const TINY_RESNET: &[&str] = &[
    "--arch",
    "resnet",
    "--block-channels",
    "8,16",
    "--layers-per-block",
    "1",
    "--latent-channels",
    "2",
    "--norm-groups",
    "4",
    "--device",
    "cpu",
];

pub fn vae(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vae")).args(args).output().expect("vae runs")
}

#[allow(dead_code)]
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the command succeeded, showing its stderr otherwise.
pub fn ok(out: Output) -> Output {
    assert!(out.status.success(), "{}", stderr(&out));
    out
}

/// Runs `scripts/<script>` with `args` in `.venv`'s Python, asserting it succeeds; scripts
/// that run `vae` (the benchmarks) get the binary under test.
#[allow(dead_code)]
pub fn python_script(script: &str, args: &[&str]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} missing: run scripts/setup", python.display());
    let out = Command::new(python)
        .arg(root.join("scripts").join(script))
        .args(args)
        .env("VAE_BIN", env!("CARGO_BIN_EXE_vae"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{script} {args:?}: {}", stderr(&out));
    out
}

/// LPIPS weights with a random trunk (seeded) and the `lpips` package's heads, in `dir`.
#[allow(dead_code)]
pub fn random_lpips(dir: &Path) -> PathBuf {
    let path = dir.join("lpips.safetensors");
    python_script("lpips_weights.py", &[path.to_str().unwrap(), "--random-trunk"]);
    path
}

/// `vae train` of [`TINY_RESNET`] on 48 generated RGB shapes of side `side` (16 to test),
/// batches of 16, one thread, quietly, into `out`; `extra` flags last.
#[allow(dead_code)]
pub fn train_tiny_resnet(side: &str, out: &Path, epochs: &str, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--epochs", epochs, "--out", out.to_str().unwrap()];
    args.extend_from_slice(TINY_RESNET);
    args.extend_from_slice(&["--dataset", "shapes", "--channels", "3", "--image-size", side]);
    args.extend_from_slice(&["--train-size", "48", "--test-size", "16", "--batch-size", "16"]);
    args.extend_from_slice(&["--threads", "1", "--quiet", "--no-tensorboard"]);
    args.extend_from_slice(extra);
    vae(&args)
}
