//! Checkpoints: one ordinary safetensors file holding the weights under `state_dict` names,
//! the Adam state under `optimizer.`, and string metadata that makes the file self-describing:
//! the config, where the run stands, which run it is and what was changed on its resumes,
//! and a CRC-32 of every tensor, verified on load.

use crate::adam::{Adam, STATE_PREFIX};
use crate::adversarial;
use crate::config::{BestBy, Change, TrainConfig};
use crate::data::Fingerprint;
use crate::ema::{self, Ema};
use crate::loss::Stats;
use crate::models::{Compute, Model, ModelConfig};
use crate::precision::LossScale;
use crate::train::{Adversary, PendingEvaluation, Trainer, DISC_STATE_PREFIX};
use anyhow::{bail, ensure, Context, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Bumped when the layout changes incompatibly; newer files are refused, not misread.
pub const FORMAT_VERSION: u32 = 1;

/// Why the safetensors `file`, not a checkpoint of ours, cannot be read as one, where its
/// tensor names tell a diffusers AutoencoderKL's weights without their config (single files in
/// the original Stable Diffusion layout are read, as diffusers folders). `None` otherwise.
fn foreign_autoencoder(file: &SafeTensors) -> Option<String> {
    file.names().iter().any(|n| n.starts_with("encoder.down_blocks.")).then(|| {
        "a diffusers AutoencoderKL's weights without their config.json: put it in a folder as \
         diffusion_pytorch_model.safetensors beside the model's config.json, and name the folder"
            .into()
    })
}

/// The tensors of the safetensors `file` read from `path` (named in errors).
pub fn tensors_of(path: &Path, file: &SafeTensors) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for (name, view) in file.tensors() {
        let kind = kind_of(view.dtype()).with_context(|| {
            format!("{}: tensor {name} has unsupported dtype {:?}", path.display(), view.dtype())
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        tensors.insert(name, Tensor::f_from_data_size(view.data(), &shape, kind)?);
    }
    Ok(tensors)
}

/// Everything but the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    pub config: TrainConfig,
    /// Epochs completed.
    pub epoch: u64,
    /// Training steps taken (batches), skipped updates included.
    pub step: u64,
    /// The best test figure of the run, of the kind its config's `best_by` names.
    pub best: Option<f64>,
    /// Test evaluations in a row, up to this checkpoint, that did not better `best`.
    pub evaluations_since_best: u64,
    /// The float16 loss scale's state, in runs that have one.
    pub loss_scale: Option<LossScale>,
    /// Which run this is: drawn when a run starts, kept by its resumes in place, redrawn for a
    /// continuation in another folder. A run folder only takes checkpoints of its own run.
    pub run_id: String,
    /// The resumes that changed a setting or moved the run, oldest first.
    pub history: Vec<Resume>,
    /// Ranks of the data-parallel run that wrote it (1: one process).
    pub world_size: usize,
    /// CRC-32 of the LPIPS weights file the run computes its perceptual term (or test LPIPS)
    /// with.
    pub lpips_crc32: Option<u32>,
    /// CRC-32 of the FID Inception weights file of the run's test rFID.
    pub fid_crc32: Option<u32>,
    /// The weights the run started from (`--init-from`), kept by every checkpoint of it.
    pub init_from: Option<Origin>,
    /// The images the run trains on, which a resume compares with those it finds (`None`:
    /// checkpoints from before it was kept).
    pub data: Option<Fingerprint>,
    /// Saved just before a test evaluation, which a resume makes first.
    pub pending_evaluation: Option<PendingEvaluation>,
}

/// A weights file a run started from: where it was, its CRC-32, which tells it from a later
/// file of the same name, and how a diffusion model expects its latents scaled, where it said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    pub path: String,
    pub crc32: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latent_scale: Option<LatentScale>,
}

impl Origin {
    /// `path` (made absolute where it exists), whose contents are `bytes`.
    pub fn of_bytes(path: &Path, bytes: &[u8]) -> Self {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Self { path: path.display().to_string(), crc32: crc32fast::hash(bytes), latent_scale: None }
    }
}

/// How a diffusion model expects an autoencoder's latents scaled, as a diffusers folder's
/// `config.json` says: `(z - shift_factor) * scaling_factor`, or per channel `(z -
/// latents_mean) * scaling_factor / latents_std` where those are set. A run fine-tuned from
/// the folder keeps it for its exports, as diffusers' own fine-tuning does: the diffusion model
/// trained on those latents expects it (Stable Diffusion's fine-tuned VAEs keep 0.18215).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentScale {
    pub scaling_factor: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents_std: Option<Vec<f64>>,
}

