//! Checkpoints through the binary: exact resume, interrupts and kills, bad files, a full
//! disk, Python interop.

mod common;
#[path = "common/disk.rs"]
mod disk;
#[path = "common/terminal.rs"]
mod terminal;

use common::{ok, stderr, stdout, vae, TINY_MODEL, TINY_RESNET};
use disk::SmallDisk;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use tch::Tensor;
use terminal::Terminal;
use vae::checkpoint::Checkpoint;

const DATA: &[&str] = &[
    "--train-size",
    "640",
    "--test-size",
    "64",
    "--batch-size",
    "32",
    "--binarize",
    "dynamic",
    // Exactness holds for a fixed thread count: reductions split by thread.
    "--threads",
    "1",
    // A moving average of the weights, so its state is resumed (and tortured) too.
    "--ema-decay",
    "0.9",
];

fn train(out: &Path, epochs: &str, extra: &[&str]) -> Output {
    vae(&train_args(out, epochs, extra))
}

fn train_args<'a>(out: &'a Path, epochs: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--quiet", "--epochs", epochs, "--out", out.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    args.extend_from_slice(extra);
    args
}

/// Names of the temporary files of atomic writes left in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    let names =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
    names.filter(|n| n.contains(".tmp-")).collect()
}

/// Every tensor equal bit for bit, and the same position in the run.
fn assert_identical(a: &Path, b: &Path) {
    let (a, b) = (Checkpoint::load(a).unwrap(), Checkpoint::load(b).unwrap());
    assert_eq!((a.meta.epoch, a.meta.step), (b.meta.epoch, b.meta.step));
    let mut names: Vec<&String> = a.tensors.keys().collect();
    names.sort();
    assert_eq!(names.len(), b.tensors.len());
    for name in names {
        let (x, y): (&Tensor, &Tensor) = (&a.tensors[name], &b.tensors[name]);
        assert!(x.equal(y), "{name} differs");
    }
}

/// `--deterministic` puts libtorch in its deterministic mode (the run says so, read back from
/// libtorch). The CPU's kernels are deterministic already: a deterministic run, stopped and
/// resumed, equals the plain straight run bit for bit (libtorch then also fills new tensors
/// with NaN, so nothing may read memory it did not write), and turning the mode on at a resume
/// is no change of the run. On CUDA, scripts/gpu-check asserts the resume.
#[test]
fn deterministic_mode_is_on_when_asked_and_keeps_every_value() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    ok(train(&straight, "2", &[]));
    // Not quiet: the first line names the device and the mode.
    let mut args = train_args(&split, "1", &["--deterministic"]);
    args.retain(|a| *a != "--quiet");
    let first = stdout(&ok(vae(&args)));
    assert!(first.contains("on cpu (1 thread), deterministic algorithms;"), "{first}");
    let split_arg = split.to_str().unwrap();
    let resumed = ok(vae(&[
        "train",
        "--resume",
        split_arg,
        "--epochs",
        "2",
        "--threads",
        "1",
        "--quiet",
        "--deterministic",
    ]));
    assert!(!stderr(&resumed).contains("--deterministic"), "{}", stderr(&resumed));
    assert_identical(&straight.join("last.safetensors"), &split.join("last.safetensors"));
}

