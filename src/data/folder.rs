//! A folder of images (anything the `image` crate decodes), read recursively in a stable
//! order, each resized (shorter side) and centre-cropped to a square. The test split is
//! chosen by a hash of each file's relative path, so adding files never reshuffles it.
//! Decoding runs on every core; the decoded set is cached, keyed by the folder's listing and
//! the transform, so the next run with the same files starts at once.

use super::image_file;
use super::{Dataset, Splits};
use crate::checkpoint::write_atomic;
use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// How the folder becomes a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderOptions {
    pub dir: PathBuf,
    pub image_size: i64,
    pub channels: i64,
    pub test_fraction: f64,
    /// Where decoded sets are cached; `None` decodes every time.
    pub cache_dir: Option<PathBuf>,
}

/// One file of the listing.
struct Entry {
    /// Relative to the folder, with '/' separators: the split's and the cache key's input.
    relative: String,
    path: PathBuf,
    len: u64,
    modified_ns: u128,
}

/// Files named in a warning about undecodable ones.
const NAMED_FAILURES: usize = 3;
const CACHE_MAGIC: &[u8; 8] = b"VAEFOLD1";

/// FNV-1a, then SplitMix's finaliser: a stable 64-bit hash (std's is randomised per process).
fn stable_hash(bytes: &[u8]) -> u64 {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    crate::rng::SplitMix64::new(h).next_u64()
}

/// Whether a file belongs to the test split: a pure function of its relative path.
pub fn is_test(relative: &str, fraction: f64) -> bool {
    (stable_hash(relative.as_bytes()) >> 11) as f64 / (1u64 << 53) as f64 <= fraction
}

/// Every file below `dir` (hidden ones skipped), sorted by relative path.
fn list(dir: &Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let reader = std::fs::read_dir(&folder).with_context(|| format!("listing {}", folder.display()))?;
        for item in reader {
            let item = item.with_context(|| format!("listing {}", folder.display()))?;
            let path = item.path();
            if item.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let meta = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                let relative = path.strip_prefix(dir).unwrap_or(&path);
                let relative =
                    relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>();
                let modified_ns = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                entries.push(Entry { relative: relative.join("/"), path, len: meta.len(), modified_ns });
            }
        }
    }
    entries.sort_by(|a, b| a.relative.cmp(&b.relative));
    Ok(entries)
}

/// The cache file for this listing and transform.
fn cache_key(entries: &[Entry], opts: &FolderOptions) -> String {
    let mut text = format!("{}x{} test {}\n", opts.channels, opts.image_size, opts.test_fraction);
    for e in entries {
        text.push_str(&format!("{}\t{}\t{}\n", e.relative, e.len, e.modified_ns));
    }
    format!("folder-{:016x}.bin", stable_hash(text.as_bytes()))
}

/// The decoded splits in the cache's layout: magic, four little-endian u32 (train count,
/// test count, channels, side), then the train images and the test images.
fn encode_cache(splits: &[Vec<u8>; 2], counts: [usize; 2], opts: &FolderOptions) -> Vec<u8> {
    let mut out = CACHE_MAGIC.to_vec();
    for v in [counts[0], counts[1], opts.channels as usize, opts.image_size as usize] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    out.extend_from_slice(&splits[0]);
    out.extend_from_slice(&splits[1]);
    out
}

/// Reads a cache file back; `None` when it is absent or not what this transform expects
/// (then the folder is decoded again).
fn decode_cache(path: &Path, opts: &FolderOptions) -> Option<Splits> {
    let bytes = std::fs::read(path).ok()?;
    let word = |i: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(8 + 4 * i..12 + 4 * i)?.try_into().ok()?) as usize)
    };
    let (train, test, channels, side) = (word(0)?, word(1)?, word(2)?, word(3)?);
    let image = channels * side * side;
    let fits = bytes.starts_with(CACHE_MAGIC)
        && channels as i64 == opts.channels
        && side as i64 == opts.image_size
        && bytes.len() == 24 + (train + test) * image;
    if !fits {
        return None;
    }
    let body = &bytes[24..];
    let (c, s) = (channels, side);
    Some(Splits {
        train: Dataset::from_u8(&body[..train * image], train, c, s, s, None),
        test: Dataset::from_u8(&body[train * image..], test, c, s, s, None),
    })
}

/// Bytes the kernel says can be allocated without swapping (`MemAvailable`).
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The decoded set lives in memory (and then on the device): refuse, before decoding for
/// hours, a folder whose decoded size would take more than half of what is available.
fn check_memory(files: usize, opts: &FolderOptions, available: Option<u64>) -> Result<()> {
    let needed = files as u64 * (opts.channels * opts.image_size * opts.image_size) as u64;
    if let Some(available) = available {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        ensure!(
            needed <= available / 2,
            "{} files of {}: decoded at {}x{s}x{s} they would take {:.1} GiB, more than half the {:.1} GiB \
             of memory available; use a smaller --image-size or a subset of the folder (streaming from \
             disk is not implemented)",
            files,
            opts.dir.display(),
            opts.channels,
            gib(needed),
            gib(available),
            s = opts.image_size
        );
    }
    Ok(())
}

