#!/usr/bin/env python3
"""diffusers' AutoencoderKL beside `vae --arch resnet`, for tests/diffusers.rs.

  make DIR          a randomly initialised small AutoencoderKL, saved with save_pretrained
                    into DIR, and DIR.io.safetensors: inputs x in [0, 1] and noise, with
                    diffusers' posterior mean, log-variance and decoder output for them
                    (--no-quant-convs: without quant_conv and post_quant_conv, as SD3's and
                    Flux's autoencoders are; --groups-of-32: blocks of 32 and 64 channels in
                    GroupNorm's 32 groups, as every Stable Diffusion autoencoder has)
  ldm DIR OUT       DIR's weights in the original Stable Diffusion (LDM) layout, one file, as
                    single-file VAEs are shared (--whole: under first_stage_model., beside
                    other tensors, as in a whole SD checkpoint); checked to map back exactly
                    through diffusers' own convert_ldm_vae_checkpoint
  run DIR IO OUT    loads DIR with from_pretrained (no missing or unexpected keys) and writes
                    the same outputs for the inputs of IO into OUT (--single-file FILE: checks
                    FILE holds DIR's tensors in the LDM layout, and the outputs are those of
                    FILE loaded by from_single_file with DIR's config)
  tiled DIR PNG OUT diffusers' enable_tiling() with tiles of --tile pixels: PNG's posterior
                    and reconstruction (decoded from the mean), and latents z of 20 x 28
                    decoded, into OUT (with x, PNG in [0, 1], and z)
  decode DIR LATENTS
                    diffusers' decoding of the tensor z of LATENTS (in tiles with --tile, as
                    enable_tiling()), for scripts/bench --tiles; prints its seconds
  train DIR IO OUT  20 steps of Adam on the batches of IO: loss = sum|x - x^| (or squared,
                    per --recon) over pixels, mean over the batch, + beta * KL summed over the
                    latent, z = mean + std * eps with IO's eps; per-step losses into OUT

Nothing is downloaded: the weights are random, the config small.
"""
import argparse
import json

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16],
    layers_per_block=1,
    latent_channels=2,
    norm_num_groups=4,
    sample_size=16,
)


def outputs(vae, x, eps):
    """Posterior mean and log-variance of x (in [0, 1]), and the decoder's output at z."""
    posterior = vae.encode(x * 2 - 1).latent_dist
    z = posterior.mean + posterior.std * eps
    return {"mean": posterior.mean, "logvar": posterior.logvar, "decoded": vae.decode(z).sample}


def make(args):
    torch.manual_seed(0)
    quant = not args.no_quant_convs
    config = dict(CONFIG, block_out_channels=[32, 64], norm_num_groups=32) if args.groups_of_32 else CONFIG
    vae = AutoencoderKL(**config, use_quant_conv=quant, use_post_quant_conv=quant).eval()
    # Random, not default, GroupNorm and bias values: every parameter matters to the check.
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(args.dir, safe_serialization=True)
    x = torch.rand(args.steps, 4, 3, 16, 16)
    eps = torch.randn(args.steps, 4, 2, 8, 8)
    with torch.no_grad():
        out = outputs(vae, x[0], eps[0])
    save_file({"x": x, "eps": eps, **{k: v.contiguous() for k, v in out.items()}}, args.dir + ".io.safetensors")


def ldm_name(name, blocks):
    """The original Stable Diffusion (LDM) name of diffusers' VAE tensor `name`."""
    parts = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut").split(".")
    side, rest = parts[0], parts[1:]
    if rest[0] == "down_blocks":
        i, kind = rest[1], rest[2]
        rest = ["down", i, "block", rest[3]] + rest[4:] if kind == "resnets" else ["down", i, "downsample"] + rest[4:]
    elif rest[0] == "up_blocks":
        b, kind = str(blocks - 1 - int(rest[1])), rest[2]
        rest = ["up", b, "block", rest[3]] + rest[4:] if kind == "resnets" else ["up", b, "upsample"] + rest[4:]
    elif rest[0] == "mid_block" and rest[1] == "resnets":
        rest = ["mid", f"block_{int(rest[2]) + 1}"] + rest[3:]
    elif rest[0] == "mid_block":
        layer = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
        rest = ["mid", "attn_1", layer] + rest[4 + (rest[3] == "to_out"):]
    return ".".join([side] + rest)


