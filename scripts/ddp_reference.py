#!/usr/bin/env python3
"""The PyTorch reference for `scripts/bench --nproc N`: the default model trained for one
epoch with DistributedDataParallel over Gloo, started by torchrun (which gives each rank one
thread), each global batch split across the ranks as `vae train --nproc` splits it. Rank 0
prints one JSON object with the epoch's training images per second.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_reference import load_data  # noqa: E402
from pytorch_model import Vae  # noqa: E402


class Loss(torch.nn.Module):
    """The model's loss as its forward, the call DDP arms its gradient hooks in."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, eps):
        return self.vae.loss(x, eps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batch-size", type=int, default=128, help="the global batch")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    vae = Vae(dict(image_size=28, in_channels=1, channels=[32, 64], hidden=256, latent_dim=16,
                   likelihood="bernoulli"))
    model = torch.nn.parallel.DistributedDataParallel(Loss(vae))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train, _ = load_data(args.data_dir)
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))
    dist.barrier()
    start = time.perf_counter()
    for batch in order.split(args.batch_size):
        n = batch.shape[0]
        mine = batch[n * rank // world : n * (rank + 1) // world]
        x = train.index_select(0, mine).float() / 255.0
        loss, _, _ = model(x, torch.randn(x.shape[0], 16))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"impl": "pytorch-ddp", "torch": torch.__version__, "ranks": world,
                          "threads": torch.get_num_threads(), "images_per_s": train.shape[0] / elapsed}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
