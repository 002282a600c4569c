//! Weights from elsewhere and to elsewhere: a diffusers `AutoencoderKL` folder (`config.json`
//! beside `diffusion_pytorch_model.safetensors`, or its float16 variant), or a single-file
//! VAE in the original Stable Diffusion layout read as one, taken as the resnet family and
//! written from it (`vae export-diffusers`, `vae export-single-file`), and `--init-from` any of
//! those or one of our checkpoints. Our resnet tensors already carry diffusers' state-dict names.

use crate::checkpoint::{
    self, built_model, copy_weights, safetensors_bytes, Checkpoint, LatentScale, Origin,
};
use crate::config::TrainConfig;
use crate::fsio::write_new;
use crate::models::{Model, ModelConfig, ResnetConfig};
use anyhow::{anyhow, bail, ensure, Context, Result};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// diffusers writes this version into the configs it saves; ours say which they match.
const DIFFUSERS_VERSION: &str = "0.42.1";

/// The diffusers model folder at `path`: the folder itself when it holds a `config.json`, or
/// the `vae` folder of a whole pipeline (`model_index.json` beside `vae/`, as Stable
/// Diffusion checkpoints are laid out), or either in the snapshot that a Hugging Face cache
/// folder's `refs/main` names (`models--ORG--NAME`, as `from_pretrained` leaves it); or a
/// single file of an autoencoder in the original Stable Diffusion layout ([`ldm_file`]), read
/// as such a folder. `None`: none of these.
pub fn diffusers_folder(path: &Path) -> Option<PathBuf> {
    if ldm_file(path).is_some() {
        return Some(path.to_path_buf());
    }
    let model_or_pipeline = |dir: &Path| {
        if dir.join(CONFIG).is_file() {
            return Some(dir.to_path_buf());
        }
        let vae = dir.join("vae");
        (dir.join("model_index.json").is_file() && vae.join(CONFIG).is_file()).then_some(vae)
    };
    model_or_pipeline(path).or_else(|| {
        let main = std::fs::read_to_string(path.join("refs").join("main")).ok()?;
        model_or_pipeline(&path.join("snapshots").join(main.trim()))
    })
}

/// The float16 variant's weights, what `from_pretrained(..., variant="fp16")` downloads: a
/// Hugging Face cache snapshot fetched that way holds this file alone.
pub const WEIGHTS_FP16: &str = "diffusion_pytorch_model.fp16.safetensors";

/// The weights file of the diffusers folder `dir`: the float32 one, else the float16 variant
/// (its weights are made float32 as they are read).
fn weights_file(dir: &Path) -> Result<PathBuf> {
    if dir.is_file() {
        return Ok(dir.to_path_buf()); // a single LDM-layout file
    }
    if let Some(file) = [WEIGHTS, WEIGHTS_FP16].iter().map(|name| dir.join(name)).find(|f| f.is_file()) {
        return Ok(file);
    }
    let pickle = dir.join("diffusion_pytorch_model.bin");
    ensure!(
        !pickle.is_file(),
        "{}: its weights are a PyTorch pickle, which vae does not read (loading one runs code it \
         holds); write them as safetensors once, with diffusers: python -c \"from diffusers import \
         AutoencoderKL; AutoencoderKL.from_pretrained('{dir}').save_pretrained('{dir}-safetensors')\"",
        pickle.display(),
        dir = dir.display()
    );
    bail!("{}: no {WEIGHTS} (or {WEIGHTS_FP16}) there; only safetensors weights are read", dir.display())
}

