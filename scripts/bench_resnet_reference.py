#!/usr/bin/env python3
"""The PyTorch reference for `scripts/bench --arch resnet`: diffusers' AutoencoderKL of the
same config trained the way `vae --arch resnet` trains it (L1 summed over [-1, 1] pixels and
averaged over the batch, plus beta times the KL summed over the latent; Adam), on images
resident on the device; with --perceptual-weight and --disc-weight, latent diffusion's whole
loss (scripts/gan_reference.py's equations). Prints one JSON object, as `vae bench` does.
"""
import argparse
import json
import resource
import time

import torch
from diffusers import AutoencoderKL


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--block-channels", default="64,128,256")
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--norm-groups", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--beta", type=float, default=1e-6)
    p.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="add LPIPS (the lpips package, frozen) times this to every pixel's loss")
    p.add_argument("--lpips-weights", help="the safetensors state dict of scripts/lpips_weights.py")
    p.add_argument("--disc-weight", type=float, default=0.0,
                   help="train taming's PatchGAN beside it, its term balanced by the adaptive weight")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="diffusers' enable_gradient_checkpointing (per down, middle and up block)")
    p.add_argument("--trace", help="then record the first --trace-steps timed steps with torch.profiler here")
    p.add_argument("--trace-steps", type=int, default=5)
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = torch.bfloat16 if args.precision == "bf16" else None
    blocks = [int(c) for c in args.block_channels.split(",")]
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=blocks, layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels, norm_num_groups=args.norm_groups,
        down_block_types=["DownEncoderBlock2D"] * len(blocks), up_block_types=["UpDecoderBlock2D"] * len(blocks),
        sample_size=args.image_size,
    ).to(device).train()
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    params = list(vae.parameters())
    disc = None
    if args.disc_weight > 0:
        from gan_reference import NLayerDiscriminator, adaptive_weight, hinge_d_loss

        disc = NLayerDiscriminator(3).to(device).train()
        logvar_param = torch.nn.Parameter(torch.zeros((), device=device))
        params.append(logvar_param)
        opt_disc = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt = torch.optim.Adam(params, lr=1e-4)
    perceptual = None
    if args.perceptual_weight > 0:
        import lpips
        from safetensors.torch import load_file

        # As latent diffusion's LPIPSWithDiscriminator holds it: eval mode, no gradients of its own.
        perceptual = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
        perceptual.load_state_dict(load_file(args.lpips_weights), strict=False)
        perceptual = perceptual.to(device).requires_grad_(False)
    images = torch.rand(512, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    images = (images * 255).to(torch.uint8).to(device)

    def step(i):
        idx = torch.arange(i * args.batch_size, (i + 1) * args.batch_size, device=device) % images.shape[0]
        x = images.index_select(0, idx).float() / 255.0 * 2 - 1
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
            out = vae.decode(z).sample
        recon = (out.float() - x).abs().flatten(1).sum(1)
        if perceptual is not None:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                distance = perceptual(x, out).float().flatten()
            recon = recon + args.perceptual_weight * distance * x[0].numel()
        logvar = posterior.logvar.float()
        kl = 0.5 * (posterior.mean.float().square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)
        if disc is None:
            loss = (recon + args.beta * kl).mean()
        else:
            nll = recon.mean() / torch.exp(logvar_param) + logvar_param * x[0].numel()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                g_loss = -disc(out).float().mean()
            d_weight = adaptive_weight(nll, g_loss, vae.decoder.conv_out.weight, args.disc_weight)
            loss = nll + args.beta * kl.mean() + d_weight * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits_real, logits_fake = disc(x).float(), disc(out.detach()).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
            opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_disc.step()
        return loss.detach()

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    loss = loss.item()
    elapsed = time.perf_counter() - start
    result = {"impl": "pytorch+diffusers", "images_per_s": args.steps * args.batch_size / elapsed,
              "train_loss": loss, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.trace:
        from trace_summary import record

        traced = range(args.warmup, args.warmup + min(args.steps, args.trace_steps))
        record(args.trace, device.type == "cuda", lambda: [step(i) for i in traced])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
