//! `--arch resnet` is diffusers' AutoencoderKL: a randomly initialised one (saved by diffusers
//! itself, scripts/diffusers_reference.py) loads into ours and computes the same posterior and
//! reconstruction; `vae train --init-from` + `vae export-diffusers` give a folder diffusers
//! loads with no missing or unexpected keys and the same outputs; and 20 Adam steps from the
//! same weights on the same batches and noise give the same losses in both.

mod common;

use common::{ok, stderr, stdout, vae, TINY_MODEL};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::nn::VarStore;
use tch::{Device, Tensor};
use vae::adam::{Adam, AdamConfig};
use vae::checkpoint::Checkpoint;
use vae::loss::{Elbo, KlWeight};
use vae::models::{tiles, Likelihood, Model, ModelConfig, ResnetVae, Tile};
use vae::pretrained;

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(python.exists(), "{} missing: run scripts/setup", python.display());
    python
}

/// scripts/diffusers_reference.py with `args`; its stdout.
fn reference(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/diffusers_reference.py");
    let out = Command::new(python()).arg(script).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "diffusers_reference.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// Largest |a - b| relative to b's largest magnitude.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - b).abs().max().double_value(&[]) / scale
}

/// Our posterior and decoder output for the first batch of `io`, as the script computes them.
fn outputs(model: &ResnetVae, io: &HashMap<String, Tensor>) -> [(&'static str, Tensor); 3] {
    let (x, eps) = (io["x"].get(0), io["eps"].get(0));
    let (mean, logvar) = tch::no_grad(|| model.encode_spatial(&x));
    let z = &mean + (&logvar * 0.5).exp() * eps;
    let decoded = tch::no_grad(|| model.decode(&z));
    [("mean", mean), ("logvar", logvar), ("decoded", decoded)]
}

fn assert_same(ours: &[(&str, Tensor)], theirs: &HashMap<String, Tensor>, what: &str) {
    for (name, t) in ours {
        let worst = relative(t, &theirs[*name]);
        assert!(worst < 1e-4, "{what}: {name} differs by {worst:e} (relative)");
    }
}

/// A small diffusers model `name` the script makes (with `flags`) in `dir`, on one thread as
/// ours then runs, and its inputs and outputs (`name.io.safetensors`).
fn made(dir: &Path, name: &str, flags: &[&str]) -> (PathBuf, HashMap<String, Tensor>) {
    tch::set_num_threads(1);
    let folder = dir.join(name);
    reference(&[&["make", folder.to_str().unwrap(), "--steps", "1"][..], flags].concat());
    (folder, read(&dir.join(format!("{name}.io.safetensors"))))
}

/// diffusers' folder as our model, through the same path `--init-from` takes.
fn load(dir: &Path) -> (VarStore, ResnetVae) {
    let cfg = pretrained::read_config(dir).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let model = ResnetVae::new(vs.root(), &cfg);
    pretrained::init_from(dir, &vs, &ModelConfig::Resnet(cfg)).unwrap();
    (vs, model)
}

#[test]
fn diffusers_autoencoder_kl_and_ours_are_the_same_model() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let theirs = tmp.path().join("diffusers");
    let io_path = tmp.path().join("diffusers.io.safetensors");
    reference(&["make", theirs.to_str().unwrap()]);
    let io = read(&io_path);

    // 1. diffusers' weights in our model: the same posterior and reconstruction.
    let (vs, model) = load(&theirs);
    assert_same(&outputs(&model, &io), &io, "diffusers' folder loaded into ours");

    // 2. Through the command line: a run started from the folder (fine-tuned with gradient
    // checkpointing, which is no architecture flag), exported back, loaded by diffusers (which
    // the script checks for missing and unexpected keys).
    let run = tmp.path().join("run");
    let data = ["--dataset", "shapes", "--channels", "3", "--image-size", "16", "--train-size", "64"];
    ok(vae(&[
        &["train", "--init-from", theirs.to_str().unwrap(), "--epochs", "1", "--test-size", "32"][..],
        &data[..],
        &["--batch-size", "32", "--out", run.to_str().unwrap(), "--threads", "1", "--gradient-checkpointing"],
    ]
    .concat()));
    let exported = tmp.path().join("exported");
    let out = ok(vae(&["export-diffusers", run.to_str().unwrap(), exported.to_str().unwrap()]));
    assert!(stdout(&out).contains("scaling_factor"), "{}", stdout(&out));
    let their_outputs = tmp.path().join("exported.out.safetensors");
    let printed = reference(&[
        "run",
        exported.to_str().unwrap(),
        io_path.to_str().unwrap(),
        their_outputs.to_str().unwrap(),
    ]);
    let ckpt = Checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert!(ckpt.meta.config.gradient_checkpointing);
    // The run names the weights it started from, through its resumes and continuations.
    let weights = theirs.join(pretrained::WEIGHTS).canonicalize().unwrap();
    let origin = format!(
        "started from the weights of {} (crc32 {:08x})",
        weights.display(),
        crc32fast::hash(&std::fs::read(&weights).unwrap())
    );
    let forked = tmp.path().join("forked");
    let fork =
        ["train", "--resume", run.to_str().unwrap(), "--epochs", "2", "--out", forked.to_str().unwrap()];
    ok(vae(&[&fork[..], &["--quiet", "--threads", "1"]].concat()));
    for checkpoint in [&run, &forked] {
        let info = stdout(&ok(vae(&["info", checkpoint.to_str().unwrap()])));
        assert!(info.contains(&origin), "{origin} not in {info}");
    }
    let ModelConfig::Resnet(cfg) = &ckpt.meta.config.model else { panic!("a resnet run") };
    let trained_vs = VarStore::new(Device::Cpu);
    let trained = ResnetVae::new(trained_vs.root(), cfg);
    ckpt.load_weights(&trained_vs).unwrap();
    assert_same(&outputs(&trained, &io), &read(&their_outputs), "our export loaded by diffusers");
    // The original Stable Diffusion layout cannot say GroupNorm's groups: the LDM code has 32,
    // so a file of this model (4 groups) would compute other outputs there; it is refused.
    let single = tmp.path().join("exported.safetensors");
    let err = vae(&["export-single-file", run.to_str().unwrap(), single.to_str().unwrap()]);
    assert!(!err.status.success() && stderr(&err).contains("has 4 GroupNorm groups"), "{}", stderr(&err));
    assert!(!single.exists());
    let scale: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    assert!(scale["scaling_factor"].as_f64().unwrap() > 0.0);
    // The exported folder judged as it is, laid out as a pipeline's vae/ folder, on the data
    // the flags choose: the same figures as the checkpoint it came from, on the run's data.
    let pipeline = tmp.path().join("pipeline");
    std::fs::create_dir_all(pipeline.join("vae")).unwrap();
    std::fs::write(pipeline.join("model_index.json"), "{}").unwrap();
    for file in [pretrained::CONFIG, pretrained::WEIGHTS] {
        std::fs::copy(exported.join(file), pipeline.join("vae").join(file)).unwrap();
    }
    let figures = |args: &[&str]| {
        let out = ok(vae(&[&["eval", "--iw-samples", "0", "--json", "--threads", "1"][..], args].concat()));
        let mut report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        report.as_object_mut().unwrap().remove("seconds");
        report
    };
    let of_run = figures(&[run.to_str().unwrap()]);
    let sizes = ["--dataset", "shapes", "--train-size", "64", "--test-size", "32"];
    assert_eq!(figures(&[&[pipeline.to_str().unwrap()][..], &sizes[..]].concat()), of_run);
    assert!(of_run["quality"]["psnr_db"].as_f64().unwrap() > 0.0, "{of_run}");
    // A folder of the float16 variant alone (a `variant="fp16"` download) is read too, its
    // weights made float32: about the same figures. A pickle is refused, saying how to convert.
    let half = tmp.path().join("half");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::copy(exported.join(pretrained::CONFIG), half.join(pretrained::CONFIG)).unwrap();
    let weights = Tensor::read_safetensors(exported.join(pretrained::WEIGHTS)).unwrap();
    let weights: Vec<_> = weights.into_iter().map(|(n, t)| (n, t.to_kind(tch::Kind::Half))).collect();
    Tensor::write_safetensors(&weights, half.join(pretrained::WEIGHTS_FP16)).unwrap();
    let of_half = figures(&[&[half.to_str().unwrap()][..], &sizes[..]].concat());
    let psnr = |report: &serde_json::Value| report["quality"]["psnr_db"].as_f64().unwrap();
    assert!((psnr(&of_half) - psnr(&of_run)).abs() < 0.05, "float16 {of_half}, float32 {of_run}");
    // A Hugging Face cache folder, as from_pretrained leaves it: its files are links into
    // blobs/, and refs/main names the snapshot.
    let cached = tmp.path().join("hub").join("models--org--vae");
    let snapshot = cached.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(cached.join("refs")).unwrap();
    std::fs::write(cached.join("refs").join("main"), "0123abcd").unwrap();
    for file in [pretrained::CONFIG, pretrained::WEIGHTS_FP16] {
        std::os::unix::fs::symlink(half.join(file), snapshot.join(file)).unwrap();
    }
    let info = stdout(&ok(vae(&["info", cached.to_str().unwrap()])));
    assert!(info.contains(&format!("diffusers AutoencoderKL folder {}", snapshot.display())), "{info}");
    std::fs::remove_file(half.join(pretrained::WEIGHTS_FP16)).unwrap();
    std::fs::write(half.join("diffusion_pytorch_model.bin"), b"PK").unwrap();
    let out = vae(&["info", half.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("are a PyTorch pickle"), "{}", stderr(&out));
    // Pictures go beside the folder, named after it, never into it.
    let out = ok(vae(&[&["reconstruct", pipeline.to_str().unwrap(), "--n", "2"][..], &sizes[..]].concat()));
    assert!(tmp.path().join("pipeline-reconstruct.png").is_file(), "{}", stdout(&out));
    assert_eq!(std::fs::read_dir(&pipeline).unwrap().count(), 2, "files written into the pipeline folder");
    // Latents in diffusers' layout: 2 channels of 8 x 8 for the 16 x 16 images.
    let latents = tmp.path().join("latents.safetensors");
    ok(vae(&[&["encode", pipeline.to_str().unwrap(), "--out", latents.to_str().unwrap()][..], &sizes[..]]
        .concat()));
    let encoded = read(&latents);
    assert_eq!((encoded["mean"].size(), encoded["logvar"].size()), (vec![32, 2, 8, 8], vec![32, 2, 8, 8]));
    let info = stdout(&ok(vae(&["info", pipeline.to_str().unwrap()])));
    assert!(info.contains("block channels [8, 16]") && info.contains("sample_size 16"), "{info}");
    // A folder has no data: it is judged only on data named.
    let err = vae(&["eval", pipeline.to_str().unwrap(), "--test-size", "32"]);
    assert!(!err.status.success());
    assert!(stderr(&err).contains("has no data of its own: name the images"), "{}", stderr(&err));
    // A checkpoint is judged on its own run's data: a flag that would change it is refused.
    let err = vae(&["eval", run.to_str().unwrap(), "--image-size", "32"]);
    assert!(!err.status.success());
    assert!(stderr(&err).contains("--image-size 32 applies to a diffusers folder"), "{}", stderr(&err));
    // A folder that holds files is never written into.
    let err = vae(&["export-diffusers", run.to_str().unwrap(), exported.to_str().unwrap()]);
    assert!(!err.status.success());
    assert!(stderr(&err).contains("already holds files"));
    // Flags of another architecture than the weights' are refused, naming both.
    let never = tmp.path().join("never");
    let err = vae(&[
        &["train", "--init-from", theirs.to_str().unwrap(), "--out", never.to_str().unwrap()][..],
        TINY_MODEL,
        &data[..],
    ]
    .concat());
    assert!(!err.status.success());
    assert!(
        stderr(&err).contains("the flags describe --arch conv, conv channels [8, 16]")
            && stderr(&err).contains("holds --arch resnet, block channels [8, 16]"),
        "{}",
        stderr(&err)
    );
    assert!(!never.exists());
    // A diffusers folder is weights, not a run: --resume says to start from it instead.
    let err = vae(&["train", "--resume", theirs.to_str().unwrap(), "--out", never.to_str().unwrap()]);
    assert!(!err.status.success());
    assert!(stderr(&err).contains("not a run to continue; start a run from them with --init-from"));
    assert!(!never.exists());

    // The exports of this family: reconstructions of a user image at its own resolution (cut
    // to a multiple of the 2-pixel downscale), traversals over the 2 latent channels, and
    // samples with the note that a KL weight of 1e-6 makes no generative model.
    let user = tmp.path().join("user.png");
    image::RgbImage::from_fn(21, 14, |x, y| image::Rgb([(x * 12) as u8, (y * 18) as u8, 90]))
        .save(&user)
        .unwrap();
    let grid = tmp.path().join("grid.png");
    ok(vae(&[
        "reconstruct",
        run.to_str().unwrap(),
        "--input",
        user.to_str().unwrap(),
        "--out",
        grid.to_str().unwrap(),
    ]));
    let (w, h) = image::image_dimensions(&grid).unwrap();
    let traversal = tmp.path().join("traverse.png");
    ok(vae(&["traverse", run.to_str().unwrap(), "--steps", "3", "--out", traversal.to_str().unwrap()]));
    let (tw, th) = image::image_dimensions(&traversal).unwrap();
    let out = ok(vae(&[
        "sample",
        run.to_str().unwrap(),
        "--n",
        "4",
        "--out",
        tmp.path().join("s.png").to_str().unwrap(),
    ]));
    assert!(stderr(&out).contains("not a generative model of its own"), "{}", stderr(&out));
    // One 20 x 14 original over its reconstruction; 2 rows of 3 16 x 16 images; borders of 2.
    assert_eq!((w, h), (20 + 4, 2 * 14 + 6), "reconstruction grid");
    assert_eq!((tw, th), (3 * 16 + 8, 2 * 16 + 6), "traversal grid");

    // 3. 20 Adam steps on the same batches and noise: the same losses, step by step.
    let losses_path = tmp.path().join("losses.safetensors");
    reference(&[
        "train",
        theirs.to_str().unwrap(),
        io_path.to_str().unwrap(),
        losses_path.to_str().unwrap(),
        "--lr",
        "1e-3",
        "--beta",
        "1e-3",
    ]);
    let theirs_losses = Vec::<f64>::try_from(&read(&losses_path)["losses"]).unwrap();
    let mut adam = Adam::new(&vs, AdamConfig { lr: 1e-3, ..AdamConfig::default() });
    let weight = KlWeight { beta: 1e-3, free_bits: 0.0 };
    for (step, expected) in theirs_losses.iter().enumerate() {
        let (x, eps) = (io["x"].get(step as i64), io["eps"].get(step as i64).flatten(1, -1));
        let out = model.forward_with_noise(&x, &eps);
        let loss = Elbo::new(Likelihood::L1, &out, &x, weight).loss;
        let ours = loss.double_value(&[]);
        assert!(
            (ours - expected).abs() <= 1e-4 * expected.abs(),
            "step {step}: ours {ours}, diffusers' {expected}"
        );
        adam.zero_grad();
        loss.backward();
        adam.step();
    }
    assert_eq!(theirs_losses.len(), 20);
}

/// SD3's and Flux's autoencoders have no convolutions around the latent (`use_quant_conv` and
/// `use_post_quant_conv` false), which such a folder was refused for: it is now the same model
/// in ours, and a run of `--no-quant-convs` exports a folder diffusers loads (no missing or
/// unexpected keys) and computes the same outputs from.
#[test]
fn an_autoencoder_without_quant_convs_is_the_same_model_in_diffusers_and_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let (theirs, io) = made(tmp.path(), "flux-like", &["--no-quant-convs"]);
    let io_path = tmp.path().join("flux-like.io.safetensors");
    let (_, model) = load(&theirs);
    assert!(!model.cfg.quant_convs);
    assert_same(&outputs(&model, &io), &io, "diffusers' folder without quant convs loaded into ours");
    let run = tmp.path().join("run");
    ok(common::train_tiny_resnet("16", &run, "1", &["--no-quant-convs"]));
    let exported = tmp.path().join("exported");
    ok(vae(&[
        "export-diffusers",
        run.to_str().unwrap(),
        exported.to_str().unwrap(),
        "--scaling-factor",
        "1",
    ]));
    let their_outputs = tmp.path().join("exported.out.safetensors");
    let paths = [exported.to_str().unwrap(), io_path.to_str().unwrap(), their_outputs.to_str().unwrap()];
    reference(&[&["run"][..], &paths].concat());
    let (_, ours) = load(&exported);
    assert_same(
        &outputs(&ours, &io),
        &read(&their_outputs),
        "our export without quant convs loaded by diffusers",
    );
    let info = stdout(&ok(vae(&["info", exported.to_str().unwrap()])));
    assert!(info.contains("mid attention, no quant convs"), "{info}");
}

