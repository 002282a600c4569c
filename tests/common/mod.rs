//! Helpers shared by the integration tests that drive the `vae` binary.

use std::process::{Command, Output};

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