/// The weights of the diffusers folder `dir`, under today's names, the file they are in, and
/// that file as a run's origin (its CRC-32 from the one read).
fn read_weights(dir: &Path) -> Result<(PathBuf, HashMap<String, Tensor>, Origin)> {
    let file = weights_file(dir)?;
    if file.ends_with(WEIGHTS_FP16) {
        note!("note: {} holds the float16 variant alone: its weights are used as float32", dir.display());
    }
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let parsed = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("reading {}: not a valid safetensors file ({e})", file.display()))?;
    let mut tensors = checkpoint::tensors_of(&file, &parsed)?;
    if let Some((prefix, shapes)) = ldm_file(&file) {
        let blocks = ldm_block_channels(&shapes).len();
        tensors = tensors
            .into_iter()
            .filter_map(|(name, t)| Some((name.strip_prefix(&prefix)?.to_string(), t)))
            .filter(|(name, _)| LDM_PARTS.iter().any(|part| name.starts_with(part)))
            .map(|(name, t)| (ldm_renamed(&name, true, blocks), t))
            .collect();
    }
    let tensors = tensors.into_iter().map(|(n, t)| modern(&n, t)).collect();
    let origin = Origin::of_bytes(&file, &bytes);
    Ok((file, tensors, origin))
}

/// The autoencoder's tensors in an LDM-layout file (others, as a training run's `loss.`, are
/// left out).
const LDM_PARTS: [&str; 4] = ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."];

/// A single safetensors file of an autoencoder in the original Stable Diffusion (LDM) layout,
/// as `vae-ft-mse-840000-ema-pruned.safetensors` is shared (or a whole SD checkpoint's
/// `first_stage_model.`): the prefix of its tensors' names, and their names (less the prefix)
/// and shapes, read from the file's header alone. `None` for any other path.
fn ldm_file(path: &Path) -> Option<(String, HashMap<String, Vec<i64>>)> {
    let mut file = path.is_file().then(|| std::fs::File::open(path).ok()).flatten()?;
    let (_, header) = crate::fsio::safetensors_header(&mut file).ok()?;
    let prefix = ["first_stage_model.", "vae.", ""]
        .into_iter()
        .find(|p| header.contains_key(&format!("{p}encoder.down.0.block.0.conv1.weight")))?;
    let shapes = header
        .iter()
        .filter_map(|(name, entry)| {
            Some((
                name.strip_prefix(prefix)?.to_string(),
                serde_json::from_value(entry.get("shape")?.clone()).ok()?,
            ))
        })
        .collect();
    Some((prefix.to_string(), shapes))
}

/// The `config.json` a diffusers folder of the LDM-layout autoencoder with tensors `shapes`
/// would hold (as diffusers' `from_single_file` infers it): the channels, blocks and layers
/// from the shapes, GroupNorm's 32 groups (every Stable Diffusion autoencoder's), a
/// sample_size of 512, and no scaling_factor (the file does not say it).
fn ldm_config(shapes: &HashMap<String, Vec<i64>>) -> Value {
    let dim = |name: &str, i: usize| shapes.get(name).and_then(|s| s.get(i).copied()).unwrap_or(0);
    let block_channels = ldm_block_channels(shapes);
    let layers =
        (0..).take_while(|j| shapes.contains_key(&format!("encoder.down.0.block.{j}.conv1.weight"))).count();
    let cfg = ResnetConfig {
        image_size: 512,
        in_channels: dim("encoder.conv_in.weight", 1),
        block_channels,
        layers_per_block: layers as i64,
        latent_channels: dim("decoder.conv_in.weight", 1),
        norm_groups: LDM_NORM_GROUPS,
        mid_attention: shapes.contains_key("encoder.mid.attn_1.q.weight"),
        quant_convs: shapes.contains_key("quant_conv.weight"),
        ..ResnetConfig::default()
    };
    let mut json = config_json(&cfg, &LatentScale::factor(1.0));
    json["scaling_factor"] = Value::Null;
    json
}

/// GroupNorm's groups in the original Stable Diffusion code (its `Normalize`), which its
/// files do not record.
const LDM_NORM_GROUPS: i64 = 32;

/// The output channels of each block of the LDM-layout autoencoder with tensors `shapes`.
fn ldm_block_channels(shapes: &HashMap<String, Vec<i64>>) -> Vec<i64> {
    (0..)
        .map_while(|i| {
            shapes.get(&format!("encoder.down.{i}.block.0.conv1.weight")).and_then(|s| s.first().copied())
        })
        .collect()
}

