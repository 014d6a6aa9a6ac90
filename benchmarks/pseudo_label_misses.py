"""Which ground-truth objects a model's pseudo-labels miss, and why, by object size.

For every ground-truth object of an annotated set, with the model in eval mode (as the stage-B
teacher runs), bucketed by the object's area in pixels of the original image:

- ``localised``: some query's mask (sigmoid > 0.5, at the original size) has IoU >= 0.5 with it;
- ``pl_recall``: GuidedDistillation's filter (argmax not no-object, max softmax > ``--threshold``,
  soft area at mask resolution > ``--min-area``) keeps a query of the right class with IoU >= 0.5;
- ``area_filtered``: such a query passes the class test but not the area test;
- among localised objects, the query that is most sure an object is there (largest
  1 - p(no-object) among those with IoU >= 0.5): ``fg>0.5`` how often it is sure, ``right_class``
  how often its class is the ground truth's;
- the most frequent (ground-truth class, that query's class) confusions.

Unlike ``eval.csv``'s ``pl_recall*`` (greedy one-to-one matching by score), an object counts as
found here when any kept query covers it, so the numbers are an upper bound of that recall.

    python benchmarks/pseudo_label_misses.py --weights demo_out/seed0/teacher/best.pt \\
        --annotations demo_out/data/val.json --images demo_out/data/images
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gdistill.data.coco import load_coco, load_targets
from gdistill.data.loader import EvalDataset, collate_eval
from gdistill.distill.pseudo_labels import mask_iou
from gdistill.engine.evaluate import predict_batches
from gdistill.inference import load_model


def object_rows(model, loader, dataset, score_threshold: float, min_area: float) -> list[dict]:
    """One dict per ground-truth object (see the module docstring)."""
    images_by_id = {img.id: img for img in dataset.images}
    rows = []
    with torch.no_grad():
        for batch, out, _ in predict_batches(model, loader, torch.device("cpu")):
            for i, image_id in enumerate(batch["image_ids"]):
                logits, mask_logits = out["pred_logits"][i].float(), out["pred_masks"][i].float()
                no_object = logits.shape[-1] - 1
                probs = logits.softmax(-1)  # [Q, K+1]
                scores, labels = probs.max(-1)
                soft_area = mask_logits.sigmoid().flatten(1).sum(1)
                (h, w), (oh, ow) = batch["image_sizes"][i], batch["orig_sizes"][i]
                up = F.interpolate(mask_logits[None], scale_factor=4, mode="bilinear", align_corners=False)
                up = F.interpolate(up[:, :, :h, :w], size=(oh, ow), mode="bilinear", align_corners=False)
                masks = up[0] > 0  # [Q, H, W]
                gt_labels, gt_masks = load_targets(images_by_id[image_id], dataset)
                gt_labels, gt_masks = torch.as_tensor(gt_labels), torch.as_tensor(gt_masks)
                ious = mask_iou(masks, gt_masks)  # [Q, G]
                foreground = 1 - probs[:, no_object]
                for g, cls in enumerate(gt_labels.tolist()):
                    covers = ious[:, g] >= 0.5
                    right = covers & (labels == cls) & (scores > score_threshold)
                    row = {
                        "area": int(gt_masks[g].sum()),
                        "class": cls,
                        "localised": bool(covers.any()),
                        "pl_found": bool((right & (soft_area > min_area)).any()),
                        "area_filtered": bool(right.any() and not (right & (soft_area > min_area)).any()),
                    }
                    if covers.any():
                        q = int(torch.where(covers, foreground, torch.full_like(foreground, -1.0)).argmax())
                        row["fg"] = float(foreground[q])
                        row["fg_class"] = int(probs[q, :no_object].argmax())
                    rows.append(row)
    return rows


def summarise(rows: list[dict], edges: list[float], class_names: list[str]) -> dict:
    buckets = []
    bounds = [0.0, *edges, float("inf")]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = [r for r in rows if lo <= r["area"] < hi]
        found = [r for r in part if r["localised"]]
        if not part:
            continue
        n, m = len(part), max(1, len(found))
        buckets.append(
            {
                "area": f"[{lo:g}, {hi:g})",
                "objects": n,
                "localised": round(sum(r["localised"] for r in part) / n, 3),
                "pl_recall": round(sum(r["pl_found"] for r in part) / n, 3),
                "area_filtered": round(sum(r["area_filtered"] for r in part) / n, 3),
                "localised_fg>0.5": round(sum(r["fg"] > 0.5 for r in found) / m, 3),
                "localised_right_class": round(sum(r["fg_class"] == r["class"] for r in found) / m, 3),
            }
        )
    confusions = collections.Counter(
        (class_names[r["class"]], class_names[r["fg_class"]])
        for r in rows
        if r["localised"] and r["fg_class"] != r["class"]
    )
    return {
        "objects": len(rows),
        "by_area": buckets,
        "confusions": [[gt, pred, count] for (gt, pred), count in confusions.most_common(8)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--model", default="student", choices=("student", "teacher"))
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--min-area", type=float, default=5.0)
    parser.add_argument("--edges", type=float, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = load_model(args.weights, args.model, "cpu")
    dataset = load_coco(args.annotations)
    cfg = predictor.cfg
    loader = DataLoader(
        EvalDataset(dataset, Path(args.images), cfg.data.test_short_side, cfg.data.test_max_side),
        batch_size=cfg.data.eval_batch_size,
        collate_fn=collate_eval,
    )
    rows = object_rows(predictor.model, loader, dataset, args.threshold, args.min_area)
    print(json.dumps(summarise(rows, args.edges, dataset.class_names), indent=1))


if __name__ == "__main__":
    main()
