//! Datasets: where images come from, held in memory as u8 `[N, C, H, W]` tensors, or, for an
//! image folder larger than memory, read from its cache file a batch at a time.

pub mod cifar;
pub mod folder;
pub mod idx;
pub mod image_file;
mod loader;
pub mod records;
pub mod shapes;

pub use loader::{random_hflip, to_unit_float, Loader};
pub use records::Records;

use crate::rng::{SplitMix64, Stream};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Default sizes of the generated shapes splits: about a minute of training per epoch budget.
const SHAPES_TRAIN: usize = 16_000;
const SHAPES_TEST: usize = 2_000;

/// Where Debian's `dataset-fashion-mnist` package installs the files.
pub const DEFAULT_FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// Procedural squares, ellipses and triangles; needs no files.
    Shapes,
    /// Fashion-MNIST in IDX format (28x28 grayscale, 60k train / 10k test).
    FashionMnist,
    /// MNIST digits in IDX format; same layout as Fashion-MNIST.
    Mnist,
    /// CIFAR-10's binary batches (32x32 RGB, 50k train / 10k test).
    Cifar10,
    /// Every image below --data-dir, resized and centre-cropped to --image-size.
    Folder,
}

/// What to load; saved in checkpoints so evaluation finds the same data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    pub kind: DatasetKind,
    /// Folder of the IDX files; `None` means the dataset's default location.
    pub data_dir: Option<PathBuf>,
    /// Side of the generated images (shapes) or of the crops (folder).
    pub image_size: i64,
    /// Channels of the generated (shapes) or decoded (folder) images: 1 or 3.
    pub channels: i64,
    /// Images of the train split to use: all of a file's, or this many generated shapes.
    pub train_size: Option<usize>,
    pub test_size: Option<usize>,
    /// Share of a folder's files held out for testing, chosen by path hash.
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Where decoded image folders are cached (`None`: decode every time).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Bytes a folder's decoded images may take in memory before they stream from the cache
    /// file (`None`: half of what is available). A fact of the machine, not of the run, so
    /// checkpoints do not keep it.
    #[serde(skip)]
    pub max_memory: Option<u64>,
}

fn default_test_fraction() -> f64 {
    0.05
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: DatasetKind::Shapes,
            data_dir: None,
            image_size: 28,
            channels: 1,
            train_size: None,
            test_size: None,
            test_fraction: default_test_fraction(),
            cache_dir: None,
            max_memory: None,
        }
    }
}

impl DataConfig {
    pub fn name(&self) -> &'static str {
        match self.kind {
            DatasetKind::Shapes => "shapes",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Mnist => "mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Folder => "folder",
        }
    }

    fn idx_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| match self.kind {
            DatasetKind::Mnist => PathBuf::from("/usr/share/datasets/mnist"),
            _ => PathBuf::from(DEFAULT_FASHION_MNIST_DIR),
        })
    }

    /// Loads both splits into CPU memory.
    pub fn load(&self, seed: u64) -> Result<Splits> {
        ensure!(
            self.train_size != Some(0) && self.test_size != Some(0),
            "--train-size and --test-size must be positive"
        );
        ensure!(
            self.max_memory.is_none() || self.kind == DatasetKind::Folder,
            "--max-memory applies to --dataset folder only; {} is always held in memory",
            self.name()
        );
        match self.kind {
            DatasetKind::Shapes => {
                ensure!(
                    self.channels == 1 || self.channels == 3,
                    "--channels must be 1 or 3, found {}",
                    self.channels
                );
                ensure!(self.image_size > 0, "--image-size must be positive, found {}", self.image_size);
                let make = |count: usize, counter: u64| {
                    let (size, channels) = (self.image_size as usize, self.channels as usize);
                    let data_seed = SplitMix64::derived(seed, Stream::Data, counter).next_u64();
                    let (pixels, labels) = shapes::generate(count, size, channels, data_seed);
                    Dataset::from_u8(&pixels, count, channels, size, size, Some(&labels))
                };
                let train = make(self.train_size.unwrap_or(SHAPES_TRAIN), 0);
                Ok(Splits { train, test: make(self.test_size.unwrap_or(SHAPES_TEST), 1) })
            }
            DatasetKind::FashionMnist | DatasetKind::Mnist => {
                let dir = self.idx_dir();
                ensure!(
                    dir.is_dir(),
                    "{} dataset folder {} does not exist (on Debian: apt-get install dataset-{}, \
                     or pass --data-dir)",
                    self.name(),
                    dir.display(),
                    self.name()
                );
                let train = read_idx_split(&dir, "train")?.truncated(self.train_size);
                Ok(Splits { train, test: read_idx_split(&dir, "t10k")?.truncated(self.test_size) })
            }
            DatasetKind::Cifar10 => {
                let dir = self.data_dir.as_deref().context("--dataset cifar10 needs --data-dir DIR")?;
                ensure!(dir.is_dir(), "CIFAR-10 folder {} does not exist", dir.display());
                let dir = cifar::locate(dir);
                let train = cifar::read_split(&dir, &cifar::TRAIN_FILES)?.truncated(self.train_size);
                Ok(Splits {
                    train,
                    test: cifar::read_split(&dir, &[cifar::TEST_FILE])?.truncated(self.test_size),
                })
            }
            DatasetKind::Folder => {
                let dir = self.data_dir.clone().context("--dataset folder needs --data-dir FOLDER")?;
                let splits = folder::load(&folder::FolderOptions {
                    dir,
                    image_size: self.image_size,
                    channels: self.channels,
                    test_fraction: self.test_fraction,
                    cache_dir: self.cache_dir.clone(),
                    max_memory: self.max_memory,
                })?;
                Ok(Splits {
                    train: splits.train.truncated(self.train_size),
                    test: splits.test.truncated(self.test_size),
                })
            }
        }
    }
}

