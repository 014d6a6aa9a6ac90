"""AdamW with Mask2Former's parameter groups, and the warm-up + step / poly LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm2d,
    nn.LocalResponseNorm,
)


# Parameter names that builds before the fifteenth session also kept from weight decay: runs they
# saved resume with the parameter groups of their optimizer state.
LEGACY_NO_DECAY = ("pos_embed", "cls_token", "reg_token", "level_embed")


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float,
    extra_no_decay: tuple[str, ...] = (),
) -> torch.optim.AdamW:
    """Backbone parameters get ``lr · backbone_lr_mult``; norm layers, ``nn.Embedding`` tables
    (queries, the decoder's level embedding) and Swin's position tables get no weight decay
    (Mask2Former's WEIGHT_DECAY_NORM / _EMBED = 0). Bare parameters are decayed as there: the pixel
    decoder's ``level_embed``, a ViT's ``pos_embed`` and ``cls_token``; ``extra_no_decay`` names
    more parameters to leave undecayed."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_backbone = module_name.startswith("backbone") or ".backbone" in module_name
            no_decay = (
                isinstance(module, (*_NORM_TYPES, nn.Embedding))
                or "relative_position_bias_table" in name
                or "absolute_pos_embed" in name
                or name in extra_no_decay
                or "norm" in type(module).__name__.lower()
                and param.ndim == 1
            )
            key = (lr * (backbone_lr_mult if is_backbone else 1.0), 0.0 if no_decay else weight_decay)
            groups.setdefault(key, []).append(param)
    param_groups = [{"params": p, "lr": k[0], "weight_decay": k[1]} for k, p in sorted(groups.items())]
    device = next((p.device for group in param_groups for p in group["params"]), torch.device("cpu"))
    if _fused_adamw_steps_on(device):
        try:
            # One fused kernel per parameter group instead of ~10 ops per tensor: 3x faster on
            # CPU, same update up to float rounding.
            return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # parameters of a dtype it does not take
            pass
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)


def _fused_adamw_steps_on(device: torch.device) -> bool:
    """Whether fused AdamW runs a step on ``device``: before torch 2.4 the CPU one is built
    without complaint and fails at its first step."""
    param = torch.zeros(1, device=device, requires_grad=True)
    param.grad = torch.zeros(1, device=device)
    try:
        torch.optim.AdamW([param], fused=True).step()
    except (RuntimeError, TypeError, ValueError):  # torch < 2.4 raises a RuntimeError subclass
        return False
    return True


def lr_factor(
    step: int,
    max_iters: int,
    schedule: str,
    steps: tuple[int, ...],
    gamma: float,
    poly_power: float,
    warmup_iters: int,
    warmup_factor: float,
) -> float:
    """Multiplier of the base LR at ``step`` (detectron2's WarmupMultiStepLR / WarmupPolyLR)."""
    if schedule == "poly":
        factor = (1.0 - step / max_iters) ** poly_power if step < max_iters else 0.0
    else:
        factor = gamma ** sum(1 for s in steps if s <= step)
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, solver) -> torch.optim.lr_scheduler.LambdaLR:
    """From a :class:`gdistill.config.SolverConfig`. Step it once per iteration."""
    steps = tuple(solver.lr_steps)

    def factor(step: int) -> float:
        return lr_factor(
            step,
            solver.max_iters,
            solver.lr_schedule,
            steps,
            solver.lr_gamma,
            solver.poly_power,
            solver.warmup_iters,
            solver.warmup_factor,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scaled_steps(max_iters: int, fractions: tuple[float, ...] = (0.889, 0.963)) -> tuple[int, ...]:
    """Step milestones at the paper's relative positions (327,778 / 355,092 of 368,750)."""
    return tuple(int(math.floor(f * max_iters)) for f in fractions)
