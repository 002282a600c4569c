//! The residual KL-autoencoder of latent diffusion (`--arch resnet`), layer for layer
//! diffusers' `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D` blocks: residual
//! blocks of GroupNorm, SiLU and 3x3 convs, stride-2 downsampling, a middle block with one
//! self-attention, `quant_conv` / `post_quant_conv`, a spatial latent. Parameters carry
//! diffusers' state-dict names, so the weights of a checkpoint are a diffusers state dict.
//!
//! Pixels enter as [0, 1] (the loader's) and are mapped to [-1, 1], where the decoder's output
//! lives (see the L1 and L2 likelihoods). The posterior is flattened to `[B, C * h * w]` for
//! the rest of the crate; `decode` takes that or the spatial `[B, C, h, w]`.

use super::{cast, run_conv, run_linear, Compute, Count, Likelihood, Model, Posterior};
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tch::{nn, Kind, Tensor};

/// Architecture, in diffusers' terms; stored in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResnetConfig {
    /// Side of the square training images (the model itself takes any multiple of
    /// 2^(blocks - 1)).
    pub image_size: i64,
    pub in_channels: i64,
    /// diffusers' `block_out_channels`: one down (and one up) block each.
    pub block_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub latent_channels: i64,
    /// diffusers' `norm_num_groups`.
    pub norm_groups: i64,
    /// diffusers' `mid_block_add_attention`.
    pub mid_attention: bool,
    /// diffusers' `use_quant_conv` and `use_post_quant_conv`, the 1x1 convolutions around the
    /// latent (both off in SD3's and Flux's autoencoders).
    #[serde(default = "with_quant_convs")]
    pub quant_convs: bool,
    pub likelihood: Likelihood,
}

/// Configs from before `quant_convs` describe models that have them.
fn with_quant_convs() -> bool {
    true
}

impl Default for ResnetConfig {
    /// A small Stable-Diffusion-like autoencoder.
    fn default() -> Self {
        Self {
            image_size: 64,
            in_channels: 3,
            block_channels: vec![64, 128, 256],
            layers_per_block: 2,
            latent_channels: 4,
            norm_groups: 32,
            mid_attention: true,
            quant_convs: true,
            likelihood: Likelihood::L1,
        }
    }
}

/// GroupNorm's epsilon everywhere in diffusers' VAE.
const EPS: f64 = 1e-6;

impl ResnetConfig {
    /// How much smaller the latent's side is than the image's.
    pub fn downscale(&self) -> i64 {
        1 << (self.block_channels.len().clamp(1, 63) - 1)
    }

    /// `[C, h, w]` of the latent of a training image.
    pub fn latent_shape(&self) -> [i64; 3] {
        let side = self.image_size / self.downscale();
        [self.latent_channels, side, side]
    }

    pub fn latent_dim(&self) -> i64 {
        self.latent_shape().iter().product()
    }