impl LatentScale {
    /// A scaling factor alone.
    pub fn factor(scaling_factor: f64) -> Self {
        Self { scaling_factor, shift_factor: None, latents_mean: None, latents_std: None }
    }

    /// The map to the latents a diffusion model takes, channel by channel, `(z - offset[c]) *
    /// factor[c]`, for a latent of `channels` channels.
    pub fn per_channel(&self, channels: usize) -> (Vec<f64>, Vec<f64>) {
        let at = |values: &Option<Vec<f64>>, c: usize, default: f64| {
            values.as_ref().and_then(|v| v.get(c).copied()).unwrap_or(default)
        };
        (0..channels)
            .map(|c| {
                let offset = at(&self.latents_mean, c, 0.0) + self.shift_factor.unwrap_or(0.0);
                (offset, self.scaling_factor / at(&self.latents_std, c, 1.0))
            })
            .unzip()
    }

    /// Latents `[N, C, h, w]` as the diffusion model takes them mapped back to the
    /// autoencoder's: the inverse of [`LatentScale::per_channel`].
    pub fn unscale(&self, scaled: &Tensor) -> Tensor {
        let (offset, factor) = self.per_channel(scaled.size()[1] as usize);
        let along = |v: Vec<f64>| {
            Tensor::from_slice(&v).to_kind(Kind::Float).to_device(scaled.device()).view([1, -1, 1, 1])
        };
        scaled / along(factor) + along(offset)
    }

    /// The map as diffusers' pipelines write it.
    pub fn formula(&self) -> String {
        // Five decimals at most: a measured factor has sixteen.
        let short = |x: f64| format!("{x:.5}").trim_end_matches('0').trim_end_matches('.').to_string();
        let z = match (self.shift_factor, &self.latents_mean) {
            (Some(shift), None) => format!("(z - {})", short(shift)),
            (None, Some(_)) => "(z - latents_mean)".into(),
            (Some(shift), Some(_)) => format!("(z - latents_mean - {})", short(shift)),
            (None, None) => "z".into(),
        };
        let std = if self.latents_std.is_some() { " / latents_std" } else { "" };
        format!("{z} x {}{std}", short(self.scaling_factor))
    }
}

/// Which run the checkpoints belong to, what it started from and trains on, and the resumes
/// that shaped it.
#[derive(Debug, Clone)]
pub struct Lineage {
    pub run_id: String,
    pub history: Vec<Resume>,
    pub init_from: Option<Origin>,
    pub data: Option<Fingerprint>,
}

/// A resume that made the run differ from an uninterrupted one, or moved it to a new folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// Where the run stood when it was resumed.
    pub epoch: u64,
    pub step: u64,
    /// The run it continued, when it continued in a new folder (a new run id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_run: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
}

impl Metadata {
    /// Where `trainer` stands, in the run `lineage` describes.
    pub fn of(trainer: &Trainer, lineage: &Lineage) -> Self {
        Self {
            config: trainer.cfg.clone(),
            epoch: trainer.epoch,
            step: trainer.step,
            best: trainer.best,
            evaluations_since_best: trainer.evaluations_since_best,
            loss_scale: trainer.loss_scale.clone(),
            run_id: lineage.run_id.clone(),
            history: lineage.history.clone(),
            world_size: trainer.group.as_ref().map_or(1, |g| g.world),
            lpips_crc32: trainer.lpips.as_ref().map(|l| l.checksum),
            fid_crc32: trainer.fid.as_ref().map(|f| f.checksum),
            init_from: lineage.init_from.clone(),
            data: lineage.data,
            pending_evaluation: trainer.pending_evaluation.clone(),
        }
    }

    /// The run this checkpoint belongs to, as its continuation in place carries it on.
    pub fn lineage(&self) -> Lineage {
        Lineage {
            run_id: self.run_id.clone(),
            history: self.history.clone(),
            init_from: self.init_from.clone(),
            data: self.data,
        }
    }
}

/// A fresh run id: 16 hex digits from the clock, the process and the seed.
pub fn new_run_id(seed: u64) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mixed = (nanos as u64) ^ ((nanos >> 64) as u64) ^ ((std::process::id() as u64) << 32) ^ seed;
    format!("{:016x}", crate::rng::SplitMix64::new(mixed).next_u64())
}

