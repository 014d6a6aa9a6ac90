"""Deformable-attention sampling on the CPU: sparse CSR products vs grid_sample.

Times one encoder layer's ``ms_deform_attn`` call (no projections) both ways, alternating the two
implementations round by round so that a machine whose speed drifts (shared hosts) affects both
alike, and checks that they agree. Default shapes: the R50 reference step (256² crop: levels
32², 16², 8²; every location a query; 8 heads of 32 channels; 4 points), batch 2.

Prints ONE JSON line: medians and minima in ms of forward + backward (gradients for values,
locations and weights) and of the no-grad forward, for ``csr`` and ``grid_sample``, and the
largest difference between their outputs and gradients.

    python benchmarks/deform_attn.py
    python benchmarks/deform_attn.py --batch 4 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gdistill.engine.allocator import keep_freed_memory
from gdistill.model.pixel_decoder import ms_deform_attn_csr, ms_deform_attn_grid_sample

PATHS = {"csr": ms_deform_attn_csr, "grid_sample": ms_deform_attn_grid_sample}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256, help="input crop side; levels at strides 8/16/32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--rounds", type=int, default=12, help="alternating rounds")
    p.add_argument("--repeat", type=int, default=5, help="calls timed together in a round")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    shapes = [(args.size // s, args.size // s) for s in (32, 16, 8)]
    num = sum(h * w for h, w in shapes)
    n, m, d, p = args.batch, args.heads, args.head_dim, args.points
    value = torch.randn(n, num, m, d, requires_grad=True)
    # Locations around every query's own position, some outside the maps (zero padding).
    locations = (torch.rand(n, num, m, len(shapes), p, 2) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(n, num, m, len(shapes), p).softmax(-1).requires_grad_()
    grad_out = torch.randn(n, num, m * d)
    inputs = (value, locations, weights)

    def forward_backward(fn):
        return torch.autograd.grad(fn(value, shapes, locations, weights), inputs, grad_out)

    def forward(fn):
        with torch.no_grad():
            return fn(value, shapes, locations, weights)

    results = {f"{name}_{what}": [] for name in PATHS for what in ("fwd_bwd", "fwd")}
    for _ in range(args.rounds):
        for name, fn in PATHS.items():
            for what, run in (("fwd_bwd", forward_backward), ("fwd", forward)):
                run(fn)  # warm
                start = time.perf_counter()
                for _ in range(args.repeat):
                    run(fn)
                results[f"{name}_{what}"].append((time.perf_counter() - start) / args.repeat * 1e3)
    outs = {name: [forward(fn), *forward_backward(fn)] for name, fn in PATHS.items()}
    max_diff = max(
        float((a - b).abs().max()) for a, b in zip(outs["csr"], outs["grid_sample"], strict=True)
    )
    report = {
        **{f"{k}_median_ms": round(statistics.median(v), 2) for k, v in results.items()},
        **{f"{k}_min_ms": round(min(v), 2) for k, v in results.items()},
        "max_abs_difference": max_diff,
        "config": vars(args),
        "torch": torch.__version__,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