    /// Trainable parameters of the model this config builds, computed without building it.
    pub fn parameter_count(&self) -> u128 {
        let (zero, two, four) = (Count(0), Count(2), Count(4));
        let conv = |i: Count, o: Count, k: u128| i * o * Count(k * k) + o;
        let norm = |c: Count| two * c;
        let resnet = |i: Count, o: Count| {
            norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + if i != o { conv(i, o, 1) } else { zero }
        };
        let attention = |c: Count| norm(c) + four * (c * c + c);
        let mid = |c: Count| two * resnet(c, c) + if self.mid_attention { attention(c) } else { zero };
        let blocks: Vec<Count> = self.block_channels.iter().map(|&c| Count::of(c)).collect();
        let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) else { return 0 };
        let (layers, latent, image) =
            (Count::of(self.layers_per_block), Count::of(self.latent_channels), Count::of(self.in_channels));
        let mut encoder = conv(image, first, 3);
        let mut prev = first;
        for (i, &out) in blocks.iter().enumerate() {
            encoder += resnet(prev, out) + Count(layers.0.saturating_sub(1)) * resnet(out, out);
            encoder += if i + 1 < blocks.len() { conv(out, out, 3) } else { zero };
            prev = out;
        }
        encoder += mid(last) + norm(last) + conv(last, two * latent, 3);
        let mut decoder = conv(latent, last, 3) + mid(last);
        let mut prev = last;
        for (i, &out) in blocks.iter().rev().enumerate() {
            decoder += resnet(prev, out) + layers * resnet(out, out);
            decoder += if i + 1 < blocks.len() { conv(out, out, 3) } else { zero };
            prev = out;
        }
        decoder += norm(first) + conv(first, image, 3);
        let quant = if self.quant_convs {
            conv(two * latent, two * latent, 1) + conv(latent, latent, 1)
        } else {
            zero
        };
        (encoder + decoder + quant).0
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(!self.block_channels.is_empty(), "--block-channels needs at least one block");
        ensure!(self.norm_groups > 0, "--norm-groups must be positive, found {}", self.norm_groups);
        for &c in &self.block_channels {
            ensure!(
                c > 0 && c % self.norm_groups == 0,
                "--block-channels {:?}: each must be a positive multiple of --norm-groups {} (GroupNorm \
                 splits the channels into groups), found {c}",
                self.block_channels,
                self.norm_groups
            );
        }
        ensure!(
            self.layers_per_block > 0,
            "--layers-per-block must be positive, found {}",
            self.layers_per_block
        );
        ensure!(
            self.latent_channels > 0,
            "--latent-channels must be positive, found {}",
            self.latent_channels
        );
        ensure!(
            self.in_channels == 1 || self.in_channels == 3,
            "images must have 1 or 3 channels, found {}",
            self.in_channels
        );
        ensure!(self.block_channels.len() <= 12, "--block-channels: at most 12 blocks");
        let scale = self.downscale();
        ensure!(
            self.image_size > 0 && self.image_size % scale == 0,
            "image size {} is not a multiple of 2^{} = {scale} (each of the {} blocks of --block-channels \
             but the last halves the side)",
            self.image_size,
            self.block_channels.len() - 1,
            self.block_channels.len()
        );
        Ok(())
    }
}

fn conv(vs: nn::Path, i: i64, o: i64, k: i64) -> nn::Conv2D {
    super::conv2d(vs, i, o, k, 1, k / 2)
}

fn same(layer: &nn::Conv2D, x: &Tensor, kind: Kind) -> Tensor {
    let k = layer.ws.size()[2];
    run_conv(layer, x, kind, 1, k / 2)
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
}

impl Norm {
    fn new(vs: nn::Path, groups: i64, channels: i64) -> Self {
        Self {
            weight: vs.var("weight", &[channels], nn::Init::Const(1.0)),
            bias: vs.var("bias", &[channels], nn::Init::Const(0.0)),
            groups,
        }
    }

    fn forward(&self, x: &Tensor, kind: Kind) -> Tensor {
        x.group_norm(self.groups, Some(cast(&self.weight, kind)), Some(cast(&self.bias, kind)), EPS, true)
    }
}

/// diffusers' `ResnetBlock2D` without a time embedding.
struct ResnetBlock {
    norm1: Norm,
    conv1: nn::Conv2D,
    norm2: Norm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock {
    fn new(vs: nn::Path, groups: i64, i: i64, o: i64) -> Self {
        Self {
            norm1: Norm::new(&vs / "norm1", groups, i),
            conv1: conv(&vs / "conv1", i, o, 3),
            norm2: Norm::new(&vs / "norm2", groups, o),
            conv2: conv(&vs / "conv2", o, o, 3),
            conv_shortcut: (i != o).then(|| conv(&vs / "conv_shortcut", i, o, 1)),
        }
    }

    /// Each layer's output replaces the last one's, which is freed then: without a graph to
    /// keep them (evaluation, decoding), the block holds its input and at most two feature
    /// maps at a time, not five (a 1024 x 1024 decoding took 0.7 GB more).
    fn forward(&self, x: &Tensor, kind: Kind) -> Tensor {
        let mut h = silu(self.norm1.forward(x, kind));
        h = same(&self.conv1, &h, kind);
        h = silu(self.norm2.forward(&h, kind));
        h = same(&self.conv2, &h, kind);
        match &self.conv_shortcut {
            Some(shortcut) => same(shortcut, x, kind) + h,
            None => x + h,
        }
    }
}

/// diffusers' `Attention` as the VAE's middle block uses it: one head over all channels,
/// GroupNorm first, a residual connection.
struct Attention {
    group_norm: Norm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
}

impl Attention {
    fn new(vs: nn::Path, groups: i64, c: i64) -> Self {
        let linear = |name: &str| super::linear(&vs / name, c, c);
        Self {
            group_norm: Norm::new(&vs / "group_norm", groups, c),
            to_q: linear("to_q"),
            to_k: linear("to_k"),
            to_v: linear("to_v"),
            to_out: super::linear(&vs / "to_out" / 0, c, c),
        }
    }