/// The original Stable Diffusion (LDM) layout's names beside diffusers', as prefixes of a
/// tensor's name, as diffusers' `convert_ldm_vae_checkpoint` maps them: `{side}` is the encoder
/// or decoder, `{i}` and `{j}` indices kept as they are, `{up}` an up block, which the two
/// number from opposite ends. The first pair whose prefix matches renames, either way; other
/// names (`conv_in`, `quant_conv`, ...) are the same in both.
const LDM_NAMES: [(&str, &str); 14] = [
    ("{side}.down.{i}.block.{j}.nin_shortcut", "{side}.down_blocks.{i}.resnets.{j}.conv_shortcut"),
    ("{side}.down.{i}.block.{j}", "{side}.down_blocks.{i}.resnets.{j}"),
    ("{side}.down.{i}.downsample", "{side}.down_blocks.{i}.downsamplers.0"),
    ("{side}.up.{up}.block.{j}.nin_shortcut", "{side}.up_blocks.{up}.resnets.{j}.conv_shortcut"),
    ("{side}.up.{up}.block.{j}", "{side}.up_blocks.{up}.resnets.{j}"),
    ("{side}.up.{up}.upsample", "{side}.up_blocks.{up}.upsamplers.0"),
    ("{side}.mid.block_1", "{side}.mid_block.resnets.0"),
    ("{side}.mid.block_2", "{side}.mid_block.resnets.1"),
    ("{side}.mid.attn_1.norm", "{side}.mid_block.attentions.0.group_norm"),
    ("{side}.mid.attn_1.q", "{side}.mid_block.attentions.0.to_q"),
    ("{side}.mid.attn_1.k", "{side}.mid_block.attentions.0.to_k"),
    ("{side}.mid.attn_1.v", "{side}.mid_block.attentions.0.to_v"),
    ("{side}.mid.attn_1.proj_out", "{side}.mid_block.attentions.0.to_out.0"),
    ("{side}.norm_out", "{side}.conv_norm_out"),
];

/// The tensor `name` of an autoencoder of `blocks` blocks renamed by [`LDM_NAMES`]: from the
/// LDM layout to diffusers' (`to_diffusers`), or back.
fn ldm_renamed(name: &str, to_diffusers: bool, blocks: usize) -> String {
    let segments: Vec<&str> = name.split('.').collect();
    let variable = |part: &str| part.strip_prefix('{').and_then(|p| p.strip_suffix('}')).map(str::to_string);
    for (ldm, diffusers) in LDM_NAMES {
        let (from, to) = if to_diffusers { (ldm, diffusers) } else { (diffusers, ldm) };
        let from: Vec<&str> = from.split('.').collect();
        if segments.len() <= from.len() {
            continue; // a prefix, with the parameter's own name after it
        }
        let mut values = HashMap::new();
        let matched = from.iter().zip(&segments).all(|(part, segment)| match variable(part) {
            Some(var) => values.insert(var, segment.to_string()).is_none(),
            None => part == segment,
        });
        if !matched {
            continue;
        }
        let renamed = to.split('.').map(|part| match variable(part).as_deref() {
            Some("up") => match values["up"].parse::<usize>() {
                Ok(b) => blocks.saturating_sub(1 + b).to_string(),
                Err(_) => values["up"].clone(),
            },
            Some(var) => values[var].clone(),
            None => part.to_string(),
        });
        return renamed
            .chain(segments[from.len()..].iter().map(|s| s.to_string()))
            .collect::<Vec<_>>()
            .join(".");
    }
    name.to_string()
}

