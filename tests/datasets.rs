//! CIFAR-10 files and image folders, generated here: training through the binary, the
//! folder's stable split and cache, and each bad input's message.

mod common;
#[path = "common/disk.rs"]
mod disk;

use common::{ok, stderr, stdout, vae, TINY_MODEL};
use disk::SmallDisk;
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use tch::Tensor;
use vae::checkpoint::Checkpoint;
use vae::data::cifar;
use vae::data::folder::{self, FolderOptions};

fn train(data: &Path, run: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--epochs", "1", "--batch-size", "16", "--data-dir", data.to_str().unwrap()];
    args.extend_from_slice(&["--out", run.to_str().unwrap()]);
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(extra);
    vae(&args)
}

/// A deterministic, distinct colour pattern per index.
fn pattern(i: u32, w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(i * 37 % 256) as u8, (x * 255 / w.max(1)) as u8, ((y + i) * 255 / h.max(1) % 256) as u8])
    })
}

fn write_cifar(dir: &Path, per_file: usize) {
    let record = |i: usize| -> [u8; 3072] { std::array::from_fn(|p| ((p * 7 + i * 13) % 251) as u8) };
    for (f, name) in cifar::TRAIN_FILES.iter().chain([&cifar::TEST_FILE]).enumerate() {
        let images: Vec<[u8; 3072]> = (0..per_file).map(|i| record(f * per_file + i)).collect();
        let labels: Vec<u8> = (0..per_file).map(|i| (i % 10) as u8).collect();
        std::fs::write(dir.join(name), cifar::encode(&images, &labels)).unwrap();
    }
}

#[test]
fn cifar10_trains_and_a_file_of_the_wrong_size_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&data).unwrap();
    write_cifar(&data, 20);
    // The archive's own folder is found below the one given.
    let out = ok(train(dir.path(), &dir.path().join("run"), &["--dataset", "cifar10", "--hflip"]));
    assert!(
        stdout(&out).contains("training on 100 images of 3x32x32 (cifar10), 20 test images"),
        "{}",
        stdout(&out)
    );

    std::fs::write(data.join("data_batch_3.bin"), vec![0u8; 3073 * 2 + 100]).unwrap();
    let out = train(dir.path(), &dir.path().join("run2"), &["--dataset", "cifar10"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains("data_batch_3.bin: 6246 bytes is not a whole number of 3073-byte CIFAR-10 records"),
        "{}",
        stderr(&out)
    );
    let out = train(dir.path(), &dir.path().join("run3"), &["--dataset", "cifar10", "--image-size", "64"]);
    assert!(
        stderr(&out).contains("--image-size 64 does not apply to --dataset cifar10: it applies to --dataset shapes, folder only"),
        "{}",
        stderr(&out)
    );
}

/// 60 images of mixed sizes and formats in nested folders, a small one, a corrupt one and a
/// hidden file.
fn write_folder(dir: &Path) {
    for i in 0..60u32 {
        let sub = dir.join(format!("class{}", i % 3)).join(if i % 2 == 0 { "a" } else { "b" });
        std::fs::create_dir_all(&sub).unwrap();
        let img = pattern(i, 20 + i % 17, 24 + i % 11);
        match i % 4 {
            0 => img.save(sub.join(format!("{i}.png"))).unwrap(),
            1 => img.save(sub.join(format!("{i}.jpg"))).unwrap(),
            2 => image::DynamicImage::ImageRgb8(img).to_luma8().save(sub.join(format!("{i}.png"))).unwrap(),
            _ => img.save(sub.join(format!("{i}.bmp"))).unwrap(),
        }
    }
    pattern(99, 10, 12).save(dir.join("tiny.png")).unwrap();
    std::fs::write(dir.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::write(dir.join(".DS_Store"), b"junk").unwrap();
}

#[test]
fn an_image_folder_trains_warns_about_bad_files_and_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    write_folder(&data);
    let cache = dir.path().join("cache");
    let flags = ["--dataset", "folder", "--image-size", "16", "--test-fraction", "0.2", "--hflip"];
    let mut args = flags.to_vec();
    args.extend_from_slice(&["--cache-dir", cache.to_str().unwrap()]);
    let out = ok(train(&data, &dir.path().join("run"), &args));
    let err = stderr(&out);
    assert!(err.contains("skipped 1 files of") && err.contains("broken.png"), "{err}");
    assert!(err.contains("1 images of") && err.contains("smaller than 16 px and were enlarged"), "{err}");
    assert!(stdout(&out).contains("images of 3x16x16 (folder)"), "{}", stdout(&out));
    let cached: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(cached.len(), 1, "one cache file");

    let out = ok(train(&data, &dir.path().join("run2"), &args));
    assert!(stderr(&out).contains("decoded images from the cache"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("broken.png"), "the cache skips decoding: {}", stderr(&out));
    // --quiet (and every rank after the first) leaves the note out.
    let quiet = ok(train(&data, &dir.path().join("run2q"), &[&args[..], &["--quiet"]].concat()));
    assert!(!stderr(&quiet).contains("from the cache"), "{}", stderr(&quiet));
    // Grayscale: another transform, another cache file.
    let mut gray = args.clone();
    gray.extend_from_slice(&["--channels", "1"]);
    let out = ok(train(&data, &dir.path().join("run3"), &gray));
    assert!(stdout(&out).contains("images of 1x16x16 (folder)"), "{}", stdout(&out));
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
    // A new file: decoded again, and the folder's outdated RGB cache replaced, not kept.
    pattern(7, 30, 30).save(data.join("class1/new.png")).unwrap();
    let out = ok(train(&data, &dir.path().join("run4"), &args));
    let err = stderr(&out);
    assert!(!err.contains("from the cache") && err.contains("removed the outdated cache"), "{err}");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2, "the gray cache is kept");
}

