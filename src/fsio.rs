//! Files that are never seen half-written: every checkpoint, cache and metrics rewrite goes
//! through a temporary file beside its target, an fsync and a rename. The bottom layer: it
//! knows files, not what is in them, beyond the framing of safetensors' header, which every
//! layer reads.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` so that `path` is always either the old file or the whole new one:
/// temporary file in the same folder, fsync, rename over, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    through_temporary(path, |file| write_bytes(file, bytes), |file, tmp| publish(file, tmp, path))
}

/// As [`write_atomic`], the temporary file filled by `fill` (positioned writes included), for
/// a file too large to build in memory first.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    through_temporary(path, fill, |file, tmp| publish(file, tmp, path))
}

/// Writes `bytes` as the new file `path`, which must not exist, atomically as
/// [`write_atomic`]: published by a hard link, which fails rather than replace a file, so of
/// two exports racing for one name the second fails and the first's file stays whole. Where
/// the file system has no hard links, a check then a rename.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let exists = || anyhow::anyhow!("{} already exists; write to a new file", path.display());
    anyhow::ensure!(!path.exists(), exists());
    through_temporary(
        path,
        |file| write_bytes(file, bytes),
        |file, tmp| {
            file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
            match std::fs::hard_link(tmp, path) {
                Ok(()) => sync_folder(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists()),
                Err(_) if path.exists() => Err(exists()),
                Err(_) => publish(file, tmp, path),
            }
        },
    )
}

/// `bytes` into `file`, where the fault injection of the disk-full tests can cut them short.
fn write_bytes(file: &mut std::fs::File, bytes: &[u8]) -> Result<()> {
    crate::fault::in_write(file, bytes);
    Ok(file.write_all(bytes)?)
}

/// Fills a temporary file beside `path` with `fill` and hands it to `publish`; the temporary
/// never outlives the call.
fn through_temporary(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> Result<()>,
    publish: impl FnOnce(&std::fs::File, &Path) -> Result<()>,
) -> Result<()> {
    let tmp = temporary_path(path)?;
    let result = (|| -> Result<()> {
        let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fill(&mut file).with_context(|| format!("writing {}", tmp.display()))?;
        publish(&file, &tmp)
    })();
    // Gone already where `publish` renamed it.
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Refuses `dir` for the files a command writes unless it is a new or empty folder: nothing is
/// ever written among files already there.
pub fn check_new_folder(dir: &Path) -> Result<()> {
    anyhow::ensure!(!dir.exists() || dir.is_dir(), "{} is a file, not a folder", dir.display());
    if let Ok(mut entries) = std::fs::read_dir(dir) {
        anyhow::ensure!(
            entries.next().is_none(),
            "{} already holds files; choose a new or empty folder",
            dir.display()
        );
    }
    Ok(())
}

/// The JSON header of the safetensors file `file` (read from its start) and the header's
/// length: the tensors' bytes begin 8 + that many bytes in. Refused, rather than allocated,
/// where the length is past safetensors' own cap (100 MB) or the file's end.
pub fn safetensors_header(
    file: &mut std::fs::File,
) -> Result<(u64, serde_json::Map<String, serde_json::Value>)> {
    use std::io::Read;
    let size = file.metadata()?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).context("not a safetensors file (too short)")?;
    let len = u64::from_le_bytes(len);
    anyhow::ensure!(len <= 100 << 20 && 8 + len <= size, "not a safetensors file (header of {len} bytes)");
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)?;
    let header =
        serde_json::from_slice(&header).map_err(|e| anyhow::anyhow!("not a safetensors file ({e})"))?;
    Ok((len, header))
}

/// Makes `dst` a second name of the file `src` (a hard link: nothing copied), replacing any
/// `dst` atomically; where the file system has no hard links, a copy through
/// [`write_atomic`]. Safe because every file written here is replaced by a rename, never
/// changed in place: a later write of `src` leaves `dst` as it was.
pub fn duplicate(src: &Path, dst: &Path) -> Result<()> {
    let tmp = temporary_path(dst)?;
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(src, &tmp).is_err() {
        let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        return write_atomic(dst, &bytes);
    }
    let file = std::fs::File::open(&tmp).with_context(|| format!("opening {}", tmp.display()));
    let result = file.and_then(|file| publish(&file, &tmp, dst));
    // Gone after a rename, unless `dst` was already this file (rename then does nothing).
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Refuses to replace an existing file at `path` that `is_ours` (given it open) does not
/// recognise as `what` the command writes: a mistyped `--out` never costs a checkpoint, a
/// metrics file or a model.
pub fn check_replaceable(
    path: &Path,
    what: &str,
    is_ours: impl FnOnce(&mut std::fs::File) -> bool,
) -> Result<()> {
    let Ok(mut file) = std::fs::File::open(path) else { return Ok(()) };
    anyhow::ensure!(
        is_ours(&mut file),
        "{} exists and is not {what}, so it is left as it is: choose another --out",
        path.display()
    );
    Ok(())
}

/// Where a file is filled before it is renamed to `path`: hidden, beside it, named after the
/// process, so [`remove_dead_temporaries`] can tell a dead process's leftovers.
pub fn temporary_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    Ok(path.with_file_name(format!(".{}{TMP_MARK}{}", name.to_string_lossy(), std::process::id())))
}

