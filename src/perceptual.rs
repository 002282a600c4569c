//! LPIPS (Zhang et al. 2018), the perceptual distance of the `lpips` package (v0.1, VGG16
//! trunk): each image through VGG16's convolutions, the activations after relu1_2, relu2_2,
//! relu3_3, relu4_3 and relu5_3 unit-normalised over channels, their squared differences
//! weighted by learned 1x1 heads, averaged over space and summed over the five layers.
//!
//! The network is frozen (plain tensors, no gradients of their own; gradients flow to the
//! images) and its weights come from a safetensors file holding the package's state dict
//! (`scripts/lpips_weights.py` writes it): nothing is downloaded at run time.

use crate::models::{in_passes, passes};
use anyhow::{ensure, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// VGG16's convolutions as the package slices them: (slice, index in torchvision's
/// `features`, input channels, output channels). Each slice but the first starts with a 2x2
/// max-pool; each ends at the activation LPIPS compares.
const CONVS: [(usize, usize, i64, i64); 13] = [
    (1, 0, 3, 64),
    (1, 2, 64, 64),
    (2, 5, 64, 128),
    (2, 7, 128, 128),
    (3, 10, 128, 256),
    (3, 12, 256, 256),
    (3, 14, 256, 256),
    (4, 17, 256, 512),
    (4, 19, 512, 512),
    (4, 21, 512, 512),
    (5, 24, 512, 512),
    (5, 26, 512, 512),
    (5, 28, 512, 512),
];

/// Pixels per pass when the gradient is wanted: each pass goes backward at once and frees its
/// activations, so the trunk's graph for the whole batch is never held beside the
/// autoencoder's. On the CPU 4 images of 128 x 128. On CUDA 16: passes that small leave the
/// device waiting on the host's launches (an H200, 128 x 128, batch 16, with the PatchGAN:
/// four passes launched ~980 kernels a step more than the reference's one pass, whose step
/// ran 1.07-1.15x as fast); at 256 x 256 they still hold VGG16's graph for 4 images, not 16.
fn grad_chunk_pixels(device: Device) -> i64 {
    if device.is_cuda() {
        1 << 18
    } else {
        1 << 16
    }
}

/// Channels of the five compared activations.
const CHANNELS: [i64; 5] = [64, 128, 256, 512, 512];

struct Conv {
    slice: usize,
    weight: Tensor,
    bias: Tensor,
}

pub struct Lpips {
    /// CRC-32 of the weights file's bytes: a resume tells a changed file from a moved one.
    pub checksum: u32,
    convs: Vec<Conv>,
    /// The 1x1 heads, `[1, C, 1, 1]` each.
    heads: Vec<Tensor>,
    /// The package's input scaling, `(x - shift) / scale`, `[1, 3, 1, 1]` each.
    shift: Tensor,
    scale: Tensor,
}

impl Lpips {
    /// Reads the package's state dict from `path` (names such as `net.slice1.0.weight`,
    /// `lin0.model.1.weight`, `scaling_layer.shift`) onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let reading = || format!("reading LPIPS weights {} (--lpips-weights)", path.display());
        // Read once more by tch below (at start only): the bytes are not kept meanwhile.
        let checksum = crc32fast::hash(&std::fs::read(path).with_context(reading)?);
        let tensors: HashMap<String, Tensor> =
            Tensor::read_safetensors(path).with_context(reading)?.into_iter().collect();
        let take = |name: &str, shape: &[i64]| -> Result<Tensor> {
            let t = tensors.get(name).with_context(|| {
                format!(
                    "{} holds no tensor {name}: not an LPIPS (VGG, v0.1) state dict; scripts/lpips_weights.py writes one",
                    path.display()
                )
            })?;
            ensure!(
                t.size() == shape,
                "{}: tensor {name} has shape {:?}, LPIPS-VGG needs {shape:?}",
                path.display(),
                t.size()
            );
            Ok(t.to_kind(Kind::Float).to_device(device).detach())
        };
        let convs = CONVS
            .iter()
            .map(|&(slice, index, i, o)| {
                let name = format!("net.slice{slice}.{index}");
                Ok(Conv {
                    slice,
                    weight: take(&format!("{name}.weight"), &[o, i, 3, 3])?,
                    bias: take(&format!("{name}.bias"), &[o])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let heads = CHANNELS
            .iter()
            .enumerate()
            .map(|(k, &c)| take(&format!("lin{k}.model.1.weight"), &[1, c, 1, 1]))
            .collect::<Result<Vec<_>>>()?;
        let shift = take("scaling_layer.shift", &[1, 3, 1, 1])?;
        let scale = take("scaling_layer.scale", &[1, 3, 1, 1])?;
        Ok(Self { checksum, convs, heads, shift, scale })
    }

    /// The five compared activations of `x` (`[B, 3, H, W]`, scaled).
    fn features(&self, x: &Tensor, kind: Kind) -> Vec<Tensor> {
        let mut out = Vec::with_capacity(CHANNELS.len());
        let mut h = x.to_kind(kind);
        for (i, conv) in self.convs.iter().enumerate() {
            if i > 0 && conv.slice != self.convs[i - 1].slice {
                out.push(h.shallow_clone());
                h = h.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            }
            let (w, b) = (conv.weight.to_kind(kind), conv.bias.to_kind(kind));
            h = h.conv2d(&w, Some(&b), [1, 1], [1, 1], [1, 1], 1).relu_();
        }
        out.push(h);
        out
    }

    /// The distance between image batches `x0` and `x1` (`[B, C, H, W]` in [-1, 1]; one
    /// channel is read as grey and repeated to three), one number per image, in float32.
    /// The convolutions run in `kind`. A gradient with respect to `x1`, when it needs one, is
    /// computed here, chunk by chunk, for batches of more than [`grad_chunk_pixels`] (not in
    /// float16, whose backward needs the step's loss scale) and carried by the result.
    pub fn distance(&self, x0: &Tensor, x1: &Tensor, kind: Kind) -> Tensor {
        let size = x1.size();
        let (batch, pixels) = (size[0], size[2] * size[3]);
        let grad_chunk = (grad_chunk_pixels(x1.device()) / pixels).max(1);
        if x1.requires_grad() && kind != Kind::Half && batch > grad_chunk {
            let (values, grads): (Vec<Tensor>, Vec<Tensor>) = passes(batch, grad_chunk)
                .map(|(i, n)| {
                    let part = x1.narrow(0, i, n).detach().set_requires_grad(true);
                    let d = self.pass(&x0.narrow(0, i, n), &part, kind);
                    let grad = Tensor::run_backward(&[d.sum(Kind::Float)], &[&part], false, false).pop();
                    (d.detach(), grad.expect("one input, one gradient"))
                })
                .unzip();
            // Adds zero with the gradient `grads` (each distance is its own image's).
            let carried = ((x1 - x1.detach()) * Tensor::cat(&grads, 0)).sum_dim_intlist(
                [1i64, 2, 3].as_slice(),
                false,
                Kind::Float,
            );
            return Tensor::cat(&values, 0) + carried;
        }
        // Evaluation batches are large: passes bound VGG's activations (20 times the images').
        in_passes(x1, [size[2], size[3]], |first, part| {
            self.pass(&x0.narrow(0, first, part.size()[0]), part, kind)
        })
    }

    /// [`distance`](Lpips::distance) in one pass through the trunk.
    fn pass(&self, x0: &Tensor, x1: &Tensor, kind: Kind) -> Tensor {
        let batch = x0.size()[0];
        // Each batch through the trunk on its own: in training only the reconstructions need
        // a gradient, and a joint pass would run the trunk's backward over the originals too.
        let unit_features = |x: &Tensor| {
            let rgb = if x.size()[1] == 1 { x.repeat([1, 3, 1, 1]) } else { x.shallow_clone() };
            let features = self.features(&((rgb - &self.shift) / &self.scale), kind);
            features.into_iter().map(|f| {
                let f = f.to_kind(Kind::Float);
                &f / (f.square().sum_dim_intlist(1, true, None).sqrt() + 1e-10)
            })
        };
        let mut total = Tensor::zeros([batch], (Kind::Float, x0.device()));
        for ((a, b), head) in unit_features(x0).zip(unit_features(x1)).zip(&self.heads) {
            let weighted = (a - b).square().conv2d(head, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
            total += weighted.mean_dim([1i64, 2, 3].as_slice(), false, None);
        }
        total
    }
}
