//! The bound on a split, in nats per image and bits per dimension: the negative ELBO, and the
//! importance-weighted bound (IWAE, Burda et al. 2016), a tighter estimate of -log p(x):
//! log p(x) >= E[log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x)], z_k ~ q(z|x).

use crate::config::TrainConfig;
use crate::data::{Binarize, Dataset, Loader};
use crate::loss::{Elbo, KlWeight, Stats};
use crate::models::{Model, Posterior};
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
            let stacked = Elbo::new(model.likelihood(), &out, &x, weight).stacked();
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
    pub negative_elbo: f64,
    pub reconstruction: f64,
    pub kl: f64,
    pub elbo_bits_per_dim: f64,
    pub iw_samples: i64,
    pub iwae_nll: Option<f64>,
    pub iwae_bits_per_dim: Option<f64>,
    pub seconds: f64,
}

pub fn bits_per_dim(nats: f64, dimensions: i64) -> f64 {
    nats / (dimensions as f64 * LN_2)
}

/// The negative ELBO (noise fixed per batch by the seed, as in training's evaluation), then
/// the IWAE bound with `iw_samples` samples when it is above 0.
pub fn evaluate(
    model: &dyn Model,
    cfg: &TrainConfig,
    data: &Dataset,
    split: &str,
    iw_samples: i64,
    device: Device,
    progress: &indicatif::ProgressBar,
) -> Result<Report> {
    let started = std::time::Instant::now();
    let (sums, _) = elbo_sums(model, data, cfg.seed, KlWeight::ELBO, device, (0, 1))?;
    let elbo = Stats::from_sums(&sums, data.len());
    let [c, h, w] = data.image_shape();
    let dimensions = c * h * w;
    let iwae_nll = if iw_samples > 0 {
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
        negative_elbo: elbo.loss,
        reconstruction: elbo.reconstruction,
        kl: elbo.kl,
        elbo_bits_per_dim: bits_per_dim(elbo.loss, dimensions),
        iw_samples,
        iwae_nll,
        iwae_bits_per_dim: iwae_nll.map(|n| bits_per_dim(n, dimensions)),
        seconds: started.elapsed().as_secs_f64(),
    })
}