/// A resume on other images than the run's (a file added to its folder) goes on, saying so
/// (under --quiet too) and keeping it in the checkpoint's history; the next resume on the same
/// images says nothing. A resume on the same images says nothing either.
#[test]
fn a_resume_on_other_images_says_so_and_keeps_it_in_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    write_folder(&data);
    let run = dir.path().join("run");
    let flags =
        ["--dataset", "folder", "--image-size", "16", "--test-fraction", "0.2", "--no-cache", "--quiet"];
    ok(train(&data, &run, &flags));
    let (run_arg, data_arg) = (run.to_str().unwrap(), data.to_str().unwrap());
    // Each resume's history entry (--epochs changes), and whether it names the data.
    let resume = |epochs: &str| {
        let out =
            ok(vae(&["train", "--resume", run_arg, "--epochs", epochs, "--data-dir", data_arg, "--quiet"]));
        let history = Checkpoint::load(&run.join("last.safetensors")).unwrap().meta.history;
        let last = history.last().expect("the resume is in the history").clone();
        let data = last.changes.iter().find(|c| c.flag == "the data").cloned();
        (stderr(&out), history.len(), data)
    };
    let (said, resumes, named) = resume("2");
    assert!(!said.contains("differ") && named.is_none(), "{said} {named:?}");
    pattern(7, 30, 30).save(data.join("class1/new.png")).unwrap();
    let (said, _, change) = resume("3");
    assert!(said.contains("warning: the folder images differ from those the run trained on ("), "{said}");
    assert!(said.contains("then, ") && said.contains(" now): it goes on with these"), "{said}");
    let change = change.expect("the history names the data");
    assert!(change.was.contains(" test images of 3x16x16") && change.was != change.now, "{change:?}");
    let (said, later, named) = resume("4");
    assert!(!said.contains("differ") && named.is_none() && later == resumes + 2, "{said}");
    // Its figures on other images than those are not the run's either.
    std::fs::remove_file(data.join("class1/new.png")).unwrap();
    let out = ok(vae(&["eval", run_arg, "--data-dir", data_arg, "--iw-samples", "0", "--no-cache"]));
    assert!(stderr(&out).contains("warning: the folder images differ from those"), "{}", stderr(&out));
}

