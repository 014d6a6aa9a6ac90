"""Pictures of predictions, pseudo-labels and training curves (PNG files).

Everything draws with PIL or with matplotlib ``Figure`` objects rendered by the Agg backend;
pyplot is never imported, so using this module does not change the caller's matplotlib backend.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import math
import re
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps, font_manager, get_data_path
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from gdistill.config import load_config
from gdistill.distill.schedule import handover_step
from gdistill.errors import GdistillError

CELL_SIZE = 320  # long side of one picture in a grid, in pixels
HEADER_HEIGHT = 24  # column titles of a grid
GAP = 4  # pixels between grid cells
CURVE_SIZE = (8.0, 4.5)  # inches at CURVE_DPI: 800 x 450 pixels
QUALITY_SIZE = (12.0, 4.5)  # the precision / recall figure: 1200 x 450 pixels
CURVE_DPI = 100


# ----------------------------------------------------------------------------- colours, text


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed RGB colour per class id: the 20 tab20 colours (saturated ones first), then
    golden-ratio hues."""
    label = int(label)
    if 0 <= label < 20:
        index = 2 * label if label < 10 else 2 * (label - 10) + 1
        rgb = colormaps["tab20"].colors[index]
    else:
        rgb = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.7, 0.95)
    return tuple(int(round(255 * c)) for c in rgb)


