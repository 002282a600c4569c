//! What a model learned, as pictures: reconstructions, samples from the prior,
//! interpolations and latent traversals, drawn as PNG grids; and latents as tensors.

use crate::data::{to_unit_float, Dataset, Loader};
use crate::models::{in_passes, tiles, Model, Posterior, Tile};
use anyhow::{ensure, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// Images per grid row where the caller does not decide.
pub const GRID_COLS: usize = 12;

/// Originals (`[N, C, H, W]` in [0, 1]) in rows of `cols`, each row followed by the
/// reconstructions, decoded from the posterior means (in `tile`s where given). N is cut to
/// whole rows.
pub fn reconstruction_grid(model: &dyn Model, x: &Tensor, cols: usize, tile: Option<Tile>) -> Tensor {
    let n = x.size()[0] as usize;
    let cols = cols.min(n).max(1);
    let x = x.narrow(0, 0, ((n / cols).max(1) * cols) as i64);
    let size = x.size();
    let recon = tch::no_grad(|| {
        in_passes(&x, pass_size([size[2], size[3]], tile), |_, x| match tile {
            Some(tile) => tiles::reconstruct(model, x, tile),
            None => model.reconstruct(x),
        })
    });
    let rows: Vec<Tensor> = x
        .split(cols as i64, 0)
        .into_iter()
        .zip(recon.split(cols as i64, 0))
        .flat_map(|(a, b)| [a, b])
        .collect();
    Tensor::cat(&rows, 0)
}

/// Decoded draws z ~ N(0, temperature^2 I) from libtorch's generator, images of `[h, w]` (the
/// model's), decoded a pass at a time.
pub fn samples(model: &dyn Model, count: i64, temperature: f64, hw: [i64; 2], device: tch::Device) -> Tensor {
    let z = Tensor::randn([count, model.latent_dim()], (Kind::Float, device)) * temperature;
    decoded(model, &z, hw, None)
}

/// The images of latents `z` (`[N, D]`, or a spatial `[N, C, h, w]`), images of `[h, w]`,
/// decoded a pass at a time (in `tile`s where given).
pub fn decoded(model: &dyn Model, z: &Tensor, hw: [i64; 2], tile: Option<Tile>) -> Tensor {
    tch::no_grad(|| {
        in_passes(z, pass_size(hw, tile), |_, z| match tile {
            Some(tile) => model.likelihood().mean(&tiles::decode(model, z, tile)),
            None => model.decode_mean(z),
        })
    })
}

/// The `[h, w]` one image of `[h, w]` runs at: in `tile`s, a pass holds as many images as
/// tiles fit its pixels, not whole images.
fn pass_size([h, w]: [i64; 2], tile: Option<Tile>) -> [i64; 2] {
    tile.map_or([h, w], |tile| [h.min(tile.pixels), w.min(tile.pixels)])
}

/// Points t = 0, 1/(steps-1), ..., 1 along the path from `a` to `b` (`[D]` each): linear, or
/// spherical (slerp), which keeps the norm typical of Gaussian latents.
fn latent_path(a: &Tensor, b: &Tensor, steps: i64, slerp: bool) -> Tensor {
    let ts: Vec<f64> = (0..steps).map(|i| i as f64 / (steps - 1).max(1) as f64).collect();
    let cos = (a.dot(b) / (a.norm() * b.norm() + 1e-12)).double_value(&[]).clamp(-1.0, 1.0);
    let omega = cos.acos();
    let points: Vec<Tensor> = ts
        .iter()
        .map(|&t| {
            if slerp && omega.sin().abs() > 1e-6 {
                a * (((1.0 - t) * omega).sin() / omega.sin()) + b * ((t * omega).sin() / omega.sin())
            } else {
                a * (1.0 - t) + b * t
            }
        })
        .collect();
    Tensor::stack(&points, 0)
}

/// One row per pair: the first image, `steps` decodings along the path between the two
/// posterior means, the second image.
pub fn interpolation_grid(
    model: &dyn Model,
    first: &Tensor,
    second: &Tensor,
    steps: i64,
    slerp: bool,
) -> Tensor {
    tch::no_grad(|| {
        let (za, zb) = (model.encode(first).mean, model.encode(second).mean);
        let rows: Vec<Tensor> = (0..first.size()[0])
            .flat_map(|i| {
                let path = model.decode_mean(&latent_path(&za.get(i), &zb.get(i), steps, slerp));
                [first.narrow(0, i, 1), path, second.narrow(0, i, 1)]
            })
            .collect();
        Tensor::cat(&rows, 0)
    })
}

/// One row per latent channel in `dims` (a dimension, for a vector latent): the image's
/// posterior mean decoded with that channel swept over `steps` values in [-range, range]. A
/// single dimension is set to each value (the prior's scale); a channel of a spatial latent
/// is shifted by each value times its standard deviation over the image.
pub fn traversal_grid(model: &dyn Model, image: &Tensor, dims: &[i64], steps: i64, range: f64) -> Tensor {
    tch::no_grad(|| {
        let mean = model.encode(image).mean.get(0);
        let values = Tensor::linspace(-range, range, steps, (Kind::Float, mean.device())).unsqueeze(1);
        let width = model.latent_dim() / model.latent_channels();
        let rows: Vec<Tensor> = dims
            .iter()
            .map(|&d| {
                let z = mean.unsqueeze(0).repeat([steps, 1]);
                let mut channel = z.narrow(1, d * width, width);
                if width == 1 {
                    channel.copy_(&values);
                } else {
                    let std = mean.narrow(0, d * width, width).std(true);
                    let _ = channel.g_add_(&(&values * std));
                }
                model.decode_mean(&z)
            })
            .collect();
        Tensor::cat(&rows, 0)
    })
}

/// Posterior means and log-variances of every image of `data`, `[N, D]` each, on the CPU.
pub fn encode_all(model: &dyn Model, data: &Dataset, device: tch::Device) -> Result<(Tensor, Tensor)> {
    let (mut means, mut logvars) = (Vec::new(), Vec::new());
    encode_each(model, data, device, |q| {
        means.push(q.mean);
        logvars.push(q.logvar);
        Ok(())
    })?;
    Ok((Tensor::cat(&means, 0), Tensor::cat(&logvars, 0)))
}

/// The posteriors of the images of `data` in order, a batch at a time (`[n, D]` each, on the
/// CPU), handed to `f`.
fn encode_each(
    model: &dyn Model,
    data: &Dataset,
    device: tch::Device,
    mut f: impl FnMut(Posterior) -> Result<()>,
) -> Result<()> {
    for x in Loader::new(data, device, 500).sequential() {
        let x = x?;
        let q = tch::no_grad(|| model.encode_in_passes(&x));
        f(Posterior {
            mean: q.mean.to_device(tch::Device::Cpu),
            logvar: q.logvar.to_device(tch::Device::Cpu),
        })?;
    }
    Ok(())
}

/// Writes the latents of the images of `splits`, one after another, as `vae encode`'s file at
/// `path`: `mean` and `logvar` (`[N, ...latent_shape]`, float32), `labels` where every split
/// has them, and the metadata (`format`, and `files` where every split names its images). The
/// safetensors header goes first, its sizes known up front, and each batch's latents are
/// written at their place as they are encoded: memory holds a batch, not the split, whose
/// latents can outgrow it as a streamed folder's images do. The file appears whole or not at
/// all.
pub fn write_latents(
    path: &Path,
    model: &dyn Model,
    splits: &[Dataset],
    latent_shape: &[i64],
    device: tch::Device,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let count: usize = splits.iter().map(Dataset::len).sum();
    let row = latent_shape.iter().product::<i64>() as usize * 4;
    let shape: Vec<i64> = [&[count as i64][..], latent_shape].concat();
    let labels: Option<Vec<Tensor>> =
        splits.iter().map(|d| d.labels.as_ref().map(Tensor::shallow_clone)).collect();
    let labels = labels.map(|l| Tensor::cat(&l, 0).to_kind(Kind::Int64).contiguous());
    let names: Option<Vec<&String>> = splits
        .iter()
        .map(|d| d.names.as_ref().map(|n| n.iter()))
        .collect::<Option<Vec<_>>>()
        .map(|parts| parts.into_iter().flatten().collect());
    let mut metadata = serde_json::Map::new();
    metadata.insert("format".into(), LATENTS_FORMAT.into());
    if let Some(names) = names {
        metadata.insert("files".into(), serde_json::to_string(&names)?.into());
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), metadata.into());
    let half = (count * row) as u64;
    let entry = |dtype: &str, shape: &[i64], from: u64, to: u64| serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [from, to]});
    header.insert("mean".into(), entry("F32", &shape, 0, half));
    header.insert("logvar".into(), entry("F32", &shape, half, 2 * half));
    if labels.is_some() {
        header.insert("labels".into(), entry("I64", &[count as i64], 2 * half, 2 * half + 8 * count as u64));
    }
    let mut header = serde_json::to_vec(&header)?;
    // The data starts 8-byte aligned, as safetensors writes it.
    header.resize(header.len().next_multiple_of(8), b' ');
    let start = 8 + header.len() as u64;
    let bytes = |t: &Tensor| -> Result<Vec<u8>> {
        let t = t.contiguous();
        let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut out, t.numel())?;
        Ok(out)
    };
    crate::fsio::write_atomic_with(path, |file| {
        file.write_all_at(&(header.len() as u64).to_le_bytes(), 0)?;
        file.write_all_at(&header, 8)?;
        let mut written = 0u64;
        for data in splits {
            encode_each(model, data, device, |q| {
                let at = start + written * row as u64;
                file.write_all_at(&bytes(&q.mean.to_kind(Kind::Float))?, at)?;
                file.write_all_at(&bytes(&q.logvar.to_kind(Kind::Float))?, at + half)?;
                written += q.mean.size()[0] as u64;
                Ok(())
            })?;
        }
        ensure!(written as usize == count, "encoded {written} images of {count}");
        if let Some(labels) = &labels {
            file.write_all_at(&bytes(labels)?, start + 2 * half)?;
        }
        Ok(())
    })
}

