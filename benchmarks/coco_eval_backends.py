"""Mask AP backends: pycocotools vs faster-coco-eval (and gdistill's evaluate_masks wrapper).

Builds a synthetic COCO problem (default 200 images x 10 ground-truth masks x 50 predictions,
10 classes, small/medium/large objects) and times each backend end to end: ground-truth index →
results loading → evaluate → accumulate → summarize, data copies excluded, best and median of
--repeats interleaved rounds. Prints one JSON line with the times and the largest absolute
difference of the 12 COCO stats (percent) and of the full precision array between the backends.

    python benchmarks/coco_eval_backends.py [--images 200] [--gt 10] [--preds 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import io
import json
import os
import platform
import statistics
import time

import numpy as np
from pycocotools import mask as mask_util

from gdistill.evaluation.coco_eval import COCO_STAT_NAMES, evaluate_masks


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.ogrid[:size, :size]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _encode(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}


def make_problem(images: int, gt_per_image: int, preds_per_image: int, size: int,
                 num_classes: int, seed: int) -> tuple[dict, list[dict]]:
    """Ground-truth COCO dict and results list; predictions are jittered GT masks (sometimes with
    the wrong class) plus random false positives, with random scores."""
    rng = np.random.default_rng(seed)
    categories = [{"id": k + 1, "name": f"class{k}"} for k in range(num_classes)]
    gt = {"images": [], "categories": categories, "annotations": []}
    results = []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "file_name": f"{image_id}.png",
                             "height": size, "width": size})
        objects = []
        for _ in range(gt_per_image):
            # radii spread over COCO's small / medium / large area ranges
            ry, rx = np.exp(rng.uniform(np.log(3), np.log(size / 3), 2))
            cy, cx = rng.uniform(0, size, 2)
            mask = _ellipse(size, cy, cx, ry, rx)
            if not mask.any():
                mask[int(cy) % size, int(cx) % size] = True
            category = int(rng.integers(1, num_classes + 1))
            objects.append((mask, category, (cy, cx, ry, rx)))
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": category,
                "segmentation": _encode(mask), "area": float(mask.sum()), "iscrowd": 0,
            })
        for p in range(preds_per_image):
            if p < 3 * gt_per_image:  # three noisy copies of every object
                _, category, (cy, cx, ry, rx) = objects[p % gt_per_image]
                jitter = rng.normal(0.0, 0.15, 4)
                mask = _ellipse(size, cy + jitter[0] * ry, cx + jitter[1] * rx,
                                ry * np.exp(jitter[2]), rx * np.exp(jitter[3]))
                if rng.random() < 0.2:
                    category = int(rng.integers(1, num_classes + 1))
            else:
                ry, rx = np.exp(rng.uniform(np.log(3), np.log(size / 3), 2))
                mask = _ellipse(size, *rng.uniform(0, size, 2), ry, rx)
                category = int(rng.integers(1, num_classes + 1))
            results.append({"image_id": image_id, "category_id": category,
                            "segmentation": _encode(mask), "score": float(rng.random())})
    return gt, results


def run_pycocotools(gt: dict, results: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats), coco_eval.eval["precision"]


def run_faster_coco_eval(gt: dict, results: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    from faster_coco_eval import COCO, COCOeval_faster

    def quiet(*args, **kwargs):
        pass

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt, print_function=quiet)
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval_faster(coco_gt, coco_dt, iouType="segm", print_function=quiet)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats), coco_eval.eval["precision"]


def run_gdistill(gt: dict, results: list[dict]) -> tuple[np.ndarray, None]:
    metrics = evaluate_masks(gt, results)
    return np.array([metrics[n] / 100.0 for n in COCO_STAT_NAMES]), None


def timed(backends: dict, gt: dict, results: list[dict], repeats: int) -> tuple[dict, dict]:
    """Run the backends in turn, ``repeats`` rounds (interleaved, so background load hits all of
    them alike); returns per backend the list of seconds and the last output."""
    times = {name: [] for name in backends}
    outputs = {}
    for _ in range(repeats):
        for name, fn in backends.items():
            gt_copy, results_copy = copy.deepcopy(gt), copy.deepcopy(results)
            start = time.perf_counter()
            outputs[name] = fn(gt_copy, results_copy)
            times[name].append(time.perf_counter() - start)
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--gt", type=int, default=10)
    parser.add_argument("--preds", type=int, default=50)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gt, results = make_problem(args.images, args.gt, args.preds, args.size, args.classes,
                               args.seed)
    times, outputs = timed(
        {"pycocotools": run_pycocotools, "faster_coco_eval": run_faster_coco_eval,
         "gdistill_evaluate_masks": run_gdistill},
        gt, results, args.repeats,
    )
    stats_pycoco, prec_pycoco = outputs["pycocotools"]
    stats_faster, prec_faster = outputs["faster_coco_eval"]
    stats_ours, _ = outputs["gdistill_evaluate_masks"]
    best = {name: min(t) for name, t in times.items()}

    report = {
        "benchmark": "coco_eval_backends",
        "images": args.images, "gt_per_image": args.gt, "preds_per_image": args.preds,
        "image_size": args.size, "classes": args.classes, "repeats": args.repeats,
        "pycocotools_version": importlib.metadata.version("pycocotools"),
        "faster_coco_eval_version": importlib.metadata.version("faster-coco-eval"),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        **{f"{name}_best_s": round(t, 4) for name, t in best.items()},
        **{f"{name}_median_s": round(statistics.median(t), 4) for name, t in times.items()},
        "speedup_faster_vs_pycocotools": round(best["pycocotools"] / best["faster_coco_eval"], 2),
        "stats_pycocotools_percent": [round(float(v) * 100, 3) for v in stats_pycoco],
        "max_abs_diff_stats_percent": float(np.max(np.abs(stats_pycoco - stats_faster)) * 100),
        "max_abs_diff_precision": float(np.max(np.abs(prec_pycoco - prec_faster))),
        "max_abs_diff_gdistill_vs_pycocotools_percent":
            float(np.max(np.abs(stats_pycoco - stats_ours)) * 100),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
