//! The parsers of untrusted files take arbitrary bytes without panicking: valid files mutated
//! (bytes flipped, length fields overwritten, cut, extended) and pure noise. A panic fails the
//! test; errors are the expected outcome. `VAE_FUZZ_CASES` sets the cases per target
//! (scripts/fuzz runs many more).

use std::path::Path;
use tch::{nn::VarStore, Device};
use vae::adam::{Adam, AdamConfig};
use vae::checkpoint::{self, Checkpoint, LatentScale, Metadata, Origin};
use vae::config::TrainConfig;
use vae::data::{cifar, idx, image_file, Fingerprint};
use vae::loss::Stats;
use vae::models::{ConvConfig, ConvVae, ModelConfig};
use vae::rng::SplitMix64;
use vae::train::PendingEvaluation;

fn cases() -> u64 {
    std::env::var("VAE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

/// One mutation of `seed`, or noise.
fn mutate(rng: &mut SplitMix64, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    match rng.below(6) {
        0 => (0..rng.below(512)).map(|_| rng.next_u64() as u8).collect(),
        1 => {
            bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize);
            bytes
        }
        2 => {
            bytes.extend((0..rng.below(256)).map(|_| rng.next_u64() as u8));
            bytes
        }
        3 if bytes.len() >= 4 => {
            // A length or dimension field: overwrite an aligned word, often near the header.
            let words = (bytes.len() / 4).min(if rng.below(2) == 0 { 16 } else { usize::MAX });
            let at = 4 * rng.below(words as u64) as usize;
            let value = [0u32, 1, u32::MAX, 0x7fff_ffff, rng.next_u64() as u32][rng.below(5) as usize];
            bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
            bytes
        }
        _ => {
            for _ in 0..1 + rng.below(8) {
                if !bytes.is_empty() {
                    let at = rng.below(bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
            bytes
        }
    }
}

fn fuzz(name: &str, seeds: &[Vec<u8>], mut parse: impl FnMut(&[u8])) {
    let mut rng = SplitMix64::new(0xF022 ^ name.len() as u64);
    for i in 0..cases() {
        let seed = &seeds[i as usize % seeds.len()];
        parse(&mutate(&mut rng, seed));
    }
    eprintln!("{name}: {} cases without a panic", cases());
}

#[test]
fn idx_parsers_take_any_bytes() {
    let images = idx::encode_images(3, 4, 5, &[9; 60]);
    let labels = idx::encode_labels(&[1, 2, 3]);
    let path = Path::new("fuzz.idx");
    fuzz("idx", &[images, labels], |bytes| {
        let _ = idx::parse_images(path, bytes);
        let _ = idx::parse_labels(path, bytes);
    });
}

#[test]
fn the_cifar_reader_takes_any_bytes() {
    let seed = cifar::encode(&[[5; 3072], [6; 3072]], &[1, 9]);
    fuzz("cifar", &[seed], |bytes| {
        let _ = cifar::append_records(Path::new("fuzz.bin"), bytes, &mut Vec::new(), &mut Vec::new());
    });
}

#[test]
fn the_checkpoint_loader_takes_any_bytes() {
    let model =
        ConvConfig { image_size: 4, channels: vec![2], hidden: 3, latent_dim: 2, ..ConvConfig::default() };
    let cfg = TrainConfig { model: ModelConfig::Conv(model.clone()), ..TrainConfig::default() };
    let vs = VarStore::new(Device::Cpu);
    let _vae = ConvVae::new(vs.root(), &model);
    let adam = Adam::new(&vs, AdamConfig::default());
    let meta = Metadata {
        config: cfg,
        epoch: 1,
        step: 3,
        best: Some(1.5),
        evaluations_since_best: 0,
        loss_scale: None,
        run_id: "fuzz".into(),
        history: Vec::new(),
        world_size: 1,
        lpips_crc32: Some(0x1234abcd),
        fid_crc32: None,
        // Fuzzed too: its JSON is parsed.
        init_from: Some(Origin {
            path: "sd-vae/diffusion_pytorch_model.safetensors".into(),
            crc32: 9,
            latent_scale: Some(LatentScale::factor(0.18215)),
        }),
        data: Some(Fingerprint { train: 96, test: 32, shape: [1, 4, 4], crc32: 5 }),
        // And its list of numbers.
        pending_evaluation: Some(PendingEvaluation {
            train: Some(Stats { loss: 2.5, reconstruction: 2.0, kl: 0.5, sharpness: None }),
            images: 96,
            seconds: 0.25,
        }),
    };
    let seed = checkpoint::to_bytes(&vs, &adam, None, None, &meta).unwrap();
    let path = Path::new("fuzz.safetensors");
    assert!(Checkpoint::from_bytes(path, &seed).is_ok(), "the seed itself loads");
    // A config promising more parameters than the file holds is refused before any model
    // is built from it (which would try to allocate them).
    let mut huge = meta.clone();
    let ModelConfig::Conv(conv) = &mut huge.config.model else { panic!("the seed is a conv model") };
    conv.hidden = 1 << 40;
    let refused = Checkpoint::from_bytes(path, &checkpoint::to_bytes(&vs, &adam, None, None, &huge).unwrap());
    let err = format!("{:#}", refused.err().expect("a config of 2^40 hidden units is refused"));
    assert!(err.contains("parameters, more than its"), "{err}");
    fuzz("checkpoint", &[seed], |bytes| {
        if let Ok(ckpt) = Checkpoint::from_bytes(path, bytes) {
            // A file that loads must also build its model or fail cleanly.
            let _ = ckpt.model(Device::Cpu, true);
        }
    });
}

#[test]
fn the_image_decoder_takes_any_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut seeds = Vec::new();
    for (i, name) in ["a.png", "b.jpg", "c.bmp"].iter().enumerate() {
        let path = dir.path().join(name);
        image::RgbImage::from_fn(12, 9, |x, y| image::Rgb([x as u8 * 20, y as u8 * 25, i as u8 * 80]))
            .save(&path)
            .unwrap();
        seeds.push(std::fs::read(&path).unwrap());
    }
    let file = dir.path().join("fuzz.img");
    // Files cost a write each: a quarter of the cases of the in-memory targets.
    let mut rng = SplitMix64::new(7);
    for i in 0..cases() / 4 {
        std::fs::write(&file, mutate(&mut rng, &seeds[i as usize % seeds.len()])).unwrap();
        let _ = image_file::decode(&file, 3, 8);
    }
    eprintln!("image files: {} cases without a panic", cases() / 4);
}

#[test]
fn the_latents_reader_takes_any_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mean = tch::Tensor::randn([3, 2, 4, 4], tch::kind::FLOAT_CPU);
    let half = mean.to_kind(tch::Kind::BFloat16);
    let seeds: Vec<Vec<u8>> = [("mean", &mean), ("latents", &half)]
        .iter()
        .map(|(name, t)| {
            let path = dir.path().join(format!("{name}.safetensors"));
            tch::Tensor::write_safetensors(&[(*name, *t)], &path).unwrap();
            std::fs::read(&path).unwrap()
        })
        .collect();
    let file = dir.path().join("fuzz.safetensors");
    // Files cost a write each: a quarter of the cases of the in-memory targets.
    let mut rng = SplitMix64::new(11);
    for i in 0..cases() / 4 {
        std::fs::write(&file, mutate(&mut rng, &seeds[i as usize % seeds.len()])).unwrap();
        let _ = vae::export::is_latents(&mut std::fs::File::open(&file).unwrap());
        if let Ok(latents) = vae::export::Latents::open(&file, None) {
            let _ = latents.rows(0, latents.count());
            let _ = latents.rows(latents.count() - 1, 1);
        }
    }
    eprintln!("latents files: {} cases without a panic", cases() / 4);
}
