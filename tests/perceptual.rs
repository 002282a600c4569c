//! The perceptual term (`--perceptual-weight`, `--lpips-weights`): our LPIPS equals the
//! `lpips` package's (random VGG16 trunk, the package's linear heads), distance and gradient;
//! training with it runs, resumes bitwise and reports LPIPS; what it cannot use is refused.

mod common;

use common::{ok, python_script, random_lpips, stderr, stdout, train_tiny_resnet, vae, TINY_MODEL};
use std::path::Path;
use tch::{Device, Kind, Tensor};
use vae::checkpoint::{Checkpoint, Resume};
use vae::perceptual::Lpips;

fn relative(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - b).abs().max().double_value(&[]) / scale
}

#[test]
fn our_lpips_equals_the_package_in_distance_and_gradient() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(7);
    // Three images of 160 x 160: training computes their gradient in passes of 2 and 1 (a
    // bound on the trunk's graph); one of them alone takes a single pass.
    let x0 = Tensor::rand([3, 3, 160, 160], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    // Nearby images, as a reconstruction is near its original.
    let x1 = (&x0 + Tensor::randn([3, 3, 160, 160], (Kind::Float, Device::Cpu)) * 0.2).clamp(-1.0, 1.0);
    let images = dir.path().join("images.safetensors");
    Tensor::write_safetensors(&[("x0", &x0), ("x1", &x1)], &images).unwrap();
    let (path, reference) = (dir.path().join("lpips.safetensors"), dir.path().join("reference.safetensors"));
    python_script(
        "lpips_weights.py",
        &[
            path.to_str().unwrap(),
            "--random-trunk",
            "--reference",
            images.to_str().unwrap(),
            "--reference-out",
            reference.to_str().unwrap(),
        ],
    );
    let theirs: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&reference).unwrap().into_iter().collect();

    let lpips = Lpips::load(&path, Device::Cpu).unwrap();
    for n in [3, 1] {
        let x1 = x1.narrow(0, 0, n).copy().set_requires_grad(true);
        let distance = lpips.distance(&x0.narrow(0, 0, n), &x1, Kind::Float);
        // Weighted per image, as a loss does with the distance.
        (&distance * Tensor::from_slice(&[1.0f32, -2.0, 0.5]).narrow(0, 0, n)).sum(None).backward();
        let weights = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).narrow(0, 0, n).view([n, 1, 1, 1]);
        let d = relative(&distance.detach(), &theirs["distance"].narrow(0, 0, n));
        let g = relative(&x1.grad(), &(&theirs["grad"].narrow(0, 0, n) * weights));
        assert!(d < 1e-5 && g < 1e-5, "{n} images: distance differs by {d:e}, gradient by {g:e} (relative)");
        assert!(distance.min().double_value(&[]) > 0.0, "no distance between different images");
    }

    // A file of other tensors is refused, naming the file and the missing tensor.
    let other = dir.path().join("other.safetensors");
    Tensor::write_safetensors(&[("w", &x0)], &other).unwrap();
    let err = Lpips::load(&other, Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("other.safetensors") && err.contains("net.slice1.0.weight"), "{err}");
}

fn train(out: &Path, epochs: &str, extra: &[&str]) -> std::process::Output {
    train_tiny_resnet("16", out, epochs, extra)
}

