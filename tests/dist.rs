//! The c10d shim: a Gloo group of two ranks (two threads here) sums, broadcasts and meets at
//! a barrier; a rank with nobody to meet fails with the address named, within its timeout.

use std::time::Duration;
use tch::{Kind, Tensor};
use vae::dist::{Backend, DistEnv, ProcessGroup};

const TIMEOUT: Duration = Duration::from_secs(60);

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

/// What rank `rank` of two sees: its sum, the broadcast, then the barrier.
fn rank_work(group: ProcessGroup) -> (Vec<f32>, Vec<f32>) {
    let rank = group.rank as f64;
    let summed = Tensor::arange(4, (Kind::Float, tch::Device::Cpu)) * (rank + 1.0);
    // Two tensors and 30 MiB: two buckets, the second one tensor of 8M numbers.
    let big = Tensor::full([8 << 20], rank + 1.0, (Kind::Float, tch::Device::Cpu));
    group.all_reduce_sum(&[summed.shallow_clone(), big.shallow_clone()]).unwrap();
    assert_eq!(big.min().double_value(&[]), 3.0);
    assert_eq!(big.max().double_value(&[]), 3.0);
    let shared = Tensor::full([3], rank + 10.0, (Kind::Float, tch::Device::Cpu));
    group.broadcast(std::slice::from_ref(&shared), 0).unwrap();
    group.barrier().unwrap();
    (values(&summed), values(&shared))
}

/// A port nobody listens on now (the store binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A SLURM job id whose port (15000 plus its last four digits, as an srun task takes it
/// without MASTER_PORT) is free here; each call of this process tries the next port.
fn job_id_of_a_free_port() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % 10000;
    loop {
        let offset = (start + NEXT.fetch_add(1, Ordering::SeqCst)) % 10000;
        if std::net::TcpListener::bind(("127.0.0.1", 15000 + offset as u16)).is_ok() {
            return format!("99{offset:04}");
        }
    }
}

#[test]
fn two_ranks_sum_broadcast_and_meet() {
    if !Backend::Gloo.built() {
        let err = join(&at(1, 0), TIMEOUT).err().unwrap().to_string();
        assert!(err.contains("install Debian's libgloo-dev"), "{err}");
        return;
    }
    let port = free_port();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            std::thread::spawn(move || {
                let group = join(&at(port, rank), TIMEOUT).unwrap_or_else(|e| panic!("rank {rank}: {e:#}"));
                assert_eq!((group.rank, group.world, group.port), (rank, 2, port));
                rank_work(group)
            })
        })
        .collect();
    for handle in ranks {
        let (summed, shared) = handle.join().unwrap();
        // arange(4) * 1 + arange(4) * 2; rank 0's 10s everywhere.
        assert_eq!(summed, vec![0.0, 3.0, 6.0, 9.0]);
        assert_eq!(shared, vec![10.0; 3]);
    }

    // Rank 1 of 2 waits for a store that never starts, and gives up when its timeout ends.
    let port = free_port();
    let err = join(&at(port, 1), Duration::from_secs(2)).err().expect("no store").to_string();
    assert!(
        err.contains(&format!("rank 1 of 2 could not join the Gloo process group at 127.0.0.1:{port}")),
        "{err}"
    );

    // NCCL is for GPUs: asked for on the CPU, it is refused before anything connects.
    let err = ProcessGroup::connect(&at(port, 0), Backend::Nccl, tch::Device::Cpu, TIMEOUT).err().unwrap();
    assert!(err.to_string().contains("--dist-backend nccl needs a CUDA device, found Cpu"), "{err}");
}

/// Rank `rank` of two, meeting at 127.0.0.1:port.
fn at(port: u16, rank: usize) -> DistEnv {
    DistEnv {
        rank,
        world: 2,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        agent_store: false,
        restart: 0,
        srun: false,
    }
}

fn join(env: &DistEnv, timeout: Duration) -> anyhow::Result<ProcessGroup> {
    ProcessGroup::connect(env, Backend::Gloo, tch::Device::Cpu, timeout)
}

mod common;
#[path = "common/terminal.rs"]
mod terminal;

use common::{ok, stderr, stdout, vae, TINY_MODEL};
use std::io::{BufRead, BufReader, Lines};
use std::path::Path;
use std::process::ChildStdout;
use vae::checkpoint::Checkpoint;

/// 641 images: 20 batches of 32 and a last one of 1, of which rank 0 has no rows.
const DATA: &[&str] = &[
    "--train-size",
    "641",
    // Two evaluation batches of 500: one for each of two ranks.
    "--test-size",
    "1000",
    "--batch-size",
    "32",
    "--binarize",
    "dynamic",
    "--hflip",
    "--threads",
    "1",
    "--quiet",
    "--no-tensorboard",
];

