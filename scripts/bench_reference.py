#!/usr/bin/env python3
"""The PyTorch reference for scripts/bench: the same model, loss, optimizer and data path as
`vae bench`, written the way a careful PyTorch user would (data resident on the device as
uint8, no host sync inside the loop, autocast for low precision). Prints one JSON object.
"""
import argparse
import gzip
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_model import Vae  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"


def read_idx_images(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    n, h, w = (int.from_bytes(data[i : i + 4], "big") for i in (4, 8, 12))
    # torch alone (no numpy), so the reference runs on a machine with only torch installed.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=16).view(n, 1, h, w)


def load_data(data_dir):
    train = read_idx_images(os.path.join(data_dir, "train-images-idx3-ubyte.gz"))
    test = read_idx_images(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"))
    return train, test


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["f32", "bf16", "f16"], default="f32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data-dir", default=FASHION)
    p.add_argument("--full-epoch", action="store_true", help="time data loading + one epoch + test eval instead")
    p.add_argument("--profile", action="store_true", help="then split the timed steps into phases")
    p.add_argument("--trace", help="then record the first --trace-steps timed steps with torch.profiler here")
    p.add_argument("--trace-steps", type=int, default=5)
    args = p.parse_args()
    if args.trace and args.full_epoch:
        p.error("--trace records the timed steps; it does not go with --full-epoch")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp_dtype = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[args.precision]
    torch.manual_seed(0)
    model = Vae(dict(image_size=28, in_channels=1, channels=[32, 64], hidden=256, latent_dim=16,
                     likelihood="bernoulli")).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "f16")
    latent = 16

    epoch_start = time.perf_counter()
    train_u8, test_u8 = load_data(args.data_dir)
    train_u8, test_u8 = train_u8.to(device), test_u8.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    phases = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step(idx, sums, profile=False):
        last = [time.perf_counter()]

        def mark(phase):
            if profile:
                sync()
                now = time.perf_counter()
                phases[phase] += now - last[0]
                last[0] = now

        x = train_u8.index_select(0, idx).float() / 255.0
        eps = torch.randn(x.shape[0], latent, device=device)
        mark("data")
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss, recon, kl = model.loss(x, eps)
        mark("forward")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        mark("backward")
        scaler.step(opt)
        scaler.update()
        mark("optimizer")
        sums += torch.stack([loss.detach().float(), recon.detach().float(), kl.detach().float()])

    def epoch_batches(epoch):
        order = torch.randperm(train_u8.shape[0], generator=torch.Generator().manual_seed(epoch)).to(device)
        return order.split(args.batch_size)

    sums = torch.zeros(3, device=device)
    result = {"impl": "pytorch", "torch": torch.__version__, "device": args.device,
              "precision": args.precision, "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    if args.full_epoch:
        for idx in epoch_batches(0):
            step(idx, sums)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            test = torch.zeros((), device=device)
            for x in test_u8.split(500):
                x = x.float() / 255.0
                test += model.loss(x, torch.randn(x.shape[0], latent, device=device))[0].float() * x.shape[0]
        result["test_loss"] = test.item() / test_u8.shape[0]
        result["epoch_s"] = time.perf_counter() - epoch_start
    else:
        batches = [b for e in range(1 + (args.warmup + args.steps) * args.batch_size // train_u8.shape[0])
                   for b in epoch_batches(e) if b.shape[0] == args.batch_size]
        for idx in batches[: args.warmup]:
            step(idx, sums)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for idx in batches[args.warmup : args.warmup + args.steps]:
            step(idx, sums)
        sync()
        elapsed = time.perf_counter() - start
        result["images_per_s"] = args.steps * args.batch_size / elapsed
        result["train_loss"] = sums[0].item() / (args.warmup + args.steps)
        if args.profile:
            for idx in batches[args.warmup : args.warmup + args.steps]:
                step(idx, sums, profile=True)
            result["profile_ms"] = {k: 1e3 * v / args.steps for k, v in phases.items()}
    result["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.trace:
        from trace_summary import record

        traced = batches[args.warmup : args.warmup + min(args.steps, args.trace_steps)]
        record(args.trace, device.type == "cuda", lambda: [step(idx, sums) for idx in traced])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