#[test]
fn resumed_and_interrupted_runs_equal_the_straight_run_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    ok(train(&straight, "3", &[]));
    let names: Vec<String> =
        Checkpoint::load(&straight.join("last.safetensors")).unwrap().tensors.into_keys().collect();
    assert!(
        names.iter().any(|n| n == "ema.encoder.fc.weight") && names.iter().any(|n| n == "ema.num_updates")
    );
    // eval takes the average unless told otherwise: two models, two numbers.
    let loss = |extra: &[&str]| {
        let out = ok(vae(
            &[&["eval", straight.to_str().unwrap(), "--iw-samples", "0", "--json"][..], extra].concat()
        ));
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["negative_elbo"].as_f64().unwrap()
    };
    assert_ne!(loss(&[]), loss(&["--no-ema"]));

    // Stop after one epoch, then continue to three.
    let split = dir.path().join("split");
    ok(train(&split, "1", &[]));
    ok(vae(&["train", "--resume", split.to_str().unwrap(), "--epochs", "3", "--threads", "1", "--quiet"]));
    assert_identical(&straight.join("last.safetensors"), &split.join("last.safetensors"));

    // Evaluated every 8 steps too, inside epochs and at their ends: the same training, and a
    // row at each evaluation.
    let evaluated = dir.path().join("evaluated");
    ok(train(&evaluated, "3", &["--eval-every-steps", "8"]));
    assert_identical(&straight.join("last.safetensors"), &evaluated.join("last.safetensors"));
    let metrics = std::fs::read_to_string(evaluated.join("metrics.csv")).unwrap();
    let rows: Vec<&str> = metrics.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(rows, ["0.4", "0.8", "1", "1.2", "1.6", "2", "2.4", "2.8", "3"], "{metrics}");

    // Stopped at --max-steps 25, in the second epoch of 20 steps, with a test evaluation and a
    // metrics row there; then continued without a limit: still the straight run.
    let capped = dir.path().join("capped");
    ok(train(&capped, "3", &["--max-steps", "25"]));
    let at_cap = Checkpoint::load(&capped.join("last.safetensors")).unwrap();
    assert_eq!((at_cap.meta.epoch, at_cap.meta.step), (1, 25));
    let metrics = std::fs::read_to_string(capped.join("metrics.csv")).unwrap();
    let rows: Vec<&str> = metrics.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(rows, ["1", "1.25"], "{metrics}");
    let out = ok(vae(&["train", "--resume", capped.to_str().unwrap()]));
    assert!(stdout(&out).contains("has taken its --max-steps 25"), "{}", stdout(&out));
    ok(vae(&[
        "train",
        "--resume",
        capped.to_str().unwrap(),
        "--max-steps",
        "0",
        "--threads",
        "1",
        "--quiet",
    ]));
    assert_identical(&straight.join("last.safetensors"), &capped.join("last.safetensors"));

    // Killed after the first epoch's last step, before its test evaluation, with a periodic
    // save due at that very step: the save waits for the evaluation (saved before it, the
    // step would resume past the epoch's end), so the resume trains the step again.
    let ended = dir.path().join("ended");
    let out = Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(train_args(&ended, "3", &["--save-every-steps", "10"]))
        .env("VAE_FAULT", "step:20")
        .output()
        .unwrap();
    assert!(stderr(&out).contains("VAE_FAULT: aborting after step 20"), "{}", stderr(&out));
    assert_eq!(Checkpoint::load(&ended.join("last.safetensors")).unwrap().meta.step, 10);
    ok(vae(&["train", "--resume", ended.to_str().unwrap(), "--threads", "1", "--quiet"]));
    assert_identical(&straight.join("last.safetensors"), &ended.join("last.safetensors"));

    // A checkpoint that earlier versions saved at the first epoch's last step, before its test
    // evaluation (epoch 0, step 20): the resume does the epoch's end, then trains on.
    let pending = dir.path().join("pending.safetensors");
    patched(&straight.join("epoch-0001.safetensors"), &pending, "\"epoch\":\"1\"", "\"epoch\":\"0\"");
    assert_eq!(Checkpoint::load(&pending).unwrap().meta.epoch, 0);
    let rescued = dir.path().join("rescued");
    let out = ok(vae(&[
        "train",
        "--resume",
        pending.to_str().unwrap(),
        "--out",
        rescued.to_str().unwrap(),
        "--threads",
        "1",
    ]));
    assert!(stderr(&out).contains("epoch 1 had taken all its steps"), "{}", stderr(&out));
    assert_identical(&straight.join("last.safetensors"), &rescued.join("last.safetensors"));
    let metrics = std::fs::read_to_string(rescued.join("metrics.csv")).unwrap();
    let rows: Vec<Vec<&str>> = metrics.lines().skip(1).map(|l| l.split(',').take(3).collect()).collect();
    assert_eq!(rows.iter().map(|r| r[0]).collect::<Vec<_>>(), ["1", "2", "3"], "{metrics}");
    assert_eq!(rows[0][2], "NaN", "the pending epoch's training figures were not kept: {metrics}");

    // SIGINT during the second epoch: the step finishes, last.safetensors is written, exit 130.
    // A stop signal that comes again, not from the terminal, changes nothing.
    let sig = dir.path().join("sig");
    let mut args = vec!["train", "--epochs", "3", "--out", sig.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The first epoch's summary line: the run is now in its second epoch.
    lines.find(|l| l.as_ref().unwrap().starts_with("epoch 1/3")).expect("first epoch ends").unwrap();
    // Then SIGTERM too, as a launcher passes on what its ranks had already: still one stop.
    for signal in ["-INT", "-TERM"] {
        assert!(Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap().success());
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("resume with: vae train --resume"), "{}", stderr(&out));
    let interrupted = Checkpoint::load(&sig.join("last.safetensors")).unwrap();
    assert!(interrupted.meta.step < 60, "did not stop early (step {})", interrupted.meta.step);
    ok(vae(&["train", "--resume", sig.to_str().unwrap(), "--threads", "1", "--quiet"]));
    assert_identical(&straight.join("last.safetensors"), &sig.join("last.safetensors"));

    // A finished run resumed without more epochs changes nothing.
    let before = std::fs::read(straight.join("last.safetensors")).unwrap();
    let out = ok(vae(&["train", "--resume", straight.to_str().unwrap()]));
    assert!(stdout(&out).contains("has completed its 3 epochs"));
    assert_eq!(std::fs::read(straight.join("last.safetensors")).unwrap(), before);
}

