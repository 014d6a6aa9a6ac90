"""COCO mask AP (pycocotools ``COCOeval``, ``iouType="segm"``) and the results JSON.

A results file is a JSON list with one entry per predicted instance::

    {"image_id": 7, "category_id": 3, "score": 0.93,
     "segmentation": {"size": [H, W], "counts": "<compressed RLE>"}}

Metric conventions (as papers report them):

- The 12 ``COCO_STAT_NAMES`` are in percent, 0..100.
- A stat that COCO cannot define (pycocotools' ``-1``: no ground-truth instance in that area range,
  or a class without ground truth in the evaluated images) is ``None``, never ``-1`` or NaN, so the
  dict stays valid JSON and an undefined number is never mistaken for a score.
- No predictions at all is evaluated like any other input: every defined stat is ``0.0``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gdistill.data.coco import compressed_rle_total
from gdistill.errors import GdistillError

COCO_STAT_NAMES = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
]

_RESULT_KEYS = ("image_id", "category_id", "segmentation", "score")


def instances_to_coco_results(
    image_id: int,
    masks: torch.Tensor | np.ndarray,
    scores: torch.Tensor | np.ndarray | Sequence[float],
    labels: torch.Tensor | np.ndarray | Sequence[int],
    category_ids: Sequence[int],
) -> list[dict]:
    """Turn one image's predicted instances into COCO result dicts.

    Args:
        image_id: the COCO image id the masks belong to.
        masks: bool ``[N, H, W]`` at the original image resolution.
        scores: ``[N]`` confidences.
        labels: ``[N]`` contiguous class ids ``0..K-1``.
        category_ids: COCO category id of each contiguous class (``category_ids[label]``).

    Returns:
        ``N`` dicts ``{"image_id", "category_id", "segmentation", "score"}``; the segmentation is
        compressed RLE ``{"size": [H, W], "counts": str}``.
    """
    masks_np = _as_numpy(masks)
    if masks_np.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks_np.shape)}")
    if masks_np.dtype.kind not in "bui":
        raise ValueError(f"masks must be boolean (threshold them first), not {masks_np.dtype}")
    scores_np = _as_numpy(scores).reshape(-1)
    labels_np = _as_numpy(labels).reshape(-1)
    num = masks_np.shape[0]
    if len(scores_np) != num or len(labels_np) != num:
        raise ValueError(
            f"got {num} masks, {len(scores_np)} scores and {len(labels_np)} labels; they must match"
        )
    if num == 0:
        return []
    if labels_np.min() < 0 or labels_np.max() >= len(category_ids):
        raise ValueError(f"labels must lie in 0..{len(category_ids) - 1}, got {labels_np.tolist()}")

    # pycocotools wants a Fortran-ordered uint8 [H, W, N] array.
    height, width = masks_np.shape[1:]
    rles = mask_util.encode(np.asfortranarray(masks_np.transpose(1, 2, 0).astype(np.uint8)))
    results = []
    for rle, score, label in zip(rles, scores_np.tolist(), labels_np.tolist(), strict=True):
        results.append({
            "image_id": int(image_id),
            "category_id": int(category_ids[int(label)]),
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
            "score": float(score),
        })
    return results


def write_results(results: list[dict], path: str | Path) -> None:
    """Write results as a JSON list (atomically: a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, separators=(",", ":"), default=_json_default)
    os.replace(tmp, path)


def load_results(path: str | Path) -> list[dict]:
    """Read and validate a results JSON file (structure only; ids are checked at evaluation)."""
    results = _read_json(Path(path), "results")
    _check_results(results, str(path))
    return results


