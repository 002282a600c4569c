//! The `vae` binary as a user runs it, on tiny generated data in temporary folders.

mod common;

use common::{ok, stderr, stdout, train_tiny_resnet, vae, TINY_MODEL};
use std::path::Path;
use vae::checkpoint::Checkpoint;

const DATA: &[&str] = &["--batch-size", "32", "--threads", "1"];

/// Train losses from the per-epoch summary lines.
fn train_losses(out: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.starts_with("epoch "))
        .map(|l| l.split_whitespace().nth(3).expect("train loss").parse().expect("a number"))
        .collect()
}

fn png_size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn shapes_training_lowers_the_loss_and_writes_checkpoint_and_pictures() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args = vec!["train", "--epochs", "3", "--train-size", "512", "--test-size", "64"];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    args.extend_from_slice(&["--out", run.to_str().unwrap()]);
    let out = ok(vae(&args));
    let losses = train_losses(&stdout(&out));
    assert_eq!(losses.len(), 3, "{}", stdout(&out));
    assert!(losses[2] < losses[0] * 0.9, "loss did not fall: {losses:?}");
    for file in ["last.safetensors", "best.safetensors", "epoch-0003.safetensors"] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    // 12 tiles of 28 px with 2 px borders; originals and reconstructions in 4 rows.
    assert_eq!(png_size(&run.join("reconstructions.png")), (12 * 30 + 2, 4 * 30 + 2));
    assert_eq!(png_size(&run.join("samples.png")), (12 * 30 + 2, 4 * 30 + 2));

    // A second run into the same folder refuses and leaves the checkpoint alone.
    let before = std::fs::read(run.join("last.safetensors")).unwrap();
    let again = vae(&args);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already holds a checkpoint"), "{}", stderr(&again));
    assert_eq!(std::fs::read(run.join("last.safetensors")).unwrap(), before);
}

#[test]
fn best_by_picks_the_best_checkpoint_and_patience_stops_when_it_stops_improving() {
    let dir = tempfile::tempdir().unwrap();
    let (run, straight) = (dir.path().join("run"), dir.path().join("straight"));
    let run_arg = run.to_str().unwrap();
    let train = |out: &Path, extra: &[&str]| {
        // A KL weight of 30: the loss falls all along while SSIM rises, dips and rises
        // (measured), so the best by SSIM is not the last evaluation.
        let mut args = vec!["train", "--epochs", "3", "--train-size", "256", "--test-size", "64"];
        args.extend_from_slice(&["--beta", "30", "--lr", "3e-3", "--eval-every-steps", "2"]);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        args.extend_from_slice(TINY_MODEL);
        args.extend_from_slice(DATA);
        args.extend_from_slice(extra);
        ok(vae(&args))
    };
    let load = |file: &str| Checkpoint::load(&run.join(file)).unwrap();
    let ssim_rows = || -> Vec<(u64, f64)> {
        let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
        let header: Vec<&str> = metrics.lines().next().unwrap().split(',').collect();
        let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let cells = |l: &str| l.split(',').map(String::from).collect::<Vec<_>>();
        let row =
            |c: Vec<String>| (c[column("step")].parse().unwrap(), c[column("test_ssim")].parse().unwrap());
        metrics.lines().skip(1).map(|l| row(cells(l))).collect()
    };

    // Stopped at the first evaluation that did not better the SSIM before it.
    let out = stdout(&train(&run, &["--best-by", "ssim", "--patience", "1"]));
    assert!(out.contains("stopping early: the test SSIM has not bettered"), "{out}");
    assert!(out.contains(", best test SSIM 0.0"), "{out}");
    let (last, best) = (load("last.safetensors").meta, load("best.safetensors").meta);
    assert!(last.step < 24 && best.step == last.step - 2, "stopped at {}, best {}", last.step, best.step);
    assert_eq!(ssim_rows().len() as u64, last.step / 2);
    let before = std::fs::read(run.join("last.safetensors")).unwrap();
    let out = stdout(&ok(vae(&["train", "--resume", run_arg, "--threads", "1"])));
    assert!(out.contains("stopped early: its test SSIM has not bettered for 1 evaluation(s)"), "{out}");
    assert_eq!(std::fs::read(run.join("last.safetensors")).unwrap(), before);
    let info = stdout(&ok(vae(&["info", run_arg])));
    assert!(info.contains(", 1 evaluation(s) since, of --patience 1"), "{info}");

    // Without patience it goes on to --max-steps 20, best.safetensors at the highest SSIM.
    ok(vae(&[
        "train",
        "--resume",
        run_arg,
        "--patience",
        "0",
        "--max-steps",
        "20",
        "--threads",
        "1",
        "--quiet",
    ]));
    let rows = ssim_rows();
    let top = rows.iter().map(|r| r.1).fold(f64::MIN, f64::max);
    let best = load("best.safetensors").meta;
    let best_row = rows.iter().find(|r| r.0 == best.step).expect("a row at the best step");
    assert_eq!(best_row.1, top, "best.safetensors is not at the highest test SSIM: {rows:?}");
    assert_ne!(best.step, 20, "the highest SSIM is the last evaluation's: the case shows nothing");
    let info = stdout(&ok(vae(&["info", run.join("best.safetensors").to_str().unwrap()])));
    assert!(info.contains(&format!("best test SSIM {top:.4}")), "{info}");

    // Picked by the loss from now on: the next evaluation is the best to beat, and the loss
    // keeps falling. Neither changes the training: the run is the straight one's, bitwise
    // (on one thread, as every run here).
    let out =
        ok(vae(&["train", "--resume", run_arg, "--best-by", "loss", "--max-steps", "24", "--threads", "1"]));
    let err = stderr(&out);
    assert!(err.contains("best.safetensors is now picked by the test loss, not ssim"), "{err}");
    assert!(!err.contains("no longer bitwise"), "{err}");
    assert_eq!(load("best.safetensors").meta.step, 24);
    train(&straight, &["--quiet"]);
    let (a, b) = (load("last.safetensors"), Checkpoint::load(&straight.join("last.safetensors")).unwrap());
    assert_eq!((a.meta.step, a.tensors.len()), (b.meta.step, b.tensors.len()));
    for (name, t) in &a.tensors {
        assert!(t.equal(&b.tensors[name]), "{name} differs from the straight run's");
    }
}

