//! The image-folder cache file: a folder's decoded images, train split then test split,
//! after a small header. Written through a temporary file and published atomically, read
//! whole into memory or left in place to stream from.

use super::{Dataset, Records, Splits};
use crate::fsio;
use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Version 2 added the files that did not decode; a version 1 cache is decoded again.
const CACHE_MAGIC: &[u8; 8] = b"VAEFOLD2";

/// Bytes of a cache file read at once into memory: small, since larger blocks, freed and
/// reallocated, measurably fragment the heap (16 MiB reads peaked 90 MiB higher).
const READ_CHUNK_BYTES: usize = 1 << 20;

/// The cache file's name, `folder-<F>-<L>.bin`: F stands for the folder and the transform,
/// L for the listing too, so a changed folder's new file can replace its old one.
pub fn name(folder: &Path, transform: &str, listing: &str) -> String {
    let folder = crate::rng::stable_hash(format!("{}\n{transform}", folder.display()).as_bytes());
    let listing = crate::rng::stable_hash(format!("{transform}{listing}").as_bytes());
    format!("folder-{folder:016x}-{listing:016x}.bin")
}

/// Deletes the caches of earlier listings of the same folder and transform (`folder-<F>-*`
/// beside `path`): each is as large as the decoded set, and a folder that changes would
/// otherwise leave one behind per change. A run reading one keeps its open file.
pub fn remove_outdated(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else { return };
    let Some((prefix, _)) = name.rsplit_once('-') else { return };
    let Ok(listing) = std::fs::read_dir(dir) else { return };
    for entry in listing.flatten() {
        let other = entry.file_name().to_string_lossy().into_owned();
        let outdated = other != name
            && other.ends_with(".bin")
            && other.rsplit_once('-').is_some_and(|(p, _)| p == prefix);
        if outdated && std::fs::remove_file(entry.path()).is_ok() {
            note!("removed the outdated cache {} (the folder's files changed)", entry.path().display());
        }
    }
}

/// Bytes of the cache's header: magic, then five little-endian u32 (train count, test
/// count, channels, side, bytes of the trailer). The train images follow, then the test
/// images, then the trailer: the relative paths of the listing's files that did not decode,
/// as a JSON list, so the files the images came from are known.
const HEADER: usize = 28;

/// A cache file that matches the transform, opened.
pub struct CacheFile {
    file: File,
    pub path: PathBuf,
    /// Images of the train and test splits.
    pub counts: [usize; 2],
    /// The files of the listing that did not decode (relative paths).
    pub failed: Vec<String>,
    /// `[C, H, W]` of one image.
    shape: [i64; 3],
}

impl CacheFile {
    /// `None` when the file is absent or does not hold images of `shape` (`[C, S, S]`; then
    /// the folder is decoded again).
    pub fn open(path: &Path, shape: [i64; 3]) -> Option<Self> {
        let file = File::open(path).ok()?;
        let mut header = [0u8; HEADER];
        file.read_exact_at(&mut header, 0).ok()?;
        let word = |i: usize| u32::from_le_bytes(header[8 + 4 * i..12 + 4 * i].try_into().unwrap()) as u64;
        let (train, test, trailer) = (word(0), word(1), word(4));
        let images = HEADER as u64 + (train + test) * image_bytes(shape) as u64;
        let fits = header.starts_with(CACHE_MAGIC)
            && word(2) as i64 == shape[0]
            && word(3) as i64 == shape[1]
            && file.metadata().ok()?.len() == images + trailer;
        if !fits {
            return None;
        }
        let mut failed = vec![0u8; trailer as usize];
        file.read_exact_at(&mut failed, images).ok()?;
        let failed = serde_json::from_slice(&failed).ok()?;
        Some(Self { file, path: path.to_path_buf(), counts: [train as usize, test as usize], failed, shape })
    }

    /// Both splits read into memory, or, with `stream`, left in the file.
    pub fn splits(self, stream: bool) -> Result<Splits> {
        let [c, s, _] = self.shape;
        let image = image_bytes(self.shape);
        let [train, test] = self.counts;
        if stream {
            let file = Arc::new(self.file);
            let records = |offset: usize, count| {
                Records::new(file.clone(), &self.path, offset as u64, count, [c, s, s])
            };
            return Ok(Splits {
                train: Dataset::streamed(records(HEADER, train)),
                test: Dataset::streamed(records(HEADER + train * image, test)),
            });
        }
        // Read a chunk at a time into the tensor, so the set is in memory once.
        let images = Tensor::empty([(train + test) as i64, c, s, s], (Kind::Uint8, Device::Cpu));
        let per_chunk = (READ_CHUNK_BYTES / image).max(1);
        let mut buffer = vec![0u8; per_chunk * image];
        for start in (0..train + test).step_by(per_chunk) {
            let n = per_chunk.min(train + test - start);
            let chunk = &mut buffer[..n * image];
            self.file
                .read_exact_at(chunk, (HEADER + start * image) as u64)
                .with_context(|| format!("reading {}", self.path.display()))?;
            let chunk = Tensor::from_slice(chunk).view([n as i64, c, s, s]);
            images.narrow(0, start as i64, n as i64).copy_(&chunk);
        }
        Ok(Splits {
            train: Dataset::from_images(images.narrow(0, 0, train as i64)),
            test: Dataset::from_images(images.narrow(0, train as i64, test as i64)),
        })
    }
}

/// A cache file being written: images appended as they decode, the header last, then
/// published atomically (an interrupted run leaves only a temporary file).
pub struct CacheWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    shape: [i64; 3],
}

impl CacheWriter {
    /// A new cache file at `path` for images of `shape`.
    pub fn create(path: &Path, shape: [i64; 3]) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the cache folder {}", dir.display()))?;
        let _ = fsio::remove_dead_temporaries(dir);
        let tmp = fsio::temporary_path(path)?;
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut writer = Self { out: BufWriter::new(file), tmp, path: path.to_path_buf(), shape };
        writer.append(&[0; HEADER])?;
        Ok(writer)
    }

    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).with_context(|| format!("writing {}", self.tmp.display()))
    }

    /// Writes the trailer (`failed`: the files that did not decode) and the header, and
    /// publishes the file.
    pub fn finish(mut self, counts: [usize; 2], failed: &[String]) -> Result<()> {
        let trailer = serde_json::to_vec(failed)?;
        self.append(&trailer)?;
        let mut header = CACHE_MAGIC.to_vec();
        for v in [counts[0], counts[1], self.shape[0] as usize, self.shape[1] as usize, trailer.len()] {
            header.extend_from_slice(&(v as u32).to_le_bytes());
        }
        self.out.flush().with_context(|| format!("writing {}", self.tmp.display()))?;
        let file = self.out.get_ref();
        file.write_all_at(&header, 0).with_context(|| format!("writing {}", self.tmp.display()))?;
        fsio::publish(file, &self.tmp, &self.path)
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        // Published, the temporary is gone; otherwise it is a partial file nobody will read.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Bytes of one image of `[C, H, W]`.
pub fn image_bytes(shape: [i64; 3]) -> usize {
    shape.iter().product::<i64>() as usize
}
