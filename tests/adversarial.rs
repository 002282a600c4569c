//! The adversarial term (`--disc-weight`): ten steps of the whole recipe (L1 + LPIPS with a
//! learned log-variance, KL, PatchGAN with the adaptive weight) equal latent diffusion's
//! equations run by PyTorch on diffusers' AutoencoderKL, across the discriminator's start;
//! a run with it resumes bitwise across the start, logs the GAN's numbers and exports the
//! autoencoder alone; what it cannot do is refused before anything is written.

mod common;

use common::{ok, random_lpips, stderr, train_tiny_resnet, vae, TINY_RESNET};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use tch::{Device, Kind, Tensor};
use vae::adam::AdamConfig;
use vae::checkpoint::Checkpoint;
use vae::config::TrainConfig;
use vae::dist::Backend;
use vae::models::{Likelihood, ModelConfig, ResnetConfig};
use vae::train::Trainer;

const STEPS: i64 = 10;
const DISC_START: u64 = 4;

/// The reference (scripts/gan_reference.py) as a process answering one step at a time.
struct Reference {
    child: std::process::Child,
    answers: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Reference {
    fn start(args: &[&str]) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new(root.join(".venv/bin/python"))
            .arg(root.join("scripts/gan_reference.py"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let answers = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, answers }
    }

    /// Its numbers for `step` from the state in `state`, and for the next step after its update.
    fn ask(&mut self, state: &Path, step: i64) -> serde_json::Value {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{} {step}", state.display()).unwrap();
        let line = self.answers.next().expect("the reference answers (see its stderr)").unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

/// Every tensor a step depends on, under its checkpoint name.
fn state(trainer: &Trainer) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = trainer.vs.variables().into_iter().collect();
    named.extend(trainer.adam.state());
    named.extend(trainer.adversary.as_ref().unwrap().state());
    named
}

#[test]
fn ten_steps_across_the_start_equal_latent_diffusions_equations() {
    let dir = tempfile::tempdir().unwrap();
    let resnet = ResnetConfig {
        image_size: 32,
        block_channels: vec![8, 16],
        layers_per_block: 1,
        latent_channels: 2,
        norm_groups: 4,
        likelihood: Likelihood::L1,
        ..ResnetConfig::default()
    };
    let cfg = TrainConfig {
        model: ModelConfig::Resnet(resnet.clone()),
        batch_size: 4,
        beta: 1e-3,
        adam: AdamConfig { lr: 1e-4, beta1: 0.5, beta2: 0.9, ..AdamConfig::default() },
        perceptual_weight: 0.5,
        lpips_weights: Some(random_lpips(dir.path())),
        disc_weight: 0.5,
        disc_start: DISC_START,
        disc_adam: AdamConfig { lr: 2e-4, beta1: 0.5, beta2: 0.9, ..AdamConfig::default() },
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, Device::Cpu).unwrap();
    // The architecture for diffusers; the weights come with each state.
    let ae = dir.path().join("ae");
    let weights: Vec<(String, Tensor)> = trainer.vs.variables().into_iter().collect();
    vae::pretrained::write_folder(&ae, &resnet, &weights, &vae::checkpoint::LatentScale::factor(1.0))
        .unwrap();
    tch::manual_seed(3);
    let x = Tensor::rand([STEPS, 4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let eps = Tensor::randn([STEPS, 4, 2, 16, 16], (Kind::Float, Device::Cpu));
    let io = dir.path().join("io.safetensors");
    Tensor::write_safetensors(&[("x", &x), ("eps", &eps)], &io).unwrap();
    let files =
        [&ae, trainer.cfg.lpips_weights.as_ref().unwrap(), &io].map(|p| p.to_str().unwrap().to_string());
    let start = DISC_START.to_string();
    let mut args: Vec<&str> = files.iter().map(String::as_str).collect();
    args.extend(["--lr", "1e-4", "--disc-lr", "2e-4", "--kl-weight", "1e-3", "--perceptual-weight", "0.5"]);
    args.extend(["--disc-weight", "0.5", "--disc-start", &start]);
    let mut reference = Reference::start(&args);

    // Each step starts both from our state: a GAN's trajectories part at float rounding (the
    // adaptive weight's gradient norms go through LeakyReLU masks and L1's signs, and Adam
    // turns rounding-sized gradients into full steps). The reference's own update of both
    // networks is checked by its losses on the next batch.
    let path = dir.path().join("state.safetensors");
    let mut expected_next: Option<serde_json::Value> = None;
    for step in 0..STEPS {
        Tensor::write_safetensors(&state(&trainer), &path).unwrap();
        let theirs = reference.ask(&path, step);
        let means = trainer.update(&x.get(step), &eps.get(step).flatten(1, -1), 4, 4, None).unwrap();
        let ours = Vec::<f64>::try_from(means.expect("finite").to_kind(Kind::Double)).unwrap();
        // [loss, reconstruction, kl, lpips, g_loss, d_weight, d_loss, logits_real, logits_fake, logvar]
        for (name, index) in [("loss", 0), ("d_weight", 5), ("d_loss", 6)] {
            // The adaptive weight, a ratio of gradient norms, is too sensitive to compare after
            // two updates done in different rounding: the losses check the updates.
            let next = expected_next.as_ref().filter(|_| name != "d_weight");
            for (what, value) in [("from the same state", Some(&theirs)), ("after its update", next)] {
                let Some(b) = value.map(|v| v[name].as_f64().unwrap()) else { continue };
                let a = ours[index];
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs(),
                    "step {step}: {name} ours {a}, latent diffusion's {what} {b}"
                );
            }
            if step >= DISC_START as i64 {
                assert!(
                    ours[index] > 0.0,
                    "step {step}: {name} is {}: the adversarial term did not start",
                    ours[index]
                );
            } else if index > 0 {
                assert_eq!(ours[index], 0.0, "step {step}: {name} before the start");
            }
        }
        expected_next = theirs.get("next").cloned();
    }
    let adversary = trainer.adversary.as_ref().unwrap();
    assert_eq!(adversary.adam.step_count(), STEPS as u64, "the discriminator's Adam counts every step");
    assert!(adversary.logvar.double_value(&[]) != 0.0, "the log-variance did not learn");
}

fn train(out: &Path, epochs: &str, extra: &[&str]) -> std::process::Output {
    train_tiny_resnet("32", out, epochs, extra)
}

#[test]
fn a_gan_run_resumes_bitwise_across_the_start_logs_and_exports_the_autoencoder() {
    let dir = tempfile::tempdir().unwrap();
    let lpips = random_lpips(dir.path());
    // 3 steps an epoch: the discriminator starts in the second, after the resume.
    let gan = [
        "--perceptual-weight",
        "0.0",
        "--lpips-weights",
        lpips.to_str().unwrap(),
        "--disc-weight",
        "0.5",
        "--disc-start",
        "4",
        "--betas",
        "0.5,0.9",
    ];
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    ok(train(&straight, "2", &gan));
    // The split run's first half checkpoints its gradients (memory, not numbers): the run stays
    // bitwise the straight one; the choice is kept on resume unless the flag says otherwise.
    ok(train(&split, "1", &[&gan[..], &["--gradient-checkpointing"]].concat()));
    let half = Checkpoint::load(&split.join("last.safetensors")).unwrap();
    assert!(half.meta.config.gradient_checkpointing);
    let resume = ["train", "--resume", split.to_str().unwrap(), "--epochs", "2", "--quiet", "--threads", "1"];
    ok(vae(&[&resume[..], &["--gradient-checkpointing", "false"]].concat()));
    let (a, b) = (
        Checkpoint::load(&straight.join("last.safetensors")).unwrap(),
        Checkpoint::load(&split.join("last.safetensors")).unwrap(),
    );
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        assert!(t.equal(&b.tensors[name]), "{name} differs after resuming");
    }
    assert!(!b.meta.config.gradient_checkpointing, "--gradient-checkpointing false was not taken");
    for name in [
        "discriminator.main.0.weight",
        "discriminator.main.3.running_mean",
        "optimizer_disc.exp_avg.discriminator.main.11.bias",
        "optimizer.exp_avg.loss.logvar",
    ] {
        assert!(a.tensors.contains_key(name), "{name} not in the checkpoint");
    }
    assert_eq!(a.tensors["optimizer_disc.step"].int64_value(&[]), 6);
    assert!(a.tensors["loss.logvar"].double_value(&[]) != 0.0);
    // Before its start the discriminator does not train (its Adam only counts); from it, it does.
    let fresh = dir.path().join("fresh");
    ok(train(&fresh, "1", &gan));
    let before = Checkpoint::load(&fresh.join("last.safetensors")).unwrap();
    let moment = "optimizer_disc.exp_avg.discriminator.main.0.weight";
    assert_eq!(before.tensors[moment].abs().max().double_value(&[]), 0.0);
    assert_eq!(before.tensors["optimizer_disc.step"].int64_value(&[]), 3);
    let name = "discriminator.main.0.weight";
    assert!(!before.tensors[name].equal(&a.tensors[name]), "the discriminator never trained");

    // metrics.csv: the GAN's numbers beside the bound's.
    let metrics = std::fs::read_to_string(straight.join("metrics.csv")).unwrap();
    let header: Vec<&str> = metrics.lines().next().unwrap().split(',').collect();
    for column in [
        "train_lpips",
        "train_g_loss",
        "train_d_weight",
        "train_d_loss",
        "train_logits_real",
        "train_logvar",
        "test_psnr",
    ] {
        assert!(header.contains(&column), "{column} not in {header:?}");
    }
    let last: Vec<f64> = metrics.lines().last().unwrap().split(',').map(|v| v.parse().unwrap()).collect();
    let d_loss = last[header.iter().position(|h| *h == "train_d_loss").unwrap()];
    assert!(d_loss > 0.0, "{metrics}");

    // The export is the autoencoder alone.
    let exported = dir.path().join("exported");
    ok(vae(&["export-diffusers", straight.to_str().unwrap(), exported.to_str().unwrap()]));
    let names: Vec<String> = Tensor::read_safetensors(exported.join("diffusion_pytorch_model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.iter().any(|n| n == "decoder.conv_out.weight"));
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("encoder.") || n.starts_with("decoder.") || n.contains("quant_conv")),
        "{names:?}"
    );
}

#[test]
fn what_the_discriminator_cannot_use_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |run: &str, extra: &[&str], expected: &str| {
        let side = if run == "small" { "16" } else { "32" };
        let out = train_tiny_resnet(side, &dir.path().join(run), "1", extra);
        assert!(!out.status.success() && stderr(&out).contains(expected), "{run}: {}", stderr(&out));
        assert!(!dir.path().join(run).exists(), "{run}: a refused run left a folder");
    };
    refused("small", &["--disc-weight", "0.5"], "needs images of side 24 or more, found 16");
    refused("density", &["--disc-weight", "0.5", "--recon", "gaussian"], "--recon l1");
    refused("betas", &["--disc-weight", "0.5", "--disc-betas", "0.5"], "--disc-betas takes two numbers");
    refused("lr", &["--disc-weight", "0.5", "--disc-lr", "0"], "--disc-lr must be positive");
    // A run without a discriminator does not grow one on resume.
    let plain = dir.path().join("plain");
    ok(train(&plain, "1", &[]));
    let out = vae(&["train", "--resume", plain.to_str().unwrap(), "--epochs", "2", "--disc-weight", "0.5"]);
    assert!(
        !out.status.success()
            && stderr(&out).contains("cannot turn one on")
            && stderr(&out).contains("--init-from"),
        "{}",
        stderr(&out)
    );
    let resumed = Checkpoint::load(&plain.join("last.safetensors")).unwrap();
    assert_eq!(resumed.meta.epoch, 1, "the refused resume changed the checkpoint");
}

/// With the discriminator, each rank's rows are a batch of their own (BatchNorm statistics,
/// adaptive weight), as in latent diffusion's Lightning DDP: 2 ranks train bit for bit as one
/// process with the batch in the same two halves (`--grad-accum 2`), a rank with no rows in
/// the last batch included, and resume bitwise. Only the BatchNorm running statistics differ
/// (rank 0's against both halves'); training never reads them.
#[test]
fn two_ranks_train_the_discriminator_as_two_micro_batches_and_resume_exactly() {
    if !Backend::Gloo.built() {
        return; // tests/dist.rs checks the refusal
    }
    let dir = tempfile::tempdir().unwrap();
    let lpips = random_lpips(dir.path());
    // 49 images in batches of 16: 3 steps and a last one of 1 image (rank 0 has none of it).
    let train = |out: &Path, epochs: &str, extra: &[&str]| {
        let mut args = vec!["train", "--epochs", epochs, "--out", out.to_str().unwrap()];
        args.extend_from_slice(TINY_RESNET);
        args.extend_from_slice(&["--dataset", "shapes", "--channels", "3", "--image-size", "32"]);
        args.extend_from_slice(&["--train-size", "49", "--test-size", "8", "--batch-size", "16"]);
        args.extend_from_slice(&["--perceptual-weight", "0.5", "--lpips-weights", lpips.to_str().unwrap()]);
        args.extend_from_slice(&["--disc-weight", "0.5", "--disc-start", "2", "--threads", "1", "--quiet"]);
        args.extend_from_slice(&["--no-tensorboard"]);
        args.extend_from_slice(extra);
        ok(vae(&args));
        Checkpoint::load(&out.join("last.safetensors")).unwrap()
    };
    let halves = train(&dir.path().join("halves"), "2", &["--grad-accum", "2"]);
    let two = train(&dir.path().join("two"), "2", &["--nproc", "2"]);
    assert_eq!(halves.tensors.len(), two.tensors.len());
    for (name, t) in &halves.tensors {
        if !name.contains(".running_") {
            assert!(t.equal(&two.tensors[name]), "{name}: 2 ranks differ from 2 micro-batches");
        }
    }
    assert_eq!(two.tensors["optimizer_disc.step"].int64_value(&[]), 8);
    let moment = "optimizer_disc.exp_avg.discriminator.main.0.weight";
    assert!(two.tensors[moment].abs().max().double_value(&[]) > 0.0, "the discriminator never trained");

    let split = dir.path().join("split");
    train(&split, "1", &["--nproc", "2"]);
    let resume = ["train", "--resume", split.to_str().unwrap(), "--epochs", "2", "--nproc", "2", "--quiet"];
    ok(vae(&[&resume[..], &["--threads", "1"]].concat()));
    let resumed = Checkpoint::load(&split.join("last.safetensors")).unwrap();
    for (name, t) in &two.tensors {
        assert!(t.equal(&resumed.tensors[name]), "{name} differs after resuming");
    }
    // One process in two micro-batches continues the 2-rank run's steps; in one part it does
    // not, and says so.
    let more = |epochs: &str, accum: &str| {
        let args = ["train", "--resume", split.to_str().unwrap(), "--epochs", epochs, "--grad-accum", accum];
        stderr(&ok(vae(&[&args[..], &["--threads", "1"]].concat())))
    };
    let warning = "the discriminator now sees each batch as";
    let same = more("3", "2");
    assert!(same.contains("resuming a run of 2 rank(s) on 1") && !same.contains(warning), "{same}");
    let other = more("4", "1");
    assert!(other.contains(&format!("{warning} 1 part(s) (ranks x --grad-accum), not 2")), "{other}");
}
