//! Image grids as PNG files.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// Pixels of background between tiles and around the grid.
const BORDER: u32 = 2;
const BORDER_GRAY: u8 = 128;

/// Writes `images` (`[N, C, H, W]`, values in [0, 1], C = 1 or 3) as a grid of `cols` columns.
pub fn save_grid(path: &Path, images: &Tensor, cols: usize) -> Result<()> {
    let [n, c, h, w]: [i64; 4] =
        images.size().try_into().map_err(|_| anyhow::anyhow!("expected NCHW images"))?;
    ensure!(c == 1 || c == 3, "images have {c} channels, expected 1 or 3");
    ensure!(n > 0 && cols > 0, "nothing to draw");
    let (n, c, h, w) = (n as usize, c as usize, h as usize, w as usize);
    let rows = n.div_ceil(cols);
    let tile = |count: usize, side: usize| (count * (side + BORDER as usize) + BORDER as usize) as u32;
    let (width, height) = (tile(cols, w), tile(rows, h));
    let pixels = (images.to_device(tch::Device::Cpu).clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8);
    let pixels = Vec::<u8>::try_from(pixels.contiguous().flatten(0, -1))?;
    let mut canvas = image::RgbImage::from_pixel(width, height, image::Rgb([BORDER_GRAY; 3]));
    for (i, img) in pixels.chunks(c * h * w).enumerate() {
        let x0 = BORDER as usize + (i % cols) * (w + BORDER as usize);
        let y0 = BORDER as usize + (i / cols) * (h + BORDER as usize);
        for y in 0..h {
            for x in 0..w {
                let at = |ch: usize| img[ch * h * w + y * w + x];
                let rgb = if c == 1 { [at(0); 3] } else { [at(0), at(1), at(2)] };
                canvas.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(rgb));
            }
        }
    }
    canvas.save(path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_has_tiles_and_borders_where_expected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let images = Tensor::ones([5, 1, 3, 4], (Kind::Float, tch::Device::Cpu));
        save_grid(&path, &images, 2).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        // 2 columns of 4 px, 3 rows of 3 px, 2 px borders.
        assert_eq!(img.dimensions(), (2 * 6 + 2, 3 * 5 + 2));
        assert_eq!(img.get_pixel(2, 2).0, [255; 3]);
        assert_eq!(img.get_pixel(0, 0).0, [BORDER_GRAY; 3]);
        // The sixth tile is empty.
        assert_eq!(img.get_pixel(9, 13).0, [BORDER_GRAY; 3]);
    }
}