def evaluate_masks(
    ground_truth: str | Path | dict,
    results: list[dict],
    per_class: bool = False,
    image_ids: Sequence[int] | None = None,
) -> dict:
    """COCO mask AP of ``results`` against ``ground_truth``.

    Args:
        ground_truth: a COCO instances JSON path, or its parsed dict ("info"/"licenses" optional;
            its compressed RLE strings are taken as valid, as ``load_coco``'s ``raw`` has them).
            Neither the dict nor ``results`` is modified.
        results: COCO result dicts (see the module docstring); an empty list is fine. Their
            compressed RLE strings are used as they are (pycocotools' encoder, as in
            ``instances_to_coco_results``, makes valid ones); ``load_results`` checks a file's.
        per_class: also report mask AP (IoU .50:.95, all areas, 100 dets) per category name.
        image_ids: evaluate only these images (results on other images are ignored).

    Returns:
        ``{name: percent or None for name in COCO_STAT_NAMES}``, plus
        ``"per_class": {category name: percent or None}`` (category-id order) when ``per_class``.
    """
    return _evaluate(ground_truth, results, per_class, image_ids, "results")


def evaluate_results_file(
    annotations: str | Path | dict, results_path: str | Path, per_class: bool = True
) -> dict:
    """Evaluate a results JSON file against a COCO annotations file, or against an already
    loaded and checked COCO dict (``gdistill eval``)."""
    results = load_results(results_path)
    ground_truth = annotations if isinstance(annotations, dict) else Path(annotations)
    listing = Path(results_path).with_name("images.json")
    return _evaluate(
        ground_truth, results, per_class, None, str(results_path),
        listing if listing.is_file() else None,
    )


def format_metrics_table(metrics: dict) -> str:
    """Aligned text table: the COCO stats in one header/value row pair, then per-class AP lines."""
    names = [n for n in COCO_STAT_NAMES if n in metrics]
    values = [_fmt(metrics[n]) for n in names]
    widths = [max(len(n), len(v), 5) for n, v in zip(names, values, strict=True)]
    lines = [
        "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True)),
        "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True)),
    ]
    per_class = metrics.get("per_class")
    if per_class:
        width = max(_columns("class"), *(_columns(str(c)) for c in per_class))
        lines += ["", f"{'class'.ljust(width)}  {'AP':>6}"]
        lines += [f"{c}{' ' * (width - _columns(str(c)))}  {_fmt(ap):>6}" for c, ap in per_class.items()]
    return "\n".join(lines)


