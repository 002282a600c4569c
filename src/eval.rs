//! The bound on a split, in nats per image and bits per dimension: the negative ELBO, and the
//! importance-weighted bound (IWAE, Burda et al. 2016), a tighter estimate of -log p(x):
//! log p(x) >= E[log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)], z_k ~ q(z|x).

use crate::config::TrainConfig;
use crate::data::{Binarize, Dataset, Loader};
use crate::loss::{Elbo, KlWeight, Perceptual, Stats};
use crate::models::{Model, Posterior};
use crate::perceptual::Lpips;
use crate::rng::{seed_torch, Stream};
use anyhow::Result;
use serde::Serialize;
use std::f64::consts::{LN_2, PI};
use tch::{Device, Kind, Tensor};

/// Images per evaluation batch; their K samples are decoded in chunks of about
/// `DECODES_PER_PASS`, so memory stays bounded whatever K is.
const IMAGES_PER_BATCH: usize = 100;
const DECODES_PER_PASS: i64 = 5000;

/// The split as the model was trained on it: with `--binarize dynamic`, binarized once from
/// the seed, so every evaluation of a checkpoint sees the same pixels.
pub fn prepared(data: &Dataset, cfg: &TrainConfig) -> Dataset {
    match cfg.binarize {
        Binarize::Dynamic => data.binarized(cfg.seed),
        Binarize::None => data.shallow_clone(),
    }
}

/// Evaluation batches are fixed in size so the per-batch noise seeds, and hence the numbers,
/// do not depend on the training batch size.
const ELBO_BATCH: usize = 500;

/// The bound's terms over this rank's share of `data` (the loss as `weight` makes it: the
/// ELBO for [`KlWeight::ELBO`]): evaluation batch i is rank i mod `world`'s, its noise fixed
/// by (seed, i), so the sums over ranks are one process's. Returns the `[loss, reconstruction,
/// kl]` sums and the posterior means' per-dimension sums and sums of squares (`[2, D]`), all
/// doubles on the device, ready to be summed over ranks.
pub fn elbo_sums(
    model: &dyn Model,
    data: &Dataset,
    seed: u64,
    weight: KlWeight,
    perceptual: Option<Perceptual>,
    device: Device,
    (rank, world): (usize, usize),
) -> Result<(Tensor, Tensor)> {
    let loader = Loader::new(data, device, ELBO_BATCH);
    let mut sums = Tensor::zeros([3], (Kind::Double, device));
    let mut moments = Tensor::zeros([2, model.latent_dim()], (Kind::Double, device));
    for (i, x) in loader.shard(rank, world) {
        let x = x?;
        seed_torch(seed, Stream::Eval, i as u64);
        tch::no_grad(|| {
            let out = model.forward(&x);
            let stacked = Elbo::new(model.likelihood(), &out, &x, weight)
                .with_perceptual(perceptual, &out, &x)
                .stacked();
            sums += stacked.to_kind(Kind::Double) * x.size()[0] as f64;
            let mean = out.posterior.mean.to_kind(Kind::Double);
            moments += Tensor::stack(
                &[mean.sum_dim_intlist(0, false, None), mean.square().sum_dim_intlist(0, false, None)],
                0,
            );
        });
    }
    Ok((sums, moments))
}

/// Images whose latents set the scale factor.
pub const SCALE_IMAGES: usize = 2048;

/// diffusers' `scaling_factor`: 1 / the standard deviation of latents z ~ q(z|x) over the
/// first [`SCALE_IMAGES`] images of `data` (whole evaluation batches) (their noise fixed by the seed), so that a
/// diffusion model sees latents of unit variance.
pub fn latent_scale(model: &dyn Model, data: &Dataset, seed: u64, device: Device) -> Result<f64> {
    let loader = Loader::new(data, device, ELBO_BATCH);
    let (mut sum, mut squares, mut count) = (0.0, 0.0, 0.0);
    for (i, x) in loader.sequential().enumerate().take(SCALE_IMAGES.div_ceil(ELBO_BATCH)) {
        let x = x?;
        seed_torch(seed, Stream::Eval, i as u64);
        let z = tch::no_grad(|| model.encode(&x).sample()).to_kind(Kind::Double);
        sum += z.sum(None).double_value(&[]);
        squares += z.square().sum(None).double_value(&[]);
        count += z.numel() as f64;
    }
    anyhow::ensure!(count > 1.0, "no images to measure the latents' scale on");
    let variance = (squares - sum * sum / count) / (count - 1.0);
    Ok(1.0 / variance.sqrt())
}

