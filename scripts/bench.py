#!/usr/bin/env python3
"""Side-by-side training throughput: `vae bench` against the PyTorch reference of the same
model, loss, optimizer and data (scripts/bench_reference.py), in one invocation.

Runs of the two alternate and each figure is the median of --repeats runs: on shared
machines speed drifts by 10-20% within minutes, and alternating keeps the comparison fair.
Run it through scripts/bench, which builds the release binary first.
"""
import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"


def write_idx(path, images):
    n, h, w = images.shape
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, h, w))
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + bytes(images.contiguous().view(-1).tolist()))
    labels = path.replace("images-idx3", "labels-idx1")
    with gzip.open(labels, "wb", compresslevel=1) as f:
        f.write((0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(n))


def generated_data(folder, train, test):
    """Blurry random 28x28 images in Fashion-MNIST's file layout (torch alone: the GPU
    machines carry torch without numpy)."""
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", train), ("t10k", test)):
        coarse = torch.randint(0, 256, (n, 7, 7), generator=g, dtype=torch.uint8)
        write_idx(os.path.join(folder, f"{name}-images-idx3-ubyte.gz"),
                  coarse.repeat_interleave(4, 1).repeat_interleave(4, 2))
    return folder


def generated_jpegs(folder, count, side=128):
    """Smooth random colour fields as JPEGs, in 10 subfolders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(count):
        sub = os.path.join(folder, f"{i % 10}")
        os.makedirs(sub, exist_ok=True)
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((side, side), Image.BILINEAR)
        img.save(os.path.join(sub, f"{i:05d}.jpg"), quality=90)
    return folder


def loader_section(vae_bin, args, tmp):
    """The image-folder loader: first decode, then from the cache, next to the training step."""
    count = 200 if args.quick else 10000
    folder = generated_jpegs(os.path.join(tmp, "jpegs"), count)
    cache = os.path.join(tmp, "cache")
    cmd = [vae_bin, "bench", "--dataset", "folder", "--data-dir", folder, "--image-size", "64",
           "--cache-dir", cache, "--device", "cpu", "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    first, cached = run_json(cmd, dict(os.environ)), run_json(cmd, dict(os.environ))
    # As if the set did not fit in memory: batches read from the cache file, one ahead.
    streamed = run_json(cmd + ["--max-memory", "1K"], dict(os.environ))
    print(f"\nimage-folder loader ({count} generated 128x128 JPEGs -> 64x64x3 crops, {args.threads} threads):")
    print(f"  first run, decoding      {first['load_s']:7.2f} s  {first['load_images_per_s']:9.0f} img/s")
    print(f"  second run, from cache   {cached['load_s']:7.2f} s  {cached['load_images_per_s']:9.0f} img/s")
    print(f"  training step on it (f32, batch {cached['batch_size']}): {cached['images_per_s']:.0f} img/s in memory,"
          f" {streamed['images_per_s']:.0f} img/s streamed from disk")
    return {"first": first, "cached": cached, "streamed": streamed}


def data_parallel_section(vae_bin, nproc, data_dir, tmp):
    """`vae train` for one epoch as N ranks of 1 thread and as 1 process of N threads, and
    PyTorch's DistributedDataParallel as N ranks of 1 thread (scripts/ddp_reference.py)."""
    import re
    common = [vae_bin, "train", "--dataset", "fashion-mnist", "--data-dir", data_dir, "--epochs", "1",
              "--device", "cpu", "--no-tensorboard"]
    runs = {}
    for name, extra in ((f"{nproc} ranks x 1 thread", ["--nproc", str(nproc), "--threads", "1"]),
                        (f"1 process x {nproc} threads", ["--threads", str(nproc)])):
        out = subprocess.run(common + extra + ["--out", os.path.join(tmp, name.replace(" ", "_"))],
                             check=True, capture_output=True, text=True).stdout
        line = next(l for l in out.splitlines() if l.startswith("epoch 1/1"))
        share = re.search(r"all-reduce (\d+)%", line)
        runs[name] = {"images_per_s": float(re.search(r"(\d+) img/s", line).group(1)),
                      "all_reduce_percent": float(share.group(1)) if share else None}
    # PyTorch's own data parallelism on the same data and split, its backward overlapping the
    # all-reduce of finished buckets.
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node", str(nproc),
                          os.path.join(ROOT, "scripts", "ddp_reference.py"), "--data-dir", data_dir],
                         check=True, capture_output=True, text=True).stdout
    ddp = json.loads(next(l for l in out.splitlines() if l.startswith("{")))
    runs[f"pytorch DDP, {nproc} ranks x 1 thread"] = {"images_per_s": ddp["images_per_s"], "all_reduce_percent": None}
    print(f"\ndata-parallel training, one epoch (torch.distributed, Gloo):")
    for name, r in runs.items():
        share = f"  all-reduce {r['all_reduce_percent']:.0f}% of the epoch" if r["all_reduce_percent"] is not None else ""
        print(f"  {name:<33} {r['images_per_s']:7.0f} img/s{share}")
    return runs