def _columns(text: str) -> int:
    """Terminal columns of ``text``: East Asian wide and fullwidth characters take two, combining
    marks none."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF"
               else 1 for ch in text)


# --------------------------------------------------------------------------------------------
# internals


def _evaluate(
    ground_truth: str | Path | dict,
    results: list[dict],
    per_class: bool,
    image_ids: Sequence[int] | None,
    results_source: str,
    predict_listing: Path | None = None,
) -> dict:
    gt_dataset, gt_source = _load_ground_truth(ground_truth)
    # Results from a file were checked in full when loaded (load_results).
    _check_results(results, results_source, decode_strings=False)
    images = {img["id"]: img for img in gt_dataset["images"]}
    if predict_listing is not None:
        _warn_images_not_predicted(predict_listing, images, gt_dataset["annotations"])
    results = _match_file_names(results, images, results_source)
    detections = _prepare_results(results, images, gt_dataset["categories"], results_source)

    if image_ids is not None:
        image_ids = [int(i) for i in image_ids]
        if not image_ids:
            raise GdistillError(f"{gt_source}: image_ids to evaluate is empty")
        unknown = sorted(set(image_ids) - images.keys())
        if unknown:
            raise GdistillError(f"{gt_source}: image_ids {_short(unknown)} are not in its images")

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dataset
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:  # loadRes([]) crashes; an empty result set is a valid (all-miss) prediction
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(gt_dataset["images"]),
                "categories": list(gt_dataset["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(set(image_ids))
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    metrics: dict[str, Any] = {
        name: _percent(value) for name, value in zip(COCO_STAT_NAMES, coco_eval.stats, strict=True)
    }
    if per_class:
        metrics["per_class"] = _per_class_ap(coco_eval, gt_dataset["categories"])
    return metrics


def _per_class_ap(coco_eval: COCOeval, categories: list[dict]) -> dict[str, float | None]:
    # precision: [T iou thresholds, R recall points, K classes, A area ranges, M max dets];
    # area index 0 is "all" and the last max-dets entry is 100, as in the summary's AP.
    precision = coco_eval.eval["precision"]
    by_id = {c["id"]: c for c in categories}
    names = [str(by_id[cid].get("name", cid)) for cid in coco_eval.params.catIds]
    out: dict[str, float | None] = {}
    for k, (cid, name) in enumerate(zip(coco_eval.params.catIds, names, strict=True)):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        key = name if names.count(name) == 1 else f"{name} ({cid})"
        out[key] = _percent(float(np.mean(p))) if p.size else None
    return out


def _load_ground_truth(ground_truth: str | Path | dict) -> tuple[dict, str]:
    """A private, evaluation-ready copy of the ground truth and a name for error messages.

    pycocotools writes into annotation dicts and needs "area", "iscrowd" and non-zero ids
    (an annotation id of 0 reads as "unmatched"), so annotations are copied and completed here.
    """
    # A file's compressed RLE strings are decoded to check them; a dict (load_coco's raw, passed
    # at every training evaluation) was checked when it was loaded.
    decode_strings = not isinstance(ground_truth, dict)
    if isinstance(ground_truth, dict):
        source, raw = "ground truth", ground_truth
    else:
        source = str(ground_truth)
        raw = _read_json(Path(ground_truth), "annotations")
    if not isinstance(raw, dict):
        raise GdistillError(f"{source}: expected a COCO JSON object, got {type(raw).__name__}")
    for key in ("images", "categories"):
        if not isinstance(raw.get(key), list):
            raise GdistillError(f"{source}: missing or non-list '{key}'")
    annotations = raw.get("annotations", [])
    if not isinstance(annotations, list):
        raise GdistillError(f"{source}: 'annotations' is not a list")

    for img in raw["images"]:
        if not isinstance(img, dict) or any(k not in img for k in ("id", "height", "width")):
            raise GdistillError(f"{source}: image entry {_short_repr(img)} lacks id/height/width")
    for cat in raw["categories"]:
        if not isinstance(cat, dict) or "id" not in cat:
            raise GdistillError(f"{source}: category entry {_short_repr(cat)} lacks 'id'")
    images = {img["id"]: img for img in raw["images"]}
    category_ids = {cat["id"] for cat in raw["categories"]}

    copied = []
    for index, ann in enumerate(annotations):
        name = f"annotation {ann.get('id', index) if isinstance(ann, dict) else index}"
        if not isinstance(ann, dict):
            raise GdistillError(f"{source}: {name} is not an object")
        for key in ("image_id", "category_id", "segmentation"):
            if key not in ann:
                raise GdistillError(f"{source}: {name} lacks '{key}'")
        if ann["image_id"] not in images:
            raise GdistillError(f"{source}: {name} references unknown image_id {ann['image_id']}")
        if ann["category_id"] not in category_ids:
            raise GdistillError(
                f"{source}: {name} references unknown category_id {ann['category_id']}"
            )
        segmentation, img = ann["segmentation"], images[ann["image_id"]]
        if (
            decode_strings
            and isinstance(segmentation, dict)
            and isinstance(segmentation.get("counts"), (str, bytes))
        ):
            counts = segmentation["counts"]
            raw_counts = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
            if compressed_rle_total(raw_counts) != img["height"] * img["width"]:
                raise GdistillError(
                    f"{source}: {name} has a compressed RLE string that is malformed or does not "
                    f"cover its {img['height']}x{img['width']} image"
                )
        ann = dict(ann, id=index + 1, iscrowd=int(ann.get("iscrowd", 0)))
        area = ann.get("area")
        if isinstance(area, bool) or not isinstance(area, (int, float)) or not area > 0:
            img = images[ann["image_id"]]
            rle = _segmentation_to_rle(ann["segmentation"], img["height"], img["width"])
            ann["area"] = float(mask_util.area(rle))
        copied.append(ann)

    dataset = {
        "info": raw.get("info", {}),
        "licenses": raw.get("licenses", []),
        "images": list(raw["images"]),
        "categories": sorted(raw["categories"], key=lambda c: c["id"]),
        "annotations": copied,
    }
    return dataset, source


def _segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Polygons, uncompressed or compressed RLE → one compressed RLE."""
    if isinstance(segmentation, list):  # polygons
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_util.frPyObjects(segmentation, height, width)
    return segmentation