const KEY_FORMAT: &str = "format";
const FORMAT_NAME: &str = "vae-checkpoint";
const KEY_VERSION: &str = "format_version";

impl Metadata {
    fn to_map(&self) -> Result<HashMap<String, String>> {
        let mut map = HashMap::new();
        let mut put = |k: &str, v: String| map.insert(k.to_string(), v);
        put(KEY_FORMAT, FORMAT_NAME.into());
        put(KEY_VERSION, FORMAT_VERSION.to_string());
        put("config", serde_json::to_string(&self.config)?);
        put("epoch", self.epoch.to_string());
        put("step", self.step.to_string());
        put("seed", self.config.seed.to_string());
        put("dataset", self.config.data.name().into());
        put("best", self.best.map_or("none".into(), |l| l.to_string()));
        put("evaluations_since_best", self.evaluations_since_best.to_string());
        put("crate_version", env!("CARGO_PKG_VERSION").into());
        put("libtorch_version", crate::LIBTORCH_VERSION.into());
        if let Some(scaler) = &self.loss_scale {
            put("loss_scale", scaler.scale.to_string());
            put("loss_scale_good_steps", scaler.good_steps.to_string());
        }
        put("run_id", self.run_id.clone());
        put("history", serde_json::to_string(&self.history)?);
        put("world_size", self.world_size.to_string());
        for (key, crc) in [("lpips_crc32", self.lpips_crc32), ("fid_crc32", self.fid_crc32)] {
            if let Some(crc) = crc {
                put(key, format!("{crc:08x}"));
            }
        }
        if let Some(origin) = &self.init_from {
            put("init_from", serde_json::to_string(origin)?);
        }
        if let Some(data) = &self.data {
            put("data_fingerprint", serde_json::to_string(data)?);
        }
        if let Some(pending) = &self.pending_evaluation {
            // Rust's own float text (NaN included), which parses back to the same bits.
            let train = pending.train.map_or("none".into(), |t| {
                t.values().iter().map(f64::to_string).collect::<Vec<_>>().join(",")
            });
            put("pending_train", train);
            put("pending_images", pending.images.to_string());
            put("pending_seconds", pending.seconds.to_string());
        }
        Ok(map)
    }

    fn from_map(path: &Path, map: Option<&HashMap<String, String>>) -> Result<Self> {
        let map = map.filter(|m| m.get(KEY_FORMAT).map(String::as_str) == Some(FORMAT_NAME));
        let Some(map) = map else {
            bail!("{}: a safetensors file, but not a vae checkpoint (no \"{KEY_FORMAT}\": \"{FORMAT_NAME}\" metadata)", path.display());
        };
        let field = |k: &str| {
            map.get(k).with_context(|| format!("{}: metadata field \"{k}\" is missing", path.display()))
        };
        let version: u32 = field(KEY_VERSION)?.parse().with_context(|| {
            format!("{}: metadata field \"{KEY_VERSION}\" is not a number", path.display())
        })?;
        ensure!(
            version <= FORMAT_VERSION,
            "{}: checkpoint format version {version} is newer than this build reads ({FORMAT_VERSION}); upgrade vae",
            path.display()
        );
        let number = |k: &str| -> Result<u64> {
            field(k)?
                .parse()
                .with_context(|| format!("{}: metadata field \"{k}\" is not a number", path.display()))
        };
        // A weights file's checksum, where the run had one.
        let crc = |k: &str| -> Result<Option<u32>> {
            let Some(text) = map.get(k) else { return Ok(None) };
            let crc = u32::from_str_radix(text, 16);
            Ok(Some(crc.with_context(|| {
                format!("{}: metadata field \"{k}\" is not 8 hex digits", path.display())
            })?))
        };
        let not_config =
            || format!("{}: metadata field \"config\" is not a valid training config", path.display());
        let mut config: serde_json::Value =
            serde_json::from_str(field("config")?).with_context(not_config)?;
        if let Some(model) = config.get_mut("model") {
            ModelConfig::upgrade_json(model);
        }
        let config: TrainConfig = serde_json::from_value(config).with_context(not_config)?;
        // Files from before run ids: the config stands for the run.
        let run_id = match map.get("run_id") {
            Some(id) => id.clone(),
            None => format!("config-{:08x}", crc32fast::hash(field("config")?.as_bytes())),
        };
        let history = match map.get("history") {
            Some(h) => serde_json::from_str(h).with_context(|| {
                format!("{}: metadata field \"history\" is not a list of resumes", path.display())
            })?,
            None => Vec::new(),
        };
        // Files from before --best-by kept the best test loss.
        let best_key = if map.contains_key("best") { "best" } else { "best_test_loss" };
        let best = match field(best_key)?.as_str() {
            "none" => None,
            s => Some(s.parse().with_context(|| {
                format!("{}: metadata field \"{best_key}\" is not a number", path.display())
            })?),
        };
        let loss_scale = match map.get("loss_scale") {
            None => None,
            Some(scale) => Some(LossScale {
                scale: scale.parse().ok().filter(|s: &f64| *s > 0.0 && s.is_finite()).with_context(|| {
                    format!("{}: metadata field \"loss_scale\" is not a positive number", path.display())
                })?,
                good_steps: number("loss_scale_good_steps")?,
            }),
        };
        Ok(Self {
            config,
            epoch: number("epoch")?,
            step: number("step")?,
            best,
            // Files from before --patience: a count that no run needed.
            evaluations_since_best: match map.get("evaluations_since_best") {
                Some(_) => number("evaluations_since_best")?,
                None => 0,
            },
            loss_scale,
            run_id,
            history,
            world_size: match map.get("world_size") {
                Some(_) => number("world_size")? as usize,
                None => 1,
            },
            lpips_crc32: crc("lpips_crc32")?,
            fid_crc32: crc("fid_crc32")?,
            init_from: match map.get("init_from") {
                Some(json) => Some(serde_json::from_str(json).with_context(|| {
                    format!("{}: metadata field \"init_from\" is not a path and crc32", path.display())
                })?),
                None => None,
            },
            data: match map.get("data_fingerprint") {
                Some(json) => Some(serde_json::from_str(json).with_context(|| {
                    format!(
                        "{}: metadata field \"data_fingerprint\" is not a data fingerprint",
                        path.display()
                    )
                })?),
                None => None,
            },
            pending_evaluation: match map.get("pending_images") {
                Some(_) => Some(pending_from(path, &field, &number)?),
                None => None,
            },
        })
    }
}

