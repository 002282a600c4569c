//! The bound on a split, in nats per image and bits per dimension: the negative ELBO, and the
//! importance-weighted bound (IWAE, Burda et al. 2016), a tighter estimate of -log p(x):
//! log p(x) >= E[log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)], z_k ~ q(z|x); and the quality of
//! the reconstructions (PSNR, SSIM, LPIPS), which training also measures after every epoch.

use crate::config::{BestBy, TrainConfig};
use crate::data::{Binarize, Dataset, Loader};
use crate::fid::{Inception, ReconstructionMoments};
use crate::loss::{Elbo, KlWeight, Perceptual, Stats};
use crate::models::{in_passes, Forward, Model, Posterior};
use crate::perceptual::Lpips;
use crate::rng::{seed_torch, Stream};
use crate::ssim;
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

/// How a pass over a split measures it: the bound as `weight` makes it (the ELBO for
/// [`KlWeight::ELBO`]), with the perceptual term where the run has one, its noise fixed by
/// `seed`; and the networks for the reconstructions' LPIPS in [`Quality`] and their rFID,
/// if any.
#[derive(Clone, Copy)]
pub struct Measure<'a> {
    pub seed: u64,
    pub weight: KlWeight,
    pub perceptual: Option<Perceptual<'a>>,
    pub lpips: Option<&'a Lpips>,
    pub fid: Option<&'a Inception>,
}

/// A split's sums from [`split_sums`], doubles on the device, ready to be summed over ranks.
pub struct SplitSums {
    /// `[loss, reconstruction, kl]` over images.
    pub bound: Tensor,
    /// The posterior means' per-dimension sums and sums of squares, `[2, D]`.
    pub moments: Tensor,
    /// `[psnr, ssim, l1, mse, lpips]` over images.
    pub quality: Tensor,
    /// The Inception features' moments of the images and reconstructions, where measured.
    pub fid: Option<ReconstructionMoments>,
}

/// A split's figures: the bound's means, the reconstructions' quality and rFID, and the
/// posterior means' moments (for the active dimensions).
pub struct SplitFigures {
    pub stats: Stats,
    pub quality: Quality,
    pub rfid: Option<f64>,
    pub moments: Tensor,
}

impl SplitFigures {
    /// The figure `by` names; `None` where it was not measured (config validation sees to
    /// it that a run's is).
    pub fn figure(&self, by: BestBy) -> Option<f64> {
        match by {
            BestBy::Loss => Some(self.stats.loss),
            BestBy::Psnr => Some(self.quality.psnr_db),
            BestBy::Ssim => self.quality.ssim,
            BestBy::Lpips => self.quality.lpips,
            BestBy::Rfid => self.rfid,
        }
    }
}

impl SplitSums {
    /// Every sum, for an all-reduce over the ranks that each took a share of the split.
    pub fn tensors(&self) -> Vec<Tensor> {
        let own = [&self.bound, &self.moments, &self.quality].map(Tensor::shallow_clone);
        own.into_iter().chain(self.fid.iter().flat_map(ReconstructionMoments::sums)).collect()
    }

    /// The means over the `data` these sums were taken on (every rank's share of it), LPIPS
    /// among them where a network measured it, and rFID where one did.
    pub fn figures(self, data: &Dataset, with_lpips: bool) -> Result<SplitFigures> {
        let n = data.len();
        let [_, h, w] = data.image_shape();
        Ok(SplitFigures {
            stats: Stats::from_sums(&self.bound, n),
            quality: Quality::from_sums(&self.quality, n, ssim::applies(h, w), with_lpips),
            rfid: self.fid.as_ref().map(ReconstructionMoments::rfid).transpose()?,
            moments: self.moments,
        })
    }
}

