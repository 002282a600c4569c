//! Model families behind one interface. Training, evaluation, export and checkpoints see a
//! [`ModelConfig`] (what to build, stored in every checkpoint) and a [`Model`] (encode to a
//! posterior, decode to the likelihood's parameters); a new family is a file here and a
//! variant of `ModelConfig`. Parameters are created under the `VarStore` path given to
//! `build`, so tensor names are the `state_dict` names of the same PyTorch module tree.

pub mod conv;
pub mod resnet;
pub mod tiles;

pub use conv::{ConvConfig, ConvVae};
pub use resnet::{ResnetConfig, ResnetVae};
pub use tiles::Tile;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Reduction, Tensor};

/// The decoder's distribution p(x|z) over each pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Likelihood {
    /// Bernoulli with logits: binary cross-entropy, exact in nats for binary data.
    Bernoulli,
    /// Gaussian in its mean-squared-error form: sum of (x - mean)^2, i.e. -log N(x; mean, 1/2)
    /// less the constant (D/2) log(pi).
    Gaussian,
    /// Latent diffusion's pixel loss: sum of |x - x̂| over pixels in [-1, 1] (a Laplace
    /// likelihood of scale 1 less its constant; not a normalised density, so the "bound" is
    /// a loss, not nats).
    L1,
    /// Sum of (x - x̂)^2 over pixels in [-1, 1] (also a loss, not nats).
    L2,
}

impl Likelihood {
    /// The usual choice for images of `channels` channels: Bernoulli for grayscale.
    pub fn default_for(channels: i64) -> Self {
        if channels == 1 {
            Likelihood::Bernoulli
        } else {
            Likelihood::Gaussian
        }
    }

    /// Whether the reconstruction term is a normalised -log p(x|z) (so the bound is in nats):
    /// the L1 and L2 losses of latent diffusion are not.
    pub fn is_density(&self) -> bool {
        matches!(self, Likelihood::Bernoulli | Likelihood::Gaussian)
    }

    /// What a loss of this reconstruction term is measured in, per image.
    pub fn unit(&self) -> &'static str {
        match self {
            Likelihood::Bernoulli | Likelihood::Gaussian => "nats/image",
            Likelihood::L1 => "per image (L1 in [-1, 1] pixels, not nats)",
            Likelihood::L2 => "per image (squared error in [-1, 1] pixels, not nats)",
        }
    }

    /// -log p(x|z) summed over pixels: one value per example.
    pub fn reconstruction_nll(&self, params: &Tensor, x: &Tensor) -> Tensor {
        let per_pixel = match self {
            Likelihood::Bernoulli => {
                params.binary_cross_entropy_with_logits::<Tensor>(x, None, None, Reduction::None)
            }
            Likelihood::Gaussian => (params - x).square(),
            Likelihood::L1 => (params - (x * 2.0 - 1.0)).abs(),
            Likelihood::L2 => (params - (x * 2.0 - 1.0)).square(),
        };
        per_pixel.flatten(1, -1).sum_dim_intlist(-1, false, None)
    }

    /// E[x|z] in [0, 1] from the decoder's output, for pictures.
    pub fn mean(&self, params: &Tensor) -> Tensor {
        match self {
            Likelihood::Bernoulli => params.sigmoid(),
            Likelihood::Gaussian => params.clamp(0.0, 1.0),
            Likelihood::L1 | Likelihood::L2 => ((params + 1.0) * 0.5).clamp(0.0, 1.0),
        }
    }
}

/// The diagonal Gaussian q(z|x).
#[derive(Debug)]
pub struct Posterior {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl Posterior {
    /// z = mean + exp(logvar / 2) * eps: the noise is drawn apart from the parameters, so the
    /// sample stays differentiable in mean and logvar (the reparameterization trick).
    pub fn sample(&self) -> Tensor {
        self.sample_with_noise(&self.mean.randn_like())
    }

    /// The sample for given standard-normal noise `eps`, shaped like `mean`.
    pub fn sample_with_noise(&self, eps: &Tensor) -> Tensor {
        &self.mean + (&self.logvar * 0.5).exp() * eps
    }

