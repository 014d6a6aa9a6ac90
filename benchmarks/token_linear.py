"""The pixel decoder's linears on the CPU: oneDNN (1x1 convolution, channels-last) vs F.linear.

Times, for both routes of ``gdistill.model.token_linear`` (``onednn``: the convolution route,
``blas``: ``F.linear``, i.e. MKL's sgemm in PyTorch's x86 builds), alternating round by round so
that a drifting machine affects both alike:

- each distinct linear of one deformable encoder layer alone (value / output projections,
  sampling offsets, attention weights, the two FFN layers), forward + backward, in GFLOP/s;
- the whole encoder layer (deformable attention included), forward + backward and no-grad forward;
- the decoder's cross-attention of the queries over the stride-8 level (``TokenAttention``: its
  projections, the key and value ones over the memory tokens), forward + backward;
- the decoder's FFN over batch x queries tokens, forward + backward.

Default shapes: the R50 reference step's student (256² crop, 2 labelled + 2 unlabelled images:
4 × 1344 tokens of 256 channels, FFN 1024, 8 heads, 4 points, 100 queries, decoder FFN 2048).
``--size 160 --batch 16 --dim 128 --ffn 512 --heads 4 --queries 32 --dec-ffn 512`` gives the demo
preset's student in stage B.

Prints ONE JSON line with medians in ms (and GFLOP/s for the single linears), the largest
difference between the two routes' layer outputs and gradients, and the CPU's vendor string.

    python benchmarks/token_linear.py
    python benchmarks/token_linear.py --size 160 --batch 16 --dim 128 --ffn 512 --heads 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gdistill.engine.allocator import keep_freed_memory
from gdistill.model import token_linear
from gdistill.model.decoder import TokenAttention
from gdistill.model.pixel_decoder import DeformableEncoderLayer, _reference_points

ROUTES = ("onednn", "blas")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256, help="input crop side; levels at strides 8/16/32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--dec-ffn", type=int, default=2048, help="decoder FFN width")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    p.add_argument("--repeat", type=int, default=5, help="calls timed together in a round")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("vendor_id", "model name")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def timed(fn, rounds: int, repeat: int) -> dict[str, list[float]]:
    """{route: [ms per call, one per round]}, the routes alternating within each round."""
    times: dict[str, list[float]] = {route: [] for route in ROUTES}
    for _ in range(rounds):
        for route in ROUTES:
            token_linear.ONEDNN_LINEAR = route == "onednn"
            fn()  # warm
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[route].append((time.perf_counter() - start) / repeat * 1e3)
    return times


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    shapes = [(args.size // s, args.size // s) for s in (32, 16, 8)]
    tokens = sum(h * w for h, w in shapes)
    layer = DeformableEncoderLayer(args.dim, args.ffn, len(shapes), args.heads, args.points)
    src = torch.randn(args.batch, tokens, args.dim, requires_grad=True)
    pos = torch.randn(args.batch, tokens, args.dim)
    ref = _reference_points(shapes, len(shapes), src.device)
    grad_out = torch.randn_like(src)
    report: dict = {}

    rows = args.batch * tokens
    for name, module in (
        ("value_proj", layer.self_attn.value_proj),
        ("sampling_offsets", layer.self_attn.sampling_offsets),
        ("attention_weights", layer.self_attn.attention_weights),
        ("linear1", layer.linear1),
        ("linear2", layer.linear2),
    ):
        x = torch.randn(args.batch, tokens, module.in_features, requires_grad=True)
        g = torch.randn(args.batch, tokens, module.out_features)
        params = (x, module.weight, module.bias)
        times = timed(lambda m=module, x=x, g=g, p=params: torch.autograd.grad(m(x), p, g),
                      args.rounds, args.repeat)
        flop = 3 * 2 * rows * module.in_features * module.out_features  # forward + 2 backward
        for route, values in times.items():
            ms = statistics.median(values)
            report[f"{name}_{route}_fwd_bwd_ms"] = round(ms, 2)
            report[f"{name}_{route}_gflops"] = round(flop / ms / 1e6, 1)

    params = (src, *layer.parameters())

    def layer_fwd_bwd():
        return torch.autograd.grad(layer(src, pos, ref, shapes), params, grad_out)

    def layer_fwd():
        with torch.no_grad():
            return layer(src, pos, ref, shapes)

    for what, fn in (("fwd_bwd", layer_fwd_bwd), ("fwd", layer_fwd)):
        for route, values in timed(fn, args.rounds, args.repeat).items():
            report[f"layer_{route}_{what}_median_ms"] = round(statistics.median(values), 2)
            report[f"layer_{route}_{what}_min_ms"] = round(min(values), 2)

    attn = TokenAttention(args.dim, args.heads, dropout=0.0, batch_first=True)
    side = args.size // 8
    memory = torch.randn(args.batch, side * side, args.dim, requires_grad=True)
    query = torch.randn(args.batch, args.queries, args.dim, requires_grad=True)
    mask = torch.rand(args.batch * args.heads, args.queries, side * side) < 0.5
    mask[..., 0] = False  # every query attends somewhere, as in the decoder
    attn_inputs = (query, memory, *attn.parameters())
    attn_grad = torch.randn(args.batch, args.queries, args.dim)
    times = timed(lambda: torch.autograd.grad(attn(query, memory, memory, mask), attn_inputs, attn_grad),
                  args.rounds, args.repeat)
    for route, values in times.items():
        report[f"cross_attention_{route}_fwd_bwd_ms"] = round(statistics.median(values), 2)

    ffn = torch.nn.Sequential(
        token_linear.TokenLinear(args.dim, args.dec_ffn), torch.nn.ReLU(),
        token_linear.TokenLinear(args.dec_ffn, args.dim),
    )
    tgt = torch.randn(args.batch, args.queries, args.dim, requires_grad=True)
    ffn_inputs = (tgt, *ffn.parameters())
    times = timed(lambda: torch.autograd.grad(ffn(tgt), ffn_inputs, torch.ones_like(tgt)),
                  args.rounds, args.repeat)
    for route, values in times.items():
        report[f"decoder_ffn_{route}_fwd_bwd_ms"] = round(statistics.median(values), 2)

    outs = {}
    for route in ROUTES:
        token_linear.ONEDNN_LINEAR = route == "onednn"
        outs[route] = [layer_fwd(), *layer_fwd_bwd()]
    report["max_abs_difference"] = max(
        float((a - b).abs().max()) for a, b in zip(outs["onednn"], outs["blas"], strict=True)
    )
    report.update(config=vars(args), tokens=rows, cpu=cpu_vendor(), torch=torch.__version__,
                  auto_route=token_linear._route_for_this_machine())
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
