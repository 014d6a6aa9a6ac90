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
    """
    student = unwrap(student)
    student_params = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        s = student_params[name].detach()
        if decay == 0.0:
            t.copy_(s)
        else:
            t.lerp_(s, 1.0 - decay)
    student_buffers = dict(student.named_buffers())
    for name, t in teacher.named_buffers():
        s = student_buffers[name]
        if decay == 0.0 or not t.is_floating_point():
            t.copy_(s)
        else:
            t.lerp_(s.to(t.dtype), 1.0 - decay)
