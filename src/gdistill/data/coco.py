"""COCO instance annotations: loading, validation, lazy mask decoding and image reading."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from gdistill.errors import GdistillError, InvalidAnnotationError, UnreadableImageError


@dataclass
class CocoAnnotation:
    id: int
    category_id: int
    segmentation: Any  # polygons (list of lists), or RLE dict with str or list counts
    iscrowd: int
    area: float


@dataclass
class CocoImage:
    id: int
    file_name: str
    height: int
    width: int
    annotations: list[CocoAnnotation] = field(default_factory=list)


@dataclass
class CocoDataset:
    """A parsed and validated COCO instances file.

    Category ids are mapped to contiguous ids ``0..K-1`` in increasing category-id order.
    """

    path: Path
    images: list[CocoImage]
    categories: list[dict]
    raw: dict
    dropped: list[str] = field(default_factory=list)  # messages for annotations dropped on load
    repaired: list[str] = field(default_factory=list)  # messages for annotations kept in part

    def __post_init__(self) -> None:
        self._to_contiguous = {c["id"]: i for i, c in enumerate(self.categories)}

    @property
    def class_names(self) -> list[str]:
        return [str(c.get("name", c["id"])) for c in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def contiguous_id(self, category_id: int) -> int:
        if category_id not in self._to_contiguous:
            raise GdistillError(f"{self.path}: unknown category_id {category_id}")
        return self._to_contiguous[category_id]

    def category_id(self, contiguous: int) -> int:
        if not 0 <= contiguous < len(self.categories):
            raise GdistillError(
                f"{self.path}: contiguous class id {contiguous} outside 0..{self.num_classes - 1}"
            )
        return int(self.categories[contiguous]["id"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integral(value: Any) -> Any:
    """A float with an integer value (``480.0``) as that int; anything else unchanged."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compressed_rle_total(counts: bytes) -> int | None:
    """Sum of the runs of a compressed RLE string, decoded as pycocotools' ``rleFrString`` does,
    or None if the string is malformed (a character outside '0'..'o', a value cut short or too
    long, a negative run): pycocotools reads such strings past their end into garbage masks."""
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return 0
    if c.min() < 0 or c.max() > 63:
        return None
    ends = (c & 0x20) == 0  # the last character of each value
    if not ends[-1]:
        return None
    last = np.flatnonzero(ends)
    first = np.concatenate(([0], last[:-1] + 1))
    if (last - first).max() > 11:  # 12 characters = 60 bits; longer overflows
        return None
    shift = 5 * (np.arange(c.size) - np.repeat(first, last - first + 1))
    values = np.add.reduceat((c & 0x1F) << shift, first)
    negative = (c[last] & 0x10) != 0
    values[negative] |= -1 << (shift[last[negative]] + 5)
    runs = values.copy()  # run m > 2 is stored as a delta to run m - 2
    runs[3::2] = np.cumsum(values[1::2])[1:]
    runs[4::2] = np.cumsum(values[2::2])[1:]
    if runs.min() < 0:
        return None
    return int(runs.sum())


