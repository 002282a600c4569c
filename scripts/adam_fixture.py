#!/usr/bin/env python3
"""Writes tests/fixtures/adam.json: torch.optim.Adam's trajectory on fixed parameters and
gradients, which tests/adam.rs replays through our tensor Adam.

Run: .venv/bin/python scripts/adam_fixture.py
"""
import json
import pathlib

import torch

STEPS = 6


def case(lr, betas, eps, weight_decay, seed):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g),
    }
    grads = [{k: torch.randn(v.shape, generator=g) * 0.1 for k, v in params.items()} for _ in range(STEPS)]
    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Adam(tensors.values(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    for step in grads:
        for k, p in tensors.items():
            p.grad = step[k].clone()
        opt.step()
    flat = lambda t: [float(x) for x in t.detach().flatten()]
    return {
        "config": {"lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": weight_decay},
        "params": {k: {"shape": list(v.shape), "data": flat(v)} for k, v in params.items()},
        "grads": [{k: flat(v) for k, v in step.items()} for step in grads],
        "expected": {k: flat(p) for k, p in tensors.items()},
        "expected_exp_avg": {k: flat(opt.state[p]["exp_avg"]) for k, p in tensors.items()},
        "expected_exp_avg_sq": {k: flat(opt.state[p]["exp_avg_sq"]) for k, p in tensors.items()},
        "expected_step": int(opt.state[tensors["w"]]["step"]),
    }


def main():
    cases = [
        case(1e-2, (0.9, 0.999), 1e-8, 0.0, seed=0),
        case(3e-3, (0.5, 0.9), 1e-6, 0.1, seed=1),
    ]
    out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "adam.json"
    out.write_text(json.dumps({"torch_version": torch.__version__, "cases": cases}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
