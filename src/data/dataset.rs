//! A split's images, held in memory as one u8 `[N, C, H, W]` tensor or read from a file of
//! records a batch at a time, and how their intensities become targets.

use super::Records;
use crate::rng::{SplitMix64, Stream};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// One split's images, u8 `[N, C, H, W]` (compact: the float conversion happens per batch on
/// the training device), and optional class labels.
#[derive(Debug)]
pub struct Dataset {
    pub(super) pixels: Pixels,
    pub labels: Option<Tensor>,
    /// The file each image came from, relative to its folder (image folders only).
    pub names: Option<Arc<[String]>>,
}

/// Where a split's pixels are.
#[derive(Debug)]
pub(super) enum Pixels {
    /// In memory, as one tensor.
    Resident(Tensor),
    /// In a file, read a batch at a time: for sets larger than memory.
    Streamed(Records),
}

impl Dataset {
    pub fn from_u8(pixels: &[u8], n: usize, c: usize, h: usize, w: usize, labels: Option<&[u8]>) -> Self {
        let images = Tensor::from_slice(pixels).view([n as i64, c as i64, h as i64, w as i64]);
        let labels = labels.map(|l| Tensor::from_slice(l).to_kind(Kind::Int64));
        Self { pixels: Pixels::Resident(images), labels, names: None }
    }

    /// A split of u8 `[N, C, H, W]` images without labels.
    pub fn from_images(images: Tensor) -> Self {
        Self { pixels: Pixels::Resident(images), labels: None, names: None }
    }

    pub fn streamed(records: Records) -> Self {
        Self { pixels: Pixels::Streamed(records), labels: None, names: None }
    }

    /// The same images, named by the files they came from (one name each, in order).
    pub(super) fn named(self, names: Vec<String>) -> Self {
        assert_eq!(names.len(), self.len(), "one name per image");
        Self { names: Some(names.into()), ..self }
    }

    /// Whether the images are read from disk batch by batch.
    pub fn is_streamed(&self) -> bool {
        matches!(self.pixels, Pixels::Streamed(_))
    }

    pub fn len(&self) -> usize {
        match &self.pixels {
            Pixels::Resident(images) => images.size()[0] as usize,
            Pixels::Streamed(records) => records.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `limit` images (all when `None`).
    pub(super) fn truncated(self, limit: Option<usize>) -> Self {
        let Some(n) = limit.filter(|&n| n < self.len()) else { return self };
        let pixels = match self.pixels {
            Pixels::Resident(images) => Pixels::Resident(images.narrow(0, 0, n as i64)),
            Pixels::Streamed(records) => Pixels::Streamed(records.truncated(n)),
        };
        let names = self.names.map(|names| names[..n].into());
        Self { pixels, labels: self.labels.map(|l| l.narrow(0, 0, n as i64)), names }
    }

    /// `[C, H, W]` of one image.
    pub fn image_shape(&self) -> [i64; 3] {
        match &self.pixels {
            Pixels::Resident(images) => {
                let s = images.size();
                [s[1], s[2], s[3]]
            }
            Pixels::Streamed(records) => records.shape(),
        }
    }

    /// Images `start..start + count` (clamped to the split) as u8 `[n, C, H, W]` on the CPU.
    pub fn images(&self, start: usize, count: usize) -> Result<Tensor> {
        let end = (start + count).min(self.len());
        let start = start.min(end);
        Ok(match &self.pixels {
            Pixels::Resident(images) => images.narrow(0, start as i64, (end - start) as i64),
            Pixels::Streamed(records) => records.read(&(start as i64..end as i64).collect::<Vec<_>>())?,
        })
    }

    /// A copy with every pixel drawn once as 0 or 255 with probability intensity/255: the
    /// fixed binarization used to evaluate a model trained with `--binarize dynamic`. A
    /// streamed split is binarized as it is read, to the same pixels.
    pub fn binarized(&self, seed: u64) -> Self {
        let pixels = match &self.pixels {
            Pixels::Resident(images) => {
                let mut pixels = Vec::<u8>::try_from(images.flatten(0, -1)).expect("u8 images");
                binarize(&mut pixels, seed, 0);
                Pixels::Resident(Tensor::from_slice(&pixels).view(images.size().as_slice()))
            }
            Pixels::Streamed(records) => Pixels::Streamed(records.binarized(seed)),
        };
        Self { pixels, labels: self.labels.as_ref().map(|l| l.shallow_clone()), names: self.names.clone() }
    }

    /// The same images and labels, sharing their storage.
    pub fn shallow_clone(&self) -> Self {
        let pixels = match &self.pixels {
            Pixels::Resident(images) => Pixels::Resident(images.shallow_clone()),
            Pixels::Streamed(records) => Pixels::Streamed(records.clone()),
        };
        Self { pixels, labels: self.labels.as_ref().map(Tensor::shallow_clone), names: self.names.clone() }
    }
}

/// Pixel k of a split binarized with `seed` takes draw k of the seed's evaluation stream, so
/// a slice starting at pixel `first` binarizes as it would within the whole split.
pub(super) fn binarize(pixels: &mut [u8], seed: u64, first: u64) {
    let mut rng = SplitMix64::derived(seed, Stream::Eval, 0);
    rng.skip(first);
    for p in pixels {
        *p = if rng.next_f64() * 255.0 < *p as f64 { 255 } else { 0 };
    }
}

/// The train and test splits of a dataset.
#[derive(Debug)]
pub struct Splits {
    pub train: Dataset,
    pub test: Dataset,
}

impl Splits {
    /// The same splits, their images named by the files they came from.
    pub(super) fn named(self, [train, test]: [Vec<String>; 2]) -> Self {
        Self { train: self.train.named(train), test: self.test.named(test) }
    }
}

/// Images of each split that a [`Fingerprint`] reads.
const SAMPLED: usize = 16;

/// What tells two loads of a dataset apart, cheaply: the splits' sizes, the image shape and a
/// CRC-32 of some images of each split (evenly spaced, the first and last included), so a
/// large streamed set is not read whole. The ranks of a run compare theirs, and a resume
/// compares its own with the checkpoint's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub train: i64,
    pub test: i64,
    pub shape: [i64; 3],
    pub crc32: u32,
}

impl Splits {
    pub fn fingerprint(&self) -> Result<Fingerprint> {
        let mut crc = crc32fast::Hasher::new();
        for split in [&self.train, &self.test] {
            let (n, k) = (split.len(), SAMPLED.min(split.len()));
            for j in 0..k {
                let at = if k > 1 { j * (n - 1) / (k - 1) } else { 0 };
                crc.update(&Vec::<u8>::try_from(split.images(at, 1)?.flatten(0, -1))?);
            }
        }
        let shape = self.train.image_shape();
        Ok(Fingerprint {
            train: self.train.len() as i64,
            test: self.test.len() as i64,
            shape,
            crc32: crc.finalize(),
        })
    }
}

impl Fingerprint {
    pub fn to_values(self) -> [i64; 6] {
        let [c, h, w] = self.shape;
        [self.train, self.test, c, h, w, self.crc32 as i64]
    }