/// Stable Diffusion's VAEs are shared as single files in the original (LDM) layout
/// (`vae-ft-mse-840000-ema-pruned.safetensors`), or inside a whole SD checkpoint: such a file
/// is read as the diffusers folder diffusers' own `convert_ldm_vae_checkpoint` makes of it (the
/// script checks the file maps back exactly through it), with the same outputs, and a run
/// starts from it. It was refused as "not a vae checkpoint", and diffusers' `from_single_file`
/// fetches a config from the Hub, which an offline cluster cannot.
#[test]
fn a_single_file_in_the_original_stable_diffusion_layout_is_read_as_its_diffusers_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (theirs, io) = made(tmp.path(), "sd-like", &["--groups-of-32"]);
    let (single, whole) = (tmp.path().join("vae-ft.safetensors"), tmp.path().join("sd-whole.safetensors"));
    reference(&["ldm", theirs.to_str().unwrap(), single.to_str().unwrap()]);
    reference(&["ldm", theirs.to_str().unwrap(), whole.to_str().unwrap(), "--whole"]);
    for file in [&single, &whole] {
        let (_, model) = load(file);
        assert_eq!((model.cfg.block_channels.clone(), model.cfg.norm_groups), (vec![32, 64], 32));
        assert_same(&outputs(&model, &io), &io, &format!("{} loaded into ours", file.display()));
    }
    let info = stdout(&ok(vae(&["info", single.to_str().unwrap()])));
    assert!(
        info.contains("original Stable Diffusion layout") && info.contains("scaling_factor none"),
        "{info}"
    );
    let run = tmp.path().join("run");
    let data = ["--dataset", "shapes", "--image-size", "16", "--train-size", "32", "--test-size", "16"];
    let from =
        ["train", "--init-from", whole.to_str().unwrap(), "--epochs", "1", "--out", run.to_str().unwrap()];
    let out = ok(vae(&[&from[..], &data, &["--batch-size", "16", "--threads", "1"]].concat()));
    assert!(stdout(&out).contains("training on 32 images of 3x16x16 (shapes)"), "{}", stdout(&out));
    // Back to one file in that layout, for the tools that take only that: the layout the
    // script makes of the run's diffusers export, and diffusers' single-file loader reads it
    // with the same outputs as ours; ours reads it back; it is never written over.
    let (exported, file) = (tmp.path().join("exported"), tmp.path().join("exported.safetensors"));
    ok(vae(&["export-diffusers", run.to_str().unwrap(), exported.to_str().unwrap()]));
    let out = ok(vae(&["export-single-file", run.to_str().unwrap(), file.to_str().unwrap()]));
    assert!(stdout(&out).contains("holds no scaling_factor"), "{}", stdout(&out));
    let theirs = tmp.path().join("exported.out.safetensors");
    let io_path = tmp.path().join("sd-like.io.safetensors");
    let paths = [exported.to_str().unwrap(), io_path.to_str().unwrap(), theirs.to_str().unwrap()];
    reference(&[&["run"][..], &paths, &["--single-file", file.to_str().unwrap()]].concat());
    let (_, trained) = load(&exported);
    assert_same(&outputs(&trained, &io), &read(&theirs), "our single file loaded by diffusers");
    assert_same(&outputs(&load(&file).1, &io), &read(&theirs), "our single file read back");
    let err = vae(&["export-single-file", run.to_str().unwrap(), file.to_str().unwrap()]);
    assert!(!err.status.success() && stderr(&err).contains("already exists"), "{}", stderr(&err));
    let out = vae(&["train", "--resume", single.to_str().unwrap()]);
    assert!(
        stderr(&out).contains("a single Stable Diffusion VAE file), not a run to continue"),
        "{}",
        stderr(&out)
    );
}