/// A byte-for-byte edit that keeps the header's length, so offsets stay valid.
fn patched(src: &Path, dst: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(src).unwrap();
    let at = bytes.windows(from.len()).position(|w| w == from.as_bytes()).expect("pattern in header");
    bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(dst, bytes).unwrap();
}

/// `vae train --resume` of `run` with a planned fault; it must die.
fn resume_until_fault(run: &Path, fault: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(["train", "--resume", run.to_str().unwrap(), "--epochs", "3", "--threads", "1", "--quiet"])
        .env("VAE_FAULT", fault)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{fault}: the run did not die");
    assert!(stderr(&out).contains("VAE_FAULT: aborting"), "{fault}: {}", stderr(&out));
}

/// `--auto-resume`: the one command a requeued job runs each time. Killed before its first
/// checkpoint it starts afresh, killed later it continues, and once done it says so and
/// leaves the folder as it is; it ends bit for bit where the uninterrupted run does. A flag
/// that conflicts with the checkpoint is refused as with --resume.
#[test]
fn a_requeued_command_starts_continues_and_finishes_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    ok(train(&straight, "2", &[]));
    let run = dir.path().join("run");
    let args = train_args(&run, "2", &["--auto-resume", "--save-every-steps", "10"]);
    let last = run.join("last.safetensors");
    for (fault, saved) in [("step:3", None), ("step:25", Some(20))] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_vae")).args(&args).env("VAE_FAULT", fault).output().unwrap();
        assert!(stderr(&out).contains("VAE_FAULT: aborting"), "{fault}: {}", stderr(&out));
        assert_eq!(last.exists().then(|| Checkpoint::load(&last).unwrap().meta.step), saved, "{fault}");
    }
    ok(vae(&args));
    assert_identical(&straight.join("last.safetensors"), &last);
    let done = std::fs::read(&last).unwrap();
    let out = ok(vae(&args));
    assert!(stdout(&out).contains("has completed its 2 epochs"), "{}", stdout(&out));
    let out = vae(&[&args[..], &["--seed", "9"]].concat());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--seed 9 conflicts with the checkpoint"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&last).unwrap(), done);
    let out = vae(&["train", "--auto-resume"]);
    assert!(!out.status.success() && stderr(&out).contains("--out"), "{}", stderr(&out));
}

