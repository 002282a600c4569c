//! Single image files (png, jpeg, bmp, webp) turned into model inputs: the shorter side
//! resized to the model's size, the centre cropped square, as 1 or 3 channels.

use anyhow::{ensure, Context, Result};
use image::imageops::{self, FilterType};
use std::path::Path;
use tch::Tensor;

/// `[channels, size, size]` u8 pixels of the file at `path`.
pub fn load(path: &Path, channels: i64, size: i64) -> Result<Tensor> {
    let decoded = decode(path, channels, size)?;
    Ok(Tensor::from_slice(&decoded.pixels).view([channels, size, size]))
}

/// An image at its own resolution, centre-cropped to sides that are multiples of `multiple`
/// (what a fully convolutional model takes): `[channels, H, W]` u8.
pub fn load_native(path: &Path, channels: i64, multiple: u32) -> Result<Tensor> {
    ensure!(channels == 1 || channels == 3, "images must have 1 or 3 channels, found {channels}");
    let img = open(path)?;
    let (w, h) = (img.width() / multiple * multiple, img.height() / multiple * multiple);
    ensure!(
        w > 0 && h > 0,
        "{}: {}x{} is smaller than the model's {multiple}-pixel downsampling",
        path.display(),
        img.width(),
        img.height()
    );
    let img = img.crop_imm((img.width() - w) / 2, (img.height() - h) / 2, w, h);
    let hwc = if channels == 1 { img.to_luma8().into_raw() } else { img.to_rgb8().into_raw() };
    let (c, h, w) = (channels, h as i64, w as i64);
    Ok(Tensor::from_slice(&hwc).view([h, w, c]).permute([2, 0, 1]).contiguous())
}

/// The image file at `path`; a folder is named as one (`--input photos/`), which the image
/// decoder would call a file of unknown format.
fn open(path: &Path) -> Result<image::DynamicImage> {
    ensure!(!path.is_dir(), "{} is a folder; name the image files in it", path.display());
    image::open(path).with_context(|| format!("{}: cannot read the image", path.display()))
}

/// An image as the model reads it.
pub struct Decoded {
    /// `channels * size * size` bytes, channel-major.
    pub pixels: Vec<u8>,
    /// The shorter side was below `size`, so the image was enlarged.
    pub upscaled: bool,
}

pub fn decode(path: &Path, channels: i64, size: i64) -> Result<Decoded> {
    ensure!(channels == 1 || channels == 3, "images must have 1 or 3 channels, found {channels}");
    let img = open(path)?;
    let (w, h) = (img.width(), img.height());
    ensure!(w > 0 && h > 0, "{}: the image is empty", path.display());
    let size = size as u32;
    let upscaled = w.min(h) < size;
    // The shorter side becomes `size`; the longer keeps the aspect ratio.
    let scale = size as f64 / w.min(h) as f64;
    let (rw, rh) =
        (((w as f64 * scale).round() as u32).max(size), ((h as f64 * scale).round() as u32).max(size));
    let (x0, y0) = ((rw - size) / 2, (rh - size) / 2);
    let pixels: Vec<u8> = if channels == 1 {
        let resized = imageops::resize(&img.to_luma8(), rw, rh, FilterType::Triangle);
        imageops::crop_imm(&resized, x0, y0, size, size).to_image().into_raw()
    } else {
        let resized = imageops::resize(&img.to_rgb8(), rw, rh, FilterType::Triangle);
        let hwc = imageops::crop_imm(&resized, x0, y0, size, size).to_image().into_raw();
        // HWC as the image crate stores it, to the CHW the model reads.
        (0..3).flat_map(|c| hwc.iter().skip(c).step_by(3).copied().collect::<Vec<u8>>()).collect()
    };
    Ok(Decoded { pixels, upscaled })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_rgb_images_are_resized_cropped_and_laid_out_channel_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.png");
        // 80x40: left half red, right half blue; after resizing to 20 high, the centre 20x20
        // crop holds 10 columns of each.
        let img = image::RgbImage::from_fn(80, 40, |x, _| {
            if x < 40 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        img.save(&path).unwrap();
        let t = load(&path, 3, 20).unwrap();
        assert_eq!(t.size(), vec![3, 20, 20]);
        let at = |c: i64, x: i64| t.int64_value(&[c, 10, x]);
        assert_eq!((at(0, 2), at(2, 2)), (255, 0));
        assert_eq!((at(0, 17), at(2, 17)), (0, 255));
        let gray = load(&path, 1, 8).unwrap();
        assert_eq!(gray.size(), vec![1, 8, 8]);
        let err = format!("{:#}", load(&dir.path().join("missing.png"), 1, 8).unwrap_err());
        assert!(err.contains("missing.png: cannot read the image"), "{err}");
    }
}
