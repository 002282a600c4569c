//! A folder of images (anything the `image` crate decodes), read recursively in a stable
//! order, each resized (shorter side) and centre-cropped to a square. The test split is
//! chosen by a hash of each file's relative path, so adding files never reshuffles it.
//! Decoding runs on every core; the decoded set is cached, keyed by the folder's listing and
//! the transform, so the next run with the same files starts at once. A set larger than the
//! memory budget is decoded a chunk at a time into that file and streamed from it.

use super::cache::{self, CacheFile, CacheWriter};
use super::image_file;
use super::{Dataset, Splits};
use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;
use tch::{Device, Kind, Tensor};

/// How the folder becomes a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderOptions {
    pub dir: PathBuf,
    pub image_size: i64,
    pub channels: i64,
    pub test_fraction: f64,
    /// Where decoded sets are cached; `None` decodes every time.
    pub cache_dir: Option<PathBuf>,
    /// Bytes the decoded set may take in memory (`None`: half of what is available); a
    /// larger set streams from the cache file.
    pub max_memory: Option<u64>,
    /// No notes on where the images came from (ranks after the first, `--quiet`).
    pub quiet: bool,
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

/// Whether a file belongs to the test split: a pure function of its relative path.
pub fn is_test(relative: &str, fraction: f64) -> bool {
    (crate::rng::stable_hash(relative.as_bytes()) >> 11) as f64 / (1u64 << 53) as f64 <= fraction
}

/// Whether listing the image folder `dir` would take in the files of the folder `path`: it
/// lies below `dir` (links resolved), and not in a hidden folder there.
pub fn lists(dir: &Path, path: &Path) -> Result<bool> {
    let (dir, path) = (crate::fsio::resolved(dir)?, crate::fsio::resolved(path)?);
    Ok(path
        .strip_prefix(&dir)
        .is_ok_and(|inside| !inside.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.'))))
}

/// Every file below `dir` (hidden ones skipped), sorted by relative path. Symbolic links are
/// followed, each folder listed once (the first way to it in name order): a link to a folder
/// above listed it again and again until the kernel's limit failed the run. A link that leads
/// nowhere is listed as a file, which then fails to decode and is skipped with a warning, as
/// any file that does not decode.
fn list(dir: &Path) -> Result<Vec<Entry>> {
    use std::os::unix::fs::MetadataExt;
    let mut entries = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    let root = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut listed = std::collections::HashSet::from([(root.dev(), root.ino())]);
    while let Some(folder) = pending.pop() {
        let reader = std::fs::read_dir(&folder).with_context(|| format!("listing {}", folder.display()))?;
        let mut items = reader
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("listing {}", folder.display()))?;
        // By name, so which of two ways to one folder is listed does not depend on the disk.
        items.sort_by_key(|item| item.file_name());
        for item in items {
            let path = item.path();
            if item.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => Some(meta),
                Err(_) if item.file_type().is_ok_and(|t| t.is_symlink()) => None,
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            if let Some(meta) = meta.as_ref().filter(|m| m.is_dir()) {
                if listed.insert((meta.dev(), meta.ino())) {
                    pending.push(path);
                }
            } else if meta.as_ref().is_none_or(|m| m.is_file()) {
                let relative = path.strip_prefix(dir).unwrap_or(&path);
                let relative =
                    relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>();
                let modified_ns = meta
                    .as_ref()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                let len = meta.map_or(0, |m| m.len());
                entries.push(Entry { relative: relative.join("/"), path, len, modified_ns });
            }
        }
    }
    entries.sort_by(|a, b| a.relative.cmp(&b.relative));
    Ok(entries)
}

/// `[C, S, S]` of the images the options make.
fn shape(opts: &FolderOptions) -> [i64; 3] {
    [opts.channels, opts.image_size, opts.image_size]
}

fn image_bytes(opts: &FolderOptions) -> u64 {
    cache::image_bytes(shape(opts)) as u64
}

/// The cache file's name for this listing and transform.
fn cache_name(entries: &[Entry], opts: &FolderOptions) -> String {
    let transform = format!("{}x{} test {}\n", opts.channels, opts.image_size, opts.test_fraction);
    let folder = opts.dir.canonicalize().unwrap_or_else(|_| opts.dir.clone());
    let listing: String =
        entries.iter().map(|e| format!("{}\t{}\t{}\n", e.relative, e.len, e.modified_ns)).collect();
    cache::name(&folder, &transform, &listing)
}

/// Bytes the kernel says can be allocated without swapping (`MemAvailable`).
pub(crate) fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Why `images` decoded images should stream from disk: they would take more than
/// `--max-memory`, or than half the memory available. `None` when they fit.
fn too_big(images: usize, opts: &FolderOptions, available: Option<u64>) -> Option<String> {
    let needed = images as u64 * image_bytes(opts);
    let (budget, what) = match opts.max_memory {
        Some(max) => (max, format!("--max-memory {}", format_bytes(max))),
        None => (available? / 2, format!("half the {} of memory available", format_bytes(available?))),
    };
    (needed > budget).then(|| {
        format!(
            "{images} images of {}, decoded at {}x{s}x{s}, take {}, more than {what}",
            opts.dir.display(),
            opts.channels,
            format_bytes(needed),
            s = opts.image_size
        )
    })
}

fn format_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let exp = ((64 - bytes.leading_zeros()).saturating_sub(1) / 10).min(4);
    if exp == 0 {
        return format!("{bytes} B");
    }
    format!("{:.1} {}", bytes as f64 / (1u64 << (10 * exp)) as f64, units[exp as usize])
}

