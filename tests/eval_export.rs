//! `vae eval` and the exports: the IWAE bound against brute force and against the ELBO,
//! determinism, and the pictures and tensors each command writes.

mod common;

use common::{ok, stderr, stdout, vae, TINY_MODEL};
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};
use vae::eval::{iwae_nll, log_weights};
use vae::models::{ConvConfig, ConvVae, Likelihood, Model, Posterior, ResnetConfig, ResnetVae};

const DATA: &[&str] =
    &["--train-size", "640", "--test-size", "120", "--batch-size", "32", "--binarize", "dynamic"];

fn trained_run(dir: &Path) -> std::path::PathBuf {
    let run = dir.join("run");
    let mut args = vec!["train", "--quiet", "--epochs", "2", "--out", run.to_str().unwrap()];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    ok(vae(&args));
    run
}

fn png_size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Tiles of `side` px with 2 px borders.
fn grid(cols: u32, rows: u32, side: u32) -> (u32, u32) {
    (cols * (side + 2) + 2, rows * (side + 2) + 2)
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

#[test]
fn iwae_equals_a_brute_force_sum_over_the_same_samples() {
    let cfg =
        ConvConfig { image_size: 8, channels: vec![4], hidden: 8, latent_dim: 3, ..ConvConfig::default() };
    let vs = VarStore::new(Device::Cpu);
    let model = ConvVae::new(vs.root(), &cfg);
    tch::manual_seed(11);
    let x = Tensor::rand([3, 1, 8, 8], (Kind::Float, Device::Cpu)).round();
    let (k, chunk) = (7, 2);
    tch::manual_seed(5);
    let nll = values(&tch::no_grad(|| iwae_nll(&model, &x, k, chunk)));

    // The same draws, chunk by chunk, then every (image, sample) decoded on its own.
    tch::manual_seed(5);
    let eps: Vec<Tensor> =
        [2, 2, 2, 1].iter().map(|&n| Tensor::randn([n, 3, 3], (Kind::Float, Device::Cpu))).collect();
    let eps = Tensor::cat(&eps, 0);
    let q = tch::no_grad(|| model.encode(&x));
    let (mean, logvar) = (values(&q.mean), values(&q.logvar));
    let pixels = values(&x);
    let ln_2pi = (2.0 * std::f64::consts::PI).ln();
    for b in 0..3 {
        let log_w: Vec<f64> = (0..k as usize)
            .map(|s| {
                let e = values(&eps.get(s as i64).get(b as i64));
                let z: Vec<f64> =
                    (0..3).map(|d| mean[b * 3 + d] + (logvar[b * 3 + d] / 2.0).exp() * e[d]).collect();
                let zt = Tensor::from_slice(&z).to_kind(Kind::Float).view([1, 3]);
                let logits = values(&tch::no_grad(|| model.decode(&zt)));
                let log_px: f64 = logits
                    .iter()
                    .zip(&pixels[b * 64..(b + 1) * 64])
                    .map(|(&l, &t)| {
                        let p = 1.0 / (1.0 + (-l).exp());
                        t * p.ln() + (1.0 - t) * (1.0 - p).ln()
                    })
                    .sum();
                let log_pz: f64 = z.iter().map(|v| -0.5 * (v * v + ln_2pi)).sum();
                let log_qz: f64 = (0..3).map(|d| -0.5 * (e[d] * e[d] + logvar[b * 3 + d] + ln_2pi)).sum();
                log_px + log_pz - log_qz
            })
            .collect();
        let max = log_w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + log_w.iter().map(|w| (w - max).exp()).sum::<f64>().ln();
        let expected = -(lse - (k as f64).ln());
        assert!(
            (nll[b] - expected).abs() < 1e-3 * expected.abs(),
            "image {b}: {} vs brute force {expected}",
            nll[b]
        );
    }
}

/// Evaluation takes large images through the model a few at a time (8 of 512 x 512 to a
/// pass): ten images encode in two passes as in one, and the 2 x 10 decodes of an
/// importance-weighted bound, in three passes, are each scored against their own image.
#[test]
fn large_images_go_through_the_model_in_passes_each_against_its_own_image() {
    let cfg = ResnetConfig {
        image_size: 512,
        in_channels: 1,
        block_channels: vec![4, 4],
        layers_per_block: 1,
        latent_channels: 1,
        norm_groups: 2,
        mid_attention: false,
        quant_convs: false,
        likelihood: Likelihood::Bernoulli,
    };
    let vs = VarStore::new(Device::Cpu);
    let model = ResnetVae::new(vs.root(), &cfg);
    // Fixed images and noise, each image and draw its own.
    let pattern = |shape: &[i64], k: f64| {
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, (Kind::Float, Device::Cpu)) * k).sin().view(shape)
    };
    let x = (pattern(&[10, 1, 512, 512], 0.37) + 1.0).round() / 2.0;
    tch::no_grad(|| {
        let q = model.encode_in_passes(&x);
        let whole = model.encode(&x);
        assert!(
            q.mean.allclose(&whole.mean, 1e-5, 1e-5, false)
                && q.logvar.allclose(&whole.logvar, 1e-5, 1e-5, false)
        );
        let eps = pattern(&[2, 10, model.latent_dim()], 0.91);
        let weights = log_weights(&model, &x, &q, &eps);
        for (s, b) in [(0, 0), (0, 7), (0, 9), (1, 0), (1, 5), (1, 9)] {
            let (e, one) = (
                eps.get(s).narrow(0, b, 1),
                Posterior { mean: q.mean.narrow(0, b, 1), logvar: q.logvar.narrow(0, b, 1) },
            );
            let alone = log_weights(&model, &x.narrow(0, b, 1), &one, &e.unsqueeze(0));
            let (a, w) = (alone.double_value(&[0, 0]), weights.double_value(&[s, b]));
            assert!((a - w).abs() < 1e-4 * a.abs(), "sample {s}, image {b}: {w} in passes, {a} alone");
        }
    });
}

