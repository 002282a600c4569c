//! Datasets: where images come from, held in memory as u8 `[N, C, H, W]` tensors, or, for an
//! image folder larger than memory, read from its cache file a batch at a time.

mod cache;
pub mod cifar;
mod dataset;
pub mod folder;
pub mod idx;
pub mod image_file;
mod loader;
pub mod records;
pub mod shapes;

pub use dataset::{Binarize, Dataset, Fingerprint, Splits};
pub use loader::{random_hflip, to_unit_float, Loader};
pub use records::Records;

use crate::rng::{SplitMix64, Stream};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

impl DatasetKind {
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Shapes => "shapes",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Mnist => "mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Folder => "folder",
        }
    }

    /// Side of the images when the flags do not say.
    pub fn default_side(self) -> i64 {
        match self {
            DatasetKind::Shapes | DatasetKind::FashionMnist | DatasetKind::Mnist => 28,
            DatasetKind::Cifar10 => 32,
            DatasetKind::Folder => 64,
        }
    }

    pub fn default_channels(self) -> i64 {
        match self {
            DatasetKind::Shapes | DatasetKind::FashionMnist | DatasetKind::Mnist => 1,
            DatasetKind::Cifar10 | DatasetKind::Folder => 3,
        }
    }

    /// Whether `--image-size` and `--channels` apply: generated and decoded images only.
    pub fn sized(self) -> bool {
        matches!(self, DatasetKind::Shapes | DatasetKind::Folder)
    }
}

/// Where a dataset is on this machine and how much of it memory holds: facts of the
/// machine, not of the run, so every command that reads data takes them again.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DataLocation {
    /// Folder of the dataset's files [default: the dataset's usual place, e.g.
    /// /usr/share/datasets/fashion-mnist; where the run found them, for a checkpoint].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Memory an image folder's decoded images may take (bytes, or with K, M, G, T: 512M,
    /// 8G); a larger set streams from its cache file, the next batch read while one trains
    /// [default: half the memory available].
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<u64>,
}

/// The flags that choose a dataset and its images: `vae train` reads them into the run's
/// config; the commands that read a diffusers folder, which has no data of its own, read
/// them to know what to evaluate it on.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// The images: to train on, or to evaluate a diffusers folder on.
    #[arg(long, value_enum, default_value = "shapes")]
    pub dataset: DatasetKind,
    #[command(flatten)]
    pub location: DataLocation,
    /// Side of the generated shapes or of a folder's crops [default: 28 for shapes, 64 for
    /// folder; a diffusers folder's sample_size].
    #[arg(long)]
    pub image_size: Option<i64>,
    /// Channels of the generated shapes or of a folder's images, 1 or 3 [default: 1 for
    /// shapes, 3 for folder; a diffusers folder's in_channels].
    #[arg(long)]
    pub channels: Option<i64>,
    /// Share of a folder's files held out as the test split, chosen by a hash of each path.
    #[arg(long, default_value_t = DataConfig::default().test_fraction)]
    pub test_fraction: f64,
    /// Where decoded image folders are cached, keyed by the listing and the transform.
    #[arg(long, default_value = "checkpoints/.cache")]
    pub cache_dir: PathBuf,
    /// Decode an image folder every time instead.
    #[arg(long)]
    pub no_cache: bool,
    /// Train images to use (shapes: how many to generate) [default: all; shapes 16000].
    #[arg(long)]
    pub train_size: Option<usize>,
    /// Test images to use (shapes: how many to generate) [default: all; shapes 2000].
    #[arg(long)]
    pub test_size: Option<usize>,
}

/// Flag `id` as the command line (`matches`) gave it, for messages: `--lr 0.001`,
/// `--betas 0.5,0.9`, or a switch alone (`--no-cache`, not `--no-cache true`).
pub fn as_typed(matches: &clap::ArgMatches, id: &str) -> String {
    let flag = format!("--{}", id.replace('_', "-"));
    if matches.try_get_one::<bool>(id).is_ok() {
        return flag;
    }
    let values: Vec<String> =
        matches.get_raw(id).into_iter().flatten().map(|v| v.to_string_lossy().into()).collect();
    format!("{flag} {}", values.join(","))
}

type AppliesTo = fn(DatasetKind) -> bool;

/// The data flags that apply to some datasets only, and which: given for another dataset
/// they are refused, not ignored (`--data-dir photos` without `--dataset folder` trained on
/// generated shapes, and `--test-fraction` given for CIFAR-10 kept its own test split).
const ONLY_FOR: [(&str, AppliesTo); 7] = [
    ("data_dir", |kind| kind != DatasetKind::Shapes),
    ("image_size", DatasetKind::sized),
    ("channels", DatasetKind::sized),
    ("test_fraction", |kind| kind == DatasetKind::Folder),
    ("cache_dir", |kind| kind == DatasetKind::Folder),
    ("no_cache", |kind| kind == DatasetKind::Folder),
    ("max_memory", |kind| kind == DatasetKind::Folder),
];

impl DatasetKind {
    /// Refuses a data flag on the command line (`matches`) that does not apply to these
    /// images, `whose` (what to call them: `--dataset shapes`, a checkpoint's data), naming
    /// the datasets it applies to.
    pub fn check_flags(self, matches: &clap::ArgMatches, whose: &str) -> Result<()> {
        use clap::ValueEnum;
        for (id, applies) in ONLY_FOR {
            if applies(self) || matches.value_source(id) != Some(clap::parser::ValueSource::CommandLine) {
                continue;
            }
            let to: Vec<&str> =
                Self::value_variants().iter().filter(|k| applies(**k)).map(|k| k.name()).collect();
            anyhow::bail!(
                "{} does not apply to {whose}: it applies to --dataset {} only",
                as_typed(matches, id),
                to.join(", ")
            );
        }
        Ok(())
    }
}