/// The owed evaluation's metadata (`pending_train`, `pending_images`, `pending_seconds`), read
/// with `from_map`'s field readers.
fn pending_from<'m>(
    path: &Path,
    field: &impl Fn(&str) -> Result<&'m String>,
    number: &impl Fn(&str) -> Result<u64>,
) -> Result<PendingEvaluation> {
    let invalid = |k: &str, what: &str| format!("{}: metadata field \"{k}\" is not {what}", path.display());
    let train = match field("pending_train")?.as_str() {
        "none" => None,
        list => {
            let values: Option<Vec<f64>> = list.split(',').map(|v| v.parse().ok()).collect();
            let counts = format!("3 or {} numbers", 3 + crate::loss::SHARPNESS.len());
            Some(
                values
                    .and_then(|v| Stats::from_values(&v))
                    .with_context(|| invalid("pending_train", &counts))?,
            )
        }
    };
    let seconds = field("pending_seconds")?.parse().ok().filter(|s: &f64| *s >= 0.0);
    Ok(PendingEvaluation {
        train,
        images: number("pending_images")? as usize,
        seconds: seconds.with_context(|| invalid("pending_seconds", "a duration"))?,
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        other => bail!("cannot store tensors of kind {other:?}"),
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        _ => return None,
    })
}

/// A tensor's bytes on the host, in the layout safetensors wants.
struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl HostTensor {
    fn new(t: &Tensor) -> Result<Self> {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut bytes, numel);
        Ok(Self { dtype: dtype_of(t.kind())?, shape: t.size().iter().map(|&d| d as usize).collect(), bytes })
    }
}

/// Serialises the model's variables, the optimizer state, the moving average and the
/// discriminator where there are any, and the metadata.
pub fn to_bytes(
    vs: &VarStore,
    adam: &Adam,
    ema: Option<&Ema>,
    adversary: Option<&Adversary>,
    meta: &Metadata,
) -> Result<Vec<u8>> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.extend(adam.state());
    named.extend(ema.map(Ema::state).unwrap_or_default());
    named.extend(adversary.map(Adversary::state).unwrap_or_default());
    safetensors_bytes(&named, meta.to_map()?, true)
}

/// Everything `trainer` holds, as a checkpoint file with `meta`.
pub fn trainer_bytes(trainer: &Trainer, meta: &Metadata) -> Result<Vec<u8>> {
    to_bytes(&trainer.vs, &trainer.adam, trainer.ema.as_ref(), trainer.adversary.as_ref(), meta)
}

