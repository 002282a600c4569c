#!/usr/bin/env python3
"""The vae architecture as a torch.nn.Module, built from a checkpoint's own config metadata.

    from pytorch_model import load_checkpoint
    model, config = load_checkpoint("checkpoints/shapes-1/last.safetensors")
    posterior_mean, logvar = model.encode(images)          # images: [N, C, H, W] in [0, 1]

Run as a script it evaluates the loss on a batch file holding `x` (and optionally `eps`, the
reparameterization noise) and prints it as JSON:

    .venv/bin/python scripts/pytorch_model.py CKPT --batch batch.safetensors
"""
import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file


class Encoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        chans = [model["in_channels"]] + model["channels"]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in zip(chans, chans[1:]))
        side = model["image_size"] >> len(model["channels"])
        self.fc = nn.Linear(chans[-1] * side * side, model["hidden"])
        self.head = nn.Linear(model["hidden"], 2 * model["latent_dim"])

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        mean, logvar = self.head(F.relu(self.fc(x.flatten(1)))).chunk(2, dim=-1)
        return mean, logvar


class Decoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.side = model["image_size"] >> len(model["channels"])
        self.top = model["channels"][-1]
        self.fc = nn.Linear(model["latent_dim"], model["hidden"])
        self.proj = nn.Linear(model["hidden"], self.top * self.side * self.side)
        chans = model["channels"][::-1] + [model["in_channels"]]
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(a, b, 4, stride=2, padding=1) for a, b in zip(chans, chans[1:])
        )

    def forward(self, z):
        x = F.relu(self.proj(F.relu(self.fc(z)))).view(-1, self.top, self.side, self.side)
        for i, deconv in enumerate(self.deconvs):
            x = deconv(x)
            if i + 1 < len(self.deconvs):
                x = F.relu(x)
        return x


class Vae(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.likelihood = model["likelihood"]
        self.encoder = Encoder(model)
        self.decoder = Decoder(model)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def loss(self, x, eps, beta=1.0):
        """Batch means of (reconstruction + beta * kl, reconstruction, kl), in nats."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(logvar / 2) * eps
        params = self.decode(z)
        if self.likelihood == "bernoulli":
            per_pixel = F.binary_cross_entropy_with_logits(params, x, reduction="none")
        else:
            per_pixel = (params - x) ** 2
        recon = per_pixel.flatten(1).sum(-1)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(-1)
        return (recon + beta * kl).mean(), recon.mean(), kl.mean()


def load_checkpoint(path):
    """The model with the checkpoint's weights (strict), and the checkpoint's training config."""
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "vae-checkpoint":
        raise ValueError(f"{path}: not a vae checkpoint")
    config = json.loads(meta["config"])
    model = Vae(config["model"])
    # The trained weights: the optimizer's state and the moving average (ema.) left out.
    weights = {k: v for k, v in load_file(path).items() if not k.startswith(("optimizer.", "ema."))}
    model.load_state_dict(weights, strict=True)
    return model.eval(), config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", required=True, help="safetensors file with x [N,C,H,W] and optional eps")
    args = parser.parse_args()
    model, config = load_checkpoint(args.checkpoint)
    batch = load_file(args.batch)
    x = batch["x"]
    eps = batch.get("eps", torch.zeros(x.shape[0], config["model"]["latent_dim"]))
    with torch.no_grad():
        loss, recon, kl = model.loss(x, eps, config["beta"])
    print(json.dumps({"loss": loss.item(), "reconstruction": recon.item(), "kl": kl.item()}))


if __name__ == "__main__":
    main()
