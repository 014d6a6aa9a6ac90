"""Training and evaluation augmentations.

Labelled images get large-scale jitter (LSJ, detectron2 ``RandomFlip`` → ``ResizeScale`` →
``FixedSizeCrop``). Unlabelled images get the same geometry once — the *weak* view — and a
photometric-only *strong* view computed from the weak pixels, so both views stay pixel-aligned and
the teacher's pseudo-labels on the weak view apply to the strong view without warping.

All randomness comes from the ``torch.Generator`` passed to ``__call__``, so a sample depends only
on the generator's seed (see ``gdistill.data.loader.sample_seed``), not on the worker process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

# Pixel value of the padding around an image, in training crops and in padded batches alike
# (``data.pad_value``): the authors' FixedSizeCrop pads with grey 128 (after normalisation about
# 0.1, 0.2, 0.4; black would be -2).
PAD_VALUE = 128


def _uniform(generator: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


@dataclass(frozen=True)
class Geometry:
    """One LSJ draw: flip, resize to (resized_h, resized_w), crop (top, left, crop_h, crop_w),
    then pad right/bottom to size × size."""

    flip: bool
    resized_h: int
    resized_w: int
    top: int
    left: int
    crop_h: int
    crop_w: int
    size: int


def sample_geometry(
    height: int,
    width: int,
    size: int,
    scale_range: tuple[float, float],
    flip: bool,
    generator: torch.Generator,
) -> Geometry:
    """Draw one large-scale-jitter geometry for an image of `height` × `width`.

    Scale s ~ U[lo, hi]; the image is resized to fit in (s·size, s·size) keeping its aspect ratio.
    Like detectron2's ``FixedSizeCrop``, one uniform fraction places the crop on both axes.
    """
    flipped = flip and _uniform(generator) < 0.5
    s = _uniform(generator, *scale_range)
    factor = min(s * size / height, s * size / width)
    resized_h = max(1, int(height * factor + 0.5))
    resized_w = max(1, int(width * factor + 0.5))
    u = _uniform(generator)
    top = int(max(resized_h - size, 0) * u + 0.5)
    left = int(max(resized_w - size, 0) * u + 0.5)
    return Geometry(
        flip=flipped,
        resized_h=resized_h,
        resized_w=resized_w,
        top=top,
        left=left,
        crop_h=min(size, resized_h),
        crop_w=min(size, resized_w),
        size=size,
    )


def apply_geometry_image(image: Tensor, geo: Geometry) -> Tensor:
    """Flip, resize (bilinear, antialiased) and crop; no padding.

    Args:
        image: uint8 [3, H, W].
    Returns:
        uint8 [3, crop_h, crop_w].
    """
    if geo.flip:
        image = F.hflip(image)
    image = F.resize(
        image,
        [geo.resized_h, geo.resized_w],
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )
    return F.crop(image, geo.top, geo.left, geo.crop_h, geo.crop_w)


def _nearest_source(out_len: int, in_len: int, start: int, count: int) -> Tensor:
    # Centre-aligned nearest neighbour (PIL NEAREST, torch "nearest-exact"): output pixel i reads
    # input floor((i + 0.5) * in / out). Indexing only the cropped range avoids materialising
    # the full resized masks (up to (2 * size)^2 each).
    dst = torch.arange(start, start + count, dtype=torch.float64)
    src = torch.floor((dst + 0.5) * (in_len / out_len)).long()
    return src.clamp_(0, in_len - 1)


def apply_geometry_masks(masks: Tensor, geo: Geometry) -> Tensor:
    """Flip, nearest-resize and crop instance masks; no padding.

    Args:
        masks: bool [N, H, W].
    Returns:
        bool [N, crop_h, crop_w].
    """
    _, h, w = masks.shape
    rows = _nearest_source(geo.resized_h, h, geo.top, geo.crop_h)
    cols = _nearest_source(geo.resized_w, w, geo.left, geo.crop_w)
    if geo.flip:
        cols = (w - 1) - cols
    return masks[:, rows[:, None], cols[None, :]]


def _pad(x: Tensor, size: int, fill: int = 0) -> Tensor:
    """Pad the last two dims on the right/bottom to size × size with ``fill``."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    return F.pad(x, [0, 0, size - w, size - h], fill=fill)


def _valid_mask(geo: Geometry) -> Tensor:
    valid = torch.zeros(geo.size, geo.size, dtype=torch.bool)
    valid[: geo.crop_h, : geo.crop_w] = True
    return valid


