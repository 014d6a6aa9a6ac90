"""Run a model over an evaluation set: COCO results, mask AP, pseudo-label quality."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gdistill.data.augment import resize_for_eval
from gdistill.data.coco import CocoDataset, load_targets, read_image
from gdistill.data.loader import collate_eval
from gdistill.distill.pseudo_labels import PseudoLabelQuality, suppress_duplicates
from gdistill.engine.distributed import all_gather_objects, broadcast_object, rank
from gdistill.evaluation.coco_eval import evaluate_masks, instances_to_coco_results
from gdistill.model.mask2former import (
    UPSAMPLE_ELEMENTS,
    Instances,
    images_to_model_input,
    instances_from_outputs,
)
from gdistill.progress import progress_bar
from gdistill.viz import CELL_SIZE, save_prediction_grid


def autocast_for(device: torch.device, amp: str):
    """fp16 / bf16 autocast on CUDA; fp32 (no autocast) elsewhere."""
    if device.type != "cuda" or amp == "none":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    loader,
    device: torch.device,
    top_k: int = 100,
    amp: str = "none",
    progress: bool = False,
    desc: str = "predict",
    min_score: float = 0.0,
) -> Iterator[tuple[dict, dict, list[Instances]]]:
    """Yield ``(batch, raw outputs, instances)`` for each evaluation batch (model in eval mode);
    ``min_score`` leaves out (query, class) pairs that cannot reach it (see
    ``instances_from_outputs``)."""
    was_training = model.training
    model.eval()
    try:
        for batch in progress_bar(loader, nested=True, desc=desc, disable=not progress, leave=False):
            images = images_to_model_input(batch["images"].to(device, non_blocking=True))
            with autocast_for(device, amp):
                outputs = model(images)
            instances = instances_from_outputs(
                outputs["pred_logits"],
                outputs["pred_masks"],
                batch["image_sizes"],
                batch["orig_sizes"],
                top_k=top_k,
                min_score=min_score,
            )
            yield batch, outputs, instances
    finally:
        model.train(was_training)


def _pseudo_label_candidates(
    pred_logits: torch.Tensor,
    pred_masks: torch.Tensor,
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    min_score: float,
    min_mask_area: float,
    mask_threshold: float,
    duplicate_iou: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pseudo-label filter of one image at the lowest threshold, with masks brought to the
    original image size: (labels [N], masks bool [N, H, W], scores [N])."""
    num_classes = pred_logits.shape[-1] - 1
    scores, labels = pred_logits.float().softmax(-1).max(-1)
    h4 = -(-image_size[0] // 4)
    w4 = -(-image_size[1] // 4)
    logits = pred_masks.float()
    area = logits[:, :h4, :w4].sigmoid().flatten(1).sum(1)
    keep = (labels != num_classes) & (scores > min_score) & (area > min_mask_area)
    idx = keep.nonzero(as_tuple=True)[0]
    if len(idx) == 0:
        empty = torch.zeros((0, *orig_size), dtype=torch.bool, device=logits.device)
        return labels[idx], empty, scores[idx]
    padded = (logits.shape[-2] * 4, logits.shape[-1] * 4)
    masks = torch.empty((len(idx), *orig_size), dtype=torch.bool, device=logits.device)
    # A few queries at a time, as instances_from_outputs: a large validation photo would hold
    # every candidate's float mask at full size several times over.
    chunk = max(1, UPSAMPLE_ELEMENTS // max(1, orig_size[0] * orig_size[1], padded[0] * padded[1]))
    for start in range(0, len(idx), chunk):
        up = F.interpolate(logits[idx[start : start + chunk]][None], size=padded, mode="bilinear",
                           align_corners=False)
        up = up[:, :, : image_size[0], : image_size[1]]
        up = F.interpolate(up, size=tuple(orig_size), mode="bilinear", align_corners=False)[0]
        masks[start : start + chunk] = up.sigmoid_() > mask_threshold
    if duplicate_iou > 0 and len(idx) > 1:
        unique = suppress_duplicates(masks, scores[idx], duplicate_iou)
        return labels[idx][unique], masks[unique], scores[idx][unique]
    return labels[idx], masks, scores[idx]


def evaluate_model(
    model: nn.Module,
    loader,
    dataset: CocoDataset,
    device: torch.device,
    top_k: int = 100,
    amp: str = "none",
    pseudo_label_thresholds: tuple[float, ...] = (),
    min_mask_area: float = 5.0,
    mask_threshold: float = 0.5,
    duplicate_iou: float = 0.0,
    per_class: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> tuple[dict, list[dict]]:
    """Mask AP of ``model`` on ``dataset`` (12 COCO numbers in percent), plus — when thresholds
    are given — pseudo-label precision / recall of the model's filtered predictions against the
    ground truth (IoU ≥ 0.5, right class). Returns (metrics, COCO results list)."""
    images_by_id = {img.id: img for img in dataset.images}
    category_ids = [dataset.category_id(c) for c in range(dataset.num_classes)]
    quality = PseudoLabelQuality(pseudo_label_thresholds) if pseudo_label_thresholds else None
    results: list[dict] = []
    for batch, outputs, instances in predict_batches(model, loader, device, top_k, amp, progress, desc):
        for i, inst in enumerate(instances):
            image_id = batch["image_ids"][i]
            results.extend(
                instances_to_coco_results(
                    image_id, inst.masks.cpu(), inst.scores.cpu(), inst.labels.cpu(), category_ids
                )
            )
            if quality is not None:
                labels, masks, scores = _pseudo_label_candidates(
                    outputs["pred_logits"][i],
                    outputs["pred_masks"][i],
                    batch["image_sizes"][i],
                    batch["orig_sizes"][i],
                    min(pseudo_label_thresholds),
                    min_mask_area,
                    mask_threshold,
                    duplicate_iou,
                )
                gt_labels, gt_masks = load_targets(images_by_id[image_id], dataset)
                quality.update(
                    labels.cpu(),
                    masks.cpu(),
                    scores.cpu(),
                    torch.as_tensor(gt_labels),
                    torch.as_tensor(gt_masks),
                )
    # Under torchrun each rank saw a shard of the images: gather, score on rank 0, share.
    results = [r for part in all_gather_objects(results) for r in part]
    if quality is not None:
        shards = all_gather_objects(quality)  # collective: every rank calls it
        for other in shards[1:]:
            quality.merge(other)
    metrics = None
    if rank() == 0:
        metrics = evaluate_masks(
            dataset.raw, results, per_class=per_class, image_ids=[img.id for img in dataset.images]
        )
        if quality is not None:
            metrics.update(quality.summary())
    return broadcast_object(metrics), results


def validation_picture(
    model: torch.nn.Module,
    dataset: CocoDataset,
    images_dir: str | Path,
    out: str | Path,
    device: torch.device | str,
    short_side: int,
    max_side: int,
    count: int = 8,
    score_threshold: float = 0.5,
    cell: int = CELL_SIZE,
) -> Path:
    """Ground truth | predictions of an in-memory model on the first ``count`` images of a COCO
    dataset (test-time resize ``short_side`` / ``max_side``). The model's train/eval mode is
    restored afterwards, so a training loop can call this at each evaluation."""
    chosen = dataset.images[:count]
    arrays = [read_image(Path(images_dir) / im.file_name, (im.height, im.width)) for im in chosen]
    samples = [
        {
            "image": resize_for_eval(torch.from_numpy(a).permute(2, 0, 1), short_side, max_side),
            "orig_size": a.shape[:2],
            "image_id": im.id,
            "key": im.file_name,
        }
        for a, im in zip(arrays, chosen, strict=True)
    ]
    loader = [collate_eval(samples[i : i + 4]) for i in range(0, len(samples), 4)]
    predictions = [
        inst
        for _, _, batch in predict_batches(model, loader, torch.device(device))
        for inst in batch
    ]
    predictions = [Instances(p.scores.cpu(), p.labels.cpu(), p.masks.cpu()) for p in predictions]
    gt = [load_targets(im, dataset) for im in chosen]
    return save_prediction_grid(
        out, arrays, gt, predictions, dataset.class_names, score_threshold, cell
    )
