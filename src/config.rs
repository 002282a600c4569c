//! Every training setting, declared once: its flag, default and help ([`TrainArgs`]; the
//! architecture's and Adam's defaults come from their own configs), what it sets in the run's
//! config and what a resumed run may do with it ([`SETTINGS`]), and the checks on the config
//! ([`TrainConfig::validate`]). The config is what a checkpoint keeps.

use crate::adam::AdamConfig;
use crate::adversarial::{self, DiscLoss};
use crate::data::{as_typed, Binarize, DataArgs, DataConfig};
use crate::device::DeviceArgs;
use crate::loss::Perceptual;
use crate::models::{Arch, ConvConfig, Likelihood, ModelConfig, ResnetConfig};
use crate::perceptual::Lpips;
use crate::precision::Precision;
use crate::schedule::{LrSchedule, Schedule};
use crate::ssim;
use anyhow::{bail, ensure, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything that determines a run's numbers; saved in each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub adam: AdamConfig,
    /// Total epochs of the run (a resumed run continues up to this).
    pub epochs: u64,
    /// Steps (batches) after which the run stops, mid-epoch if need be; 0: the epochs alone.
    #[serde(default)]
    pub max_steps: u64,
    pub batch_size: usize,
    /// Weight of the KL term; 1 is the ELBO.
    pub beta: f64,
    pub seed: u64,
    pub binarize: Binarize,
    /// What the convs and matmuls compute in.
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Steps of linear learning-rate warm-up.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Epochs over which the KL weight rises linearly from 0 to beta.
    #[serde(default)]
    pub kl_warmup_epochs: f64,
    /// Free bits: nats per latent dimension not penalised.
    #[serde(default)]
    pub free_bits: f64,
    /// Largest global gradient norm; larger gradients are scaled down to it.
    #[serde(default)]
    pub clip_grad: Option<f64>,
    /// Random left-right flips of the training images.
    #[serde(default)]
    pub hflip: bool,
    /// Decay of the weights' moving average; 0: none kept.
    #[serde(default)]
    pub ema_decay: f64,
    /// Train the decoder alone, the encoder (and the resnet's quant_conv) kept as they are.
    #[serde(default)]
    pub freeze_encoder: bool,
    /// The test figure that picks `best.safetensors`.
    #[serde(default)]
    pub best_by: BestBy,
    /// Test evaluations in a row without a better `best_by` figure that stop the run; 0: none.
    #[serde(default)]
    pub patience: u64,
    /// Micro-batches each optimizer step's batch is split into (gradients accumulated).
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Weight of the LPIPS distance in the loss, counted once per pixel as latent diffusion's
    /// `LPIPSWithDiscriminator` does; 0: off.
    #[serde(default)]
    pub perceptual_weight: f64,
    /// The LPIPS network's weights (safetensors), for the perceptual term or `--best-by lpips`.
    #[serde(default)]
    pub lpips_weights: Option<PathBuf>,
    /// pytorch-fid's Inception weights, for the test evaluation's rFID.
    #[serde(default)]
    pub fid_weights: Option<PathBuf>,
    /// Weight of the adversarial term (times the adaptive weight); 0: no discriminator.
    #[serde(default)]
    pub disc_weight: f64,
    /// The step from which the discriminator trains and its term counts.
    #[serde(default)]
    pub disc_start: u64,
    #[serde(default)]
    pub disc_loss: DiscLoss,
    /// The discriminator's Adam.
    #[serde(default = "disc_adam")]
    pub disc_adam: AdamConfig,
    /// Keep only each block's input in the forward and compute the block again in the backward
    /// (resnet family): the same numbers in less memory, for a second forward's time.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

fn one() -> usize {
    1
}

/// The test figure that picks a run's best checkpoint (`--best-by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BestBy {
    /// The test loss (the negative ELBO where the likelihood is a density).
    #[default]
    Loss,
    /// Peak signal-to-noise ratio, dB.
    Psnr,
    /// Structural similarity (scikit-image's, Gaussian window).
    Ssim,
    /// LPIPS distance (VGG).
    Lpips,
    /// Fréchet Inception Distance between the test images and their reconstructions.
    Rfid,
}

impl BestBy {
    /// The figure's name in messages ("best test SSIM 0.91").
    pub fn name(self) -> &'static str {
        match self {
            Self::Loss => "loss",
            Self::Psnr => "PSNR",
            Self::Ssim => "SSIM",
            Self::Lpips => "LPIPS",
            Self::Rfid => "rFID",
        }
    }

    /// Whether the figure `new` beats `old`: lower loss and LPIPS, higher PSNR and SSIM.
    pub fn improves(self, new: f64, old: f64) -> bool {
        match self {
            Self::Loss | Self::Lpips | Self::Rfid => new < old,
            Self::Psnr | Self::Ssim => new > old,
        }
    }
}

/// Latent diffusion's Adam for the discriminator: betas (0.5, 0.9).
fn disc_adam() -> AdamConfig {
    AdamConfig { beta1: 0.5, beta2: 0.9, ..AdamConfig::default() }
}

/// The flags' defaults, for the dataset's usual shape.
impl Default for TrainConfig {
    fn default() -> Self {
        TrainArgs::defaults().config()
    }
}