pub fn load(opts: &FolderOptions) -> Result<Splits> {
    let dir = &opts.dir;
    ensure!(dir.is_dir(), "image folder {} does not exist (pass --data-dir FOLDER)", dir.display());
    ensure!(
        opts.test_fraction > 0.0 && opts.test_fraction < 1.0,
        "--test-fraction must be between 0 and 1, found {}",
        opts.test_fraction
    );
    let entries = list(dir)?;
    ensure!(!entries.is_empty(), "image folder {} holds no files", dir.display());
    let cache = opts.cache_dir.as_ref().map(|d| d.join(cache_key(&entries, opts)));
    if let Some(splits) = cache.as_deref().and_then(|c| decode_cache(c, opts)) {
        eprintln!(
            "{}: decoded images from the cache {}",
            dir.display(),
            cache.as_deref().unwrap_or(dir).display()
        );
        return Ok(splits);
    }

    check_memory(entries.len(), opts, available_memory())?;
    let progress = ProgressBar::new(entries.len() as u64);
    progress.set_style(
        ProgressStyle::with_template("decoding {pos}/{len} images [{bar:30}] {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let decoded: Vec<(usize, Result<image_file::Decoded>)> = entries
        .par_iter()
        .enumerate()
        .map(|(i, e)| {
            // A decoder bug must cost one file, not the run.
            let decode = || image_file::decode(&e.path, opts.channels, opts.image_size);
            let d = std::panic::catch_unwind(decode)
                .unwrap_or_else(|_| Err(anyhow::anyhow!("{}: the image decoder panicked", e.path.display())));
            progress.inc(1);
            (i, d)
        })
        .collect();
    progress.finish_and_clear();

    let mut splits: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let (mut counts, mut failed, mut upscaled) = ([0usize; 2], Vec::new(), 0usize);
    for (i, result) in decoded {
        match result {
            Ok(img) => {
                let side = is_test(&entries[i].relative, opts.test_fraction) as usize;
                splits[side].extend_from_slice(&img.pixels);
                counts[side] += 1;
                upscaled += img.upscaled as usize;
            }
            Err(_) => failed.push(entries[i].relative.as_str()),
        }
    }
    if counts[0] + counts[1] == 0 {
        bail!(
            "no file in {} decodes as an image ({} tried, e.g. {})",
            dir.display(),
            entries.len(),
            failed.iter().take(NAMED_FAILURES).cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if !failed.is_empty() {
        let named = failed.iter().take(NAMED_FAILURES).cloned().collect::<Vec<_>>().join(", ");
        let more = failed.len().saturating_sub(NAMED_FAILURES);
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        eprintln!(
            "warning: skipped {} files of {} that do not decode: {named}{more}",
            failed.len(),
            dir.display()
        );
    }
    if upscaled > 0 {
        eprintln!(
            "warning: {upscaled} images of {} are smaller than {} px and were enlarged",
            dir.display(),
            opts.image_size
        );
    }
    ensure!(
        counts[0] > 0 && counts[1] > 0,
        "{}: {} images make a train split of {} and a test split of {}; both need at least one \
         (change --test-fraction)",
        dir.display(),
        counts[0] + counts[1],
        counts[0],
        counts[1]
    );
    if let Some(cache) = &cache {
        let bytes = encode_cache(&splits, counts, opts);
        let written = std::fs::create_dir_all(cache.parent().unwrap_or(Path::new(".")))
            .map_err(anyhow::Error::from)
            .and_then(|_| write_atomic(cache, &bytes));
        if let Err(e) = written {
            eprintln!("warning: could not cache the decoded images in {}: {e:#}", cache.display());
        }
    }
    let (c, s) = (opts.channels as usize, opts.image_size as usize);
    Ok(Splits {
        train: Dataset::from_u8(&splits[0], counts[0], c, s, s, None),
        test: Dataset::from_u8(&splits[1], counts[1], c, s, s, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_too_big_for_memory_is_refused_by_size() {
        let opts = FolderOptions {
            dir: PathBuf::from("/data/faces"),
            image_size: 128,
            channels: 3,
            test_fraction: 0.05,
            cache_dir: None,
        };
        assert!(check_memory(1000, &opts, Some(1 << 30)).is_ok());
        let err = check_memory(200_000, &opts, Some(8 << 30)).unwrap_err().to_string();
        assert!(
            err.contains("200000 files of /data/faces: decoded at 3x128x128 they would take 9.2 GiB"),
            "{err}"
        );
        assert!(err.contains("more than half the 8.0 GiB"), "{err}");
    }

    #[test]
    fn the_split_depends_on_the_path_alone_and_has_the_asked_fraction() {
        let names: Vec<String> = (0..20_000).map(|i| format!("class{}/img{i}.jpg", i % 7)).collect();
        let test = names.iter().filter(|n| is_test(n, 0.05)).count() as f64 / names.len() as f64;
        assert!((test - 0.05).abs() < 0.006, "test fraction {test}");
        assert_eq!(is_test("a/b.png", 0.3), is_test("a/b.png", 0.3));
    }
}