/// Average KL(q(z_d|x) || N(0, 1)) of each latent dimension over the posteriors given: the
/// nats a dimension carries; near 0 means the dimension is unused (collapsed).
pub fn kl_per_dimension(mean: &Tensor, logvar: &Tensor) -> Vec<f64> {
    let q = Posterior { mean: mean.shallow_clone(), logvar: logvar.shallow_clone() };
    Vec::<f64>::try_from(q.kl_per_dimension().mean_dim(0, false, Kind::Double)).expect("[D] of doubles")
}

/// The first `count` images of `data` as floats in [0, 1], on `device`.
pub fn first_images(data: &Dataset, count: usize, device: tch::Device) -> Result<Tensor> {
    Ok(to_unit_float(&data.images(0, count)?).to_device(device))
}

/// Pixels of background between tiles and around the grid.
const BORDER: u32 = 2;
const BORDER_GRAY: u8 = 128;

/// Whether `file` is an image, which a picture may replace.
pub fn is_picture(file: &mut std::fs::File) -> bool {
    let mut head = [0u8; 64];
    let n = std::io::Read::read(file, &mut head).unwrap_or(0);
    image::guess_format(&head[..n]).is_ok()
}

/// The `format` metadata of the latents `vae encode` writes.
pub const LATENTS_FORMAT: &str = "vae-latents";