/// The flags that make a run's config (`vae train` and `vae bench` take them all).
#[derive(Args, Debug, Clone)]
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Flip each training image left-right with probability 1/2 each time it is seen.
    #[arg(long)]
    pub hflip: bool,
    /// How pixel intensities become targets.
    #[arg(long, value_enum, default_value = "none")]
    pub binarize: Binarize,
    /// The model family.
    #[arg(long, value_enum, default_value = "conv")]
    pub arch: Arch,
    /// Decoder distribution or pixel loss (alias --recon) [default: conv: bernoulli for 1
    /// channel, gaussian for 3; resnet: l1].
    #[arg(long, value_enum, alias = "recon")]
    pub likelihood: Option<Likelihood>,
    /// Conv: output channels of each stride-2 conv stage of the encoder.
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "32,64")]
    pub conv_channels: Vec<i64>,
    /// Conv: width of the hidden linear layer.
    #[arg(long, default_value_t = ConvConfig::default().hidden)]
    pub hidden: i64,
    /// Conv: dimension of the latent space.
    #[arg(long, default_value_t = ConvConfig::default().latent_dim)]
    pub latent_dim: i64,
    /// Resnet: channels of each down block (diffusers' block_out_channels), e.g.
    /// 128,256,512,512 for Stable Diffusion's VAE.
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "64,128,256")]
    pub block_channels: Vec<i64>,
    /// Resnet: residual blocks per down block (the up blocks have one more).
    #[arg(long, default_value_t = ResnetConfig::default().layers_per_block)]
    pub layers_per_block: i64,
    /// Resnet: channels of the spatial latent.
    #[arg(long, default_value_t = ResnetConfig::default().latent_channels)]
    pub latent_channels: i64,
    /// Resnet: GroupNorm groups (they divide every block's channels).
    #[arg(long, default_value_t = ResnetConfig::default().norm_groups)]
    pub norm_groups: i64,
    /// Resnet: self-attention in the middle blocks (the default).
    #[arg(long, overrides_with = "no_mid_attention")]
    pub mid_attention: bool,
    /// Resnet: no self-attention in the middle blocks.
    #[arg(long, overrides_with = "mid_attention")]
    pub no_mid_attention: bool,
    /// Resnet: no 1x1 convolutions around the latent (diffusers' use_quant_conv and
    /// use_post_quant_conv false, as in SD3's and Flux's autoencoders).
    #[arg(long)]
    pub no_quant_convs: bool,
    /// Total epochs of the run; a resumed run may raise it.
    #[arg(long, default_value_t = 10)]
    pub epochs: u64,
    /// Stop the run after this many steps (batches) in all, mid-epoch if need be, with a test
    /// evaluation and checkpoints there, as latent diffusion's runs are measured; a resumed
    /// run may raise it (0: no limit, the epochs alone).
    #[arg(long, default_value_t = 0)]
    pub max_steps: u64,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = AdamConfig::default().lr)]
    pub lr: f64,
    /// Weight of the KL term [default: 1 for conv, the ELBO; 1e-6 for resnet, latent
    /// diffusion's KL weight].
    #[arg(long)]
    pub beta: Option<f64>,
    /// Epochs over which the KL weight rises linearly from 0 to --beta (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    pub kl_warmup_epochs: f64,
    /// Nats per latent dimension (batch-averaged) that the KL term does not penalise.
    #[arg(long, default_value_t = 0.0)]
    pub free_bits: f64,
    /// Largest global L2 norm of the gradients; larger ones are scaled down to it.
    #[arg(long)]
    pub clip_grad: Option<f64>,
    #[arg(long, value_enum, default_value = "constant")]
    pub lr_schedule: LrSchedule,
    /// Steps of linear learning-rate warm-up from 0.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// L2 penalty added to the gradients, as torch.optim.Adam's weight_decay.
    #[arg(long, default_value_t = AdamConfig::default().weight_decay)]
    pub weight_decay: f64,
    /// Adam's beta1,beta2 for the autoencoder (latent diffusion's recipe: 0.5,0.9).
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "0.9,0.999")]
    pub betas: Vec<f64>,
    /// Seed of every random draw: initialisation, shuffling, noise, generated data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.9999; 0: none),
    /// used by the test evaluation, pictures, eval and exports (unless they get --no-ema).
    #[arg(long, default_value_t = 0.0)]
    pub ema_decay: f64,
    /// Train the decoder alone, the encoder (and the resnet's quant_conv) kept as it starts:
    /// the latents stay those a diffusion model was trained on, as Stable Diffusion's
    /// fine-tuned VAEs (sd-vae-ft-mse) were made, so the result drops in for the original.
    #[arg(long)]
    pub freeze_encoder: bool,
    /// The test figure that picks best.safetensors: the loss, or the image quality people of
    /// this field report (lpips needs --lpips-weights, rfid --fid-weights, ssim images of 11
    /// pixels a side).
    #[arg(long, value_enum, default_value = "loss")]
    pub best_by: BestBy,
    /// Stop the run early after this many test evaluations in a row (epoch ends, and those of
    /// --eval-every-steps) that did not better its --best-by figure; a resumed run may raise
    /// it (0: never).
    #[arg(long, default_value_t = 0)]
    pub patience: u64,
    /// Split each step's batch into this many micro-batches, run one after another with their
    /// gradients summed: the same step (to float rounding) in 1/N of the activation memory.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// What the convs and matmuls compute in (weights and Adam stay float32); f16 needs CUDA.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Resnet: gradient checkpointing, as diffusers' enable_gradient_checkpointing: keep only
    /// each down, middle and up block's input and compute the block again in the backward.
    /// The same numbers in far less activation memory, for about one more forward's time. A
    /// resumed run keeps the checkpoint's choice unless given `--gradient-checkpointing false`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub gradient_checkpointing: bool,
    /// Add W x LPIPS(x, x̂) to each pixel's reconstruction loss (latent diffusion's perceptual
    /// term; needs --recon l1 or l2 and --lpips-weights). 0: off.
    #[arg(long, default_value_t = 0.0)]
    pub perceptual_weight: f64,
    /// The LPIPS (VGG, v0.1) weights as safetensors; scripts/lpips_weights.py writes them.
    #[arg(long)]
    pub lpips_weights: Option<PathBuf>,
    /// pytorch-fid's Inception weights as safetensors (scripts/fid_weights.py writes them):
    /// each test evaluation then reports rFID, its reconstructions against its images.
    #[arg(long)]
    pub fid_weights: Option<PathBuf>,
    /// Train a PatchGAN discriminator and add W x (adaptive weight) x its generator loss
    /// (latent diffusion: 0.5; needs --recon l1 or l2). 0: off.
    #[arg(long, default_value_t = 0.0)]
    pub disc_weight: f64,
    /// The step from which the discriminator trains and its term counts (latent diffusion:
    /// 50001); before it, the autoencoder trains on the other terms alone.
    #[arg(long, default_value_t = 0)]
    pub disc_start: u64,
    /// The discriminator's loss.
    #[arg(long, value_enum, default_value = "hinge")]
    pub disc_loss: DiscLoss,
    /// The discriminator's learning rate [default: --lr].
    #[arg(long)]
    pub disc_lr: Option<f64>,
    /// The discriminator's Adam beta1,beta2.
    #[arg(long, value_delimiter = ',', action = clap::ArgAction::Set, default_value = "0.5,0.9")]
    pub disc_betas: Vec<f64>,
}