    /// KL(q(z|x) || N(0, I)) in closed form, one value per example:
    /// 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar).
    pub fn kl_to_standard_normal(&self) -> Tensor {
        self.kl_per_dimension().sum_dim_intlist(-1, false, None)
    }

    /// The KL's terms, `[B, D]`: what each latent dimension costs for each example.
    pub fn kl_per_dimension(&self) -> Tensor {
        (self.mean.square() + self.logvar.exp() - 1.0 - &self.logvar) * 0.5
    }
}

/// What one pass of the model produces for a batch.
pub struct Forward {
    pub posterior: Posterior,
    /// Parameters of p(x|z) at the sampled z.
    pub likelihood_params: Tensor,
}

/// How the layers compute: no field changes the function, only speed, memory and rounding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compute {
    /// The dtype of the convs and matmuls (see [`crate::precision`]).
    pub kind: Kind,
    /// Feature maps laid out NHWC in memory (still indexed NCHW): oneDNN's convs run much
    /// faster on it on the CPU.
    pub channels_last: bool,
    /// Gradient checkpointing: the forward keeps each block's input alone and the backward
    /// computes the block again (families that have blocks; see [`crate::native::checkpoint`]).
    pub checkpoint: bool,
}

impl Default for Compute {
    fn default() -> Self {
        Self { kind: Kind::Float, channels_last: false, checkpoint: false }
    }
}

impl Compute {
    /// `kind`, in the layout that measured fastest on `device`: channels-last on the CPU;
    /// on CUDA the standard layout, as eager PyTorch uses (not measured here yet).
    pub fn for_device(kind: Kind, device: tch::Device) -> Self {
        Self { kind, channels_last: device == tch::Device::Cpu, checkpoint: false }
    }

    /// A feature map `[N, C, H, W]` in this dtype and layout. Either way the layout is made
    /// here: batches can arrive in either (decoded images are NHWC underneath), and every
    /// layer after the first keeps its input's.
    pub fn feature_map(&self, x: &Tensor) -> Tensor {
        let x = cast(x, self.kind);
        if self.channels_last {
            x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
        } else {
            x.contiguous()
        }
    }
}

/// PyTorch's default initialisation of a layer with `fan_in` inputs per output, for weights and
/// biases alike: uniform in ±1/sqrt(fan_in) (`kaiming_uniform_` with a = sqrt(5), and torch.nn's
/// bias rule), what `Conv2d`, `ConvTranspose2d` and `Linear` start from in PyTorch and hence in
/// diffusers. tch's default is sqrt(6) times wider with zero conv biases; on the classic model
/// that alone cost about 1 nat of test -ELBO after 10 Fashion-MNIST epochs.
pub fn torch_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    nn::Init::Uniform { lo: -bound, up: bound }
}

/// A linear layer initialised as torch.nn.Linear.
pub fn linear(vs: nn::Path, i: i64, o: i64) -> nn::Linear {
    let init = torch_init(i);
    nn::linear(vs, i, o, nn::LinearConfig { ws_init: init, bs_init: Some(init), bias: true })
}

/// A square convolution initialised as torch.nn.Conv2d.
pub fn conv2d(vs: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let init = torch_init(i * k * k);
    nn::conv2d(
        vs,
        i,
        o,
        k,
        nn::ConvConfig { stride, padding, ws_init: init, bs_init: init, ..Default::default() },
    )
}

/// A square transposed convolution initialised as torch.nn.ConvTranspose2d (whose fan-in
/// PyTorch reads from the weight's second dimension: the output channels).
pub fn conv_transpose2d(
    vs: nn::Path,
    i: i64,
    o: i64,
    k: i64,
    stride: i64,
    padding: i64,
) -> nn::ConvTranspose2D {
    let init = torch_init(o * k * k);
    let cfg = nn::ConvTransposeConfig { stride, padding, ws_init: init, bs_init: init, ..Default::default() };
    nn::conv_transpose2d(vs, i, o, k, cfg)
}

/// A linear layer run in `kind` on its float32 weights.
pub fn run_linear(layer: &nn::Linear, x: &Tensor, kind: Kind) -> Tensor {
    x.linear(&cast(&layer.ws, kind), layer.bs.as_ref().map(|b| cast(b, kind)))
}