def _to_rle(segmentation: Any, height: int, width: int, where: str) -> dict:
    """Validate a COCO segmentation and convert it to one compressed RLE with pycocotools.

    ``where`` prefixes error messages, e.g. ``"train.json: annotation 7"``.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise GdistillError(f"{where} has an empty polygon list")
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                raise GdistillError(f"{where} has a polygon that is not a list of numbers")
            if len(polygon) < 6:
                raise GdistillError(
                    f"{where} has a polygon with fewer than 3 points ({len(polygon)} coordinates)"
                )
            if len(polygon) % 2:
                raise GdistillError(
                    f"{where} has a polygon with an odd number of coordinates ({len(polygon)})"
                )
            # pycocotools rasterises along every edge: NaN, infinite or absurdly distant points
            # exhaust the memory instead of failing.
            limit = 10 * (height + width)
            if not all(math.isfinite(v) and abs(v) <= limit for v in polygon):
                raise GdistillError(
                    f"{where} has a polygon coordinate that is not finite or lies far outside "
                    f"its {height}x{width} image"
                )
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(_is_int(v) for v in size)
            or counts is None
        ):
            raise GdistillError(f"{where} has an RLE without valid 'size' and 'counts'")
        if size != [height, width]:
            swapped = (
                "; one of the two has height and width swapped (COCO writes both as height, width)"
                if size == [width, height]
                else ""
            )
            raise GdistillError(
                f"{where} has an RLE of size {size[0]}x{size[1]} but its image is "
                f"{height}x{width} (height x width){swapped}"
            )
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                raise GdistillError(f"{where} has RLE counts that are not integers >= 0")
            if sum(counts) != height * width:
                raise GdistillError(
                    f"{where} has uncompressed RLE counts summing to {sum(counts)}, "
                    f"expected {height}*{width}={height * width}"
                )
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, (str, bytes)):
            counts_bytes = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
            total = compressed_rle_total(counts_bytes)
            if total != height * width:
                raise GdistillError(
                    f"{where} has a compressed RLE string that is malformed or does not cover "
                    f"{height}*{width}={height * width} pixels"
                )
            return {"size": [height, width], "counts": counts_bytes}
        raise GdistillError(f"{where} has RLE counts that are neither a string nor a list")
    raise GdistillError(f"{where} has a segmentation that is neither polygons nor RLE")


def decode_annotation_mask(ann: CocoAnnotation, height: int, width: int, source: str) -> np.ndarray:
    """Decode one annotation to a mask with pycocotools.

    Returns:
        bool [H, W]
    """
    rle = _to_rle(ann.segmentation, height, width, f"{source}: annotation {ann.id}")
    return mask_utils.decode(rle).astype(bool)


def load_targets(image: CocoImage, dataset: CocoDataset) -> tuple[np.ndarray, np.ndarray]:
    """Labels and masks of the non-crowd annotations of one image, decoded now.

    Returns:
        labels int64 [N] (contiguous ids), masks bool [N, H, W]
    """
    anns = [a for a in image.annotations if not a.iscrowd]
    h, w = image.height, image.width
    labels = np.array([dataset.contiguous_id(a.category_id) for a in anns], dtype=np.int64)
    if not anns:
        return labels, np.zeros((0, h, w), dtype=bool)
    source = str(dataset.path)
    rles = [_to_rle(a.segmentation, h, w, f"{source}: annotation {a.id}") for a in anns]
    masks = mask_utils.decode(rles)  # uint8 [H, W, N], Fortran order
    return labels, np.ascontiguousarray(masks.transpose(2, 0, 1), dtype=bool)


def _read_json(json_path: Path) -> Any:
    if not json_path.is_file():
        raise GdistillError(f"{json_path}: annotation file not found")
    try:
        text = json_path.read_text(encoding="utf-8-sig")  # tolerates a BOM (Windows tools)
    except (OSError, UnicodeDecodeError) as e:
        raise GdistillError(f"{json_path}: cannot read file ({_one_line(e)})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GdistillError(
            f"{json_path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e


def _parse_images(raw: dict, path: Path) -> list[CocoImage]:
    images, seen = [], set()
    for index, img in enumerate(raw["images"]):
        if not isinstance(img, dict):
            raise GdistillError(f"{path}: images[{index}] is not an object")
        image_id = img.get("id")
        if not _is_int(image_id):
            raise GdistillError(f"{path}: images[{index}] has no integer 'id'")
        if image_id in seen:
            raise GdistillError(f"{path}: duplicate image id {image_id}")
        seen.add(image_id)
        file_name = img.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise GdistillError(f"{path}: image {image_id} has no 'file_name'")
        h, w = _integral(img.get("height")), _integral(img.get("width"))  # 480.0 from some tools
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            raise GdistillError(
                f"{path}: image {image_id} needs positive integer height and width, got "
                f"{img.get('height')!r} and {img.get('width')!r}"
            )
        # Files written on Windows may separate folders with backslashes ("train\\0001.jpg").
        images.append(CocoImage(image_id, file_name.replace("\\", "/"), h, w, []))
    ids_by_file: dict[str, list[int]] = {}
    for image in images:
        ids_by_file.setdefault(image.file_name, []).append(image.id)
    shared = [(name, ids) for name, ids in ids_by_file.items() if len(ids) > 1]
    if shared:
        name, ids = shared[0]
        warnings.warn(
            f"{path}: {len(shared)} image file{'s are' if len(shared) > 1 else ' is'} listed under "
            f"several image ids ({name!r}: "
            f"ids {', '.join(map(str, ids))}); each entry counts as an image of its own, in "
            "training as in evaluation",
            stacklevel=3,
        )
    return images


def _parse_categories(raw: dict, path: Path) -> list[dict]:
    categories, seen = [], set()
    for index, cat in enumerate(raw.get("categories", [])):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise GdistillError(f"{path}: categories[{index}] has no integer 'id'")
        if cat["id"] in seen:
            raise GdistillError(f"{path}: duplicate category id {cat['id']}")
        seen.add(cat["id"])
        categories.append(cat)
    return sorted(categories, key=lambda c: c["id"])


def _parse_annotations(
    raw: dict,
    path: Path,
    images: dict[int, CocoImage],
    category_ids: set[int],
    check_masks: bool,
    drop_invalid: bool,
    dropped: list[str],
    repaired: dict[int, str],
) -> set[int]:
    """Attach each annotation to its image; returns the ids of those dropped (``drop_invalid``),
    whose messages are appended to ``dropped``. With ``drop_invalid``, polygon parts of fewer than
    3 points beside valid parts are removed and the rest kept: ``repaired`` maps the annotation's
    id to a message, and its ``segmentation`` in ``raw`` is the one without them."""
    seen: set[int] = set()
    dropped_ids: set[int] = set()
    oversized: list[str] = []  # annotations whose 'area' exceeds their image
    for index, ann in enumerate(raw["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise GdistillError(f"{path}: annotations[{index}] has no integer 'id'")
        ann_id = ann["id"]
        where = f"{path}: annotation {ann_id}"
        if ann_id in seen:
            raise GdistillError(f"{path}: duplicate annotation id {ann_id}")
        seen.add(ann_id)
        image = images.get(ann.get("image_id")) if _is_int(ann.get("image_id")) else None
        if image is None:
            raise GdistillError(f"{where} references unknown image_id {ann.get('image_id')!r}")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
            raise GdistillError(
                f"{where} references unknown category_id {ann.get('category_id')!r} "
                f"({_listing(sorted(category_ids), 'no categories')})"
            )
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):
            raise GdistillError(f"{where} has iscrowd={iscrowd!r}, expected 0 or 1")
        area = ann.get("area")
        segmentation = ann.get("segmentation")
        if drop_invalid and segmentation is not None:
            segmentation = _without_degenerate_parts(segmentation)
            if segmentation is not ann["segmentation"]:
                removed = len(ann["segmentation"]) - len(segmentation)
                repaired[ann_id] = (
                    f"{where}: removed {removed} of its {len(ann['segmentation'])} polygon parts "
                    "(fewer than 3 points each, no area), kept the rest"
                )
                ann["segmentation"] = segmentation
        try:
            if "segmentation" not in ann:
                raise GdistillError(
                    f"{where} has no 'segmentation' (masks are needed, not only boxes)"
                )
            if check_masks:
                rle = _to_rle(segmentation, image.height, image.width, where)
                decoded_area = float(mask_utils.area(rle))
                if decoded_area == 0:
                    raise GdistillError(f"{where} has an empty mask (decoded area 0)")
                if _is_number(area) and area > image.height * image.width:
                    oversized.append(f"annotation {ann_id}: {area:g} > {image.height}x{image.width}")
                if not _is_number(area) or not 0 < area <= image.height * image.width:  # NaN too
                    # COCO's size buckets read it: null, a string or 0 beside a real mask
                    # would put the object in the wrong bucket or break the evaluation, and
                    # above 1e10 pycocotools ignores the object.
                    area = ann["area"] = decoded_area
        except GdistillError as e:
            if not drop_invalid:
                raise InvalidAnnotationError(str(e)) from None
            dropped.append(str(e))
            dropped_ids.add(ann_id)
            repaired.pop(ann_id, None)
            continue
        area = float(area) if _is_number(area) else 0.0
        image.annotations.append(
            CocoAnnotation(ann_id, ann["category_id"], segmentation, int(iscrowd), area)
        )
    if oversized:
        warnings.warn(
            f"{path}: {len(oversized)} annotations have an 'area' larger than their image "
            f"({oversized[0]}{', ...' if len(oversized) > 1 else ''}); their mask's area is used",
            stacklevel=3,
        )
    return dropped_ids


def _without_degenerate_parts(segmentation: Any) -> Any:
    """A polygon list without its parts of fewer than 3 points (2 or 4 numbers: they enclose no
    pixel), when at least one part remains; otherwise the segmentation itself, for the checks to
    judge."""
    if not isinstance(segmentation, list):
        return segmentation

    def degenerate(part: Any) -> bool:
        return isinstance(part, list) and len(part) in (2, 4) and all(_is_number(v) for v in part)

    kept = [part for part in segmentation if not degenerate(part)]
    return kept if kept and len(kept) < len(segmentation) else segmentation


def load_coco(
    json_path: str | Path,
    require_annotations: bool = True,
    check_masks: bool = True,
    drop_invalid: bool = False,
) -> CocoDataset:
    """Load and validate a COCO instances file.

    Args:
        require_annotations: if False, only ``images`` is required and annotations are ignored
            (unlabelled sources).
        check_masks: validate every segmentation and reject masks that decode to zero pixels.
            Only the RLE conversion and its area are computed here; pixels are decoded lazily
            by :func:`load_targets`.
        drop_invalid: drop annotations whose mask is invalid (polygon with < 3 points, empty
            mask, bad RLE) instead of raising; the messages are kept in ``dataset.dropped``.
            COCO train2017 needs this: e.g. annotation 918 is a degenerate zero-area polygon.
            A polygon part of < 3 points beside valid parts is removed instead and the
            annotation kept (``dataset.repaired``).
    """
    path = Path(json_path)
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise GdistillError(f"{path}: top level must be a JSON object")
    required = ("images", "annotations", "categories") if require_annotations else ("images",)
    for key in required:
        if key not in raw:
            raise GdistillError(f"{path}: missing top-level key '{key}'")
    for key in ("images", "annotations", "categories"):
        if key in raw and not isinstance(raw[key], list):
            raise GdistillError(f"{path}: top-level '{key}' must be a list")
    images = _parse_images(raw, path)
    categories = _parse_categories(raw, path)
    dropped: list[str] = []
    repaired: dict[int, str] = {}
    if require_annotations:
        dropped_ids = _parse_annotations(
            raw,
            path,
            {img.id: img for img in images},
            {c["id"] for c in categories},
            check_masks,
            drop_invalid,
            dropped,
            repaired,
        )
        if dropped_ids:
            # raw is what evaluation scores against and what split writes: without them too.
            raw = {**raw, "annotations": [a for a in raw["annotations"] if a["id"] not in dropped_ids]}
        if dropped:
            warnings.warn(
                f"{path}: dropped {len(dropped)} invalid annotation(s), first: {dropped[0]}",
                stacklevel=2,
            )
        if repaired:
            warnings.warn(
                f"{path}: removed polygon parts of fewer than 3 points from {len(repaired)} "
                f"annotation(s), first: {next(iter(repaired.values()))}",
                stacklevel=2,
            )
    return CocoDataset(path, images, categories, raw, dropped, list(repaired.values()))


def _listing(ids: list[int], none: str) -> str:
    """``categories: 1, 2, 3`` (at most 10 shown), or ``none``."""
    if not ids:
        return f"the file has {none}"
    shown = ", ".join(str(i) for i in ids[:10])
    return f"categories: {shown}" + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def to_uint8(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB uint8."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        # 16-bit (I;16*) and 32-bit integer images are taken as 16-bit data and scaled to 8 bits
        # (PIL's own convert would clip at 255); float images are clipped to 0..255.
        array = np.asarray(image).astype(np.float64)
        if mode != "F":
            array = np.clip(array, 0, 65535) * (255.0 / 65535.0)
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning about byte transparency
    # Alpha is dropped (no compositing); CMYK, L, LA, P, 1, YCbCr use PIL's conversions.
    return image.convert("RGB")


EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 (as stored) when absent or unreadable."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block must not stop an image whose pixels are fine
        return 1
    return value if value in range(1, 9) else 1


# How to turn stored pixels into the displayed image, per EXIF orientation (2-8).
_TO_DISPLAYED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def as_displayed(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (unchanged without one)."""
    orientation = exif_orientation(image)
    return image.transpose(_TO_DISPLAYED[orientation]) if orientation != 1 else image