/// A run folder inside the image folder the run reads is refused before anything is made: its
/// pictures became training images, and their rewrites changed the listing at every start.
/// That is also where the default `checkpoints/` goes when the images are the working folder.
/// A cache folder there is refused too (each new cache file a new listing).
#[test]
fn a_run_folder_inside_its_image_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    write_folder(&data);
    let flags = ["--dataset", "folder", "--image-size", "16", "--test-fraction", "0.2", "--no-cache"];
    let inside = data.join("runs").join("a");
    let out = train(&data, &inside, &flags);
    assert!(!out.status.success(), "a run inside its images");
    let said = format!("run folder {} lies inside the image folder {}", inside.display(), data.display());
    assert!(stderr(&out).contains(&said), "{}", stderr(&out));
    let mut args = vec!["train", "--data-dir", ".", "--epochs", "1"];
    args.extend_from_slice(&flags);
    args.extend_from_slice(TINY_MODEL);
    let out = Command::new(env!("CARGO_BIN_EXE_vae")).args(&args).current_dir(&data).output().unwrap();
    assert!(
        stderr(&out).contains("run folder checkpoints lies inside the image folder ."),
        "{}",
        stderr(&out)
    );
    assert!(!data.join("runs").exists() && !data.join("checkpoints").exists());
    // So is a cache folder there; hidden folders there are not listed, so they may hold either.
    let cache = data.join("cache");
    let out = train(
        &data,
        &dir.path().join("cached"),
        &["--dataset", "folder", "--cache-dir", cache.to_str().unwrap()],
    );
    let said = format!("--cache-dir {} lies inside the image folder {}", cache.display(), data.display());
    assert!(stderr(&out).contains(&said), "{}", stderr(&out));
    let hidden = data.join(".runs").join("a");
    ok(train(
        &data,
        &hidden,
        &[&flags[..], &["--cache-dir", data.join(".cache").to_str().unwrap()]].concat(),
    ));
    // Beside the images it trains, and a resume through another name for the folder is refused.
    let beside = dir.path().join("run");
    ok(train(&data, &beside, &flags));
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    let into_link = link.join("run");
    let resumed = vae(&[
        "train",
        "--resume",
        beside.to_str().unwrap(),
        "--epochs",
        "2",
        "--out",
        into_link.to_str().unwrap(),
    ]);
    assert!(stderr(&resumed).contains("lies inside the image folder"), "{}", stderr(&resumed));
}

/// Every tensor (weights and Adam's state) of two checkpoints equal, bit for bit.
fn same_tensors(a: &Path, b: &Path) -> bool {
    let read = |p: &Path| {
        let mut named = Tensor::read_safetensors(p.join("last.safetensors")).unwrap();
        named.sort_by(|x, y| x.0.cmp(&y.0));
        named
    };
    let (a, b) = (read(a), read(b));
    a.len() == b.len() && a.iter().zip(&b).all(|((n, x), (m, y))| n == m && x.equal(y))
}

