"""Labelled-fraction splits of a COCO training set (paper protocol: by image, seeded)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from gdistill.data.coco import CocoDataset
from gdistill.errors import GdistillError


def _num_labelled(path: Path, num_images: int, fraction: float | None, count: int | None) -> int:
    if (fraction is None) == (count is None):
        raise GdistillError(f"{path}: give exactly one of fraction or count")
    if fraction is not None:
        if isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise GdistillError(f"{path}: fraction {fraction} must be in (0, 1], e.g. 0.1 = 10 %")
        # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
        n = math.floor(fraction * num_images + 1e-9)
        if n == 0:
            raise GdistillError(
                f"{path}: fraction {fraction} of {num_images} images gives 0 labelled images"
            )
        return n
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise GdistillError(f"{path}: count {count} must be a positive integer")
    if count > num_images:
        raise GdistillError(f"{path}: count {count} is larger than the {num_images} images")
    return count


def split_labelled(
    dataset: CocoDataset,
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 0,
    exclude_labelled: bool = False,
) -> tuple[dict, dict]:
    """Sample labelled images; give exactly one of ``fraction`` or ``count``.

    ``fraction`` is in (0, 1] (0.1 = 10 %, 0.001 = 0.1 %) and gives
    ``floor(fraction * num_images)`` images, counted over ALL images of the file. Only images
    with at least one non-crowd annotation are eligible (training drops the others anyway, like
    Mask2Former's FILTER_EMPTY_ANNOTATIONS); ``fraction=1.0`` takes all of them. The choice is
    ``numpy.random.default_rng(seed)`` without replacement among the eligible images.

    Returns:
        labelled: chosen images (JSON order) + all their annotations + categories + the other
            top-level keys (info, licenses, ...).
        unlabelled: all images (the paper's protocol; labelled ones included), or only the
            others with ``exclude_labelled``; ``"annotations": []`` so it is still valid COCO.
    """
    path = dataset.path
    if seed < 0:
        raise GdistillError(f"{path}: seed must be non-negative, got {seed}")
    num_images = len(dataset.images)
    n = _num_labelled(path, num_images, fraction, count)
    eligible = [
        i for i, img in enumerate(dataset.images) if any(not a.iscrowd for a in img.annotations)
    ]
    if fraction == 1.0:
        n = len(eligible)
    if n > len(eligible):
        raise GdistillError(
            f"{path}: {n} labelled images requested but only {len(eligible)} of {num_images} "
            f"images have non-crowd annotations"
        )
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(eligible), size=n, replace=False)
    chosen = {dataset.images[eligible[int(k)]].id for k in picked}

    kept_ann_ids = {a.id for img in dataset.images for a in img.annotations}  # drops invalid ones
    raw = dataset.raw
    raw_images = raw["images"]
    labelled_images = [img for img in raw_images if img["id"] in chosen]
    labelled_anns = [
        a for a in raw.get("annotations", []) if a["image_id"] in chosen and a["id"] in kept_ann_ids
    ]
    if exclude_labelled:
        unlabelled_images = [img for img in raw_images if img["id"] not in chosen]
        if not unlabelled_images:
            raise GdistillError(
                f"{path}: all {num_images} images are labelled, so excluding them leaves no "
                "unlabelled images; label fewer, or leave out --exclude-labelled"
            )
    else:
        unlabelled_images = list(raw_images)
    return (
        _coco_dict(raw, labelled_images, labelled_anns),
        _coco_dict(raw, unlabelled_images, []),
    )


def _coco_dict(raw: dict, images: list[dict], annotations: list[dict]) -> dict:
    """``raw`` with its top-level key order kept and images/annotations replaced."""
    out = {}
    for key, value in raw.items():
        out[key] = {"images": images, "annotations": annotations}.get(key, value)
    out.setdefault("images", images)
    out.setdefault("annotations", annotations)
    out.setdefault("categories", [])
    return out


def _write_json(data: dict, path: Path) -> None:
    text = json.dumps(data, sort_keys=False, separators=(",", ":"), ensure_ascii=True) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_split(labelled: dict, unlabelled: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/labelled.json`` and ``out_dir/unlabelled.json``; same dicts → same bytes."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GdistillError(f"{out_dir}: cannot create output folder ({e})") from e
    paths = out_dir / "labelled.json", out_dir / "unlabelled.json"
    _write_json(labelled, paths[0])
    _write_json(unlabelled, paths[1])
    return paths