const TMP_MARK: &str = ".tmp-";

/// Makes the fully written `file` at `tmp` the file at `path`, durably: fsync, rename over,
/// fsync the folder.
pub fn publish(file: &std::fs::File, tmp: &Path, path: &Path) -> Result<()> {
    file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    sync_folder(path)
}

/// Makes the entry of `path` in its folder durable (after a rename or link).
fn sync_folder(path: &Path) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing folder {}", dir.display()))
}

/// Whether process `pid` is alive (Linux: its /proc entry exists).
pub fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// `path` made absolute, its links resolved as far as it exists: to tell whether one folder
/// lies in another before either is made.
pub fn resolved(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let existing = absolute.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    let rest = absolute.strip_prefix(existing).unwrap_or(Path::new(""));
    Ok(existing.canonicalize().unwrap_or_else(|_| existing.to_path_buf()).join(rest))
}

/// Deletes the temporary files in `dir` of processes that no longer run (killed mid-write):
/// a cache's can be as large as a decoded dataset. Returns how many went.
pub fn remove_dead_temporaries(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let pid = name.strip_prefix('.').and_then(|n| n.rsplit_once(TMP_MARK)).map(|(_, pid)| pid);
        if pid.and_then(|p| p.parse().ok()).is_some_and(|p| !process_alive(p)) {
            std::fs::remove_file(&path).with_context(|| format!("removing stale {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_keeps_its_contents_when_the_original_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (last, best) = (dir.path().join("last.safetensors"), dir.path().join("best.safetensors"));
        write_atomic(&best, b"older best").unwrap();
        write_atomic(&last, b"epoch 1").unwrap();
        duplicate(&last, &best).unwrap();
        assert_eq!(std::fs::read(&best).unwrap(), b"epoch 1");
        write_atomic(&last, b"epoch 2").unwrap();
        assert_eq!(std::fs::read(&best).unwrap(), b"epoch 1");
        assert_eq!(std::fs::read(&last).unwrap(), b"epoch 2");
        // Again onto the same file: nothing changes, nothing is left behind.
        duplicate(&last, &dir.path().join("copy")).unwrap();
        duplicate(&last, &dir.path().join("copy")).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 3, "{left:?}");
    }

    /// An export never replaces a file, even one that appears after its check: a link that
    /// leads nowhere passes `exists()`, as a file another process made meanwhile would.
    #[test]
    fn a_new_file_is_never_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vae.safetensors");
        write_new(&path, b"first export").unwrap();
        let err = write_new(&path, b"second").unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        let raced = dir.path().join("raced.safetensors");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &raced).unwrap();
        let err = write_new(&raced, b"second").unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"first export");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "temporaries left: {left:?}");
    }

    #[test]
    fn a_failed_temporary_write_leaves_the_previous_file_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        write_atomic(&path, b"old checkpoint").unwrap();
        // Occupy the temporary file's name with a folder, so creating it fails.
        let tmp = dir.path().join(format!(".last.safetensors.tmp-{}", std::process::id()));
        std::fs::create_dir(&tmp).unwrap();
        let err = format!("{:#}", write_atomic(&path, b"new checkpoint").unwrap_err());
        assert!(err.contains("creating") && err.contains(".last.safetensors.tmp-"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old checkpoint");
        std::fs::remove_dir(&tmp).unwrap();
        write_atomic(&path, b"new checkpoint").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new checkpoint");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary files left behind");
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join(".folder-0123.bin.tmp-4000000000");
        let live = dir.path().join(format!(".folder-0123.bin.tmp-{}", std::process::id()));
        let other = dir.path().join("folder-0123.bin");
        for path in [&dead, &live, &other] {
            std::fs::write(path, b"x").unwrap();
        }
        assert_eq!(remove_dead_temporaries(dir.path()).unwrap(), 1);
        assert!(!dead.exists() && live.exists() && other.exists());
    }
}
