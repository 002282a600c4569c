#!/usr/bin/env python3
"""Writes the Inception weights that `vae eval --fid-weights FILE` reads for rFID: pytorch-fid's
FID Inception v3 (TensorFlow's 2015 graph, ported) state dict as safetensors.

    .venv/bin/python scripts/fid_weights.py checkpoints/fid-inception.safetensors \
        --from ~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth

The .pth is pytorch-fid's own download (its FID_WEIGHTS_URL; `python -m pytorch_fid` fetches it
into ~/.cache/torch/hub on first use): get it on a machine with network access and copy it.
`--random` writes randomly initialised weights with random BatchNorm statistics instead (no
download; the tests use it).

`--reference IMAGES OUT` (tests): pytorch-fid's pool features (`features`, [B, 2048]) of the
images `x` ([B, 3, H, W] in [0, 1]) with these weights, and, when IMAGES also holds feature
sets `a` and `b` ([N, D]), pytorch-fid's Fréchet distance between them (`frechet`).
"""
import argparse

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def fid_inception(state):
    """pytorch-fid's InceptionV3 (pool features) holding `state`, without its download."""
    from pytorch_fid import inception

    inception.load_state_dict_from_url = lambda *args, **kwargs: state
    return inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def random_state(seed):
    """A random FID Inception state dict: PyTorch's initialisation, random BatchNorm affine
    parameters, and running statistics measured on random images, so that the features still
    depend on the image (with PyTorch's initialisation alone they are a constant to 1e-7)."""
    from pytorch_fid import inception

    torch.manual_seed(seed)
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = inception.FIDInceptionE_1(1280)
    net.Mixed_7c = inception.FIDInceptionE_2(2048)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches seen
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    net.train()
    with torch.no_grad():
        net(torch.rand(8, 3, 299, 299) * 2 - 1)
    return net.state_dict()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the safetensors file to write")
    p.add_argument("--from", dest="source", metavar="PTH", help="pytorch-fid's pt_inception-2015-12-05 .pth")
    p.add_argument("--random", action="store_true", help="random weights (no download)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", metavar="IMAGES", help="also write pytorch-fid's figures on these")
    p.add_argument("--reference-out", metavar="FILE")
    args = p.parse_args()
    if args.random == bool(args.source):
        p.error("give one of --from PTH and --random")
    state = random_state(args.seed) if args.random else torch.load(args.source, map_location="cpu")
    # The classifier and BatchNorm's step counters are not part of the features.
    kept = {k: v.detach().float().contiguous() for k, v in state.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    save_file(kept, args.out)
    if args.reference:
        from pytorch_fid.fid_score import calculate_frechet_distance

        inputs = load_file(args.reference)
        with torch.no_grad():
            features = fid_inception(state)(inputs["x"])[0].flatten(1)
        out = {"features": features.contiguous()}
        if "a" in inputs:
            a, b = inputs["a"].double().numpy(), inputs["b"].double().numpy()
            stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in (a, b)]
            distance = calculate_frechet_distance(*stats[0], *stats[1])
            out["frechet"] = torch.tensor([float(distance)], dtype=torch.float64)
        save_file(out, args.reference_out)


if __name__ == "__main__":
    main()