fn train(out: &Path, epochs: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--epochs", epochs, "--out", out.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    args.extend_from_slice(extra);
    vae(&args)
}

/// The largest difference between two checkpoints' float tensors, relative to each tensor's
/// largest magnitude; also checks they hold the same tensors and position.
fn relative_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (Checkpoint::load(a).unwrap(), Checkpoint::load(b).unwrap());
    assert_eq!((a.meta.epoch, a.meta.step), (b.meta.epoch, b.meta.step));
    assert_eq!(a.tensors.len(), b.tensors.len());
    a.tensors
        .iter()
        .map(|(name, x)| {
            let y = &b.tensors[name];
            let (x, y) = (x.to_kind(Kind::Double), y.to_kind(Kind::Double));
            let scale = x.abs().max().double_value(&[]).max(1e-30);
            (x - y).abs().max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

/// `--grad-accum 3` runs each batch of 32 as micro-batches of 10, 11 and 11 (and the last
/// batch of 1 image as one): the same steps as whole batches, to float rounding.
#[test]
fn accumulated_micro_batches_train_as_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, micro) = (dir.path().join("whole"), dir.path().join("micro"));
    ok(train(&whole, "1", &[]));
    ok(train(&micro, "1", &["--grad-accum", "3"]));
    let worst = relative_difference(&whole.join("last.safetensors"), &micro.join("last.safetensors"));
    assert!(worst <= 1e-5, "micro-batches differ from the whole batch by {worst:e} (relative)");
    assert!(worst > 0.0, "summed in another order, the gradients round differently");
    let err = train(&dir.path().join("never"), "1", &["--grad-accum", "33"]);
    assert!(
        stderr(&err).contains("--grad-accum must be between 1 and --batch-size 32, found 33"),
        "{}",
        stderr(&err)
    );
}

/// The resnet family trains the same way: GroupNorm normalises each image alone, so 2 ranks
/// compute bit for bit what one process computes with the batch in the same two halves
/// (`--grad-accum 2`). Against the unsplit batch the difference is rounding, but attention
/// amplifies it: the gradient of `to_k.bias` is exactly zero in exact arithmetic (softmax
/// ignores a shift shared by all keys), so Adam turns its rounding noise into full-size steps.
/// The ranks checkpoint their gradients, which changes no number.
#[test]
fn two_ranks_train_the_resnet_family_as_one_process() {
    if !Backend::Gloo.built() {
        return; // the refusal is tested below
    }
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let resnet = |out: &Path, extra: &[&str]| {
        let model = ["--arch", "resnet", "--block-channels", "8,16", "--layers-per-block", "1"];
        let more = ["--latent-channels", "2", "--norm-groups", "4", "--ema-decay", "0.9", "--epochs", "1"];
        let mut args = vec!["train", "--out", out.to_str().unwrap(), "--device", "cpu"];
        args.extend_from_slice(&model);
        args.extend_from_slice(&more);
        args.extend_from_slice(DATA);
        args.extend_from_slice(extra);
        ok(vae(&args));
    };
    resnet(&one, &["--grad-accum", "2"]);
    resnet(&two, &["--nproc", "2", "--gradient-checkpointing"]);
    let worst = relative_difference(&one.join("last.safetensors"), &two.join("last.safetensors"));
    assert_eq!(worst, 0.0, "2 ranks differ from 1 process in two halves");
}

