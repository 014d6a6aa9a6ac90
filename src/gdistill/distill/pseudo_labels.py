"""Teacher outputs → hard pseudo-labels in the criterion's target format, and their diagnostics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def pseudo_labels_from_teacher(
    pred_logits: Tensor,
    pred_masks: Tensor,
    score_threshold: float = 0.7,
    min_mask_area: float = 5.0,
    mask_threshold: float = 0.5,
    valid: Tensor | None = None,
    duplicate_iou: float = 0.0,
) -> tuple[list[dict[str, Tensor]], dict[str, float]]:
    """Filter the teacher's final predictions into targets (GuidedDistillation's filter).

    pred_logits [B, Q, K+1], pred_masks [B, Q, h, w] (mask logits at stride 4).
    valid: optional bool [B, H, W] of real (non-padding) pixels of the input batch; masks are
    cleared outside it so padding never becomes part of a pseudo-object.

    A query is kept when its argmax is not no-object, its max softmax probability over all K+1
    classes exceeds ``score_threshold`` and its soft area (sum of sigmoid over the mask) exceeds
    ``min_mask_area``. With ``duplicate_iou`` > 0, a pseudo-label whose mask overlaps a
    higher-scoring one (of any class) with IoU above it is dropped (GuidedDistillation keeps
    duplicates; each would be matched to its own student query). Returns per image
    ``{"labels": int64 [N], "masks": bool [N, h, w], "scores": [N]}`` and step statistics (kept,
    candidates, mean score, images with none).
    """
    num_classes = pred_logits.shape[-1] - 1
    probs = pred_logits.float().softmax(-1)
    scores, labels = probs.max(-1)  # [B, Q]
    mask_probs = pred_masks.float().sigmoid()
    if valid is not None:
        small_valid = F.interpolate(valid[:, None].float(), size=pred_masks.shape[-2:], mode="nearest")
        mask_probs = mask_probs * small_valid
    soft_area = mask_probs.flatten(2).sum(-1)  # [B, Q]
    candidates = labels != num_classes
    keep = candidates & (scores > score_threshold) & (soft_area > min_mask_area)

    targets = []
    for i in range(pred_logits.shape[0]):
        idx = keep[i].nonzero(as_tuple=True)[0]
        masks = mask_probs[i, idx] > mask_threshold
        if duplicate_iou > 0 and len(idx) > 1:
            unique = suppress_duplicates(masks, scores[i, idx], duplicate_iou)
            idx, masks = idx[unique], masks[unique]
        targets.append({"labels": labels[i, idx], "masks": masks, "scores": scores[i, idx]})
    kept = sum(len(t["labels"]) for t in targets)
    stats = {
        "pl_kept": float(kept),
        "pl_candidates": float(candidates.sum()),
        "pl_mean_score": float(torch.cat([t["scores"] for t in targets]).mean()) if kept else 0.0,
        "pl_images_without": float(sum(1 for t in targets if len(t["labels"]) == 0)),
        "pl_per_image": kept / max(1, pred_logits.shape[0]),
    }
    return targets, stats


def suppress_duplicates(masks: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy mask NMS: indices (in descending score order) of the masks that overlap no
    higher-scoring kept mask with IoU > ``iou_threshold``. masks bool [N, H, W], scores [N]."""
    order = scores.argsort(descending=True)
    ious = mask_iou(masks[order], masks[order])
    kept: list[int] = []
    for j in range(len(order)):
        if not kept or bool((ious[j, kept] <= iou_threshold).all()):
            kept.append(j)
    return order[kept]


def class_histogram(targets: Sequence[dict[str, Tensor]], num_classes: int) -> list[int]:
    """Pseudo-labels per class over a batch."""
    counts = torch.zeros(num_classes, dtype=torch.long)
    for t in targets:
        counts += torch.bincount(t["labels"].cpu(), minlength=num_classes)
    return counts.tolist()


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """a bool [N, H, W], b bool [M, H, W] → IoU [N, M]."""
    a = a.flatten(1).float()
    b = b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1.0)