/// What `vae info` says of the diffusers folder `dir`: the architecture, the parameters and
/// the latents' scale it declares.
pub fn describe(dir: &Path) -> Result<String> {
    let (path, json) = config_of(dir)?;
    let arch = architecture(&path, &json)?;
    let (file, tensors, _) = read_weights(dir)?;
    let parameters: i64 = tensors.values().map(|t| t.numel() as i64).sum();
    let scale =
        json.get("scaling_factor").filter(|v| !v.is_null()).map_or("none".to_string(), Value::to_string);
    let what = match ldm_file(dir) {
        Some(_) => {
            "single-file autoencoder in the original Stable Diffusion layout, read as the diffusers folder"
        }
        None => "diffusers AutoencoderKL folder",
    };
    Ok(format!(
        "{what} {}\n{}\nimages of {} channel(s), sample_size {}, downsampled {}x\n\
         scaling_factor {scale}\nparameters {parameters} in {} tensors ({})\n",
        dir.display(),
        ModelConfig::Resnet(arch.clone()).summary(),
        arch.in_channels,
        arch.image_size,
        arch.downscale(),
        tensors.len(),
        file.display()
    ))
}

/// The model of the diffusers folder `dir`, to be judged with `cfg` (made by
/// [`TrainConfig::pretrained`]), in float32 on `device`.
pub fn model(dir: &Path, cfg: &TrainConfig, device: Device) -> Result<(VarStore, Box<dyn Model>)> {
    let (file, tensors, _) = read_weights(dir)?;
    built_model(&cfg.model, &file, &tensors, device)
}

/// The `config.json` of the diffusers folder `dir`, and its path (of a single LDM-layout file,
/// the one it would have, and the file).
fn config_of(dir: &Path) -> Result<(PathBuf, Value)> {
    if let Some((_, shapes)) = ldm_file(dir) {
        return Ok((dir.to_path_buf(), ldm_config(&shapes)));
    }
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    Ok((path, json))
}

/// The architecture a diffusers folder's `config.json` describes (the image side from its
/// `sample_size`; the likelihood is left at the family's default, L1).
pub fn read_config(dir: &Path) -> Result<ResnetConfig> {
    let (path, json) = config_of(dir)?;
    let cfg = architecture(&path, &json)?;
    // What gets allocated when the model is built: sized against the weights file first (at
    // two bytes a parameter, float16's), as a checkpoint's config is, so a config that promises
    // billions of parameters is refused rather than allocated.
    let file = weights_file(dir)?;
    let bytes = std::fs::metadata(&file).with_context(|| format!("reading {}", file.display()))?.len();
    let params = ModelConfig::Resnet(cfg.clone()).parameter_count();
    ensure!(
        params.saturating_mul(2) <= bytes as u128,
        "{}: describes {params} parameters, more than {} ({bytes} bytes) can hold",
        path.display(),
        file.display()
    );
    Ok(cfg)
}

/// The architecture `json`, the `config.json` at `path`, describes.
fn architecture(path: &Path, json: &Value) -> Result<ResnetConfig> {
    let field = |name: &str| json.get(name).filter(|v| !v.is_null());
    let int = |name: &str, default: i64| -> Result<i64> {
        field(name).map_or(Ok(default), |v| {
            v.as_i64().with_context(|| format!("{}: \"{name}\" is {v}, not an integer", path.display()))
        })
    };
    let class = field("_class_name").and_then(Value::as_str).unwrap_or("AutoencoderKL");
    ensure!(class == "AutoencoderKL", "{} describes a {class}, not an AutoencoderKL", path.display());
    let act = field("act_fn").and_then(Value::as_str).unwrap_or("silu");
    ensure!(act == "silu", "{}: act_fn {act:?} is not supported (only silu)", path.display());
    let blocks: Vec<i64> = match field("block_out_channels") {
        Some(v) => serde_json::from_value(v.clone()).with_context(|| {
            format!("{}: \"block_out_channels\" is not a list of integers", path.display())
        })?,
        None => vec![64],
    };
    for (key, kind) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] {
        let types: Vec<String> = match field(key) {
            Some(v) => serde_json::from_value(v.clone())
                .with_context(|| format!("{}: \"{key}\" is not a list of names", path.display()))?,
            None => vec![kind.into(); blocks.len()],
        };
        ensure!(
            types.len() == blocks.len() && types.iter().all(|t| t == kind),
            "{}: {key} {types:?} is not {} x {kind}, the blocks this family has",
            path.display(),
            blocks.len()
        );
    }
    let [quant, post_quant] = ["use_quant_conv", "use_post_quant_conv"]
        .map(|key| field(key).and_then(Value::as_bool).unwrap_or(true));
    ensure!(
        quant == post_quant,
        "{}: use_quant_conv {quant} with use_post_quant_conv {post_quant} is not supported (both true, as in \
         Stable Diffusion's autoencoders, or both false, as in SD3's and Flux's)",
        path.display()
    );
    let (image_in, image_out) = (int("in_channels", 3)?, int("out_channels", 3)?);
    ensure!(image_in == image_out, "{}: in_channels {image_in} but out_channels {image_out}", path.display());
    let sample_size = match field("sample_size") {
        Some(Value::Array(sides)) => sides.first().and_then(Value::as_i64),
        Some(v) => v.as_i64(),
        None => Some(32),
    };
    let cfg = ResnetConfig {
        image_size: sample_size
            .with_context(|| format!("{}: \"sample_size\" is not an integer", path.display()))?,
        in_channels: image_in,
        block_channels: blocks,
        layers_per_block: int("layers_per_block", 1)?,
        latent_channels: int("latent_channels", 4)?,
        norm_groups: int("norm_num_groups", 32)?,
        mid_attention: field("mid_block_add_attention").and_then(Value::as_bool).unwrap_or(true),
        quant_convs: quant,
        ..ResnetConfig::default()
    };
    cfg.validate().with_context(|| format!("{}", path.display()))?;
    Ok(cfg)
}

