//! The adversarial term of latent diffusion's autoencoder loss (`LPIPSWithDiscriminator`,
//! Esser et al. 2021): taming-transformers' PatchGAN discriminator, its hinge or vanilla loss,
//! the generator's loss, and the adaptive weight that balances it against the pixel term from
//! their gradient norms at the decoder's last layer.

use crate::models::{cast, run_conv, torch_init};
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// Where the discriminator's tensors live in a checkpoint: `discriminator.main.<i>.<name>`,
/// the state-dict names of taming's `NLayerDiscriminator` under this prefix.
pub const PREFIX: &str = "discriminator.";
/// The learned log-variance of the reconstruction term (ldm's `loss.logvar`).
pub const LOGVAR: &str = "loss.logvar";

/// The discriminator's objective (`--disc-loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DiscLoss {
    /// 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))): latent diffusion's choice.
    #[default]
    Hinge,
    /// 0.5 * (mean(softplus(-real)) + mean(softplus(fake))): the original GAN's cross-entropy.
    Vanilla,
}

impl DiscLoss {
    /// The discriminator's loss from its logits on real and reconstructed images.
    pub fn discriminator(self, real: &Tensor, fake: &Tensor) -> Tensor {
        let (r, f) = match self {
            DiscLoss::Hinge => ((-real + 1.0).relu(), (fake + 1.0).relu()),
            DiscLoss::Vanilla => ((-real).softplus(), fake.softplus()),
        };
        (r.mean(None) + f.mean(None)) * 0.5
    }
}

/// The generator's adversarial loss, whatever the discriminator's: -mean(logits on x̂).
pub fn generator_loss(fake: &Tensor) -> Tensor {
    -fake.mean(None)
}

/// The decoder's output with the adversarial term on, and the copy of it cut from the graph
/// that the loss terms are computed on, so that each is back-propagated to it once
/// ([`Cut::generator_step`]).
pub struct Cut {
    recon: Tensor,
    leaf: Tensor,
}

impl Cut {
    /// Puts the cut copy in place of the reconstruction `recon`.
    pub fn new(recon: &mut Tensor) -> Self {
        let leaf = recon.detach().set_requires_grad(true);
        let recon = std::mem::replace(recon, leaf.shallow_clone());
        Self { recon, leaf }
    }

    /// The generator's side of a step: `nll` (the pixel term) and `g_loss` were computed on
    /// the cut copy. Each goes backward once, to the images only: LPIPS' VGG16 and the
    /// discriminator run backward once a step, where latent diffusion's autograd.grad for the
    /// adaptive weight and its backward after run them twice (and compute discriminator
    /// weight gradients the generator never uses). Returns the adaptive weight, `weight` times
    /// ||d nll / d last|| / (||d g_loss / d last|| + 1e-4) clamped to [0, 1e4] (ldm's
    /// `calculate_adaptive_weight`, the same arithmetic: the images' gradients carried back
    /// through `last_layer`), and a loss whose gradients for the model and `logvar` are those
    /// of nll + d_weight * g_loss. `loss_scale` (float16) scales the backward passes as it
    /// scales the step's.
    pub fn generator_step(
        &self,
        nll: &Tensor,
        g_loss: &Tensor,
        logvar: &Tensor,
        last_layer: &Tensor,
        weight: f64,
        loss_scale: Option<f64>,
    ) -> (Tensor, Tensor) {
        let backward = |loss: &Tensor, inputs: &[&Tensor]| match loss_scale {
            None => Tensor::run_backward(&[loss], inputs, false, false),
            Some(scale) => {
                let grads = Tensor::run_backward(&[loss * scale], inputs, false, false);
                tch::no_grad(|| grads.into_iter().map(|g| g / scale).collect())
            }
        };
        let [nll_at_leaf, nll_at_logvar] =
            <[Tensor; 2]>::try_from(backward(nll, &[&self.leaf, logvar])).expect("two inputs, two gradients");
        let [g_at_leaf] = <[Tensor; 1]>::try_from(backward(g_loss, &[&self.leaf])).expect("one gradient");
        // d/d last of sum(recon * G) is G carried back through the last layer alone.
        let at_last = |at_leaf: &Tensor| {
            let carried = (&self.recon * at_leaf).sum(Kind::Float);
            Tensor::run_backward(&[carried], &[last_layer], true, false).pop().expect("one gradient")
        };
        let (nll_grad, g_grad) = (at_last(&nll_at_leaf), at_last(&g_at_leaf));
        let d_weight = tch::no_grad(|| (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4) * weight);
        let at_recon = tch::no_grad(|| nll_at_leaf + &d_weight * g_at_leaf);
        let minimised = (&self.recon * at_recon).sum(Kind::Float) + logvar * nll_at_logvar;
        (d_weight, minimised)
    }
}

/// Base channels, layers and kernel of taming's `NLayerDiscriminator` as latent diffusion
/// configures it.
const BASE: i64 = 64;
const LAYERS: usize = 3;
const KERNEL: i64 = 4;