#[test]
fn rgb_64_shapes_train_with_the_gaussian_likelihood() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("rgb");
    let mut args = vec!["train", "--epochs", "1", "--train-size", "64", "--test-size", "16"];
    args.extend_from_slice(&["--image-size", "64", "--channels", "3", "--conv-channels", "8,8,16"]);
    args.extend_from_slice(&TINY_MODEL[2..]);
    args.extend_from_slice(DATA);
    args.extend_from_slice(&["--out", run.to_str().unwrap()]);
    ok(vae(&args));
    assert!(run.join("last.safetensors").is_file());
    // 12 columns of 64 px; of 16 test images, one whole row of 12 above its reconstructions.
    assert_eq!(png_size(&run.join("reconstructions.png")), (12 * 66 + 2, 2 * 66 + 2));
}

#[test]
fn idx_dataset_trains_from_gzipped_files() {
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;
    use vae::data::idx;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let (pixels, labels) = vae::data::shapes::generate(96, 28, 1, 3);
    let write_gz = |name: &str, bytes: &[u8]| {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(bytes).unwrap();
        std::fs::write(data.join(name), enc.finish().unwrap()).unwrap();
    };
    write_gz("train-images-idx3-ubyte.gz", &idx::encode_images(64, 28, 28, &pixels[..64 * 784]));
    write_gz("train-labels-idx1-ubyte.gz", &idx::encode_labels(&labels[..64]));
    write_gz("t10k-images-idx3-ubyte.gz", &idx::encode_images(32, 28, 28, &pixels[64 * 784..]));
    write_gz("t10k-labels-idx1-ubyte.gz", &idx::encode_labels(&labels[64..]));
    let run = dir.path().join("run");
    let mut args = vec!["train", "--dataset", "fashion-mnist", "--data-dir", data.to_str().unwrap()];
    args.extend_from_slice(&["--epochs", "1", "--binarize", "dynamic"]);
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    let out = ok(vae(&[&args[..], &["--out", run.to_str().unwrap()]].concat()));
    assert!(stdout(&out).contains("training on 64 images of 1x28x28 (fashion-mnist), 32 test images"));
    assert!(run.join("last.safetensors").is_file());

    // A truncated image file is a clear error naming it (in a new run folder: the first one
    // is refused before any data is read).
    let bytes = std::fs::read(data.join("train-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(data.join("train-images-idx3-ubyte.gz"), &bytes[..bytes.len() / 2]).unwrap();
    let again = dir.path().join("again");
    let out = vae(&[&args[..], &["--out", again.to_str().unwrap()]].concat());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("train-images-idx3-ubyte.gz: corrupt gzip stream"), "{}", stderr(&out));
}

#[test]
fn bad_settings_fail_before_any_work_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("never");
    let out_arg = run.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm"], "/nonexistent/fm does not exist"),
        (&["--image-size", "30", "--conv-channels", "8,8,8"], "image size 30 is not divisible by 2^3 = 8"),
        (&["--lr", "0"], "--lr must be positive"),
        (&["--beta", "-1"], "--beta must be >= 0"),
        (&["--batch-size", "0"], "--batch-size must be positive"),
        (&["--channels", "2"], "1 or 3 channels"),
        (&["--device", "gpu"], "expected auto, cpu, cuda or cuda:N"),
        (&["--dataset", "bogus"], "invalid value 'bogus' for '--dataset <DATASET>'"),
        (&["--image-size", "0"], "--image-size must be positive, found 0"),
        (&["--hidden", "0"], "--hidden must be positive, found 0"),
        (&["--latent-dim", "-1"], "--latent-dim must be positive, found -1"),
        (&["--conv-channels", "8,-1"], "--conv-channels must all be positive, found [8, -1]"),
        (&["--epochs", "0"], "--epochs must be positive, found 0"),
        (&["--train-size", "0"], "--train-size and --test-size must be positive"),
        (&["--threads", "0"], "--threads must be at least 1, found 0"),
        (&["--lr", "nan"], "--lr must be positive, found NaN"),
        (
            &["--block-channels", "8,16"],
            "--block-channels applies to --arch resnet; this model is --arch conv",
        ),
        (&["--gradient-checkpointing"], "--gradient-checkpointing applies to --arch resnet"),
        (&["--arch", "resnet", "--gradient-checkpointing", "maybe"], "invalid value 'maybe'"),
        (&["--best-by", "lpips"], "--best-by lpips needs --lpips-weights FILE"),
        (&["--best-by", "rfid"], "--best-by rfid needs --fid-weights FILE"),
        (&["--fid-weights", "/nonexistent/fid.safetensors"], "/nonexistent/fid.safetensors"),
        (
            &["--best-by", "ssim", "--image-size", "8"],
            "--best-by ssim needs images of at least 11 pixels a side, found 8x8",
        ),
    ];
    for (flags, message) in cases {
        let mut args = vec!["train", "--out", out_arg];
        args.extend_from_slice(flags);
        let out = vae(&args);
        assert!(!out.status.success(), "{flags:?} succeeded");
        assert!(stderr(&out).contains(message), "{flags:?}: {}", stderr(&out));
        assert!(!run.exists(), "{flags:?} created the run folder");
    }
    if !tch::Cuda::is_available() {
        let out = vae(&["train", "--device", "cuda", "--out", out_arg]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("CUDA is not available"), "{}", stderr(&out));
    }
}