RESNET = {"block-channels": "64,128,256", "layers-per-block": "2", "latent-channels": "4", "norm-groups": "32"}


def resnet_section(vae_bin, args):
    """`--arch resnet` (a small Stable-Diffusion-like config) against diffusers' AutoencoderKL
    of the same config trained by PyTorch eager, alternating, at 64x64 and 128x128."""
    flags = [x for k, v in RESNET.items() for x in (f"--{k}", v)]
    # The flags both sides take beyond the architecture: loss terms, checkpointing.
    extra = []
    if args.perceptual_weight > 0:
        # A random VGG16 trunk (no download): the same work as the ImageNet one.
        weights = os.path.join(tempfile.mkdtemp(), "lpips.safetensors")
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "lpips_weights.py"), weights, "--random-trunk"],
                       check=True, capture_output=True)
        extra = ["--perceptual-weight", str(args.perceptual_weight), "--lpips-weights", weights]
    if args.disc_weight > 0:
        extra += ["--disc-weight", str(args.disc_weight)]
    if args.gradient_checkpointing:
        extra.append("--gradient-checkpointing")
    devices = ["cuda"] if args.cuda_only else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    # A CPU step takes seconds, a GPU step tens of milliseconds: each gets enough steps to time.
    timing = {"cpu": (min(args.steps, 5), min(args.warmup, 2)), "cuda": (min(args.steps, 50), min(args.warmup, 10))}
    if args.quick:
        timing = {d: (2, 1) for d in timing}
    print(f"--arch resnet, block channels {RESNET['block-channels']}, {RESNET['layers-per-block']} layers per "
          f"block, {RESNET['latent-channels']} latent channels"
          f"{f', LPIPS weight {args.perceptual_weight}' if args.perceptual_weight > 0 else ''}"
          f"{f', PatchGAN weight {args.disc_weight}' if args.disc_weight > 0 else ''}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; timed steps after warm-up: "
          f"{', '.join(f'{d} {timing[d][0]} after {timing[d][1]}' for d in devices)}; median of "
          f"{args.repeats} alternating runs; random RGB images (ours: generated shapes), threads {args.threads}\n")
    print(f"{'case':<24} {'vae img/s':>10} {'diffusers img/s':>16} {'ratio':>6}  {'vae peak':>9} {'pt peak':>9}")
    results = {}
    cases = [(device, precision, int(side)) for device in devices for precision in args.precisions.split(",")
             for side in args.sizes.split(",")]
    for device, precision, side in cases:
        (steps, warmup), batch = timing[device], 16
        common = ["--device", device, "--precision", precision, "--batch-size", str(batch),
                  "--threads", str(args.threads), "--steps", str(steps), "--warmup", str(warmup)] + flags + extra
        ours = [vae_bin, "bench", "--arch", "resnet", "--dataset", "shapes", "--channels", "3",
                "--image-size", str(side), "--train-size", "512", "--test-size", "16"] + common
        reference = [sys.executable, os.path.join(ROOT, "scripts", "bench_resnet_reference.py"),
                     "--image-size", str(side)] + common
        name = f"{device} {precision} {side}x{side} b{batch}"
        runs = {"vae": [], "pytorch": []}
        for repeat in range(args.repeats):
            for run, cmd in (("vae", ours), ("pytorch", reference)):
                runs[run].append(run_json(cmd + traced(args, name, run, repeat, steps), dict(os.environ)))
        r = {impl: {"images_per_s": statistics.median(x["images_per_s"] for x in rs),
                    "peak_mib": max((x.get("peak_cuda_mib") if device == "cuda" else x["peak_rss_mib"]) or 0
                                    for x in rs)}
             for impl, rs in runs.items()}
        results[name] = r
        unit = "GPU" if device == "cuda" else "RSS"
        print(f"{name:<24} {r['vae']['images_per_s']:>10.1f} {r['pytorch']['images_per_s']:>16.1f} "
              f"{r['vae']['images_per_s'] / r['pytorch']['images_per_s']:>5.2f}x  "
              f"{r['vae']['peak_mib']:>6.0f} MiB {r['pytorch']['peak_mib']:>6.0f} MiB ({unit})", flush=True)
    for name in results:
        print_traces(args, name, timing[name.split()[0]][0])
    return results


