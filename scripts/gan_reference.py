#!/usr/bin/env python3
"""Latent diffusion's autoencoder loss (`LPIPSWithDiscriminator`, ldm/modules/losses/
contperceptual.py) and taming-transformers' `NLayerDiscriminator`, written out here for
tests/adversarial.rs, which hands it vae's training states one step at a time:

    gan_reference.py AE_DIR LPIPS IO [--lr ...] < requests

AE_DIR is a diffusers folder (the architecture), LPIPS an `lpips` state dict
(scripts/lpips_weights.py), IO holds `x` ([steps, B, C, H, W] in [0, 1]) and `eps` (the
posterior noise, [steps, B, C, h, w]). Each request line `STATE STEP` names a safetensors file
of vae's state before step STEP (weights, `loss.logvar`, `discriminator.*`, both Adams'
`optimizer.*` / `optimizer_disc.*`); the answer is a JSON line: the step's generator loss,
discriminator loss and adaptive weight from that state, and the same numbers for step STEP+1
after this script's own update of both networks (`next`).

As in ldm, both optimizers step on every batch: before --disc-start the discriminator
factor is 0, so its Adam steps on zero gradients and the generator's adversarial term
vanishes. One difference from ldm's Lightning loop, shared with vae: the discriminator sees
this step's reconstructions (detached), not a second forward pass after the generator's
update.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from torch import nn


class NLayerDiscriminator(nn.Module):
    """taming-transformers' PatchGAN (taming/modules/discriminator/model.py), BatchNorm."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        kw, padw = 4, 1
        sequence = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2**n, 8)
            sequence += [
                nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw, bias=False),
                nn.BatchNorm2d(ndf * nf_mult),
                nn.LeakyReLU(0.2, True),
            ]
        nf_mult_prev, nf_mult = nf_mult, min(2**n_layers, 8)
        sequence += [
            nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw, bias=False),
            nn.BatchNorm2d(ndf * nf_mult),
            nn.LeakyReLU(0.2, True),
        ]
        sequence += [nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*sequence)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def adaptive_weight(nll_loss, g_loss, last_layer, disc_weight):
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


class Recipe:
    """The autoencoder, the discriminator, the log-variance and their Adams."""

    def __init__(self, args):
        import lpips

        self.args = args
        self.vae = AutoencoderKL.from_pretrained(args.ae_dir).train()
        self.io = load_file(args.io)
        self.disc = NLayerDiscriminator(input_nc=self.io["x"].shape[2]).train()
        self.perceptual = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
        missing, unexpected = self.perceptual.load_state_dict(load_file(args.lpips), strict=False)
        assert not unexpected and all(k.startswith("lins.") for k in missing), (missing, unexpected)
        for q in self.perceptual.parameters():
            q.requires_grad_(False)
        self.logvar = nn.Parameter(torch.zeros(()))
        self.disc_loss = hinge_d_loss if args.disc_loss == "hinge" else vanilla_d_loss

    def load(self, path):
        """vae's state: weights by name, and each Adam's moments and count."""
        state = load_file(path)
        ae = {n: state[n] for n in self.vae.state_dict()}
        self.vae.load_state_dict(ae)
        disc = {k.removeprefix("discriminator."): v for k, v in state.items() if k.startswith("discriminator.")}
        missing, unexpected = self.disc.load_state_dict(disc, strict=False)
        assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
        with torch.no_grad():
            self.logvar.copy_(state["loss.logvar"])
        betas = (0.5, 0.9)
        ae_params = [(n, p) for n, p in self.vae.named_parameters()] + [("loss.logvar", self.logvar)]
        disc_params = [("discriminator." + n, p) for n, p in self.disc.named_parameters()]
        self.opt_ae = self.adam(ae_params, self.args.lr, betas, state, "optimizer.")
        self.opt_disc = self.adam(disc_params, self.args.disc_lr, betas, state, "optimizer_disc.")

    @staticmethod
    def adam(named, lr, betas, state, prefix):
        opt = torch.optim.Adam([p for _, p in named], lr=lr, betas=betas, foreach=False)
        step = int(state[prefix + "step"])
        if step > 0:
            for name, p in named:
                opt.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": state[f"{prefix}exp_avg.{name}"].clone(),
                    "exp_avg_sq": state[f"{prefix}exp_avg_sq.{name}"].clone(),
                }
        return opt

    def step(self, step, update):
        """LPIPSWithDiscriminator.forward for both optimizer indices on batch `step`."""
        args = self.args
        x, eps = self.io["x"][step], self.io["eps"][step]
        inputs = x * 2 - 1
        posterior = self.vae.encode(inputs).latent_dist
        reconstructions = self.vae.decode(posterior.mean + posterior.std * eps).sample
        # optimizer_idx 0.
        diff = inputs - reconstructions
        rec_loss = torch.abs(diff) if args.recon == "l1" else diff.square()
        rec_loss = rec_loss + args.perceptual_weight * self.perceptual(inputs, reconstructions)
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posterior.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
        g_loss = -torch.mean(self.disc(reconstructions))
        d_weight = adaptive_weight(nll_loss, g_loss, self.vae.decoder.conv_out.weight, args.disc_weight)
        disc_factor = 1.0 if step >= args.disc_start else 0.0
        loss = nll_loss + args.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        if update:
            self.opt_ae.zero_grad()
            loss.backward()
            self.opt_ae.step()
        # optimizer_idx 1.
        logits_real = self.disc(inputs.detach())
        logits_fake = self.disc(reconstructions.detach())
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        if update:
            self.opt_disc.zero_grad()
            d_loss.backward()
            self.opt_disc.step()
        return {"loss": loss.item(), "d_loss": d_loss.item(), "d_weight": (d_weight * disc_factor).item()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ["ae_dir", "lpips", "io"]:
        p.add_argument(name)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--disc-lr", type=float, required=True)
    p.add_argument("--kl-weight", type=float, required=True)
    p.add_argument("--perceptual-weight", type=float, required=True)
    p.add_argument("--disc-weight", type=float, required=True)
    p.add_argument("--disc-start", type=int, required=True)
    p.add_argument("--disc-loss", choices=["hinge", "vanilla"], default="hinge")
    p.add_argument("--recon", choices=["l1", "l2"], default="l1", help="ldm's is l1")
    args = p.parse_args()
    torch.set_num_threads(1)
    recipe = Recipe(args)
    steps = recipe.io["x"].shape[0]
    for line in sys.stdin:
        path, step = line.split()
        step = int(step)
        recipe.load(path)
        answer = recipe.step(step, update=True)
        if step + 1 < steps:
            answer["next"] = recipe.step(step + 1, update=False)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