    fn forward(&self, x: &Tensor, kind: Kind) -> Tensor {
        let [b, c, h, w]: [i64; 4] = x.size().try_into().expect("a feature map");
        let linear = |layer: &nn::Linear, t: &Tensor| run_linear(layer, t, kind);
        // [B, HW, C], one head.
        let tokens = self.group_norm.forward(x, kind).view([b, c, h * w]).transpose(1, 2);
        let heads = |layer| linear(layer, &tokens).unsqueeze(1);
        let (q, k, v) = (heads(&self.to_q), heads(&self.to_k), heads(&self.to_v));
        let attended =
            Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        let out = linear(&self.to_out, &attended.squeeze_dim(1));
        // The reshape is a channels-last view: made contiguous, so the blocks after it keep the
        // standard layout (see `set_compute`).
        out.transpose(1, 2).contiguous().view([b, c, h, w]) + x
    }
}

/// diffusers' `UNetMidBlock2D`: resnet, attention (optional), resnet.
struct MidBlock {
    resnets: [ResnetBlock; 2],
    attention: Option<Attention>,
}

impl MidBlock {
    fn new(vs: nn::Path, cfg: &ResnetConfig, c: i64) -> Self {
        let g = cfg.norm_groups;
        Self {
            resnets: [0, 1].map(|i| ResnetBlock::new(&vs / "resnets" / i, g, c, c)),
            attention: cfg.mid_attention.then(|| Attention::new(&vs / "attentions" / 0, g, c)),
        }
    }

    fn forward(&self, x: &Tensor, kind: Kind) -> Tensor {
        let mut h = self.resnets[0].forward(x, kind);
        if let Some(attention) = &self.attention {
            h = attention.forward(&h, kind);
        }
        self.resnets[1].forward(&h, kind)
    }
}

/// A down or up block: resnets, then a resampling conv (all blocks but the last).
struct Block {
    resnets: Vec<ResnetBlock>,
    resample: Option<nn::Conv2D>,
}

impl Block {
    /// `layers` resnets from `i` to `o` channels; the resampler at `resample` (diffusers'
    /// `downsamplers` / `upsamplers`) unless this is the last block.
    fn new(vs: nn::Path, groups: i64, (i, o): (i64, i64), layers: i64, resample: Option<&str>) -> Self {
        Self {
            resnets: (0..layers)
                .map(|l| ResnetBlock::new(&vs / "resnets" / l, groups, if l == 0 { i } else { o }, o))
                .collect(),
            resample: resample.map(|name| conv(&vs / name / 0 / "conv", o, o, 3)),
        }
    }

    fn resnets(&self, x: &Tensor, kind: Kind) -> Tensor {
        self.resnets.iter().fold(x.shallow_clone(), |h, r| r.forward(&h, kind))
    }

    /// `Downsample2D` with padding 0: pad right and bottom by one, 3x3 conv of stride 2 (the
    /// resnets' output freed once padded, as in [`ResnetBlock::forward`]).
    fn down(&self, x: &Tensor, kind: Kind) -> Tensor {
        let h = self.resnets(x, kind);
        match &self.resample {
            Some(conv) => {
                let padded = h.constant_pad_nd([0, 1, 0, 1]);
                drop(h);
                run_conv(conv, &padded, kind, 2, 0)
            }
            None => h,
        }
    }

    /// `Upsample2D`: nearest-neighbour doubling (the resnets' output freed then), 3x3 conv.
    fn up(&self, x: &Tensor, kind: Kind) -> Tensor {
        let h = self.resnets(x, kind);
        match &self.resample {
            Some(conv) => {
                let [_, _, height, width]: [i64; 4] = h.size().try_into().expect("a feature map");
                let doubled = h.upsample_nearest2d([2 * height, 2 * width], 2.0, 2.0);
                drop(h);
                same(conv, &doubled, kind)
            }
            None => h,
        }
    }
}

/// A block that the autograd graph may compute again in the backward (gradient
/// checkpointing), on autograd's thread on CUDA; the model and the graph share it.
struct Shared<T>(Arc<T>);

impl<T> Shared<T> {
    // Arc, not Rc: the graph may drop its clone on autograd's thread (see Send below).
    #[allow(clippy::arc_with_non_send_sync)]
    fn new(block: T) -> Self {
        Self(Arc::new(block))
    }