# Stable Diffusion's VAE (vae-ft-mse, SDXL's): 84M parameters, images 8x the latent's side.
SD_VAE = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
              norm_num_groups=32, sample_size=512)


def process_cost(cmd):
    """Wall seconds and peak RSS (MiB) of `cmd` as a process of its own, and its stdout."""
    import time
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)}\nfailed with status {status}:\n{err.read().decode().strip()}")
        out.seek(0)
        return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": out.read().decode()}


def tiles_section(vae_bin, args):
    """One image of each of --tile-sides decoded by a Stable Diffusion-sized VAE (random
    weights), whole and in tiles of 512: `vae decode [--tile 512]` beside diffusers' decode
    [with enable_tiling()], each a process of its own (loading included) on the CPU. --quick:
    a VAE of 32 channels a block, in tiles of 32."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    reference = os.path.join(ROOT, "scripts", "diffusers_reference.py")
    threads = ["--threads", str(args.threads)]
    config, tile_side = (dict(SD_VAE, block_out_channels=[32] * 4), 32) if args.quick else (SD_VAE, 512)
    results = {}
    size = f"{config['block_out_channels']} channels" if args.quick else "Stable Diffusion-sized"
    print(f"decoding one image with a {size} VAE (random weights), {args.threads} threads, "
          f"each a process of its own: wall seconds (load included) and peak RSS")
    print(f"{'case':<22} {'vae':>8} {'diffusers':>10}  {'vae RSS':>9} {'diffusers RSS':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "sd-vae")
        torch.manual_seed(0)
        AutoencoderKL(**config).save_pretrained(folder, safe_serialization=True)
        for image in (int(s) for s in args.tile_sides.split(",")):
            latents = os.path.join(tmp, f"z{image}.safetensors")
            save_file({"z": torch.randn(1, 4, image // 8, image // 8)}, latents)
            for tile in ([], ["--tile", str(tile_side)]):
                ours = process_cost([vae_bin, "decode", folder, latents, "--n", "1", "--out",
                                     os.path.join(tmp, "decoded.png")] + threads + tile)
                theirs = process_cost([sys.executable, reference, "decode", folder, latents] + threads + tile)
                name = f"{image}x{image} {f'tiles of {tile_side}' if tile else 'whole'}"
                results[name] = {"vae": ours, "diffusers": theirs}
                print(f"{name:<22} {ours['wall_s']:>7.1f}s {theirs['wall_s']:>9.1f}s  "
                      f"{ours['peak_rss_mib']:>5.0f} MiB {theirs['peak_rss_mib']:>10.0f} MiB", flush=True)
    return results


def run_json(cmd, env):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nfailed with status {out.returncode}:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trace_file(args, name, run):
    """Where --trace puts case `name`'s trace of `run` (vae or pytorch)."""
    return os.path.join(args.trace, f"{name.replace(' ', '-')}-{run}.json")


def traced(args, name, run, repeat, steps):
    """run's flags to record its last repeat's first timed steps into args.trace (the steps are
    timed first: tracing does not touch the figures)."""
    if not args.trace or repeat < args.repeats - 1:
        return []
    return ["--trace", trace_file(args, name, run), "--trace-steps", str(min(steps, args.trace_steps))]


