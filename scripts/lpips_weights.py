#!/usr/bin/env python3
"""Writes the LPIPS weights that `vae train --perceptual-weight W --lpips-weights FILE` and
`vae eval --lpips-weights FILE` read: the `lpips` package's LPIPS(net='vgg', version='0.1')
state dict (torchvision's VGG16 ImageNet trunk + the package's linear heads) as safetensors.

    .venv/bin/python scripts/lpips_weights.py checkpoints/lpips-vgg.safetensors

The trunk's ImageNet weights are downloaded by torchvision on first use (into
~/.cache/torch/hub): run this once on a machine with network access and copy the file.
`--random-trunk` writes a randomly initialised trunk instead (no download; the tests use it).

`--reference X0_X1.safetensors OUT.safetensors` (tests): the package's distance between the
images `x0` and `x1` ([B, 3, H, W] in [-1, 1]) and its gradient with respect to `x1`, with
these weights.
"""
import argparse

import torch
from safetensors.torch import load_file, save_file


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the safetensors file to write")
    p.add_argument("--random-trunk", action="store_true", help="random VGG16 weights (no download)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", metavar="IMAGES", help="also write the package's distance on these images")
    p.add_argument("--reference-out", metavar="FILE")
    args = p.parse_args()

    import lpips

    torch.manual_seed(args.seed)
    net = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=args.random_trunk, verbose=False).eval()
    # `lins.K` is the package's second name for `linK`: one copy of each.
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items() if not k.startswith("lins.")}
    save_file(state, args.out)
    if args.reference:
        images = load_file(args.reference)
        x0, x1 = images["x0"], images["x1"].clone().requires_grad_(True)
        distance = net(x0, x1).flatten()
        distance.sum().backward()
        save_file({"distance": distance.detach().contiguous(), "grad": x1.grad.contiguous()}, args.reference_out)


if __name__ == "__main__":
    main()