/// An ssh connection drops under a run in its terminal: the terminal hangs up, SIGHUP reaches
/// the run (its session's leader, as a login shell's job or the command of `ssh host vae ...`),
/// and it stops after its step with a checkpoint, its lines and progress bar to the gone
/// terminal dropped where a failed write would have ended it. Under `nohup`, which ignores
/// SIGHUP, it trains on to its end.
#[test]
fn a_run_whose_terminal_hangs_up_stops_with_a_checkpoint_unless_under_nohup() {
    let dir = tempfile::tempdir().unwrap();
    let hang_up = |run: &Path, nohup: bool| {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(env!("CARGO_BIN_EXE_vae"));
        command.args(["train", "--epochs", "3", "--out", run.to_str().unwrap()]).args(TINY_MODEL).args(DATA);
        if nohup {
            // SAFETY: signal is async-signal-safe, as between fork and exec.
            unsafe {
                command.pre_exec(|| match libc::signal(libc::SIGHUP, libc::SIG_IGN) {
                    libc::SIG_ERR => Err(std::io::Error::last_os_error()),
                    _ => Ok(()),
                })
            };
        }
        let (mut child, mut terminal) = Terminal::start(command);
        if let Err(seen) = terminal.wait_for("epoch 1/3  train") {
            panic!("no epoch ended ({:?}): {seen}", child.wait());
        }
        drop(terminal);
        child.wait().unwrap()
    };
    let run = dir.path().join("run");
    let status = hang_up(&run, false);
    assert_eq!(status.code(), Some(130), "{status}");
    let stopped = Checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert!((20..60).contains(&stopped.meta.step), "stopped at step {}", stopped.meta.step);
    ok(vae(&["train", "--resume", run.to_str().unwrap(), "--quiet"]));
    assert_eq!(Checkpoint::load(&run.join("last.safetensors")).unwrap().meta.epoch, 3);

    let kept = dir.path().join("kept");
    let status = hang_up(&kept, true);
    assert!(status.success(), "{status}");
    assert_eq!(Checkpoint::load(&kept.join("last.safetensors")).unwrap().meta.epoch, 3);
}

/// `metrics.csv` without the columns of time, which differ between any two runs.
fn metrics_but_time(run: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let timeless = |l: &str| -> Vec<String> {
        let cells = l.split(',').zip(&header);
        cells.filter(|(_, h)| !["images_per_s", "seconds"].contains(h)).map(|(c, _)| c.to_string()).collect()
    };
    text.lines().map(timeless).collect()
}

/// A run killed in its test evaluations (a preemption's grace run out, an evaluation out of
/// memory) loses only them: saved as each began, the resume makes it first, trains nothing
/// again, and ends where the uninterrupted run does, its metrics rows included.
#[test]
fn a_run_killed_in_an_evaluation_makes_it_first_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    // 20 steps an epoch: evaluations at steps 20, 30, 40 and 60, the last.
    let extra = ["--eval-every-steps", "30", "--auto-resume"];
    let straight = dir.path().join("straight");
    ok(train(&straight, "3", &extra));
    let run = dir.path().join("run");
    let args = train_args(&run, "3", &extra);
    let last = run.join("last.safetensors");
    let attempt = |fault: &str| {
        let out =
            Command::new(env!("CARGO_BIN_EXE_vae")).args(&args).env("VAE_FAULT", fault).output().unwrap();
        assert!(stderr(&out).contains("VAE_FAULT: aborting in evaluation"), "{fault}: {}", stderr(&out));
        let meta = Checkpoint::load(&last).unwrap().meta;
        assert!(meta.pending_evaluation.is_some(), "{fault}: saved without its evaluation owed");
        meta.step
    };
    // Killed in the evaluation at step 30 (mid-epoch), then again in it: nothing trained or written.
    assert_eq!(attempt("eval:2"), 30);
    let owed = std::fs::read(&last).unwrap();
    assert_eq!(attempt("eval:1"), 30);
    assert_eq!(std::fs::read(&last).unwrap(), owed, "the owed evaluation's checkpoint was rewritten");
    // The checkpoint before it is kept until its figures are known (a diverged one goes back).
    let before = run.join("last-before-eval.safetensors");
    assert_eq!(Checkpoint::load(&before).unwrap().meta.step, 20);
    // SIGTERM in it (a preemption): the run stops at once, the evaluation still owed.
    let out = Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(&args)
        .env("VAE_FAULT", "stop-in-eval:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("step 30 as its test evaluation began (owed)"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&last).unwrap(), owed, "the owed evaluation's checkpoint was rewritten");
    // It, then 40's (an epoch's end), then killed in the last one, after the last step.
    assert_eq!(attempt("eval:3"), 60);
    let info = stdout(&ok(vae(&["info", last.to_str().unwrap()])));
    assert!(info.contains("a resume makes that evaluation first"), "{info}");
    ok(vae(&args));
    assert_identical(&straight.join("last.safetensors"), &last);
    assert!(Checkpoint::load(&last).unwrap().meta.pending_evaluation.is_none());
    assert!(!before.exists(), "the checkpoint before the last evaluation was left");
    assert_eq!(metrics_but_time(&run), metrics_but_time(&straight));
    assert_eq!(metrics_but_time(&run).len(), 5, "a header and 4 evaluations");
    let out = ok(vae(&args));
    assert!(stdout(&out).contains("has completed its 3 epochs"), "{}", stdout(&out));
}

