//! The run folder's layout and ownership: which file is which (`last`, `best`,
//! `epoch-NNNN`), resolving a folder to its checkpoint, and the lock that gives a folder to
//! one process at a time. Knows file names, not their contents.

use anyhow::{anyhow, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub const LAST: &str = "last.safetensors";
pub const BEST: &str = "best.safetensors";
/// The `last` that the save as a test evaluation began replaced, kept until the evaluation's
/// figures are known.
pub const BEFORE_EVAL: &str = "last-before-eval.safetensors";
pub const METRICS: &str = "metrics.csv";
pub const LOSS_PLOT: &str = "loss.png";
pub const RECONSTRUCTIONS: &str = "reconstructions.png";
pub const SAMPLES: &str = "samples.png";
/// Held (flock) by the process training in the folder; holds its pid for the message others get.
const LOCK: &str = ".lock";

/// `epoch-NNNN.safetensors`: the periodic checkpoint after `epoch` epochs.
pub fn periodic_name(epoch: u64) -> String {
    format!("epoch-{epoch:04}.safetensors")
}

/// A checkpoint file, or a run folder's `last.safetensors`.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let last = path.join(LAST);
        anyhow::ensure!(
            last.is_file(),
            "no checkpoint in {}: {} does not exist",
            path.display(),
            last.display()
        );
        Ok(last)
    } else {
        anyhow::ensure!(path.exists(), "checkpoint {} does not exist", path.display());
        Ok(path.to_path_buf())
    }
}

/// The names of the run files `dir` holds: checkpoints (any `.safetensors`), `metrics.csv`
/// and the pictures; not the TensorBoard files that a run killed before its first checkpoint
/// leaves. None where there is no folder (yet: making it says what is wrong).
pub fn run_files(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| {
            (n.ends_with(".safetensors") && !n.starts_with('.'))
                || [METRICS, LOSS_PLOT, RECONSTRUCTIONS, SAMPLES].contains(&n.as_str())
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Refuses `dir` while another process holds it, without taking it: for a check before
/// long work (its brief shared lock only ever makes a run starting at that instant refuse).
pub fn check_not_in_use(dir: &Path) -> Result<()> {
    let Ok(mut file) = File::open(dir.join(LOCK)) else { return Ok(()) };
    // Closing the file releases the lock.
    match flock(&file, libc::LOCK_SH, dir)? {
        Lock::HeldElsewhere => Err(in_use(dir, &mut file)),
        Lock::Taken | Lock::Unsupported(_) => Ok(()),
    }
}

/// What a non-blocking flock found.
enum Lock {
    Taken,
    HeldElsewhere,
    /// The file system has no locks: Lustre mounted without `flock`, NFS without its lock
    /// daemon, some FUSE file systems. Taken for a lock held elsewhere, no run could start.
    Unsupported(std::io::Error),
}

/// A non-blocking flock (`op`: shared or exclusive) of `file`, the lock of run folder `dir`.
fn flock(file: &File, op: i32, dir: &Path) -> Result<Lock> {
    // SAFETY: flock on a file descriptor the caller owns.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(Lock::Taken);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(Lock::HeldElsewhere),
        Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::ENOLCK) => Ok(Lock::Unsupported(err)),
        _ => Err(err).with_context(|| format!("locking {}", dir.join(LOCK).display())),
    }
}

/// The error for a run folder whose lock `file` another process holds, naming it.
fn in_use(dir: &Path, file: &mut File) -> anyhow::Error {
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    let holder = holder.trim();
    let who = if holder.is_empty() { "another process".into() } else { format!("process {holder}") };
    anyhow!(
        "run folder {} is in use by another vae run ({who}); wait for it to finish, or choose another --out",
        dir.display()
    )
}

/// The folder a checkpoint file lies in.
pub fn folder_of(checkpoint: &Path) -> PathBuf {
    checkpoint.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}

