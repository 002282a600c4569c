//! The divergence guard: non-finite steps are skipped, and a run that keeps producing them
//! stops with a message, leaving its last good checkpoint.

mod common;

use common::{ok, stderr, stdout, vae, TINY_MODEL};
use vae::checkpoint::Checkpoint;

#[test]
fn an_absurd_learning_rate_stops_the_run_and_keeps_a_finite_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args = vec!["train", "--quiet", "--epochs", "2", "--out", run.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&["--train-size", "320", "--test-size", "32", "--batch-size", "32"]);
    args.extend_from_slice(&["--lr", "1e6", "--max-bad-steps", "3", "--save-every-steps", "1"]);
    let out = vae(&args);
    assert!(!out.status.success(), "the run went on");
    let err = stderr(&out);
    assert!(err.contains("training diverged at step"), "{err}");
    assert!(err.contains("3 steps in a row gave a non-finite loss or gradient"), "{err}");
    assert!(err.contains("Lower --lr (now 1000000) or pass --clip-grad"), "{err}");

    let last = Checkpoint::load(&run.join("last.safetensors")).expect("the last good checkpoint loads");
    for (name, t) in &last.tensors {
        let t = t.to_kind(tch::Kind::Double);
        assert!(t.isfinite().all().int64_value(&[]) != 0, "{name} is not finite");
    }
    // The skipped steps still count as positions in the run; Adam counts only its updates.
    let adam_steps = last.tensors["optimizer.step"].int64_value(&[]) as u64;
    assert!(adam_steps < last.meta.step, "optimizer {adam_steps}, run {}", last.meta.step);

    // A sane run never trips the guard, even at its strictest.
    let sane = dir.path().join("sane");
    let mut args = vec!["train", "--epochs", "1", "--max-bad-steps", "1", "--out", sane.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&["--train-size", "320", "--test-size", "32"]);
    let out = ok(vae(&args));
    assert!(stdout(&out).contains("done: test loss"), "{}", stdout(&out));
    assert!(!stderr(&out).contains("skipped"), "{}", stderr(&out));

    let out = vae(&["train", "--max-bad-steps", "0", "--out", dir.path().join("x").to_str().unwrap()]);
    assert!(stderr(&out).contains("--max-bad-steps must be at least 1, found 0"), "{}", stderr(&out));
}

/// A test loss that is not finite stops the run, and `last.safetensors` stays the checkpoint
/// before the evaluation that measured it (the one saved as it began is taken back).
#[test]
fn a_test_loss_that_is_not_finite_leaves_the_checkpoint_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args = vec!["train", "--quiet", "--out", run.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&["--train-size", "64", "--test-size", "32", "--batch-size", "32"]);
    ok(vae(&[&args[..], &["--epochs", "1"]].concat()));
    let last = run.join("last.safetensors");
    let before = std::fs::read(&last).unwrap();
    // Epoch 2's first step makes the weights huge (finite), its second is skipped, and the
    // test loss overflows.
    let resume = ["train", "--resume", run.to_str().unwrap(), "--epochs", "2", "--lr", "1e30"];
    let out = vae(&resume);
    assert!(!out.status.success(), "the run went on");
    let err = stderr(&out);
    assert!(err.contains("epoch 2: the test loss is not finite"), "{err}");
    assert!(err.contains("last.safetensors keeps the last checkpoint with a finite one"), "{err}");
    assert_eq!(std::fs::read(&last).unwrap(), before, "last.safetensors is not the checkpoint before");
    assert!(!run.join("last-before-eval.safetensors").exists());
    // The same, killed in that evaluation: its resume makes it first, and puts the checkpoint
    // before it back.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(resume)
        .env("VAE_FAULT", "eval:1")
        .output()
        .unwrap();
    assert!(stderr(&out).contains("VAE_FAULT: aborting in evaluation 1"), "{}", stderr(&out));
    assert_ne!(std::fs::read(&last).unwrap(), before);
    let err = stderr(&vae(&resume[..5]));
    assert!(err.contains("last.safetensors keeps the last checkpoint with a finite one"), "{err}");
    assert_eq!(std::fs::read(&last).unwrap(), before, "last.safetensors is not the checkpoint before");
    // A run that diverges before any checkpoint leaves none.
    let fresh = dir.path().join("fresh");
    let out =
        vae(&[&args[..3], &[fresh.to_str().unwrap()], &args[4..], &["--epochs", "1", "--lr", "1e30"]]
            .concat());
    assert!(stderr(&out).contains("it had no checkpoint with a finite one"), "{}", stderr(&out));
    assert!(!fresh.join("last.safetensors").exists() && !fresh.join("last-before-eval.safetensors").exists());
}