/// What a resumed run may do with a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnResume {
    /// What the checkpoint is: architecture, data, seed, batch size. A different value is
    /// refused, naming the flag.
    Fixed,
    /// A training knob people change mid-run (rate, schedule, clipping, KL weight, length):
    /// applied, printed, and kept in the checkpoint's history; the run is then no longer
    /// bitwise an uninterrupted one.
    Changeable,
    /// Where this process finds things and how it runs and reports: taken as given.
    Process,
}

/// One flag of `vae train`.
pub struct Setting {
    /// clap's id: the field name in [`TrainArgs`] (or the run options).
    pub id: &'static str,
    pub on_resume: OnResume,
    /// Writes the flag's value into a config; settings of this process only write nothing.
    apply: fn(&TrainArgs, &mut TrainConfig),
}

impl Setting {
    /// `--flag-name`.
    pub fn flag(&self) -> String {
        format!("--{}", self.id.replace('_', "-"))
    }
}

use OnResume::{Changeable, Fixed, Process};

const fn setting(id: &'static str, on_resume: OnResume, apply: fn(&TrainArgs, &mut TrainConfig)) -> Setting {
    Setting { id, on_resume, apply }
}

fn nothing(_: &TrainArgs, _: &mut TrainConfig) {}

/// Sets a field of the conv architecture (a flag of the other family changes nothing; see
/// [`TrainArgs::check_arch_flags`]).
fn conv(c: &mut TrainConfig, set: impl FnOnce(&mut ConvConfig)) {
    if let ModelConfig::Conv(conv) = &mut c.model {
        set(conv)
    }
}

fn resnet(c: &mut TrainConfig, set: impl FnOnce(&mut ResnetConfig)) {
    if let ModelConfig::Resnet(resnet) = &mut c.model {
        set(resnet)
    }
}

/// The flags of one model family only.
const FAMILY_FLAGS: &[(Arch, &[&str])] = &[
    (Arch::Conv, &["conv_channels", "hidden", "latent_dim"]),
    (
        Arch::Resnet,
        &[
            "block_channels",
            "layers_per_block",
            "latent_channels",
            "norm_groups",
            "mid_attention",
            "no_mid_attention",
            "no_quant_convs",
        ],
    ),
];

