//! `loss.png`: the train and test loss per epoch from `metrics.csv`, with axis titles, tick
//! labels and a legend set in DejaVu Sans (embedded, so no system font is needed), drawn
//! with the `image` crate.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use anyhow::{ensure, Context, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

const WIDTH: u32 = 640;
const HEIGHT: u32 = 400;
/// Room for the y tick labels and title on the left, the x ones below.
const LEFT: i64 = 80;
const RIGHT: i64 = 20;
const TOP: i64 = 20;
const BOTTOM: i64 = 56;
const TICK_PX: f32 = 14.0;
const TITLE_PX: f32 = 15.0;
pub const TRAIN_COLOR: Rgb<u8> = Rgb([31, 119, 180]);
pub const TEST_COLOR: Rgb<u8> = Rgb([255, 127, 14]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// DejaVu Sans (Bitstream Vera license, see src/fonts/LICENSE).
static FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");

/// One curve: (x, y) points joined in order, named in the legend.
pub struct Series {
    pub label: &'static str,
    pub color: Rgb<u8>,
    pub points: Vec<(f64, f64)>,
}

/// Draws the curves on shared axes titled `x_title` and `y_title`; the y range spans all
/// points, and the legend names each curve, top right.
pub fn save_lines(path: &Path, series: &[Series], x_title: &str, y_title: &str) -> Result<()> {
    let points: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
    ensure!(!points.is_empty(), "nothing to plot");
    let font = FontRef::try_from_slice(FONT).expect("the embedded font parses");
    let (x0, x1) = bounds(points.iter().map(|p| p.0));
    let (y_ticks, y_step) = nice_ticks(bounds(points.iter().map(|p| p.1)));
    let (y0, y1) = (y_ticks[0], *y_ticks.last().expect("at least two ticks"));
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    let (w, h) = (WIDTH as i64 - LEFT - RIGHT, HEIGHT as i64 - TOP - BOTTOM);
    let px = |x: f64| LEFT + ((x - x0) / (x1 - x0) * w as f64).round() as i64;
    let py = |y: f64| TOP + h - ((y - y0) / (y1 - y0) * h as f64).round() as i64;
    let y_decimals = decimals(y_step);
    for &tick in &y_ticks {
        let y = py(tick);
        line(&mut img, (LEFT, y), (LEFT + w, y), GRID);
        let label = format!("{tick:.y_decimals$}");
        let width = text_width(&font, TICK_PX, &label);
        text(&mut img, &font, TICK_PX, LEFT - 8 - width, y - 8, &label, AXIS);
    }
    for x in x_ticks(x0, x1) {
        let label = format!("{x}");
        line(&mut img, (px(x), TOP + h), (px(x), TOP + h + 5), AXIS);
        text(
            &mut img,
            &font,
            TICK_PX,
            px(x) - text_width(&font, TICK_PX, &label) / 2,
            TOP + h + 8,
            &label,
            AXIS,
        );
    }
    line(&mut img, (LEFT, TOP), (LEFT, TOP + h), AXIS);
    line(&mut img, (LEFT, TOP + h), (LEFT + w, TOP + h), AXIS);
    let x_width = text_width(&font, TITLE_PX, x_title);
    text(&mut img, &font, TITLE_PX, LEFT + w / 2 - x_width / 2, HEIGHT as i64 - 26, x_title, AXIS);
    vertical_text(&mut img, &font, TITLE_PX, 8, TOP + h / 2, y_title, AXIS);
    for (i, Series { label, color, points: pts }) in series.iter().enumerate() {
        for pair in pts.windows(2) {
            thick_line(&mut img, (px(pair[0].0), py(pair[0].1)), (px(pair[1].0), py(pair[1].1)), *color);
        }
        for &(x, y) in pts {
            for d in -2..=2 {
                line(&mut img, (px(x) - 2, py(y) + d), (px(x) + 2, py(y) + d), *color);
            }
        }
        // Legend, top right: a swatch and the curve's name.
        let ly = TOP + 12 + 20 * i as i64;
        let lx = LEFT + w - 100;
        for d in -1..=1 {
            line(&mut img, (lx, ly + d), (lx + 28, ly + d), *color);
        }
        text(&mut img, &font, TICK_PX, lx + 36, ly - 9, label, AXIS);
    }
    img.save(path).with_context(|| format!("writing {}", path.display()))
}

/// Ticks at multiples of 1, 2, 2.5 or 5 times a power of ten, at most 8, spanning `lo..hi`;
/// and their step.
fn nice_ticks((lo, hi): (f64, f64)) -> (Vec<f64>, f64) {
    let magnitude = 10f64.powf(((hi - lo) / 8.0).log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| ((hi / s).ceil() - (lo / s).floor()) <= 8.0)
        .unwrap_or(10.0 * magnitude);
    let (first, last) = ((lo / step).floor() as i64, (hi / step).ceil() as i64);
    ((first..=last).map(|i| i as f64 * step).collect(), step)
}

/// Digits after the point that show multiples of `step` exactly.
fn decimals(step: f64) -> usize {
    (0..6)
        .find(|&d| {
            let scaled = step * 10f64.powi(d as i32);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(6)
}

/// Whole-number x ticks (epochs), at most about 10.
fn x_ticks(x0: f64, x1: f64) -> Vec<f64> {
    let span = (x1 - x0).max(1.0);
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
        .into_iter()
        .find(|s| span / s <= 10.0)
        .unwrap_or(span / 10.0);
    let first = (x0 / step).ceil() * step;
    (0..).map(|i| first + step * i as f64).take_while(|&x| x <= x1 + 1e-9).collect()
}

fn text_width(font: &FontRef, px: f32, s: &str) -> i64 {
    let scaled = font.as_scaled(PxScale::from(px));
    s.chars().map(|c| scaled.h_advance(scaled.glyph_id(c))).sum::<f32>().round() as i64
}

/// Draws `s` with its top-left corner at (x, y), blending coverage into the background.
fn text(img: &mut RgbImage, font: &FontRef, px: f32, x: i64, y: i64, s: &str, color: Rgb<u8>) {
    draw_glyphs(font, px, s, |gx, gy, coverage| blend(img, x + gx, y + gy, color, coverage));
}

/// `s` turned a quarter anticlockwise, read bottom to top, centred on `y_center`.
fn vertical_text(
    img: &mut RgbImage,
    font: &FontRef,
    px: f32,
    x: i64,
    y_center: i64,
    s: &str,
    color: Rgb<u8>,
) {
    let y0 = y_center + text_width(font, px, s) / 2;
    draw_glyphs(font, px, s, |gx, gy, coverage| blend(img, x + gy, y0 - gx, color, coverage));
}

/// Calls `plot(x, y, coverage)` for each pixel of `s` laid out from (0, 0) at the top left.
fn draw_glyphs(font: &FontRef, px: f32, s: &str, mut plot: impl FnMut(i64, i64, f32)) {
    let scaled = font.as_scaled(PxScale::from(px));
    let mut caret = 0.0f32;
    for c in s.chars() {
        let id = scaled.glyph_id(c);
        let glyph = id.with_scale_and_position(PxScale::from(px), ab_glyph::point(caret, scaled.ascent()));
        caret += scaled.h_advance(id);
        if let Some(outline) = font.outline_glyph(glyph) {
            let b = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                plot(b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64, coverage)
            });
        }
    }
}

fn blend(img: &mut RgbImage, x: i64, y: i64, color: Rgb<u8>, coverage: f32) {
    if (0..img.width() as i64).contains(&x) && (0..img.height() as i64).contains(&y) {
        let p = img.get_pixel_mut(x as u32, y as u32);
        for (dst, src) in p.0.iter_mut().zip(color.0) {
            *dst = (*dst as f32 * (1.0 - coverage) + src as f32 * coverage).round() as u8;
        }
    }
}

fn thick_line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), color: Rgb<u8>) {
    for d in [-1, 0, 1] {
        line(img, (a.0, a.1 + d), (b.0, b.1 + d), color);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_land_inside_the_axes_in_their_colours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train = vec![(1.0, 10.0), (2.0, 6.0), (3.0, 5.0)];
        let test = vec![(1.0, 9.0), (2.0, 7.0), (3.0, 6.5)];
        let series = [
            Series { label: "train", color: TRAIN_COLOR, points: train },
            Series { label: "test", color: TEST_COLOR, points: test },
        ];
        save_lines(&path, &series, "epoch", "loss").unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        // The first train point, (1, 10), is the top-left corner of the plot area: the y axis
        // runs over whole ticks, 5 to 10.
        assert_eq!(*img.get_pixel(LEFT as u32, TOP as u32), TRAIN_COLOR);
        let count = |c: Rgb<u8>| img.pixels().filter(|p| **p == c).count();
        assert!(count(TRAIN_COLOR) > 500 && count(TEST_COLOR) > 500);
        // Text is drawn: dark pixels left of the y axis (tick labels, title) and below the x axis.
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (x0..x1)
                .flat_map(|x| (y0..y1).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0[0] < 128)
                .count()
        };
        assert!(dark(0, LEFT as u32 - 2, 0, HEIGHT) > 60, "y labels");
        assert!(dark(0, WIDTH, (HEIGHT as i64 - BOTTOM + 6) as u32, HEIGHT) > 40, "x labels");
    }

    #[test]
    fn ticks_are_readable_numbers() {
        assert_eq!(x_ticks(1.0, 3.0), vec![1.0, 2.0, 3.0]);
        assert_eq!(x_ticks(1.0, 40.0), vec![5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0]);
        assert_eq!(nice_ticks((5.0, 10.0)), (vec![5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 1.0));
        let (ticks, step) = nice_ticks((238.97, 257.71));
        assert_eq!((ticks[0], *ticks.last().unwrap(), step), (235.0, 260.0, 5.0));
        assert_eq!((decimals(25.0), decimals(2.5), decimals(0.25)), (0, 1, 2));
    }
}