impl DataArgs {
    /// Refuses a data flag (`matches`: the command line) that does not apply to the dataset
    /// these flags choose.
    pub fn check_flags(&self, matches: &clap::ArgMatches) -> Result<()> {
        let given = matches.value_source("dataset") == Some(clap::parser::ValueSource::CommandLine);
        let whose = format!("--dataset {}{}", self.dataset.name(), if given { "" } else { " (the default)" });
        self.dataset.check_flags(matches, &whose)
    }

    /// Takes the image shape of the weights at `from` (`channels`, `side`) where the flags
    /// leave it open, and refuses images of other channels, which those weights cannot read.
    pub fn fit_to_weights(&mut self, [channels, side]: [i64; 2], from: &Path) -> Result<()> {
        if self.dataset.sized() {
            self.image_size.get_or_insert(side);
            self.channels.get_or_insert(channels);
        }
        ensure!(
            self.channel_count() == channels,
            "{} takes images of {channels} channel(s); {} images have {}",
            from.display(),
            self.dataset.name(),
            self.channel_count()
        );
        Ok(())
    }

    pub fn side(&self) -> i64 {
        self.image_size.unwrap_or(self.dataset.default_side())
    }

    pub fn channel_count(&self) -> i64 {
        self.channels.unwrap_or(self.dataset.default_channels())
    }
}

/// Refuses generated shapes (`[train, test]` images of `channels` x `side`^2 bytes) that
/// would take more than half the `available` memory (an image folder's default budget too; the
/// model needs the rest), before any is drawn: the default 18,000 shapes at Stable Diffusion's
/// 3 x 512 x 512 are 14.2 GB.
fn check_shapes_fit(counts: [usize; 2], channels: i64, side: i64, available: Option<u64>) -> Result<()> {
    let needed = (counts[0] + counts[1]) as u128 * (channels * side * side) as u128;
    if let Some(available) = available {
        ensure!(
            needed <= available as u128 / 2,
            "{} + {} generated shapes of {channels}x{side}x{side} take {:.1} GB, more than half the {:.1} GB \
             of memory available: lower --train-size and --test-size, or --image-size",
            counts[0],
            counts[1],
            needed as f64 / 1e9,
            available as f64 / 1e9
        );
    }
    Ok(())
}

/// A byte count as users write it: `4096`, `512K`, `1.5G`, `8GiB` (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a size such as 512M or 8G"))?;
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use K, M, G or T")),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !(1.0..1.8e19).contains(&bytes) {
        return Err(format!("{text:?} is not a size of at least 1 byte"));
    }
    Ok(bytes as u64)
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
        self.kind.name()
    }

    fn idx_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| match self.kind {
            DatasetKind::Mnist => PathBuf::from("/usr/share/datasets/mnist"),
            _ => PathBuf::from(DEFAULT_FASHION_MNIST_DIR),
        })
    }

    /// Loads both splits into CPU memory; `quiet` leaves out the notes on where a folder's
    /// images came from (warnings still print).
    pub fn load(&self, seed: u64, quiet: bool) -> Result<Splits> {
        ensure!(
            self.train_size != Some(0) && self.test_size != Some(0),
            "--train-size and --test-size must be positive"
        );
        match self.kind {
            DatasetKind::Shapes => {
                ensure!(
                    self.channels == 1 || self.channels == 3,
                    "--channels must be 1 or 3, found {}",
                    self.channels
                );
                ensure!(self.image_size > 0, "--image-size must be positive, found {}", self.image_size);
                let counts = [self.train_size.unwrap_or(SHAPES_TRAIN), self.test_size.unwrap_or(SHAPES_TEST)];
                check_shapes_fit(counts, self.channels, self.image_size, folder::available_memory())?;
                let make = |count: usize, counter: u64| {
                    let (size, channels) = (self.image_size as usize, self.channels as usize);
                    let data_seed = SplitMix64::derived(seed, Stream::Data, counter).next_u64();
                    let (pixels, labels) = shapes::generate(count, size, channels, data_seed);
                    Dataset::from_u8(&pixels, count, channels, size, size, Some(&labels))
                };
                Ok(Splits { train: make(counts[0], 0), test: make(counts[1], 1) })
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
                    quiet,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units_and_nonsense_is_named() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("2 tb"), Ok(2 << 40));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("3X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("0").unwrap_err().contains("at least 1 byte"));
        assert!(parse_size("").is_err());
    }

    #[test]
    fn shapes_that_would_not_fit_in_memory_are_refused_before_drawing() {
        let gb = 1_000_000_000;
        assert!(check_shapes_fit([16_000, 2_000], 3, 64, Some(gb)).is_ok());
        let err = check_shapes_fit([16_000, 2_000], 3, 512, Some(24 * gb)).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "16000 + 2000 generated shapes of 3x512x512 take 14.2 GB, more than half the 24.0 GB"
            ),
            "{err}"
        );
        assert!(check_shapes_fit([16_000, 2_000], 3, 512, None).is_ok(), "no meminfo: no check");
    }

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
        let err = format!("{:#}", cfg.load(0, false).unwrap_err());
        assert!(err.contains("holds 2 images but") && err.contains("holds 1 labels"), "{err}");
        write("t10k-labels-idx1-ubyte", idx::encode_labels(&[5, 6]));
        let splits = cfg.load(0, false).unwrap();
        assert_eq!(splits.train.len(), 4);
        assert_eq!(splits.test.image_shape(), [1, 2, 2]);
        let missing = DataConfig { data_dir: Some(dir.path().join("nope")), ..cfg };
        assert!(format!("{:#}", missing.load(0, false).unwrap_err()).contains("does not exist"));
    }
}
