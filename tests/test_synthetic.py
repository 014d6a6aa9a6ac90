import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from gdistill.data import synthetic
from gdistill.data.synthetic import SYNTH_CLASS_NAMES, generate_synthetic, render_image
from gdistill.errors import GdistillError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(out, train_images=12, val_images=4, seed=0, progress=False)
    return out


def _decoded(out: Path, split: str) -> tuple[dict, dict[int, list[tuple[dict, np.ndarray]]]]:
    data = json.loads((out / f"{split}.json").read_text())
    per_image: dict[int, list[tuple[dict, np.ndarray]]] = {im["id"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append((ann, mask_utils.decode(ann["segmentation"]) > 0))
    return data, per_image


def test_layout_and_coco_loads(dataset):
    train_json, val_json = dataset / "train.json", dataset / "val.json"
    for path, count in ((train_json, 12), (val_json, 4)):
        coco = COCO(str(path))
        assert len(coco.getImgIds()) == count
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == SYNTH_CLASS_NAMES
        assert coco.getCatIds() == [1, 2, 3, 4, 5, 6]
        for image in coco.loadImgs(coco.getImgIds()):
            assert (image["height"], image["width"]) == (160, 160)
            pixels = np.asarray(Image.open(dataset / "images" / image["file_name"]))
            assert pixels.shape == (160, 160, 3) and pixels.dtype == np.uint8
    data = json.loads(train_json.read_text())
    assert data["images"][0]["file_name"] == "train/000000.png"
    assert data["images"][11]["id"] == 12
    assert data["info"]["generator"] == "gdistill.data.synthetic"
    assert data["info"]["seed"] == 0 and "version" in data["info"]
    ids = [a["id"] for a in data["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    assert all(a["iscrowd"] == 0 for a in data["annotations"])
    assert all(isinstance(a["segmentation"]["counts"], str) for a in data["annotations"])


def test_annotations_equal_rendered_masks(dataset):
    data, per_image = _decoded(dataset, "train")
    for index, image in enumerate(data["images"]):
        rng = synthetic._image_rng(0, "train", index)
        pixels, instances = render_image(rng, 160)
        stored = np.asarray(Image.open(dataset / "images" / image["file_name"]))
        np.testing.assert_array_equal(stored, pixels)
        anns = per_image[image["id"]]
        assert [a["category_id"] - 1 for a, _ in anns] == [c for c, _ in instances]
        for (ann, decoded), (_, mask) in zip(anns, instances, strict=True):
            np.testing.assert_array_equal(decoded, mask)
            assert decoded.sum() >= 30
            assert ann["area"] == decoded.sum()


def test_masks_disjoint_and_counts_in_bounds(dataset):
    for split in ("train", "val"):
        _, per_image = _decoded(dataset, split)
        for anns in per_image.values():
            assert 1 <= len(anns) <= 12
            stacked = np.stack([m for _, m in anns]).astype(np.int64)
            assert stacked.sum(axis=0).max() == 1


def test_bbox_is_mask_extent(dataset):
    _, per_image = _decoded(dataset, "val")
    for anns in per_image.values():
        for ann, mask in anns:
            ys, xs = np.nonzero(mask)
            expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["bbox"] == [float(v) for v in expected]


def test_same_seed_gives_identical_bytes(dataset, tmp_path):
    generate_synthetic(tmp_path, train_images=12, val_images=4, seed=0, progress=False)
    assert _files(tmp_path) == _files(dataset)


def test_other_seed_differs(dataset, tmp_path):
    generate_synthetic(tmp_path, train_images=12, val_images=4, seed=1, progress=False)
    other, ours = _files(tmp_path), _files(dataset)
    assert other.keys() == ours.keys()
    assert other["train.json"] != ours["train.json"]
    assert sum(other[k] != ours[k] for k in ours if k.endswith(".png")) == 16


def test_image_independent_of_count(dataset, tmp_path):
    generate_synthetic(tmp_path, train_images=5, val_images=1, seed=0, progress=False)
    small, large = _files(tmp_path), _files(dataset)
    for index in range(5):
        name = f"images/train/{index:06d}.png"
        assert small[name] == large[name]
    assert small["images/val/000000.png"] == large["images/val/000000.png"]
    small_json = json.loads(small["train.json"])
    large_json = json.loads(large["train.json"])
    large_anns = [a for a in large_json["annotations"] if a["image_id"] <= 5]
    assert small_json["annotations"] == large_anns
    # train and val draw from different streams
    assert large["images/val/000000.png"] != large["images/train/000000.png"]


def test_all_classes_appear_and_sizes_vary():
    counts: Counter[int] = Counter()
    per_image = []
    areas = []
    for index in range(50):
        _, instances = render_image(synthetic._image_rng(3, "train", index), 160)
        counts.update(c for c, _ in instances)
        per_image.append(len(instances))
        areas += [int(m.sum()) for _, m in instances]
    assert set(counts) == set(range(6))
    assert min(counts.values()) >= 20  # roughly balanced over ~330 instances
    assert 4.0 <= np.mean(per_image) <= 9.0
    assert min(areas) < 150 and max(areas) > 1000


def test_other_image_size():
    pixels, instances = render_image(synthetic._image_rng(0, "val", 7), 96)
    assert pixels.shape == (96, 96, 3)
    assert all(m.shape == (96, 96) and m.dtype == bool for _, m in instances)


def test_rasterisers_hand_cases():
    yy, xx = np.mgrid[0:5, 0:5].astype(np.float32) + 0.5
    # disc of radius 1.2 at the centre pixel (2.5, 2.5): the centre and its 4 neighbours
    disc = synthetic._disc(yy, xx, 2.5, 2.5, 1.2, 1.2, 0.0)
    plus = np.zeros((5, 5), bool)
    plus[2, 1:4] = plus[1:4, 2] = True
    np.testing.assert_array_equal(disc, plus)
    # axis-aligned square polygon covering pixel centres x, y in {1.5, 2.5, 3.5}
    square = np.array([[1.0, 1.0], [1.0, 4.0], [4.0, 4.0], [4.0, 1.0]])  # (x, y), y down
    expected = np.zeros((5, 5), bool)
    expected[1:4, 1:4] = True
    np.testing.assert_array_equal(synthetic._convex_polygon(yy, xx, square), expected)
    np.testing.assert_array_equal(synthetic._convex_polygon(yy, xx, square[::-1]), expected)
    # right triangle (0,0)-(5,0)-(0,5): pixel centres with x + y <= 5
    triangle = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    np.testing.assert_array_equal(synthetic._convex_polygon(yy, xx, triangle), xx + yy <= 5.0)
    rim = expected.copy()
    rim[2, 2] = False
    np.testing.assert_array_equal(synthetic._rim(expected), rim)


@pytest.mark.parametrize(
    "kwargs",
    [{"train_images": 0}, {"val_images": -1}, {"image_size": 16}, {"seed": -3}],
)
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(GdistillError, match=str(tmp_path)):
        generate_synthetic(tmp_path, progress=False, **kwargs)