/// Whether `file` is latents `vae encode` wrote (its safetensors header says so).
pub fn is_latents(file: &mut std::fs::File) -> bool {
    crate::fsio::safetensors_header(file).is_ok_and(|(_, header)| {
        header.get("__metadata__").and_then(|m| m["format"].as_str()) == Some(LATENTS_FORMAT)
    })
}

/// Writes `images` (`[N, C, H, W]`, values in [0, 1], C = 1 or 3) as a grid of `cols` columns.
pub fn save_grid(path: &Path, images: &Tensor, cols: usize) -> Result<()> {
    let [n, c, h, w]: [i64; 4] =
        images.size().try_into().map_err(|_| anyhow::anyhow!("expected NCHW images"))?;
    ensure!(c == 1 || c == 3, "images have {c} channels, expected 1 or 3");
    ensure!(n > 0 && cols > 0, "nothing to draw");
    let (n, c, h, w) = (n as usize, c as usize, h as usize, w as usize);
    let rows = n.div_ceil(cols);
    let tile = |count: usize, side: usize| (count * (side + BORDER as usize) + BORDER as usize) as u32;
    let (width, height) = (tile(cols, w), tile(rows, h));
    let pixels = Vec::<u8>::try_from(to_u8(images).flatten(0, -1))?;
    let mut canvas = image::RgbImage::from_pixel(width, height, image::Rgb([BORDER_GRAY; 3]));
    for (i, img) in pixels.chunks(c * h * w).enumerate() {
        let x0 = BORDER as usize + (i % cols) * (w + BORDER as usize);
        let y0 = BORDER as usize + (i / cols) * (h + BORDER as usize);
        for y in 0..h {
            for x in 0..w {
                let at = |ch: usize| img[ch * h * w + y * w + x];
                let rgb = if c == 1 { [at(0); 3] } else { [at(0), at(1), at(2)] };
                canvas.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(rgb));
            }
        }
    }
    canvas.save(path).with_context(|| format!("writing {}", path.display()))
}