#[test]
fn runs_killed_at_any_point_resume_to_the_straight_result() {
    for model in [TINY_MODEL, TINY_RESNET] {
        killed_runs_resume_exactly(model);
    }
}

/// A run of `model` killed after a step and in the middle of writes, resumed each time,
/// ends bit for bit where the uninterrupted run does.
fn killed_runs_resume_exactly(model: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    fn run<'a>(out: &'a Path, model: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["train", "--quiet", "--epochs", "3", "--save-every-steps", "3", "--out"];
        args.push(out.to_str().unwrap());
        args.extend_from_slice(model);
        args.extend_from_slice(DATA);
        args
    }
    ok(vae(&run(&straight, model)));

    // Killed after step 7 (last saved at 6), then three times more: twice in the middle of a
    // write (a checkpoint's or metrics.csv's), once after a step.
    let killed = dir.path().join("killed");
    let out = Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(run(&killed, model))
        .env("VAE_FAULT", "step:7")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(Checkpoint::load(&killed.join("last.safetensors")).unwrap().meta.step, 6);
    for fault in ["write:2", "write:3", "step:25"] {
        resume_until_fault(&killed, fault);
        for entry in std::fs::read_dir(&killed).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                Checkpoint::load(&path).unwrap_or_else(|e| panic!("{fault}: {e:#}"));
            }
        }
    }
    ok(vae(&["train", "--resume", killed.to_str().unwrap(), "--epochs", "3", "--threads", "1", "--quiet"]));
    assert_identical(&straight.join("last.safetensors"), &killed.join("last.safetensors"));
    let stale = temporaries(&killed);
    assert!(stale.is_empty(), "temporary files left: {stale:?}");
}

#[test]
fn bad_checkpoints_are_refused_with_a_message_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(train(&run, "1", &[]));
    let good = run.join("last.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    let case = |name: &str, content: Option<&[u8]>| -> PathBuf {
        let folder = dir.path().join(name);
        std::fs::create_dir_all(&folder).unwrap();
        let path = folder.join("last.safetensors");
        if let Some(content) = content {
            std::fs::write(&path, content).unwrap();
        }
        path
    };
    let tensor_named = |name: &str| {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![2], &[1, 2]).unwrap();
        safetensors::serialize([(name, view)], None).unwrap()
    };
    let no_metadata = tensor_named("w");
    let state_dict = tensor_named("encoder.down_blocks.0.resnets.0.conv1.weight");
    let cases: Vec<(PathBuf, &str)> = vec![
        (case("missing", None), "does not exist"),
        (case("truncated", Some(&bytes[..bytes.len() / 2])), "not a valid safetensors file"),
        (case("text", Some(b"certainly not a checkpoint")), "not a valid safetensors file"),
        (case("foreign", Some(&no_metadata)), "not a vae checkpoint"),
        (
            case("state-dict", Some(&state_dict)),
            "a diffusers AutoencoderKL's weights without their config.json",
        ),
        (
            {
                let p = case("future", None);
                patched(&good, &p, "\"format_version\":\"1\"", "\"format_version\":\"9\"");
                p
            },
            "format version 9 is newer than this build reads (1)",
        ),
        (
            {
                let p = case("arch", None);
                patched(&good, &p, "\\\"latent_dim\\\":4", "\\\"latent_dim\\\":8");
                p
            },
            "tensor decoder.fc.weight has shape [32, 4] there but [32, 8] in the model",
        ),
    ];
    for (path, message) in &cases {
        let before = std::fs::read(path).ok();
        for args in [vec!["info", path.to_str().unwrap()], vec!["train", "--resume", path.to_str().unwrap()]]
        {
            let out = vae(&args);
            if args[0] == "info" && message.starts_with("tensor ") {
                continue; // info reads the file as it is; only building the model meets the mismatch
            }
            assert!(!out.status.success(), "{args:?} succeeded");
            assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
        }
        assert_eq!(std::fs::read(path).ok(), before, "{} was modified", path.display());
        let siblings = std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert!(siblings <= 1, "files appeared next to {}", path.display());
    }

    // Flags that would change the saved architecture conflict with --resume.
    let out = vae(&["train", "--resume", run.to_str().unwrap(), "--latent-dim", "8"]);
    assert!(stderr(&out).contains("--latent-dim 8 conflicts with the checkpoint"), "{}", stderr(&out));

    // A continuation whose folder cannot be made fails before its data, writing nothing.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"").unwrap();
    let elsewhere = blocker.join("run");
    let out = vae(&[
        "train",
        "--resume",
        good.to_str().unwrap(),
        "--epochs",
        "2",
        "--out",
        elsewhere.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("a-file is a file, not a folder"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&good).unwrap(), bytes);
}