/// log p(x|z) + log p(z) - log q(z|x) for each noise draw: `eps` is `[K, B, D]`, the result
/// `[K, B]`. Since z = mean + std * eps, (z - mean) / std is eps itself.
pub fn log_weights(model: &dyn Model, x: &Tensor, posterior: &Posterior, eps: &Tensor) -> Tensor {
    let [k, b, _]: [i64; 3] = eps.size().try_into().expect("eps is [K, B, D]");
    let z = &posterior.mean + (&posterior.logvar * 0.5).exp() * eps;
    let params = model.decode(&z.flatten(0, 1));
    let mut shape = vec![k];
    shape.extend(x.size());
    let targets = x.unsqueeze(0).expand(shape.as_slice(), false).flatten(0, 1);
    let log_px = -model.likelihood().reconstruction_nll(&params, &targets).view([k, b]);
    let log_2pi = (2.0 * PI).ln();
    let log_pz = (z.square() + log_2pi).sum_dim_intlist(-1, false, None) * -0.5;
    let log_qz = (eps.square() + &posterior.logvar + log_2pi).sum_dim_intlist(-1, false, None) * -0.5;
    log_px + log_pz - log_qz
}

/// -log p(x) estimated with `k` importance samples, one value per image of `x`; the samples
/// are drawn from libtorch's generator `chunk` at a time.
pub fn iwae_nll(model: &dyn Model, x: &Tensor, k: i64, chunk: i64) -> Tensor {
    let posterior = model.encode(x);
    let [b, d]: [i64; 2] = posterior.mean.size().try_into().expect("mean is [B, D]");
    let mut total: Option<Tensor> = None;
    for start in (0..k).step_by(chunk.max(1) as usize) {
        let n = chunk.min(k - start);
        let eps = Tensor::randn([n, b, d], (Kind::Float, x.device()));
        let lse = log_weights(model, x, &posterior, &eps).logsumexp([0], false);
        total = Some(match total {
            None => lse,
            Some(t) => Tensor::stack(&[t, lse], 0).logsumexp([0], false),
        });
    }
    -(total.expect("k >= 1") - (k as f64).ln())
}

/// What `vae eval` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub split: String,
    pub images: usize,
    /// Pixels times channels of one image: the D of bits per dimension.
    pub dimensions: i64,
    /// Whether the reconstruction term is a -log-likelihood, so that the bound and the IWAE are
    /// in nats (false for the L1 and L2 pixel losses, where they are losses and no IWAE is run).
    pub likelihood_is_density: bool,
    /// The negative ELBO; for the L1 and L2 losses, the training loss (reconstruction + beta
    /// times the KL) under the same name.
    pub negative_elbo: f64,
    pub reconstruction: f64,
    pub kl: f64,
    /// The KL per element of the latent.
    pub kl_per_latent_element: f64,
    pub elbo_bits_per_dim: Option<f64>,
    pub iw_samples: i64,
    pub iwae_nll: Option<f64>,
    pub iwae_bits_per_dim: Option<f64>,
    pub quality: Quality,
    /// 1 / the standard deviation of the latents of the training split (diffusers'
    /// `scaling_factor`, which `export-diffusers` writes).
    pub scaling_factor: Option<f64>,
    pub seconds: f64,
}

/// How close the reconstructions at the posterior mean are to the images, in [0, 1] pixels:
/// the figures people report for autoencoders (means over images).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Quality {
    /// 10 log10(1 / MSE) per image.
    pub psnr_db: f64,
    /// scikit-image's SSIM (see [`ssim`]); `None` for images under 11 pixels a side.
    pub ssim: Option<f64>,
    /// Mean absolute error per pixel.
    pub l1: f64,
    /// Mean squared error per pixel.
    pub mse: f64,
    /// Mean LPIPS distance (VGG, v0.1) between images and reconstructions, when its weights
    /// were given.
    pub lpips: Option<f64>,
}

/// SSIM's Gaussian window: sigma 1.5, truncated at 3.5 sigma (scipy's radius rule): 11 taps.
const SSIM_SIGMA: f64 = 1.5;
const SSIM_RADIUS: i64 = 5;