/// One tensor of latents in a safetensors file (by default its only tensor, or `mean`, as
/// `vae encode` writes), read a slice of rows at a time by positioned reads: a file of a whole
/// folder's latents is never held in memory.
pub struct Latents {
    file: std::fs::File,
    pub path: std::path::PathBuf,
    pub key: String,
    /// `[N, ...]`.
    pub shape: Vec<i64>,
    kind: Kind,
    /// Where the tensor's bytes start in the file.
    start: u64,
    /// Every tensor of the file, with its shape, by name.
    pub tensors: Vec<(String, Vec<i64>)>,
    /// The image files `vae encode` lists for them (of an image folder).
    pub files: Option<Vec<String>>,
}

impl Latents {
    pub fn open(path: &Path, key: Option<&str>) -> Result<Self> {
        let shown = path.display();
        let mut file = std::fs::File::open(path).with_context(|| format!("reading {shown}"))?;
        let size = file.metadata()?.len();
        let (len, header) =
            crate::fsio::safetensors_header(&mut file).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
        let files = header.get("__metadata__").and_then(|m| m.get("files")).and_then(|f| f.as_str());
        let files = files
            .map(serde_json::from_str)
            .transpose()
            .with_context(|| format!("{shown}: its metadata \"files\" is not a list"))?;
        let entry = |name: &str| -> Result<(String, Vec<i64>, [u64; 2])> {
            let bad = || format!("{shown}: the entry of {name} is not a safetensors tensor");
            let e = &header[name];
            let dtype = e["dtype"].as_str().with_context(bad)?.to_string();
            let shape = serde_json::from_value(e["shape"].clone()).with_context(bad)?;
            let offsets = serde_json::from_value(e["data_offsets"].clone()).with_context(bad)?;
            Ok((dtype, shape, offsets))
        };
        let mut tensors = Vec::new();
        for name in header.keys().filter(|k| *k != "__metadata__") {
            tensors.push((name.clone(), entry(name)?.1));
        }
        tensors.sort();
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        let key = match key {
            Some(key) => key,
            None if names.len() == 1 => names[0],
            None if names.contains(&"mean") => "mean",
            None => anyhow::bail!("{shown} holds the tensors {}: choose one with --key", names.join(", ")),
        }
        .to_string();
        ensure!(
            names.contains(&key.as_str()),
            "{shown} holds no tensor {key:?} (it holds {})",
            names.join(", ")
        );
        let (dtype, shape, [from, to]) = entry(&key)?;
        let kind = match dtype.as_str() {
            "F32" => Kind::Float,
            "F16" => Kind::Half,
            "BF16" => Kind::BFloat16,
            "F64" => Kind::Double,
            other => anyhow::bail!("{shown}: {key} is {other}, not floating point"),
        };
        // Checked arithmetic throughout: the header is the file's word, not ours.
        let numel = shape.iter().try_fold(1i64, |n, &d| (d >= 0).then(|| n.checked_mul(d)).flatten());
        let bytes = numel.and_then(|n| (n as u64).checked_mul(kind.elt_size_in_bytes() as u64));
        ensure!(
            from <= to && bytes == Some(to - from) && to.checked_add(8 + len).is_some_and(|end| end <= size),
            "{shown}: {key}'s data does not fit its shape {shape:?} and the file"
        );
        ensure!(shape.first().is_some_and(|&n| n > 0), "{shown}: {key} is empty ({shape:?})");
        Ok(Self { file, path: path.to_path_buf(), key, shape, kind, start: 8 + len + from, tensors, files })
    }

    pub fn count(&self) -> usize {
        self.shape[0] as usize
    }

    /// Rows `first..first + len` in float32, on the CPU; values that are not finite refused.
    pub fn rows(&self, first: usize, len: usize) -> Result<Tensor> {
        use std::os::unix::fs::FileExt;
        let row: i64 = self.shape[1..].iter().product();
        let row_bytes = row as usize * self.kind.elt_size_in_bytes();
        let mut bytes = vec![0u8; len * row_bytes];
        self.file
            .read_exact_at(&mut bytes, self.start + (first * row_bytes) as u64)
            .with_context(|| format!("reading {}", self.path.display()))?;
        let size = [&[len as i64][..], &self.shape[1..]].concat();
        let rows = Tensor::f_from_data_size(&bytes, &size, self.kind)?.to_kind(Kind::Float);
        ensure!(
            bool::try_from(rows.isfinite().all())?,
            "{}: {} holds values that are not finite (among rows {first} to {})",
            self.path.display(),
            self.key,
            first + len - 1
        );
        Ok(rows)
    }
}

