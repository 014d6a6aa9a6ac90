"""``nn.Linear`` over many tokens, through oneDNN on CPUs where the BLAS is slow at it.

PyTorch's x86 CPU builds compute ``F.linear`` with MKL's sgemm. On AMD processors MKL runs a
generic code path: 155-180 GFLOP/s on 2 cores of an AMD EPYC with AVX-512, where oneDNN runs the
same product, written as a 1x1 convolution over a channels-last view of the tokens, at 230-390
GFLOP/s (``benchmarks/token_linear.py``; BENCHMARKS.md). The pixel decoder's encoder is made of
such products (every location of three feature levels is a token), and so are the decoder's
projections and FFNs (batch x queries tokens). Their linears are ``TokenLinear``: an
``nn.Linear`` with the same parameters and state dict, whose forward takes the convolution route
on such CPUs for products of at least ``MIN_MACS`` multiply-adds, and ``F.linear`` everywhere else
(CUDA, Intel CPUs, AMD CPUs without AVX-512 — where MKL is the faster of the two —, non-x86
builds, smaller products, other dtypes, tracing, ONNX export).
Results equal ``F.linear``'s up to float32 rounding; the same inputs give the same bits.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Below this many multiply-adds (rows x C_in x C_out) oneDNN's set-up cost outweighs its faster
# kernel. Measured forward + backward: 256 x 128 x 128 (4.2e6) 0.71x, 512 x 128 x 128 (8.4e6)
# 0.92x, 800 x 128 x 128 (1.3e7) 1.15x, 400 x 256 x 256 (2.6e7) 1.22x, 400 x 256 x 2048 1.69x.
MIN_MACS = 10_000_000


def onednn_pays_off(amd: bool, cpu_capability: str) -> bool:
    """Whether oneDNN's 1x1 convolution beats MKL's sgemm for token linears on this CPU kind.

    Measured (forward + backward, 2 threads): on an AMD EPYC with AVX-512, oneDNN 230-390 GFLOP/s
    against MKL's 150-180; on an AVX2-only AMD EPYC (Zen 3), oneDNN 55-65 against MKL's 75-95,
    so the route is only taken where ATen dispatches AVX-512 kernels. Intel CPUs keep MKL.
    """
    return amd and cpu_capability.upper().startswith("AVX512")


@functools.cache
def _route_for_this_machine() -> bool:
    """True on x86 AMD processors with AVX-512 and a PyTorch that has both MKL and oneDNN."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            amd = "AuthenticAMD" in f.read(4096)  # the first processor's vendor_id
    except OSError:
        return False
    return onednn_pays_off(amd, torch.backends.cpu.get_cpu_capability())


# Module-level switch: benchmarks and tests set it to compare or exercise both routes.
ONEDNN_LINEAR = _route_for_this_machine()


def onednn_route(x: Tensor, weight: Tensor) -> bool:
    """Whether ``token_linear(x, weight, ...)`` goes through oneDNN."""
    if not ONEDNN_LINEAR or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() >= 2
        and x.numel() * weight.shape[0] >= MIN_MACS  # rows x C_in x C_out
    )


def token_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)``: x [..., C_in], weight [C_out, C_in] -> [..., C_out].

    On the oneDNN route the result is a view of the convolution's output. Apply activations to it
    out of place: autograd handles an in-place op on a view by copying and zero-filling the whole
    tensor in backward (an R50 encoder FFN, forward + backward, with glibc's default malloc: 91 ->
    70 ms out of place; equal with the trainer's, ``gdistill.engine.allocator``).
    """
    if not onednn_route(x, weight):
        return F.linear(x, weight, bias)
    c_in, c_out = x.shape[-1], weight.shape[0]
    # [rows, C_in] as a [1, C_in, rows, 1] image in channels-last layout: a view, no copy; the
    # convolution's output comes back channels-last, i.e. as contiguous [rows, C_out].
    image = x.reshape(1, -1, 1, c_in).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], c_out)


class TokenLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`token_linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return token_linear(x, self.weight, self.bias)