/// One pass over this rank's share of `data`: evaluation batch i is rank i mod `world`'s,
/// its noise fixed by (seed, i), so the sums over ranks are one process's. Each batch is
/// encoded once, for the bound at a sample and the reconstruction at the posterior mean.
/// `keep_going` is asked before each round of `world` batches (as often on every rank, so it
/// may be a collective); `None` when it said no.
pub fn split_sums(
    model: &dyn Model,
    data: &Dataset,
    measure: Measure,
    device: Device,
    (rank, world): (usize, usize),
    keep_going: &mut dyn FnMut() -> Result<bool>,
) -> Result<Option<SplitSums>> {
    let loader = Loader::new(data, device, ELBO_BATCH);
    let double = |shape: &[i64]| Tensor::zeros(shape, (Kind::Double, device));
    let mut sums = SplitSums {
        bound: double(&[3]),
        moments: double(&[2, model.latent_dim()]),
        quality: double(&[5]),
        fid: measure.fid.map(|_| ReconstructionMoments::new(device)),
    };
    let [_, h, w] = data.image_shape();
    let with_ssim = ssim::applies(h, w);
    let mut batches = loader.shard(rank, world);
    for _round in 0..loader.steps_per_epoch().div_ceil(world as u64) {
        if !keep_going()? {
            return Ok(None);
        }
        // The last round may have no batch for this rank.
        let Some((i, x)) = batches.next() else { continue };
        let x = x?;
        seed_torch(measure.seed, Stream::Eval, i as u64);
        tch::no_grad(|| {
            // As `model.forward` draws it (the same noise), in passes.
            let posterior = model.encode_in_passes(&x);
            let z = posterior.sample();
            let likelihood_params = in_passes(&z, [h, w], |_, z| model.decode(z));
            let out = Forward { posterior, likelihood_params };
            let stacked = Elbo::new(model.likelihood(), &out, &x, measure.weight)
                .with_perceptual(measure.perceptual, &out, &x)
                .stacked();
            sums.bound += stacked.to_kind(Kind::Double) * x.size()[0] as f64;
            let mean = out.posterior.mean.to_kind(Kind::Double);
            sums.moments += Tensor::stack(
                &[mean.sum_dim_intlist(0, false, None), mean.square().sum_dim_intlist(0, false, None)],
                0,
            );
            let x_hat = in_passes(&out.posterior.mean, [h, w], |_, mean| model.decode_mean(mean));
            sums.quality += quality_sums(&x, &x_hat, with_ssim, measure.lpips);
            if let (Some(moments), Some(net)) = (sums.fid.as_mut(), measure.fid) {
                moments.add(net, &x, &x_hat);
            }
        });
    }
    Ok(Some(sums))
}

/// Images whose latents set the scale factor.
pub const SCALE_IMAGES: usize = 2048;

/// Moments of latents z ~ q(z|x) per latent channel (of a vector latent, per dimension) over
/// the first [`SCALE_IMAGES`] images of a split (whole evaluation batches; their noise fixed by
/// the seed): what a diffusion model's latent scale is chosen by and checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentMoments {
    sum: Vec<f64>,
    squares: Vec<f64>,
    /// Elements per channel.
    count: f64,
}

impl LatentMoments {
    pub fn measure(model: &dyn Model, data: &Dataset, seed: u64, device: Device) -> Result<Self> {
        let mut moments = Self::new(model.latent_channels() as usize);
        let loader = Loader::new(data, device, ELBO_BATCH);
        for (i, x) in loader.sequential().enumerate().take(SCALE_IMAGES.div_ceil(ELBO_BATCH)) {
            let x = x?;
            seed_torch(seed, Stream::Eval, i as u64);
            moments.add(&tch::no_grad(|| model.encode_in_passes(&x).sample()))?;
        }
        anyhow::ensure!(moments.count > 1.0, "no images to measure the latents' scale on");
        Ok(moments)
    }

    fn new(channels: usize) -> Self {
        Self { sum: vec![0.0; channels], squares: vec![0.0; channels], count: 0.0 }
    }

    /// Adds flat latents `[N, C x H x W]` (channel-major, as the models give them).
    fn add(&mut self, z: &Tensor) -> Result<()> {
        let channels = self.sum.len() as i64;
        let z = z.to_kind(Kind::Double).view([z.size()[0], channels, -1]);
        let per_channel = |t: &Tensor| {
            Vec::<f64>::try_from(t.sum_dim_intlist([0, 2].as_slice(), false, None).to_device(Device::Cpu))
        };
        for (total, new) in
            [(&mut self.sum, per_channel(&z)?), (&mut self.squares, per_channel(&z.square())?)]
        {
            total.iter_mut().zip(new).for_each(|(t, n)| *t += n);
        }
        self.count += (z.numel() as i64 / channels) as f64;
        Ok(())
    }

    /// Mean and (sample) standard deviation of all the latents' elements.
    pub fn overall(&self) -> (f64, f64) {
        let channels = self.sum.len() as f64;
        moments(self.sum.iter().sum(), self.squares.iter().sum(), self.count * channels)
    }

    /// Mean and standard deviation of each channel.
    pub fn per_channel(&self) -> Vec<(f64, f64)> {
        self.sum.iter().zip(&self.squares).map(|(&s, &q)| moments(s, q, self.count)).collect()
    }

    /// diffusers' `scaling_factor`: 1 / the standard deviation, so that a diffusion model sees
    /// latents of unit variance.
    pub fn scaling_factor(&self) -> f64 {
        1.0 / self.overall().1
    }

