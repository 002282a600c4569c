//! The negative ELBO: reconstruction term summed over pixels plus beta * KL, per batch.

use crate::model::{Forward, Posterior};
use serde::{Deserialize, Serialize};
use tch::{Reduction, Tensor};

/// The decoder's distribution p(x|z) over each pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Likelihood {
    /// Bernoulli with logits: binary cross-entropy, exact in nats for binary data.
    Bernoulli,
    /// Gaussian in its mean-squared-error form: sum of (x - mean)^2, i.e. -log N(x; mean, 1/2)
    /// less the constant (D/2) log(pi).
    Gaussian,
}

impl Likelihood {
    /// -log p(x|z) summed over pixels: one value per example.
    pub fn reconstruction_nll(&self, params: &Tensor, x: &Tensor) -> Tensor {
        let per_pixel = match self {
            Likelihood::Bernoulli => {
                params.binary_cross_entropy_with_logits::<Tensor>(x, None, None, Reduction::None)
            }
            Likelihood::Gaussian => (params - x).square(),
        };
        per_pixel.flatten(1, -1).sum_dim_intlist(-1, false, None)
    }

    /// E[x|z] in [0, 1] from the decoder's output, for pictures.
    pub fn mean(&self, params: &Tensor) -> Tensor {
        match self {
            Likelihood::Bernoulli => params.sigmoid(),
            Likelihood::Gaussian => params.clamp(0.0, 1.0),
        }
    }
}

/// Batch means of the bound's terms, each a scalar tensor (still on the device).
pub struct Elbo {
    /// reconstruction + beta * kl: what is minimised.
    pub loss: Tensor,
    pub reconstruction: Tensor,
    pub kl: Tensor,
}

impl Elbo {
    pub fn new(likelihood: Likelihood, out: &Forward, x: &Tensor, beta: f64) -> Self {
        Self::from_terms(likelihood.reconstruction_nll(&out.likelihood_params, x), &out.posterior, beta)
    }

    fn from_terms(reconstruction: Tensor, posterior: &Posterior, beta: f64) -> Self {
        let kl = posterior.kl_to_standard_normal();
        let loss = (&reconstruction + &kl * beta).mean(None);
        Self { loss, reconstruction: reconstruction.mean(None), kl: kl.mean(None) }
    }

    /// `[loss, reconstruction, kl]` as one detached tensor, to accumulate without a host sync.
    pub fn stacked(&self) -> Tensor {
        Tensor::stack(&[&self.loss, &self.reconstruction, &self.kl], 0).detach()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

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
        let elbo = Elbo::from_terms(nll, &q, 2.0);
        // KL = 0.5 * 3 * 1 = 1.5 per example; loss = 1 + 2 * 1.5.
        assert_eq!(Vec::<f32>::try_from(elbo.stacked()).unwrap(), vec![4.0, 1.0, 1.5]);
    }
}