fn eval_json(run: &Path, k: &str) -> serde_json::Value {
    let out = ok(vae(&["eval", run.to_str().unwrap(), "--iw-samples", k, "--json", "--device", "cpu"]));
    let mut json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    json.as_object_mut().unwrap().remove("seconds");
    json
}

#[test]
fn the_iwae_bound_tightens_with_k_and_evaluation_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let nll = |k: &str| eval_json(&run, k)["iwae_nll"].as_f64().unwrap();
    let first = eval_json(&run, "100");
    assert_eq!(first, eval_json(&run, "100"), "two evaluations of one checkpoint differ");
    let elbo = first["negative_elbo"].as_f64().unwrap();
    let (k1, k10, k100) = (nll("1"), nll("10"), first["iwae_nll"].as_f64().unwrap());
    // K = 1 is a one-sample estimate of the negative ELBO itself.
    assert!((k1 - elbo).abs() < 0.05 * elbo, "K=1 {k1} vs ELBO {elbo}");
    assert!(k100 < k10 && k10 < k1, "not tightening with K: {k1} {k10} {k100}");
    assert!(k100 <= elbo, "IWAE NLL {k100} above the negative ELBO {elbo}");
    assert_eq!(first["images"], 120);
    assert_eq!(first["dimensions"], 784);
    let bpd = first["iwae_bits_per_dim"].as_f64().unwrap();
    assert!((bpd - k100 / (784.0 * std::f64::consts::LN_2)).abs() < 1e-9);

    let text = stdout(&ok(vae(&["eval", run.to_str().unwrap(), "--iw-samples", "20", "--split", "train"])));
    assert!(text.contains("train split of shapes, 640 images"), "{text}");
    assert!(text.contains("IWAE (K=20)"), "{text}");
}

