//! A run folder belongs to one run: concurrent runs, foreign checkpoints, corrupt and
//! non-finite checkpoints never cost it a result.

mod common;

use common::{ok, stderr, stdout, vae, TINY_MODEL};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use tch::{Device, Tensor};
use vae::checkpoint::{self, Checkpoint, Metadata};

const DATA: &[&str] = &["--train-size", "320", "--test-size", "32", "--batch-size", "32", "--threads", "1"];

fn train_args<'a>(out: &'a Path, epochs: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--epochs", epochs, "--out", out.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    args.extend_from_slice(extra);
    args
}

fn train(out: &Path, epochs: &str, extra: &[&str]) -> Output {
    vae(&train_args(out, epochs, extra))
}

/// Every file of a folder with its bytes, to show nothing changed (but `.lock`, which names
/// the last process that asked for the folder).
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.ends_with(".lock"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

/// On a file system without flock (Lustre mounted without `flock`, NFS without its lock
/// daemon: flock fails with ENOSYS, ENOLCK), a run trains and resumes with a warning that its
/// folder is not locked. Every run there was refused as "in use by another vae run".
#[test]
fn a_folder_on_a_file_system_without_locks_trains_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    // flock made to fail as such file systems make it, for the vae process alone.
    let source = dir.path().join("noflock.c");
    std::fs::write(&source, "#include <errno.h>\nint flock(int fd, int op) { errno = ENOSYS; return -1; }\n")
        .unwrap();
    let shim = dir.path().join("libnoflock.so");
    let built = Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&shim).arg(&source).status();
    assert!(built.expect("cc runs").success(), "building the flock shim");
    let run = dir.path().join("run");
    let without_locks = |args: &[&str]| {
        ok(Command::new(env!("CARGO_BIN_EXE_vae")).args(args).env("LD_PRELOAD", &shim).output().unwrap())
    };
    let warning = format!("warning: run folder {} cannot be locked (Function not implemented", run.display());
    let out = without_locks(&train_args(&run, "1", &["--quiet"]));
    assert!(stderr(&out).contains(&warning), "{}", stderr(&out));
    let out = without_locks(&["train", "--resume", run.to_str().unwrap(), "--epochs", "2", "--quiet"]);
    assert!(stderr(&out).contains(&warning), "{}", stderr(&out));
    assert_eq!(Checkpoint::load(&run.join("last.safetensors")).unwrap().meta.epoch, 2);
}

#[test]
fn a_second_run_in_a_busy_folder_is_refused_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // Far more epochs than the test lets it train: it is stopped below with SIGUSR1, what
    // SLURM's `--signal=USR1@SECONDS` sends before a job's time limit.
    let mut first = Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(train_args(&run, "100000", &[]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    // Its first epoch's line: it holds the folder and has saved a checkpoint there.
    lines.find(|l| l.as_ref().unwrap().starts_with("epoch 1/")).expect("the first run trains").unwrap();
    let second = train(&run, "1", &["--seed", "5"]);
    assert!(!second.status.success(), "two runs in one folder");
    let err = stderr(&second);
    assert!(err.contains("is in use by another vae run") && err.contains(&first.id().to_string()), "{err}");
    let resumed = vae(&["train", "--resume", run.to_str().unwrap(), "--epochs", "100001"]);
    assert!(stderr(&resumed).contains("in use by another vae run"), "{}", stderr(&resumed));
    let kill = Command::new("kill").args(["-USR1", &first.id().to_string()]).status().unwrap();
    assert!(kill.success());
    assert_eq!(first.wait().unwrap().code(), Some(130));
    let last = Checkpoint::load(&run.join("last.safetensors")).unwrap();
    let rows = vae::metrics::MetricsLog::new(&run.join("metrics.csv")).read().unwrap();
    let epochs: Vec<f64> = rows.iter().map(|r| r[0].1).collect();
    let expected: Vec<f64> = (1..=epochs.len()).map(|e| e as f64).collect();
    assert_eq!(epochs, expected, "the first run's epochs, and only those");
    assert!(last.meta.epoch as usize >= epochs.len());
    // Its lock went with it: the folder takes the run's continuation.
    ok(vae(&[
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--epochs",
        &(last.meta.epoch + 1).to_string(),
        "--quiet",
    ]));
}

#[test]
fn another_runs_checkpoint_is_refused_in_a_folder_and_the_folder_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    ok(train(&ours, "1", &["--quiet"]));
    ok(train(&theirs, "2", &["--quiet", "--seed", "3"]));
    let foreign = ours.join("theirs.safetensors");
    std::fs::copy(theirs.join("last.safetensors"), &foreign).unwrap();
    let before = snapshot(&ours);
    let out = vae(&["train", "--resume", foreign.to_str().unwrap(), "--epochs", "3", "--quiet"]);
    assert!(!out.status.success(), "a foreign checkpoint was continued in the folder");
    let err = stderr(&out);
    assert!(err.contains("belongs to another run") && err.contains("pass --out NEW_FOLDER"), "{err}");
    assert_eq!(snapshot(&ours), before, "the folder changed");

    // Continued elsewhere it is a new run, whose history names the one it came from.
    let moved = dir.path().join("moved");
    let out = vae(&[
        "train",
        "--resume",
        foreign.to_str().unwrap(),
        "--epochs",
        "3",
        "--out",
        moved.to_str().unwrap(),
    ]);
    ok(out);
    let (parent, child) =
        (Checkpoint::load(&foreign).unwrap(), Checkpoint::load(&moved.join("last.safetensors")).unwrap());
    assert_ne!(parent.meta.run_id, child.meta.run_id);
    assert_eq!(child.meta.history.last().unwrap().from_run.as_deref(), Some(parent.meta.run_id.as_str()));

    // A folder whose last.safetensors is gone still holds its run's other files: neither a new
    // run nor another run's continuation takes it (either would overwrite them).
    std::fs::remove_file(ours.join("last.safetensors")).unwrap();
    let before = snapshot(&ours);
    let resume =
        ["train", "--resume", theirs.to_str().unwrap(), "--out", ours.to_str().unwrap(), "--epochs", "3"];
    // Said before the data is loaded (which can take long): here it would fail to load.
    let no_data = ["--dataset", "fashion-mnist", "--data-dir", "/nonexistent"];
    for out in
        [train(&ours, "1", &["--seed", "4", "--auto-resume"]), train(&ours, "1", &no_data), vae(&resume)]
    {
        assert!(!out.status.success(), "a run took a folder of another run's files");
        let err = stderr(&out);
        assert!(
            err.contains("holds files of a run (best.safetensors, epoch-0001.safetensors, loss.png")
                && err.contains("but no last.safetensors"),
            "{err}"
        );
    }
    assert_eq!(snapshot(&ours), before, "the folder changed");
    // A file named as the folder, also before the data.
    let file = ours.join("metrics.csv");
    for out in [
        train(&file, "1", &no_data),
        vae(&[&resume[..3], &["--epochs", "3", "--out", file.to_str().unwrap()]].concat()),
    ] {
        assert!(!out.status.success());
        assert!(stderr(&out).contains("metrics.csv is a file, not a run folder"), "{}", stderr(&out));
    }
    // A folder under that file cannot be made.
    let out = train(&file.join("run"), "1", &no_data);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("metrics.csv is a file, not a folder"), "{}", stderr(&out));
    assert_eq!(snapshot(&ours), before, "the folder changed");
}