#[test]
fn training_with_lpips_resumes_bitwise_and_eval_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = random_lpips(dir.path());
    let term = ["--perceptual-weight", "0.5", "--lpips-weights", file.to_str().unwrap()];
    let (straight, split, plain) =
        (dir.path().join("straight"), dir.path().join("split"), dir.path().join("plain"));
    ok(train(&straight, "2", &term));
    ok(train(&split, "1", &term));
    // The resumed run finds the weights through the checkpoint's config.
    ok(vae(&["train", "--resume", split.to_str().unwrap(), "--epochs", "2", "--quiet", "--threads", "1"]));
    let (a, b) = (
        Checkpoint::load(&straight.join("last.safetensors")).unwrap(),
        Checkpoint::load(&split.join("last.safetensors")).unwrap(),
    );
    for (name, t) in &a.tensors {
        assert!(t.equal(&b.tensors[name]), "{name} differs after resuming");
    }
    // The weights file may move; other weights change the loss: said, and kept in the history.
    let resume = |epochs: &str, weights: &Path| {
        let (run, weights) = (split.to_str().unwrap(), weights.to_str().unwrap());
        ok(vae(&["train", "--resume", run, "--epochs", epochs, "--threads", "1", "--lpips-weights", weights]))
    };
    let moved = dir.path().join("moved.safetensors");
    std::fs::copy(&file, &moved).unwrap();
    let out = resume("3", &moved);
    assert!(!stderr(&out).contains("--lpips-weights"), "{}", stderr(&out));
    let other = dir.path().join("other.safetensors");
    python_script("lpips_weights.py", &[other.to_str().unwrap(), "--random-trunk", "--seed", "1"]);
    let out = resume("4", &other);
    assert!(stderr(&out).contains("--lpips-weights (contents) crc32 "), "{}", stderr(&out));
    let meta = Checkpoint::load(&split.join("last.safetensors")).unwrap().meta;
    let crc = Lpips::load(&other, Device::Cpu).unwrap().checksum;
    assert_eq!(meta.lpips_crc32, Some(crc), "the checkpoint keeps the file it now uses");
    let info = stdout(&ok(vae(&["info", split.to_str().unwrap()])));
    assert!(info.contains(&format!("LPIPS weights crc32 {crc:08x}")), "{info}");
    let history = meta.history;
    let said = |r: &Resume| r.changes.iter().any(|c| c.flag == "--lpips-weights (contents)");
    assert_eq!(history.iter().map(said).collect::<Vec<_>>(), [false, false, true], "{history:?}");
    // The term is in what is minimised: the same run without it trains other weights.
    ok(train(&plain, "2", &[]));
    let c = Checkpoint::load(&plain.join("last.safetensors")).unwrap();
    let name = "decoder.conv_out.weight";
    assert!(!a.tensors[name].equal(&c.tensors[name]), "the perceptual term changed nothing");

    let out = stdout(&ok(vae(&["eval", straight.to_str().unwrap(), "--iw-samples", "0", "--json"])));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let lpips = report["quality"]["lpips"].as_f64().expect("LPIPS in the report");
    assert!(lpips > 0.0, "{out}");
    // Training measured the same LPIPS of the test split after its last epoch.
    let rows = vae::metrics::MetricsLog::new(&straight.join("metrics.csv")).read().unwrap();
    let logged = rows[1].iter().find(|(c, _)| c == "test_lpips").expect("test_lpips in metrics.csv").1;
    assert!((logged - lpips).abs() < 2e-4, "metrics.csv {logged}, eval {lpips}");
    // The loss has the term; the reconstruction reported beside it is the pixel loss alone.
    let [loss, reconstruction, kl] =
        ["negative_elbo", "reconstruction", "kl"].map(|k| report[k].as_f64().unwrap());
    let perceptual = loss - reconstruction - 1e-6 * kl;
    assert!(perceptual > 0.1 * 0.5 * 768.0 * lpips, "{out}");
    // Without the term, eval reports LPIPS only when given the weights.
    let out = stdout(&ok(vae(&["eval", plain.to_str().unwrap(), "--iw-samples", "0", "--json"])));
    assert!(out.contains("\"lpips\":null"), "{out}");
    let out = stdout(&ok(vae(&[
        "eval",
        plain.to_str().unwrap(),
        "--iw-samples",
        "0",
        "--lpips-weights",
        file.to_str().unwrap(),
    ])));
    assert!(out.contains("LPIPS 0."), "{out}");

    // --best-by lpips measures it without the term, and best.safetensors holds the lowest.
    let picked = dir.path().join("picked");
    ok(train(
        &picked,
        "2",
        &["--best-by", "lpips", "--lpips-weights", file.to_str().unwrap(), "--eval-every-steps", "1"],
    ));
    let rows = vae::metrics::MetricsLog::new(&picked.join("metrics.csv")).read().unwrap();
    let lpips: Vec<f64> =
        rows.iter().map(|r| r.iter().find(|(c, _)| c == "test_lpips").expect("test_lpips").1).collect();
    let lowest = lpips.iter().copied().fold(f64::MAX, f64::min);
    let best = Checkpoint::load(&picked.join("best.safetensors")).unwrap().meta;
    assert_eq!(lpips.len(), 6);
    assert_eq!(lpips[best.step as usize - 1], lowest, "best at step {}: {lpips:?}", best.step);
    assert!((best.best.unwrap() - lowest).abs() < 1e-4, "{:?} {lpips:?}", best.best);
    // eval measures it too, with the run's weights.
    let out = stdout(&ok(vae(&["eval", picked.to_str().unwrap(), "--iw-samples", "0", "--json"])));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(report["quality"]["lpips"].as_f64().is_some(), "{out}");
}

#[test]
fn a_perceptual_term_it_cannot_compute_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(&dir.path().join("a"), "1", &["--perceptual-weight", "1"]);
    assert!(!out.status.success() && stderr(&out).contains("needs --lpips-weights FILE"), "{}", stderr(&out));
    let missing = dir.path().join("missing.safetensors");
    let out = train(
        &dir.path().join("b"),
        "1",
        &["--perceptual-weight", "1", "--lpips-weights", missing.to_str().unwrap()],
    );
    assert!(!out.status.success() && stderr(&out).contains("missing.safetensors"), "{}", stderr(&out));
    // The classic model's Bernoulli likelihood has no pixel loss to add it to.
    let mut args =
        vec!["train", "--epochs", "1", "--perceptual-weight", "1", "--lpips-weights", "x.safetensors"];
    args.extend_from_slice(TINY_MODEL);
    let out = vae(&args);
    assert!(!out.status.success() && stderr(&out).contains("--recon l1 or l2"), "{}", stderr(&out));
    for (_, run) in [("a", "a"), ("b", "b")] {
        assert!(!dir.path().join(run).join("last.safetensors").exists(), "a refused run left a checkpoint");
    }
}
