//! The IDX format of MNIST and Fashion-MNIST, gzipped or raw.

use anyhow::{bail, ensure, Context, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

const IMAGES_MAGIC: u32 = 0x0803;
const LABELS_MAGIC: u32 = 0x0801;

/// Images as stored: `count` images of `rows` x `cols` u8 pixels, row-major.
#[derive(Debug)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

/// Finds `stem.gz` or `stem` in `dir`, preferring the compressed file Debian ships.
pub fn locate(dir: &Path, stem: &str) -> Result<PathBuf> {
    let gz = dir.join(format!("{stem}.gz"));
    let raw = dir.join(stem);
    if gz.is_file() {
        Ok(gz)
    } else if raw.is_file() {
        Ok(raw)
    } else {
        bail!("missing data file: neither {} nor {} exists", gz.display(), raw.display())
    }
}

/// Largest decompressed IDX file accepted, so a hostile gzip stream cannot exhaust memory
/// (Fashion-MNIST's train images are 47 MB).
const MAX_DECOMPRESSED: u64 = 4 << 30;

/// Reads a whole file, gunzipping it when it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(bytes.len() * 4);
        GzDecoder::new(bytes.as_slice())
            .take(MAX_DECOMPRESSED + 1)
            .read_to_end(&mut out)
            .with_context(|| format!("{}: corrupt gzip stream", path.display()))?;
        ensure!(
            out.len() as u64 <= MAX_DECOMPRESSED,
            "{}: decompresses to more than {} GiB, too large for an IDX file",
            path.display(),
            MAX_DECOMPRESSED >> 30
        );
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Parses the header: magic then `ndims` big-endian u32 sizes; returns the sizes and the body.
fn parse_header<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: u32,
    ndims: usize,
) -> Result<(Vec<usize>, &'a [u8])> {
    let header_len = 4 + 4 * ndims;
    let word = |i: usize| bytes.get(4 * i..4 * i + 4).map(|w| u32::from_be_bytes(w.try_into().unwrap()));
    let truncated = || {
        format!(
            "{}: truncated IDX header ({} bytes, expected at least {header_len})",
            path.display(),
            bytes.len()
        )
    };
    let found = word(0).with_context(truncated)?;
    ensure!(
        found == magic,
        "{}: not an IDX file of this kind (magic {found:#06x}, expected {magic:#06x})",
        path.display()
    );
    ensure!(bytes.len() >= header_len, truncated());
    let dims: Vec<usize> = (1..=ndims).map(|i| word(i).unwrap_or(0) as usize).collect();
    let body = &bytes[header_len..];
    // Checked in u128 so a hostile header cannot overflow the product.
    let expected: u128 = dims.iter().map(|&d| d as u128).product();
    ensure!(
        body.len() as u128 == expected,
        "{}: header promises {dims:?} = {expected} bytes of data, file holds {}",
        path.display(),
        body.len()
    );
    Ok((dims, body))
}

pub fn read_images(path: &Path) -> Result<IdxImages> {
    parse_images(path, &read_maybe_gz(path)?)
}

/// Images from the (decompressed) bytes of an IDX file; `path` names it in errors.
pub fn parse_images(path: &Path, bytes: &[u8]) -> Result<IdxImages> {
    let (dims, body) = parse_header(path, bytes, IMAGES_MAGIC, 3)?;
    ensure!(dims[1] > 0 && dims[2] > 0, "{}: images of size {}x{}", path.display(), dims[1], dims[2]);
    Ok(IdxImages { count: dims[0], rows: dims[1], cols: dims[2], pixels: body.to_vec() })
}

pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    parse_labels(path, &read_maybe_gz(path)?)
}

pub fn parse_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let (_, body) = parse_header(path, bytes, LABELS_MAGIC, 1)?;
    Ok(body.to_vec())
}

/// Serialises images in IDX form; tests and tools use it to make data files.
pub fn encode_images(count: usize, rows: usize, cols: usize, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + pixels.len());
    for word in [IMAGES_MAGIC, count as u32, rows as u32, cols as u32] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

/// Serialises labels in IDX form.
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    for word in [LABELS_MAGIC, labels.len() as u32] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.extend_from_slice(labels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn reads_raw_and_gzipped_images_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| i as u8).collect();
        let raw = dir.path().join("imgs");
        std::fs::write(&raw, encode_images(3, 4, 5, &pixels)).unwrap();
        let gz = dir.path().join("imgs.gz");
        std::fs::write(&gz, gzip(&encode_images(3, 4, 5, &pixels))).unwrap();
        for path in [&raw, &gz] {
            let imgs = read_images(path).unwrap();
            assert_eq!((imgs.count, imgs.rows, imgs.cols), (3, 4, 5));
            assert_eq!(imgs.pixels, pixels);
        }
        let labels = dir.path().join("labels.gz");
        std::fs::write(&labels, gzip(&encode_labels(&[1, 2, 9]))).unwrap();
        assert_eq!(read_labels(&labels).unwrap(), vec![1, 2, 9]);
    }

    #[test]
    fn malformed_files_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad");
        let check = |bytes: &[u8], needle: &str| {
            std::fs::write(&path, bytes).unwrap();
            let err = format!("{:#}", read_images(&path).unwrap_err());
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
            assert!(err.contains("bad"), "{err:?} does not name the file");
        };
        check(&[0, 0, 8], "truncated IDX header");
        check(&[0, 0, 8, 3, 0, 0, 0, 1], "truncated IDX header (8 bytes, expected at least 16)");
        check(&encode_labels(&[1, 2]), "magic 0x0801, expected 0x0803");
        let mut short = encode_images(2, 2, 2, &[0; 8]);
        short.pop();
        check(&short, "8 bytes of data, file holds 7");
        // A huge declared size must fail on the size check, not try to allocate.
        check(&encode_images(u32::MAX as usize, u32::MAX as usize, 9, &[]), "file holds 0");
        check(&[0x1f, 0x8b, 1, 2, 3], "corrupt gzip");
        assert!(format!("{:#}", locate(dir.path(), "nothing").unwrap_err()).contains("missing data file"));
    }
}