#[test]
fn two_ranks_train_as_one_process_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    if !Backend::Gloo.built() {
        let out = train(&two, "1", &["--nproc", "2"]);
        assert!(!out.status.success() && stderr(&out).contains("libgloo-dev"), "{}", stderr(&out));
        return;
    }
    // 21 steps of a global batch of 32 (16 images per rank, the 1-process run's draws) and
    // a last one of 1 image.
    ok(train(&one, "1", &[]));
    ok(train(&two, "1", &["--nproc", "2"]));
    let worst = relative_difference(&one.join("last.safetensors"), &two.join("last.safetensors"));
    assert!(worst <= 1e-5, "2 ranks differ from 1 process by {worst:e} (relative)");
    // Each rank evaluates its share of the test split; the exchanged sums give one process's
    // figures.
    let last_row =
        |run: &Path| vae::metrics::MetricsLog::new(&run.join("metrics.csv")).read().unwrap().remove(0);
    let (a, b) = (last_row(&one), last_row(&two));
    for column in ["test_loss", "test_kl", "test_psnr", "test_ssim", "active_dims"] {
        let get = |row: &[(String, f64)]| row.iter().find(|(c, _)| c == column).expect(column).1;
        let (a, b) = (get(&a), get(&b));
        assert!((a - b).abs() <= 1e-3 * a.abs(), "{column}: 1 process {a}, 2 ranks {b}");
    }
    // torchrun starts the same ranks, its elastic agent serving the store.
    let torchrun = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun");
    assert!(torchrun.exists(), "{} missing: run scripts/setup", torchrun.display());
    let launched = dir.path().join("torchrun");
    let mut args =
        vec!["--nproc-per-node", "2", "--no-python", env!("CARGO_BIN_EXE_vae"), "train", "--epochs", "1"];
    args.extend_from_slice(&["--out", launched.to_str().unwrap()]);
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    ok(std::process::Command::new(&torchrun).args(&args).output().unwrap());
    assert_eq!(relative_difference(&two.join("last.safetensors"), &launched.join("last.safetensors")), 0.0);

    // Two nodes of one rank each, started as on two machines (both on localhost here): by
    // --master-addr/--master-port with node ranks (static rendezvous), and by --rdzv-endpoint
    // (the c10d rendezvous, which numbers the nodes itself). Node 0's agent serves the store.
    let port = free_port().to_string();
    let endpoint = format!("127.0.0.1:{}", free_port());
    let ways: [(&str, Vec<&str>); 2] = [
        ("static", vec!["--master-addr", "127.0.0.1", "--master-port", &port]),
        ("c10d", vec!["--rdzv-backend", "c10d", "--rdzv-endpoint", &endpoint, "--rdzv-id", "vae-test"]),
    ];
    for (way, rendezvous) in ways {
        let out_dir = dir.path().join(format!("nodes-{way}"));
        let nodes: Vec<_> = ["0", "1"]
            .into_iter()
            .map(|node| {
                let mut args = vec!["--nnodes", "2", "--nproc-per-node", "1"];
                if way == "static" {
                    args.extend_from_slice(&["--node-rank", node]);
                }
                args.extend_from_slice(&rendezvous);
                args.extend_from_slice(&["--no-python", env!("CARGO_BIN_EXE_vae"), "train", "--epochs", "1"]);
                args.extend_from_slice(&["--out", out_dir.to_str().unwrap()]);
                args.extend_from_slice(TINY_MODEL);
                args.extend_from_slice(DATA);
                std::process::Command::new(&torchrun)
                    .args(&args)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for node in nodes {
            ok(node.wait_with_output().unwrap());
        }
        let worst = relative_difference(&two.join("last.safetensors"), &out_dir.join("last.safetensors"));
        assert_eq!(worst, 0.0, "2 nodes ({way} rendezvous) differ from 2 local ranks");
    }
    let written: Vec<String> = std::fs::read_dir(&two)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(written.contains(&"metrics.csv".to_string()), "{written:?}");

    // Rank 1 dies after step 35 (last saved at 30, in the second epoch): the launcher stops
    // rank 0 and fails; the same command again (--auto-resume, as a requeued job runs it)
    // continues on 2 ranks to the uninterrupted 2-rank run, bit for bit (after a stop, below).
    let straight = dir.path().join("straight");
    ok(train(&straight, "2", &["--nproc", "2"]));
    let killed = dir.path().join("killed");
    let mut args = vec!["train", "--epochs", "2", "--save-every-steps", "10", "--nproc", "2", "--out"];
    args.extend_from_slice(&[killed.to_str().unwrap(), "--auto-resume"]);
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(&args)
        .env("VAE_FAULT", "step:35")
        .env("VAE_FAULT_RANK", "1")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a run that lost a rank succeeded");
    assert!(stderr(&out).contains("rank 1 of 2 failed"), "{}", stderr(&out));
    assert_eq!(Checkpoint::load(&killed.join("last.safetensors")).unwrap().meta.step, 30);
    // Then SIGTERM reaches rank 1 alone as the evaluation at the end of epoch 2 begins: every
    // rank stops in it (they agree before each round of test batches), the evaluation owed.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(&args)
        .env("VAE_FAULT", "stop-in-eval:1")
        .env("VAE_FAULT_RANK", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let owed = Checkpoint::load(&killed.join("last.safetensors")).unwrap().meta;
    assert_eq!((owed.step, owed.pending_evaluation.is_some()), (42, true));
    ok(vae(&args));
    assert_eq!(
        relative_difference(&straight.join("last.safetensors"), &killed.join("last.safetensors")),
        0.0
    );

    // Stopped at --max-steps 30 (every rank at the same step, the test split evaluated across
    // them), then continued without a limit: the uninterrupted run again.
    let capped = dir.path().join("capped");
    ok(train(&capped, "2", &["--nproc", "2", "--max-steps", "30"]));
    assert_eq!(Checkpoint::load(&capped.join("last.safetensors")).unwrap().meta.step, 30);
    let resume = ["train", "--resume", capped.to_str().unwrap(), "--nproc", "2", "--max-steps", "0"];
    ok(vae(&[&resume[..], &["--threads", "1", "--quiet"]].concat()));
    assert_eq!(
        relative_difference(&straight.join("last.safetensors"), &capped.join("last.safetensors")),
        0.0
    );

    // A 2-rank checkpoint continues on one process, which says it is not bitwise.
    let single = dir.path().join("single");
    let resume =
        ["train", "--resume", two.to_str().unwrap(), "--epochs", "2", "--out", single.to_str().unwrap()];
    let out = ok(vae(&[&resume[..], &["--threads", "1"]].concat()));
    assert!(stderr(&out).contains("resuming a run of 2 rank(s) on 1"), "{}", stderr(&out));
    assert!(stdout(&out).contains("done: test loss"), "{}", stdout(&out));
    // Rounding differences grow with the steps, as they do between thread counts of one
    // process (measured: 1e-3 relative on the weights after 40 steps, either way).
    let worst = relative_difference(&straight.join("last.safetensors"), &single.join("last.safetensors"));
    assert!(worst <= 1e-2, "{worst:e}");
    assert_eq!(Checkpoint::load(&single.join("last.safetensors")).unwrap().meta.world_size, 1);
    assert_eq!(Checkpoint::load(&straight.join("last.safetensors")).unwrap().meta.world_size, 2);
}

/// Every rank judges the same (exchanged) test figures, so all stop together at --patience.
#[test]
fn patience_stops_every_rank_at_the_same_evaluation() {
    if !Backend::Gloo.built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // tests/cli.rs's case: SSIM rises, then dips within the first 16 steps.
    let mut args = vec!["train", "--epochs", "3", "--nproc", "2", "--out", run.to_str().unwrap()];
    args.extend_from_slice(&["--train-size", "256", "--test-size", "64", "--batch-size", "32"]);
    args.extend_from_slice(&["--beta", "30", "--lr", "3e-3", "--eval-every-steps", "2"]);
    args.extend_from_slice(&["--best-by", "ssim", "--patience", "1", "--threads", "1"]);
    args.extend_from_slice(TINY_MODEL);
    let out = ok(vae(&args));
    assert!(stdout(&out).contains("stopping early"), "{}", stdout(&out));
    let last = Checkpoint::load(&run.join("last.safetensors")).unwrap().meta;
    let best = Checkpoint::load(&run.join("best.safetensors")).unwrap().meta;
    assert!(last.step < 24 && best.step == last.step - 2, "stopped at {}, best {}", last.step, best.step);
}

/// A training run started by `command`, its outputs piped, once rank 0 has printed its first
/// epoch's line: the process, what it printed up to there, and the rest of its output to come.
fn in_its_second_epoch(
    command: &mut std::process::Command,
) -> (std::process::Child, Vec<String>, Lines<BufReader<ChildStdout>>) {
    use std::process::Stdio;
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let training = line.starts_with("epoch 1/");
        printed.push(line);
        if training {
            return (child, printed, lines);
        }
    }
    let _ = child.kill();
    panic!("no epoch ended ({:?}): {printed:?}", child.wait());
}

#[test]
fn a_stop_reaches_every_rank_and_a_taken_port_is_named() {
    if !Backend::Gloo.built() {
        return; // two_ranks_train_as_one_process_and_resume_exactly checks the message
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // More epochs than the test lets it train: SIGINT sent to the launcher alone (`kill -INT`,
    // not the terminal's Ctrl-C, which every rank gets) stops it.
    let mut args = vec!["train", "--epochs", "20", "--nproc", "2", "--out", run.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    // Not --quiet: rank 0 prints its epochs. Not --threads: the launcher shares out the cores.
    args.extend_from_slice(&DATA[..DATA.len() - 4]);
    // Started as a SLURM job script of 2 tasks would start it (no srun): it is no rank of
    // those, and starts its own.
    args.extend_from_slice(&["--dist-timeout", "60"]);
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vae"));
    command.args(&args).env_remove("OMP_NUM_THREADS");
    command.envs([("SLURM_NTASKS", "2"), ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")]);
    // The rest of its output stays open until it exits: a closed pipe would fail its prints.
    let (launcher, printed, _rest) = in_its_second_epoch(&mut command);
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = match cores / 2 {
        0 | 1 => "cpu (1 thread)".to_string(),
        n => format!("cpu ({n} threads)"),
    };
    assert!(printed.iter().any(|l| l.starts_with("training on") && l.contains(&threads)), "{printed:?}");
    let kill =
        std::process::Command::new("kill").args(["-INT", &launcher.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = launcher.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resume with: vae train --resume"));
    let stopped = Checkpoint::load(&run.join("last.safetensors")).unwrap();
    let more = (stopped.meta.epoch + 1).to_string();
    ok(vae(&["train", "--resume", run.to_str().unwrap(), "--epochs", &more, "--nproc", "2", "--quiet"]));

    // Rank 0 cannot serve the store on a port another program holds: it says which.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let never = dir.path().join("never");
    let mut args = vec!["train", "--epochs", "1", "--out", never.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(&args)
        .envs([
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", port.as_str()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("rank 0 of 2 could not join the Gloo process group at 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!err.contains("frame #0"), "c10's C++ stack is left out: {err}");
    assert!(!never.exists());
}

/// `--nproc`'s launcher killed outright (SIGKILL: the OOM killer, `kill -9`) leaves no rank
/// training on unseen: each is told to stop, and rank 0 writes its checkpoint.
#[test]
fn a_launcher_killed_outright_stops_its_ranks_with_a_checkpoint() {
    if !Backend::Gloo.built() {
        return;
    }
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args = vec!["train", "--epochs", "50", "--nproc", "2", "--out", run.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    // Not --quiet: rank 0 prints its epochs.
    args.extend_from_slice(&DATA[..DATA.len() - 2]);
    let (mut launcher, _, mut lines) =
        in_its_second_epoch(std::process::Command::new(env!("CARGO_BIN_EXE_vae")).args(&args));
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    // Rank 0 holds the launcher's outputs, which end when it does.
    assert!(lines.all(|l| l.is_ok()));
    let mut err = String::new();
    launcher.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(err.contains("interrupted: saved"), "{err}");
    let stopped = Checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert!(stopped.meta.epoch < 50, "it trained on to epoch {}", stopped.meta.epoch);
}

/// `--nproc` in a terminal whose ssh connection drops: the kernel sends SIGHUP to the
/// launcher alone (the session's leader), which passes the stop on; rank 0 writes its
/// checkpoint, its lines to the gone terminal dropped.
#[test]
fn a_launcher_whose_terminal_hangs_up_stops_its_ranks_with_a_checkpoint() {
    if !Backend::Gloo.built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vae"));
    command.args(["train", "--epochs", "50", "--nproc", "2", "--out", run.to_str().unwrap()]);
    // Not --quiet: rank 0 prints its epochs and progress.
    command.args(TINY_MODEL).args(&DATA[..DATA.len() - 2]);
    let (mut launcher, mut terminal) = terminal::Terminal::start(command);
    if let Err(seen) = terminal.wait_for("epoch 1/50  train") {
        panic!("no epoch ended ({:?}): {seen}", launcher.wait());
    }
    drop(terminal);
    let status = launcher.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    let stopped = Checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert!(stopped.meta.epoch < 50, "it trained on to epoch {}", stopped.meta.epoch);
}

/// Two ranks as srun starts the tasks of a step over two machines (a job of 4 tasks here, the
/// step of 2, a CPU each), training with `args`, each into its own `--out`, outputs piped: the
/// commands.
/// The job script exported no MASTER_ADDR or MASTER_PORT: the ranks find rank 0 on the
/// step's first node ("localhost" here), at the port of the job's id.
fn srun_tasks(outs: [&Path; 2], args: &[&str]) -> [std::process::Command; 2] {
    let job = job_id_of_a_free_port();
    [("0", outs[0], "localhost"), ("1", outs[1], "vm-b")].map(|(rank, out, node)| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vae"));
        command.args(["train", "--out", out.to_str().unwrap()]).args(args);
        command.envs([("SLURM_PROCID", rank), ("SLURM_LOCALID", "0"), ("SLURM_NTASKS", "4")]);
        command.envs([("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_STEP_NUM_NODES", "2")]);
        command.envs([("SLURM_STEP_NODELIST", "localhost,vm-b"), ("SLURMD_NODENAME", node)]);
        command.envs([("SLURM_JOB_ID", job.as_str()), ("SLURM_STEP_ID", "0")]);
        // srun --cpus-per-task 1, on a cluster that does not bind tasks to their CPUs.
        command.env("SLURM_CPUS_PER_TASK", "1").env_remove("OMP_NUM_THREADS");
        command.env_remove("MASTER_ADDR").env_remove("MASTER_PORT");
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        command
    })
}

/// Two ranks of srun's (see [`srun_tasks`]) training the tiny model for 2 epochs with
/// `--auto-resume`: their outputs.
fn two_ranks(outs: [&Path; 2]) -> [std::process::Output; 2] {
    let args = [&["--epochs", "2", "--auto-resume"][..], TINY_MODEL, DATA].concat();
    let ranks = srun_tasks(outs, &args).map(|mut command| command.spawn().unwrap());
    ranks.map(|rank| rank.wait_with_output().unwrap())
}

/// torchrun restarts a run's ranks after one fails (`--max-restarts`), with the same store:
/// the restarted ranks meet among themselves, not at the addresses the failed attempt left
/// there, and `--auto-resume` continues the run to its end. Rank 0 of the restart starts five
/// seconds after rank 1, as on a machine slower to get going: rank 1 then finds the old
/// attempt's rank 0 in the store first, which failed the restart before each attempt kept to
/// its own keys.
#[test]
fn a_run_torchrun_restarts_meets_afresh_and_continues() {
    if !Backend::Gloo.built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let late = dir.path().join("late-rank-0");
    let script =
        "#!/bin/sh\nif [ \"$TORCHELASTIC_RESTART_COUNT\" = 1 ] && [ \"$RANK\" = 0 ]; then sleep 5; fi\n\
                  exec \"$VAE\" \"$@\"\n";
    std::fs::write(&late, script).unwrap();
    std::fs::set_permissions(&late, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let run = dir.path().join("run");
    let mut args =
        vec!["--nproc-per-node", "2", "--max-restarts", "1", "--no-python", late.to_str().unwrap()];
    args.extend_from_slice(&["train", "--epochs", "2", "--auto-resume", "--save-every-steps", "1"]);
    args.extend_from_slice(&["--out", run.to_str().unwrap(), "--dist-timeout", "30"]);
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    let out = std::process::Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/torchrun"))
        .args(&args)
        .env("VAE", env!("CARGO_BIN_EXE_vae"))
        // Rank 1 of the first attempt dies after step 5 (rank 0 has saved it); the restart
        // continues from there, past the fault.
        .envs([("VAE_FAULT", "step:5"), ("VAE_FAULT_RANK", "1")])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("VAE_FAULT: aborting after step 5"), "{err}");
    let last = Checkpoint::load(&run.join("last.safetensors")).unwrap().meta;
    assert_eq!((last.epoch, last.world_size), (2, 2));
}

/// Stopped by SIGTERM (a preemption reaches every task), no rank exits before rank 0 has
/// written its checkpoint: srun --kill-on-bad-exit and torchrun kill the rest of a run once
/// one rank exits non-zero, as 130 is. Here rank 0 is killed the moment rank 1 has exited.
#[test]
fn a_stopped_run_has_its_checkpoint_before_any_rank_exits() {
    if !Backend::Gloo.built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // 6.5M parameters: 78 MB to write with Adam's moments, which takes a while.
    let model = ["--conv-channels", "8,16", "--hidden", "4096", "--latent-dim", "4", "--device", "cpu"];
    let args = [&["--epochs", "50", "--train-size", "256", "--batch-size", "32"][..], &model].concat();
    let [mut zero, mut one] = srun_tasks([&run, &run], &[&args[..], &["--threads", "1"]].concat());
    let one = one.spawn().unwrap();
    let (mut zero, _, _rest) = in_its_second_epoch(&mut zero);
    let epoch_one = Checkpoint::load(&run.join("last.safetensors")).unwrap().meta.step;
    for rank in [&zero, &one] {
        let kill = std::process::Command::new("kill").args(["-TERM", &rank.id().to_string()]).status();
        assert!(kill.unwrap().success());
    }
    let one = one.wait_with_output().unwrap();
    zero.kill().unwrap();
    zero.wait().unwrap();
    assert_eq!(one.status.code(), Some(130), "{}", stderr(&one));
    let stopped = Checkpoint::load(&run.join("last.safetensors")).unwrap().meta.step;
    assert!(stopped > epoch_one, "the checkpoint of the stop was not written: step {stopped}");
}

/// srun's tasks take the CPUs SLURM gave each (`--cpus-per-task`), where the cluster does not
/// bind them to those: they took every core of the machine each.
#[test]
fn srun_tasks_take_the_cpus_slurm_gave_them() {
    if !Backend::Gloo.built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let data = ["--epochs", "1", "--train-size", "64", "--test-size", "32", "--batch-size", "32"];
    let ranks = srun_tasks([&run, &run], &[&data[..], TINY_MODEL].concat()).map(|mut c| c.spawn().unwrap());
    let [zero, one] = ranks.map(|rank| rank.wait_with_output().unwrap());
    assert!(zero.status.success() && one.status.success(), "{}\n{}", stderr(&zero), stderr(&one));
    assert!(stdout(&zero).contains("on cpu (1 thread)"), "{}", stdout(&zero));
}

/// All that `rank` writes to stderr: read until a line holds `text` (or to the end), when
/// `then` runs, and on to the end.
fn stderr_around(rank: &mut std::process::Child, text: &str, then: impl FnOnce()) -> String {
    let mut lines = BufReader::new(rank.stderr.take().unwrap()).lines().map(Result::unwrap);
    let mut said = Vec::new();
    for line in lines.by_ref() {
        let found = line.contains(text);
        said.push(line);
        if found {
            break;
        }
    }
    then();
    said.extend(lines);
    said.join("\n")
}

/// Rank 0's work alone taking longer than --dist-timeout (decoding a large image folder;
/// writing an evaluation's checkpoints to a slow file system; here it is paused there until the
/// test has seen rank 1 wait that long) keeps the others waiting, saying so, where a
/// collective failed them at the timeout; rank 0 dying there ends their wait at once.
#[test]
fn ranks_wait_out_rank_0s_long_work_but_not_its_death() {
    if !Backend::Gloo.built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (fault, work, dies) in [
        ("pause-in-load:1", "load the data", false),
        ("pause-in-load:1", "load the data", true),
        ("pause-in-writes:1", "write the evaluation's checkpoints and pictures", false),
    ] {
        let run = dir.path().join(format!("{fault}-{dies}"));
        let args = [&["--epochs", "2", "--dist-timeout", "5"][..], TINY_MODEL, DATA].concat();
        let [mut zero, mut one] = srun_tasks([&run, &run], &args);
        zero.env("VAE_FAULT", fault).stdin(std::process::Stdio::piped());
        let mut zero = zero.spawn().unwrap();
        let mut one = one.spawn().unwrap();
        let said =
            stderr_around(&mut one, &format!("rank 1: waiting for rank 0 to {work} (5 s so far"), || {
                if dies {
                    zero.kill().unwrap();
                } else {
                    // Its work goes on.
                    drop(zero.stdin.take());
                }
            });
        let (zero, one) = (zero.wait_with_output().unwrap(), one.wait_with_output().unwrap());
        assert!(said.contains(&format!("waiting for rank 0 to {work}")), "{fault}: {said}");
        if dies {
            assert!(!one.status.success());
            assert!(said.contains("rank 1 of 2 lost the store while waiting for vae/data-loaded"), "{said}");
        } else {
            assert!(zero.status.success() && one.status.success(), "{fault}: {}\n{said}", stderr(&zero));
            assert_eq!(Checkpoint::load(&run.join("last.safetensors")).unwrap().meta.epoch, 2);
        }
    }
}

/// Ranks whose copies of an image folder differ (a copy on one machine that misses files) are
/// refused before training, each saying what it holds, rather than their steps per epoch
/// drifting apart.
#[test]
fn ranks_that_hold_other_data_are_refused() {
    if !Backend::Gloo.built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let [whole, partial] = ["whole", "partial"].map(|name| dir.path().join(name));
    for (folder, count) in [(&whole, 48u8), (&partial, 40)] {
        std::fs::create_dir(folder).unwrap();
        for i in 0..count {
            let image =
                image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([i * 5, x as u8 * 30, y as u8 * 30]));
            image.save(folder.join(format!("{i:03}.png"))).unwrap();
        }
    }
    let run = dir.path().join("run");
    let args =
        ["--epochs", "1", "--dataset", "folder", "--image-size", "8", "--batch-size", "8", "--no-cache"];
    let args = [&args[..], TINY_MODEL, &["--quiet", "--threads", "1"]].concat();
    let [mut zero, mut one] = srun_tasks([&run, &run], &args);
    // The same --data-dir on each machine, holding another copy.
    zero.args(["--data-dir", whole.to_str().unwrap()]);
    one.args(["--data-dir", partial.to_str().unwrap()]);
    let [zero, one] = both_refused([zero, one], &run);
    assert!(
        one.contains("rank 1 of 2 holds other data than rank 0: 39 train and 1 test images of 3x8x8"),
        "{one}"
    );
    assert!(zero.contains("1 of 2 ranks hold other data than rank 0"), "{zero}");
}

/// Runs srun's two tasks to their end; both must fail, writing no checkpoint into `run`:
/// their errors.
fn both_refused(ranks: [std::process::Command; 2], run: &Path) -> [String; 2] {
    let outs = ranks.map(|mut rank| rank.spawn().unwrap()).map(|r| r.wait_with_output().unwrap());
    assert!(outs.iter().all(|out| !out.status.success()));
    assert!(!run.join("last.safetensors").exists());
    outs.map(|out| stderr(&out))
}

/// Rank 0 writing the stop's checkpoint for longer than --dist-timeout (a large model to a
/// network file system; here it is held there until the test has seen rank 1 wait that long)
/// keeps the others from exiting until it is done, where a barrier failed them at the timeout
/// (and a launcher that stops a run on a rank's failure then cut the write short).
#[test]
fn ranks_wait_out_a_long_write_of_the_stop_on_rank_0() {
    if !Backend::Gloo.built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // Not --quiet: rank 0 prints its epochs.
    let args = [&["--epochs", "50", "--dist-timeout", "5"][..], TINY_MODEL, &DATA[..DATA.len() - 2]].concat();
    let [mut zero, mut one] = srun_tasks([&run, &run], &args);
    zero.env("VAE_FAULT", "pause-in-stop:1").stdin(std::process::Stdio::piped());
    let mut one = one.spawn().unwrap();
    let (mut zero, _, _rest) = in_its_second_epoch(&mut zero);
    for rank in [&zero, &one] {
        let kill = std::process::Command::new("kill").args(["-TERM", &rank.id().to_string()]).status();
        assert!(kill.unwrap().success());
    }
    let said =
        stderr_around(&mut one, "rank 1: waiting for rank 0 to write the checkpoint (5 s so far", || {
            drop(zero.stdin.take())
        });
    let (zero, one) = (zero.wait().unwrap(), one.wait().unwrap());
    assert!(said.contains("waiting for rank 0 to write the checkpoint"), "{said}");
    assert_eq!((zero.code(), one.code()), (Some(130), Some(130)), "{said}");
    assert!(Checkpoint::load(&run.join("last.safetensors")).unwrap().meta.epoch < 50);
}

/// A rank given other flags than rank 0 (a per-machine command typed differently) is refused
/// on every rank, naming the setting, rather than its Adam steps drifting from rank 0's.
#[test]
fn ranks_given_other_settings_are_refused() {
    if !Backend::Gloo.built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let args = [&["--epochs", "1", "--dist-timeout", "60"][..], TINY_MODEL, DATA].concat();
    let [mut zero, mut one] = srun_tasks([&run, &run], &args);
    zero.args(["--lr", "5e-4"]);
    one.args(["--lr", "1e-3"]);
    let [zero, one] = both_refused([zero, one], &run);
    assert!(
        one.contains("rank 1 of 2 runs other settings than rank 0: adam.lr 0.001 here, 0.0005 on rank 0"),
        "{one}"
    );
    assert!(zero.contains("1 of 2 ranks run other settings than rank 0"), "{zero}");
}

/// Every rank stops with a refusal of the run folder: ranks that see it differently under
/// --auto-resume (a folder that is not shared), and rank 0's refusal of a folder that holds
/// another run's files (the others do not wait for it until --dist-timeout). Nothing is
/// written.
#[test]
fn a_refused_run_folder_stops_every_rank() {
    if !Backend::Gloo.built() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let held = dir.path().join("held");
    ok(train(&held, "1", &[]));
    let before = std::fs::read(held.join("last.safetensors")).unwrap();
    let empty = dir.path().join("empty");
    for out in two_ranks([&held, &empty]) {
        assert!(!out.status.success());
        assert!(stderr(&out).contains("--auto-resume: 1 of 2 ranks find a checkpoint"), "{}", stderr(&out));
    }
    assert_eq!(std::fs::read(held.join("last.safetensors")).unwrap(), before);
    assert!(!empty.join("last.safetensors").exists());

    std::fs::remove_file(held.join("last.safetensors")).unwrap();
    let [zero, one] = two_ranks([&held, &held]);
    assert!(!zero.status.success() && !one.status.success());
    assert!(stderr(&zero).contains("holds files of a run"), "{}", stderr(&zero));
    assert!(stderr(&one).contains("rank 0 refused the run folder"), "{}", stderr(&one));
    assert!(!held.join("last.safetensors").exists());
}

/// A SLURM job's script (not one of srun's tasks) trains alone, saying how to get its tasks'
/// ranks; `--nproc` ranks' messages reach the terminal whole; `--nproc` that disagrees with
/// the launcher's ranks is refused before any work.
#[test]
fn a_slurm_job_script_trains_alone_and_a_second_launch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = |out: &Path, vars: &[(&str, &str)], extra: &[&str]| {
        let mut args = vec!["train", "--epochs", "1", "--out", out.to_str().unwrap(), "--dist-timeout", "20"];
        args.extend_from_slice(TINY_MODEL);
        args.extend_from_slice(DATA);
        args.extend_from_slice(extra);
        let command = std::process::Command::new(env!("CARGO_BIN_EXE_vae"))
            .args(&args)
            .envs(vars.iter().copied())
            .output();
        command.unwrap()
    };
    let alone = dir.path().join("alone");
    let script = [("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0"), ("MASTER_PORT", "1")];
    let out = ok(run(&alone, &script, &[]));
    assert!(stderr(&out)
        .contains("this SLURM job has 4 tasks (SLURM_NTASKS), but this process was not started by srun"));
    assert_eq!(Checkpoint::load(&alone.join("last.safetensors")).unwrap().meta.epoch, 1);
    // --nproc's ranks share the terminal: the others' lines come whole, marked with the rank.
    if Backend::Gloo.built() {
        let out = run(&alone, &[], &["--nproc", "2"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            lines.contains(
                &"[rank 1] Error: rank 0 refused the run folder (its error says why), so rank 1 stops too"
            ),
            "{err}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("Error: ") && l.ends_with("choose another --out")),
            "{err}"
        );
    }

    let never = dir.path().join("never");
    let torchrun = [("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")];
    let out = run(&never, &torchrun, &["--nproc", "3"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--nproc 3 in a run whose launcher (torchrun or srun) started 2 ranks"),
        "{}",
        stderr(&out)
    );
    assert!(!never.exists());
}
