//! A split kept on disk as fixed-size u8 records (the folder cache's layout), read by index:
//! how a set larger than memory is trained on.

use super::dataset::binarize;
use anyhow::{ensure, Context, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Tensor;

/// `count` images of `shape` stored back to back from byte `offset` of a file.
#[derive(Debug, Clone)]
pub struct Records {
    /// Open for the whole run: a cache file replaced meanwhile (renamed over) is not seen.
    file: Arc<File>,
    path: PathBuf,
    offset: u64,
    count: usize,
    shape: [i64; 3],
    /// Binarize every image as read, with this seed's fixed evaluation draws.
    binarize: Option<u64>,
}

impl Records {
    pub fn new(file: Arc<File>, path: &Path, offset: u64, count: usize, shape: [i64; 3]) -> Self {
        Self { file, path: path.to_path_buf(), offset, count, shape, binarize: None }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn shape(&self) -> [i64; 3] {
        self.shape
    }

    fn record_bytes(&self) -> usize {
        self.shape.iter().product::<i64>() as usize
    }

    /// The first `count` records.
    pub fn truncated(self, count: usize) -> Self {
        Self { count: count.min(self.count), ..self }
    }

    /// Records binarized on read exactly as the resident split would be (see
    /// [`super::Dataset::binarized`]).
    pub fn binarized(&self, seed: u64) -> Self {
        Self { binarize: Some(seed), ..self.clone() }
    }

    /// The images at `indices` as u8 `[n, C, H, W]` on the CPU.
    pub fn read(&self, indices: &[i64]) -> Result<Tensor> {
        let size = self.record_bytes();
        let mut out = vec![0u8; indices.len() * size];
        for (image, &i) in out.chunks_exact_mut(size).zip(indices) {
            ensure!(
                (0..self.count as i64).contains(&i),
                "image {i} is out of range: {} holds {} images",
                self.path.display(),
                self.count
            );
            let at = self.offset + i as u64 * size as u64;
            self.file.read_exact_at(image, at).with_context(|| {
                format!("reading image {i} of {} (was the file truncated?)", self.path.display())
            })?;
            if let Some(seed) = self.binarize {
                binarize(image, seed, i as u64 * size as u64);
            }
        }
        let [c, h, w] = self.shape;
        Ok(Tensor::from_slice(&out).view([indices.len() as i64, c, h, w]))
    }
}