/// How the diffusers folder `dir` says a diffusion model takes its latents (`None`: its
/// `config.json` has no `scaling_factor`).
pub fn latent_scale(dir: &Path) -> Result<Option<LatentScale>> {
    let (path, json) = config_of(dir)?;
    let channels = architecture(&path, &json)?.latent_channels as usize;
    let field = |name: &str| json.get(name).filter(|v| !v.is_null());
    let Some(factor) = field("scaling_factor") else { return Ok(None) };
    let number = |name: &str, v: &Value| -> Result<f64> {
        v.as_f64()
            .filter(|x| x.is_finite())
            .with_context(|| format!("{}: \"{name}\" is {v}, not a number", path.display()))
    };
    let scaling_factor = number("scaling_factor", factor)?;
    ensure!(
        scaling_factor > 0.0,
        "{}: \"scaling_factor\" must be positive, found {scaling_factor}",
        path.display()
    );
    let per_channel = |name: &str| -> Result<Option<Vec<f64>>> {
        let Some(list) = field(name) else { return Ok(None) };
        let values = list.as_array().map(|l| l.iter().map(|v| number(name, v)).collect::<Result<Vec<f64>>>());
        let values = values.with_context(|| format!("{}: \"{name}\" is not a list", path.display()))??;
        ensure!(
            values.len() == channels,
            "{}: \"{name}\" has {} values for {channels} latent channels",
            path.display(),
            values.len()
        );
        Ok(Some(values))
    };
    Ok(Some(LatentScale {
        scaling_factor,
        shift_factor: field("shift_factor").map(|v| number("shift_factor", v)).transpose()?,
        latents_mean: per_channel("latents_mean")?,
        latents_std: per_channel("latents_std")?,
    }))
}

/// diffusers' `config.json` for `cfg`, with how its latents are scaled.
pub fn config_json(cfg: &ResnetConfig, scale: &LatentScale) -> Value {
    let n = cfg.block_channels.len();
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": cfg.block_channels,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "force_upcast": true,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "latents_mean": scale.latents_mean,
        "latents_std": scale.latents_std,
        "layers_per_block": cfg.layers_per_block,
        "mid_block_add_attention": cfg.mid_attention,
        "norm_num_groups": cfg.norm_groups,
        "out_channels": cfg.in_channels,
        "sample_size": cfg.image_size,
        "scaling_factor": scale.scaling_factor,
        "shift_factor": scale.shift_factor,
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "use_post_quant_conv": cfg.quant_convs,
        "use_quant_conv": cfg.quant_convs,
    })
}