#[test]
fn a_folder_larger_than_memory_streams_from_the_cache_and_trains_to_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    write_folder(&data);
    let run = |name: &str, cache: &str, fault: &str, extra: &[&str]| {
        let (out, cache) = (dir.path().join(name), dir.path().join(cache));
        let mut args = vec!["train", "--dataset", "folder", "--image-size", "16", "--test-fraction", "0.2"];
        args.extend_from_slice(&["--hflip", "--batch-size", "8", "--data-dir", data.to_str().unwrap()]);
        args.extend_from_slice(&["--cache-dir", cache.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        args.extend_from_slice(TINY_MODEL);
        args.extend_from_slice(extra);
        let mut command = Command::new(env!("CARGO_BIN_EXE_vae"));
        (command.args(&args).env("VAE_FAULT", fault).output().unwrap(), out)
    };
    let (out, resident) = run("resident", "cache", "", &["--epochs", "2"]);
    ok(out);
    let (out, streamed) = run("streamed", "cache", "", &["--epochs", "2", "--max-memory", "1K"]);
    let out = ok(out);
    assert!(stdout(&out).contains("images of 3x16x16 (folder, streamed from disk)"), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("streaming from the cache"), "{err}");
    assert!(
        err.contains("more than --max-memory 1.0 KiB: reading them from disk a batch at a time"),
        "{err}"
    );
    assert!(same_tensors(&resident, &streamed), "streamed training differs from resident training");

    // Decoded straight into a new cache and streamed; killed after step 9 (saved at 8, in the
    // second epoch), then resumed streaming.
    let (out, killed) = run(
        "killed",
        "cache2",
        "step:9",
        &["--epochs", "2", "--max-memory", "1K", "--save-every-steps", "2"],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("decoding them into the cache") && err.contains("streaming from it"), "{err}");
    assert!(err.contains("skipped 1 files of"), "{err}");
    let saved = Checkpoint::load(&killed.join("last.safetensors")).unwrap().meta;
    assert_eq!((saved.epoch, saved.step), (1, 8), "saved in the middle of the second epoch");
    assert!(!same_tensors(&resident, &killed), "step 8 cannot equal the end of the run");
    let killed = killed.to_str().unwrap();
    let (out, _) = run("killed", "cache2", "", &["--epochs", "2", "--max-memory", "1K", "--resume", killed]);
    ok(out);
    assert!(same_tensors(&resident, Path::new(killed)), "a resumed streamed run differs");

    // Evaluation streams the same pixels, binarized the same way.
    let (out, gray) =
        run("gray", "cache", "", &["--epochs", "1", "--channels", "1", "--binarize", "dynamic"]);
    ok(out);
    let eval = |extra: &[&str]| {
        let mut args =
            vec!["eval", gray.to_str().unwrap(), "--split", "train", "--iw-samples", "5", "--json"];
        args.extend_from_slice(extra);
        let out = ok(vae(&args));
        let mut json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        json.as_object_mut().unwrap().remove("seconds");
        (json, stderr(&out))
    };
    let ((resident, _), (streamed, err)) = (eval(&[]), eval(&["--max-memory", "1K"]));
    assert!(err.contains("streaming from the cache"), "{err}");
    assert_eq!(resident, streamed);
    let picture = dir.path().join("reconstruct.png");
    ok(vae(&[
        "reconstruct",
        gray.to_str().unwrap(),
        "--max-memory",
        "1K",
        "--out",
        picture.to_str().unwrap(),
    ]));
    assert!(picture.is_file());

    let (out, _) = run("uncached", "cache3", "", &["--epochs", "1", "--max-memory", "1K", "--no-cache"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("streaming them from disk needs the cache file: drop --no-cache"),
        "{}",
        stderr(&out)
    );
    let out = vae(&["train", "--max-memory", "1G", "--epochs", "1"]);
    assert!(
        stderr(&out).contains("--max-memory 1G does not apply to --dataset shapes (the default)"),
        "{}",
        stderr(&out)
    );
    let out = vae(&["train", "--dataset", "folder", "--max-memory", "lots"]);
    assert!(stderr(&out).contains("\"lots\" is not a size such as 512M or 8G"), "{}", stderr(&out));
}

#[test]
fn a_full_cache_disk_fails_a_streamed_run_and_only_warns_a_resident_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    write_folder(&data);
    // The decoded set (61 images of 3x16x16) is 47 kB.
    let Some(disk) = SmallDisk::mount(&dir.path().join("disk"), "24k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)");
        return;
    };
    let cache = disk.0.to_str().unwrap();
    let flags = ["--dataset", "folder", "--image-size", "16", "--test-fraction", "0.2", "--cache-dir", cache];
    let leftovers = || std::fs::read_dir(&disk.0).unwrap().count();
    let mut streamed = flags.to_vec();
    streamed.extend_from_slice(&["--max-memory", "1K"]);
    let out = train(&data, &dir.path().join("streamed"), &streamed);
    assert!(!out.status.success(), "streamed without its file");
    let err = stderr(&out);
    assert!(err.contains("No space left on device") && err.contains(".tmp-"), "{err}");
    assert_eq!(leftovers(), 0, "the partial cache file is removed");

    let out = ok(train(&data, &dir.path().join("resident"), &flags));
    let err = stderr(&out);
    assert!(err.contains("warning: images will not be cached") && err.contains("No space left"), "{err}");
    assert_eq!(leftovers(), 0, "the partial cache file is removed");
}

