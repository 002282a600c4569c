//! The negative ELBO: reconstruction term summed over pixels plus beta * KL, per batch; and
//! the statistics it fills over an epoch or a split.

use crate::models::{Forward, Likelihood, Posterior};
use crate::perceptual::Lpips;
use tch::{Device, Kind, Tensor};

/// How the KL term enters the minimised loss; the reported KL is always the true one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlWeight {
    /// 1 is the ELBO; below 1 favours reconstruction, above 1 disentanglement (beta-VAE).
    pub beta: f64,
    /// Nats per latent dimension (averaged over the batch) below which KL is not penalised
    /// (Kingma et al. 2016), so dimensions are not pushed to collapse early. 0: off.
    pub free_bits: f64,
}

impl KlWeight {
    /// The plain negative ELBO.
    pub const ELBO: KlWeight = KlWeight { beta: 1.0, free_bits: 0.0 };
}

/// The perceptual term of the pixel losses (`--perceptual-weight`): LPIPS between the images
/// and their reconstructions (in [-1, 1]), times `weight`, counted once per pixel as latent
/// diffusion's `LPIPSWithDiscriminator` adds it to every pixel's reconstruction loss.
#[derive(Clone, Copy)]
pub struct Perceptual<'a> {
    pub lpips: &'a Lpips,
    pub weight: f64,
    /// What the LPIPS network computes in: the model's precision.
    pub kind: Kind,
}

/// Batch means of the bound's terms, each a scalar tensor (still on the device).
pub struct Elbo {
    /// reconstruction + beta * kl (kl with free bits, if any), and whatever terms were added:
    /// what is minimised.
    pub loss: Tensor,
    pub reconstruction: Tensor,
    pub kl: Tensor,
    /// The pixel term as minimised: the reconstruction, plus the perceptual term, divided by
    /// the learned variance where there is one. The adversarial weight balances against it.
    pub nll: Tensor,
    /// beta * the penalised KL.
    pub kl_penalty: Tensor,
    /// The mean LPIPS distance, with a perceptual term.
    pub lpips: Option<Tensor>,
}

impl Elbo {
    pub fn new(likelihood: Likelihood, out: &Forward, x: &Tensor, weight: KlWeight) -> Self {
        Self::from_terms(likelihood.reconstruction_nll(&out.likelihood_params, x), &out.posterior, weight)
    }

    fn from_terms(reconstruction: Tensor, posterior: &Posterior, weight: KlWeight) -> Self {
        let kl_dims = posterior.kl_per_dimension();
        let kl = kl_dims.sum_dim_intlist(-1, false, None);
        let penalised = if weight.free_bits > 0.0 {
            kl_dims.mean_dim(0, false, None).clamp_min(weight.free_bits).sum(None)
        } else {
            kl.mean(None)
        };
        let nll = reconstruction.mean(None);
        let kl_penalty = penalised * weight.beta;
        Self {
            loss: &nll + &kl_penalty,
            reconstruction: nll.shallow_clone(),
            nll,
            kl: kl.mean(None),
            kl_penalty,
            lpips: None,
        }
    }

    /// Adds the perceptual term, if any, to what is minimised. The reported reconstruction
    /// stays the pixel loss.
    pub fn with_perceptual(mut self, term: Option<Perceptual>, out: &Forward, x: &Tensor) -> Self {
        if let Some(p) = term {
            let pixels: i64 = x.size()[1..].iter().product();
            let distance = p.lpips.distance(&(x * 2.0 - 1.0), &out.likelihood_params, p.kind).mean(None);
            // A new tensor, not `+=`: the reconstruction shares the pixel term's storage.
            self.nll = &self.nll + &distance * (p.weight * pixels as f64);
            self.loss = &self.nll + &self.kl_penalty;
            self.lpips = Some(distance);
        }
        self
    }

    /// Divides the pixel term by exp(`logvar`) and adds `logvar` for each of the `pixels`
    /// (latent diffusion's learned scalar variance: a Laplace or Gaussian scale, in effect).
    pub fn with_logvar(mut self, logvar: &Tensor, pixels: i64) -> Self {
        self.nll = &self.nll * (-logvar).exp() + logvar * pixels as f64;
        self.loss = &self.nll + &self.kl_penalty;
        self
    }

    /// `[loss, reconstruction, kl]` as one detached tensor, to accumulate without a host sync.
    pub fn stacked(&self) -> Tensor {
        Tensor::stack(&[&self.loss, &self.reconstruction, &self.kl], 0).detach()
    }
}

/// The statistics of the sharpness terms (perceptual and adversarial) that training logs
/// beside the bound's, in this order: latent diffusion's names for what a GAN is tuned by.
pub const SHARPNESS: [&str; 7] =
    ["lpips", "g_loss", "d_weight", "d_loss", "logits_real", "logits_fake", "logvar"];

/// Means over an epoch or a split, in nats per image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub loss: f64,
    pub reconstruction: f64,
    pub kl: f64,
    /// The [`SHARPNESS`] statistics, in training runs with a perceptual or adversarial term.
    pub sharpness: Option<[f64; SHARPNESS.len()]>,
}