/// A square convolution run in `kind` on its float32 weights, with the given stride and
/// padding.
pub fn run_conv(layer: &nn::Conv2D, x: &Tensor, kind: Kind, stride: i64, padding: i64) -> Tensor {
    let bias = layer.bs.as_ref().map(|b| cast(b, kind));
    x.conv2d(&cast(&layer.ws, kind), bias, [stride; 2], [padding; 2], [1; 2], 1)
}

/// Layers run in the compute dtype on weights cast from their float32 masters. The cast is
/// part of the graph, so gradients reach the float32 weights; for float32 it is a no-op.
pub fn cast(t: &Tensor, kind: Kind) -> Tensor {
    t.to_kind(kind)
}

/// Pixels (images x height x width) of one pass of a model in evaluation, so that a batch of
/// any image size holds one pass's activations, not its own. On CUDA, 2^21: a whole
/// evaluation batch of small images (500 of 64 x 64), 128 of 128 x 128, 32 of 256 x 256, 8 of
/// 512 x 512. On the CPU, 2^16 (16 images of 64 x 64, 4 of 128 x 128): activations small
/// enough for glibc to reuse their blocks (see `cli::keep_freed_memory`) instead of mapping
/// and faulting in fresh ones, which made larger passes slower and bigger (`vae eval` of 64
/// images of 128 x 128, the small SD-like config: 68 s and 3.1 GB at 2^21, 37 s and 1.0 GB
/// at 2^16).
pub fn pixels_per_pass(device: Device) -> i64 {
    if device.is_cuda() {
        1 << 21
    } else {
        1 << 16
    }
}

/// `f(first, part)` over consecutive parts of `rows` (dimension 0), each as many rows as
/// images of `h` x `w` fill [`pixels_per_pass`], the results concatenated (one part: `rows`
/// itself, no copy). Bounds memory without a gradient (evaluation); with one, every part's
/// graph is held until the backward.
pub fn in_passes(rows: &Tensor, [h, w]: [i64; 2], f: impl Fn(i64, &Tensor) -> Tensor) -> Tensor {
    let pass = pixels_per_pass(rows.device());
    let (count, size) = (rows.size()[0], (pass / (h * w).max(1)).max(1));
    if count <= size {
        return f(0, rows);
    }
    let parts: Vec<Tensor> = passes(count, size).map(|(i, n)| f(i, &rows.narrow(0, i, n))).collect();
    Tensor::cat(&parts, 0)
}

/// `(first, count)` of the consecutive passes of at most `size` rows over `count`.
pub fn passes(count: i64, size: i64) -> impl Iterator<Item = (i64, i64)> {
    (0..count).step_by(size as usize).map(move |i| (i, size.min(count - i)))
}

/// What the rest of the crate needs of a model: the two halves of the VAE.
pub trait Model {
    /// q(z|x)'s parameters, in float32 whatever dtype the layers ran in.
    fn encode(&self, x: &Tensor) -> Posterior;
    /// p(x|z)'s parameters for each pixel (logits or means), in float32.
    fn decode(&self, z: &Tensor) -> Tensor;
    fn likelihood(&self) -> Likelihood;
    /// Dimensions of the latent vector z.
    fn latent_dim(&self) -> i64;
    /// Set once by the trainer for the device and precision; the function is unchanged.
    fn set_compute(&mut self, compute: Compute);
    /// How the layers compute now.
    fn compute(&self) -> Compute;
    /// The weight of the decoder's last layer, where the adversarial term's adaptive weight
    /// compares gradient norms.
    fn last_layer(&self) -> Tensor;

    /// Encode, draw z with the reparameterization trick, decode.
    fn forward(&self, x: &Tensor) -> Forward {
        let posterior = self.encode(x);
        let z = posterior.sample();
        Forward { likelihood_params: self.decode(&z), posterior }
    }

    /// As [`forward`](Model::forward), with the standard-normal noise given (`[B, D]`).
    fn forward_with_noise(&self, x: &Tensor, eps: &Tensor) -> Forward {
        let posterior = self.encode(x);
        let z = posterior.sample_with_noise(eps);
        Forward { likelihood_params: self.decode(&z), posterior }
    }