/// Writes a diffusers folder at `dir`: the weights, then `config.json` (each atomically; the
/// config last, so a folder with a config is complete). A `dir` that already holds files is
/// refused, never overwritten.
pub fn write_folder(
    dir: &Path,
    cfg: &ResnetConfig,
    weights: &[(String, Tensor)],
    scale: &LatentScale,
) -> Result<()> {
    crate::fsio::check_new_folder(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // New files, so two exports racing into one empty folder cannot mix theirs.
    write_new(&dir.join(WEIGHTS), &float_file(weights)?)?;
    let text = serde_json::to_string_pretty(&config_json(cfg, scale))? + "\n";
    write_new(&dir.join(CONFIG), text.as_bytes())
}

/// Writes the autoencoder `weights` (diffusers' names) of `blocks` blocks as one safetensors
/// file in the original Stable Diffusion (LDM) layout, as `vae-ft-mse-840000-ema-pruned` is
/// shared, for the tools that load only that (AUTOMATIC1111's web UI loads it into the LDM
/// code's `first_stage_model`, whose attention projections are 1x1 convolutions). That code
/// builds GroupNorm with 32 groups, which the file cannot say otherwise: other models are
/// refused. An existing `path` is refused, never overwritten.
pub fn write_single_file(path: &Path, cfg: &ResnetConfig, weights: &[(String, Tensor)]) -> Result<()> {
    ensure!(
        path.extension().is_some_and(|e| e == "safetensors"),
        "{}: the file's name must end in .safetensors, by which the tools that load it tell its format",
        path.display()
    );
    ensure!(
        cfg.norm_groups == LDM_NORM_GROUPS,
        "{}: the model has {} GroupNorm groups; the original Stable Diffusion code has {LDM_NORM_GROUPS} and the \
         layout cannot say otherwise, so the tools that load it would compute other outputs: export a \
         diffusers folder instead (vae export-diffusers)",
        path.display(),
        cfg.norm_groups
    );
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let ldm: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(name, t)| {
            let name = ldm_renamed(name, false, cfg.block_channels.len());
            let conv = name.contains(".attn_1.") && t.dim() == 2;
            (name, if conv { t.unsqueeze(-1).unsqueeze(-1) } else { t.shallow_clone() })
        })
        .collect();
    write_new(path, &float_file(&ldm)?)
}

/// The safetensors file of `weights` in float32, what PyTorch's loaders expect (`format: pt`).
fn float_file(weights: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let floats: Vec<(String, Tensor)> =
        weights.iter().map(|(n, t)| (n.clone(), t.to_kind(Kind::Float))).collect();
    let format = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors_bytes(&floats, format, false)
}