/// A run folder this process owns until it is dropped: created if needed, locked against
/// other `vae` processes, cleared of dead processes' temporary files, known to take files.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    /// The flock lives as long as this open file; the kernel drops it when the process dies,
    /// so a dead run's lock is taken over by the next.
    _lock: File,
}

impl RunDir {
    /// Opens (creating) `path` for a run.
    pub fn open(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("creating run folder {}", path.display()))?;
        Self::lock(path)
    }

    /// `<parent>/<name>-<n>` with the first n whose folder this process creates: two runs
    /// started together get different folders.
    pub fn open_new(parent: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        for n in 1.. {
            let path = parent.join(format!("{name}-{n}"));
            match std::fs::create_dir(&path) {
                Ok(()) => return Self::lock(&path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating run folder {}", path.display())),
            }
        }
        unreachable!("some n is free")
    }

    fn lock(path: &Path) -> Result<Self> {
        let lock_path = path.join(LOCK);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("run folder {} is not writable (creating {LOCK})", path.display()))?;
        match flock(&file, libc::LOCK_EX, path)? {
            Lock::Taken => {}
            Lock::HeldElsewhere => return Err(in_use(path, &mut file)),
            Lock::Unsupported(err) => note!(
                "warning: run folder {} cannot be locked ({err}: its file system has no flock), so nothing \
                 keeps a second run from writing into it at the same time",
                path.display()
            ),
        }
        let pid = std::process::id().to_string();
        (|| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(pid.as_bytes())
        })()
        .with_context(|| format!("writing {}", lock_path.display()))?;
        let removed = crate::fsio::remove_dead_temporaries(path)?;
        if removed > 0 {
            note!("removed {removed} temporary file(s) of an interrupted run from {}", path.display());
        }
        Ok(Self { path: path.to_path_buf(), _lock: file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file of the folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn last(&self) -> PathBuf {
        self.file(LAST)
    }

    /// Keeps the newest `keep` periodic checkpoints.
    pub fn prune_periodic(&self, keep: usize) -> Result<()> {
        let mut periodic: Vec<PathBuf> = std::fs::read_dir(&self.path)
            .with_context(|| format!("listing {}", self.path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.starts_with("epoch-") && name.ends_with(".safetensors")
            })
            .collect();
        periodic.sort();
        let excess = periodic.len().saturating_sub(keep);
        for old in &periodic[..excess] {
            std::fs::remove_file(old)
                .with_context(|| format!("removing old checkpoint {}", old.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_held_by_one_run_and_released_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunDir::open(dir.path()).unwrap();
        // flock is per open file description: a second open in this process conflicts too.
        let err = RunDir::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("in use by another vae run") && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        // The check before long work says the same, and takes nothing.
        let err = check_not_in_use(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another vae run"), "{err}");
        drop(first);
        check_not_in_use(dir.path()).unwrap();
        RunDir::open(dir.path()).unwrap();
        let absent = dir.path().join("absent");
        check_not_in_use(&absent).unwrap();
        assert_eq!(run_files(&absent).unwrap(), Vec::<String>::new());
        assert!(!absent.exists());
    }

    #[test]
    fn new_folders_are_numbered_and_periodic_checkpoints_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunDir::open_new(dir.path(), "shapes").unwrap();
        let b = RunDir::open_new(dir.path(), "shapes").unwrap();
        assert_eq!(a.path(), dir.path().join("shapes-1"));
        assert_eq!(b.path(), dir.path().join("shapes-2"));
        for e in 1..=4 {
            std::fs::write(a.file(&periodic_name(e)), b"").unwrap();
        }
        a.prune_periodic(2).unwrap();
        assert!(!a.file("epoch-0002.safetensors").exists() && a.file("epoch-0003.safetensors").exists());
        assert_eq!(
            resolve(a.path()).unwrap_err().to_string(),
            format!("no checkpoint in {}: {} does not exist", a.path().display(), a.last().display())
        );
    }
}