#[test]
fn each_export_writes_what_it_promises() {
    let dir = tempfile::tempdir().unwrap();
    let run = trained_run(dir.path());
    let r = run.to_str().unwrap();
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    assert!(metrics.starts_with("epoch,step,train_loss,"), "{metrics}");

    ok(vae(&["reconstruct", r, "--n", "12"]));
    assert_eq!(png_size(&run.join("reconstruct.png")), grid(12, 2, 28));

    let own = [dir.path().join("a.png"), dir.path().join("b.jpg")];
    image::RgbImage::from_pixel(50, 30, image::Rgb([200, 10, 10])).save(&own[0]).unwrap();
    image::GrayImage::from_pixel(28, 40, image::Luma([90])).save(&own[1]).unwrap();
    let out = dir.path().join("own.png");
    ok(vae(&[
        "reconstruct",
        r,
        "--input",
        own[0].to_str().unwrap(),
        own[1].to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(png_size(&out), grid(2, 2, 28));

    ok(vae(&["sample", r, "--n", "16", "--temperature", "0.7"]));
    assert_eq!(png_size(&run.join("sample.png")), grid(4, 4, 28));
    let a = std::fs::read(run.join("sample.png")).unwrap();
    ok(vae(&["sample", r, "--n", "16", "--temperature", "0.7"]));
    assert_eq!(a, std::fs::read(run.join("sample.png")).unwrap(), "samples are fixed by the seed");
    ok(vae(&["sample", r, "--n", "16", "--temperature", "0.7", "--seed", "9"]));
    assert_ne!(a, std::fs::read(run.join("sample.png")).unwrap(), "--seed changes the draws");

    ok(vae(&["interpolate", r, "--pairs", "3", "--steps", "8", "--slerp"]));
    assert_eq!(png_size(&run.join("interpolate.png")), grid(10, 3, 28));
    ok(vae(&["traverse", r, "--steps", "9"]));
    assert_eq!(png_size(&run.join("traverse.png")), grid(9, 4, 28));
    ok(vae(&["traverse", r, "--dims", "2,0", "--steps", "5", "--index", "3"]));
    assert_eq!(png_size(&run.join("traverse.png")), grid(5, 2, 28));

    let latents = dir.path().join("latents.safetensors");
    ok(vae(&["encode", r, "--out", latents.to_str().unwrap()]));
    let tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&latents).unwrap().into_iter().collect();
    assert_eq!(tensors["mean"].size(), vec![120, 4]);
    assert_eq!(tensors["logvar"].size(), vec![120, 4]);
    assert_eq!(tensors["labels"].size(), vec![120]);
    // An output replaces only its own kind of file: latents, pictures; never a checkpoint or
    // the metrics a mistyped --out names.
    ok(vae(&["encode", r, "--out", latents.to_str().unwrap()]));
    let (last, metrics) = (run.join("last.safetensors"), run.join("metrics.csv"));
    let kept = [std::fs::read(&last).unwrap(), std::fs::read(&metrics).unwrap()];
    for (command, target, what) in [
        ("encode", &last, "latents of vae encode"),
        ("sample", &last, "a picture"),
        ("reconstruct", &metrics, "a picture"),
    ] {
        let out = vae(&[command, r, "--out", target.to_str().unwrap()]);
        assert!(!out.status.success(), "{command} replaced {}", target.display());
        assert!(stderr(&out).contains(&format!("exists and is not {what}")), "{}", stderr(&out));
    }
    assert_eq!([std::fs::read(&last).unwrap(), std::fs::read(&metrics).unwrap()], kept);

    for (args, message) in [
        (vec!["traverse", r, "--dims", "9"], "--dims 9 is not a latent dimension: the model has 4"),
        (vec!["reconstruct", r, "--input", "/nonexistent.png"], "/nonexistent.png: cannot read the image"),
        (vec!["reconstruct", r, "--input", "/"], "/ is a folder; name the image files in it"),
        (vec!["interpolate", r, "--pairs", "100"], "--pairs 100 needs 200 test images, the split has 120"),
        (vec!["sample", r, "--temperature", "0"], "--temperature must be positive"),
        (vec!["reconstruct", r, "--tile"], "--tile: the conv family's latent is one vector per image"),
        (vec!["eval", "/nonexistent"], "checkpoint /nonexistent does not exist"),
    ] {
        let out = vae(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
}

/// A run fine-tuned from a diffusers folder exports the latent scale the folder declares
/// (scaling_factor, shift_factor, latents_mean, latents_std), which the diffusion model
/// trained on its latents expects, through a chain of runs; it measured 1 / std instead, so
/// a fine-tuned Stable Diffusion VAE no longer wrote SD's 0.18215. `--scaling-factor` still
/// sets one, and a run from no folder still measures it.
#[test]
fn a_run_from_a_diffusers_folder_exports_the_folders_latent_scale() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let arg = |name: &str| path(name).to_str().unwrap().to_string();
    ok(common::train_tiny_resnet("16", &path("first"), "1", &[]));
    let config = |folder: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path(folder).join("config.json")).unwrap()).unwrap()
    };
    let out = ok(vae(&["export-diffusers", &arg("first"), &arg("measured")]));
    assert!(stdout(&out).contains("1 / the latents' standard deviation"), "{}", stdout(&out));
    assert!(config("measured")["shift_factor"].is_null());
    // A folder whose latents are normalised per channel, as some diffusers models' are.
    let mut declared = config("measured");
    let scale = serde_json::json!({"scaling_factor": 0.5, "shift_factor": 0.25, "latents_mean": [0.1, -0.2], "latents_std": [1.5, 2.5]});
    for key in ["scaling_factor", "shift_factor", "latents_mean", "latents_std"] {
        declared[key] = scale[key].clone();
    }
    std::fs::write(path("measured").join("config.json"), declared.to_string()).unwrap();
    let from = |origin: &str, run: &str| {
        let (origin, run) = (arg(origin), arg(run));
        let mut args =
            vec!["train", "--init-from", &origin, "--out", &run, "--epochs", "1", "--train-size", "32"];
        args.extend_from_slice(&["--test-size", "16", "--batch-size", "16", "--threads", "1", "--quiet"]);
        ok(vae(&args));
    };
    from("measured", "second");
    from("second", "third");
    for (run, folder) in [("second", "second-export"), ("third", "third-export")] {
        let out = ok(vae(&["export-diffusers", &arg(run), &arg(folder)]));
        assert!(stdout(&out).contains("scaling_factor 0.50000, as the diffusers folder"), "{}", stdout(&out));
        let written = config(folder);
        for key in ["scaling_factor", "shift_factor", "latents_mean", "latents_std"] {
            assert_eq!(written[key], scale[key], "{run}: {key}");
        }
    }
    let info = stdout(&ok(vae(&["info", &arg("third")])));
    assert!(info.contains("whose latents a diffusion model takes as {\"scaling_factor\":0.5,"), "{info}");
    // eval shows the latents as the diffusion model takes them, by that scale, channel by
    // channel; a run from no folder has no such scale.
    let eval = |run: &str| {
        let out = ok(vae(&["eval", &arg(run), "--iw-samples", "0", "--json", "--threads", "1"]));
        serde_json::from_str::<serde_json::Value>(stdout(&out).trim()).unwrap()["scaled_latents"].clone()
    };
    let scaled = eval("third");
    assert_eq!(scaled["channel_std"].as_array().map(Vec::len), Some(2), "{scaled}");
    assert!(scaled["std"].as_f64().unwrap() > 0.0, "{scaled}");
    assert!(eval("first").is_null());
    let out = stdout(&ok(vae(&["eval", &arg("third"), "--iw-samples", "0", "--threads", "1"])));
    assert!(
        out.contains("takes them, (z - latents_mean - 0.25) x 0.5 / latents_std (the diffusers"),
        "{out}"
    );
    ok(vae(&["export-diffusers", &arg("third"), &arg("set"), "--scaling-factor", "0.3"]));
    assert_eq!(
        (config("set")["scaling_factor"].as_f64(), config("set")["shift_factor"].is_null()),
        (Some(0.3), true)
    );
    // A declaration that does not fit the model is refused, naming the field.
    declared["latents_std"] = serde_json::json!([1.0]);
    std::fs::write(path("measured").join("config.json"), declared.to_string()).unwrap();
    let out = vae(&["export-diffusers", &arg("measured"), &arg("never")]);
    assert!(stderr(&out).contains("\"latents_std\" has 1 values for 2 latent channels"), "{}", stderr(&out));
}

