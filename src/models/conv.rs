//! The convolutional VAE (`--arch conv`): a strided-conv encoder and a dense bottleneck
//! giving q(z|x) over a latent vector, a transposed-conv decoder giving p(x|z)'s parameters.

use super::{cast, run_linear as linear, Compute, Count, Likelihood, Model, Posterior};
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};

/// Architecture; stored in every checkpoint so a model can be rebuilt from its file alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvConfig {
    /// Side of the square input image, in pixels.
    pub image_size: i64,
    pub in_channels: i64,
    /// Output channels of each stride-2 conv stage; the decoder mirrors them.
    pub channels: Vec<i64>,
    pub hidden: i64,
    pub latent_dim: i64,
    pub likelihood: Likelihood,
}

impl Default for ConvConfig {
    fn default() -> Self {
        Self {
            image_size: 28,
            in_channels: 1,
            channels: vec![32, 64],
            hidden: 256,
            latent_dim: 16,
            likelihood: Likelihood::Bernoulli,
        }
    }
}

impl ConvConfig {
    /// Side of the feature map after the conv stack.
    pub fn bottleneck_side(&self) -> i64 {
        self.image_size >> self.channels.len()
    }

    /// Trainable parameters of the model this config builds, computed without building it
    /// (a saturating [`Count`], so any config from a file can be sized safely).
    pub fn parameter_count(&self) -> u128 {
        let (k, two) = (Count((KERNEL * KERNEL) as u128), Count(2));
        let mut chans = vec![Count::of(self.in_channels)];
        chans.extend(self.channels.iter().map(|&c| Count::of(c)));
        // Each conv and its mirrored transposed conv: weights, plus the bias of their outputs.
        let convs: Count = chans.windows(2).map(|w| two * w[0] * w[1] * k + w[0] + w[1]).sum();
        let side = Count::of(self.image_size.max(0) >> self.channels.len().min(62));
        let flat = chans.last().copied().unwrap_or_default() * side * side;
        let (hidden, latent) = (Count::of(self.hidden), Count::of(self.latent_dim));
        let linear = |i: Count, o: Count| i * o + o;
        (convs
            + linear(flat, hidden)
            + linear(hidden, two * latent)
            + linear(latent, hidden)
            + linear(hidden, flat))
        .0
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(!self.channels.is_empty(), "--conv-channels needs at least one conv stage");
        ensure!(
            self.channels.iter().all(|&c| c > 0),
            "--conv-channels must all be positive, found {:?}",
            self.channels
        );
        ensure!(self.hidden > 0, "--hidden must be positive, found {}", self.hidden);
        ensure!(self.latent_dim > 0, "--latent-dim must be positive, found {}", self.latent_dim);
        ensure!(
            self.in_channels == 1 || self.in_channels == 3,
            "images must have 1 or 3 channels, found {}",
            self.in_channels
        );
        ensure!(self.image_size > 0, "--image-size must be positive, found {}", self.image_size);
        let stride = 1i64 << self.channels.len().min(62);
        ensure!(
            self.image_size % stride == 0,
            "image size {} is not divisible by 2^{} = {stride} (one halving per conv stage in \
             --conv-channels {:?})",
            self.image_size,
            self.channels.len(),
            self.channels
        );
        Ok(())
    }
}

/// Every conv stage halves (and every transposed conv doubles) the side: kernel 4, stride 2,
/// padding 1.
const KERNEL: i64 = 4;
const STRIDE: i64 = 2;
const PADDING: i64 = 1;

fn conv(layer: &nn::Conv2D, x: &Tensor, kind: Kind) -> Tensor {
    super::run_conv(layer, x, kind, STRIDE, PADDING)
}

fn deconv(layer: &nn::ConvTranspose2D, x: &Tensor, kind: Kind) -> Tensor {
    let bias = layer.bs.as_ref().map(|b| cast(b, kind));
    x.conv_transpose2d(&cast(&layer.ws, kind), bias, [STRIDE; 2], [PADDING; 2], [0; 2], 1, [1; 2])
}

pub struct Encoder {
    convs: Vec<nn::Conv2D>,
    fc: nn::Linear,
    head: nn::Linear,
}

