"""Exponential moving average of the student into the teacher."""

from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, or the model itself."""
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay · teacher + (1 − decay) · student, for parameters and floating-point buffers.

    decay 0 copies the student (the hand-over at the end of burn-in). Integer buffers (BN's
    ``num_batches_tracked``) are copied. Runs under ``no_grad``: nothing enters the autograd graph.
    The blend is one multi-tensor ``lerp`` over all tensors (same arithmetic as per-tensor lerp_).

    Tensors are paired by name whether each side holds a parameter or a buffer: a stage-B run with
    ``model.frozen_bn`` other than its stage-A teacher's has BatchNorm affines as buffers on one
    side (FrozenBatchNorm2d) and parameters on the other.
    """
    student = unwrap(student)
    student_tensors = {**dict(student.named_parameters()), **dict(student.named_buffers())}
    blend_t, blend_s, copy_t, copy_s = [], [], [], []
    for name, t in [*teacher.named_parameters(), *teacher.named_buffers()]:
        s = student_tensors[name].detach()
        if t.is_floating_point():
            blend_t.append(t)
            blend_s.append(s.to(dtype=t.dtype, device=t.device))
        else:
            copy_t.append(t)
            copy_s.append(s)
    if decay == 0.0:
        copy_t, copy_s = blend_t + copy_t, blend_s + copy_s
    elif blend_t:
        torch._foreach_lerp_(blend_t, blend_s, 1.0 - decay)
    for t, s in zip(copy_t, copy_s, strict=True):
        t.copy_(s)