/// `vae decode` turns latents back into images: `vae encode`'s means decode to the very
/// reconstructions `vae reconstruct` draws; `--each` writes one PNG per latent, named after the
/// image file it was encoded from; latents a diffusion model scaled are unscaled first; latents
/// the model cannot take are refused, naming the shapes.
#[test]
fn decode_turns_encoded_latents_back_into_the_reconstructions() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let arg = |name: &str| path(name).to_str().unwrap().to_string();
    let images = path("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    for i in 0..24u8 {
        let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([i * 10, x as u8 * 16, y as u8 * 16]));
        let name = if i % 2 == 0 { format!("{i}.png") } else { format!("sub/{i}.bmp") };
        img.save(images.join(name)).unwrap();
    }
    let data = ["--dataset", "folder", "--data-dir", &arg("images"), "--test-fraction", "0.3"];
    let run = arg("run");
    let train = ["train", "--epochs", "1", "--out", &run, "--image-size", "16", "--cache-dir", &arg("cache")];
    ok(vae(&[&train[..], common::TINY_RESNET, &data, &["--batch-size", "8", "--threads", "1", "--quiet"]]
        .concat()));
    let latents = arg("latents.safetensors");
    ok(vae(&["encode", &run, "--out", &latents, "--threads", "1"]));
    let files: Vec<String> = {
        let bytes = std::fs::read(&latents).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        serde_json::from_str(&header.metadata().as_ref().unwrap()["files"]).unwrap()
    };
    let n = files.len();
    assert!((2..=12).contains(&n), "{n} test images: one row of the grids");
    let info = stdout(&ok(vae(&["info", &latents])));
    assert!(info.contains(&format!("(metadata \"files\", {n} listed)")), "{info}");
    ok(vae(&["reconstruct", &run, "--n", &n.to_string(), "--threads", "1"]));
    ok(vae(&["decode", &run, &latents, "--each", &arg("each"), "--threads", "1"]));
    let picture = |p: &Path| image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8();
    let (reconstructed, decoded) = (picture(&path("run/reconstruct.png")), picture(&path("run/decode.png")));
    let row = image::imageops::crop_imm(&reconstructed, 0, 18, reconstructed.width(), 20).to_image();
    assert!(row == decoded, "the decoded means are not the reconstructions");
    for (i, file) in files.iter().enumerate() {
        let own = picture(&path("each").join(Path::new(file).with_extension("png")));
        let tile = image::imageops::crop_imm(&decoded, 2 + 18 * i as u32, 2, 16, 16).to_image();
        assert!(own == tile, "{file}: its picture is not tile {i} of the grid");
    }
    // Latents a diffusion model took, multiplied by a factor: divided out again.
    let mean = vae::export::Latents::open(&path("latents.safetensors"), None).unwrap().rows(0, n).unwrap();
    Tensor::write_safetensors(&[("latents", &mean * 4.0)], path("scaled.safetensors")).unwrap();
    let out = arg("unscaled.png");
    let scaled = ["decode", &run, &arg("scaled.safetensors"), "--scaling-factor", "4", "--threads", "1"];
    ok(vae(&[&scaled[..], &["--out", &out]].concat()));
    assert!(picture(&path("unscaled.png")) == decoded);
    // By the scale the model declares: its diffusers export's measured scaling_factor.
    ok(vae(&["export-diffusers", &run, &arg("exported")]));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path("exported/config.json")).unwrap()).unwrap();
    let factor = config["scaling_factor"].as_f64().unwrap();
    Tensor::write_safetensors(&[("latents", &mean * factor)], path("declared.safetensors")).unwrap();
    let declared = ["decode", &arg("exported"), &arg("declared.safetensors"), "--scaled", "--threads", "1"];
    ok(vae(&[&declared[..], &["--out", &arg("declared.png")]].concat()));
    let worst = picture(&path("declared.png"))
        .pixels()
        .zip(decoded.pixels())
        .fold(0, |worst, (a, b)| a.0.iter().zip(b.0).map(|(x, y)| x.abs_diff(y)).fold(worst, u8::max));
    assert!(worst <= 1, "unscaled by the declared factor {factor}: pixels differ by {worst}");
    // Half-precision latents (as a diffusion pipeline saves them) decode too.
    Tensor::write_safetensors(&[("latents", mean.to_kind(Kind::BFloat16))], path("bf16.safetensors"))
        .unwrap();
    ok(vae(&["decode", &run, &arg("bf16.safetensors"), "--out", &arg("bf16.png")]));
    assert_eq!(picture(&path("bf16.png")).dimensions(), decoded.dimensions());
    // A value that is not finite, in the last latent of 70 (the second chunk of 64), is refused
    // before any picture is written.
    let broken = mean.repeat([70, 1, 1, 1]).narrow(0, 0, 70).copy();
    let _ = broken.get(69).fill_(f64::NAN);
    Tensor::write_safetensors(&[("latents", broken)], path("nan.safetensors")).unwrap();
    let out = vae(&["decode", &run, &arg("nan.safetensors"), "--each", &arg("never")]);
    assert!(stderr(&out).contains("holds values that are not finite"), "{}", stderr(&out));
    assert!(std::fs::read_dir(path("never")).map_or(true, |mut e| e.next().is_none()));
    for (args, message) in [
        (vec!["decode", &run, &arg("scaled.safetensors"), "--scaled"], "declares no latent scale"),
        (vec!["decode", &run, &latents, "--each", &arg("each")], "already holds files"),
        (
            vec!["decode", &run, &latents, "--key", "labels"],
            "holds no tensor \"labels\" (it holds logvar, mean)",
        ),
    ] {
        let out = vae(&args);
        assert!(!out.status.success() && stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
    Tensor::write_safetensors(
        &[("z", Tensor::zeros([2, 4], (Kind::Float, Device::Cpu)))],
        path("flat.safetensors"),
    )
    .unwrap();
    let out = vae(&["decode", &run, &arg("flat.safetensors")]);
    assert!(
        stderr(&out).contains("z is [2, 4];") && stderr(&out).contains("decodes latents of [N, 2, h, w]"),
        "{}",
        stderr(&out)
    );
}