    fn get(&self) -> &T {
        &self.0
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

// SAFETY: a block's tensors are only read. The graph runs the block from within a backward
// that the thread owning the model waits on, never beside it; the Arc's counts are atomic and
// libtorch frees a tensor from any thread.
unsafe impl<T> Send for Shared<T> {}

/// `run(block, x)`, and with `compute.checkpoint` through [`crate::native::checkpoint`]: the
/// forward keeps the block's input alone. Per down, middle and up block, as diffusers'
/// `enable_gradient_checkpointing` does.
fn segment<T: 'static>(
    block: &Shared<T>,
    x: &Tensor,
    compute: Compute,
    run: fn(&T, &Tensor, Kind) -> Tensor,
) -> Tensor {
    let kind = compute.kind;
    if !compute.checkpoint {
        return run(block.get(), x, kind);
    }
    let shared = block.clone();
    crate::native::checkpoint(x, move |x| run(shared.get(), x, kind))
}

/// The last layers of the encoder and the decoder: norm, SiLU, conv, each output replacing the
/// last (see [`ResnetBlock::forward`]).
fn conv_out(norm: &Norm, conv: &nn::Conv2D, h: Tensor, kind: Kind) -> Tensor {
    let normed = norm.forward(&h, kind);
    drop(h);
    same(conv, &silu(normed), kind)
}

/// SiLU in place where no graph needs its input (evaluation, decoding), the same values in
/// one feature map less.
fn silu(mut h: Tensor) -> Tensor {
    if h.requires_grad() {
        h.silu()
    } else {
        h.silu_()
    }
}

pub struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<Shared<Block>>,
    mid_block: Shared<MidBlock>,
    conv_norm_out: Norm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &ResnetConfig) -> Self {
        let chans = &cfg.block_channels;
        let last = *chans.last().expect("validated: one block at least");
        let mut prev = chans[0];
        let down_blocks = chans
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let resample = (i + 1 < chans.len()).then_some("downsamplers");
                let block = Block::new(
                    &vs / "down_blocks" / i,
                    cfg.norm_groups,
                    (prev, out),
                    cfg.layers_per_block,
                    resample,
                );
                prev = out;
                Shared::new(block)
            })
            .collect();
        Self {
            conv_in: conv(&vs / "conv_in", cfg.in_channels, chans[0], 3),
            down_blocks,
            mid_block: Shared::new(MidBlock::new(&vs / "mid_block", cfg, last)),
            conv_norm_out: Norm::new(&vs / "conv_norm_out", cfg.norm_groups, last),
            conv_out: conv(&vs / "conv_out", last, 2 * cfg.latent_channels, 3),
        }
    }

    fn forward(&self, x: &Tensor, compute: Compute) -> Tensor {
        let kind = compute.kind;
        let h = same(&self.conv_in, x, kind);
        let h = self.down_blocks.iter().fold(h, |h, block| segment(block, &h, compute, Block::down));
        let h = segment(&self.mid_block, &h, compute, MidBlock::forward);
        conv_out(&self.conv_norm_out, &self.conv_out, h, kind)
    }
}

pub struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: Shared<MidBlock>,
    up_blocks: Vec<Shared<Block>>,
    conv_norm_out: Norm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &ResnetConfig) -> Self {
        let chans = &cfg.block_channels;
        let last = *chans.last().expect("validated: one block at least");
        let mut prev = last;
        let up_blocks = chans
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &out)| {
                let resample = (i + 1 < chans.len()).then_some("upsamplers");
                let layers = cfg.layers_per_block + 1;
                let block = Block::new(&vs / "up_blocks" / i, cfg.norm_groups, (prev, out), layers, resample);
                prev = out;
                Shared::new(block)
            })
            .collect();
        Self {
            conv_in: conv(&vs / "conv_in", cfg.latent_channels, last, 3),
            mid_block: Shared::new(MidBlock::new(&vs / "mid_block", cfg, last)),
            up_blocks,
            conv_norm_out: Norm::new(&vs / "conv_norm_out", cfg.norm_groups, chans[0]),
            conv_out: conv(&vs / "conv_out", chans[0], cfg.in_channels, 3),
        }
    }

    fn forward(&self, z: &Tensor, compute: Compute) -> Tensor {
        let kind = compute.kind;
        let h = same(&self.conv_in, z, kind);
        let h = segment(&self.mid_block, &h, compute, MidBlock::forward);
        let h = self.up_blocks.iter().fold(h, |h, block| segment(block, &h, compute, Block::up));
        conv_out(&self.conv_norm_out, &self.conv_out, h, kind)
    }
}