    pub fn from_values([train, test, c, h, w, crc32]: [i64; 6]) -> Self {
        Self { train, test, shape: [c, h, w], crc32: crc32 as u32 }
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let [c, h, w] = self.shape;
        write!(
            f,
            "{} train and {} test images of {c}x{h}x{w} (CRC-32 of sampled images {:08x})",
            self.train, self.test, self.crc32
        )
    }
}

/// How pixel intensities become likelihood targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Binarize {
    /// Intensities in [0, 1] are the targets.
    None,
    /// Each time an image is seen, every pixel is redrawn as 0/1 with its intensity as the
    /// probability (the standard dynamically binarized benchmark).
    Dynamic,
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::path::Path;

    fn bytes(ds: &Dataset) -> Vec<u8> {
        Vec::<u8>::try_from(ds.images(0, ds.len()).unwrap().flatten(0, -1)).unwrap()
    }

    #[test]
    fn a_fingerprint_tells_other_images_apart() {
        let splits = |first: u8| {
            let mut train: Vec<u8> = (0..40 * 3 * 4 * 4).map(|i| (i % 251) as u8).collect();
            train[0] = first;
            let test = vec![7u8; 2 * 3 * 4 * 4];
            Splits {
                train: Dataset::from_u8(&train, 40, 3, 4, 4, None),
                test: Dataset::from_u8(&test, 2, 3, 4, 4, None),
            }
        };
        let print = splits(0).fingerprint().unwrap();
        assert_eq!((print.train, print.test, print.shape), (40, 2, [3, 4, 4]));
        assert_eq!(splits(0).fingerprint().unwrap(), print);
        assert_ne!(splits(1).fingerprint().unwrap(), print);
        assert_eq!(Fingerprint::from_values(print.to_values()), print);
    }

    /// `pixels` as a resident split and as the same split streamed from a file of records.
    pub(in crate::data) fn resident_and_streamed(
        pixels: &[u8],
        n: usize,
        shape: [usize; 3],
    ) -> (Dataset, Dataset) {
        let [c, h, w] = shape;
        let file = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, pixels, 5).unwrap();
        let records =
            Records::new(std::sync::Arc::new(file), Path::new("records"), 5, n, [c, h, w].map(|d| d as i64));
        (Dataset::from_u8(pixels, n, c, h, w, None), Dataset::streamed(records))
    }

    #[test]
    fn a_streamed_split_reads_and_binarizes_as_the_resident_one() {
        let pixels: Vec<u8> = (0..7 * 3 * 4 * 5).map(|i| (i * 37 % 256) as u8).collect();
        let (resident, streamed) = resident_and_streamed(&pixels, 7, [3, 4, 5]);
        assert!(streamed.is_streamed() && !resident.is_streamed());
        assert_eq!((streamed.len(), streamed.image_shape()), (7, [3, 4, 5]));
        assert_eq!(bytes(&streamed), pixels);
        assert_eq!(bytes(&streamed.binarized(11)), bytes(&resident.binarized(11)));
        let slice = |ds: &Dataset| {
            Vec::<u8>::try_from(ds.binarized(11).images(2, 3).unwrap().flatten(0, -1)).unwrap()
        };
        assert_eq!(slice(&streamed), slice(&resident));
        assert_eq!(streamed.images(5, 10).unwrap().size(), vec![2, 3, 4, 5], "clamped to the split");
        assert_eq!(streamed.truncated(Some(4)).len(), 4);
    }

    #[test]
    fn binarization_is_fixed_by_the_seed_and_follows_intensity() {
        let pixels: Vec<u8> = (0..4000).map(|i| if i % 2 == 0 { 0 } else { 191 }).collect();
        let ds = Dataset::from_u8(&pixels, 10, 1, 20, 20, None);
        let a = bytes(&ds.binarized(3));
        let b = bytes(&ds.binarized(3));
        assert_eq!(a, b);
        assert!(a.iter().step_by(2).all(|&p| p == 0));
        let on = a.iter().skip(1).step_by(2).filter(|&&p| p == 255).count() as f64 / 2000.0;
        assert!((on - 0.75).abs() < 0.04, "fraction on {on}");
    }
}
