//! Checkpoints: one ordinary safetensors file holding the weights under `state_dict` names,
//! the Adam state under `optimizer.`, and string metadata that makes the file self-describing.

use crate::adam::{Adam, STATE_PREFIX};
use crate::model::{Compute, Vae};
use crate::precision::LossScale;
use crate::train::TrainConfig;
use anyhow::{bail, ensure, Context, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Bumped when the layout changes incompatibly; newer files are refused, not misread.
pub const FORMAT_VERSION: u32 = 1;

/// Everything but the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    pub config: TrainConfig,
    /// Epochs completed.
    pub epoch: u64,
    /// Training steps taken (batches), skipped updates included.
    pub step: u64,
    pub best_test_loss: Option<f64>,
    /// The float16 loss scale's state, in runs that have one.
    pub loss_scale: Option<LossScale>,
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
        put("best_test_loss", self.best_test_loss.map_or("none".into(), |l| l.to_string()));
        put("crate_version", env!("CARGO_PKG_VERSION").into());
        put("libtorch_version", crate::LIBTORCH_VERSION.into());
        if let Some(scaler) = &self.loss_scale {
            put("loss_scale", scaler.scale.to_string());
            put("loss_scale_good_steps", scaler.good_steps.to_string());
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
        let config = serde_json::from_str(field("config")?).with_context(|| {
            format!("{}: metadata field \"config\" is not a valid training config", path.display())
        })?;
        let best_test_loss = match field("best_test_loss")?.as_str() {
            "none" => None,
            s => Some(s.parse().with_context(|| {
                format!("{}: metadata field \"best_test_loss\" is not a number", path.display())
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
        Ok(Self { config, epoch: number("epoch")?, step: number("step")?, best_test_loss, loss_scale })
    }
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

/// Serialises the model's variables, the optimizer state and the metadata.
pub fn to_bytes(vs: &VarStore, adam: &Adam, meta: &Metadata) -> Result<Vec<u8>> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.extend(adam.state());
    let host =
        named.iter().map(|(name, t)| Ok((name.clone(), HostTensor::new(t)?))).collect::<Result<Vec<_>>>()?;
    let views = host
        .iter()
        .map(|(name, h)| Ok((name.as_str(), TensorView::new(h.dtype, h.shape.clone(), &h.bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, Some(meta.to_map()?))?)
}

/// Writes `bytes` to `path` so that `path` is always either the old file or the whole new one:
/// temporary file in the same folder, fsync, rename over, fsync the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_path(path)?;
    let result = (|| -> Result<()> {
        let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        crate::fault::in_write(&mut file, bytes);
        file.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        publish(&file, &tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where [`write_atomic`] fills a file before renaming it to `path`: hidden, beside it, named
/// after the process (so `prepare_run_dir` can tell a dead run's leftovers).
pub fn temporary_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    Ok(path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id())))
}

/// Makes the fully written `file` at `tmp` the file at `path`, durably: fsync, rename over,
/// fsync the folder.
pub fn publish(file: &std::fs::File, tmp: &Path, path: &Path) -> Result<()> {
    file.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    // The rename is durable only once the folder entry is on disk.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing folder {}", dir.display()))
}

pub fn save(path: &Path, vs: &VarStore, adam: &Adam, meta: &Metadata) -> Result<()> {
    write_atomic(path, &to_bytes(vs, adam, meta)?)
        .with_context(|| format!("saving checkpoint {}", path.display()))
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
        let meta = Metadata::from_map(path, header.metadata().as_ref())?;
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
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            let kind = kind_of(view.dtype()).with_context(|| {
                format!("{}: tensor {name} has unsupported dtype {:?}", path.display(), view.dtype())
            })?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            tensors.insert(name, Tensor::f_from_data_size(view.data(), &shape, kind)?);
        }
        Ok(Self { path: path.to_path_buf(), meta, raw_metadata, tensors })
    }

    /// A checkpoint file, or a run folder's `last.safetensors`.
    pub fn resolve(path: &Path) -> Result<PathBuf> {
        if path.is_dir() {
            let last = path.join(crate::run::LAST);
            ensure!(last.is_file(), "no checkpoint in {}: {} does not exist", path.display(), last.display());
            Ok(last)
        } else {
            ensure!(path.exists(), "checkpoint {} does not exist", path.display());
            Ok(path.to_path_buf())
        }
    }

    /// Parameters of the model, not counting optimizer state.
    pub fn parameter_count(&self) -> i64 {
        self.tensors.iter().filter(|(n, _)| !n.starts_with(STATE_PREFIX)).map(|(_, t)| t.numel() as i64).sum()
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
        let best = m.best_test_loss.map_or("none yet".to_string(), |l| format!("{l:.4} nats/image"));
        writeln!(s, "best test loss {best}")?;
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
        let vars = vs.variables();
        let mut extra: Vec<&String> =
            self.tensors.keys().filter(|n| !n.starts_with(STATE_PREFIX) && !vars.contains_key(*n)).collect();
        extra.sort();
        if let Some(name) = extra.first() {
            bail!("{}: tensor {name} is not part of the model", self.path.display());
        }
        // In name order, so the first mismatch reported is the same on every run.
        let mut vars: Vec<(String, Tensor)> = vars.into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, dst) in vars.iter_mut() {
            let src = self
                .tensors
                .get(name)
                .with_context(|| format!("{}: tensor {name} is missing", self.path.display()))?;
            ensure!(
                src.size() == dst.size(),
                "{}: tensor {name} has shape {:?} in the checkpoint but {:?} in the model",
                self.path.display(),
                src.size(),
                dst.size()
            );
            tch::no_grad(|| dst.f_copy_(src))?;
        }
        Ok(())
    }

    /// The model alone with its weights, in float32 on `device`: for evaluation and export.
    pub fn model(&self, device: Device) -> Result<(VarStore, Vae)> {
        let mut vs = VarStore::new(Device::Cpu);
        let mut model = Vae::new(vs.root(), &self.meta.config.model);
        self.load_weights(&vs)?;
        vs.set_device(device);
        model.compute = Compute::for_device(Kind::Float, device);
        Ok((vs, model))
    }

    pub fn load_optimizer(&self, adam: &mut Adam) -> Result<()> {
        adam.load_state(|name| self.tensors.get(name).map(Tensor::shallow_clone))
            .with_context(|| format!("{}: optimizer state", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_temporary_write_leaves_the_previous_file_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        write_atomic(&path, b"old checkpoint").unwrap();
        // Occupy the temporary file's name with a folder, so creating it fails.
        let tmp = dir.path().join(format!(".last.safetensors.tmp-{}", std::process::id()));
        std::fs::create_dir(&tmp).unwrap();
        let err = format!("{:#}", write_atomic(&path, b"new checkpoint").unwrap_err());
        assert!(err.contains("creating") && err.contains(".last.safetensors.tmp-"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old checkpoint");
        std::fs::remove_dir(&tmp).unwrap();
        write_atomic(&path, b"new checkpoint").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new checkpoint");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary files left behind");
    }
}
