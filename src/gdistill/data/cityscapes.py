"""Cityscapes fine instance labels → COCO instances JSON (the 8 "thing" classes).

Reads the official layout::

    root/gtFine/{split}/{city}/{city}_xxxxxx_yyyyyy_gtFine_instanceIds.png
    root/leftImg8bit/{split}/{city}/{city}_xxxxxx_yyyyyy_leftImg8bit.png

An ``instanceIds`` pixel value ``v >= 1000`` is instance ``v % 1000`` of class ``v // 1000``; a
value ``v < 1000`` is the class id alone. For a thing class that means a crowd region (a group
the annotators did not split), written as one ``iscrowd=1`` annotation per image and class.
Stuff classes (road, sky, ...) and the void classes are ignored.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from gdistill.errors import GdistillError
from gdistill.progress import progress_bar

# (Cityscapes label id, name, COCO supercategory) of the thing classes, in COCO category-id order.
THING_CLASSES: list[tuple[int, str, str]] = [
    (24, "person", "human"),
    (25, "rider", "human"),
    (26, "car", "vehicle"),
    (27, "truck", "vehicle"),
    (28, "bus", "vehicle"),
    (31, "train", "vehicle"),
    (32, "motorcycle", "vehicle"),
    (33, "bicycle", "vehicle"),
]
CITYSCAPES_CATEGORIES: list[dict] = [
    {"id": i + 1, "name": name, "supercategory": supercategory}
    for i, (_, name, supercategory) in enumerate(THING_CLASSES)
]
_LABEL_TO_CATEGORY = {label_id: i + 1 for i, (label_id, _, _) in enumerate(THING_CLASSES)}

_GT_SUFFIX = "_gtFine_instanceIds.png"
_IMAGE_SUFFIX = "_leftImg8bit.png"
# Single-channel modes PIL gives for 8/16/32-bit grayscale PNGs ("I;16" for 16-bit since
# Pillow 10-ish, "I" before).
_ID_MODES = ("I", "I;16", "I;16B", "I;16L", "L")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def read_instance_ids(path: Path) -> np.ndarray:
    """Read an ``instanceIds`` PNG.

    Returns:
        int64 [H, W] pixel values (class id, or class id * 1000 + instance index)
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in _ID_MODES:
                raise GdistillError(
                    f"{path}: instanceIds PNG has mode {image.mode}, expected single-channel "
                    "16-bit grayscale"
                )
            return np.asarray(image).astype(np.int64)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise GdistillError(f"{path}: cannot read PNG ({_one_line(e)})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise GdistillError(f"{path}: corrupt or truncated PNG ({_one_line(e)})") from e


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise GdistillError(f"{path}: cannot read image ({_one_line(e)})") from e


def instances_from_ids(ids: np.ndarray, min_area: int = 0) -> list[dict]:
    """COCO annotations (without ``id``/``image_id``) for the thing instances of one label map.

    Args:
        ids: int [H, W] instanceIds values.
        min_area: instances (and crowd regions) with fewer pixels are skipped.

    Returns:
        dicts with ``category_id``, ``segmentation`` (compressed RLE, str counts), ``area``,
        ``bbox`` ([x, y, w, h]) and ``iscrowd``, in increasing pixel-value order.
    """
    annotations = []
    for value in np.unique(ids).tolist():
        label_id, iscrowd = (value // 1000, 0) if value >= 1000 else (value, 1)
        category_id = _LABEL_TO_CATEGORY.get(label_id)
        if category_id is None:
            continue
        mask = ids == value
        area = int(mask.sum())
        if area < min_area:
            continue
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
        annotations.append(
            {
                "category_id": category_id,
                "segmentation": segmentation,
                "area": float(area),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": iscrowd,
            }
        )
    return annotations


def convert_cityscapes(
    root: str | Path, split: str, out_json: str | Path, min_area: int = 0, progress: bool = True
) -> Path:
    """Convert the fine instance labels of one split to a COCO instances JSON.

    Image ids are 1..N and annotation ids 1..M in sorted (city, file) order, so the output bytes
    depend only on the input. Image ``file_name`` is relative to ``root/leftImg8bit``, e.g.
    ``train/aachen/aachen_000000_000019_leftImg8bit.png``.

    Returns:
        ``out_json``
    """
    root, out_json = Path(root), Path(out_json)
    if not root.is_dir():
        raise GdistillError(f"{root}: Cityscapes root folder not found")
    if min_area < 0:
        raise GdistillError(f"min_area must be >= 0, got {min_area}")
    gt_dir = root / "gtFine" / split
    gt_files = sorted(gt_dir.glob(f"*/*{_GT_SUFFIX}"))
    if not gt_files:
        raise GdistillError(
            f"{root}: no *{_GT_SUFFIX} files for split '{split}' (looked in {gt_dir}/<city>/)"
        )
    images_root = root / "leftImg8bit"
    labelled = {f"{p.parent.name}/{p.name[: -len(_GT_SUFFIX)]}" for p in gt_files}
    unlabelled = sorted(
        p for p in (images_root / split).glob(f"*/*{_IMAGE_SUFFIX}")
        if f"{p.parent.name}/{p.name[: -len(_IMAGE_SUFFIX)]}" not in labelled
    )
    if unlabelled:
        # a partly extracted gtFine archive would otherwise shrink the split unnoticed
        more = f" and {len(unlabelled) - 1} more" if len(unlabelled) > 1 else ""
        warnings.warn(
            f"{unlabelled[0]}{more}: no *{_GT_SUFFIX} in {gt_dir}: left out of {out_json.name}",
            stacklevel=2,
        )
    images, annotations = [], []
    bar = progress_bar(gt_files, desc=f"cityscapes {split}", disable=not progress)
    for image_id, gt_path in enumerate(bar, 1):
        city = gt_path.parent.name
        stem = gt_path.name[: -len(_GT_SUFFIX)]
        file_name = f"{split}/{city}/{stem}{_IMAGE_SUFFIX}"
        image_path = images_root / file_name
        if not image_path.is_file():
            raise GdistillError(f"{gt_path}: its image {image_path} not found")
        ids = read_instance_ids(gt_path)
        height, width = ids.shape
        h, w = _image_size(image_path)
        if (h, w) != (height, width):
            raise GdistillError(
                f"{gt_path}: label map is {height}x{width} (height x width) but its image "
                f"{image_path} is {h}x{w}"
            )
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for ann in instances_from_ids(ids, min_area):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    coco = {
        "info": {"description": f"Cityscapes gtFine {split} instances (8 thing classes)"},
        "images": images,
        "annotations": annotations,
        "categories": CITYSCAPES_CATEGORIES,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(coco, separators=(",", ":")) + "\n", encoding="utf-8")
    return out_json