def print_traces(args, name, steps):
    """The two traces of case `name` side by side (scripts/trace_summary.py)."""
    if not args.trace:
        return
    from trace_summary import summarise, table

    paths = {run: trace_file(args, name, run) for run in ("vae", "pytorch")}
    count = min(steps, args.trace_steps)
    print(f"\n{name}: where the time of {count} traced steps goes ({', '.join(paths.values())})")
    try:
        print(table({run: summarise(path) for run, path in paths.items()}, count), flush=True)
    except Exception as e:  # the figures above stand; the traces stay for another look
        print(f"could not tabulate the traces: {e!r}", flush=True)


def measure(vae_bin, case, args, data_dir, full_epoch=False, profile=False):
    device, precision, batch = case
    common = ["--device", device, "--precision", precision, "--batch-size", str(batch),
              "--threads", str(args.threads), "--data-dir", data_dir]
    if full_epoch:
        common.append("--full-epoch")
    else:
        if profile:
            common.append("--profile")
        common += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    ours = [vae_bin, "bench", "--dataset", "fashion-mnist"] + common
    reference = [sys.executable, os.path.join(ROOT, "scripts", "bench_reference.py")] + common
    env = dict(os.environ)
    runs = {"vae": [], "pytorch": []}
    for repeat in range(args.repeats):
        for run, cmd in (("vae", ours), ("pytorch", reference)):
            trace = [] if full_epoch or profile else traced(args, label(case), run, repeat, args.steps)
            runs[run].append(run_json(cmd + trace, env))
    key = "epoch_s" if full_epoch else "images_per_s"
    summary = {}
    for impl, results in runs.items():
        values = [r[key] for r in results]
        summary[impl] = {
            key: statistics.median(values),
            "all": values,
            "peak_rss_mib": max(r["peak_rss_mib"] or 0 for r in results),
            "peak_cuda_mib": max((r.get("peak_cuda_mib") or 0 for r in results), default=0) or None,
            "loss": results[-1].get("test_loss" if full_epoch else "train_loss"),
            "profile_ms": results[-1].get("profile_ms"),
        }
    return summary