def ldm_layout(vae):
    """The state dict of `vae` in the original Stable Diffusion (LDM) layout."""
    blocks = len(vae.config.block_out_channels)
    layout = {}
    for name, t in vae.state_dict().items():
        new = ldm_name(name, blocks) if name.startswith(("encoder.", "decoder.")) else name
        # LDM keeps the attention's projections as 1x1 convolutions.
        layout[new] = t[:, :, None, None] if ".attn_1." in new and t.dim() == 2 else t
    return layout


def ldm(args):
    vae = AutoencoderKL.from_pretrained(args.dir)
    ours = vae.state_dict()
    layout = ldm_layout(vae)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    back = convert_ldm_vae_checkpoint(layout, dict(vae.config))
    assert back.keys() == ours.keys(), sorted(set(back) ^ set(ours))
    assert all(torch.equal(back[k], ours[k]) for k in ours), "the LDM layout does not map back"
    if args.whole:
        layout = {"first_stage_model." + k: v for k, v in layout.items()}
        layout["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
        layout["first_stage_model.loss.logvar"] = torch.zeros(())
    save_file({k: v.contiguous() for k, v in layout.items()}, args.io)


def run(args):
    vae, info = AutoencoderKL.from_pretrained(args.dir, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"from_pretrained reports {problems}"
    if args.single_file:
        # The names and shapes the LDM code's first_stage_model loads (as AUTOMATIC1111's web
        # UI does), then the file through diffusers' own single-file loader.
        theirs, layout = ldm_layout(vae), load_file(args.single_file)
        assert layout.keys() == theirs.keys(), sorted(set(layout) ^ set(theirs))
        shapes = [k for k in theirs if layout[k].shape != theirs[k].shape]
        assert not shapes, f"shapes differ: {shapes}"
        vae = AutoencoderKL.from_single_file(args.single_file, config=args.dir, local_files_only=True)
    io = load_file(args.io)
    with torch.no_grad():
        out = outputs(vae.eval(), io["x"][0], io["eps"][0])
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)
    print(json.dumps({"scaling_factor": vae.config.scaling_factor}))


def tiled_by(vae, tile):
    """`vae` with diffusers' enable_tiling() in tiles of `tile` pixels (not its sample_size)."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)
    return vae


def tiled(args):
    import numpy as np
    from PIL import Image

    vae = tiled_by(AutoencoderKL.from_pretrained(args.dir).eval(), args.tile)
    pixels = np.asarray(Image.open(args.io).convert("RGB"), dtype=np.float32) / 255
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()
    torch.manual_seed(1)
    z = torch.randn(2, vae.config.latent_channels, 20, 28)
    with torch.no_grad():
        posterior = vae.encode(x * 2 - 1).latent_dist
        out = dict(
            x=x,
            z=z,
            mean=posterior.mean,
            logvar=posterior.logvar,
            reconstructed=vae.decode(posterior.mean).sample,
            decoded=vae.decode(z).sample,
        )
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)


def decode(args):
    import time

    vae = AutoencoderKL.from_pretrained(args.dir).eval()
    if args.tile:
        tiled_by(vae, args.tile)
    z = load_file(args.io)["z"]
    start = time.perf_counter()
    with torch.no_grad():
        vae.decode(z)
    print(json.dumps({"decode_s": time.perf_counter() - start}))


def train(args):
    vae = AutoencoderKL.from_pretrained(args.dir).train()
    io = load_file(args.io)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr, foreach=False)
    losses = []
    for x, eps in zip(io["x"], io["eps"]):
        out = outputs(vae, x, eps)
        diff = out["decoded"] - (x * 2 - 1)
        recon = (diff.abs() if args.recon == "l1" else diff.square()).flatten(1).sum(1)
        logvar = out["logvar"]
        kl = 0.5 * (out["mean"].square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)
        loss = (recon + args.beta * kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    save_file({"losses": torch.tensor(losses, dtype=torch.float64)}, args.out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["make", "run", "train", "ldm", "tiled", "decode"])
    parser.add_argument("dir")
    parser.add_argument("io", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument("--recon", choices=["l1", "l2"], default="l1")
    parser.add_argument("--no-quant-convs", action="store_true")
    parser.add_argument("--groups-of-32", action="store_true")
    parser.add_argument("--whole", action="store_true")
    parser.add_argument("--single-file")
    parser.add_argument("--tile", type=int)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"make": make, "run": run, "train": train, "ldm": ldm, "tiled": tiled, "decode": decode}[args.command](args)


if __name__ == "__main__":
    main()