    /// Images in [0, 1] that the decoder expects at `z` (its mean, not a sample).
    fn decode_mean(&self, z: &Tensor) -> Tensor {
        self.likelihood().mean(&self.decode(z))
    }

    /// [`encode`](Model::encode) for an evaluation batch of any size, in passes (see
    /// [`in_passes`]).
    fn encode_in_passes(&self, x: &Tensor) -> Posterior {
        let size = x.size();
        let d = self.latent_dim();
        let both = in_passes(x, [size[2], size[3]], |_, x| {
            let q = self.encode(x);
            Tensor::cat(&[q.mean, q.logvar], 1)
        });
        Posterior { mean: both.narrow(1, 0, d), logvar: both.narrow(1, d, d) }
    }

    /// `x` decoded from its posterior mean, in [0, 1]: images of any size the model takes.
    fn reconstruct(&self, x: &Tensor) -> Tensor {
        self.decode_mean(&self.encode(x).mean)
    }

    /// The latent's channels, each a contiguous run of `latent_dim() / latent_channels()`
    /// elements of z (a vector latent: one per dimension); traversals sweep them.
    fn latent_channels(&self) -> i64 {
        self.latent_dim()
    }
}

/// A model family, as `--arch` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// The textbook convolutional VAE: strided convs, a dense bottleneck, a latent vector.
    Conv,
    /// Latent diffusion's residual KL-autoencoder (diffusers' AutoencoderKL), spatial latent.
    Resnet,
}

impl Arch {
    /// The family's default architecture.
    pub fn default_config(self) -> ModelConfig {
        match self {
            Arch::Conv => ModelConfig::Conv(ConvConfig::default()),
            Arch::Resnet => ModelConfig::Resnet(ResnetConfig::default()),
        }
    }

    /// The family's usual KL weight: the ELBO's 1, or latent diffusion's 1e-6.
    pub fn default_beta(self) -> f64 {
        match self {
            Arch::Conv => 1.0,
            Arch::Resnet => 1e-6,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Conv => "conv",
            Arch::Resnet => "resnet",
        }
    }
}

/// A parameter count that stops at u128::MAX instead of overflowing: a config read from a
/// file may hold any i64 (2^62 channels squared overflow even u128, which wrapped to a count
/// that passed), and the count is what refuses such a config before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Count(pub u128);

impl Count {
    /// A size from a config; a negative one counts as none.
    pub fn of(v: i64) -> Self {
        Count(v.max(0) as u128)
    }
}

impl std::ops::Add for Count {
    type Output = Count;
    fn add(self, other: Count) -> Count {
        Count(self.0.saturating_add(other.0))
    }
}

impl std::ops::Mul for Count {
    type Output = Count;
    fn mul(self, other: Count) -> Count {
        Count(self.0.saturating_mul(other.0))
    }
}

impl std::ops::AddAssign for Count {
    fn add_assign(&mut self, other: Count) {
        *self = *self + other;
    }
}

impl std::iter::Sum for Count {
    fn sum<I: Iterator<Item = Count>>(counts: I) -> Count {
        counts.fold(Count(0), |a, b| a + b)
    }
}

/// The architecture, one variant per family; stored in every checkpoint (as the family's
/// fields plus `"arch"`) so a model can be rebuilt from its file alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "kebab-case")]
pub enum ModelConfig {
    Conv(ConvConfig),
    Resnet(ResnetConfig),
}

impl ModelConfig {
    pub fn arch(&self) -> Arch {
        match self {
            ModelConfig::Conv(_) => Arch::Conv,
            ModelConfig::Resnet(_) => Arch::Resnet,
        }
    }

    /// The model, its parameters created under `vs`.
    pub fn build(&self, vs: nn::Path) -> Box<dyn Model> {
        match self {
            ModelConfig::Conv(c) => Box::new(ConvVae::new(vs, c)),
            ModelConfig::Resnet(c) => Box::new(ResnetVae::new(vs, c)),
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::Conv(c) => c.validate(),
            ModelConfig::Resnet(c) => c.validate(),
        }
    }

    /// Trainable parameters, computed without building the model (a saturating [`Count`], so
    /// any config from a file can be sized safely).
    pub fn parameter_count(&self) -> u128 {
        match self {
            ModelConfig::Conv(c) => c.parameter_count(),
            ModelConfig::Resnet(c) => c.parameter_count(),
        }
    }