/// The side of the discriminator's logit map for images of side `side` (each conv: kernel 4,
/// padding 1; strides 2, 2, 2, then 1, 1): at least 1 for a usable discriminator.
pub fn output_side(side: i64) -> i64 {
    let mut s = side;
    for stride in [2; LAYERS].into_iter().chain([1, 1]) {
        if s + 2 < KERNEL {
            return 0;
        }
        s = (s + 2 - KERNEL) / stride + 1;
    }
    s
}

/// The smallest image side the discriminator takes.
pub fn min_side() -> i64 {
    (1..).find(|&s| output_side(s) >= 1).expect("some side fits")
}

/// A stage: the conv, and the BatchNorm of every stage but the first and the last.
struct Stage {
    conv: nn::Conv2D,
    stride: i64,
    norm: Option<nn::BatchNorm>,
}

/// taming-transformers' `NLayerDiscriminator` (PatchGAN): one logit per overlapping patch.
/// Weights start as taming's `weights_init` sets them: convs N(0, 0.02), BatchNorm scales
/// N(1, 0.02) and shifts 0; the two conv biases keep PyTorch's default.
pub struct PatchGan {
    stages: Vec<Stage>,
}

impl PatchGan {
    /// Its tensors under `vs` (give it `root / "discriminator"`), for `in_channels` images.
    pub fn new(vs: nn::Path, in_channels: i64) -> Self {
        let main = &vs / "main";
        // (in, out, stride, norm) of each conv; the module index counts LeakyReLUs and norms.
        let mut plan = vec![(in_channels, BASE, 2, false)];
        let mut mult = 1;
        for n in 1..=LAYERS {
            let prev = mult;
            mult = (1 << n).min(8);
            plan.push((BASE * prev, BASE * mult, if n < LAYERS { 2 } else { 1 }, true));
        }
        plan.push((BASE * mult, 1, 1, false));
        let last = plan.len() - 1;
        let mut index = 0;
        let stages = plan
            .into_iter()
            .enumerate()
            .map(|(i, (cin, cout, stride, norm))| {
                let cfg = nn::ConvConfig {
                    stride,
                    padding: 1,
                    // taming's stages with a norm have no conv bias.
                    bias: !norm,
                    ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.02 },
                    bs_init: torch_init(cin * KERNEL * KERNEL),
                    ..Default::default()
                };
                let conv = nn::conv2d(&main / index, cin, cout, KERNEL, cfg);
                let norm = norm.then(|| {
                    let cfg = nn::BatchNormConfig {
                        ws_init: nn::Init::Randn { mean: 1.0, stdev: 0.02 },
                        bs_init: nn::Init::Const(0.0),
                        ..Default::default()
                    };
                    nn::batch_norm2d(&main / (index + 1), cout, cfg)
                });
                index += if i == last {
                    1
                } else if norm.is_some() {
                    3
                } else {
                    2
                };
                Stage { conv, stride, norm }
            })
            .collect();
        Self { stages }
    }

    /// The logits `[B, 1, h, w]` of images `x` in [-1, 1], in float32; BatchNorm in training
    /// mode (batch statistics; the running ones are updated), as latent diffusion runs it.
    /// The convs run in `kind`, the norms in float32.
    pub fn forward(&self, x: &Tensor, kind: Kind) -> Tensor {
        // The standard layout: channels-last (oneDNN's CPU path, 2-8% faster) rounds the convs
        // differently from PyTorch's, enough to move the adaptive weight by 2e-4 (LeakyReLU
        // masks flip), over the 1e-4 the test against latent diffusion's equations holds.
        let mut h = cast(x, kind).contiguous();
        let last = self.stages.len() - 1;
        for (i, stage) in self.stages.iter().enumerate() {
            h = run_conv(&stage.conv, &h, kind, stage.stride, 1);
            if let Some(norm) = &stage.norm {
                h = cast(&norm.forward_t(&h.to_kind(Kind::Float), true), kind);
            }
            if i < last {
                crate::native::leaky_relu_(&h, 0.2);
            }
        }
        h.to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The cut step's adaptive weight and gradients are those of ldm's autograd.grad at the
    /// last layer and backward of nll + d_weight * g, on a conv "decoder" with a pixel term
    /// that has a log-variance and a discriminator with weights; with a loss scale too.
    #[test]
    fn the_cut_step_gives_the_whole_losss_weight_and_gradients() {
        tch::manual_seed(0);
        let leaf = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let (h, last, logvar, critic) =
            (leaf(&[2, 4, 8, 8]), leaf(&[3, 4, 3, 3]), leaf(&[]), leaf(&[1, 3, 4, 4]));
        let target = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let decode = |h: &Tensor, w: &Tensor| h.tanh().conv2d(w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let nll = |x: &Tensor, lv: &Tensor| {
            ((x - &target).abs().sum(Kind::Float) + x.square().sum(Kind::Float)) * (-lv).exp() + lv * 192.0
        };
        let g_loss = |x: &Tensor, c: &Tensor| {
            -x.conv2d(c, None::<Tensor>, [2, 2], [1, 1], [1, 1], 1).leaky_relu().mean(Kind::Float)
        };
        // ldm's way.
        let recon = decode(&h, &last);
        let (n, g) = (nll(&recon, &logvar), g_loss(&recon, &critic));
        let at_last = |loss: &Tensor| Tensor::run_backward(&[loss], &[&last], true, false).pop().unwrap();
        let expected = (at_last(&n).norm() / (at_last(&g).norm() + 1e-4)).clamp(0.0, 1e4) * 0.5;
        (&n + &expected * &g).backward();
        let expected_grads: Vec<Tensor> = [&h, &last, &logvar].iter().map(|t| t.grad().copy()).collect();
        for scale in [None, Some(1024.0)] {
            let copies: Vec<Tensor> = [&h, &last, &logvar, &critic]
                .iter()
                .map(|t| t.detach().copy().set_requires_grad(true))
                .collect();
            let [h, last, logvar, critic] = <[Tensor; 4]>::try_from(copies).unwrap();
            let mut recon = decode(&h, &last);
            let cut = Cut::new(&mut recon);
            let (n, g) = (nll(&recon, &logvar), g_loss(&recon, &critic));
            let (d_weight, minimised) = cut.generator_step(&n, &g, &logvar, &last, 0.5, scale);
            assert!(d_weight.allclose(&expected, 1e-6, 0.0, false), "{scale:?}: {d_weight} vs {expected}");
            minimised.backward();
            for (ours, theirs) in [&h, &last, &logvar].iter().zip(&expected_grads) {
                let worst = (ours.grad() - theirs).abs().max().double_value(&[]);
                assert!(worst <= 1e-5 * theirs.abs().max().double_value(&[]), "{scale:?}: off by {worst}");
            }
            assert!(!critic.grad().defined(), "the generator's step computed discriminator weight gradients");
        }
    }

    #[test]
    fn names_shapes_and_logit_map_follow_taming() {
        let vs = nn::VarStore::new(Device::Cpu);
        let d = PatchGan::new(&vs.root() / "discriminator", 3);
        let mut names: Vec<(String, Vec<i64>)> =
            vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        names.sort();
        let expected = [
            ("main.0.bias", vec![64]),
            ("main.0.weight", vec![64, 3, 4, 4]),
            ("main.11.bias", vec![1]),
            ("main.11.weight", vec![1, 512, 4, 4]),
            ("main.2.weight", vec![128, 64, 4, 4]),
            ("main.3.bias", vec![128]),
            ("main.3.running_mean", vec![128]),
            ("main.3.running_var", vec![128]),
            ("main.3.weight", vec![128]),
            ("main.5.weight", vec![256, 128, 4, 4]),
            ("main.6.bias", vec![256]),
            ("main.6.running_mean", vec![256]),
            ("main.6.running_var", vec![256]),
            ("main.6.weight", vec![256]),
            ("main.8.weight", vec![512, 256, 4, 4]),
            ("main.9.bias", vec![512]),
            ("main.9.running_mean", vec![512]),
            ("main.9.running_var", vec![512]),
            ("main.9.weight", vec![512]),
        ];
        let expected: Vec<(String, Vec<i64>)> =
            expected.into_iter().map(|(n, s)| (format!("{PREFIX}{n}"), s)).collect();
        assert_eq!(names, expected);
        let std = vs.variables()["discriminator.main.5.weight"].std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.002, "N(0, 0.02) init, found std {std}");
        let x = Tensor::rand([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        assert_eq!(d.forward(&x, Kind::Float).size(), [2, 1, 6, 6]);
        assert_eq!(output_side(64), 6);
        assert_eq!(min_side(), 24);
        assert_eq!(output_side(23), 0);
    }

    #[test]
    fn losses_are_latent_diffusions() {
        let real = Tensor::from_slice(&[2.0f32, 0.5]);
        let fake = Tensor::from_slice(&[-0.5f32, 1.0]);
        // hinge: 0.5 * (mean(0, 0.5) + mean(0.5, 2)) = 0.5 * (0.25 + 1.25)
        let hinge = DiscLoss::Hinge.discriminator(&real, &fake).double_value(&[]);
        assert!((hinge - 0.75).abs() < 1e-6, "{hinge}");
        let sp = |v: f64| (1.0 + v.exp()).ln();
        let vanilla = DiscLoss::Vanilla.discriminator(&real, &fake).double_value(&[]);
        let expected = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2.0 + (sp(-0.5) + sp(1.0)) / 2.0);
        assert!((vanilla - expected).abs() < 1e-6, "{vanilla} vs {expected}");
        assert_eq!(generator_loss(&fake).double_value(&[]), -0.25);
    }
}