/// `vae train ... | head -n 1`: stdout closes after the first line, and the run trains on to
/// its end with its checkpoints (a print to the closed pipe used to panic and end it there).
/// `--init-from` another run takes the weights `vae eval` judges (their moving average, where
/// the run kept one: the trained ones were taken) and the image shape they were trained at
/// unless the flags say (as `vae eval` judges a diffusers folder): an RGB model fine-tuned with
/// the default 1-channel shapes failed on a tensor's shape. Images the weights cannot read, and
/// data flags that do not apply to the data (ignored, they trained on other data than meant),
/// are refused before any folder is made, by `train`, `eval` and `--resume` alike.
#[test]
fn a_run_from_other_weights_takes_their_image_shape_and_data_flags_must_apply() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    ok(train_tiny_resnet("16", &first, "1", &["--ema-decay", "0.9"]));
    let (first_arg, second) = (first.to_str().unwrap(), dir.path().join("second"));
    let from =
        ["train", "--init-from", first_arg, "--epochs", "1", "--train-size", "32", "--test-size", "16"];
    // Steps of 1e-30 leave the weights where they started.
    let still = ["--lr", "1e-30", "--batch-size", "16", "--threads", "1", "--out", second.to_str().unwrap()];
    let out = ok(vae(&[&from[..], &still].concat()));
    assert!(stdout(&out).contains("training on 32 images of 3x16x16 (shapes)"), "{}", stdout(&out));
    assert!(stdout(&out).contains("starting from the moving average of the weights of"), "{}", stdout(&out));
    let [started, trained] =
        [&second, &first].map(|run| Checkpoint::load(&run.join("last.safetensors")).unwrap());
    let (mut averaged, mut raw) = (0f64, 0f64);
    for (name, t) in
        started.tensors.iter().filter(|(n, _)| n.starts_with("encoder.") || n.starts_with("decoder."))
    {
        let gap = |other: &tch::Tensor| (t - other).abs().max().double_value(&[]);
        averaged = averaged.max(gap(&trained.tensors[&format!("ema.{name}")]));
        raw = raw.max(gap(&trained.tensors[name]));
    }
    assert!(
        averaged < 1e-20 && raw > 1e-6,
        "from the average: {averaged:e}; from the trained weights: {raw:e}"
    );
    let refused = |args: &[&str], expected: &str| {
        let out = vae(args);
        assert!(!out.status.success() && stderr(&out).contains(expected), "{args:?}: {}", stderr(&out));
    };
    let never = dir.path().join("never");
    let never = ["--out", never.to_str().unwrap()];
    let in_rgb = format!("{first_arg} takes images of 3 channel(s)");
    refused(
        &[&from[..], &never, &["--dataset", "mnist"]].concat(),
        &format!("{in_rgb}; mnist images have 1"),
    );
    refused(&[&from[..], &never, &["--channels", "1"]].concat(), &format!("{in_rgb}; shapes images have 1"));
    refused(
        &[&from[..], &never, &["--data-dir", "photos"]].concat(),
        "--data-dir photos does not apply to --dataset shapes (the default): it applies to --dataset \
         fashion-mnist, mnist, cifar10, folder only",
    );
    let last = first.join("last.safetensors");
    let of_first = format!("does not apply to the shapes images of {}", last.display());
    refused(&["eval", first_arg, "--data-dir", "photos"], &format!("--data-dir photos {of_first}"));
    refused(&["train", "--resume", first_arg, "--no-cache"], &format!("--no-cache {of_first}"));
    assert!(!dir.path().join("never").exists());
}

