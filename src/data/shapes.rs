//! A procedural dataset of squares, ellipses and triangles, so a fresh machine can train
//! something meaningful without any file.

use crate::rng::SplitMix64;

/// Label of each shape class.
pub const CLASSES: [&str; 3] = ["square", "ellipse", "triangle"];

/// Side of the supersampling grid per pixel; 4x4 samples give smooth edges.
const SUPERSAMPLE: usize = 4;

/// One shape's placement, in units of the image side.
struct Shape {
    class: usize,
    cx: f64,
    cy: f64,
    scale: f64,
    aspect: f64,
    cos: f64,
    sin: f64,
    color: [f64; 3],
}

impl Shape {
    fn random(rng: &mut SplitMix64, channels: usize) -> Self {
        let class = rng.below(CLASSES.len() as u64) as usize;
        let scale = rng.uniform(0.2, 0.32);
        // Every class fits in a circle of radius 1.14 * scale, so the shape stays in frame.
        let margin = scale * 1.15;
        let angle = rng.uniform(0.0, std::f64::consts::TAU);
        let mut color = [1.0; 3];
        if channels == 3 {
            // Bright, saturated colours: one channel high, the others anywhere.
            color = [rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0)];
            color[rng.below(3) as usize] = 1.0;
        } else {
            color[0] = rng.uniform(0.75, 1.0);
        }
        Shape {
            class,
            cx: rng.uniform(margin, 1.0 - margin),
            cy: rng.uniform(margin, 1.0 - margin),
            scale,
            aspect: rng.uniform(0.6, 1.0),
            cos: angle.cos(),
            sin: angle.sin(),
            color,
        }
    }

    /// Whether the point (x, y), in units of the image side, lies inside the shape.
    fn contains(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = ((x - self.cx) / self.scale, (y - self.cy) / self.scale);
        let u = self.cos * dx + self.sin * dy;
        let v = (-self.sin * dx + self.cos * dy) / self.aspect;
        match self.class {
            0 => u.abs() <= 0.8 && v.abs() <= 0.8,
            1 => u * u + v * v <= 1.0,
            _ => {
                // Equilateral triangle inscribed in the unit circle, apex up.
                let s3 = 3f64.sqrt();
                v >= -0.5 && s3 * u - v >= -1.0 && -s3 * u - v >= -1.0
            }
        }
    }
}

/// Renders `count` images of `side` x `side` pixels with `channels` (1 or 3) channels as
/// u8 in NCHW order, with one label per image (an index into [`CLASSES`]).
pub fn generate(count: usize, side: usize, channels: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let plane = side * side;
    let mut pixels = vec![0u8; count * channels * plane];
    let mut labels = Vec::with_capacity(count);
    let mut rng = SplitMix64::new(seed);
    let step = 1.0 / (side * SUPERSAMPLE) as f64;
    for image in pixels.chunks_mut(channels * plane) {
        let shape = Shape::random(&mut rng, channels);
        labels.push(shape.class as u8);
        for py in 0..side {
            for px in 0..side {
                let mut hits = 0;
                for sy in 0..SUPERSAMPLE {
                    for sx in 0..SUPERSAMPLE {
                        let x = (px * SUPERSAMPLE + sx) as f64 * step + step / 2.0;
                        let y = (py * SUPERSAMPLE + sy) as f64 * step + step / 2.0;
                        hits += shape.contains(x, y) as usize;
                    }
                }
                let coverage = hits as f64 / (SUPERSAMPLE * SUPERSAMPLE) as f64;
                for c in 0..channels {
                    image[c * plane + py * side + px] = (coverage * shape.color[c] * 255.0).round() as u8;
                }
            }
        }
    }
    (pixels, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_deterministic_visible_and_varied() {
        let (a, labels) = generate(30, 28, 1, 5);
        let (b, _) = generate(30, 28, 1, 5);
        assert_eq!(a, b);
        assert_ne!(a, generate(30, 28, 1, 6).0);
        for (i, img) in a.chunks(28 * 28).enumerate() {
            let lit = img.iter().filter(|&&p| p > 128).count();
            // A shape covers a visible part of the image but never all of it.
            assert!((25..600).contains(&lit), "image {i} has {lit} lit pixels");
            // Corners stay background: shapes are kept inside the frame.
            assert_eq!(img[0], 0);
        }
        for class in 0..3u8 {
            assert!(labels.contains(&class), "class {class} never drawn");
        }
        let (rgb, _) = generate(4, 64, 3, 1);
        assert_eq!(rgb.len(), 4 * 3 * 64 * 64);
    }
}
