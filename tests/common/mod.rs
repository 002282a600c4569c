//! Helpers shared by the integration tests that drive the `vae` binary.

use std::process::{Command, Output};

/// A model small enough to train in about a second on the CPU; each test adds its data.
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
