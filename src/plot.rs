//! `loss.png`: the train and test loss per epoch from `metrics.csv`, drawn with nothing but
//! the `image` crate (a tiny bitmap font labels the axes).

use anyhow::{ensure, Context, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

pub const LOSS_PLOT: &str = "loss.png";

const WIDTH: u32 = 640;
const HEIGHT: u32 = 400;
const MARGIN: i64 = 48;
pub const TRAIN_COLOR: Rgb<u8> = Rgb([31, 119, 180]);
pub const TEST_COLOR: Rgb<u8> = Rgb([255, 127, 14]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// One curve: (x, y) points joined in order.
pub struct Series {
    pub color: Rgb<u8>,
    pub points: Vec<(f64, f64)>,
}

/// Draws the curves on shared axes; the y range spans all points, and a swatch per curve
/// sits top right, in order.
pub fn save_lines(path: &Path, series: &[Series]) -> Result<()> {
    let points: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
    ensure!(!points.is_empty(), "nothing to plot");
    let (x0, x1) = bounds(points.iter().map(|p| p.0));
    let (y0, y1) = bounds(points.iter().map(|p| p.1));
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    let (w, h) = (WIDTH as i64 - 2 * MARGIN, HEIGHT as i64 - 2 * MARGIN);
    let px = |x: f64| MARGIN + ((x - x0) / (x1 - x0) * w as f64).round() as i64;
    let py = |y: f64| MARGIN + h - ((y - y0) / (y1 - y0) * h as f64).round() as i64;
    for i in 0..=4 {
        let y = MARGIN + h * i / 4;
        line(&mut img, (MARGIN, y), (MARGIN + w, y), GRID);
        text(&mut img, 4, y - 2, &format!("{:.1}", y1 - (y1 - y0) * i as f64 / 4.0), AXIS);
    }
    line(&mut img, (MARGIN, MARGIN), (MARGIN, MARGIN + h), AXIS);
    line(&mut img, (MARGIN, MARGIN + h), (MARGIN + w, MARGIN + h), AXIS);
    text(&mut img, MARGIN, MARGIN + h + 8, &format!("{x0}"), AXIS);
    let last = format!("{x1}");
    text(&mut img, MARGIN + w - 4 * last.len() as i64, MARGIN + h + 8, &last, AXIS);
    for (i, Series { color, points: pts }) in series.iter().enumerate() {
        for pair in pts.windows(2) {
            line(&mut img, (px(pair[0].0), py(pair[0].1)), (px(pair[1].0), py(pair[1].1)), *color);
        }
        for &(x, y) in pts {
            for d in -1..=1 {
                line(&mut img, (px(x) - 1, py(y) + d), (px(x) + 1, py(y) + d), *color);
            }
        }
        // Legend: a colour swatch per series, top right.
        let ly = 12 + 10 * i as i64;
        for d in 0..3 {
            line(&mut img, (WIDTH as i64 - 40, ly + d), (WIDTH as i64 - 20, ly + d), *color);
        }
    }
    img.save(path).with_context(|| format!("writing {}", path.display()))
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi - lo < 1e-9 {
        (lo - 1.0, hi + 1.0)
    } else {
        (lo, hi)
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, color: Rgb<u8>) {
    if (0..img.width() as i64).contains(&x) && (0..img.height() as i64).contains(&y) {
        img.put_pixel(x as u32, y as u32, color);
    }
}

/// Bresenham's line.
fn line(img: &mut RgbImage, (mut x, mut y): (i64, i64), (x1, y1): (i64, i64), color: Rgb<u8>) {
    let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
    let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x, y, color);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Digits 0-9 in a 3x5 bitmap font, one row of 3 bits per entry.
const DIGITS: [[u8; 5]; 10] = [
    [7, 5, 5, 5, 7],
    [2, 6, 2, 2, 7],
    [7, 1, 7, 4, 7],
    [7, 1, 7, 1, 7],
    [5, 5, 7, 1, 1],
    [7, 4, 7, 1, 7],
    [7, 4, 7, 5, 7],
    [7, 1, 1, 1, 1],
    [7, 5, 7, 5, 7],
    [7, 5, 7, 1, 7],
];

fn glyph(c: char) -> Option<[u8; 5]> {
    match c {
        '.' => Some([0, 0, 0, 0, 2]),
        '-' => Some([0, 0, 7, 0, 0]),
        _ => c.to_digit(10).map(|d| DIGITS[d as usize]),
    }
}

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, color: Rgb<u8>) {
    for (i, rows) in s.chars().filter_map(glyph).enumerate() {
        for (r, bits) in rows.iter().enumerate() {
            for b in 0..3 {
                if bits & (4 >> b) != 0 {
                    put(img, x + 4 * i as i64 + b, y + r as i64, color);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_land_inside_the_axes_in_their_colours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train = vec![(1.0, 10.0), (2.0, 6.0), (3.0, 5.0)];
        let test = vec![(1.0, 9.0), (2.0, 7.0), (3.0, 6.5)];
        let series =
            [Series { color: TRAIN_COLOR, points: train }, Series { color: TEST_COLOR, points: test }];
        save_lines(&path, &series).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        // The first train point is the top-left corner of the plot area (max y, min x).
        assert_eq!(*img.get_pixel(MARGIN as u32, MARGIN as u32), TRAIN_COLOR);
        let count = |c: Rgb<u8>| img.pixels().filter(|p| **p == c).count();
        assert!(count(TRAIN_COLOR) > 500 && count(TEST_COLOR) > 500);
    }
}