#[test]
fn a_run_whose_stdout_closes_trains_on_to_its_end() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args = vec!["train", "--epochs", "3", "--train-size", "256", "--test-size", "64"];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(DATA);
    args.extend_from_slice(&["--out", run.to_str().unwrap()]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("training on"), "{first}");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let last = vae::checkpoint::Checkpoint::load(&run.join("last.safetensors")).unwrap();
    assert_eq!(last.meta.epoch, 3);
}

/// `--freeze-encoder` trains the decoder alone, as Stable Diffusion's fine-tuned VAEs were
/// made: the encoder and quant_conv come out of a fine-tune and its resume bit for bit as they
/// went in (the latents a diffusion model was trained on stay the same), the decoder moves,
/// and Adam keeps no state for the frozen side.
#[test]
fn a_frozen_encoder_comes_out_of_training_as_it_went_in() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    ok(train_tiny_resnet("16", &first, "1", &[]));
    ok(train_tiny_resnet("16", &second, "1", &["--init-from", first.to_str().unwrap(), "--freeze-encoder"]));
    ok(vae(&["train", "--resume", second.to_str().unwrap(), "--epochs", "2", "--quiet"]));
    let [before, after] =
        [&first, &second].map(|run| Checkpoint::load(&run.join("last.safetensors")).unwrap());
    assert!(after.meta.config.freeze_encoder && after.meta.step == 6, "{:?}", after.meta.step);
    let mut moved = 0;
    for (name, t) in before.tensors.iter().filter(|(n, _)| !n.starts_with("optimizer.")) {
        let frozen = name.starts_with("encoder.") || name.starts_with("quant_conv.");
        let same = t.equal(&after.tensors[name]);
        assert!(same || !frozen, "{name} moved");
        moved += usize::from(!same);
        let state = format!("optimizer.exp_avg.{name}");
        assert_eq!(after.tensors.contains_key(&state), !frozen, "{state}");
    }
    assert!(moved > 10, "only {moved} decoder tensors moved");
    let alone = train_tiny_resnet("16", &dir.path().join("alone"), "1", &["--freeze-encoder"]);
    assert!(stderr(&ok(alone)).contains("keeps the encoder at its random initialisation"));
}
