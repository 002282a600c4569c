//! `vae train --nproc N`: starts N local ranks of the same command with torchrun's variables
//! (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and waits for them. When one
//! fails, the others are told to stop; a stop signal sent to the launcher (SIGINT, SIGTERM,
//! SIGUSR1, SIGHUP) is passed on to them, and its death stops them.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// How often the launcher looks for a signal to pass on while it waits.
const POLL: Duration = Duration::from_millis(200);

pub fn ranks(nproc: usize) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the ranks' rendezvous")?
        .port();
    let exe = std::env::current_exe().context("finding the vae binary to start the ranks")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // A stop signal is passed on to the ranks as SIGTERM: one sent to the launcher alone
    // (`kill -INT`, a hung-up terminal, which signals its session's leader only) would reach
    // none of them, and one they had already (the terminal's Ctrl-C) is the same stop to
    // them. Those ignored stay so, and the ranks inherit that.
    let terminated = Arc::new(AtomicBool::new(false));
    for signal in super::train::stop_signals() {
        signal_hook::flag::register(signal, Arc::clone(&terminated))?;
    }
    let (done_tx, done_rx) = mpsc::channel::<(usize, std::io::Result<ExitStatus>)>();
    let mut pids = Vec::new();
    let launcher = std::process::id();
    for rank in 0..nproc {
        let mut command = Command::new(&exe);
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            command.env("OMP_NUM_THREADS", threads_per_rank(nproc).to_string());
        }
        // SAFETY: prctl, getppid and raise are async-signal-safe, as between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // A launcher killed outright (SIGKILL, the OOM killer) leaves no rank training
                // on unseen: each is told to stop as by SIGTERM, with its checkpoint.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != launcher {
                    libc::raise(libc::SIGTERM);
                }
                Ok(())
            });
        }
        if rank > 0 {
            // Rank 0 keeps the terminal (its progress bar needs one); the others' lines come
            // through here, whole and marked, so no two ranks' messages run into each other.
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = command
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank} of {nproc}"))?;
        pids.push(child.id() as libc::pid_t);
        let forwarders = [
            child.stdout.take().map(|out| forward(out, rank, std::io::stdout)),
            child.stderr.take().map(|err| forward(err, rank, std::io::stderr)),
        ];
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            // Its last lines are out before the launcher hears that it ended.
            forwarders.into_iter().flatten().for_each(|f| drop(f.join()));
            done.send((rank, status))
        });
    }
    let signal_all = |signal| {
        for &pid in &pids {
            // SAFETY: kill only sends a signal to a child we started.
            unsafe { libc::kill(pid, signal) };
        }
    };
    let (mut finished, mut failed, mut forwarded) = (0, None, false);
    while finished < nproc {
        if terminated.load(Ordering::SeqCst) && !forwarded {
            signal_all(libc::SIGTERM);
            forwarded = true;
        }
        let Ok((rank, status)) = done_rx.recv_timeout(POLL) else { continue };
        finished += 1;
        let status = status.with_context(|| format!("waiting for rank {rank}"))?;
        if !status.success() && failed.is_none() {
            failed = Some((rank, status));
            // The others cannot go on without it: stop them rather than wait for a timeout.
            if status.code() != Some(super::train::INTERRUPTED) {
                signal_all(libc::SIGTERM);
            }
        }
    }
    match failed {
        None => Ok(()),
        Some((_, status)) if status.code() == Some(super::train::INTERRUPTED) => {
            std::process::exit(super::train::INTERRUPTED)
        }
        Some((rank, status)) => {
            bail!("rank {rank} of {nproc} failed ({status}); the other ranks were stopped")
        }
    }
}

/// Copies `from`, one of rank `rank`'s outputs, to the launcher's `to` a line at a time, each
/// marked `[rank N]` and written whole.
fn forward<W: Write + 'static>(
    from: impl Read + Send + 'static,
    rank: usize,
    to: fn() -> W,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut lines = BufReader::new(from);
        let mut line = format!("[rank {rank}] ").into_bytes();
        let mark = line.len();
        while lines.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            // The terminal gone, nobody reads it: the rank goes on without.
            let _ = to().write_all(&line);
            line.truncate(mark);
        }
    })
}

/// libtorch's CPU threads for each rank where neither `--threads` (which still wins) nor
/// OMP_NUM_THREADS says: the cores shared out, as torchrun sets OMP_NUM_THREADS too. By
/// default every rank would take every core; 2 ranks on 2 cores then trained 3-4x slower.
fn threads_per_rank(nproc: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / nproc).max(1)
}