/// diffusers' `AutoencoderKL`: `encoder.`, `quant_conv.`, `post_quant_conv.`, `decoder.`.
pub struct ResnetVae {
    encoder: Encoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
    decoder: Decoder,
    pub cfg: ResnetConfig,
    pub compute: Compute,
}

impl ResnetVae {
    pub fn new(vs: nn::Path, cfg: &ResnetConfig) -> Self {
        let latent = cfg.latent_channels;
        Self {
            encoder: Encoder::new(&vs / "encoder", cfg),
            quant_conv: cfg.quant_convs.then(|| conv(&vs / "quant_conv", 2 * latent, 2 * latent, 1)),
            post_quant_conv: cfg.quant_convs.then(|| conv(&vs / "post_quant_conv", latent, latent, 1)),
            decoder: Decoder::new(&vs / "decoder", cfg),
            cfg: cfg.clone(),
            compute: Compute::default(),
        }
    }

    /// The posterior's parameters as diffusers' `DiagonalGaussianDistribution` holds them:
    /// `[B, C, h, w]` each, the log-variance clamped to [-30, 20].
    pub fn encode_spatial(&self, x: &Tensor) -> (Tensor, Tensor) {
        let kind = self.compute.kind;
        let x = self.compute.feature_map(&(x * 2.0 - 1.0));
        let h = self.encoder.forward(&x, self.compute);
        let moments =
            self.quant_conv.as_ref().map_or(h.shallow_clone(), |c| same(c, &h, kind)).to_kind(Kind::Float);
        let [mean, logvar]: [Tensor; 2] = moments.chunk(2, 1).try_into().expect("two halves");
        (mean, logvar.clamp(-30.0, 20.0))
    }
}

impl Model for ResnetVae {
    fn encode(&self, x: &Tensor) -> Posterior {
        let (mean, logvar) = self.encode_spatial(x);
        Posterior { mean: mean.flatten(1, -1), logvar: logvar.flatten(1, -1) }
    }

    /// Decoder output in [-1, 1] pixel space, from `[B, C * h * w]` (the training images'
    /// latent shape) or `[B, C, h, w]`.
    fn decode(&self, z: &Tensor) -> Tensor {
        let kind = self.compute.kind;
        let z = if z.dim() == 2 {
            let [c, h, w] = self.cfg.latent_shape();
            z.view([-1, c, h, w])
        } else {
            z.shallow_clone()
        };
        let z = self.compute.feature_map(&z);
        let z = self.post_quant_conv.as_ref().map_or(z.shallow_clone(), |c| same(c, &z, kind));
        self.decoder.forward(&z, self.compute).to_kind(Kind::Float)
    }

    fn likelihood(&self) -> Likelihood {
        self.cfg.likelihood
    }

    fn latent_dim(&self) -> i64 {
        self.cfg.latent_dim()
    }

    /// Through the spatial latent, so any size that is a multiple of the downscale works.
    fn reconstruct(&self, x: &Tensor) -> Tensor {
        self.likelihood().mean(&self.decode(&self.encode_spatial(x).0))
    }

    fn latent_channels(&self) -> i64 {
        self.cfg.latent_channels
    }

    /// Always the standard layout: on the CPU, GroupNorm's channels-last backward kernel took
    /// 8.6% of a 64 x 64 step (perf), the standard one that diffusers runs under 1%.
    fn set_compute(&mut self, compute: Compute) {
        self.compute = Compute { channels_last: false, ..compute };
    }

    fn compute(&self) -> Compute {
        self.compute
    }

