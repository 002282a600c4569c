//! The structural similarity index (SSIM) of image pairs, as scikit-image computes it: an
//! image-quality figure of its own, which evaluation reports and `--best-by ssim` selects by.

use tch::{Kind, Tensor};

/// SSIM's Gaussian window: sigma 1.5, truncated at 3.5 sigma (scipy's radius rule): 11 taps.
const SSIM_SIGMA: f64 = 1.5;
const SSIM_RADIUS: i64 = 5;

/// The structural similarity of each image pair of `a` and `b` (`[B, C, H, W]` in [0, 1]), as
/// scikit-image's `structural_similarity(a, b, data_range=1, gaussian_weights=True,
/// channel_axis=0)` computes it: local statistics under a Gaussian window with scipy's
/// `reflect` borders, sample covariance, the window's radius cropped from the map, channels
/// averaged. `[B]`, in double precision.
pub fn ssim(a: &Tensor, b: &Tensor) -> Tensor {
    // A few images at a time: the double-precision blurs' buffers are several times the images'.
    let pairs = a.split(SSIM_IMAGES_PER_PASS, 0).into_iter().zip(b.split(SSIM_IMAGES_PER_PASS, 0));
    Tensor::cat(&pairs.map(|(a, b)| ssim_of(&a, &b)).collect::<Vec<_>>(), 0)
}

/// Images per pass of [`ssim`].
const SSIM_IMAGES_PER_PASS: i64 = 32;

fn ssim_of(a: &Tensor, b: &Tensor) -> Tensor {
    let [n, c, h, w]: [i64; 4] = a.size().try_into().expect("images [B, C, H, W]");
    let r = SSIM_RADIUS;
    assert!(applies(h, w), "SSIM needs images of at least {MIN_SIDE} pixels a side");
    let taps: Vec<f64> =
        (-r..=r).map(|i| (-0.5 * (i * i) as f64 / (SSIM_SIGMA * SSIM_SIGMA)).exp()).collect();
    let total: f64 = taps.iter().sum();
    let taps: Vec<f64> = taps.iter().map(|t| t / total).collect();
    let window = Tensor::from_slice(&taps).to_device(a.device());
    // scipy's `reflect` repeats the edge pixel: d c b a | a b c d | d c b a.
    let pad = |t: &Tensor, dim: i64, size: i64| {
        Tensor::cat(
            &[t.narrow(dim, 0, r).flip([dim]), t.shallow_clone(), t.narrow(dim, size - r, r).flip([dim])],
            dim,
        )
    };
    let blur = |t: &Tensor| {
        let t = pad(t, 3, w).conv2d(&window.view([1, 1, 1, -1]), None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        pad(&t, 2, h).conv2d(&window.view([1, 1, -1, 1]), None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
    };
    let x = a.to_kind(Kind::Double).reshape([n * c, 1, h, w]);
    let y = b.to_kind(Kind::Double).reshape([n * c, 1, h, w]);
    let (ux, uy) = (blur(&x), blur(&y));
    let taps_2d = ((2 * r + 1) * (2 * r + 1)) as f64;
    let cov_norm = taps_2d / (taps_2d - 1.0);
    let vx = (blur(&(&x * &x)) - &ux * &ux) * cov_norm;
    let vy = (blur(&(&y * &y)) - &uy * &uy) * cov_norm;
    let vxy = (blur(&(&x * &y)) - &ux * &uy) * cov_norm;
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let map =
        ((&ux * &uy * 2.0 + c1) * (vxy * 2.0 + c2)) / ((ux.square() + uy.square() + c1) * (vx + vy + c2));
    let cropped = map.narrow(2, r, h - 2 * r).narrow(3, r, w - 2 * r);
    cropped.mean_dim([1, 2, 3].as_slice(), false, Kind::Double).view([n, c]).mean_dim(1, false, Kind::Double)
}

/// The smallest image side SSIM's window fits in.
pub const MIN_SIDE: i64 = 2 * SSIM_RADIUS + 1;

/// Whether images of `h` x `w` are large enough for SSIM's window.
pub fn applies(h: i64, w: i64) -> bool {
    h >= MIN_SIDE && w >= MIN_SIDE
}
