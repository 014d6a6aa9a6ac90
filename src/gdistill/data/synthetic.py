"""The embedded synthetic dataset: textured shapes with occlusion, written as COCO instances.

Six categories = three shapes x two appearance families, so a category is told apart by shape
*and* by colour/texture:

* ``warm_*``: solid fill, red to orange, with soft shading;
* ``striped_*``: blue fill crossed by light-cyan parallel stripes; every object has a darker
  one-pixel outline.

Scenes hold 1-12 instances of varied size and rotation, painted in order so later objects cover
earlier ones; the annotation is the visible part. A placement that would leave any instance
with less than 40 % of its area (or fewer than 30 pixels) visible is rejected and retried, so no
unannotated slivers remain. Backgrounds are a two-colour gradient of low saturation with smooth
noise; unlabelled clutter (thin lines, small green or grey blobs) never uses a class colour.

Generation is deterministic: image ``i`` of a split comes from its own generator seeded by
``(seed, split, i)``, so it does not depend on how many images are generated.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from gdistill.errors import GdistillError
from gdistill.progress import progress_bar

GENERATOR_NAME = "gdistill.data.synthetic"
GENERATOR_VERSION = 1

SHAPES = ("circle", "triangle", "rectangle")
FAMILIES = ("warm", "striped")
SYNTH_CLASS_NAMES: list[str] = [f"{family}_{shape}" for family in FAMILIES for shape in SHAPES]

_SPLIT_CODES = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SceneParams:
    """Scene statistics. Lengths are in pixels of a 160 px image and scale with the image side."""

    min_instances: int = 1
    max_instances: int = 12
    min_size: float = 12.0  # diameter of the circle enclosing an object
    max_size: float = 60.0
    min_visible_fraction: float = 0.4  # of the object's full area
    min_visible_pixels: int = 30  # not scaled
    placement_tries: int = 20
    stripe_period: tuple[float, float] = (5.0, 8.0)
    rim_darkening: tuple[float, float] = (0.55, 0.75)  # outline brightness factor
    max_lines: int = 4
    max_blobs: int = 6
    blob_radius: tuple[float, float] = (2.0, 4.5)
    brightness: tuple[float, float] = (0.75, 1.2)
    pixel_noise: float = 3.0  # std of per-pixel noise, 0-255 scale
    reference_size: int = 160


DEFAULT_PARAMS = SceneParams()


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """HSV in [0, 1] (hue wraps) → float32 RGB [3] in [0, 255]."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _warm_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0.0, 0.1), rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))


def _cool_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0.57, 0.66), rng.uniform(0.7, 1.0), rng.uniform(0.5, 0.85))