    /// The moments of the latents mapped channel by channel to `(z - offset[c]) * factor[c]`,
    /// as a diffusion model takes them.
    pub fn mapped(&self, offset: &[f64], factor: &[f64]) -> Self {
        let n = self.count;
        let (sum, squares) = (0..self.sum.len())
            .map(|c| {
                let (s, q, o, f) = (self.sum[c], self.squares[c], offset[c], factor[c]);
                (f * (s - n * o), f * f * (q - 2.0 * o * s + n * o * o))
            })
            .unzip();
        Self { sum, squares, count: n }
    }
}

impl LatentMoments {
    /// The figures `vae eval` reports.
    pub fn summary(&self) -> LatentSummary {
        let (mean, std) = self.overall();
        let (channel_mean, channel_std) = self.per_channel().into_iter().unzip();
        LatentSummary { mean, std, channel_mean, channel_std }
    }
}

/// Mean and standard deviation of latents, of all elements and of each channel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatentSummary {
    pub mean: f64,
    pub std: f64,
    pub channel_mean: Vec<f64>,
    pub channel_std: Vec<f64>,
}

/// Mean and sample standard deviation from a sum, a sum of squares and a count.
fn moments(sum: f64, squares: f64, count: f64) -> (f64, f64) {
    let mean = sum / count;
    (mean, ((squares - sum * mean) / (count - 1.0)).max(0.0).sqrt())
}

/// log p(x|z) + log p(z) - log q(z|x) for each noise draw: `eps` is `[K, B, D]`, the result
/// `[K, B]`. Since z = mean + std * eps, (z - mean) / std is eps itself.
pub fn log_weights(model: &dyn Model, x: &Tensor, posterior: &Posterior, eps: &Tensor) -> Tensor {
    let [k, b, _]: [i64; 3] = eps.size().try_into().expect("eps is [K, B, D]");
    let z = &posterior.mean + (&posterior.logvar * 0.5).exp() * eps;
    // Decoded in passes, each against its images: row r of the K x B decodes is image r mod B.
    let size = x.size();
    let nll = in_passes(&z.flatten(0, 1), [size[2], size[3]], |first, z| {
        let rows = Tensor::arange_start(first, first + z.size()[0], (Kind::Int64, x.device())).remainder(b);
        model.likelihood().reconstruction_nll(&model.decode(z), &x.index_select(0, &rows))
    });
    let log_px = -nll.view([k, b]);
    let log_2pi = (2.0 * PI).ln();
    let log_pz = (z.square() + log_2pi).sum_dim_intlist(-1, false, None) * -0.5;
    let log_qz = (eps.square() + &posterior.logvar + log_2pi).sum_dim_intlist(-1, false, None) * -0.5;
    log_px + log_pz - log_qz
}

/// -log p(x) estimated with `k` importance samples, one value per image of `x`; the samples
/// are drawn from libtorch's generator `chunk` at a time.
pub fn iwae_nll(model: &dyn Model, x: &Tensor, k: i64, chunk: i64) -> Tensor {
    let posterior = model.encode_in_passes(x);
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
    /// The Fréchet Inception Distance between the split's images and their reconstructions
    /// at the posterior mean, when the Inception's weights were given.
    pub rfid: Option<f64>,
    /// 1 / the standard deviation of the latents of the training split (diffusers'
    /// `scaling_factor`, which `export-diffusers` writes).
    pub scaling_factor: Option<f64>,
    /// The latents of the training split as a diffusion model takes them, by the scale the
    /// model's diffusers folder declares (or the one its run started from): a diffusion model
    /// trained on them expects a mean near 0 and a standard deviation near 1.
    pub scaled_latents: Option<LatentSummary>,
    pub seconds: f64,
}

/// How close the reconstructions at the posterior mean are to the images, in [0, 1] pixels:
/// the figures people report for autoencoders (means over images).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Quality {
    /// 10 log10(1 / MSE) per image.
    pub psnr_db: f64,
    /// scikit-image's SSIM (see [`ssim::ssim`]); `None` for images under 11 pixels a side.
    pub ssim: Option<f64>,
    /// Mean absolute error per pixel.
    pub l1: f64,
    /// Mean squared error per pixel.
    pub mse: f64,
    /// Mean LPIPS distance (VGG, v0.1) between images and reconstructions, when its weights
    /// were given.
    pub lpips: Option<f64>,
}