    /// `decoder.conv_out.weight`, as latent diffusion's `get_last_layer`.
    fn last_layer(&self) -> Tensor {
        self.decoder.conv_out.ws.shallow_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    fn tiny() -> ResnetConfig {
        ResnetConfig {
            image_size: 16,
            in_channels: 3,
            block_channels: vec![8, 16],
            layers_per_block: 1,
            latent_channels: 2,
            norm_groups: 4,
            mid_attention: true,
            quant_convs: true,
            likelihood: Likelihood::L1,
        }
    }

    /// A config from a file may hold any i64: its count stops at u128::MAX (which no file can
    /// hold) rather than overflowing (which wrapped to a small count, or panicked).
    #[test]
    fn the_parameter_count_of_absurd_sizes_saturates() {
        let huge = ResnetConfig { block_channels: vec![i64::MAX - 3; 3], ..tiny() };
        assert_eq!(huge.parameter_count(), u128::MAX);
        let deep = ResnetConfig { layers_per_block: i64::MAX, block_channels: vec![1 << 40; 2], ..tiny() };
        assert_eq!(deep.parameter_count(), u128::MAX);
        let conv = crate::models::ConvConfig { image_size: i64::MAX, hidden: i64::MAX, ..Default::default() };
        assert_eq!(conv.parameter_count(), u128::MAX);
    }

    #[test]
    fn shapes_names_and_parameter_count() {
        for (mid_attention, quant_convs) in [(true, true), (false, true), (true, false)] {
            let cfg = ResnetConfig { mid_attention, quant_convs, ..tiny() };
            cfg.validate().unwrap();
            let vs = VarStore::new(Device::Cpu);
            let vae = ResnetVae::new(vs.root(), &cfg);
            let built: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
            assert_eq!(cfg.parameter_count(), built as u128);
            let x = Tensor::rand([3, 3, 16, 16], (Kind::Float, Device::Cpu));
            let out = vae.forward(&x);
            assert_eq!(out.posterior.mean.size(), vec![3, 2 * 8 * 8]);
            assert_eq!(out.likelihood_params.size(), x.size());
            // Fully convolutional: a 32-pixel image has a 16 x 16 latent.
            let (mean, _) = vae.encode_spatial(&Tensor::rand([1, 3, 32, 32], (Kind::Float, Device::Cpu)));
            assert_eq!(mean.size(), vec![1, 2, 16, 16]);
            assert_eq!(vae.decode(&mean).size(), vec![1, 3, 32, 32]);
            let names = vs.variables();
            assert_eq!(names.contains_key("decoder.mid_block.attentions.0.to_out.0.weight"), mid_attention);
            for name in ["quant_conv.weight", "post_quant_conv.bias"] {
                assert_eq!(names.contains_key(name), quant_convs, "{name}");
            }
            for name in [
                "encoder.down_blocks.0.downsamplers.0.conv.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "decoder.up_blocks.0.upsamplers.0.conv.bias",
                "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
                "decoder.up_blocks.1.resnets.1.norm2.weight",
            ] {
                assert!(names.contains_key(name), "{name}");
            }
        }
    }

    #[test]
    fn gradient_checkpointing_changes_no_value_or_gradient() {
        let vs = VarStore::new(Device::Cpu);
        let mut vae = ResnetVae::new(vs.root(), &ResnetConfig { block_channels: vec![8, 8, 16], ..tiny() });
        let x = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let eps = Tensor::randn([2, vae.latent_dim()], (Kind::Float, Device::Cpu));
        let mut run = |checkpoint: bool| {
            vae.set_compute(Compute { checkpoint, ..Compute::default() });
            let out = vae.forward_with_noise(&x, &eps);
            let loss = vae.likelihood().reconstruction_nll(&out.likelihood_params, &x).sum(Kind::Float)
                + out.posterior.kl_to_standard_normal().sum(Kind::Float);
            loss.backward();
            let grads: std::collections::BTreeMap<String, Tensor> =
                vs.variables().into_iter().map(|(n, t)| (n, t.grad().copy())).collect();
            crate::native::clear_grads(vs.trainable_variables().iter());
            (loss.detach(), grads)
        };
        let (loss, grads) = run(false);
        let (loss_c, grads_c) = run(true);
        assert!(loss.equal(&loss_c), "the loss changed");
        for ((name, g), (_, g_c)) in grads.iter().zip(&grads_c) {
            assert!(g.defined() && g.equal(g_c), "{name}'s gradient changed");
        }
    }

    #[test]
    fn group_counts_and_sides_that_do_not_fit_are_rejected() {
        let err = ResnetConfig { norm_groups: 3, ..tiny() }.validate().unwrap_err().to_string();
        assert!(err.contains("multiple of --norm-groups 3"), "{err}");
        let err = ResnetConfig { image_size: 15, ..tiny() }.validate().unwrap_err().to_string();
        assert!(err.contains("15 is not a multiple of 2^1 = 2"), "{err}");
    }
}