/// diffusers before 0.14 named the attention's layers as the original LDM code did, and
/// conversions from it, as LDM-layout files, kept their 1x1-conv shape: today's names, linear
/// shapes.
fn modern(name: &str, t: Tensor) -> (String, Tensor) {
    const OLD: [(&str, &str); 4] =
        [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")];
    let attention = name.contains(".attentions.");
    let name = match OLD.iter().find(|(old, _)| attention && name.contains(old)) {
        Some((old, new)) => name.replace(old, new),
        None => name.to_string(),
    };
    (name, if attention && t.dim() == 4 { t.flatten(1, -1) } else { t })
}

/// The architecture of the weights at `path` (a diffusers folder, or a checkpoint file or run
/// folder of ours), which `--init-from` starts a run with.
pub fn architecture_of(path: &Path) -> Result<ModelConfig> {
    if let Some(dir) = diffusers_folder(path) {
        return Ok(ModelConfig::Resnet(read_config(&dir)?));
    }
    Ok(Checkpoint::load(&crate::run_dir::resolve(path)?)?.meta.config.model)
}

/// Starts `vs` (a model of architecture `model`) from the weights at `path`: a diffusers
/// folder, or a checkpoint of ours (file or run folder). Weights only: the optimizer is not
/// read; of a checkpoint, the weights `vae eval` and the exports judge: the moving average
/// where the run kept one. Any difference in names or shapes is refused, naming the first
/// differing tensor. Returns the file the weights came from, for the run's checkpoints to
/// name, and whether they were the average.
pub fn init_from(path: &Path, vs: &VarStore, model: &ModelConfig) -> Result<(Origin, bool)> {
    if let Some(dir) = diffusers_folder(path) {
        ensure!(
            matches!(model, ModelConfig::Resnet(_)),
            "--init-from {}: a diffusers AutoencoderKL folder starts --arch resnet models only",
            path.display()
        );
        let (file, tensors, origin) = read_weights(&dir).context("--init-from")?;
        copy_weights(&file, &tensors, vs).context("--init-from: the architecture differs")?;
        return Ok((Origin { latent_scale: latent_scale(&dir)?, ..origin }, false));
    }
    let file = crate::run_dir::resolve(path)?;
    let bytes = std::fs::read(&file).with_context(|| format!("reading checkpoint {}", file.display()))?;
    let ckpt = Checkpoint::from_bytes(&file, &bytes)?;
    ckpt.check_finite()?;
    if ckpt.meta.config.model.arch() != model.arch() {
        bail!(
            "--init-from {}: the checkpoint is --arch {}, this run --arch {}",
            file.display(),
            ckpt.meta.config.model.arch().name(),
            model.arch().name()
        );
    }
    let average = crate::ema::averaged_weights(&ckpt.tensors);
    let weights = average.as_ref().unwrap_or(&ckpt.tensors);
    copy_weights(&file, weights, vs).context("--init-from: the architecture differs")?;
    // Through a chain of runs, the scale of the diffusers folder the first started from.
    let latent_scale = ckpt.meta.init_from.and_then(|o| o.latent_scale);
    Ok((Origin { latent_scale, ..Origin::of_bytes(&file, &bytes) }, average.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_reads_back_as_the_same_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let cfg =
            ResnetConfig { block_channels: vec![32, 64], mid_attention: false, ..ResnetConfig::default() };
        std::fs::write(dir.path().join(CONFIG), config_json(&cfg, &LatentScale::factor(0.5)).to_string())
            .unwrap();
        // The weights file is sized, not read: float16 parameters fill 2 bytes each.
        let params = ModelConfig::Resnet(cfg.clone()).parameter_count() as usize;
        std::fs::write(dir.path().join(WEIGHTS), vec![0u8; 2 * params]).unwrap();
        assert_eq!(read_config(dir.path()).unwrap(), cfg);
        // A config promising more parameters than the file holds is refused, not allocated.
        let deep = ResnetConfig { layers_per_block: 100_000, ..cfg.clone() };
        std::fs::write(dir.path().join(CONFIG), config_json(&deep, &LatentScale::factor(0.5)).to_string())
            .unwrap();
        let err = read_config(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json: describes ") && err.contains("parameters, more than"), "{err}");
        let mut json = config_json(&cfg, &LatentScale::factor(0.5));
        json["down_block_types"][1] = "AttnDownEncoderBlock2D".into();
        std::fs::write(dir.path().join(CONFIG), json.to_string()).unwrap();
        let err = read_config(dir.path()).unwrap_err().to_string();
        assert!(err.contains("AttnDownEncoderBlock2D") && err.contains("2 x DownEncoderBlock2D"), "{err}");
    }

    #[test]
    fn old_attention_names_are_renamed() {
        let (name, t) = modern(
            "encoder.mid_block.attentions.0.query.weight",
            Tensor::zeros([8, 8, 1, 1], tch::kind::FLOAT_CPU),
        );
        assert_eq!(name, "encoder.mid_block.attentions.0.to_q.weight");
        assert_eq!(t.size(), vec![8, 8]);
        assert_eq!(
            modern("decoder.mid_block.attentions.0.proj_attn.bias", Tensor::zeros([8], tch::kind::FLOAT_CPU))
                .0,
            "decoder.mid_block.attentions.0.to_out.0.bias"
        );
        assert_eq!(
            modern("encoder.conv_in.weight", Tensor::zeros([1], tch::kind::FLOAT_CPU)).0,
            "encoder.conv_in.weight"
        );
    }
}