/// The PNG file names of `count` images: after the `files` their latents were encoded from
/// (relative paths, the extension made `.png`; the whole name kept, `.png` added, where two
/// would meet, as `a.jpg` and `a.bmp`), else numbered from 0.
pub fn png_names(files: Option<&[String]>, count: usize) -> Result<Vec<String>> {
    let Some(files) = files.filter(|f| f.len() == count) else {
        return Ok((0..count).map(|i| format!("{i:06}.png")).collect());
    };
    let stem = |f: &String| Path::new(f).with_extension("png").to_string_lossy().into_owned();
    let mut seen = std::collections::HashMap::new();
    for f in files {
        *seen.entry(stem(f)).or_insert(0) += 1;
    }
    let names: Vec<String> =
        files.iter().map(|f| if seen[&stem(f)] > 1 { format!("{f}.png") } else { stem(f) }).collect();
    let unique: std::collections::HashSet<&String> = names.iter().collect();
    ensure!(unique.len() == names.len(), "the files the latents are of give clashing picture names");
    Ok(names)
}

/// What `vae info` says of a file of latents `vae encode` wrote: its tensors and the files
/// they are of.
pub fn describe_latents(path: &Path) -> Result<String> {
    let latents = Latents::open(path, Some("mean"))?;
    let mut text = format!("latents written by vae encode {}\n", path.display());
    let shapes: Vec<String> = latents.tensors.iter().map(|(n, shape)| format!("{n} {shape:?}")).collect();
    text += &format!("{} latents: {}\n", latents.count(), shapes.join(", "));
    if let Some(files) = latents.files {
        let first: Vec<&str> = files.iter().take(3).map(String::as_str).collect();
        let more = if files.len() > 3 { ", ..." } else { "" };
        text += &format!(
            "of the image files {}{more} (metadata \"files\", {} listed)\n",
            first.join(", "),
            files.len()
        );
    }
    text += "images again: vae decode CKPT FILE\n";
    Ok(text)
}

/// Writes `images` (`[N, C, H, W]` in [0, 1]) into `dir` as PNG files named by the first N
/// `names` (relative paths; their folders made), each a new file.
pub fn save_each(dir: &Path, names: &[String], images: &Tensor) -> Result<()> {
    for (i, name) in names.iter().take(images.size()[0] as usize).enumerate() {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        crate::fsio::write_new(&path, &png(&images.get(i as i64))?)?;
    }
    Ok(())
}

/// Images in [0, 1] as u8 values on the CPU, contiguous.
fn to_u8(images: &Tensor) -> Tensor {
    (images.to_device(tch::Device::Cpu).clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8).contiguous()
}

/// One image (`[C, H, W]`, values in [0, 1], C = 1 or 3) as the bytes of a PNG file.
pub fn png(image: &Tensor) -> Result<Vec<u8>> {
    let [c, h, w]: [i64; 3] = image.size().try_into().map_err(|_| anyhow::anyhow!("expected CHW"))?;
    ensure!(c == 1 || c == 3, "images have {c} channels, expected 1 or 3");
    let pixels = Vec::<u8>::try_from(to_u8(&image.permute([1, 2, 0])).flatten(0, -1))?;
    let color = if c == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(&mut bytes, &pixels, w as u32, h as u32, color, image::ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pictures_are_named_after_their_files_without_clashes() {
        let files: Vec<String> = ["a.jpg", "a.bmp", "b.png", "sub/c.jpg"].map(String::from).to_vec();
        assert_eq!(png_names(Some(&files), 4).unwrap(), ["a.jpg.png", "a.bmp.png", "b.png", "sub/c.png"]);
        // Files that do not go with the latents are no names for them.
        assert_eq!(png_names(Some(&files), 2).unwrap(), ["000000.png", "000001.png"]);
        assert_eq!(png_names(None, 1).unwrap(), ["000000.png"]);
    }

    #[test]
    fn grid_has_tiles_and_borders_where_expected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let images = Tensor::ones([5, 1, 3, 4], (Kind::Float, tch::Device::Cpu));
        save_grid(&path, &images, 2).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        // 2 columns of 4 px, 3 rows of 3 px, 2 px borders.
        assert_eq!(img.dimensions(), (2 * 6 + 2, 3 * 5 + 2));
        assert_eq!(img.get_pixel(2, 2).0, [255; 3]);
        assert_eq!(img.get_pixel(0, 0).0, [BORDER_GRAY; 3]);
        // The sixth tile is empty.
        assert_eq!(img.get_pixel(9, 13).0, [BORDER_GRAY; 3]);
    }
}
