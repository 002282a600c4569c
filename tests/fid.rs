//! rFID (`vae eval --fid-weights`): our FID Inception computes pytorch-fid's pool features
//! (random weights and BatchNorm statistics: no download) and our Fréchet distance equals
//! pytorch-fid's; `vae eval` reports it for a run.

mod common;

use common::{ok, python_script, stderr, stdout, train_tiny_resnet, vae};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};
use vae::fid::{frechet_distance, Inception, Moments};

#[test]
fn our_fid_equals_pytorch_fid_and_eval_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(3);
    // Images of any size are resized to 299 x 299, as pytorch-fid resizes them.
    let x = Tensor::rand([3, 3, 40, 56], (Kind::Float, Device::Cpu));
    // Two feature sets of different means and covariances.
    let a = Tensor::randn([200, 8], (Kind::Double, Device::Cpu));
    let mix = Tensor::randn([8, 8], (Kind::Double, Device::Cpu)) * 0.5;
    let b = a.matmul(&mix) + Tensor::linspace(-1.0, 1.0, 8, (Kind::Double, Device::Cpu));
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("x", &x), ("a", &a), ("b", &b)], &inputs).unwrap();
    let (weights, reference) = (dir.path().join("fid.safetensors"), dir.path().join("reference.safetensors"));
    python_script(
        "fid_weights.py",
        &[
            weights.to_str().unwrap(),
            "--random",
            "--reference",
            inputs.to_str().unwrap(),
            "--reference-out",
            reference.to_str().unwrap(),
        ],
    );
    let theirs: HashMap<String, Tensor> = Tensor::read_safetensors(&reference).unwrap().into_iter().collect();

    let net = Inception::load(&weights, Device::Cpu).unwrap();
    let ours = net.features(&x);
    let theirs_features = &theirs["features"];
    // Measured against how far two images' features are apart, not against their common part.
    let spread = (theirs_features.get(0) - theirs_features.get(1)).abs().max().double_value(&[]);
    let scale = theirs_features.abs().max().double_value(&[]);
    assert!(spread > 1e-2 * scale, "the features hardly depend on the image: {spread} of {scale}");
    let worst = (&ours - theirs_features).abs().max().double_value(&[]);
    assert!(worst < 1e-4 * spread, "features differ from pytorch-fid's by {worst} ({spread} between images)");
    // A grey image is read as its three equal channels.
    let grey = x.narrow(1, 0, 1);
    assert!(net.features(&grey).equal(&net.features(&grey.repeat([1, 3, 1, 1]))));

    let (mut ma, mut mb) = (Moments::new(8, Device::Cpu), Moments::new(8, Device::Cpu));
    ma.add(&a.narrow(0, 0, 120));
    ma.add(&a.narrow(0, 120, 80));
    mb.add(&b);
    let (distance, expected) = (frechet_distance(&ma, &mb), theirs["frechet"].double_value(&[0]));
    assert!(
        (distance - expected).abs() < 1e-8 * expected,
        "Fréchet distance {distance}, pytorch-fid's {expected}"
    );

    // Through the command line, on a small run's test split: measured at each of its
    // evaluations (after steps 2 and 3), best.safetensors at the lower, and the last one what
    // `vae eval` measures.
    let folder = dir.path().join("run");
    let (run, weights) = (folder.to_str().unwrap(), weights.to_str().unwrap());
    ok(train_tiny_resnet(
        "16",
        &folder,
        "1",
        &["--fid-weights", weights, "--best-by", "rfid", "--eval-every-steps", "2"],
    ));
    let rows = vae::metrics::MetricsLog::new(&folder.join("metrics.csv")).read().unwrap();
    let get = |r: &Vec<(String, f64)>, name: &str| r.iter().find(|(c, _)| c == name).expect(name).1;
    let logged: Vec<(f64, f64)> = rows.iter().map(|r| (get(r, "step"), get(r, "test_rfid"))).collect();
    assert_eq!(logged.iter().map(|r| r.0).collect::<Vec<_>>(), [2.0, 3.0], "{rows:?}");
    let best = vae::checkpoint::Checkpoint::load(&folder.join("best.safetensors")).unwrap().meta;
    let lowest = logged.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(best.step as f64, lowest.0, "{logged:?}");
    let eval = |extra: &[&str]| {
        stdout(&ok(vae(&[&["eval", run, "--iw-samples", "0", "--fid-weights", weights][..], extra].concat())))
    };
    let report: serde_json::Value = serde_json::from_str(eval(&["--json"]).trim()).unwrap();
    let rfid = report["rfid"].as_f64().expect("rfid in the report");
    assert!(rfid.is_finite() && rfid > 0.0, "{report}");
    let last = logged[1].1;
    assert!((rfid - last).abs() < 1e-3 * rfid, "eval {rfid}, training's last evaluation {last}");
    // Without the flag, eval measures it with the run's own weights.
    let own = stdout(&ok(vae(&["eval", run, "--iw-samples", "0", "--json"])));
    let own: serde_json::Value = serde_json::from_str(own.trim()).unwrap();
    let own = own["rfid"].as_f64().expect("rfid in the report");
    assert!((own - rfid).abs() <= 1e-6 * rfid, "{own} with the run's weights, {rfid} with the same named");
    // Other Inception weights on resume: kept in the history, and the best is measured anew,
    // which is said (the training is untouched: no word of that).
    let other = dir.path().join("other.safetensors");
    python_script("fid_weights.py", &[other.to_str().unwrap(), "--random", "--seed", "1"]);
    let out = ok(vae(&["train", "--resume", run, "--epochs", "2", "--fid-weights", other.to_str().unwrap()]));
    let err = stderr(&out);
    assert!(err.contains("best.safetensors: the test rFID is now measured with other weights"), "{err}");
    assert!(!err.contains("no longer bitwise"), "{err}");
    let meta = vae::checkpoint::Checkpoint::load(&folder.join("last.safetensors")).unwrap().meta;
    let crc = Inception::load(&other, Device::Cpu).unwrap().checksum;
    assert_eq!(meta.fid_crc32, Some(crc));
    let changed = meta.history.last().expect("a resume in the history").changes.clone();
    assert!(changed.iter().any(|c| c.flag == "--fid-weights (contents)"), "{changed:?}");
    let info = stdout(&ok(vae(&["info", run])));
    assert!(info.contains(&format!("FID Inception weights crc32 {crc:08x}")), "{info}");
    let text = eval(&[]);
    assert!(text.lines().any(|l| l.starts_with("rFID") && l.contains("between the 16 images")), "{text}");
}