def matched_ground_truth(
    pred_labels: Tensor,
    pred_masks: Tensor,
    pred_scores: Tensor,
    gt_labels: Tensor,
    gt_masks: Tensor,
    iou_threshold: float = 0.5,
) -> Tensor:
    """Greedy matching by descending score: a prediction is correct when it has the right class
    and IoU >= ``iou_threshold`` with a ground-truth mask not matched before. Returns bool [G]:
    which ground-truth objects a correct prediction found."""
    matched = torch.zeros(len(gt_labels), dtype=torch.bool)
    if len(pred_labels) == 0 or len(gt_labels) == 0:
        return matched
    ious = mask_iou(pred_masks, gt_masks)
    ious[pred_labels[:, None] != gt_labels[None, :]] = -1.0
    for p in pred_scores.argsort(descending=True).tolist():
        row = ious[p].clone()
        row[matched] = -1.0
        best = int(row.argmax())
        if row[best] >= iou_threshold:
            matched[best] = True
    return matched


# COCO's object-size ranges (area in pixels of the original image), as in APs / APm / APl.
SIZE_RANGES = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, float("inf")))


class PseudoLabelQuality:
    """Accumulates pseudo-label precision and recall against ground truth at several thresholds,
    and the recall per COCO object size (small / medium / large ground-truth objects)."""

    def __init__(self, thresholds: Sequence[float], iou_threshold: float = 0.5) -> None:
        self.thresholds = [float(t) for t in thresholds]
        self.iou_threshold = iou_threshold
        self.tp = [0] * len(self.thresholds)
        self.num_pred = [0] * len(self.thresholds)
        self.num_gt = 0
        self.num_gt_by_size = [0] * len(SIZE_RANGES)
        self.found_by_size = [[0] * len(SIZE_RANGES) for _ in self.thresholds]

    def update(
        self,
        labels: Tensor,
        masks: Tensor,
        scores: Tensor,
        gt_labels: Tensor,
        gt_masks: Tensor,
    ) -> None:
        """One image: every candidate pseudo-label (already area-filtered) with its score; the
        threshold sweep keeps those with score > t. Masks at the original image size."""
        self.num_gt += len(gt_labels)
        areas = gt_masks.flatten(1).sum(1).float() if len(gt_labels) else torch.zeros(0)
        size_of = [(areas >= lo) & (areas < hi) for _, lo, hi in SIZE_RANGES]
        for s, in_range in enumerate(size_of):
            self.num_gt_by_size[s] += int(in_range.sum())
        for i, t in enumerate(self.thresholds):
            keep = scores > t
            self.num_pred[i] += int(keep.sum())
            matched = matched_ground_truth(
                labels[keep], masks[keep], scores[keep], gt_labels, gt_masks, self.iou_threshold
            )
            self.tp[i] += int(matched.sum())
            for s, in_range in enumerate(size_of):
                self.found_by_size[i][s] += int((matched & in_range).sum())

    def merge(self, other: PseudoLabelQuality) -> None:
        """Add the counts of another accumulator (another process's shard)."""
        self.tp = [a + b for a, b in zip(self.tp, other.tp, strict=True)]
        self.num_pred = [a + b for a, b in zip(self.num_pred, other.num_pred, strict=True)]
        self.num_gt += other.num_gt
        self.num_gt_by_size = [
            a + b for a, b in zip(self.num_gt_by_size, other.num_gt_by_size, strict=True)
        ]
        self.found_by_size = [
            [a + b for a, b in zip(mine, theirs, strict=True)]
            for mine, theirs in zip(self.found_by_size, other.found_by_size, strict=True)
        ]

    def summary(self) -> dict[str, float | None]:
        """``{"pl_precision@0.7": .., "pl_recall@0.7": .., "pl_recall_small@0.7": .., ...}`` for
        each t; precision is None when no pseudo-label is kept at t, a recall None when the
        ground truth has no object (of that size)."""
        out: dict[str, float | None] = {}
        for i, (t, tp, n) in enumerate(zip(self.thresholds, self.tp, self.num_pred, strict=True)):
            out[f"pl_precision@{t:g}"] = tp / n if n else None  # no pseudo-label kept
            out[f"pl_recall@{t:g}"] = tp / self.num_gt if self.num_gt else None
            for (name, _, _), found, total in zip(
                SIZE_RANGES, self.found_by_size[i], self.num_gt_by_size, strict=True
            ):
                out[f"pl_recall_{name}@{t:g}"] = found / total if total else None
        return out