/// Every flag of [`TrainArgs`], in `--help` order. `vae train`'s run options (folder,
/// saving, logging, the guard) are all [`OnResume::Process`].
pub const SETTINGS: &[Setting] = &[
    setting("device", Process, nothing),
    setting("threads", Process, nothing),
    setting("deterministic", Process, nothing),
    setting("dataset", Fixed, |a, c| c.data.kind = a.data.dataset),
    setting("data_dir", Process, |a, c| c.data.data_dir = a.data.location.data_dir.clone()),
    setting("max_memory", Process, |a, c| c.data.max_memory = a.data.location.max_memory),
    setting("image_size", Fixed, |a, c| c.data.image_size = a.data.side()),
    setting("channels", Fixed, |a, c| c.data.channels = a.data.channel_count()),
    setting("test_fraction", Fixed, |a, c| c.data.test_fraction = a.data.test_fraction),
    setting("cache_dir", Process, |a, c| {
        c.data.cache_dir = (!a.data.no_cache).then(|| a.data.cache_dir.clone())
    }),
    setting("no_cache", Process, |a, c| {
        c.data.cache_dir = (!a.data.no_cache).then(|| a.data.cache_dir.clone())
    }),
    setting("train_size", Fixed, |a, c| c.data.train_size = a.data.train_size),
    setting("test_size", Fixed, |a, c| c.data.test_size = a.data.test_size),
    setting("hflip", Fixed, |a, c| c.hflip = a.hflip),
    setting("binarize", Fixed, |a, c| c.binarize = a.binarize),
    setting("arch", Fixed, |a, c| {
        if c.model.arch() != a.arch {
            c.model = a.arch.default_config()
        }
    }),
    setting("likelihood", Fixed, |a, c| {
        let channels = a.data.channel_count();
        let default = match a.arch {
            Arch::Conv => Likelihood::default_for(channels),
            Arch::Resnet => Likelihood::L1,
        };
        c.model.set_likelihood(a.likelihood.unwrap_or(default))
    }),
    setting("conv_channels", Fixed, |a, c| conv(c, |m| m.channels = a.conv_channels.clone())),
    setting("hidden", Fixed, |a, c| conv(c, |m| m.hidden = a.hidden)),
    setting("latent_dim", Fixed, |a, c| conv(c, |m| m.latent_dim = a.latent_dim)),
    setting("block_channels", Fixed, |a, c| resnet(c, |m| m.block_channels = a.block_channels.clone())),
    setting("layers_per_block", Fixed, |a, c| resnet(c, |m| m.layers_per_block = a.layers_per_block)),
    setting("latent_channels", Fixed, |a, c| resnet(c, |m| m.latent_channels = a.latent_channels)),
    setting("norm_groups", Fixed, |a, c| resnet(c, |m| m.norm_groups = a.norm_groups)),
    setting("mid_attention", Fixed, |a, c| resnet(c, |m| m.mid_attention = !a.no_mid_attention)),
    setting("no_mid_attention", Fixed, |a, c| resnet(c, |m| m.mid_attention = !a.no_mid_attention)),
    setting("no_quant_convs", Fixed, |a, c| resnet(c, |m| m.quant_convs = !a.no_quant_convs)),
    setting("epochs", Changeable, |a, c| c.epochs = a.epochs),
    setting("max_steps", Changeable, |a, c| c.max_steps = a.max_steps),
    setting("batch_size", Fixed, |a, c| c.batch_size = a.batch_size),
    setting("lr", Changeable, |a, c| c.adam.lr = a.lr),
    setting("beta", Changeable, |a, c| c.beta = a.beta.unwrap_or(c.model.arch().default_beta())),
    setting("kl_warmup_epochs", Changeable, |a, c| c.kl_warmup_epochs = a.kl_warmup_epochs),
    setting("free_bits", Changeable, |a, c| c.free_bits = a.free_bits),
    setting("clip_grad", Changeable, |a, c| c.clip_grad = a.clip_grad),
    setting("lr_schedule", Changeable, |a, c| c.lr_schedule = a.lr_schedule),
    setting("warmup_steps", Changeable, |a, c| c.warmup_steps = a.warmup_steps),
    setting("weight_decay", Changeable, |a, c| c.adam.weight_decay = a.weight_decay),
    setting("betas", Changeable, |a, c| (c.adam.beta1, c.adam.beta2) = pair(&a.betas)),
    setting("seed", Fixed, |a, c| c.seed = a.seed),
    setting("ema_decay", Fixed, |a, c| c.ema_decay = a.ema_decay),
    setting("freeze_encoder", Fixed, |a, c| c.freeze_encoder = a.freeze_encoder),
    setting("best_by", Changeable, |a, c| c.best_by = a.best_by),
    setting("patience", Changeable, |a, c| c.patience = a.patience),
    setting("grad_accum", Changeable, |a, c| c.grad_accum = a.grad_accum),
    setting("precision", Changeable, |a, c| c.precision = a.precision),
    setting("gradient_checkpointing", Process, |a, c| c.gradient_checkpointing = a.gradient_checkpointing),
    setting("perceptual_weight", Changeable, |a, c| c.perceptual_weight = a.perceptual_weight),
    setting("lpips_weights", Process, |a, c| c.lpips_weights = a.lpips_weights.clone()),
    setting("fid_weights", Process, |a, c| c.fid_weights = a.fid_weights.clone()),
    setting("disc_weight", Changeable, |a, c| c.disc_weight = a.disc_weight),
    setting("disc_start", Changeable, |a, c| c.disc_start = a.disc_start),
    setting("disc_loss", Changeable, |a, c| c.disc_loss = a.disc_loss),
    setting("disc_lr", Changeable, |a, c| c.disc_adam.lr = a.disc_lr.unwrap_or(a.lr)),
    setting("disc_betas", Changeable, |a, c| (c.disc_adam.beta1, c.disc_adam.beta2) = pair(&a.disc_betas)),
];

/// Two numbers given as `A,B`; any other count becomes NaN, which validation names.
fn pair(values: &[f64]) -> (f64, f64) {
    match values {
        [a, b] => (*a, *b),
        _ => (f64::NAN, f64::NAN),
    }
}