impl Stats {
    /// From a device tensor of `[loss, reconstruction, kl]` sums over `count` images, followed
    /// by the [`SHARPNESS`] sums where there are any.
    pub fn from_sums(sums: &Tensor, count: usize) -> Self {
        let v = Vec::<f64>::try_from(sums.to_kind(Kind::Double).to_device(Device::Cpu)).expect("sums");
        let n = count.max(1) as f64;
        let means: Vec<f64> = v.iter().map(|s| s / n).collect();
        Self::from_values(&means).expect("3 sums, then the sharpness ones where there are any")
    }

    /// `[loss, reconstruction, kl]`, then the [`SHARPNESS`] statistics where there are any.
    pub fn values(&self) -> Vec<f64> {
        let mut v = vec![self.loss, self.reconstruction, self.kl];
        v.extend(self.sharpness.iter().flatten());
        v
    }

    /// The inverse of [`Stats::values`]; `None` for any other length.
    pub fn from_values(v: &[f64]) -> Option<Self> {
        let sharpness = match v.len() {
            3 => None,
            n if n == 3 + SHARPNESS.len() => Some(std::array::from_fn(|i| v[3 + i])),
            _ => return None,
        };
        Some(Self { loss: v[0], reconstruction: v[1], kl: v[2], sharpness })
    }

    /// The sharpness statistics by name.
    pub fn sharpness_named(&self) -> Vec<(&'static str, f64)> {
        self.sharpness.map_or(Vec::new(), |values| SHARPNESS.iter().copied().zip(values).collect())
    }

    /// What the console shows of the sharpness terms that were on: the mean LPIPS distance
    /// with `perceptual`, the GAN's losses and adaptive weight with `adversarial`; empty when
    /// neither.
    pub fn sharpness_summary(&self, perceptual: bool, adversarial: bool) -> String {
        let shown = |name: &str| match name {
            "lpips" => perceptual,
            "g_loss" | "d_loss" | "d_weight" => adversarial,
            _ => false,
        };
        let parts: Vec<String> = self
            .sharpness_named()
            .into_iter()
            .filter(|(name, _)| shown(name))
            .map(|(name, value)| format!("{name} {value:.4}"))
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!(" [{}]", parts.join(", "))
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} (recon {:.2}, kl {:.2})", self.loss, self.reconstruction, self.kl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bernoulli_nll_is_the_summed_cross_entropy() {
        let logits = Tensor::from_slice(&[0.0f32, 2.0, -1.0, 0.5]).view([1, 1, 2, 2]);
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([1, 1, 2, 2]);
        let nll = Likelihood::Bernoulli.reconstruction_nll(&logits, &x).double_value(&[0]);
        let sigmoid = |l: f64| 1.0 / (1.0 + (-l).exp());
        let expected =
            -(sigmoid(0.0).ln() + (1.0 - sigmoid(2.0)).ln() + (1.0 - sigmoid(-1.0)).ln() + sigmoid(0.5).ln());
        assert!((nll - expected).abs() < 1e-5, "{nll} vs {expected}");
    }

    #[test]
    fn gaussian_nll_is_the_summed_squared_error_and_beta_weights_kl() {
        let mean = Tensor::full([2, 1, 2, 2], 0.5, (Kind::Float, Device::Cpu));
        let x = Tensor::ones([2, 1, 2, 2], (Kind::Float, Device::Cpu));
        let nll = Likelihood::Gaussian.reconstruction_nll(&mean, &x);
        assert_eq!(Vec::<f32>::try_from(&nll).unwrap(), vec![1.0, 1.0]);
        let q = Posterior {
            mean: Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
            logvar: Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
        };
        let elbo = Elbo::from_terms(nll.shallow_clone(), &q, KlWeight { beta: 2.0, free_bits: 0.0 });
        // KL = 0.5 * 3 * 1 = 1.5 per example; loss = 1 + 2 * 1.5.
        assert_eq!(Vec::<f32>::try_from(elbo.stacked()).unwrap(), vec![4.0, 1.0, 1.5]);
        // Free bits: each dimension's 0.5 nats counts as 0.8; the reported KL stays 1.5.
        let free = Elbo::from_terms(nll, &q, KlWeight { beta: 1.0, free_bits: 0.8 });
        let got = Vec::<f32>::try_from(free.stacked()).unwrap();
        assert!((got[0] - 3.4).abs() < 1e-6 && got[2] == 1.5, "{got:?}");
    }

    #[test]
    fn the_console_shows_the_sharpness_terms_that_were_on() {
        // [loss, reconstruction, kl] then lpips, g_loss, d_weight, d_loss, logits, logvar.
        let sums = Tensor::from_slice(&[9.0f64, 6.0, 3.0, 0.3, -0.6, 1.5, 1.8, 0.0, 0.0, 0.0]);
        let stats = Stats::from_sums(&sums, 3);
        assert_eq!(stats.sharpness_summary(true, false), " [lpips 0.1000]");
        assert_eq!(
            stats.sharpness_summary(true, true),
            " [lpips 0.1000, g_loss -0.2000, d_weight 0.5000, d_loss 0.6000]"
        );
        assert_eq!(stats.sharpness_summary(false, false), "");
        let plain = Stats::from_sums(&Tensor::from_slice(&[9.0f64, 6.0, 3.0]), 3);
        assert_eq!(plain.sharpness_summary(true, true), "");
    }
}