@functools.lru_cache(maxsize=4)
def _font(size: int = 12) -> ImageFont.ImageFont:
    # matplotlib's DejaVu Sans draws accented Latin, Greek and Cyrillic class names, where
    # Pillow's default font has ASCII glyphs only (é, ß, Ж came out as boxes).
    try:
        return ImageFont.truetype(str(Path(get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _label_font(text: str, size: int) -> ImageFont.ImageFont:
    """DejaVu Sans, or for a label with letters it lacks (Chinese, Japanese, Korean, ...) the
    first font of the system's that has them all; where none has, DejaVu Sans and a warning."""
    missing = "".join(dict.fromkeys(ch for ch in text if not _has_glyph(_font(size), ch)))
    if not missing:
        return _font(size)
    path = _font_with(missing)
    if path is None:
        _warn_missing_glyphs(missing[:8])
        return _font(size)
    return _font_at(path, size)


@functools.lru_cache(maxsize=4096)  # every label of every picture asks again
def _has_glyph(font: ImageFont.ImageFont, ch: str) -> bool:
    if ch.isspace() or unicodedata.category(ch).startswith(("C", "M")):
        return True  # spaces, controls and combining marks draw nothing of their own
    return np.asarray(font.getmask(ch)).tobytes() != np.asarray(font.getmask("\U0010fffd")).tobytes()


@functools.lru_cache(maxsize=64)
def _font_with(chars: str) -> str | None:
    """The path of a system font that draws every one of ``chars`` (searched on each first
    use, so a font installed since is found)."""
    paths = sorted(p for p in font_manager.findSystemFonts()
                   if "LastResort" not in p and "DejaVu" not in p)
    for path in paths:
        try:
            font = _font_at(path, 16)
        except OSError:
            continue
        if all(_has_glyph(font, ch) for ch in chars):
            return path
    return None


@functools.lru_cache(maxsize=16)
def _font_at(path: str, size: int) -> ImageFont.ImageFont:
    return ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=64)
def _warn_missing_glyphs(chars: str) -> None:  # once per set of letters
    warnings.warn(
        f"no font here draws {chars!r} of a class name: it is drawn as boxes in the pictures; "
        "install a font that has it (e.g. Noto Sans CJK: Debian's fonts-noto-cjk)",
        stacklevel=4,
    )


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


# ----------------------------------------------------------------------------- overlays


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_hwc(image) -> np.ndarray:
    """uint8 [H, W, 3] from an array [H, W, 3] or a tensor [3, H, W]."""
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        image = image.permute(1, 2, 0)
    array = _to_numpy(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image [H, W, 3], got {array.dtype} {array.shape}")
    return array


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary erosion, ``steps`` times; outside the image counts as background."""
    out = mask
    for _ in range(steps):
        padded = np.pad(out, 1, constant_values=False)
        out = out & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return out


def _class_name(label: int, class_names: Sequence[str]) -> str:
    return str(class_names[label]) if 0 <= label < len(class_names) else str(label)


def label_font_size(height: int, width: int) -> int:
    """Label text height in pixels for a picture: about 1/45 of its geometric mean side, 9 to 64
    (12 px at 640 × 480, 23 at 1024², the most from about 2900²)."""
    return int(min(64, max(9, round((height * width) ** 0.5 / 45))))


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: int):
    """``text``, cut with "…" until it is at most ``max_width`` pixels wide, and its bbox."""
    bbox = draw.textbbox((0, 0), text, font=font)
    while bbox[2] - bbox[0] > max_width and len(text) > 1:
        text = text[:-2] + "…"
        bbox = draw.textbbox((0, 0), text, font=font)
    return text, bbox


def _label_anchor(mask: np.ndarray) -> tuple[int, int]:
    """(y, x) of a mask pixel in the middle of its bulk: of the mask's most interior pixels, the
    one nearest their centroid. A mask of several parts gets its label on the thickest."""
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    crop = mask[y0 : ys.max() + 1, x0 : xs.max() + 1]
    stride = max(1, max(crop.shape) // 128)  # the bulk of a large mask is found at low resolution
    core = crop[::stride, ::stride]
    if not core.any():  # thin parts between the samples
        core, stride = crop, 1
    for _ in range(64):  # peel the mask until one more step would empty it
        inner = _erode(core, 1)
        if not inner.any():
            break
        core = inner
    cy, cx = np.nonzero(core)
    k = int(np.argmin((cy - cy.mean()) ** 2 + (cx - cx.mean()) ** 2))
    return int(y0 + cy[k] * stride), int(x0 + cx[k] * stride)


def _free_place(x: int, y: int, w: int, h: int, width: int, height: int,
                placed: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """A ``w`` × ``h`` box inside the picture at (x, y), or moved down or up by whole box
    heights to the nearest place that overlaps no box in ``placed`` (if there is none, at
    (x, y)); as (x0, y0, x1, y1)."""

    def inside(dy: int) -> tuple[int, int, int, int]:
        x0, y0 = max(0, min(x, width - w)), max(0, min(y + dy, height - h))
        return x0, y0, x0 + w, y0 + h

    def free(box: tuple[int, int, int, int]) -> bool:
        return all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]
                   for b in placed)

    for k in range(height // max(h, 1) + 1):
        for dy in (k * h, -k * h) if k else (0,):
            if free(box := inside(dy)):
                return box
    return inside(0)


def overlay_instances(
    image,
    masks,
    labels,
    scores=None,
    class_names: Sequence[str] = (),
    score_threshold: float = 0.5,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw instances on an image.

    Args:
        image: uint8 [H, W, 3] (array) or uint8 [3, H, W] (tensor).
        masks: bool [N, H, W]. labels: [N] contiguous class ids. scores: [N] or ``None`` (ground
            truth: every mask is drawn and the text is the class name only).
        score_threshold: instances scoring below it are not drawn.
    Returns:
        uint8 [H, W, 3]: translucent class-coloured masks (larger ones first so small ones stay
        visible), an opaque contour per mask and a "name 0.93" label on each mask's bulk, sized
        to the picture and kept inside it and clear of the other labels where there is room.
    """
    base = _as_hwc(image)
    height, width = base.shape[:2]
    masks_np = _to_numpy(masks).astype(bool)
    if masks_np.ndim != 3 or masks_np.shape[1:] != (height, width):
        raise ValueError(f"masks must be [N, {height}, {width}], got {masks_np.shape}")
    labels_np = _to_numpy(labels).astype(np.int64).reshape(-1)
    scores_np = None if scores is None else _to_numpy(scores).astype(np.float64).reshape(-1)
    keep = np.ones(len(masks_np), bool) if scores_np is None else scores_np >= score_threshold
    areas = masks_np.sum(axis=(1, 2))
    order = [i for i in np.argsort(-areas, kind="stable") if keep[i] and areas[i] > 0]

    out = base.astype(np.float32)
    thickness = max(1, min(height, width) // 256)
    for i in order:
        color = np.array(class_color(labels_np[i]), np.float32)
        m = masks_np[i]
        out[m] = out[m] * (1.0 - alpha) + color * alpha
        out[m & ~_erode(m, thickness)] = color * 0.75
    picture = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(picture)
    size = label_font_size(height, width)
    placed: list[tuple[int, int, int, int]] = []
    # The surest instances choose their label's place first.
    by_score = order if scores_np is None else sorted(order, key=lambda i: -scores_np[i])
    for i in by_score:
        text = _class_name(int(labels_np[i]), class_names)
        if scores_np is not None:
            text += f" {scores_np[i]:.2f}"
        font = _label_font(text, size)
        text, (left, top, right, bottom) = _fit_text(draw, text, font, width - 4)
        box_w, box_h = right - left + 4, bottom - top + 2
        y, x = _label_anchor(masks_np[i])
        box = _free_place(x - box_w // 2, y - box_h // 2, box_w, box_h, width, height, placed)
        placed.append(box)
        color = class_color(labels_np[i])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=color)
        draw.text((box[0] + 2 - left, box[1] + 1 - top), text, fill=_text_color(color), font=font)
    return np.asarray(picture)


# ----------------------------------------------------------------------------- grids


def _fit(image: np.ndarray, masks, cell: int) -> tuple[np.ndarray, torch.Tensor]:
    """Scale an image [H, W, 3] and its masks [N, H', W'] (any resolution) so the image's long
    side is ``cell``: (uint8 [h, w, 3], bool [N, h, w])."""
    height, width = image.shape[:2]
    scale = cell / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if scale < 1:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    else:  # enlarge small images pixel by pixel
        x = F.interpolate(x, size=size, mode="nearest")
    scaled = x[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    m = torch.as_tensor(_to_numpy(masks)).bool()
    if m.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got {tuple(m.shape)}")
    if len(m):
        m = F.interpolate(m[None].float(), size=size, mode="nearest")[0] > 0.5
    else:
        m = torch.zeros((0, *size), dtype=torch.bool)
    return scaled, m


def _save_grid(path: str | Path, rows: list[list[np.ndarray]], titles: Sequence[str]) -> Path:
    """Paste pictures into a table (rows × len(titles)) with column titles; PNG."""
    if not rows:
        raise ValueError("nothing to draw: no images")
    columns = len(titles)
    col_w = [max(row[c].shape[1] for row in rows) for c in range(columns)]
    row_h = [max(p.shape[0] for p in row) for row in rows]
    width = sum(col_w) + GAP * (columns + 1)
    height = HEADER_HEIGHT + sum(row_h) + GAP * len(rows)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    x = GAP
    for c, title in enumerate(titles):
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        tx = x + (col_w[c] - (right - left)) // 2 - left
        ty = (HEADER_HEIGHT - (bottom - top)) // 2 - top
        draw.text((tx, ty), title, fill=(0, 0, 0), font=font)
        x += col_w[c] + GAP
    y = HEADER_HEIGHT
    for r, row in enumerate(rows):
        x = GAP
        for c, picture in enumerate(row):
            ox = x + (col_w[c] - picture.shape[1]) // 2
            oy = y + (row_h[r] - picture.shape[0]) // 2
            canvas.paste(Image.fromarray(picture), (ox, oy))
            x += col_w[c] + GAP
        y += row_h[r] + GAP
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_prediction_grid(
    path: str | Path,
    images: Sequence,
    gt: Sequence[tuple],
    predictions: Sequence,
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    cell: int = CELL_SIZE,
) -> Path:
    """One row per image: ground truth | prediction, each scaled to ``cell`` pixels on its long
    side.

    Args:
        images: uint8 [H, W, 3] arrays (or uint8 [3, H, W] tensors), any sizes.
        gt: per image ``(labels [N], masks bool [N, H, W])``.
        predictions: per image an ``Instances`` (scores, labels, masks bool [M, H, W]).
    """
    if not len(images) == len(gt) == len(predictions):
        raise ValueError(
            f"got {len(images)} images, {len(gt)} ground truths, {len(predictions)} predictions"
        )
    rows = []
    for image, (gt_labels, gt_masks), pred in zip(images, gt, predictions, strict=True):
        picture = _as_hwc(image)
        small, masks = _fit(picture, gt_masks, cell)
        left = overlay_instances(small, masks, gt_labels, None, class_names)
        small, masks = _fit(picture, pred.masks, cell)
        right = overlay_instances(
            small, masks, pred.labels, pred.scores, class_names, score_threshold
        )
        rows.append([left, right])
    titles = ["ground truth", f"prediction (score >= {score_threshold:g})"]
    return _save_grid(path, rows, titles)


def save_pseudo_label_grid(
    path: str | Path,
    weak: torch.Tensor,
    strong: torch.Tensor,
    pseudo_targets: Sequence[dict],
    class_names: Sequence[str],
    max_images: int = 8,
    cell: int = CELL_SIZE,
) -> Path:
    """One row per unlabelled image: weak view | strong view | pseudo-labels on the weak view.

    Args:
        weak, strong: uint8 [B, 3, H, W] (the views the teacher and the student see).
        pseudo_targets: per image ``{"labels": [N], "masks": bool [N, h, w]}`` at stride 4 (any
            resolution: nearest-upsampled to H × W); an optional ``"scores"`` [N] is printed.
    """
    if not weak.shape[0] == strong.shape[0] == len(pseudo_targets):
        raise ValueError("weak, strong and pseudo_targets must have the same batch size")
    size = tuple(weak.shape[-2:])
    rows = []
    for i in range(min(max_images, weak.shape[0])):
        target = pseudo_targets[i]
        masks = torch.as_tensor(target["masks"]).detach().cpu().bool()
        if len(masks):
            masks = F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5
        else:
            masks = torch.zeros((0, *size), dtype=torch.bool)
        weak_i = _as_hwc(weak[i].detach().cpu())
        small, small_masks = _fit(weak_i, masks, cell)
        scores = target.get("scores")
        labelled = overlay_instances(
            small, small_masks, target["labels"], scores, class_names, score_threshold=0.0
        )
        strong_small, _ = _fit(_as_hwc(strong[i].detach().cpu()), masks[:0], cell)
        rows.append([small, strong_small, labelled])
    return _save_grid(path, rows, ["weak view", "strong view", "pseudo-labels (weak view)"])


# ----------------------------------------------------------------------------- curves


def read_csv_columns(path: str | Path) -> dict[str, list[str]]:
    """A CSV file as ``{column: [raw strings]}``; a missing or empty file is ``{}``."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {key: [row.get(key) or "" for row in rows] for key in rows[0] if key is not None}


def to_floats(values: Sequence[str]) -> np.ndarray:
    """Strings → float64, with "None", "" and anything unparsable as NaN."""
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def _new_figure(size: tuple[float, float] = CURVE_SIZE, columns: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=size, dpi=CURVE_DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, columns, i + 1) for i in range(columns)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def _mark_handover(ax, handover: int | None) -> None:
    """A dotted line where the teacher was handed over to the student (stage B)."""
    if handover is None:
        return
    ax.axvline(handover, color="gray", ls=":", lw=1)
    ax.annotate("hand-over", (handover, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                textcoords="offset points", fontsize=8, color="gray")


def _line_style(x: np.ndarray) -> dict:
    """A single point is drawn as a marker (a line through one point shows nothing)."""
    return {"marker": "o", "ms": 4} if len(x) == 1 else {}


def _save_figure(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=CURVE_DPI)
    return path


def _finite(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(steps) & np.isfinite(values)
    return steps[ok], values[ok]


def _plot_losses(metrics: dict[str, list[str]], path: Path, handover: int | None = None) -> Path | None:
    steps = to_floats(metrics.get("step", []))
    fig, (ax,) = _new_figure()
    drawn, positive = 0, True
    unsup = to_floats(metrics.get("loss_unsup", []))
    # Without an unsupervised loss (stage A) the supervised loss is the total: draw it once.
    if np.any(unsup[np.isfinite(unsup)]):
        keys = ["loss", "loss_sup", "loss_unsup"]
    else:
        keys = ["loss"] if "loss" in metrics else ["loss_sup"]
    labels = {"loss": "total", "loss_sup": "supervised", "loss_unsup": "unsupervised"}
    for key in keys:
        if key not in metrics:
            continue
        x, y = _finite(steps, to_floats(metrics[key]))
        if not len(y):
            continue
        ax.plot(x, y, label=labels[key], lw=1.2, **_line_style(x))
        positive &= bool(np.all(y > 0))
        drawn += 1
    if not drawn:
        return None
    ys = [line.get_ydata() for line in ax.get_lines()]
    low, high = min(float(np.min(y)) for y in ys), max(float(np.max(y)) for y in ys)
    if positive and high / low > 20:
        ax.set_yscale("log")
    phases = metrics.get("phase")
    if phases:
        for i in range(len(phases)):
            if (i == 0 or phases[i] != phases[i - 1]) and math.isfinite(steps[i]):
                # A log row ends its window: the phase began after the row before it.
                start = steps[i] if i == 0 else handover if handover is not None else steps[i - 1]
                if i > 0:
                    ax.axvline(start, color="gray", ls=":", lw=1)
                ax.annotate(
                    phases[i],
                    (start, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(3, -12),
                    textcoords="offset points",
                    fontsize=8,
                    color="gray",
                )
    ax.set_ylabel("loss")
    ax.set_title("training losses (averaged over each log window)")
    _legend(ax)
    return _save_figure(fig, path)


def _legend(ax, **kwargs) -> None:
    """A legend for the labelled lines drawn, if any (matplotlib warns on an empty one: a run
    shorter than one log window draws no loss line)."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend(**kwargs)


def _plot_ap(evals: dict[str, list[str]], path: Path, handover: int | None = None) -> Path | None:
    steps = to_floats(evals.get("step", []))
    fig, (ax,) = _new_figure()
    drawn = 0
    names = model_names(stage_b="teacher_AP" in evals)
    for who, color in (("student", "tab:blue"), ("teacher", "tab:orange"), ("ema", "tab:green")):
        for stat, style in (("AP", "-"), ("AP50", "--")):
            key = f"{who}_{stat}"
            if key not in evals:
                continue
            x, y = _finite(steps, to_floats(evals[key]))
            if not len(y):
                continue
            ax.plot(x, y, style, color=color, marker="o", ms=3, label=f"{names[who]} {stat}")
            drawn += 1
            if stat == "AP":
                best = int(np.argmax(y))
                ax.annotate(
                    f"{y[best]:.1f}",
                    (x[best], y[best]),
                    xytext=(0, 6 + 10 * (drawn // 2)),  # apart where two models tie
                    textcoords="offset points",
                    ha="center",
                    fontsize=8,
                    color=color,
                )
    if not drawn:
        return None
    _mark_handover(ax, handover)
    ax.set_ylabel("mask AP (%)")
    ax.set_title("validation mask AP")
    _legend(ax)
    return _save_figure(fig, path)


def _plot_pseudo_label_count(
    metrics: dict[str, list[str]], path: Path, handover: int | None = None
) -> Path | None:
    if "pl_per_image" not in metrics:
        return None
    x, y = _finite(to_floats(metrics.get("step", [])), to_floats(metrics["pl_per_image"]))
    if not len(y):
        return None
    fig, (ax,) = _new_figure()
    ax.plot(x, y, color="tab:green", lw=1.2, label="kept per unlabelled image", **_line_style(x))
    _mark_handover(ax, handover)
    ax.set_ylabel("pseudo-labels per image")
    ax.set_title("pseudo-labels kept by the teacher's filter")
    _legend(ax)
    return _save_figure(fig, path)


_QUALITY = re.compile(r"^(student|teacher)_pl_(precision|recall)@(.+)$")


def _plot_pseudo_label_quality(
    evals: dict[str, list[str]], path: Path, handover: int | None = None
) -> Path | None:
    found: dict[str, dict[str, dict[float, str]]] = {}
    for key in evals:
        match = _QUALITY.match(key)
        if match:
            who, what, t = match.groups()
            try:
                found.setdefault(who, {}).setdefault(what, {})[float(t)] = key
            except ValueError:
                continue
    # Stage B logs the teacher's quality; stage A the model's own (the future teacher).
    who = "teacher" if "teacher" in found else "student"
    if who not in found:
        return None
    steps = to_floats(evals.get("step", []))
    fig, axes = _new_figure(QUALITY_SIZE, columns=2)
    drawn = 0
    for ax, what in zip(axes, ("precision", "recall"), strict=True):
        keys = found[who].get(what, {})
        cmap = colormaps["viridis"]
        for j, t in enumerate(sorted(keys)):
            x, y = _finite(steps, to_floats(evals[keys[t]]))
            if not len(y):
                continue
            ax.plot(
                x,
                y,
                marker="o",
                ms=3,
                color=cmap(j / max(1, len(keys) - 1)),
                label=f"score > {t:g}",
            )
            drawn += 1
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(what)
        ax.set_title(f"{model_names(who == 'teacher')[who]}'s pseudo-label {what} "
                     "(IoU >= 0.5, right class)")
        _mark_handover(ax, handover)
        if ax.get_legend_handles_labels()[1]:  # not the hand-over's line alone
            ax.legend(fontsize=8)
        else:  # precision is undefined while no pseudo-label passes any threshold
            ax.text(0.5, 0.5, "no pseudo-label kept yet", transform=ax.transAxes, ha="center",
                    color="gray")
    xs = [x for ax in axes for line in ax.get_lines() for x in line.get_xdata()]
    if xs:  # both panels over the same iterations, also where one is empty
        low, high = min(xs), max(xs)
        pad = max(1.0, 0.05 * (high - low))
        for ax in axes:
            ax.set_xlim(low - pad, high + pad)
    if not drawn:
        return None
    return _save_figure(fig, path)


def model_names(stage_b: bool) -> dict[str, str]:
    """How logs and pictures name the models of an eval.csv: in stage A the one trained is the
    future teacher, not a student."""
    return {"student": "student" if stage_b else "model", "teacher": "teacher", "ema": "EMA model"}


def _handover_step(run_dir: Path) -> int | None:
    """The iteration a stage-B run handed its teacher over, from its config.yaml."""
    try:
        cfg = load_config(run_dir / "config.yaml")
    except (GdistillError, OSError):
        return None
    return handover_step(cfg.distill.burn_in, cfg.distill.burnin_iters) or None


def plot_training_curves(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """PNG curves of a run folder (``metrics.csv``, ``eval.csv``) into ``out_dir`` (default
    ``run_dir/report``): losses.png, ap.png, pseudo_labels.png, pseudo_label_quality.png — each
    only when its columns hold numbers. Returns the written paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        found = "is a file, not a run folder" if run_dir.exists() else "run folder not found"
        raise GdistillError(f"{run_dir}: {found}")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = read_csv_columns(run_dir / "metrics.csv")
    evals = read_csv_columns(run_dir / "eval.csv")
    handover = _handover_step(run_dir) if metrics.get("phase") else None
    written = [
        _plot_losses(metrics, out / "losses.png", handover),
        _plot_ap(evals, out / "ap.png", handover),
        _plot_pseudo_label_count(metrics, out / "pseudo_labels.png", handover),
        _plot_pseudo_label_quality(evals, out / "pseudo_label_quality.png", handover),
    ]
    return [p for p in written if p is not None]