def _stripe_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0.48, 0.54), rng.uniform(0.3, 0.55), rng.uniform(0.9, 1.0))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation two-colour linear gradient plus smooth noise → float32 [S, S, 3]."""
    hue = rng.uniform()
    c0 = _hsv(hue, rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.9))
    c1 = _hsv(hue + rng.uniform(-0.15, 0.15), rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.9))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)
    t = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    image = c0 + t[:, :, None] * (c1 - c0)
    coarse = rng.normal(0.0, 1.0, size=(8, 8)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    return image + (rng.uniform(3.0, 8.0) * smooth)[:, :, None]


def _disc(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float,
          angle: float) -> np.ndarray:
    """Pixels (centres ``yy``, ``xx``) inside a rotated ellipse → bool of the grids' shape."""
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _convex_polygon(yy: np.ndarray, xx: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Pixels inside a convex polygon with (x, y) ``vertices`` [V, 2] in either winding order."""
    nxt = np.roll(vertices, -1, axis=0)
    winding = np.sign(np.sum(vertices[:, 0] * nxt[:, 1] - nxt[:, 0] * vertices[:, 1]))
    inside = np.ones(np.broadcast_shapes(yy.shape, xx.shape), dtype=bool)
    for (ax, ay), (bx, by) in zip(vertices, nxt, strict=True):
        inside &= winding * ((bx - ax) * (yy - ay) - (by - ay) * (xx - ax)) >= 0.0
    return inside


def _segment(yy: np.ndarray, xx: np.ndarray, p: np.ndarray, q: np.ndarray,
             width: float) -> np.ndarray:
    """Pixels within ``width / 2`` of the segment from ``p`` to ``q`` ((x, y) each)."""
    d = q - p
    t = ((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / max(float(d @ d), 1e-6)
    t = np.clip(t, 0.0, 1.0)
    return (xx - p[0] - t * d[0]) ** 2 + (yy - p[1] - t * d[1]) ** 2 <= (width / 2.0) ** 2


def _shape_mask(rng: np.random.Generator, shape: str, radius: float, cy: float, cx: float,
                yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Rasterise one shape of circumradius ``radius`` centred at (cy, cx) on the pixel grids."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    if shape == "circle":
        return _disc(yy, xx, cy, cx, radius, radius, 0.0)
    if shape == "triangle":
        corners = angle + np.array([0.0, 2.0, 4.0]) * math.pi / 3 + rng.uniform(-0.2, 0.2, 3)
        lengths = radius * rng.uniform(0.85, 1.0, 3)
    else:
        half = math.atan(1.0 / rng.uniform(1.0, 1.6))  # half the angle the short side subtends
        corners = angle + np.array([half, math.pi - half, math.pi + half, -half])
        lengths = np.full(4, radius)
    vertices = np.stack([cx + lengths * np.cos(corners), cy + lengths * np.sin(corners)], axis=1)
    return _convex_polygon(yy, xx, vertices)


def _rim(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` [h, w] with a 4-neighbour outside it (a one-pixel outline)."""
    p = np.pad(mask, 1)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~interior


def _paint_object(rng: np.random.Generator, family: str, yy: np.ndarray, xx: np.ndarray,
                  scale: float, params: SceneParams) -> np.ndarray:
    """Appearance of one object over its box (pixel grids ``yy``, ``xx``) → float32 [h, w, 3]."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    along = (xx - xx.mean()) * math.cos(angle) + (yy - yy.mean()) * math.sin(angle)
    if family == "warm":
        colour = _warm_colour(rng)
        extent = max(float(np.abs(along).max()), 1.0)
        shade = 1.0 + rng.uniform(0.05, 0.2) * along / extent
        return colour * shade[:, :, None]
    base, stripe = _cool_colour(rng), _stripe_colour(rng)
    period = max(rng.uniform(*params.stripe_period) * scale, 3.0)
    phase = rng.uniform()
    on = np.mod(along / period + phase, 1.0) < 0.45
    return np.where(on[:, :, None], stripe, base)


def _add_clutter(rng: np.random.Generator, image: np.ndarray, scale: float,
                 params: SceneParams) -> None:
    """Paint thin lines and small blobs in non-class colours onto ``image`` [S, S, 3] in place."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for _ in range(int(rng.integers(0, params.max_lines + 1))):
        p, q = rng.uniform(0.0, size, 2), rng.uniform(0.0, size, 2)
        width = rng.uniform(0.8, 2.0) * max(scale, 0.5)
        grey = rng.uniform(0.1, 0.95)
        colour = _hsv(rng.uniform(), rng.uniform(0.0, 0.2), grey)
        image[_segment(yy, xx, p, q, width)] = colour
    for _ in range(int(rng.integers(0, params.max_blobs + 1))):
        ry, rx = rng.uniform(*params.blob_radius, 2) * scale
        cy, cx = rng.uniform(0.0, size, 2)
        if rng.uniform() < 0.6:  # green
            colour = _hsv(rng.uniform(0.25, 0.42), rng.uniform(0.35, 0.8), rng.uniform(0.3, 0.8))
        else:  # grey
            colour = _hsv(0.0, 0.0, rng.uniform(0.1, 0.9))
        image[_disc(yy, xx, cy, cx, ry, rx, rng.uniform(0.0, math.pi))] = colour


def render_image(
    rng: np.random.Generator, image_size: int, params: SceneParams = DEFAULT_PARAMS
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Render one scene.

    Returns the image uint8 [H, W, 3] (H = W = ``image_size``) and, in painting order, one
    ``(class_index, visible_mask bool [H, W])`` per instance; class indices are 0-based into
    :data:`SYNTH_CLASS_NAMES` and the visible masks of one image are disjoint.
    """
    size = image_size
    scale = size / params.reference_size
    image = _background(rng, size)
    _add_clutter(rng, image, scale, params)

    owner = np.full((size, size), -1, dtype=np.int64)  # index of the instance seen at each pixel
    classes: list[int] = []
    full_areas: list[int] = []
    visible: list[int] = []
    wanted = int(rng.integers(params.min_instances, params.max_instances + 1))
    lo, hi = params.min_size * scale, params.max_size * scale
    for _ in range(wanted):
        class_index = int(rng.integers(len(SYNTH_CLASS_NAMES)))
        family, shape = FAMILIES[class_index // 3], SHAPES[class_index % 3]
        for _ in range(params.placement_tries):
            radius = min(rng.uniform(lo, hi) / 2.0, size / 2.0 - 1.0)
            cy, cx = rng.uniform(radius + 0.5, size - radius - 0.5, 2)
            y0, x0 = max(int(cy - radius) - 1, 0), max(int(cx - radius) - 1, 0)
            y1, x1 = min(int(cy + radius) + 2, size), min(int(cx + radius) + 2, size)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
            local = _shape_mask(rng, shape, radius, cy, cx, yy, xx)
            area = int(local.sum())
            if area < params.min_visible_pixels:
                continue
            covered = owner[y0:y1, x0:x1][local]
            lost = np.bincount(covered[covered >= 0], minlength=len(classes))
            remaining = np.asarray(visible, dtype=np.int64) - lost
            needed = np.maximum(params.min_visible_fraction * np.asarray(full_areas),
                                params.min_visible_pixels)
            if np.any(remaining < needed):
                continue
            appearance = _paint_object(rng, family, yy, xx, scale, params)
            appearance[_rim(local)] *= rng.uniform(*params.rim_darkening)
            image[y0:y1, x0:x1][local] = appearance[local]
            owner[y0:y1, x0:x1][local] = len(classes)
            visible = [*remaining.tolist(), area]
            full_areas.append(area)
            classes.append(class_index)
            break

    image = image * rng.uniform(*params.brightness)
    image = image + rng.normal(0.0, params.pixel_noise, size=image.shape)
    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    instances = [(c, owner == k) for k, c in enumerate(classes)]
    return image_u8, instances


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_CODES[split],
                                                                       index])))


def _write_split(out_dir: Path, split: str, count: int, seed: int, image_size: int,
                 info: dict, bar: tqdm) -> Path:
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(max(count - 1, 0))))
    images: list[dict] = []
    annotations: list[dict] = []
    for index in range(count):
        image, instances = render_image(_image_rng(seed, split, index), image_size)
        file_name = f"{split}/{index:0{digits}d}.png"
        Image.fromarray(image).save(out_dir / "images" / file_name, format="PNG",
                                    compress_level=1)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": image_size,
                       "width": image_size})
        for class_index, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": class_index + 1,
                "segmentation": {"size": [int(v) for v in rle["size"]],
                                 "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            })
        bar.update(1)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(SYNTH_CLASS_NAMES)]
    coco = {"info": {**info, "split": split}, "images": images, "annotations": annotations,
            "categories": categories}
    json_path = out_dir / f"{split}.json"
    json_path.write_text(json.dumps(coco, separators=(",", ":")) + "\n", encoding="utf-8")
    return json_path


def generate_synthetic(out_dir: Path, train_images: int = 1000, val_images: int = 200,
                       seed: int = 0, image_size: int = 160,
                       progress: bool = True) -> tuple[Path, Path]:
    """Write the synthetic dataset under ``out_dir`` and return ``(train.json, val.json)``.

    Layout: ``out_dir/images/{train,val}/NNNNNN.png`` and ``out_dir/{train,val}.json`` (COCO
    instances, compressed-RLE masks of the visible parts, category ids 1..6, image ids from 1).
    The same arguments give byte-identical files.
    """
    out_dir = Path(out_dir)
    if train_images < 1 or val_images < 0:
        raise GdistillError(f"{out_dir}: need train_images >= 1 and val_images >= 0, "
                            f"got {train_images} and {val_images}")
    if image_size < 32:
        raise GdistillError(f"{out_dir}: image_size must be at least 32, got {image_size}")
    if seed < 0:
        raise GdistillError(f"{out_dir}: seed must be non-negative, got {seed}")
    info = {
        "description": "gdistill synthetic shapes (instance segmentation demo data)",
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "train_images": train_images,
        "val_images": val_images,
        "parameters": asdict(DEFAULT_PARAMS),
    }
    with progress_bar(total=train_images + val_images, desc="synthetic data", unit="img",
                      disable=not progress) as bar:
        train_json = _write_split(out_dir, "train", train_images, seed, image_size, info, bar)
        val_json = _write_split(out_dir, "val", val_images, seed, image_size, info, bar)
    return train_json, val_json