def label(case):
    return f"{case[0]} {case[1]} batch {case[2]}"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few steps of each case on small generated data")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--vae-bin", default=os.environ.get("VAE_BIN", os.path.join(ROOT, "target/release/vae")))
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--nproc", type=int, default=0,
                   help="also train one epoch as N ranks of 1 thread against 1 process of N threads")
    p.add_argument("--arch", choices=["conv", "resnet"], default="conv",
                   help="resnet: the KL-autoencoder family against diffusers' AutoencoderKL instead")
    p.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="--arch resnet: with the LPIPS term in both (a random VGG16 trunk)")
    p.add_argument("--disc-weight", type=float, default=0.0,
                   help="--arch resnet: with the PatchGAN discriminator in both (from the first step)")
    p.add_argument("--cuda-only", action="store_true",
                   help="only the CUDA cases (scripts/gpu-check): no CPU cases, no loader section")
    p.add_argument("--trace", metavar="DIR",
                   help="also record each case's steps with the profiler on both sides into DIR (created; its "
                        "traces must be new) and print where the time goes, side by side")
    p.add_argument("--trace-steps", type=int, default=5, help="timed steps each --trace records")
    p.add_argument("--sizes", default="64,128", help="--arch resnet: image sides, comma-separated")
    p.add_argument("--precisions", default="f32",
                   help="--arch resnet: f32 and/or bf16 (autocast on the reference's side), comma-separated")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="--arch resnet: both sides checkpoint each down, middle and up block")
    p.add_argument("--tiles", action="store_true",
                   help="only decoding whole and in tiles (vae decode --tile) beside diffusers' enable_tiling()")
    p.add_argument("--tile-sides", default="1024", help="--tiles: image sides, comma-separated")
    args = p.parse_args()
    unknown = [x for x in args.precisions.split(",") if x not in ("f32", "bf16")]
    if unknown:
        p.error(f"--precisions: {', '.join(unknown)}: expected f32 and/or bf16, comma-separated")
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    if args.quick:
        args.repeats, args.steps, args.warmup = 1, 5, 2
    if args.tiles:
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}")
        results = tiles_section(args.vae_bin, args)
        return save_json(args, results)
    if args.arch == "resnet":
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores; GPU: {gpu}; torch {torch.__version__}")
        results = resnet_section(args.vae_bin, argparse.Namespace(**{**vars(args), "repeats": min(args.repeats, 3)}))
        return save_json(args, results)

    cases = [] if args.cuda_only else [("cpu", "f32", 32), ("cpu", "f32", 128), ("cpu", "bf16", 128)]
    if torch.cuda.is_available():
        cases += [("cuda", prec, b) for prec in ("f32", "bf16") for b in (128, 1024)]

    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            data_dir, data = generated_data(tmp, 2048, 512), "generated 28x28 (2048 train)"
        elif os.path.isfile(os.path.join(FASHION, "train-images-idx3-ubyte.gz")):
            data_dir, data = FASHION, "Fashion-MNIST"
        else:
            data_dir, data = generated_data(tmp, 60000, 10000), "generated 28x28 (Fashion-MNIST absent)"
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores; GPU: {gpu}; torch {torch.__version__}")
        print(f"data: {data}; threads {args.threads}; {args.steps} timed steps after {args.warmup}; "
              f"median of {args.repeats} alternating runs\n")
        results = {}
        header = f"{'case':<20} {'vae img/s':>10} {'pytorch img/s':>14} {'ratio':>6}  {'vae RSS':>8} {'pt RSS':>8}"
        print(header + "  (RSS in MiB)")
        for case in cases:
            r = measure(args.vae_bin, case, args, data_dir, full_epoch=False)
            results[" ".join(map(str, case))] = r
            ours, ref = r["vae"]["images_per_s"], r["pytorch"]["images_per_s"]
            line = (f"{label(case):<20} {ours:>10.0f} {ref:>14.0f} {ours / ref:>5.2f}x"
                    f"  {r['vae']['peak_rss_mib']:>8.0f} {r['pytorch']['peak_rss_mib']:>8.0f}")
            if r["pytorch"]["peak_cuda_mib"]:
                line += (f"  peak CUDA {r['vae']['peak_cuda_mib'] or 0:.0f} vs {r['pytorch']['peak_cuda_mib']:.0f} MiB")
            print(line, flush=True)
        for case in cases:
            print_traces(args, label(case), args.steps)
        f32 = results.get("cpu f32 128")
        bf16 = results.get("cpu bf16 128")
        if f32 and bf16:
            ratio = bf16["vae"]["images_per_s"] / f32["pytorch"]["images_per_s"]
            print(f"\nvae bf16 vs pytorch f32 at batch 128: {ratio:.2f}x")

        epoch_case = ("cuda" if torch.cuda.is_available() else "cpu", "f32", 128)
        print("\nwhere a step's time goes (ms per step, device synced between phases):")
        print(f"{'case':<20} {'impl':<8} {'data':>6} {'forward':>8} {'backward':>9} {'optimizer':>10}")
        for case in cases:
            r = measure(args.vae_bin, case, argparse.Namespace(**{**vars(args), "repeats": 1}), data_dir, profile=True)
            results[" ".join(map(str, case)) + " profile"] = r
            for impl in ("vae", "pytorch"):
                ms = r[impl]["profile_ms"]
                print(f"{label(case):<20} {impl:<8} {ms['data']:>6.2f} {ms['forward']:>8.2f}"
                      f" {ms['backward']:>9.2f} {ms['optimizer']:>10.2f}", flush=True)

        if not args.cuda_only:
            results["loader"] = loader_section(args.vae_bin, args, tmp)
        if args.nproc > 1:
            results["data parallel"] = data_parallel_section(args.vae_bin, args.nproc, data_dir, tmp)

        e = measure(args.vae_bin, epoch_case, args, data_dir, full_epoch=True)
        results["full epoch " + " ".join(map(str, epoch_case))] = e
        print(f"\nfull epoch ({' '.join(map(str, epoch_case))}: load data, train one epoch, evaluate the test split):")
        for impl in ("vae", "pytorch"):
            print(f"  {impl:<8} {e[impl]['epoch_s']:6.2f} s   test loss {e[impl]['loss']:.2f}")
    save_json(args, results)


def save_json(args, results):
    """Every figure into --json's file, where given."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