def color_jitter(
    image: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator,
) -> Tensor:
    """torchvision ``ColorJitter`` semantics (random order, factors U[1 - x, 1 + x], hue U[-h, h]).

    Args:
        image: uint8 [3, H, W].
    """
    for op in torch.randperm(4, generator=generator).tolist():
        if op == 0 and brightness > 0:
            factor = _uniform(generator, max(0.0, 1 - brightness), 1 + brightness)
            image = F.adjust_brightness(image, factor)
        elif op == 1 and contrast > 0:
            factor = _uniform(generator, max(0.0, 1 - contrast), 1 + contrast)
            image = F.adjust_contrast(image, factor)
        elif op == 2 and saturation > 0:
            factor = _uniform(generator, max(0.0, 1 - saturation), 1 + saturation)
            image = F.adjust_saturation(image, factor)
        elif op == 3 and hue > 0:
            image = F.adjust_hue(image, _uniform(generator, -hue, hue))
    return image


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Blur with kernel side 2·ceil(3σ) + 1, shrunk to fit the image (reflect padding).

    Args:
        image: uint8 [3, H, W].
    """
    kernel = 2 * math.ceil(3 * sigma) + 1
    kernel = min(kernel, 2 * min(image.shape[-2:]) - 1)
    if kernel < 3:
        return image
    return F.gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def strong_photometric(image: Tensor, generator: torch.Generator) -> Tensor:
    """GD's strong view: ColorJitter(.4, .4, .4, .1) p 0.8 → grayscale p 0.2 → blur σ ~ U[.1, 2]
    p 0.5. Photometric only: pixel positions never move.

    Args:
        image: uint8 [3, H, W].
    """
    if _uniform(generator) < 0.8:
        image = color_jitter(image, 0.4, 0.4, 0.4, 0.1, generator)
    if _uniform(generator) < 0.2:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if _uniform(generator) < 0.5:
        image = gaussian_blur(image, _uniform(generator, 0.1, 2.0))
    return image


def _check_image(image: Tensor) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {image.dtype} {list(image.shape)}")


class LabelledAugment:
    """Large-scale jitter for labelled images (paper's COCO pipeline).

    Horizontal flip p 0.5 → resize to fit (s·size)² with s ~ U[scale_range] keeping the aspect ratio
    → random crop to at most size × size → pad right/bottom with ``pad_value`` to size × size. The image is
    resized bilinearly with antialiasing, masks with centre-aligned nearest neighbour. Instances
    whose mask is empty afterwards are dropped. `color_jitter` > 0 adds
    ColorJitter(c, c, c, min(c/4, 0.1)) with p 0.8 (off in the paper).
    """

    def __init__(
        self,
        size: int,
        scale_range: tuple[float, float] = (0.1, 2.0),
        flip: bool = True,
        color_jitter: float = 0.0,
        pad_value: int = PAD_VALUE,
    ) -> None:
        if size <= 0 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"bad LSJ parameters size={size} scale_range={scale_range}")
        self.pad_value = pad_value
        self.size = size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip
        self.color_jitter = color_jitter

    def __call__(
        self, image: Tensor, masks: Tensor, labels: Tensor, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """
        Args:
            image: uint8 [3, H, W]; masks: bool [N, H, W]; labels: int64 [N].
        Returns:
            {"image": uint8 [3, S, S], "masks": bool [M, S, S], "labels": int64 [M],
             "valid": bool [S, S]} with S = size and M <= N.
        """
        _check_image(image)
        if masks.shape[1:] != image.shape[1:] or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"masks {list(masks.shape)} / labels {list(labels.shape)} do not match "
                f"image {list(image.shape)}"
            )
        geo = sample_geometry(
            image.shape[1], image.shape[2], self.size, self.scale_range, self.flip, generator
        )
        out = apply_geometry_image(image, geo)
        if self.color_jitter > 0 and _uniform(generator) < 0.8:
            c = self.color_jitter
            out = color_jitter(out, c, c, c, min(c / 4, 0.1), generator)
        masks = apply_geometry_masks(masks.bool(), geo)
        keep = masks.flatten(1).any(dim=1)
        return {
            "image": _pad(out, self.size, self.pad_value),
            "masks": _pad(masks[keep], self.size),
            "labels": labels[keep].long(),
            "valid": _valid_mask(geo),
        }


class UnlabelledAugment:
    """Weak and strong views of one unlabelled image with identical geometry.

    weak = LSJ (as ``LabelledAugment``); strong = ``strong_photometric`` of the weak pixels. The
    photometric ops run on the un-padded crop, so padding is ``pad_value`` in both views and the
    jitter's statistics (contrast mean, blur borders) never see padding.
    """

    def __init__(
        self,
        size: int,
        scale_range: tuple[float, float] = (0.1, 2.0),
        flip: bool = True,
        pad_value: int = PAD_VALUE,
    ) -> None:
        if size <= 0 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"bad LSJ parameters size={size} scale_range={scale_range}")
        self.pad_value = pad_value
        self.size = size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip

    def __call__(self, image: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """
        Args:
            image: uint8 [3, H, W].
        Returns:
            {"weak": uint8 [3, S, S], "strong": uint8 [3, S, S], "valid": bool [S, S]}.
        """
        _check_image(image)
        geo = sample_geometry(
            image.shape[1], image.shape[2], self.size, self.scale_range, self.flip, generator
        )
        weak = apply_geometry_image(image, geo)
        strong = strong_photometric(weak, generator)
        return {
            "weak": _pad(weak, self.size, self.pad_value),
            "strong": _pad(strong, self.size, self.pad_value),
            "valid": _valid_mask(geo),
        }


def eval_size(height: int, width: int, short_side: int, max_side: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge`` output size (h, w): short side → `short_side`, long side
    capped at `max_side`, rounded with int(x + 0.5)."""
    scale = short_side / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_side:
        cap = max_side / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def resize_for_eval(image: Tensor, short_side: int, max_side: int) -> Tensor:
    """Test-time resize (bilinear, antialiased).

    Args:
        image: uint8 [3, H, W].
    Returns:
        uint8 [3, h, w] with h, w from ``eval_size``.
    """
    _check_image(image)
    return resize_to(image, eval_size(image.shape[1], image.shape[2], short_side, max_side))


def resize_to(image: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 [3, H, W] → uint8 [3, h, w], bilinear and antialiased: every test-time resize, so
    that an exported model's inputs (``export.fit_to_input``) are ``predict``'s pixels."""
    if tuple(size) == tuple(image.shape[1:]):
        return image
    return F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