/// A setting a resumed run changed: the flag, and the config's values before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub flag: String,
    pub was: String,
    pub now: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> {}", self.flag, self.was, self.now)
    }
}

impl TrainArgs {
    /// Every flag at its default.
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            args: TrainArgs,
        }
        <Defaults as clap::Parser>::parse_from(["vae"]).args
    }

    /// The flags (clap ids) of one model family only.
    pub fn family_flags(arch: Arch) -> &'static [&'static str] {
        FAMILY_FLAGS.iter().find(|(family, _)| *family == arch).map_or(&[], |(_, ids)| ids)
    }

    /// Refuses a flag of another model family than `arch` (it would change nothing).
    pub fn check_arch_flags(matches: &ArgMatches, arch: Arch) -> Result<()> {
        for (family, ids) in FAMILY_FLAGS.iter().filter(|(family, _)| *family != arch) {
            if let Some(id) = ids.iter().find(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
            {
                bail!(
                    "--{} applies to --arch {}; this model is --arch {}",
                    id.replace('_', "-"),
                    family.name(),
                    arch.name()
                );
            }
        }
        Ok(())
    }

    /// The config these flags make for a new run. The image shape is the flags' (shapes,
    /// folder) or the dataset's usual one until the data is loaded.
    pub fn config(&self) -> TrainConfig {
        let mut cfg = TrainConfig {
            model: self.arch.default_config(),
            data: DataConfig::default(),
            adam: AdamConfig::default(),
            epochs: 0,
            max_steps: 0,
            batch_size: 0,
            beta: 0.0,
            seed: 0,
            binarize: Binarize::None,
            precision: Precision::F32,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            kl_warmup_epochs: 0.0,
            free_bits: 0.0,
            clip_grad: None,
            hflip: false,
            ema_decay: 0.0,
            freeze_encoder: false,
            best_by: BestBy::Loss,
            patience: 0,
            grad_accum: 1,
            perceptual_weight: 0.0,
            lpips_weights: None,
            fid_weights: None,
            disc_weight: 0.0,
            disc_start: 0,
            disc_loss: DiscLoss::Hinge,
            disc_adam: disc_adam(),
            gradient_checkpointing: false,
        };
        for s in SETTINGS {
            (s.apply)(self, &mut cfg);
        }
        cfg.model.set_image_shape(cfg.data.channels, cfg.data.image_size);
        cfg
    }

    /// The config a resumed run continues with: the checkpoint's `saved` one, with the flags
    /// given on the command line (`matches`) applied where a resume may change them. A flag
    /// that would change a fixed setting is an error naming it; the changed knobs are
    /// returned, to print and to keep in the checkpoint's history.
    pub fn resumed(
        &self,
        saved: &TrainConfig,
        matches: &ArgMatches,
        checkpoint: &std::path::Path,
    ) -> Result<(TrainConfig, Vec<Change>)> {
        saved.data.kind.check_flags(matches, &of_checkpoint(saved, checkpoint))?;
        let mut cfg = saved.clone();
        let mut changes = Vec::new();
        for s in SETTINGS.iter().filter(|s| matches.value_source(s.id) == Some(ValueSource::CommandLine)) {
            let before = serde_json::to_value(&cfg)?;
            (s.apply)(self, &mut cfg);
            let diffs = leaf_diffs(&before, &serde_json::to_value(&cfg)?);
            if diffs.is_empty() {
                continue;
            }
            let was = diffs.iter().map(|(was, _)| was.as_str()).collect::<Vec<_>>().join(", ");
            let now = diffs.iter().map(|(_, now)| now.as_str()).collect::<Vec<_>>().join(", ");
            match s.on_resume {
                Fixed => bail!(
                    "{} conflicts with the checkpoint {}, trained with {was}; a resumed run keeps its \
                     architecture, data, seed and batch size (start a new run to change them)",
                    as_typed(matches, s.id),
                    checkpoint.display()
                ),
                Changeable => changes.push(Change { flag: s.flag(), was, now }),
                Process => {}
            }
        }
        Ok((cfg, changes))
    }
}

/// The images a checkpoint's run trained on, as errors name them.
fn of_checkpoint(saved: &TrainConfig, checkpoint: &std::path::Path) -> String {
    format!("the {} images of {}", saved.data.name(), checkpoint.display())
}

/// The leaves (numbers, strings, lists) that differ between two JSON trees, as text.
fn leaf_diffs(a: &serde_json::Value, b: &serde_json::Value) -> Vec<(String, String)> {
    json_differences(a, b).into_iter().map(|(_, a, b)| (a, b)).collect()
}

/// The leaves that differ between two JSON trees: each one's path (`adam.lr`) and its two
/// values as text.
pub fn json_differences(a: &serde_json::Value, b: &serde_json::Value) -> Vec<(String, String, String)> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            let null = Value::Null;
            keys.into_iter()
                .flat_map(|k| {
                    json_differences(x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null)).into_iter().map(
                        move |(path, a, b)| {
                            (if path.is_empty() { k.clone() } else { format!("{k}.{path}") }, a, b)
                        },
                    )
                })
                .collect()
        }
        _ if a == b => Vec::new(),
        _ => vec![(String::new(), leaf_text(a), leaf_text(b))],
    }
}