    /// Whether the parameter `name` belongs to the encoder side, up to the latent's
    /// parameters (`--freeze-encoder` keeps those as they are).
    pub fn is_encoder(&self, name: &str) -> bool {
        name.starts_with("encoder.") || (self.arch() == Arch::Resnet && name.starts_with("quant_conv."))
    }

    /// `[C, H, W]` of the images the model takes.
    pub fn image_shape(&self) -> [i64; 3] {
        match self {
            ModelConfig::Conv(c) => [c.in_channels, c.image_size, c.image_size],
            ModelConfig::Resnet(c) => [c.in_channels, c.image_size, c.image_size],
        }
    }

    /// `[H, W]` of the images latents of `size` (`[N, ...]`) decode to: any `[N, C, h, w]` for the
    /// fully convolutional resnet family, `[N, latent]` alone for the conv family; `None` for
    /// latents the model cannot take.
    pub fn decoded_size(&self, size: &[i64]) -> Option<[i64; 2]> {
        match (self, size) {
            (ModelConfig::Conv(c), [_, d]) if *d == c.latent_dim => Some([c.image_size; 2]),
            (ModelConfig::Resnet(c), [_, channels, h, w])
                if *channels == c.latent_channels && *h > 0 && *w > 0 =>
            {
                Some([h, w].map(|side| side * c.downscale()))
            }
            _ => None,
        }
    }

    /// Sets the image shape the data decides.
    pub fn set_image_shape(&mut self, channels: i64, side: i64) {
        match self {
            ModelConfig::Conv(c) => (c.in_channels, c.image_size) = (channels, side),
            ModelConfig::Resnet(c) => (c.in_channels, c.image_size) = (channels, side),
        }
    }

    pub fn set_likelihood(&mut self, likelihood: Likelihood) {
        match self {
            ModelConfig::Conv(c) => c.likelihood = likelihood,
            ModelConfig::Resnet(c) => c.likelihood = likelihood,
        }
    }

    pub fn likelihood(&self) -> Likelihood {
        match self {
            ModelConfig::Conv(c) => c.likelihood,
            ModelConfig::Resnet(c) => c.likelihood,
        }
    }

    pub fn latent_dim(&self) -> i64 {
        match self {
            ModelConfig::Conv(c) => c.latent_dim,
            ModelConfig::Resnet(c) => c.latent_dim(),
        }
    }

    /// Tiles of `pixels` a side (the training image size when not given) for `--tile`: the
    /// resnet family alone, whose latent is a feature map, in sides of a multiple of 4 latent
    /// positions, so that every tile starts on one and the overlaps are whole.
    pub fn tile(&self, pixels: Option<i64>) -> Result<Tile> {
        let ModelConfig::Resnet(c) = self else {
            bail!("--tile: the conv family's latent is one vector per image, which has no tiles; tiles are for --arch resnet")
        };
        let (pixels, downscale) = (pixels.unwrap_or(c.image_size), c.downscale());
        let unit = 4 * downscale;
        ensure!(
            pixels >= unit && pixels % unit == 0,
            "--tile {pixels}: tiles need a side that is a multiple of {unit} pixels (4 latent positions of the \
             model's {downscale}-pixel downscale), such as {}",
            (pixels / unit).max(1) * unit
        );
        Ok(Tile { pixels, downscale })
    }

    /// The latent of one training image as its family lays it out: `[D]`, or `[C, h, w]`.
    pub fn latent_shape(&self) -> Vec<i64> {
        match self {
            ModelConfig::Conv(c) => vec![c.latent_dim],
            ModelConfig::Resnet(c) => c.latent_shape().to_vec(),
        }
    }

    /// The architecture in a line, for messages (the image shape and loss left out).
    pub fn summary(&self) -> String {
        match self {
            ModelConfig::Conv(c) => {
                format!("--arch conv, conv channels {:?}, hidden {}, latent dim {}", c.channels, c.hidden, c.latent_dim)
            }
            ModelConfig::Resnet(c) => format!(
                "--arch resnet, block channels {:?}, {} layers per block, {} latent channels, {} norm groups, {}{}",
                c.block_channels,
                c.layers_per_block,
                c.latent_channels,
                c.norm_groups,
                if c.mid_attention { "mid attention" } else { "no mid attention" },
                if c.quant_convs { "" } else { ", no quant convs" }
            ),
        }
    }