/// What decoding a listing found, besides the pixels.
#[derive(Default)]
struct Report {
    counts: [usize; 2],
    failed: Vec<String>,
    upscaled: usize,
}

/// Decodes `split[0]` (train) then `split[1]` (test) on every core, `chunk` files at a time
/// so memory stays bounded, handing each image's pixels to `sink` in listing order.
fn decode(
    splits: [&[&Entry]; 2],
    opts: &FolderOptions,
    chunk: usize,
    mut sink: impl FnMut(usize, &[u8]) -> Result<()>,
) -> Result<Report> {
    let progress = ProgressBar::new((splits[0].len() + splits[1].len()) as u64);
    progress.set_style(
        ProgressStyle::with_template("decoding {pos}/{len} images [{bar:30}] {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut report = Report::default();
    for (side, entries) in splits.iter().enumerate() {
        for entries in entries.chunks(chunk) {
            let decoded: Vec<Result<image_file::Decoded>> = entries
                .par_iter()
                .map(|e| {
                    // A decoder bug must cost one file, not the run.
                    let decode = || image_file::decode(&e.path, opts.channels, opts.image_size);
                    let d = std::panic::catch_unwind(decode).unwrap_or_else(|_| {
                        Err(anyhow::anyhow!("{}: the image decoder panicked", e.path.display()))
                    });
                    progress.inc(1);
                    d
                })
                .collect();
            for (entry, result) in entries.iter().zip(decoded) {
                match result {
                    Ok(img) => {
                        sink(side, &img.pixels)?;
                        report.counts[side] += 1;
                        report.upscaled += img.upscaled as usize;
                    }
                    Err(_) => report.failed.push(entry.relative.clone()),
                }
            }
        }
    }
    progress.finish_and_clear();
    Ok(report)
}

/// Decoded pixels held at once beside the set while decoding: enough images per chunk to keep
/// every core decoding, little next to the set.
const CHUNK_BYTES: usize = 16 << 20;

/// The folder's splits: from its cache file when one matches the listing and transform,
/// else decoded (and cached for the next run).
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
    if let Some(cache) = &opts.cache_dir {
        // Its files would be listed with the images: each new one a new listing, decoded afresh.
        ensure!(
            !lists(dir, cache)?,
            "--cache-dir {} lies inside the image folder {}: choose one elsewhere (or a hidden one there)",
            cache.display(),
            dir.display()
        );
    }
    let cache = opts.cache_dir.as_ref().map(|d| d.join(cache_name(&entries, opts)));
    let found = cache.as_deref().and_then(|c| CacheFile::open(c, shape(opts)));
    // The files its images came from, as many as it holds (else it is decoded again).
    let found = found.and_then(|f| Some((split_names(&entries, opts, &f.failed, f.counts)?, f)));
    match found {
        Some((names, found)) => from_cache(found, names, opts),
        None => decode_fresh(&entries, cache.as_deref(), opts),
    }
}

/// The relative paths of the images of each split, in order: the listing's files in the
/// split, less those that did not decode (`failed`); `None` unless they number `counts`.
fn split_names(
    entries: &[Entry],
    opts: &FolderOptions,
    failed: &[String],
    counts: [usize; 2],
) -> Option<[Vec<String>; 2]> {
    let failed: std::collections::HashSet<&str> = failed.iter().map(String::as_str).collect();
    let decoded = entries.iter().filter(|e| !failed.contains(e.relative.as_str()));
    let (test, train): (Vec<String>, Vec<String>) =
        decoded.map(|e| e.relative.clone()).partition(|r| is_test(r, opts.test_fraction));
    (train.len() == counts[0] && test.len() == counts[1]).then_some([train, test])
}

/// A matching cache file, held in memory or streamed from as the memory budget says, its
/// images named by `names`.
fn from_cache(found: CacheFile, names: [Vec<String>; 2], opts: &FolderOptions) -> Result<Splits> {
    let reason = too_big(found.counts[0] + found.counts[1], opts, available_memory());
    if !opts.quiet {
        let how = if reason.is_some() { "streaming" } else { "decoded images" };
        note!("{}: {how} from the cache {}", opts.dir.display(), found.path.display());
        if let Some(reason) = &reason {
            note!("{reason}: reading them from disk a batch at a time");
        }
    }
    Ok(found.splits(reason.is_some())?.named(names))
}

/// Decodes every file of the listing into memory, or, for a set above the memory budget,
/// into the cache file to stream from; writes the cache at `cache` when given.
fn decode_fresh(entries: &[Entry], cache: Option<&Path>, opts: &FolderOptions) -> Result<Splits> {
    let dir = &opts.dir;
    let stream = too_big(entries.len(), opts, available_memory());
    if let Some(reason) = &stream {
        let path = cache.with_context(|| {
            format!("{reason}; streaming them from disk needs the cache file: drop --no-cache")
        })?;
        note!("{reason}: decoding them into the cache {} and streaming from it", path.display());
    }
    // Streaming needs the cache file; a resident set only loses the next run's head start.
    let mut writer = match cache.map(|c| CacheWriter::create(c, shape(opts))).transpose() {
        Err(e) if stream.is_none() => {
            note!("warning: images will not be cached: {e:#}");
            None
        }
        created => created?,
    };
    let (test, train): (Vec<&Entry>, Vec<&Entry>) =
        entries.iter().partition(|e| is_test(&e.relative, opts.test_fraction));
    // Each image is copied into a tensor sized for its split, so the set is in memory once.
    let (c, s) = (opts.channels, opts.image_size);
    let mut memory = stream.is_none().then(|| {
        [train.len(), test.len()].map(|n| Tensor::empty([n as i64, c, s, s], (Kind::Uint8, Device::Cpu)))
    });
    let mut filled = [0i64; 2];
    let chunk = (CHUNK_BYTES / image_bytes(opts) as usize).max(rayon::current_num_threads());
    let report = decode([&train, &test], opts, chunk, |side, pixels| {
        if let Some(memory) = memory.as_mut() {
            memory[side].get(filled[side]).copy_(&Tensor::from_slice(pixels).view([c, s, s]));
            filled[side] += 1;
        }
        if let Some(w) = writer.as_mut() {
            if let Err(e) = w.append(pixels) {
                if stream.is_some() {
                    return Err(e);
                }
                note!("warning: images will not be cached: {e:#}");
                writer = None;
            }
        }
        Ok(())
    })?;

    let Report { counts, failed, upscaled } = report;
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
        note!(
            "warning: skipped {} files of {} that do not decode: {named}{more}",
            failed.len(),
            dir.display()
        );
    }
    if upscaled > 0 {
        note!(
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
    let names = split_names(entries, opts, &failed, counts)
        .expect("the decoded files are the listing's less the failed");
    if let Some(w) = writer {
        match w.finish(counts, &failed) {
            Err(e) if stream.is_none() => note!("warning: images will not be cached: {e:#}"),
            finished => {
                finished?;
                cache::remove_outdated(cache.expect("a writer has a path"));
            }
        }
    }
    let Some([train_images, test_images]) = memory else {
        let path = cache.expect("a streamed set has a cache file (checked above)");
        let written = CacheFile::open(path, shape(opts));
        let written = written.with_context(|| format!("reopening {}, just written", path.display()))?;
        return Ok(written.splits(true)?.named(names));
    };
    Ok(Splits {
        train: Dataset::from_images(train_images.narrow(0, 0, counts[0] as i64)),
        test: Dataset::from_images(test_images.narrow(0, 0, counts[1] as i64)),
    }
    .named(names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_too_big_for_memory_is_told_by_size() {
        let mut opts = FolderOptions {
            dir: PathBuf::from("/data/faces"),
            image_size: 128,
            channels: 3,
            test_fraction: 0.05,
            cache_dir: None,
            max_memory: None,
            quiet: false,
        };
        assert_eq!(too_big(1000, &opts, Some(1 << 30)), None);
        assert_eq!(too_big(200_000, &opts, None), None, "no bound known, no streaming");
        let why = too_big(200_000, &opts, Some(8 << 30)).unwrap();
        assert_eq!(
            why,
            "200000 images of /data/faces, decoded at 3x128x128, take 9.2 GiB, more than half the 8.0 GiB \
             of memory available"
        );
        opts.max_memory = Some(1 << 30);
        let why = too_big(100_000, &opts, Some(64 << 30)).unwrap();
        assert!(why.ends_with("take 4.6 GiB, more than --max-memory 1.0 GiB"), "{why}");
        assert_eq!(too_big(1000, &opts, None), None);
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }

    /// The images of `dir` as 4 x 4 grayscale, 30% for testing, uncached.
    fn gray_4px(dir: &Path) -> FolderOptions {
        FolderOptions {
            dir: dir.to_path_buf(),
            image_size: 4,
            channels: 1,
            test_fraction: 0.3,
            cache_dir: None,
            max_memory: None,
            quiet: false,
        }
    }

    #[test]
    fn links_are_followed_to_each_folder_once_and_links_to_nowhere_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::create_dir(&a).unwrap();
        for i in 0..12u8 {
            image::GrayImage::from_pixel(6, 6, image::Luma([i * 20]))
                .save(a.join(format!("{i}.png")))
                .unwrap();
        }
        let link = |target: &str, at: &Path| std::os::unix::fs::symlink(target, at).unwrap();
        link("..", &a.join("up"));
        link("a", &dir.path().join("b"));
        link("/nonexistent", &a.join("gone"));
        link("self", &a.join("self"));
        let listed: Vec<String> = list(dir.path()).unwrap().into_iter().map(|e| e.relative).collect();
        assert_eq!(listed.len(), 14, "{listed:?}");
        assert!(listed.iter().all(|r| r.starts_with("a/") && !r.starts_with("a/up/")), "{listed:?}");
        assert!(listed.contains(&"a/gone".to_string()) && listed.contains(&"a/self".to_string()));
        let splits = load(&gray_4px(dir.path())).unwrap();
        assert_eq!(splits.train.len() + splits.test.len(), 12);
    }

    #[test]
    fn decoding_in_chunks_keeps_the_listing_order_and_names_failures() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..9u8 {
            let img = image::GrayImage::from_fn(5 + i as u32, 6, |x, _| image::Luma([i * 20 + x as u8]));
            img.save(dir.path().join(format!("{i}.png"))).unwrap();
        }
        std::fs::write(dir.path().join("4b.png"), b"broken").unwrap();
        let opts = gray_4px(dir.path());
        let entries = list(dir.path()).unwrap();
        let (test, train): (Vec<&Entry>, Vec<&Entry>) =
            entries.iter().partition(|e| is_test(&e.relative, opts.test_fraction));
        let decoded = |chunk| {
            let mut seen = Vec::new();
            let report = decode([&train, &test], &opts, chunk, |side, px| {
                seen.push((side, px.to_vec()));
                Ok(())
            })
            .unwrap();
            (seen, report.counts, report.failed)
        };
        let whole = decoded(100);
        assert_eq!(whole, decoded(2));
        assert_eq!(whole, decoded(1));
        assert_eq!(whole.1[0] + whole.1[1], 9);
        assert_eq!(whole.2, vec!["4b.png".to_string()]);
        let sides: Vec<usize> = whole.0.iter().map(|(side, _)| *side).collect();
        assert!(sides.contains(&0) && sides.contains(&1), "{sides:?}");
        assert!(sides.windows(2).all(|w| w[0] <= w[1]), "train images first, then test: {sides:?}");
    }

    #[test]
    fn the_split_depends_on_the_path_alone_and_has_the_asked_fraction() {
        let names: Vec<String> = (0..20_000).map(|i| format!("class{}/img{i}.jpg", i % 7)).collect();
        let test = names.iter().filter(|n| is_test(n, 0.05)).count() as f64 / names.len() as f64;
        assert!((test - 0.05).abs() < 0.006, "test fraction {test}");
        assert_eq!(is_test("a/b.png", 0.3), is_test("a/b.png", 0.3));
    }
}