/// The structural similarity of each image pair of `a` and `b` (`[B, C, H, W]` in [0, 1]), as
/// scikit-image's `structural_similarity(a, b, data_range=1, gaussian_weights=True,
/// channel_axis=0)` computes it: local statistics under a Gaussian window with scipy's
/// `reflect` borders, sample covariance, the window's radius cropped from the map, channels
/// averaged. `[B]`, in double precision.
pub fn ssim(a: &Tensor, b: &Tensor) -> Tensor {
    let [n, c, h, w]: [i64; 4] = a.size().try_into().expect("images [B, C, H, W]");
    let r = SSIM_RADIUS;
    assert!(h > 2 * r && w > 2 * r, "SSIM needs images of at least {} pixels a side", 2 * r + 1);
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

/// [`Quality`] of the reconstructions at the posterior mean over `data`.
pub fn quality(model: &dyn Model, data: &Dataset, lpips: Option<&Lpips>, device: Device) -> Result<Quality> {
    let loader = Loader::new(data, device, ELBO_BATCH);
    let [_, h, w] = data.image_shape();
    let with_ssim = h > 2 * SSIM_RADIUS && w > 2 * SSIM_RADIUS;
    // Sums over images of [psnr, ssim, l1, mse, lpips].
    let mut sums = Tensor::zeros([5], (Kind::Double, device));
    for x in loader.sequential() {
        let x = x?;
        tch::no_grad(|| {
            let x_hat = model.reconstruct(&x);
            let diff = (&x_hat - &x).to_kind(Kind::Double).flatten(1, -1);
            let mse = diff.square().mean_dim(1, false, Kind::Double);
            let psnr = mse.clamp_min(1e-10).log10() * -10.0;
            let ssim = if with_ssim { ssim(&x_hat, &x) } else { mse.zeros_like() };
            let l1 = diff.abs().mean_dim(1, false, Kind::Double);
            let perceptual = match lpips {
                Some(net) => {
                    net.distance(&(&x * 2.0 - 1.0), &(&x_hat * 2.0 - 1.0), Kind::Float).to_kind(Kind::Double)
                }
                None => mse.zeros_like(),
            };
            sums += Tensor::stack(&[psnr, ssim, l1, mse, perceptual], 1).sum_dim_intlist(0, false, None);
        });
    }
    let n = data.len().max(1) as f64;
    let v = Vec::<f64>::try_from(sums.to_device(Device::Cpu)).expect("five sums");
    Ok(Quality {
        psnr_db: v[0] / n,
        ssim: with_ssim.then(|| v[1] / n),
        l1: v[2] / n,
        mse: v[3] / n,
        lpips: lpips.map(|_| v[4] / n),
    })
}

pub fn bits_per_dim(nats: f64, dimensions: i64) -> f64 {
    nats / (dimensions as f64 * LN_2)
}

/// What [`evaluate`] computes beyond the bound and the pixel metrics.
#[derive(Clone, Copy)]
pub struct Options<'a> {
    /// Importance samples per image for the IWAE bound (0: none).
    pub iw_samples: i64,
    /// The LPIPS network: the perceptual term of a run that trained with one, and the
    /// reconstructions' LPIPS.
    pub lpips: Option<&'a Lpips>,
}

/// The negative ELBO (noise fixed per batch by the seed, as in training's evaluation), the
/// reconstructions' quality, then the IWAE bound with `iw_samples` samples when it is above 0
/// and the likelihood is a density. The scale factor is left to the caller, who has the
/// training split.
pub fn evaluate(
    model: &dyn Model,
    cfg: &TrainConfig,
    data: &Dataset,
    split: &str,
    options: Options,
    device: Device,
    progress: &indicatif::ProgressBar,
) -> Result<Report> {
    let Options { iw_samples, lpips } = options;
    let started = std::time::Instant::now();
    let density = model.likelihood().is_density();
    // The bound where the likelihood is a density; otherwise the loss the run minimised.
    let weight = if density { KlWeight::ELBO } else { KlWeight { beta: cfg.beta, free_bits: 0.0 } };
    let perceptual = cfg.perceptual(lpips)?;
    let (sums, _) = elbo_sums(model, data, cfg.seed, weight, perceptual, device, (0, 1))?;
    let elbo = Stats::from_sums(&sums, data.len());
    let [c, h, w] = data.image_shape();
    let dimensions = c * h * w;
    let iwae_nll = if iw_samples > 0 && density {
        let loader = Loader::new(data, device, IMAGES_PER_BATCH);
        let chunk = (DECODES_PER_PASS / IMAGES_PER_BATCH as i64).max(1);
        let mut sum = Tensor::zeros([], (Kind::Double, device));
        for (i, x) in loader.sequential().enumerate() {
            let x = x?;
            seed_torch(cfg.seed, Stream::Iwae, i as u64);
            sum += tch::no_grad(|| iwae_nll(model, &x, iw_samples, chunk)).to_kind(Kind::Double).sum(None);
            progress.inc(x.size()[0] as u64);
        }
        Some(sum.double_value(&[]) / data.len().max(1) as f64)
    } else {
        None
    };
    Ok(Report {
        split: split.to_string(),
        images: data.len(),
        dimensions,
        likelihood_is_density: density,
        negative_elbo: elbo.loss,
        reconstruction: elbo.reconstruction,
        kl: elbo.kl,
        kl_per_latent_element: elbo.kl / model.latent_dim() as f64,
        elbo_bits_per_dim: density.then(|| bits_per_dim(elbo.loss, dimensions)),
        iw_samples: if density { iw_samples } else { 0 },
        iwae_nll,
        iwae_bits_per_dim: iwae_nll.map(|n| bits_per_dim(n, dimensions)),
        quality: quality(model, data, lpips, device)?,
        scaling_factor: None,
        seconds: started.elapsed().as_secs_f64(),
    })
}