fn leaf_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "none".into(),
        other => other.to_string(),
    }
}

impl TrainConfig {
    /// For the commands that read a checkpoint: its `saved` config with the flags of `data`
    /// given on the command line (`matches`) that say where this machine keeps the data
    /// (`--data-dir`, `--max-memory`, the cache). A flag that would change the data itself is
    /// refused, naming it: a checkpoint is judged on its own run's data.
    pub fn located(
        saved: &TrainConfig,
        data: &DataArgs,
        matches: &ArgMatches,
        checkpoint: &std::path::Path,
    ) -> Result<TrainConfig> {
        let args = TrainArgs { data: data.clone(), ..TrainArgs::defaults() };
        let data_ids: Vec<String> = <DataArgs as Args>::augment_args(clap::Command::new("data"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        let given = SETTINGS.iter().filter(|s| {
            data_ids.iter().any(|id| id == s.id)
                && matches.value_source(s.id) == Some(ValueSource::CommandLine)
        });
        let mut cfg = saved.clone();
        for s in given {
            ensure!(
                s.on_resume == Process,
                "{} applies to a diffusers folder, which has no data of its own; {} is judged on its \
                 run's data ({}), which --data-dir finds elsewhere",
                as_typed(matches, s.id),
                checkpoint.display(),
                saved.data.name()
            );
            (s.apply)(&args, &mut cfg);
        }
        saved.data.kind.check_flags(matches, &of_checkpoint(saved, checkpoint))?;
        Ok(cfg)
    }

    /// The config that judges a diffusers folder's architecture `arch` on the images `data`
    /// chooses (for generated shapes and image folders, by default at the folder's
    /// sample_size and in_channels), with the family's defaults for the rest (L1, KL weight
    /// 1e-6).
    pub fn pretrained(arch: ResnetConfig, data: &DataArgs, folder: &std::path::Path) -> Result<TrainConfig> {
        let mut args = TrainArgs { data: data.clone(), arch: Arch::Resnet, ..TrainArgs::defaults() };
        args.data.fit_to_weights([arch.in_channels, arch.image_size], folder)?;
        let mut cfg = args.config();
        // The folder's architecture, with the family's loss (L1) the flags also default to.
        cfg.model = ModelConfig::Resnet(arch);
        cfg.model.set_image_shape(cfg.data.channels, cfg.data.image_size);
        cfg.validate()
            .with_context(|| format!("judging {} on {} images", folder.display(), cfg.data.name()))?;
        Ok(cfg)
    }

    /// Checks every setting, naming the flag of any that makes no sense. Configs read from
    /// checkpoints pass through here too, before anything is allocated from them.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        ensure!(self.batch_size > 0, "--batch-size must be positive, found {}", self.batch_size);
        ensure!(self.epochs > 0, "--epochs must be positive, found {}", self.epochs);
        ensure!(
            self.adam.lr > 0.0 && self.adam.lr.is_finite(),
            "--lr must be positive, found {}",
            self.adam.lr
        );
        ensure!(self.beta >= 0.0 && self.beta.is_finite(), "--beta must be >= 0, found {}", self.beta);
        ensure!(
            self.kl_warmup_epochs >= 0.0 && self.kl_warmup_epochs.is_finite(),
            "--kl-warmup-epochs must be >= 0, found {}",
            self.kl_warmup_epochs
        );
        ensure!(
            self.free_bits >= 0.0 && self.free_bits.is_finite(),
            "--free-bits must be >= 0, found {}",
            self.free_bits
        );
        if let Some(clip) = self.clip_grad {
            ensure!(clip > 0.0 && clip.is_finite(), "--clip-grad must be positive, found {clip}");
        }
        let wd = self.adam.weight_decay;
        ensure!(wd >= 0.0 && wd.is_finite(), "--weight-decay must be >= 0, found {wd}");
        for (flag, adam) in [("--betas", &self.adam), ("--disc-betas", &self.disc_adam)] {
            ensure!(
                [adam.beta1, adam.beta2].iter().all(|b| (0.0..1.0).contains(b)),
                "{flag} takes two numbers in [0, 1) as B1,B2, found {},{}",
                adam.beta1,
                adam.beta2
            );
        }
        ensure!(
            (0.0..1.0).contains(&self.ema_decay),
            "--ema-decay must be in [0, 1), found {}",
            self.ema_decay
        );
        ensure!(
            (1..=self.batch_size).contains(&self.grad_accum),
            "--grad-accum must be between 1 and --batch-size {}, found {}",
            self.batch_size,
            self.grad_accum
        );
        ensure!(
            !self.gradient_checkpointing || self.model.arch() == Arch::Resnet,
            "--gradient-checkpointing applies to --arch resnet (the conv family has no blocks to checkpoint)"
        );
        let pw = self.perceptual_weight;
        ensure!(pw >= 0.0 && pw.is_finite(), "--perceptual-weight must be >= 0, found {pw}");
        if pw > 0.0 {
            let likelihood = self.model.likelihood();
            ensure!(
                !likelihood.is_density(),
                "--perceptual-weight compares reconstructed images, which needs a pixel loss (--recon l1 or l2), \
                 not --likelihood {}",
                clap::ValueEnum::to_possible_value(&likelihood).map(|v| v.get_name().to_owned()).unwrap_or_default()
            );
            ensure!(
                self.lpips_weights.is_some(),
                "--perceptual-weight needs --lpips-weights FILE (scripts/lpips_weights.py writes it)"
            );
        }
        self.validate_best_by()?;
        self.validate_adversarial()
    }

    fn validate_best_by(&self) -> Result<()> {
        let [_, h, w] = self.model.image_shape();
        match self.best_by {
            BestBy::Ssim => ensure!(
                ssim::applies(h, w),
                "--best-by ssim needs images of at least {} pixels a side, found {h}x{w}",
                ssim::MIN_SIDE
            ),
            BestBy::Lpips => ensure!(
                self.lpips_weights.is_some(),
                "--best-by lpips needs --lpips-weights FILE (scripts/lpips_weights.py writes it)"
            ),
            BestBy::Rfid => ensure!(
                self.fid_weights.is_some(),
                "--best-by rfid needs --fid-weights FILE (scripts/fid_weights.py writes it)"
            ),
            BestBy::Loss | BestBy::Psnr => {}
        }
        Ok(())
    }

    /// Whether the run computes LPIPS: for its loss, or to pick its best checkpoint.
    pub fn uses_lpips(&self) -> bool {
        self.perceptual_weight > 0.0 || self.best_by == BestBy::Lpips
    }

    fn validate_adversarial(&self) -> Result<()> {
        let dw = self.disc_weight;
        ensure!(dw >= 0.0 && dw.is_finite(), "--disc-weight must be >= 0, found {dw}");
        if dw == 0.0 {
            return Ok(());
        }
        let likelihood = self.model.likelihood();
        ensure!(
            !likelihood.is_density(),
            "--disc-weight shows the discriminator reconstructed images, which needs a pixel loss (--recon l1 \
             or l2), not --likelihood {}",
            clap::ValueEnum::to_possible_value(&likelihood).map(|v| v.get_name().to_owned()).unwrap_or_default()
        );
        let lr = self.disc_adam.lr;
        ensure!(lr > 0.0 && lr.is_finite(), "--disc-lr must be positive, found {lr}");
        let [_, side, _] = self.model.image_shape();
        ensure!(
            adversarial::output_side(side) >= 1,
            "--disc-weight: the PatchGAN discriminator needs images of side {} or more, found {side}",
            adversarial::min_side()
        );
        Ok(())
    }

    /// The perceptual term of this config's loss computed by `lpips`: None when the term is
    /// off, an error when it is on and no network was given.
    pub fn perceptual<'a>(&self, lpips: Option<&'a Lpips>) -> Result<Option<Perceptual<'a>>> {
        if self.perceptual_weight == 0.0 {
            return Ok(None);
        }
        let lpips = lpips.with_context(|| {
            format!(
                "this run's loss has a perceptual term (--perceptual-weight {}): give --lpips-weights FILE",
                self.perceptual_weight
            )
        })?;
        Ok(Some(Perceptual { lpips, weight: self.perceptual_weight, kind: self.precision.compute_kind() }))
    }

    /// Whether a run at `step` has taken its `--max-steps`.
    pub fn reached_max_steps(&self, step: u64) -> bool {
        self.max_steps > 0 && step >= self.max_steps
    }

    /// The learning-rate and KL-weight curves for a split of `train_images` images.
    pub fn schedule(&self, train_images: usize) -> Schedule {
        let steps_per_epoch = train_images.div_ceil(self.batch_size.max(1)) as u64;
        let by_epochs = self.epochs * steps_per_epoch;
        Schedule {
            lr: self.adam.lr,
            lr_schedule: self.lr_schedule,
            warmup_steps: self.warmup_steps,
            total_steps: if self.max_steps > 0 { by_epochs.min(self.max_steps) } else { by_epochs },
            beta: self.beta,
            kl_warmup_steps: (self.kl_warmup_epochs * steps_per_epoch as f64).round() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(argv: &[&str]) -> (TrainArgs, ArgMatches) {
        let matches = Cmd::command().get_matches_from(std::iter::once("vae").chain(argv.iter().copied()));
        (Cmd::from_arg_matches(&matches).unwrap().args, matches)
    }

    #[test]
    fn every_flag_has_exactly_one_setting() {
        let ids: Vec<String> = Cmd::command().get_arguments().map(|a| a.get_id().to_string()).collect();
        let declared: Vec<&str> = SETTINGS.iter().map(|s| s.id).collect();
        assert_eq!(ids, declared, "flags and SETTINGS differ: declare each flag in both, once, in order");
    }

    #[test]
    fn the_flags_defaults_are_the_configs_defaults() {
        let cfg = TrainConfig::default();
        assert_eq!(cfg.model, ModelConfig::Conv(ConvConfig::default()));
        let (args, _) = parse(&["--arch", "resnet", "--image-size", "64", "--channels", "3"]);
        assert_eq!(args.config().model, ModelConfig::Resnet(ResnetConfig::default()));
        assert_eq!(cfg.adam, AdamConfig::default());
        assert_eq!(cfg.data, DataConfig { cache_dir: cfg.data.cache_dir.clone(), ..DataConfig::default() });
    }

    #[test]
    fn a_data_flag_applies_only_to_the_datasets_that_read_it() {
        let check = |argv: &[&str]| {
            let (args, matches) = parse(argv);
            args.data.check_flags(&matches).map_err(|e| e.to_string())
        };
        let folder = ["--dataset", "folder", "--data-dir", "d", "--image-size", "32", "--channels", "1"];
        check(&[&folder[..], &["--test-fraction", "0.2", "--no-cache", "--max-memory", "1G"]].concat())
            .unwrap();
        check(&["--dataset", "mnist", "--data-dir", "d", "--train-size", "10"]).unwrap();
        check(&["--image-size", "32", "--channels", "3", "--cache-dir", "checkpoints/.cache"]).unwrap_err();
        assert_eq!(
            check(&["--dataset", "cifar10", "--test-fraction", "0.2"]).unwrap_err(),
            "--test-fraction 0.2 does not apply to --dataset cifar10: it applies to --dataset folder only"
        );
        assert_eq!(
            check(&["--cache-dir", "c"]).unwrap_err(),
            "--cache-dir c does not apply to --dataset shapes (the default): it applies to --dataset folder only"
        );
    }

    #[test]
    fn a_diffusers_folder_is_judged_at_its_own_shape_unless_the_data_flags_say() {
        let folder = std::path::Path::new("sd-vae");
        let arch = ResnetConfig { image_size: 32, in_channels: 3, ..ResnetConfig::default() };
        let cfg = TrainConfig::pretrained(arch.clone(), &parse(&[]).0.data, folder).unwrap();
        assert_eq!(cfg.model, ModelConfig::Resnet(arch.clone()));
        assert_eq!((cfg.data.image_size, cfg.data.channels, cfg.beta), (32, 3, 1e-6));
        let data = parse(&["--dataset", "folder", "--image-size", "64"]).0.data;
        assert_eq!(
            TrainConfig::pretrained(arch.clone(), &data, folder).unwrap().model.image_shape(),
            [3, 64, 64]
        );
        let err = TrainConfig::pretrained(arch.clone(), &parse(&["--dataset", "mnist"]).0.data, folder);
        assert_eq!(err.unwrap_err().to_string(), "sd-vae takes images of 3 channel(s); mnist images have 1");
        let err = TrainConfig::pretrained(arch, &parse(&["--image-size", "34"]).0.data, folder).unwrap_err();
        assert!(format!("{err:#}").contains("34 is not a multiple of 2^2 = 4"), "{err:#}");
    }

    #[test]
    fn a_list_flag_given_twice_is_refused_not_joined() {
        // Joined, `$BASE --block-channels 64,128 --block-channels 128,256` would train 4 blocks.
        for flag in ["--block-channels", "--conv-channels", "--betas", "--disc-betas"] {
            let argv = ["vae", flag, "1,2", flag, "3,4"];
            let err = Cmd::command().try_get_matches_from(argv).map(|_| ()).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict, "{flag}");
        }
        assert_eq!(parse(&["--block-channels", "32,64"]).0.block_channels, [32, 64]);
    }

    #[test]
    fn max_steps_ends_the_run_and_its_schedule_when_it_comes_first() {
        let cfg = |argv: &[&str]| parse(&[&["--batch-size", "10"][..], argv].concat()).0.config();
        // 100 images: 10 steps per epoch.
        assert_eq!(cfg(&["--epochs", "10", "--max-steps", "25"]).schedule(100).total_steps, 25);
        assert_eq!(cfg(&["--epochs", "2", "--max-steps", "25"]).schedule(100).total_steps, 20);
        assert_eq!(cfg(&["--epochs", "2"]).schedule(100).total_steps, 20);
        let capped = cfg(&["--max-steps", "25"]);
        assert!(capped.reached_max_steps(25) && !capped.reached_max_steps(24));
        assert!(!cfg(&[]).reached_max_steps(u64::MAX));
    }

    #[test]
    fn a_resume_applies_knobs_refuses_fixed_settings_and_takes_locations() {
        let saved = parse(&["--dataset", "folder"]).0.config();
        let path = std::path::Path::new("run/last.safetensors");
        let (args, m) =
            parse(&["--lr", "0.0001", "--clip-grad", "5", "--cache-dir", "/tmp/c", "--seed", "0"]);
        let (cfg, changes) = args.resumed(&saved, &m, path).unwrap();
        assert_eq!(cfg.adam.lr, 1e-4);
        assert_eq!(cfg.data.cache_dir, Some(PathBuf::from("/tmp/c")));
        let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        assert_eq!(shown, ["--lr 0.001 -> 0.0001", "--clip-grad none -> 5.0"]);
        let (args, m) = parse(&["--latent-dim", "8"]);
        let err = args.resumed(&saved, &m, path).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "--latent-dim 8 conflicts with the checkpoint run/last.safetensors, trained with 16"
            ),
            "{err}"
        );
        let (args, m) = parse(&["--no-cache"]);
        assert_eq!(args.resumed(&saved, &m, path).unwrap().0.data.cache_dir, None);
        // A switch is named as typed, without a value.
        let (args, m) = parse(&["--freeze-encoder"]);
        let err = args.resumed(&saved, &m, path).unwrap_err().to_string();
        assert!(err.starts_with("--freeze-encoder conflicts with the checkpoint"), "{err}");
    }
}
