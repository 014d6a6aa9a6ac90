"""Point sampling in normalised coordinates (PointRend style), shared by matcher and criterion.

Coordinates are ``(x, y)`` in ``[0, 1]`` relative to the whole map, so maps of different
resolutions (predictions at stride 4, ground truth at full resolution) are sampled at the same
physical locations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(input: Tensor, coords: Tensor, align_corners: bool = False) -> Tensor:
    """Bilinearly sample ``input`` at ``coords``.

    input: [N, C, H, W] or [N, H, W] (float); coords: [N, P, 2], (x, y) in [0, 1].
    Returns [N, C, P], or [N, P] for a 3-d input. Points outside the map read zeros.
    """
    squeeze = input.dim() == 3
    if squeeze:
        input = input.unsqueeze(1)
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(input.dtype)  # [N, P, 1, 2]
    out = F.grid_sample(input, grid, mode="bilinear", align_corners=align_corners).squeeze(3)
    return out.squeeze(1) if squeeze else out


def point_sample_shared(input: Tensor, coords: Tensor, align_corners: bool = False) -> Tensor:
    """Sample every map of ``input`` at the same points: input [N, H, W], coords [P, 2] (x, y) in
    [0, 1]. Returns [N, P]; equal to ``point_sample(input[None], coords[None])[0]``.

    The maps are laid out as a batch (not as channels of one image) with one grid expanded over
    it (no copy): the CPU grid_sample kernel parallelises over the batch only.
    """
    grid = (2.0 * coords - 1.0).to(input.dtype).view(1, -1, 1, 2)
    grid = grid.expand(input.shape[0], -1, -1, -1)  # [N, P, 1, 2]
    out = F.grid_sample(input.unsqueeze(1), grid, mode="bilinear", align_corners=align_corners)
    return out.view(input.shape[0], -1)


@torch.no_grad()
def sample_uncertain_points(
    logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """Pick points where the logits are most uncertain (closest to 0), plus uniform ones.

    logits: [N, 1, H, W]. Draws ``oversample_ratio * num_points`` uniform points, keeps the
    ``importance_sample_ratio * num_points`` with the largest uncertainty ``-|logit|`` and adds
    uniform random points up to ``num_points``. Uses the global RNG (``torch.manual_seed``).
    Returns coords [N, num_points, 2] in [0, 1].
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"need oversample_ratio >= 1 and importance_sample_ratio in [0, 1], got "
            f"{oversample_ratio} and {importance_sample_ratio}"
        )
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    coords = torch.rand(n, num_sampled, 2, device=logits.device)
    uncertainty = -point_sample(logits.float(), coords)[:, 0].abs()  # [N, S]
    idx = uncertainty.topk(num_uncertain, dim=1, sorted=False).indices  # [N, k]
    chosen = torch.gather(coords, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        chosen = torch.cat([chosen, torch.rand(n, num_random, 2, device=logits.device)], dim=1)
    return chosen
