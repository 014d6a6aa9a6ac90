"""Mask2Former set criterion: CE with no-object weight, BCE + dice on uncertain points."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gdistill.model.point_sampling import point_sample, sample_uncertain_points

__all__ = ["SetCriterion", "point_sample", "sample_uncertain_points"]


def _num_masks(targets: list[dict], device: torch.device) -> float:
    """Total target count, averaged over processes when distributed, clamped >= 1."""
    count = float(sum(len(t["labels"]) for t in targets))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = torch.tensor([count], dtype=torch.float32, device=device)
        dist.all_reduce(total)
        count = total.item() / dist.get_world_size()
    return max(count, 1.0)


class SetCriterion(nn.Module):
    """Hungarian-matched set loss over the final and every auxiliary prediction set.

    Returns already-weighted losses ``loss_ce``, ``loss_mask``, ``loss_dice`` (final set) and
    ``loss_ce_{i}``, ``loss_mask_{i}``, ``loss_dice_{i}`` (aux set i); total = sum of values.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        no_object_weight: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """outputs: ``pred_logits`` [B, Q, K+1], ``pred_masks`` [B, Q, H, W], optional
        ``aux_outputs`` (list of such dicts); targets: per image ``labels`` int64 [M] and
        ``masks`` bool/float [M, h, w] (any resolution)."""
        device = outputs["pred_logits"].device
        num_masks = _num_masks(targets, device)
        # Move and convert the targets once for all prediction sets.
        targets = [
            {
                "labels": t["labels"].to(device=device, dtype=torch.int64),
                "masks": t["masks"].to(device=device, dtype=torch.float32),
            }
            for t in targets
        ]
        losses = self._set_losses(outputs, targets, num_masks, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._set_losses(aux, targets, num_masks, f"_{i}"))
        return losses

    def _set_losses(
        self, outputs: dict, targets: list[dict], num_masks: float, suffix: str
    ) -> dict[str, Tensor]:
        device = outputs["pred_logits"].device
        indices = [(src.to(device), tgt.to(device)) for src, tgt in self.matcher(outputs, targets)]
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        loss_ce = self._loss_labels(outputs["pred_logits"], targets, indices, batch_idx, src_idx)
        loss_mask, loss_dice = self._loss_masks(
            outputs["pred_masks"], targets, indices, batch_idx, src_idx, num_masks
        )
        return {
            f"loss_ce{suffix}": self.class_weight * loss_ce,
            f"loss_mask{suffix}": self.mask_weight * loss_mask,
            f"loss_dice{suffix}": self.dice_weight * loss_dice,
        }

    def _loss_labels(
        self, logits: Tensor, targets: list[dict], indices, batch_idx: Tensor, src_idx: Tensor
    ) -> Tensor:
        """Weighted-mean CE over all B·Q queries; unmatched queries target no-object (K)."""
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        matched = [t["labels"][tgt] for t, (_, tgt) in zip(targets, indices, strict=True)]
        target_classes[batch_idx, src_idx] = torch.cat(matched)
        return F.cross_entropy(
            logits.flatten(0, 1).float(), target_classes.flatten(), self.empty_weight
        )

    def _loss_masks(
        self,
        pred_masks: Tensor,
        targets: list[dict],
        indices,
        batch_idx: Tensor,
        src_idx: Tensor,
        num_masks: float,
    ) -> tuple[Tensor, Tensor]:
        """Sigmoid BCE and dice on uncertain points of the matched masks, / num_masks."""
        if src_idx.numel() == 0:
            zero = pred_masks.sum() * 0.0  # keeps pred_masks in the graph
            return zero, zero
        src = pred_masks[batch_idx, src_idx].unsqueeze(1)  # [N, 1, H, W]
        coords = sample_uncertain_points(
            src.detach(), self.num_points, self.oversample_ratio, self.importance_sample_ratio
        )  # [N, P, 2]
        src_points = point_sample(src.float(), coords)[:, 0]  # [N, P]
        # Targets of different images may differ in size: sample them per image.
        tgt_points, start = [], 0
        for t, (src_b, tgt_b) in zip(targets, indices, strict=True):
            n = len(src_b)
            if n:
                masks = t["masks"][tgt_b].unsqueeze(1)
                tgt_points.append(point_sample(masks, coords[start : start + n])[:, 0])
            start += n
        tgt_points = torch.cat(tgt_points)
        loss_mask = F.binary_cross_entropy_with_logits(src_points, tgt_points, reduction="none")
        loss_mask = loss_mask.mean(1).sum() / num_masks
        probs = src_points.sigmoid()
        numerator = 2 * (probs * tgt_points).sum(-1)
        denominator = probs.sum(-1) + tgt_points.sum(-1)
        loss_dice = (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks
        return loss_mask, loss_dice