def _check_results(results: Any, source: str, decode_strings: bool = True) -> None:
    """Structural checks of a results list; errors name ``source`` and the entry index.
    ``decode_strings``: also decode every compressed RLE string (about 0.1 ms each at COCO image
    sizes): for files; results of ``instances_to_coco_results`` come from pycocotools' encoder."""
    if not isinstance(results, list):
        kind = type(results).__name__
        raise GdistillError(f"{source}: expected a JSON list of results, got {kind}")
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise GdistillError(f"{source}: result {i} is not an object")
        missing = [k for k in _RESULT_KEYS if k not in r]
        if missing:
            raise GdistillError(f"{source}: result {i} lacks {', '.join(repr(k) for k in missing)}")
        for key in ("image_id", "category_id"):
            if not _is_int(r[key]):
                raise GdistillError(f"{source}: result {i} has non-integer {key} {r[key]!r}")
        score = r["score"]
        if not _is_number(score) or not math.isfinite(score):
            raise GdistillError(f"{source}: result {i} has invalid score {score!r}")
        seg = r["segmentation"]
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise GdistillError(
                f"{source}: result {i} segmentation must be an RLE object with 'size' and 'counts'"
            )
        size = seg["size"]
        valid = isinstance(size, list) and len(size) == 2
        valid = valid and all(_is_int(n) and n > 0 for n in size)
        if not valid:
            raise GdistillError(f"{source}: result {i} has invalid RLE size {size!r}")
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != size[0] * size[1]:
                raise GdistillError(
                    f"{source}: result {i} has uncompressed RLE counts that do not sum to "
                    f"{size[0]}x{size[1]}"
                )
        elif not isinstance(counts, (str, bytes)):
            kind = type(counts).__name__
            raise GdistillError(f"{source}: result {i} has RLE counts of type {kind}")
        elif decode_strings:
            raw = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
            if compressed_rle_total(raw) != size[0] * size[1]:
                raise GdistillError(
                    f"{source}: result {i} has a compressed RLE string that is malformed or "
                    f"does not cover {size[0]}x{size[1]}"
                )


def ids_of_file_names(names: list[str], images: dict[int, dict]) -> list[list[int]]:
    """For each name, the ids of the ground-truth images it names: the image whose file_name it
    is (when one image has it), or whose file_name ends with it ("a.jpg" names "val/a.jpg"), or
    whose file_name it ends with ("/data/val/a.jpg" names "val/a.jpg")."""
    by_suffix: dict[str, list[int]] = {}
    by_name: dict[str, list[int]] = {}
    for img in images.values():
        name = str(img.get("file_name", "")).replace("\\", "/")
        by_name.setdefault(name, []).append(img["id"])
        parts = name.split("/")
        for k in range(len(parts)):
            by_suffix.setdefault("/".join(parts[k:]), []).append(img["id"])
    found = []
    for name in names:
        name = name.replace("\\", "/")
        ids = by_name.get(name) if len(by_name.get(name, ())) == 1 else by_suffix.get(name)
        if ids is None:
            parts = name.split("/")
            ids = next((by_name[s] for k in range(1, len(parts))
                        if (s := "/".join(parts[k:])) in by_name), [])
        found.append(ids)
    return found


def _warn_images_not_predicted(listing: Path, images: dict[int, dict], annotations: list[dict]) -> None:
    """``gdistill predict`` lists the images it read in ``images.json`` beside its results. A
    ground-truth image with objects that it did not read (outside its folder, or skipped as
    unreadable) has no result, and counts as a complete miss: say so."""
    try:
        names = [img["file_name"] for img in json.loads(listing.read_text())["images"]]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not predict's listing
    if not all(isinstance(n, str) for n in names):
        return
    read = {i for ids in ids_of_file_names(names, images) if len(ids) == 1 for i in ids}
    if not read:
        return  # another naming
    with_objects = {a["image_id"] for a in annotations if not a.get("iscrowd")}
    missing = [img for i, img in images.items() if i not in read and i in with_objects]
    if missing:
        warnings.warn(
            f"{listing}: {len(missing)} of the {len(with_objects)} ground-truth images with objects "
            "were not read by "
            f"`gdistill predict` (first: {missing[0].get('file_name')!r}) and count as complete "
            "misses; predict from the ground truth's image root to score them",
            stacklevel=3,
        )


