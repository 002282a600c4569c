//! Fault injection for the kill tests, so they can die at exact points instead of at random
//! times: `VAE_FAULT=step:N` aborts the process right after training step N,
//! `VAE_FAULT=write:N` in the middle of its Nth atomic file write (half the bytes written),
//! and `VAE_FAULT=eval:N` as its Nth test evaluation starts; `VAE_FAULT=stop-in-eval:N`
//! instead sends the process SIGTERM there, as a preemption would. `VAE_FAULT=pause-in-load:1`
//! holds the data's load until a line (or the end) comes on stdin: a decode that takes as
//! long as the test likes, the process's other threads (its store's server) going on;
//! `VAE_FAULT=pause-in-stop:1` holds a stopped run there, its checkpoint saved, and
//! `VAE_FAULT=pause-in-writes:1` a run that has written an evaluation's files, as a slow
//! write would.
//! Abort stands in for `kill -9`: no destructor, flush or handler runs. With
//! `VAE_FAULT_RANK=R`, only rank R of a data-parallel run (its `RANK`) dies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    AfterStep(u64),
    InWrite(u64),
    InEvaluation(u64),
    StopInEvaluation(u64),
    PauseInLoad,
    PauseInStop,
    PauseInWrites,
}

fn planned() -> Option<Fault> {
    static PLAN: OnceLock<Option<Fault>> = OnceLock::new();
    *PLAN.get_or_init(|| {
        let spec = std::env::var("VAE_FAULT").ok()?;
        if let Ok(rank) = std::env::var("VAE_FAULT_RANK") {
            if std::env::var("RANK").ok()? != rank {
                return None;
            }
        }
        let (kind, n) = spec.split_once(':')?;
        let n = n.parse().ok()?;
        match kind {
            "step" => Some(Fault::AfterStep(n)),
            "write" => Some(Fault::InWrite(n)),
            "eval" => Some(Fault::InEvaluation(n)),
            "stop-in-eval" => Some(Fault::StopInEvaluation(n)),
            "pause-in-load" => Some(Fault::PauseInLoad),
            "pause-in-stop" => Some(Fault::PauseInStop),
            "pause-in-writes" => Some(Fault::PauseInWrites),
            _ => None,
        }
    })
}

/// Called after every training step.
pub fn after_step(step: u64) {
    if planned() == Some(Fault::AfterStep(step)) {
        note!("VAE_FAULT: aborting after step {step}");
        std::process::abort();
    }
}

/// Called as each test evaluation of a training run starts.
pub fn in_evaluation() {
    static EVALUATIONS: AtomicU64 = AtomicU64::new(0);
    let n = EVALUATIONS.fetch_add(1, Ordering::SeqCst) + 1;
    if planned() == Some(Fault::InEvaluation(n)) {
        note!("VAE_FAULT: aborting in evaluation {n}");
        std::process::abort();
    }
    if planned() == Some(Fault::StopInEvaluation(n)) {
        note!("VAE_FAULT: SIGTERM in evaluation {n}");
        // SAFETY: raise only sends a signal to this process, whose handler sets a flag.
        unsafe { libc::raise(libc::SIGTERM) };
    }
}

/// Called as the data starts loading.
pub fn in_load() {
    pause_if(Fault::PauseInLoad, "the data's load");
}

/// Called as a stopped run has saved its checkpoint.
pub fn in_stop() {
    pause_if(Fault::PauseInStop, "the stop");
}

/// Called as an evaluation's files are written.
pub fn in_writes() {
    pause_if(Fault::PauseInWrites, "the evaluation's writes");
}

fn pause_if(fault: Fault, what: &str) {
    if planned() == Some(fault) {
        note!("VAE_FAULT: pausing in {what} until a line on stdin");
        let _ = std::io::stdin().read_line(&mut String::new());
    }
}

/// Called by each atomic write with the file it is filling; aborts half-way through the
/// planned one.
pub fn in_write(file: &mut std::fs::File, bytes: &[u8]) {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::SeqCst) + 1;
    if planned() == Some(Fault::InWrite(n)) {
        use std::io::Write;
        let _ = file.write_all(&bytes[..bytes.len() / 2]);
        let _ = file.sync_all();
        note!("VAE_FAULT: aborting in write {n}");
        std::process::abort();
    }
}
