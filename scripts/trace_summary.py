#!/usr/bin/env python3
"""Where a step's time goes, from Chrome traces of libtorch's profiler, side by side.

`vae bench --trace FILE` and the PyTorch references' `--trace FILE` (torch.profiler) record
the same kind of trace: Kineto's. This tabulates each per step: on CUDA the device time of
every kernel and copy (and how busy the device was, and how many kernels the host launched);
on the CPU the self time of every operator (its time less that of the operators it called).
Kernels and operators fall into categories (convolution, normalisation, ...), so two
implementations of the same model can be compared where their time differs; last come the
operators the traces call most differently often (work one of them repeats).

    scripts/trace_summary.py --steps 5 vae=vae.json pytorch=pytorch.json

Python's standard library alone: the GPU machines' Python has no numpy.
"""
import argparse
import json
import re
from collections import defaultdict

# First match wins; patterns see the lower-cased kernel or operator name.
CATEGORIES = [
    ("attention", r"attention|flash|fmha|softmax"),
    ("optimizer", r"adam|multi_tensor_apply|_foreach"),
    ("normalisation", r"group_?norm|batch_?norm|layer_?norm|moments|fusedparams|internalgradients|gammabeta"),
    ("layout copies", r"nchwtonhwc|nhwctonchw|transpose|permute"),
    ("convolution", r"conv|implicit_gemm|cudnn|wgrad|dgrad|fprop"),
    ("matmul", r"gemm|xmma|cutlass|cublas|addmm|::mm\b|bmm|matmul|linear"),
    ("copies and fills", r"memcpy|memset|copy|fill|zero|::cat\b|catarray"),
    ("reductions", r"reduce|sum|mean|norm"),
]
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def category(name):
    lower = name.lower()
    return next((c for c, pattern in CATEGORIES if re.search(pattern, lower)), "elementwise and other")


def short(name, width=72):
    """A kernel's name without its argument list, `void` and the usual namespaces."""
    depth, end = 0, len(name)
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            end = i
            break
    name = name[:end].removeprefix("void ")
    for prefix in ("at::native::", "(anonymous namespace)::", "at::", "c10::"):
        name = name.replace(prefix, "")
    return name if len(name) <= width else name[: width - 3] + "..."


def self_times(events):
    """Each host operator's time less its children's (operators nest on a thread)."""
    by_thread = defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    totals = defaultdict(float)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [end, name, children's time]
        for e in thread:
            while stack and stack[-1][0] <= e["ts"]:
                end, name, children = stack.pop()
                totals[name] -= children
            if stack:
                stack[-1][2] += e["dur"]
            totals[e["name"]] += e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], 0.0])
        for _, name, children in stack:
            totals[name] -= children
    return totals


def union_length(intervals):
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarise(path):
    """Microseconds in the whole trace: per kernel on the device (CUDA traces) and per host
    operator (self time), the device's busy time, the traced window, the kernels launched."""
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    host = [e for e in events if e.get("cat") == "cpu_op"]
    if not host and not device:
        raise SystemExit(f"{path}: no operators or kernels in the trace")
    kernels = defaultdict(float)
    for e in device:
        kernels[short(e["name"])] += e["dur"]
    launches = sum(1 for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "Launch" in e["name"])
    calls = defaultdict(int)
    for e in host:
        calls[e["name"]] += 1
    return {"device": dict(kernels), "host": dict(self_times(host)), "launches": launches, "calls": dict(calls),
            "busy": union_length((e["ts"], e["ts"] + e["dur"]) for e in device),
            "window": max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)}


def table(summaries, steps, top=15):
    """The side-by-side table: a column per trace, in milliseconds (or counts) per step. CUDA
    traces list kernels first, then the host's operators (what launches them)."""
    width = max(12, *(len(label) + 2 for label in summaries))
    per = lambda us: us / 1e3 / steps  # noqa: E731
    lines = ["".join(f"{label:>{width}}" for label in summaries) + "   per step"]

    def row(title, values, fmt="{:.2f} ms"):
        lines.append("".join(f"{fmt.format(v) if v is not None else '-':>{width}}" for v in values) + "   " + title)

    traces = list(summaries.values())
    on_device = all(s["device"] for s in traces)
    host_ops = [sum(s["host"].values()) for s in traces]
    row("traced window", [per(s["window"]) for s in traces])
    if on_device:
        row("device busy (kernels and copies)", [per(s["busy"]) for s in traces])
        row("kernels launched", [s["launches"] / steps for s in traces], "{:.0f}")
        row("host: operators' self time", [per(us) for us in host_ops])
        sections = [("kernel time on the device", "device", top), ("host: operators' self time", "host", top // 2)]
    else:
        row("operators' self time", [per(us) for us in host_ops])
        row("outside any operator (code of one's own)", [per(s["window"] - us) for s, us in zip(traces, host_ops)])
        sections = [("operators' self time", "host", top)]
    for title, key, count in sections:
        lines.append(f"\n{title}, by category:")
        cats = defaultdict(lambda: [0.0] * len(traces))
        for i, s in enumerate(traces):
            for name, us in s[key].items():
                cats[category(name)][i] += us
        for cat, values in sorted(cats.items(), key=lambda kv: -max(kv[1])):
            row(cat, [per(v) for v in values])
        lines.append(f"\nthe {count} largest, by name:")
        names = set().union(*(s[key] for s in traces))
        ranked = sorted(names, key=lambda n: -max(s[key].get(n, 0.0) for s in traces))
        for name in ranked[:count]:
            row(name, [per(s[key][name]) if name in s[key] else None for s in traces])
    # The same model should call the same operators: a count that differs shows work one side
    # repeats (in the GAN step, a VGG16 run in four chunks launched its kernels four times).
    names = set().union(*(s["calls"] for s in traces))
    spread = {n: max(s["calls"].get(n, 0) for s in traces) - min(s["calls"].get(n, 0) for s in traces) for n in names}
    differing = sorted((n for n in names if spread[n]), key=lambda n: (-spread[n], n))[: top // 2]
    if len(traces) > 1 and differing:
        lines.append(f"\nthe {len(differing)} operators called most differently often:")
        for name in differing:
            row(name, [s["calls"].get(name, 0) / steps for s in traces], "{:.0f}")
    return "\n".join(lines)


def record(path, cuda, run):
    """torch.profiler over `run()`, saved as `vae bench --trace` saves ours (the references'
    --trace): the same engine, activities and format."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        run()
        if cuda:
            torch.cuda.synchronize()
    profiler.export_chrome_trace(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+", metavar="LABEL=FILE", help="a trace and its column's title")
    p.add_argument("--steps", type=int, default=1, help="steps each trace holds (figures are per step)")
    p.add_argument("--top", type=int, default=15, help="how many kernels or operators to list by name")
    args = p.parse_args()
    summaries = {}
    for arg in args.traces:
        label, sep, path = arg.partition("=")
        if not sep:
            p.error(f"{arg}: expected LABEL=FILE")
        summaries[label] = summarise(path)
    print(table(summaries, args.steps, args.top))


if __name__ == "__main__":
    main()