/// diffusers' `enable_tiling()` encodes and decodes what exceeds a tile in overlapping tiles,
/// blended: `--tile` gives its outputs from the same weights, in the library and through
/// `vae decode` and `vae reconstruct` (an image, and latents, of 2.5 x 3.5 tiles: edge tiles
/// cut short, blends both ways). Bare, `--tile` is the folder's sample_size, as diffusers'.
#[test]
fn tiles_are_those_of_diffusers_enable_tiling() {
    let tmp = tempfile::tempdir().unwrap();
    let (theirs, _) = made(tmp.path(), "tiled", &[]);
    let user = tmp.path().join("user.png");
    image::RgbImage::from_fn(56, 40, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 6) as u8, ((x * y) % 251) as u8])
    })
    .save(&user)
    .unwrap();
    let out = tmp.path().join("tiled.out.safetensors");
    let paths = [theirs.to_str().unwrap(), user.to_str().unwrap(), out.to_str().unwrap()];
    reference(&[&["tiled"][..], &paths, &["--tile", "16"]].concat());
    let io = read(&out);
    let (_, model) = load(&theirs);
    let tile = ModelConfig::Resnet(model.cfg.clone()).tile(None).unwrap();
    assert_eq!(tile, Tile { pixels: 16, downscale: 2 });
    let (mean, logvar) = tch::no_grad(|| tiles::encode(&model, &io["x"], tile));
    let decoded = tch::no_grad(|| tiles::decode(&model, &io["z"], tile));
    let reconstructed = tch::no_grad(|| tiles::decode(&model, &mean, tile));
    let ours = [("mean", mean), ("logvar", logvar), ("decoded", decoded), ("reconstructed", reconstructed)];
    assert_same(&ours, &io, "tiled encoding and decoding");
    // Tiling changes the result (so the above compares tiles, not whole images).
    let whole = tch::no_grad(|| model.decode(&io["z"]));
    assert!(relative(&whole, &io["decoded"]) > 1e-3, "the tiled decoding is the whole one");

    // The commands, as PNGs of diffusers' outputs (within a level of rounding).
    let pixels = |t: &Tensor| {
        Vec::<u8>::try_from(
            (((t + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round().to_kind(tch::Kind::Uint8).flatten(0, -1),
        )
        .unwrap()
    };
    let close = |ours: &[u8], theirs: &[u8], what: &str| {
        assert_eq!(ours.len(), theirs.len(), "{what}");
        let worst = ours.iter().zip(theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(worst <= 1, "{what}: pixels differ by {worst} levels");
    };
    let each = tmp.path().join("each");
    let folder = theirs.to_str().unwrap();
    ok(vae(&[
        "decode",
        folder,
        out.to_str().unwrap(),
        "--key",
        "z",
        "--tile",
        "--each",
        each.to_str().unwrap(),
    ]));
    for i in 0..2 {
        let png = image::open(each.join(format!("{i:06}.png"))).unwrap().to_rgb8();
        assert_eq!(png.dimensions(), (56, 40));
        close(png.as_raw(), &pixels(&io["decoded"].get(i).permute([1, 2, 0])), "vae decode --tile");
    }
    let grid = tmp.path().join("grid.png");
    let args = ["reconstruct", folder, "--input", user.to_str().unwrap(), "--tile", "16", "--out"];
    let tiled = ok(vae(&[&args[..], &[grid.to_str().unwrap()]].concat()));
    // Whole, an image of 8.75 times the model's area gets a note that --tile bounds memory.
    let note = "56 x 40 images go through the model whole, in memory that grows with their area";
    let whole = tmp.path().join("whole.png");
    let whole = ok(vae(&[
        "reconstruct",
        folder,
        "--input",
        user.to_str().unwrap(),
        "--out",
        whole.to_str().unwrap(),
    ]));
    assert!(stderr(&whole).contains(note) && !stderr(&tiled).contains(note), "{}", stderr(&whole));
    // The original over its reconstruction, in borders of 2.
    let grid = image::open(&grid).unwrap().to_rgb8();
    let below = image::imageops::crop_imm(&grid, 2, 2 + 40 + 2, 56, 40).to_image();
    close(below.as_raw(), &pixels(&io["reconstructed"].get(0).permute([1, 2, 0])), "vae reconstruct --tile");

    // Tiles must start on latent positions and overlap by whole ones.
    let err = vae(&["decode", folder, out.to_str().unwrap(), "--key", "z", "--tile", "12"]);
    assert!(!err.status.success());
    assert!(
        stderr(&err).contains("--tile 12: tiles need a side that is a multiple of 8 pixels"),
        "{}",
        stderr(&err)
    );
}