/// The batch's `[psnr, ssim, l1, mse, lpips]` sums over images `x` and their
/// reconstructions `x_hat` (SSIM and LPIPS 0 where not measured).
fn quality_sums(x: &Tensor, x_hat: &Tensor, with_ssim: bool, lpips: Option<&Lpips>) -> Tensor {
    let diff = (x_hat - x).to_kind(Kind::Double).flatten(1, -1);
    let mse = diff.square().mean_dim(1, false, Kind::Double);
    let psnr = mse.clamp_min(1e-10).log10() * -10.0;
    let ssim = if with_ssim { ssim::ssim(x_hat, x) } else { mse.zeros_like() };
    let l1 = diff.abs().mean_dim(1, false, Kind::Double);
    let perceptual = match lpips {
        Some(net) => net.distance(&(x * 2.0 - 1.0), &(x_hat * 2.0 - 1.0), Kind::Float).to_kind(Kind::Double),
        None => mse.zeros_like(),
    };
    Tensor::stack(&[psnr, ssim, l1, mse, perceptual], 1).sum_dim_intlist(0, false, None)
}

impl Quality {
    /// The means of [`quality_sums`]' sums over `count` images.
    fn from_sums(sums: &Tensor, count: usize, with_ssim: bool, with_lpips: bool) -> Self {
        let n = count.max(1) as f64;
        let v = Vec::<f64>::try_from(sums.to_device(Device::Cpu)).expect("five sums");
        Quality {
            psnr_db: v[0] / n,
            ssim: with_ssim.then(|| v[1] / n),
            l1: v[2] / n,
            mse: v[3] / n,
            lpips: with_lpips.then(|| v[4] / n),
        }
    }
}

impl std::fmt::Display for Quality {
    /// The console's form: PSNR, and SSIM and LPIPS where measured.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PSNR {:.2} dB", self.psnr_db)?;
        if let Some(ssim) = self.ssim {
            write!(f, "  SSIM {ssim:.4}")?;
        }
        if let Some(lpips) = self.lpips {
            write!(f, "  LPIPS {lpips:.4}")?;
        }
        Ok(())
    }
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
    /// The FID Inception, for the reconstructions' rFID.
    pub fid: Option<&'a Inception>,
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
    let Options { iw_samples, lpips, fid } = options;
    let started = std::time::Instant::now();
    let density = model.likelihood().is_density();
    // The bound where the likelihood is a density; otherwise the loss the run minimised.
    let weight = if density { KlWeight::ELBO } else { KlWeight { beta: cfg.beta, free_bits: 0.0 } };
    let measure = Measure { seed: cfg.seed, weight, perceptual: cfg.perceptual(lpips)?, lpips, fid };
    let sums = split_sums(model, data, measure, device, (0, 1), &mut || Ok(true))?;
    let SplitFigures { stats: elbo, quality, rfid, .. } =
        sums.expect("an evaluation that always goes on").figures(data, lpips.is_some())?;
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
        quality,
        rfid,
        scaling_factor: None,
        scaled_latents: None,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The moments of mapped latents, computed from the moments alone, are those of the mapped
    /// latents themselves; per channel, as diffusers' per-channel latents_mean / latents_std.
    #[test]
    fn mapped_moments_are_the_moments_of_the_mapped_latents() {
        tch::manual_seed(0);
        let z = Tensor::randn([6, 2, 3, 3], tch::kind::DOUBLE_CPU) * 2.0 + 0.5;
        let (offset, factor) = ([0.25, -1.0], [0.5, 3.0]);
        let mapped = (&z - Tensor::from_slice(&offset).view([1, 2, 1, 1]))
            * Tensor::from_slice(&factor).view([1, 2, 1, 1]);
        let moments = |z: &Tensor| {
            let mut m = LatentMoments::new(2);
            m.add(&z.flatten(1, -1)).unwrap();
            m
        };
        let (ours, direct) = (moments(&z).mapped(&offset, &factor).summary(), moments(&mapped).summary());
        let values =
            |s: &LatentSummary| [vec![s.mean, s.std], s.channel_mean.clone(), s.channel_std.clone()].concat();
        for (a, b) in values(&ours).iter().zip(values(&direct)) {
            assert!((a - b).abs() < 1e-12, "{ours:?} vs {direct:?}");
        }
        // And the plain moments are torch's.
        let (mean, std) = moments(&z).overall();
        assert!((mean - z.mean(None).double_value(&[])).abs() < 1e-12);
        assert!((std - z.std(true).double_value(&[])).abs() < 1e-12);
        let channel_std = z.transpose(0, 1).flatten(1, -1).std_dim(1, true, false);
        assert!((moments(&z).per_channel()[1].1 - channel_std.double_value(&[1])).abs() < 1e-12);
    }
}
