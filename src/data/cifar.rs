//! CIFAR-10's binary version: `data_batch_1..5.bin` and `test_batch.bin`, each a run of
//! 3,073-byte records (a label byte, then 32x32 red, green and blue planes).

use super::Dataset;
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};

const SIDE: usize = 32;
const RECORD: usize = 1 + 3 * SIDE * SIDE;
pub const TRAIN_FILES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
pub const TEST_FILE: &str = "test_batch.bin";

/// `dir`, or its `cifar-10-batches-bin` subfolder (the archive's layout), whichever holds
/// the files.
pub fn locate(dir: &Path) -> PathBuf {
    let nested = dir.join("cifar-10-batches-bin");
    if !dir.join(TEST_FILE).is_file() && nested.join(TEST_FILE).is_file() {
        nested
    } else {
        dir.to_path_buf()
    }
}

/// The records of the files, in order, as one split.
pub fn read_split(dir: &Path, files: &[&str]) -> Result<Dataset> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for name in files {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (CIFAR-10 binary version: data_batch_1..5.bin, test_batch.bin)",
                path.display()
            )
        })?;
        append_records(&path, &bytes, &mut pixels, &mut labels)?;
    }
    Ok(Dataset::from_u8(&pixels, labels.len(), 3, SIDE, SIDE, Some(&labels)))
}

/// Checks one file's bytes and appends its images and labels.
pub fn append_records(path: &Path, bytes: &[u8], pixels: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<()> {
    ensure!(
        !bytes.is_empty() && bytes.len().is_multiple_of(RECORD),
        "{}: {} bytes is not a whole number of {RECORD}-byte CIFAR-10 records (a label and 32x32x3 \
         pixels; a full batch file is 30730000 bytes)",
        path.display(),
        bytes.len()
    );
    for record in bytes.chunks_exact(RECORD) {
        ensure!(record[0] < 10, "{}: label {} is not a CIFAR-10 class (0-9)", path.display(), record[0]);
        labels.push(record[0]);
        pixels.extend_from_slice(&record[1..]);
    }
    Ok(())
}

/// Writes records in the format, for tests and benchmarks.
pub fn encode(images: &[[u8; RECORD - 1]], labels: &[u8]) -> Vec<u8> {
    images.iter().zip(labels).flat_map(|(img, &l)| std::iter::once(l).chain(img.iter().copied())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_load_as_chw_images_and_bad_sizes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = [0u8; RECORD - 1];
        img[0] = 200; // red, top-left
        img[SIDE * SIDE + 1] = 100; // green, second pixel
        std::fs::write(dir.path().join("a.bin"), encode(&[img, [7; RECORD - 1]], &[3, 9])).unwrap();
        let ds = read_split(dir.path(), &["a.bin"]).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.image_shape(), [3, 32, 32]);
        let images = ds.images(0, 2).unwrap();
        assert_eq!(images.int64_value(&[0, 0, 0, 0]), 200);
        assert_eq!(images.int64_value(&[0, 1, 0, 1]), 100);
        assert_eq!(Vec::<i64>::try_from(ds.labels.unwrap()).unwrap(), vec![3, 9]);

        std::fs::write(dir.path().join("short.bin"), vec![0u8; RECORD + 5]).unwrap();
        let err = format!("{:#}", read_split(dir.path(), &["short.bin"]).unwrap_err());
        assert!(err.contains("short.bin: 3078 bytes is not a whole number of 3073-byte"), "{err}");
        let err = format!("{:#}", read_split(dir.path(), &["missing.bin"]).unwrap_err());
        assert!(err.contains("missing.bin"), "{err}");
    }
}
