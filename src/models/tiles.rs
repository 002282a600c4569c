//! Encoding and decoding in overlapping tiles, as diffusers' `AutoencoderKL.enable_tiling()`
//! does, so that a fully convolutional model takes an image or latent of any size in the
//! memory of one tile: a 4096 x 4096 photo, or the latents of a diffusion model sampling
//! above its training resolution. Each tile runs alone; where neighbours overlap (a quarter of
//! a tile) the later one is blended linearly into the earlier, in diffusers' order and
//! arithmetic, so the same weights give diffusers' tiled outputs. Tiling changes the result
//! (each tile sees only itself), which is why it is asked for, never implied.

use super::Model;
use tch::Tensor;

/// A tile's side in pixels, and the model's pixels per latent position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub pixels: i64,
    pub downscale: i64,
}

impl Tile {
    /// The side of a tile of the latent.
    pub fn latent(&self) -> i64 {
        self.pixels / self.downscale
    }

    /// Whether an image of `[h, w]` pixels fits in one tile, so runs untiled (as in diffusers).
    pub fn fits(&self, [h, w]: [i64; 2]) -> bool {
        h <= self.pixels && w <= self.pixels
    }
}

/// The posterior mean and log-variance of images `x` (`[N, C, H, W]`, sides multiples of
/// the downscale), `[N, c, H / d, W / d]` each, a tile at a time where `x` exceeds one.
pub fn encode(model: &dyn Model, x: &Tensor, tile: Tile) -> (Tensor, Tensor) {
    let channels = model.latent_channels();
    let moments = |x: &Tensor| {
        let q = model.encode(x);
        let [n, _, h, w] = x.size()[..] else { panic!("images are [N, C, H, W]") };
        Tensor::cat(&[q.mean, q.logvar], 1).view([n, 2 * channels, h / tile.downscale, w / tile.downscale])
    };
    let [.., h, w] = x.size()[..] else { panic!("images are [N, C, H, W]") };
    let both = if tile.fits([h, w]) { moments(x) } else { blended(x, [tile.pixels, tile.latent()], moments) };
    let [mean, logvar]: [Tensor; 2] = both.chunk(2, 1).try_into().expect("two halves");
    (mean, logvar)
}

/// The decoder's output at latents `z` (`[N, c, h, w]`), a tile at a time where `z` exceeds
/// one.
pub fn decode(model: &dyn Model, z: &Tensor, tile: Tile) -> Tensor {
    let [.., h, w] = z.size()[..] else { panic!("latents are [N, c, h, w]") };
    if tile.fits([h * tile.downscale, w * tile.downscale]) {
        model.decode(z)
    } else {
        blended(z, [tile.latent(), tile.pixels], |z| model.decode(z))
    }
}

/// `x`'s reconstruction in [0, 1] from its posterior mean, both halves tiled.
pub fn reconstruct(model: &dyn Model, x: &Tensor, tile: Tile) -> Tensor {
    model.likelihood().mean(&decode(model, &encode(model, x, tile).0, tile))
}

/// `f` over tiles of `x` of side `tile_in` starting every three quarters of a tile, whose
/// outputs (side `tile_out`) are blended over a quarter of a tile into their upper and left
/// neighbours and cut to three quarters before they are joined: diffusers'
/// `tiled_encode`/`tiled_decode`. A row of tiles is joined as soon as it is blended, and kept
/// whole only until the next one has blended into it: the output and two rows, not every
/// tile, are held.
fn blended(x: &Tensor, [tile_in, tile_out]: [i64; 2], f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let [.., h, w] = x.size()[..] else { panic!("tiles of [N, C, H, W]") };
    let (step, extent) = (tile_in * 3 / 4, tile_out / 4);
    let keep = tile_out - extent;
    let cut = |t: &Tensor, dim: usize| t.narrow(dim as i64, 0, keep.min(t.size()[dim]));
    let mut above: Vec<Tensor> = Vec::new();
    let mut strips = Vec::new();
    for i in (0..h).step_by(step as usize) {
        let mut row: Vec<Tensor> = Vec::new();
        for j in (0..w).step_by(step as usize) {
            let tile = f(&x.narrow(2, i, tile_in.min(h - i)).narrow(3, j, tile_in.min(w - j)));
            // In place, as diffusers: the tiles below and to the right blend with this one as
            // blended itself.
            if let Some(upper) = above.get(row.len()) {
                blend(upper, &tile, extent, 2);
            }
            if let Some(left) = row.last() {
                blend(left, &tile, extent, 3);
            }
            row.push(tile);
        }
        strips.push(Tensor::cat(&row.iter().map(|t| cut(&cut(t, 2), 3)).collect::<Vec<_>>(), 3));
        above = row;
    }
    Tensor::cat(&strips, 2)
}

/// The first `extent` lines of `b` along `dim` become `a`'s last ones weighted `1 - y / extent`
/// plus their own weighted `y / extent` (weights in double, as diffusers' Python floats).
fn blend(a: &Tensor, b: &Tensor, extent: i64, dim: i64) {
    let d = dim as usize;
    let extent = extent.min(a.size()[d]).min(b.size()[d]);
    let mut shape = vec![1; b.dim()];
    shape[d] = extent;
    // One weight per line along `dim`, broadcast over the rest.
    let weights =
        |w: Vec<f64>| Tensor::from_slice(&w).to_kind(b.kind()).to_device(b.device()).view(shape.as_slice());
    let own: Vec<f64> = (0..extent).map(|y| y as f64 / extent as f64).collect();
    let neighbour = weights(own.iter().map(|y| 1.0 - y).collect());
    let mixed =
        a.narrow(dim, a.size()[d] - extent, extent) * neighbour + b.narrow(dim, 0, extent) * weights(own);
    b.narrow(dim, 0, extent).copy_(&mixed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Tiles of a function that works pixel by pixel (or block by block) join into the
    /// function of the whole, whatever the size: the geometry (starts, cuts, blends of equal
    /// values) is right.
    #[test]
    fn tiles_of_a_local_function_join_into_the_whole() {
        let x = Tensor::rand([2, 3, 37, 53], (Kind::Float, tch::Device::Cpu));
        for size in [4, 8, 12, 16, 36, 64] {
            let pointwise = blended(&x, [size, size], |t| t * 2.0 + 1.0);
            assert!(pointwise.allclose(&(&x * 2.0 + 1.0), 1e-6, 1e-6, false), "pointwise, tiles of {size}");
            let up = |t: &Tensor| t.upsample_nearest2d([t.size()[2] * 2, t.size()[3] * 2], None, None);
            assert!(
                blended(&x, [size, size * 2], up).allclose(&up(&x), 1e-6, 1e-6, false),
                "upsampled, {size}"
            );
        }
        // Downsampling by 2 needs tiles that start on even pixels: sides of multiples of 8.
        let even = x.narrow(2, 0, 36).narrow(3, 0, 52);
        let down = |t: &Tensor| t.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
        for size in [8, 16, 24, 64] {
            let pooled = blended(&even, [size, size / 2], down);
            assert!(pooled.allclose(&down(&even), 1e-6, 1e-6, false), "pooled, {size}");
        }
    }

    /// The blend is linear across the overlap: a tile of ones meeting one of zeros.
    #[test]
    fn the_overlap_fades_from_one_tile_into_the_next() {
        let a = Tensor::ones([1, 1, 1, 8], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::zeros([1, 1, 1, 8], (Kind::Float, tch::Device::Cpu));
        blend(&a, &b, 4, 3);
        let row: Vec<f32> = b.flatten(0, -1).try_into().unwrap();
        assert_eq!(row, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0]);
    }
}