/// Every image of a folder's splits is named by the file it came from, whether decoded,
/// read from the cache, streamed from it or decoded afresh into a streamed cache, with a file
/// that does not decode among them; and `vae encode` lists those names beside its latents
/// (of a folder, the split is chosen by a hash of the path, so the order says nothing).
#[test]
fn each_image_of_a_folder_is_named_by_its_file_and_encode_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("images");
    write_folder(&data);
    let opts = |cache: &str, max_memory: Option<u64>| FolderOptions {
        dir: data.clone(),
        image_size: 8,
        channels: 3,
        test_fraction: 0.2,
        cache_dir: Some(dir.path().join(cache)),
        max_memory,
        quiet: true,
    };
    let mut seen = Vec::new();
    for (what, opts) in [
        ("decoded", opts("cache", None)),
        ("from the cache", opts("cache", None)),
        ("streamed from the cache", opts("cache", Some(1024))),
        ("decoded into a streamed cache", opts("other", Some(1024))),
    ] {
        let splits = folder::load(&opts).unwrap();
        assert_eq!(splits.train.is_streamed(), opts.max_memory.is_some(), "{what}");
        let mut names = Vec::new();
        for split in [&splits.train, &splits.test] {
            let named = split.names.as_ref().unwrap_or_else(|| panic!("{what}: no names"));
            assert_eq!(named.len(), split.len(), "{what}");
            for (i, name) in named.iter().enumerate() {
                let file = vae::data::image_file::decode(&data.join(name), 3, 8).unwrap().pixels;
                let image = Vec::<u8>::try_from(split.images(i, 1).unwrap().flatten(0, -1)).unwrap();
                assert!(file == image, "{what}: image {i} is not {name}");
            }
            names.extend(named.iter().cloned());
        }
        assert_eq!(names.len(), 61, "{what}: the 60 images and tiny.png, not broken.png");
        seen.push(names);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "the same names every way");

    let run = dir.path().join("run");
    let flags = ["--dataset", "folder", "--image-size", "8", "--test-fraction", "0.2", "--cache-dir"];
    ok(train(&data, &run, &[&flags[..], &[dir.path().join("cache").to_str().unwrap()]].concat()));
    let splits = folder::load(&opts("cache", None)).unwrap();
    let [train, test] = [splits.train.names.unwrap().to_vec(), splits.test.names.unwrap().to_vec()];
    // Each split, or both (what latents cached for a diffusion model want): train, then test.
    for (split, expected) in [("test", test.clone()), ("all", [train, test].concat())] {
        let latents = dir.path().join(format!("{split}.safetensors"));
        let encode = ["encode", run.to_str().unwrap(), "--split", split, "--out", latents.to_str().unwrap()];
        ok(vae(&encode));
        let bytes = std::fs::read(&latents).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let files: Vec<String> = serde_json::from_str(&header.metadata().as_ref().unwrap()["files"]).unwrap();
        assert_eq!(files, expected, "--split {split}");
        let mean = header.tensors()["mean"].shape.clone();
        assert_eq!(mean[0], expected.len(), "--split {split}: {mean:?}");
    }
}

fn test_images(dir: &Path) -> HashSet<Vec<u8>> {
    let opts = FolderOptions {
        dir: dir.to_path_buf(),
        image_size: 8,
        channels: 3,
        test_fraction: 0.2,
        cache_dir: None,
        max_memory: None,
        quiet: false,
    };
    let splits = folder::load(&opts).unwrap();
    let pixels =
        Vec::<u8>::try_from(splits.test.images(0, splits.test.len()).unwrap().flatten(0, -1)).unwrap();
    pixels.chunks(3 * 8 * 8).map(<[u8]>::to_vec).collect()
}

#[test]
fn adding_a_file_keeps_the_test_split() {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    let before = test_images(dir.path());
    assert!(before.len() >= 5, "{} test images", before.len());
    for i in 100..120 {
        pattern(i, 30, 30).save(dir.path().join(format!("class0/new{i}.png"))).unwrap();
    }
    let after = test_images(dir.path());
    assert!(before.is_subset(&after), "a test image moved to the train split");
    assert!(after.len() > before.len() || after.len() == before.len());
}

#[test]
fn bad_folders_get_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let junk = dir.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    for i in 0..4 {
        std::fs::write(junk.join(format!("{i}.jpg")), b"no image").unwrap();
    }
    let images = dir.path().join("images");
    write_folder(&images);
    for (data, extra, message) in [
        (dir.path().join("missing"), vec![], "image folder"),
        (empty.clone(), vec![], "holds no files"),
        (junk.clone(), vec![], "decodes as an image (4 tried, e.g. 0.jpg, 1.jpg, 2.jpg)"),
        (images.clone(), vec!["--test-fraction", "0"], "--test-fraction must be between 0 and 1, found 0"),
        (images.clone(), vec!["--channels", "2"], "1 or 3 channels, found 2"),
    ] {
        let mut args = vec!["--dataset", "folder", "--no-cache"];
        args.extend_from_slice(&extra);
        let out = train(&data, &dir.path().join("run"), &args);
        assert!(!out.status.success(), "{data:?} {extra:?} accepted");
        assert!(stderr(&out).contains(message), "{data:?}: {}", stderr(&out));
    }
    let out = vae(&["train", "--dataset", "folder"]);
    assert!(stderr(&out).contains("--dataset folder needs --data-dir FOLDER"), "{}", stderr(&out));
}