impl Encoder {
    pub fn new(vs: nn::Path, cfg: &ConvConfig) -> Self {
        let mut in_ch = cfg.in_channels;
        let convs = cfg
            .channels
            .iter()
            .enumerate()
            .map(|(i, &out_ch)| {
                let conv = super::conv2d(&vs / "convs" / i, in_ch, out_ch, KERNEL, STRIDE, PADDING);
                in_ch = out_ch;
                conv
            })
            .collect();
        let flat = in_ch * cfg.bottleneck_side().pow(2);
        let fc = super::linear(&vs / "fc", flat, cfg.hidden);
        let head = super::linear(&vs / "head", cfg.hidden, 2 * cfg.latent_dim);
        Self { convs, fc, head }
    }

    /// The posterior's parameters, in float32 whatever dtype the layers ran in.
    pub fn forward(&self, x: &Tensor, compute: Compute) -> Posterior {
        let kind = compute.kind;
        let h = self.convs.iter().fold(compute.feature_map(x), |h, layer| conv(layer, &h, kind).relu());
        let h = linear(&self.fc, &h.flatten(1, -1), kind).relu();
        let params = linear(&self.head, &h, kind).to_kind(Kind::Float);
        let [mean, logvar]: [Tensor; 2] = params.chunk(2, -1).try_into().expect("two halves");
        Posterior { mean, logvar }
    }
}

pub struct Decoder {
    fc: nn::Linear,
    proj: nn::Linear,
    deconvs: Vec<nn::ConvTranspose2D>,
    /// `[C, S, S]` of the feature map the transposed convs start from.
    start_shape: [i64; 3],
}

impl Decoder {
    pub fn new(vs: nn::Path, cfg: &ConvConfig) -> Self {
        let side = cfg.bottleneck_side();
        let top = *cfg.channels.last().expect("validated: at least one stage");
        let fc = super::linear(&vs / "fc", cfg.latent_dim, cfg.hidden);
        let proj = super::linear(&vs / "proj", cfg.hidden, top * side * side);
        // Mirror of the encoder: channels reversed, ending at the image's channels.
        let outs = cfg.channels.iter().rev().skip(1).copied().chain([cfg.in_channels]);
        let deconvs = cfg
            .channels
            .iter()
            .rev()
            .zip(outs)
            .enumerate()
            .map(|(i, (&in_ch, out_ch))| {
                super::conv_transpose2d(&vs / "deconvs" / i, in_ch, out_ch, KERNEL, STRIDE, PADDING)
            })
            .collect();
        Self { fc, proj, deconvs, start_shape: [top, side, side] }
    }

    /// The likelihood's parameters for each pixel (Bernoulli logits or Gaussian means), in
    /// float32 whatever dtype the layers ran in.
    pub fn forward(&self, z: &Tensor, compute: Compute) -> Tensor {
        let kind = compute.kind;
        let [c, side_h, side_w] = self.start_shape;
        let hidden = linear(&self.fc, &cast(z, kind), kind).relu();
        let start = linear(&self.proj, &hidden, kind).relu().view([-1, c, side_h, side_w]);
        let mut x = compute.feature_map(&start);
        for (i, layer) in self.deconvs.iter().enumerate() {
            x = deconv(layer, &x, kind);
            if i + 1 < self.deconvs.len() {
                x = x.relu();
            }
        }
        x.to_kind(Kind::Float)
    }
}

/// The conv VAE; its layers live under `encoder.` and `decoder.`, the names a PyTorch
/// `state_dict` of the same module tree would use.
pub struct ConvVae {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub cfg: ConvConfig,
    /// Float32 and the standard layout unless the trainer picks otherwise.
    pub compute: Compute,
}

impl ConvVae {
    pub fn new(vs: nn::Path, cfg: &ConvConfig) -> Self {
        Self {
            encoder: Encoder::new(&vs / "encoder", cfg),
            decoder: Decoder::new(&vs / "decoder", cfg),
            cfg: cfg.clone(),
            compute: Compute::default(),
        }
    }
}

impl Model for ConvVae {
    fn encode(&self, x: &Tensor) -> Posterior {
        self.encoder.forward(x, self.compute)
    }

    fn decode(&self, z: &Tensor) -> Tensor {
        self.decoder.forward(z, self.compute)
    }

    fn likelihood(&self) -> Likelihood {
        self.cfg.likelihood
    }