#[test]
fn info_describes_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(train(&run, "1", &[]));
    let out = ok(vae(&["info", run.to_str().unwrap()]));
    let text = stdout(&out);
    for needle in [
        "dataset shapes, epoch 1/1, step 20",
        "trains on 640 train and 64 test images of 1x28x28 (CRC-32 of sampled images ",
        "parameters ",
        "\"latent_dim\": 4",
        "optimizer.step",
        "encoder.convs.0.weight",
    ] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
    // `vae info CKPT | head -1`: the reader gone before the rest is written ends it quietly.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(["info", run.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn pytorch_loads_the_checkpoint_and_computes_the_same_loss() {
    use tch::{Device, Kind};
    use vae::loss::{Elbo, KlWeight};
    use vae::models::Forward;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} missing: run scripts/setup", python.display());
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(train(&run, "1", &[]));
    let ckpt = Checkpoint::load(&run.join("last.safetensors")).unwrap();
    let trainer = ckpt.trainer(ckpt.meta.config.clone(), Device::Cpu).unwrap();
    tch::manual_seed(3);
    let x = Tensor::rand([16, 1, 28, 28], (Kind::Float, Device::Cpu)).round();
    let eps = Tensor::randn([16, 4], (Kind::Float, Device::Cpu));
    let ours = tch::no_grad(|| {
        let posterior = trainer.model.encode(&x);
        let z = posterior.sample_with_noise(&eps);
        let out = Forward { likelihood_params: trainer.model.decode(&z), posterior };
        Elbo::new(trainer.model.likelihood(), &out, &x, KlWeight { beta: trainer.cfg.beta, free_bits: 0.0 })
            .loss
            .double_value(&[])
    });
    let batch = dir.path().join("batch.safetensors");
    Tensor::write_safetensors(&[("x", &x), ("eps", &eps)], &batch).unwrap();
    let out = Command::new(&python)
        .arg(root.join("scripts/pytorch_model.py"))
        .arg(run.join("last.safetensors"))
        .args(["--batch", batch.to_str().unwrap()])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&ok(out).stdout).unwrap();
    let theirs = json["loss"].as_f64().unwrap();
    assert!((ours - theirs).abs() <= 1e-4 * ours.abs(), "ours {ours}, PyTorch {theirs}");
}

#[test]
fn a_full_disk_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // One checkpoint of this model is about 675 kB, and best and epoch-NNNN are hard links of
    // last: two fit (epoch 2's, saved as its evaluation began, and epoch 1's, as best and
    // epoch-0001); the third, epoch 2's after its evaluation, does not.
    let Some(disk) = SmallDisk::mount(&dir.path().join("disk"), "1700k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)");
        return;
    };
    let run = disk.0.join("run");
    let mut args =
        vec!["train", "--quiet", "--epochs", "3", "--no-tensorboard", "--out", run.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&["--train-size", "320", "--test-size", "32", "--batch-size", "32"]);
    let out = vae(&args);
    assert!(!out.status.success(), "the run went on without saving");
    let err = stderr(&out);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(".last.safetensors.tmp-"), "the failed file is named: {err}");
    let last = Checkpoint::load(&run.join("last.safetensors")).expect("the previous checkpoint is intact");
    assert_eq!((last.meta.epoch, last.meta.step), (2, 20));
    assert!(last.meta.pending_evaluation.is_some(), "saved as the evaluation began, which a resume makes");
    for earlier in ["best.safetensors", "epoch-0001.safetensors"] {
        assert_eq!(Checkpoint::load(&run.join(earlier)).unwrap().meta.step, 10, "{earlier}");
    }
    let leftovers = temporaries(&run);
    assert!(leftovers.is_empty(), "the failed temporary file is removed: {leftovers:?}");
}