/// `named` as a safetensors file with `metadata`, to which `checksums` adds a CRC-32 of
/// every tensor (verified when a checkpoint is read).
pub fn safetensors_bytes(
    named: &[(String, Tensor)],
    mut metadata: HashMap<String, String>,
    checksums: bool,
) -> Result<Vec<u8>> {
    let host =
        named.iter().map(|(name, t)| Ok((name.clone(), HostTensor::new(t)?))).collect::<Result<Vec<_>>>()?;
    let views = host
        .iter()
        .map(|(name, h)| Ok((name.as_str(), TensorView::new(h.dtype, h.shape.clone(), &h.bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    if checksums {
        let sums: BTreeMap<&str, String> = host
            .iter()
            .map(|(name, h)| (name.as_str(), format!("{:08x}", crc32fast::hash(&h.bytes))))
            .collect();
        metadata.insert(KEY_CHECKSUMS.into(), serde_json::to_string(&sums)?);
    }
    Ok(safetensors::serialize(views, Some(metadata))?)
}

/// Metadata field holding `{tensor name: CRC-32 of its bytes}`.
const KEY_CHECKSUMS: &str = "tensor_crc32";

/// Checks each tensor's bytes against the CRC-32 written with it (files written before
/// checksums have none to check).
fn verify_checksums(path: &Path, file: &SafeTensors, map: &HashMap<String, String>) -> Result<()> {
    let Some(text) = map.get(KEY_CHECKSUMS) else { return Ok(()) };
    let sums: BTreeMap<String, String> = serde_json::from_str(text).with_context(|| {
        format!("{}: metadata field \"{KEY_CHECKSUMS}\" is not a map of checksums", path.display())
    })?;
    let mut names = file.names();
    names.sort();
    for name in names {
        let data = file.tensor(name)?;
        let expected = sums.get(name).with_context(|| {
            format!(
                "{}: tensor {name} has no checksum: the file was altered after it was written",
                path.display()
            )
        })?;
        let found = format!("{:08x}", crc32fast::hash(data.data()));
        ensure!(
            &found == expected,
            "{}: tensor {name} fails its checksum (crc32 {found}, written as {expected}): the file is \
             corrupt; use another checkpoint of the run (best.safetensors, epoch-NNNN.safetensors)",
            path.display()
        );
    }
    ensure!(
        sums.len() == file.len(),
        "{}: {} checksums for {} tensors: the file was altered after it was written",
        path.display(),
        sums.len(),
        file.len()
    );
    Ok(())
}

/// Whether a checkpoint tensor is the model's: not the optimizers', the moving average's or
/// the adversarial term's.
pub fn is_model_tensor(name: &str) -> bool {
    let others = [STATE_PREFIX, ema::PREFIX, adversarial::PREFIX, DISC_STATE_PREFIX, adversarial::LOGVAR];
    !others.iter().any(|prefix| name.starts_with(prefix))
}

/// Copies the model tensors of `tensors` (read from `path`; see [`is_model_tensor`]) into
/// `vs`, which must hold exactly the same names and shapes: the first difference, in name
/// order, is the error.
pub fn copy_weights(path: &Path, tensors: &HashMap<String, Tensor>, vs: &VarStore) -> Result<()> {
    copy_part(path, tensors, vs, is_model_tensor, "the model")
}

/// Copies the tensors of `tensors` that `belongs` picks into `vs`, which must hold exactly
/// those names and shapes (`what` names it in errors).
fn copy_part(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    vs: &VarStore,
    belongs: fn(&str) -> bool,
    what: &str,
) -> Result<()> {
    let vars = vs.variables();
    let mut extra: Vec<&String> = tensors.keys().filter(|n| belongs(n) && !vars.contains_key(*n)).collect();
    extra.sort();
    if let Some(name) = extra.first() {
        bail!("{}: tensor {name} is not part of {what}", path.display());
    }
    let mut vars: Vec<(String, Tensor)> = vars.into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, dst) in vars.iter_mut() {
        let src =
            tensors.get(name).with_context(|| format!("{}: tensor {name} is missing", path.display()))?;
        ensure!(
            src.size() == dst.size(),
            "{}: tensor {name} has shape {:?} there but {:?} in {what}",
            path.display(),
            src.size(),
            dst.size()
        );
        tch::no_grad(|| dst.f_copy_(src))?;
    }
    Ok(())
}

/// A model of architecture `model` holding `weights` (read from `path`, which errors name),
/// in float32 on `device`: for evaluation and export.
pub fn built_model(
    model: &ModelConfig,
    path: &Path,
    weights: &HashMap<String, Tensor>,
    device: Device,
) -> Result<(VarStore, Box<dyn Model>)> {
    let mut vs = VarStore::new(Device::Cpu);
    let mut built = model.build(vs.root());
    copy_weights(path, weights, &vs)?;
    vs.set_device(device);
    built.set_compute(Compute::for_device(Kind::Float, device));
    Ok((vs, built))
}

/// A checkpoint read back: its metadata and its tensors (on the CPU).
pub struct Checkpoint {
    pub path: PathBuf,
    pub meta: Metadata,
    /// The header's metadata as stored, including fields only `info` shows.
    pub raw_metadata: HashMap<String, String>,
    pub tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
        Self::from_bytes(path, &bytes)
    }

    /// A checkpoint from a file's bytes; `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(bytes).expect("deserialize read it already");
        let ours =
            header.metadata().as_ref().and_then(|m| m.get(KEY_FORMAT)).is_some_and(|f| f == FORMAT_NAME);
        if let (false, Some(what)) = (ours, foreign_autoencoder(&file)) {
            bail!("{}: {what}", path.display());
        }
        let meta = Metadata::from_map(path, header.metadata().as_ref())?;
        verify_checksums(path, &file, header.metadata().as_ref().expect("from_map found metadata"))?;
        // The config decides what gets allocated when the model is built: check it, and that
        // the file is large enough to hold the parameters it describes, before anything else.
        meta.config.validate().with_context(|| format!("{}: metadata field \"config\"", path.display()))?;
        let params = meta.config.model.parameter_count();
        ensure!(
            params.saturating_mul(4) <= bytes.len() as u128,
            "{}: its config describes {params} parameters, more than its {} bytes can hold",
            path.display(),
            bytes.len()
        );
        let raw_metadata = header.metadata().clone().unwrap_or_default();
        Ok(Self { path: path.to_path_buf(), meta, raw_metadata, tensors: tensors_of(path, &file)? })
    }

    /// Refuses weights or optimizer state holding NaN or infinity, naming the first such
    /// tensor: nothing good comes of evaluating or training them.
    pub fn check_finite(&self) -> Result<()> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let t = &self.tensors[name];
            if t.is_floating_point() && t.isfinite().all().int64_value(&[]) == 0 {
                bail!(
                    "{}: tensor {name} holds NaN or infinity (the run diverged before this was saved); \
                     use an earlier checkpoint of the run (best.safetensors, epoch-NNNN.safetensors)",
                    self.path.display()
                );
            }
        }
        Ok(())
    }

    /// Parameters of the model, not counting optimizer state.
    pub fn parameter_count(&self) -> i64 {
        self.tensors.iter().filter(|(n, _)| is_model_tensor(n)).map(|(_, t)| t.numel() as i64).sum()
    }

    /// A human-readable summary: where the run stands, its config and every tensor.
    pub fn describe(&self) -> Result<String> {
        use std::fmt::Write as _;
        let m = &self.meta;
        let get = |k: &str| self.raw_metadata.get(k).map_or("?", String::as_str);
        let mut s = String::new();
        writeln!(s, "checkpoint {}", self.path.display())?;
        writeln!(
            s,
            "format version {}, written by vae {} on libtorch {}",
            get(KEY_VERSION),
            get("crate_version"),
            get("libtorch_version")
        )?;
        writeln!(
            s,
            "dataset {}, epoch {}/{}, step {}",
            m.config.data.name(),
            m.epoch,
            m.config.epochs,
            m.step
        )?;
        if m.pending_evaluation.is_some() {
            writeln!(s, "saved as its test evaluation began: a resume makes that evaluation first")?;
        }
        let by = m.config.best_by;
        let unit = match by {
            BestBy::Loss => format!(" {}", m.config.model.likelihood().unit()),
            BestBy::Psnr => " dB".into(),
            BestBy::Ssim | BestBy::Lpips | BestBy::Rfid => String::new(),
        };
        let best = m.best.map_or("none yet".to_string(), |b| format!("{b:.4}{unit}"));
        let patience = match m.config.patience {
            0 => String::new(),
            p => format!(", {} evaluation(s) since, of --patience {p}", m.evaluations_since_best),
        };
        writeln!(s, "best test {} {best}{patience}", by.name())?;
        writeln!(s, "run {}, trained by {} rank(s)", m.run_id, m.world_size)?;
        if let Some(origin) = &m.init_from {
            writeln!(s, "started from the weights of {} (crc32 {:08x})", origin.path, origin.crc32)?;
            if let Some(scale) = &origin.latent_scale {
                writeln!(s, "whose latents a diffusion model takes as {}", serde_json::to_string(scale)?)?;
            }
        }
        if let Some(data) = &m.data {
            writeln!(s, "trains on {data}")?;
        }
        for (what, crc) in [("LPIPS", m.lpips_crc32), ("FID Inception", m.fid_crc32)] {
            if let Some(crc) = crc {
                writeln!(s, "{what} weights crc32 {crc:08x}")?;
            }
        }
        for r in &m.history {
            let from = r
                .from_run
                .as_ref()
                .map_or(String::new(), |id| format!(" continuing run {id} in a new folder"));
            let changes = r.changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
            writeln!(
                s,
                "resumed at epoch {}, step {}{from}{}{changes}",
                r.epoch,
                r.step,
                if changes.is_empty() { "" } else { ": " }
            )?;
        }
        writeln!(s, "parameters {}", self.parameter_count())?;
        writeln!(s, "config {}", serde_json::to_string_pretty(&m.config)?)?;
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        writeln!(s, "tensors ({}):", names.len())?;
        for name in names {
            let t = &self.tensors[name];
            writeln!(s, "  {name:<40} {:<9} {:?}", format!("{:?}", t.kind()), t.size())?;
        }
        Ok(s)
    }

    /// Copies the weights into `vs`, which must hold exactly the same names and shapes.
    pub fn load_weights(&self, vs: &VarStore) -> Result<()> {
        copy_weights(&self.path, &self.tensors, vs)
    }

    /// The model alone with its weights, in float32 on `device`: for evaluation and export.
    /// With `averaged`, the weights' moving average where the run kept one.
    pub fn model(&self, device: Device, averaged: bool) -> Result<(VarStore, Box<dyn Model>)> {
        self.check_finite()?;
        let average = ema::averaged_weights(&self.tensors).filter(|_| averaged);
        built_model(&self.meta.config.model, &self.path, average.as_ref().unwrap_or(&self.tensors), device)
    }

    /// The model, optimizer and position this checkpoint holds, on `device`, continuing with
    /// `cfg`: the checkpoint's config, or one that differs only in what a resume may change.
    pub fn trainer(&self, cfg: TrainConfig, device: Device) -> Result<Trainer> {
        self.check_finite()?;
        let mut trainer = Trainer::new(cfg, device)?;
        self.load_weights(&trainer.vs)?;
        if let Some(adversary) = &mut trainer.adversary {
            self.load_adversary(adversary)?;
        }
        self.load_optimizer(&mut trainer.adam)?;
        if let Some(ema) = &mut trainer.ema {
            ema.load_state(|name| self.tensors.get(name).map(Tensor::shallow_clone))
                .with_context(|| format!("{}: the weights' moving average", self.path.display()))?;
        }
        ensure!(
            trainer.adam.step_count() <= self.meta.step,
            "{}: optimizer step {} is beyond the metadata's training step {}",
            self.path.display(),
            trainer.adam.step_count(),
            self.meta.step
        );
        trainer.epoch = self.meta.epoch;
        trainer.step = self.meta.step;
        trainer.pending_evaluation = self.meta.pending_evaluation.clone();
        if trainer.loss_scale.is_some() {
            trainer.loss_scale = Some(self.meta.loss_scale.clone().unwrap_or_default());
        }
        // A best of another figure than the run now picks by is no measure: the next
        // evaluation's figure stands as the best, and patience counts from it.
        if trainer.cfg.best_by == self.meta.config.best_by {
            trainer.best = self.meta.best;
            trainer.evaluations_since_best = self.meta.evaluations_since_best;
        }
        Ok(trainer)
    }

    /// The discriminator, its Adam and the log-variance; a run that had no discriminator
    /// cannot grow one on resume.
    fn load_adversary(&self, adversary: &mut Adversary) -> Result<()> {
        ensure!(
            self.tensors.keys().any(|n| n.starts_with(adversarial::PREFIX)),
            "{}: this run trained without a discriminator, so --disc-weight cannot turn one on when resuming \
             it; start a new run from its weights with --init-from {0}",
            self.path.display()
        );
        let belongs = |n: &str| n.starts_with(adversarial::PREFIX) || n == adversarial::LOGVAR;
        copy_part(&self.path, &self.tensors, &adversary.vs, belongs, "the discriminator")?;
        self.load_optimizer(&mut adversary.adam)
    }

    pub fn load_optimizer(&self, adam: &mut Adam) -> Result<()> {
        adam.load_state(|name| self.tensors.get(name).map(Tensor::shallow_clone))
            .with_context(|| format!("{}: optimizer state", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `unscale` inverts the map diffusers' pipelines apply, per channel: SDXL-style
    /// latents_mean / latents_std with a shift on top, and a scaling factor alone.
    #[test]
    fn unscale_inverts_the_declared_latent_scale() {
        let z = Tensor::randn([3, 2, 4, 5], tch::kind::FLOAT_CPU);
        let declared = LatentScale {
            scaling_factor: 0.5,
            shift_factor: Some(0.25),
            latents_mean: Some(vec![0.1, -0.2]),
            latents_std: Some(vec![1.5, 2.5]),
        };
        for scale in [declared, LatentScale::factor(0.18215)] {
            let (offset, factor) = scale.per_channel(2);
            let column = |v: &[f64]| Tensor::from_slice(v).to_kind(Kind::Float).view([1, 2, 1, 1]);
            let taken = (&z - column(&offset)) * column(&factor);
            let back = scale.unscale(&taken);
            assert!(f64::try_from((back - &z).abs().max()).unwrap() < 1e-5, "{scale:?}");
        }
        assert_eq!(LatentScale::factor(0.18215).formula(), "z x 0.18215");
        assert_eq!(LatentScale::factor(0.5037011775174255).formula(), "z x 0.5037");
    }

    #[test]
    fn metadata_of_earlier_versions_reads_with_defaults() {
        let meta = Metadata {
            config: TrainConfig::default(),
            epoch: 2,
            step: 50,
            best: Some(240.5),
            evaluations_since_best: 3,
            loss_scale: None,
            run_id: "0123456789abcdef".into(),
            history: vec![Resume { epoch: 1, step: 25, from_run: None, changes: Vec::new() }],
            world_size: 2,
            lpips_crc32: Some(0x0badf00d),
            fid_crc32: Some(0x00c0ffee),
            init_from: Some(Origin {
                path: "/models/sd-vae/diffusion_pytorch_model.safetensors".into(),
                crc32: 7,
                latent_scale: Some(LatentScale { shift_factor: Some(0.0609), ..LatentScale::factor(1.5305) }),
            }),
            data: Some(Fingerprint { train: 60000, test: 10000, shape: [1, 28, 28], crc32: 0xfeedbeef }),
            pending_evaluation: Some(PendingEvaluation {
                train: Some(Stats { loss: 0.1 + 0.2, reconstruction: 1e-300, kl: -0.0, sharpness: None }),
                images: 640,
                seconds: 12.5,
            }),
        };
        let path = Path::new("old.safetensors");
        let mut map = meta.to_map().unwrap();
        assert_eq!(Metadata::from_map(path, Some(&map)).unwrap(), meta);
        // Before run ids, histories, model families and --best-by: a conv model, its config its
        // run, its best the test loss.
        let best = map.remove("best").unwrap();
        map.insert("best_test_loss".into(), best);
        map.remove("evaluations_since_best");
        map.remove("run_id");
        map.remove("history");
        map.remove("world_size");
        map.remove("lpips_crc32");
        map.remove("fid_crc32");
        map.remove("init_from");
        map.remove("data_fingerprint");
        for key in ["pending_train", "pending_images", "pending_seconds"] {
            map.remove(key);
        }
        let config = map["config"].replace("\"arch\":\"conv\",", "").replace("\"best_by\":\"loss\",", "");
        assert!(!config.contains("arch") && !config.contains("best_by"), "{config}");
        map.insert("config".into(), config);
        let old = Metadata::from_map(path, Some(&map)).unwrap();
        assert_eq!(old.config, meta.config);
        assert!(old.run_id.starts_with("config-") && old.history.is_empty(), "{old:?}");
        assert_eq!((old.world_size, old.lpips_crc32, old.fid_crc32, old.best), (1, None, None, Some(240.5)));
        assert_eq!((old.evaluations_since_best, old.init_from, old.pending_evaluation), (0, None, None));
        assert_eq!(old.data, None);
    }
}