/// Reads `{prefix}-images-idx3-ubyte[.gz]` and its labels, checking that they agree.
fn read_idx_split(dir: &Path, prefix: &str) -> Result<Dataset> {
    let images_path = idx::locate(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = idx::locate(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images = idx::read_images(&images_path)?;
    let labels = idx::read_labels(&labels_path)?;
    ensure!(
        labels.len() == images.count,
        "{} holds {} images but {} holds {} labels",
        images_path.display(),
        images.count,
        labels_path.display(),
        labels.len()
    );
    ensure!(images.count > 0, "{} holds no images", images_path.display());
    Ok(Dataset::from_u8(&images.pixels, images.count, 1, images.rows, images.cols, Some(&labels)))
}

/// One split's images, u8 `[N, C, H, W]` (compact: the float conversion happens per batch on
/// the training device), and optional class labels.
#[derive(Debug)]
pub struct Dataset {
    pixels: Pixels,
    pub labels: Option<Tensor>,
}

/// Where a split's pixels are.
#[derive(Debug)]
enum Pixels {
    /// In memory, as one tensor.
    Resident(Tensor),
    /// In a file, read a batch at a time: for sets larger than memory.
    Streamed(Records),
}

impl Dataset {
    pub fn from_u8(pixels: &[u8], n: usize, c: usize, h: usize, w: usize, labels: Option<&[u8]>) -> Self {
        let images = Tensor::from_slice(pixels).view([n as i64, c as i64, h as i64, w as i64]);
        let labels = labels.map(|l| Tensor::from_slice(l).to_kind(Kind::Int64));
        Self { pixels: Pixels::Resident(images), labels }
    }

    /// A split of u8 `[N, C, H, W]` images without labels.
    pub fn from_images(images: Tensor) -> Self {
        Self { pixels: Pixels::Resident(images), labels: None }
    }

    pub fn streamed(records: Records) -> Self {
        Self { pixels: Pixels::Streamed(records), labels: None }
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
    fn truncated(self, limit: Option<usize>) -> Self {
        let Some(n) = limit.filter(|&n| n < self.len()) else { return self };
        let pixels = match self.pixels {
            Pixels::Resident(images) => Pixels::Resident(images.narrow(0, 0, n as i64)),
            Pixels::Streamed(records) => Pixels::Streamed(records.truncated(n)),
        };
        Self { pixels, labels: self.labels.map(|l| l.narrow(0, 0, n as i64)) }
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
        Self { pixels, labels: self.labels.as_ref().map(|l| l.shallow_clone()) }
    }

    /// The same images and labels, sharing their storage.
    pub fn shallow_clone(&self) -> Self {
        let pixels = match &self.pixels {
            Pixels::Resident(images) => Pixels::Resident(images.shallow_clone()),
            Pixels::Streamed(records) => Pixels::Streamed(records.clone()),
        };
        Self { pixels, labels: self.labels.as_ref().map(Tensor::shallow_clone) }
    }
}

/// Pixel k of a split binarized with `seed` takes draw k of the seed's evaluation stream, so
/// a slice starting at pixel `first` binarizes as it would within the whole split.
fn binarize(pixels: &mut [u8], seed: u64, first: u64) {
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
mod tests {
    use super::*;

    #[test]
    fn idx_splits_load_and_mismatched_counts_fail() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.path().join(name), bytes).unwrap();
        write("train-images-idx3-ubyte", idx::encode_images(4, 2, 2, &[7; 16]));
        write("train-labels-idx1-ubyte", idx::encode_labels(&[0, 1, 2, 3]));
        write("t10k-images-idx3-ubyte", idx::encode_images(2, 2, 2, &[9; 8]));
        write("t10k-labels-idx1-ubyte", idx::encode_labels(&[5]));
        let cfg = DataConfig {
            kind: DatasetKind::FashionMnist,
            data_dir: Some(dir.path().into()),
            ..Default::default()
        };
        let err = format!("{:#}", cfg.load(0).unwrap_err());
        assert!(err.contains("holds 2 images but") && err.contains("holds 1 labels"), "{err}");
        write("t10k-labels-idx1-ubyte", idx::encode_labels(&[5, 6]));
        let splits = cfg.load(0).unwrap();
        assert_eq!(splits.train.len(), 4);
        assert_eq!(splits.test.image_shape(), [1, 2, 2]);
        let missing = DataConfig { data_dir: Some(dir.path().join("nope")), ..cfg };
        assert!(format!("{:#}", missing.load(0).unwrap_err()).contains("does not exist"));
    }

    fn bytes(ds: &Dataset) -> Vec<u8> {
        Vec::<u8>::try_from(ds.images(0, ds.len()).unwrap().flatten(0, -1)).unwrap()
    }

    /// `pixels` as a resident split and as the same split streamed from a file of records.
    pub(super) fn resident_and_streamed(pixels: &[u8], n: usize, shape: [usize; 3]) -> (Dataset, Dataset) {
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
