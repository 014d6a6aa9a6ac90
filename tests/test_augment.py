import pytest
import torch
import torch.nn.functional as nnf

from gdistill.data.augment import (
    PAD_VALUE,
    LabelledAugment,
    UnlabelledAugment,
    eval_size,
    gaussian_blur,
    resize_for_eval,
    sample_geometry,
)

BACKGROUND = (10, 20, 30)
COLOURS = [(230, 40, 40), (40, 220, 60), (50, 60, 240)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scene(h: int, w: int, boxes: list[tuple[int, int, int, int]]):
    """Image with one uniquely coloured box per instance; box = (y0, y1, x0, x1), end exclusive."""
    image = torch.tensor(BACKGROUND, dtype=torch.uint8)[:, None, None].repeat(1, h, w)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for k, (y0, y1, x0, x1) in enumerate(boxes):
        image[:, y0:y1, x0:x1] = torch.tensor(COLOURS[k], dtype=torch.uint8)[:, None, None]
        masks[k, y0:y1, x0:x1] = True
    return image, masks, torch.arange(len(boxes), dtype=torch.int64)


def _nearest_colour(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] → int [H, W]: 0 = background, k + 1 = COLOURS[k]."""
    palette = torch.tensor([BACKGROUND, *COLOURS], dtype=torch.float32)  # [P, 3]
    dist = (image.float().permute(1, 2, 0)[:, :, None, :] - palette).pow(2).sum(-1)
    return dist.argmin(-1)


def _boundary_band(mask: torch.Tensor) -> torch.Tensor:
    """Pixels within one pixel of the mask's boundary (dilation minus erosion)."""
    m = mask[None, None].float()
    dilated = nnf.max_pool2d(m, 3, stride=1, padding=1)
    eroded = -nnf.max_pool2d(-m, 3, stride=1, padding=1)
    return (dilated - eroded)[0, 0].bool()


def test_geometry_hand_computed_resize_and_pad():
    # 20x40 image, size 32, s = 1: factor min(32/20, 32/40) = 0.8 → 16x32, pad 16 rows.
    image, masks, labels = _scene(20, 40, [(5, 15, 10, 30), (3, 8, 33, 38)])
    out = LabelledAugment(32, scale_range=(1.0, 1.0), flip=False)(image, masks, labels, _gen(0))
    assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.uint8
    assert out["masks"].shape == (2, 32, 32) and out["masks"].dtype == torch.bool
    expected_valid = torch.zeros(32, 32, dtype=torch.bool)
    expected_valid[:16] = True
    assert torch.equal(out["valid"], expected_valid)
    assert (out["image"][:, 16:] == PAD_VALUE).all()  # grey, as the authors' crop
    assert not out["masks"][:, 16:].any()
    # Output pixel i reads input floor((i + 0.5) * 1.25) (pixel centres, like PIL NEAREST):
    # rows 5..15 → 4..12, cols 10..30 → 8..24; rows 3..8 → 2..6, cols 33..38 → 26..30.
    expected = torch.zeros(2, 32, 32, dtype=torch.bool)
    expected[0, 4:12, 8:24] = True
    expected[1, 2:6, 26:30] = True
    assert torch.equal(out["masks"], expected)


def test_geometry_crop_when_larger():
    # s = 2: factor min(64/20, 64/40) = 1.6 → 32x64; crop 32x32, horizontal offset only.
    for seed in range(5):
        geo = sample_geometry(20, 40, 32, (2.0, 2.0), False, _gen(seed))
        assert (geo.resized_h, geo.resized_w) == (32, 64)
        assert (geo.crop_h, geo.crop_w, geo.top) == (32, 32, 0)
        assert 0 <= geo.left <= 32


def test_labelled_masks_stay_aligned_exact_upscale():
    # x2 upscale then crop: bilinear and nearest agree exactly on which box a pixel belongs to.
    image, masks, labels = _scene(32, 32, [(3, 11, 4, 14), (16, 28, 18, 30), (20, 26, 2, 9)])
    aug = LabelledAugment(32, scale_range=(2.0, 2.0), flip=True)
    flips = set()
    for seed in range(8):
        flips.add(sample_geometry(32, 32, 32, (2.0, 2.0), True, _gen(seed)).flip)
        out = aug(image, masks, labels, _gen(seed))
        assert out["valid"].all()
        colour = _nearest_colour(out["image"])
        assert len(out["labels"]) >= 1
        for mask, label in zip(out["masks"], out["labels"], strict=True):
            assert torch.equal(mask, colour == label + 1)
        # instances whose colour survived are exactly the ones returned
        present = {int(c) - 1 for c in colour.unique() if c > 0}
        assert present == set(out["labels"].tolist())
    assert flips == {True, False}


def test_labelled_masks_aligned_random_scales():
    image, masks, labels = _scene(48, 40, [(4, 20, 5, 25), (26, 44, 12, 36)])
    aug = LabelledAugment(40, scale_range=(0.5, 2.0))
    for seed in range(12):
        out = aug(image, masks, labels, _gen(seed))
        colour = _nearest_colour(out["image"])
        colour[~out["valid"]] = -1
        for mask, label in zip(out["masks"], out["labels"], strict=True):
            disagree = mask ^ (colour == label + 1)
            assert not (disagree & ~_boundary_band(mask)).any()
            assert not (mask & ~out["valid"]).any()
        assert (out["image"][:, ~out["valid"]] == PAD_VALUE).all()


def test_crop_drops_empty_instances():
    # 32x32 → (s = 2) 32x32 resized at factor 1, crop 16x16 at offset (o, o) with o in [0, 16]:
    # the top-left box survives iff o < 4, the bottom-right iff o > 12; the centre box always.
    image, masks, labels = _scene(32, 32, [(0, 4, 0, 4), (28, 32, 28, 32), (14, 18, 14, 18)])
    aug = LabelledAugment(16, scale_range=(2.0, 2.0), flip=False)
    seen = set()
    for seed in range(20):
        out = aug(image, masks, labels, _gen(seed))
        kept = out["labels"].tolist()
        seen.add(tuple(kept))
        assert 2 in kept and len(kept) <= 2
        assert out["masks"].shape[0] == len(kept)
        assert out["masks"].flatten(1).any(1).all()
    assert (2,) in seen  # some crop dropped both corner boxes


def test_all_instances_dropped_gives_empty_tensors():
    image, masks, labels = _scene(32, 32, [(0, 2, 0, 2)])
    aug = LabelledAugment(16, scale_range=(2.0, 2.0), flip=False)
    for seed in range(20):
        out = aug(image, masks, labels, _gen(seed))
        if len(out["labels"]) == 0:
            assert out["masks"].shape == (0, 16, 16)
            assert out["labels"].dtype == torch.int64
            return
    pytest.fail("no crop dropped the corner instance")


def test_labelled_reproducible_and_colour_jitter_keeps_geometry():
    image, masks, labels = _scene(40, 40, [(5, 20, 5, 30)])
    plain = LabelledAugment(32, scale_range=(0.5, 1.5))
    jitter = LabelledAugment(32, scale_range=(0.5, 1.5), color_jitter=0.4)
    a, b = plain(image, masks, labels, _gen(3)), plain(image, masks, labels, _gen(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = plain(image, masks, labels, _gen(4))
    assert not torch.equal(a["image"], c["image"]) or not torch.equal(a["masks"], c["masks"])
    changed = 0
    for seed in range(6):
        p, j = plain(image, masks, labels, _gen(seed)), jitter(image, masks, labels, _gen(seed))
        assert torch.equal(p["masks"], j["masks"]) and torch.equal(p["valid"], j["valid"])
        assert (j["image"][:, ~j["valid"]] == PAD_VALUE).all()
        changed += not torch.equal(p["image"], j["image"])
    assert changed >= 3  # p 0.8 per sample


def _bright_box(view: torch.Tensor, valid: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box of pixels above the midpoint between the darkest and brightest valid pixel."""
    lum = view.float().mean(0)
    lo, hi = lum[valid].min(), lum[valid].max()
    assert hi - lo > 20
    ys, xs = torch.nonzero((lum > (lo + hi) / 2) & valid, as_tuple=True)
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def test_unlabelled_weak_strong_pixel_aligned():
    # White square on black: every strong op maps black/white to two grey levels (bright > dark)
    # and the blur is symmetric, so the bright region's box must not move between the views.
    image = torch.zeros(3, 48, 48, dtype=torch.uint8)
    image[:, 14:30, 20:34] = 255
    aug = UnlabelledAugment(48, scale_range=(0.6, 1.6))
    weak_boxes, photometric_changes = set(), 0
    for seed in range(16):
        out = aug(image, _gen(seed))
        weak, strong, valid = out["weak"], out["strong"], out["valid"]
        assert weak.shape == strong.shape == (3, 48, 48) and valid.shape == (48, 48)
        assert (weak[:, ~valid] == PAD_VALUE).all() and (strong[:, ~valid] == PAD_VALUE).all()
        box_w, box_s = _bright_box(weak, valid), _bright_box(strong, valid)
        assert max(abs(a - b) for a, b in zip(box_w, box_s, strict=True)) <= 1, (seed, box_w, box_s)
        weak_boxes.add(box_w)
        photometric_changes += not torch.equal(weak, strong)
    assert len(weak_boxes) > 8  # the geometry really varies between samples
    assert photometric_changes >= 10


def test_unlabelled_reproducible():
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=_gen(0))
    aug = UnlabelledAugment(32)
    a, b = aug(image, _gen(7)), aug(image, _gen(7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = aug(image, _gen(8))
    assert not torch.equal(a["weak"], c["weak"])


def test_gaussian_blur_small_image_and_kernel():
    image = torch.zeros(3, 3, 3, dtype=torch.uint8)
    image[:, 1, 1] = 255
    out = gaussian_blur(image, 2.0)  # kernel 13 shrunk to 5 (reflect pad 2 < 3)
    assert out.shape == image.shape and out[0, 1, 1] < 255 and out[0, 0, 0] > 0
    one = torch.full((3, 1, 5), 7, dtype=torch.uint8)
    assert torch.equal(gaussian_blur(one, 2.0), one)


def test_eval_size_hand_computed():
    assert eval_size(480, 640, 800, 1333) == (800, 1067)  # 640 * 800/480 = 1066.67
    assert eval_size(640, 480, 800, 1333) == (1067, 800)
    assert eval_size(100, 1000, 800, 1333) == (133, 1333)  # 8000 capped: 800 * 1333/8000 = 133.3
    assert eval_size(800, 1200, 800, 1333) == (800, 1200)
    assert eval_size(3, 7, 4, 100) == (4, 9)  # 7 * 4/3 = 9.33


def test_resize_for_eval_tensor():
    image = torch.randint(0, 256, (3, 10, 50), dtype=torch.uint8, generator=_gen(1))
    out = resize_for_eval(image, short_side=20, max_side=60)  # 20x100 capped by 0.6 → 12x60
    assert out.shape == (3, 12, 60) and out.dtype == torch.uint8
    flat = torch.full((3, 30, 40), 77, dtype=torch.uint8)
    expected = torch.full((3, 60, 80), 77, dtype=torch.uint8)
    assert torch.equal(resize_for_eval(flat, 60, 100), expected)