#[test]
fn corrupt_and_non_finite_checkpoints_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    ok(train(&run, "1", &["--quiet"]));
    let good = run.join("last.safetensors");
    let bytes = std::fs::read(&good).unwrap();

    // One flipped bit in the last tensor's bytes (the file ends with tensor data).
    let flipped_dir = dir.path().join("flipped");
    std::fs::create_dir(&flipped_dir).unwrap();
    let flipped = flipped_dir.join("last.safetensors");
    let mut corrupt = bytes.clone();
    *corrupt.last_mut().unwrap() ^= 0x10;
    std::fs::write(&flipped, &corrupt).unwrap();

    // Finite-checksummed weights that hold NaN: what a diverged run could have saved.
    let nan_dir = dir.path().join("nan");
    std::fs::create_dir(&nan_dir).unwrap();
    let nan = nan_dir.join("last.safetensors");
    let ckpt = Checkpoint::load(&good).unwrap();
    let trainer = ckpt.trainer(ckpt.meta.config.clone(), Device::Cpu).unwrap();
    let weight = &trainer.vs.variables()["decoder.fc.weight"];
    tch::no_grad(|| weight.get(0).get(0).copy_(&Tensor::from(f32::NAN)));
    let meta = Metadata::of(&trainer, &ckpt.meta.lineage());
    std::fs::write(&nan, checkpoint::trainer_bytes(&trainer, &meta).unwrap()).unwrap();

    for (path, message) in
        [(&flipped, "fails its checksum"), (&nan, "tensor decoder.fc.weight holds NaN or infinity")]
    {
        let p = path.to_str().unwrap();
        let commands: [&[&str]; 3] = [
            &["eval", p, "--iw-samples", "0"],
            &["sample", p, "--n", "4"],
            &["train", "--resume", p, "--epochs", "2"],
        ];
        for args in commands {
            let out = vae(args);
            assert!(!out.status.success(), "{args:?} succeeded");
            assert!(stderr(&out).contains(message) && stderr(&out).contains(p), "{args:?}: {}", stderr(&out));
        }
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "files appeared beside {p}"
        );
    }
    let info = vae(&["info", flipped.to_str().unwrap()]);
    assert!(stderr(&info).contains("fails its checksum"), "{}", stderr(&info));
}

#[test]
fn a_run_whose_epoch_trains_on_nothing_never_reports_success() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // Diverges at once, and the guard is told to let it go on.
    let out = train(&run, "2", &["--lr", "1e6", "--max-bad-steps", "1000"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(!stdout(&out).contains("done:"), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("not finite") || err.contains("no step with a finite loss"), "{err}");
}