def displayed_size(stored_size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(H, W) of an image as viewers show it: orientations 5-8 turn it by 90 degrees."""
    h, w = stored_size
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def reads_as_displayed(
    stored_size: tuple[int, int], orientation: int, expected_size: tuple[int, int] | None
) -> bool:
    """Whether an image is read turned as its EXIF orientation says.

    Labelling tools disagree on which pixels annotations refer to (VIA, labelme and CVAT draw
    on the displayed image, older ones on the stored pixels), so the annotation file's size
    decides: the displayed image when the size is the displayed one (or when there is no
    annotation), the stored pixels when only the stored size matches. Where both match
    (a square image turned by 90 degrees, or a flip or half turn) the displayed image wins,
    as in detectron2.
    """
    if orientation == 1:
        return False
    return expected_size is None or tuple(expected_size) == displayed_size(stored_size, orientation)


def read_image(path: Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as RGB, turned as its EXIF orientation says unless the annotation
    file's size shows the annotations refer to the stored pixels (``reads_as_displayed``).

    Args:
        expected_size: (H, W) from the annotation file; a size that is neither the stored nor
            the displayed one is an error.

    Returns:
        uint8 [H, W, 3]
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            stored, orientation = (image.height, image.width), exif_orientation(image)
            _check_size(path, stored, orientation, expected_size)
            image.load()  # forces the decode so truncated files fail here
            if reads_as_displayed(stored, orientation, expected_size):
                image = image.transpose(_TO_DISPLAYED[orientation])
            array = np.array(to_uint8(image), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"{path}: cannot read image ({_one_line(e)})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImageError(f"{path}: corrupt or truncated image ({_one_line(e)})") from e
    return array


def _check_size(
    path: Path, stored: tuple[int, int], orientation: int, expected: tuple[int, int] | None
) -> None:
    """Fail when the annotation file's (H, W) is neither the stored nor the displayed size."""
    shown = displayed_size(stored, orientation)
    if expected is None or tuple(expected) in (stored, shown):
        return
    turned = ""
    if shown != stored:
        turned = f" ({shown[0]}x{shown[1]} as displayed: EXIF orientation {orientation})"
    raise GdistillError(
        f"{path}: image is {stored[0]}x{stored[1]} (height x width){turned} but the annotation"
        f" file says {expected[0]}x{expected[1]}"
    )


def _near_miss(images_dir: Path, file_name: str) -> str:
    """", but NAME is there" for a file that exists in another letter case (a JSON written on a
    case-insensitive file system) or right in ``images_dir`` (a folder in the file_name that the
    images do not sit in); else ""."""
    relative = Path(file_name)
    folder = images_dir / relative.parent
    try:
        same = [p for p in folder.iterdir() if p.name.lower() == relative.name.lower()]
    except OSError:  # no such folder, or not readable
        same = []
    if same:
        return f", but {same[0]} is there (letter case differs)"
    if relative.parent != Path(".") and (images_dir / relative.name).is_file():
        return f", but {images_dir / relative.name} is there (file_names are paths under the images folder)"
    return ""


def check_image_files(dataset: CocoDataset, images_dir: Path) -> None:
    """Fail before training, not hours into it, when images of ``dataset`` are missing, empty,
    not images, or of another size than the annotation file says (headers only: a file cut
    short after its header still fails when first read)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise GdistillError(f"{images_dir}: image folder not found (for {dataset.path})")
    missing = [img.file_name for img in dataset.images if not (images_dir / img.file_name).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise GdistillError(
            f"{dataset.path}: image file {images_dir / missing[0]} not found{more}"
            f"{_near_miss(images_dir, missing[0])}"
        )
    empty = [img.file_name for img in dataset.images if (images_dir / img.file_name).stat().st_size == 0]
    if empty:
        more = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
        raise GdistillError(
            f"{dataset.path}: image file {images_dir / empty[0]} is empty (0 bytes){more}"
        )
    undecided = []  # an EXIF orientation that leaves the size as it is: the size cannot tell
    for img in dataset.images:
        size = (img.height, img.width)
        orientation = check_image_header(images_dir / img.file_name, size)
        if orientation != 1 and displayed_size(size, orientation) == size:
            undecided.append((img.file_name, orientation))
        elif orientation in (5, 6, 7, 8):
            _check_polygons_fit(img, orientation, f"{dataset.path}: {images_dir / img.file_name}")
    if undecided:
        more = f" and {len(undecided) - 1} more" if len(undecided) > 1 else ""
        warnings.warn(
            f"{dataset.path}: the EXIF orientation of {undecided[0][0]}{more} ({undecided[0][1]})"
            " leaves the size unchanged, so the annotation file cannot show which pixels the"
            " masks refer to: read turned as displayed, as labelling tools show images; if the"
            " masks were drawn on the stored pixels, save the images without the orientation tag",
            stacklevel=2,
        )


def _check_polygons_fit(img: CocoImage, orientation: int, where: str) -> None:
    """A photo turned by 90 degrees (EXIF 5-8) whose annotation file gives its size as stored,
    but whose polygons run past that size and fit the displayed one, was labelled on the
    displayed image and sized by a tool reading the stored one: its masks would be cut and land
    on other pixels."""
    parts = [part for a in img.annotations if isinstance(a.segmentation, list)
             for part in a.segmentation if isinstance(part, list) and all(map(_is_number, part))]
    xs = [v for part in parts for v in part[0::2]]
    ys = [v for part in parts for v in part[1::2]]
    if not xs:
        return
    reach_x, reach_y = max(xs), max(ys)
    slack = 2  # COCO polygons may run a pixel or two past the border
    past = reach_x > img.width + slack or reach_y > img.height + slack
    if past and reach_x <= img.height + slack and reach_y <= img.width + slack:
        raise GdistillError(
            f"{where}: polygons reach x={reach_x:g}, y={reach_y:g}, past the width {img.width} "
            f"and height {img.height} that the annotation file gives (the stored size; EXIF "
            f"orientation {orientation} turns the photo) but inside the displayed size: give "
            f"width {img.height} and height {img.width}"
        )


def check_image_header(path: Path, expected_size: tuple[int, int] | None = None) -> int:
    """Fail if ``path`` is not a readable image, or of a size that is neither ``expected_size``
    (H, W) nor that turned as its EXIF orientation says, from its header alone (fast: the
    pixels are not decoded). Returns the EXIF orientation (1 = none)."""
    try:
        with Image.open(path) as image:
            stored, orientation = (image.height, image.width), exif_orientation(image)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"{path}: cannot read image ({_one_line(e)})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UnreadableImageError(f"{path}: corrupt image ({_one_line(e)})") from e
    _check_size(path, stored, orientation, expected_size)
    return orientation