    /// Reads a config written before `"arch"` existed: those are all conv models.
    pub fn upgrade_json(model: &mut serde_json::Value) {
        if let Some(fields) = model.as_object_mut() {
            fields.entry("arch").or_insert_with(|| "conv".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn both_families_start_from_pytorchs_default_initialisation() {
        let resnet =
            ResnetConfig { block_channels: vec![32, 64], layers_per_block: 1, ..ResnetConfig::default() };
        for cfg in [ModelConfig::Conv(ConvConfig::default()), ModelConfig::Resnet(resnet)] {
            let vs = nn::VarStore::new(Device::Cpu);
            let _model = cfg.build(vs.root());
            let vars = vs.variables();
            for (name, t) in &vars {
                let (layer, kind) = name.rsplit_once('.').unwrap();
                if layer.contains("norm") {
                    let expected = if kind == "weight" { 1.0 } else { 0.0 };
                    assert!(
                        t.eq(expected).all().int64_value(&[]) == 1,
                        "{name}: GroupNorm starts at {expected}"
                    );
                    continue;
                }
                // PyTorch's fan-in: the weight's second dimension times its kernel, for
                // Linear, Conv2d and ConvTranspose2d alike; a bias takes its weight's.
                let weight = &vars[&format!("{layer}.weight")];
                let fan_in: i64 = weight.size()[1..].iter().product();
                let bound = 1.0 / (fan_in as f64).sqrt();
                let largest = t.abs().max().double_value(&[]);
                assert!(largest <= bound, "{name}: {largest} beyond 1/sqrt({fan_in})");
                // Filling the bound (not zero, not narrower): the largest of n uniform draws
                // stays under 0.5 of it with probability 0.5^n, under 0.9 with 0.9^n, below
                // 1e-11 for the sizes asked.
                let filled = match t.numel() {
                    n if n >= 256 => 0.9,
                    n if n >= 64 => 0.5,
                    _ => 0.0,
                };
                assert!(largest > filled * bound, "{name}: {largest} well inside 1/sqrt({fan_in})");
            }
        }
    }

    #[test]
    fn kl_closed_form_matches_monte_carlo() {
        tch::manual_seed(0);
        let mean = Tensor::from_slice(&[0.5f32, -1.0, 0.0]).view([1, 3]);
        let logvar = Tensor::from_slice(&[0.0f32, -1.0, 0.7]).view([1, 3]);
        let q = Posterior { mean: mean.repeat([200_000, 1]), logvar: logvar.repeat([200_000, 1]) };
        let z = q.sample();
        // log q(z) - log p(z) per sample; the 2*pi terms cancel.
        let log_q = -((&z - &q.mean).square() / q.logvar.exp() + &q.logvar) * 0.5;
        let log_p = -z.square() * 0.5;
        let mc = (log_q - log_p).sum_dim_intlist(-1, false, None).mean(None).double_value(&[]);
        let closed = Posterior { mean, logvar }.kl_to_standard_normal().double_value(&[0]);
        assert!((mc - closed).abs() < 0.02, "Monte Carlo {mc} vs closed form {closed}");
    }

    #[test]
    fn gradients_flow_through_the_sample_to_mean_and_logvar() {
        let mean = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let logvar = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let q = Posterior { mean: mean.shallow_clone(), logvar: logvar.shallow_clone() };
        tch::manual_seed(1);
        let z = q.sample();
        z.sum(None).backward();
        // d(sum z)/d mean = 1, d(sum z)/d logvar = eps * exp(logvar/2) / 2 = eps / 2.
        assert!(mean.grad().allclose(&Tensor::ones([4, 3], (Kind::Float, Device::Cpu)), 1e-6, 1e-6, false));
        let eps = z.detach();
        assert!(logvar.grad().allclose(&(eps / 2.0), 1e-6, 1e-6, false));
        assert!(logvar.grad().abs().sum(None).double_value(&[]) > 0.0);
    }
}