    fn latent_dim(&self) -> i64 {
        self.cfg.latent_dim
    }

    fn set_compute(&mut self, compute: Compute) {
        self.compute = compute;
    }

    fn compute(&self) -> Compute {
        self.compute
    }

    fn last_layer(&self) -> Tensor {
        self.decoder.deconvs.last().expect("validated: at least one stage").ws.shallow_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    fn build(cfg: &ConvConfig) -> (VarStore, ConvVae) {
        let vs = VarStore::new(Device::Cpu);
        let vae = ConvVae::new(vs.root(), cfg);
        (vs, vae)
    }

    #[test]
    fn shapes_for_grayscale_28_and_rgb_64() {
        let cases = [
            ConvConfig::default(),
            ConvConfig {
                image_size: 64,
                in_channels: 3,
                channels: vec![32, 32, 64, 64],
                ..Default::default()
            },
        ];
        for cfg in cases {
            cfg.validate().unwrap();
            let (_vs, vae) = build(&cfg);
            let x = Tensor::rand(
                [5, cfg.in_channels, cfg.image_size, cfg.image_size],
                (Kind::Float, Device::Cpu),
            );
            let out = vae.forward(&x);
            assert_eq!(out.posterior.mean.size(), vec![5, cfg.latent_dim]);
            assert_eq!(out.posterior.logvar.size(), vec![5, cfg.latent_dim]);
            assert_eq!(out.likelihood_params.size(), x.size());
        }
    }

    #[test]
    fn channels_last_and_bf16_compute_the_same_function() {
        let cfg = ConvConfig::default();
        let (vs, mut vae) = build(&cfg);
        tch::manual_seed(3);
        let x = Tensor::rand([8, 1, 28, 28], (Kind::Float, Device::Cpu));
        let eps = Tensor::randn([8, cfg.latent_dim], (Kind::Float, Device::Cpu));
        let run = |vae: &ConvVae| {
            let params = vae.decode(&vae.encode(&x).sample_with_noise(&eps));
            assert_eq!(params.kind(), Kind::Float, "outputs are float32 whatever the compute");
            params
        };
        let reference = run(&vae);
        vae.compute = Compute { kind: Kind::Float, channels_last: true, checkpoint: false };
        let nhwc = run(&vae);
        assert!(nhwc.allclose(&reference, 1e-4, 1e-5, false));
        // Adam's fused pass needs dense gradients: the NHWC layout must not leak into them.
        nhwc.sum(None).backward();
        for (name, p) in vs.variables() {
            assert!(p.grad().is_contiguous(), "{name}: gradient not contiguous");
        }
        vae.compute = Compute { kind: Kind::BFloat16, channels_last: true, checkpoint: false };
        let worst = (run(&vae) - &reference).abs().max().double_value(&[]);
        let scale = reference.abs().max().double_value(&[]);
        assert!(worst < 0.05 * scale, "bf16 differs by {worst} (outputs up to {scale})");
    }

    #[test]
    fn tensor_names_follow_the_module_tree() {
        let (vs, _) = build(&ConvConfig::default());
        let built: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(ConvConfig::default().parameter_count(), built as u128);
        let mut names: Vec<String> = vs.variables().into_keys().collect();
        names.sort();
        let expected = [
            "decoder.deconvs.0.bias",
            "decoder.deconvs.0.weight",
            "decoder.deconvs.1.bias",
            "decoder.deconvs.1.weight",
            "decoder.fc.bias",
            "decoder.fc.weight",
            "decoder.proj.bias",
            "decoder.proj.weight",
            "encoder.convs.0.bias",
            "encoder.convs.0.weight",
            "encoder.convs.1.bias",
            "encoder.convs.1.weight",
            "encoder.fc.bias",
            "encoder.fc.weight",
            "encoder.head.bias",
            "encoder.head.weight",
        ];
        assert_eq!(names, expected);
        assert_eq!(vs.variables()["decoder.deconvs.1.weight"].size(), vec![32, 1, 4, 4]);
    }

    #[test]
    fn sizes_that_do_not_halve_cleanly_are_rejected() {
        let cfg = ConvConfig { image_size: 30, channels: vec![8, 8, 8], ..Default::default() };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("30 is not divisible by 2^3 = 8"), "{err}");
    }
}