def _match_file_names(results: list[dict], images: dict[int, dict], source: str) -> list[dict]:
    """Results that all carry a ``file_name`` (``gdistill predict`` numbers its images 1..N in
    sorted file order, relative to the folder it read) get the id of the ground-truth image with
    that file name, or whose path ends with it ("a.jpg" matches "val/a.jpg"), or that it ends
    with ("/data/val/a.jpg" matches "val/a.jpg"). If no file name matches, the ids are kept
    (another naming); if some do, one that does not is an error."""
    if not results or not all(isinstance(r.get("file_name"), str) for r in results):
        return results
    found = ids_of_file_names([r["file_name"] for r in results], images)
    if not any(found):
        return results
    matched = []
    for i, (r, ids) in enumerate(zip(results, found, strict=True)):
        if not ids:
            raise GdistillError(
                f"{source}: result {i} file_name {r['file_name']!r} is not among the "
                f"ground-truth images' file names"
            )
        if len(ids) > 1:
            # Its image_id cannot decide: gdistill predict numbers the images it read 1..N.
            names = ", ".join(sorted(repr(images[j].get("file_name")) for j in ids)[:3])
            raise GdistillError(
                f"{source}: result {i} file_name {r['file_name']!r} matches several ground-truth "
                f"images ({names}{', ...' if len(ids) > 3 else ''}); predict from the ground "
                "truth's image root so that the names are its file_names"
            )
        matched.append(dict(r, image_id=ids[0]))
    return matched


def _prepare_results(
    results: list[dict], images: dict[int, dict], categories: list[dict], source: str
) -> list[dict]:
    """Copies of ``results`` with compressed RLE, checked against the ground-truth ids and sizes.

    Only the four result keys are kept, so a result's area is its mask area (pycocotools would
    use a "bbox" entry's box area instead).
    """
    category_ids = {c["id"] for c in categories}
    unknown_images = sorted({r["image_id"] for r in results} - images.keys())
    if unknown_images:
        raise GdistillError(
            f"{source}: image_id {_short(unknown_images)} not in the ground-truth images"
        )
    unknown_cats = sorted({r["category_id"] for r in results} - category_ids)
    if unknown_cats:
        raise GdistillError(
            f"{source}: category_id {_short(unknown_cats)} not in the ground-truth categories"
        )
    prepared = []
    for i, r in enumerate(results):
        img = images[r["image_id"]]
        height, width = int(img["height"]), int(img["width"])
        if list(r["segmentation"]["size"]) != [height, width]:
            h, w = r["segmentation"]["size"]
            raise GdistillError(
                f"{source}: result {i} mask is {h}x{w} but image {r['image_id']} is "
                f"{height}x{width}"
            )
        prepared.append({
            "image_id": int(r["image_id"]),
            "category_id": int(r["category_id"]),
            "segmentation": _segmentation_to_rle(r["segmentation"], height, width),
            "score": float(r["score"]),
        })
    return prepared


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise GdistillError(f"{path}: {what} file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:  # tolerates a BOM (Windows tools)
            return json.load(f)
    except json.JSONDecodeError as e:
        raise GdistillError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise GdistillError(f"{path}: cannot read {what} file ({e})") from None


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _percent(value: float) -> float | None:
    return None if value < 0 else float(value) * 100.0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def _short(ids: list) -> str:
    shown = ", ".join(str(i) for i in ids[:5])
    return shown + (f" (and {len(ids) - 5} more)" if len(ids) > 5 else "")


def _short_repr(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."
