"""Hungarian matching of predicted queries to targets on point-sampled mask costs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from gdistill.model.point_sampling import point_sample_shared


def pairwise_sigmoid_bce(inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE over points for every (prediction, target) pair.

    inputs: logits [N, P]; targets: values in [0, 1], [M, P]. Returns [N, M].
    BCE(x, t) = t·softplus(-x) + (1 - t)·softplus(x) = softplus(x) - t·x, so the sum over points
    is a row sum of softplus(x) minus one matrix product (softplus dominates the cost on CPU).
    """
    cost = F.softplus(inputs).sum(-1, keepdim=True) - torch.einsum("np,mp->nm", inputs, targets)
    return cost / inputs.shape[1]


def pairwise_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """Dice cost ``1 - (2·Σpt + 1) / (Σp + Σt + 1)``, p = sigmoid(inputs), for every pair.

    inputs: logits [N, P]; targets: [M, P]. Returns [N, M].
    """
    probs = inputs.sigmoid()
    numerator = 2 * torch.einsum("np,mp->nm", probs, targets)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def match_costs(
    pred_logits: Tensor,
    pred_masks: Tensor,
    tgt_labels: Tensor,
    tgt_masks: Tensor,
    coords: Tensor,
    cost_class: float = 2.0,
    cost_mask: float = 5.0,
    cost_dice: float = 5.0,
) -> Tensor:
    """Matching cost of one image, in fp32.

    pred_logits [Q, K+1]; pred_masks [Q, H, W] (logits); tgt_labels int64 [M];
    tgt_masks [M, h, w] (any resolution, bool or float); coords [P, 2] in [0, 1] (x, y), shared
    by all predictions and targets. Returns cost [Q, M].
    """
    probs = pred_logits.float().softmax(-1)
    c_class = -probs[:, tgt_labels]
    coords = coords.float()  # one set of points for all predictions and targets
    pred_points = point_sample_shared(pred_masks.float(), coords)  # [Q, P]
    tgt_points = point_sample_shared(tgt_masks.to(torch.float32), coords)  # [M, P]
    c_mask = pairwise_sigmoid_bce(pred_points, tgt_points)
    c_dice = pairwise_dice(pred_points, tgt_points)
    return cost_class * c_class + cost_mask * c_mask + cost_dice * c_dice


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising class + mask BCE + dice cost.

    Mask costs use ``num_points`` uniform random points per image (global RNG), shared by all
    predictions and targets of that image.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """outputs: ``pred_logits`` [B, Q, K+1], ``pred_masks`` [B, Q, H, W]; targets: per image
        ``labels`` int64 [M], ``masks`` [M, h, w]. Returns per image (pred_idx int64 [m],
        tgt_idx int64 [m]) with m = min(Q, M), on the CPU."""
        device = outputs["pred_masks"].device
        coords = [torch.rand(self.num_points, 2, device=device) for _ in targets]
        return self.match(outputs, targets, coords)

    @torch.no_grad()
    def match(
        self, outputs: dict, targets: list[dict], coords: list[Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        """Like :meth:`forward` with given point coords per image ([P, 2] in [0, 1])."""
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        costs = []
        with torch.autocast(device_type=pred_masks.device.type, enabled=False):
            for b, target in enumerate(targets):
                if len(target["labels"]) == 0:
                    costs.append(None)
                    continue
                costs.append(
                    match_costs(
                        pred_logits[b], pred_masks[b], target["labels"], target["masks"],
                        coords[b], self.cost_class, self.cost_mask, self.cost_dice,
                    )
                )
        # One device → host copy for the whole batch.
        flat = [c.flatten() for c in costs if c is not None]
        host = torch.cat(flat).cpu().split([f.numel() for f in flat]) if flat else []
        indices, k = [], 0
        empty = torch.empty(0, dtype=torch.int64)
        for cost in costs:
            if cost is None:
                indices.append((empty, empty))
                continue
            # Non-finite outputs (e.g. an fp16 overflow) must reach the trainer's loss guard
            # rather than stop scipy.
            matrix = torch.nan_to_num(host[k].view(cost.shape), nan=1e8, posinf=1e8, neginf=-1e8)
            rows, cols = linear_sum_assignment(matrix.numpy())
            k += 1
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(cols, dtype=torch.int64)))
        return indices
