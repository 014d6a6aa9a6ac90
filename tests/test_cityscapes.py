"""Cityscapes → COCO conversion on a tiny fake Cityscapes tree."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gdistill.data.cityscapes import convert_cityscapes, read_instance_ids
from gdistill.data.coco import decode_annotation_mask, load_coco
from gdistill.errors import GdistillError

H, W = 16, 32
NAMES = ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


def _aachen_0() -> np.ndarray:
    ids = np.full((H, W), 7, dtype=np.uint16)  # road
    ids[:4] = 23  # sky
    ids[2:6, 3:9] = 26000  # car #0
    ids[10:13, 20:26] = 26001  # car #1
    ids[0:2, 28:32] = 24  # person crowd
    ids[8:12, 0:2] = 24003  # person #3
    ids[14, 10:13] = 33000  # bicycle #0
    ids[15, 31] = 65535  # license plate (label id -1 stored as 16-bit): not a thing class
    return ids


def _aachen_1() -> np.ndarray:
    return np.full((H, W), 7, dtype=np.uint16)  # road only: an image without instances


def _bochum_0() -> np.ndarray:
    ids = np.zeros((H, W), dtype=np.uint16)  # unlabelled
    ids[1:5, 1:4] = 25000  # rider
    ids[5:9, 1:5] = 32000  # motorcycle
    ids[0, 20:22] = 27000  # truck, 2 pixels
    ids[6:16, 10:30] = 28001  # bus
    ids[3, 25] = 31002  # train, 1 pixel
    return ids


# (split-relative stem, ids); sorted order of the expected output
FRAMES = [
    ("aachen/aachen_000000_000019", _aachen_0),
    ("aachen/aachen_000001_000019", _aachen_1),
    ("bochum/bochum_000000_000313", _bochum_0),
]

# expected annotations in output order: (image index, category name, pixel value, iscrowd)
EXPECTED = [
    (0, "person", 24, 1),
    (0, "person", 24003, 0),
    (0, "car", 26000, 0),
    (0, "car", 26001, 0),
    (0, "bicycle", 33000, 0),
    (2, "rider", 25000, 0),
    (2, "truck", 27000, 0),
    (2, "bus", 28001, 0),
    (2, "train", 31002, 0),
    (2, "motorcycle", 32000, 0),
]


def write_ids(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint16)).save(path)  # 16-bit grayscale, like the real files


def make_tree(root: Path, split: str = "train") -> dict[str, np.ndarray]:
    painted = {}
    for stem, make in FRAMES:
        ids = make()
        write_ids(root / "gtFine" / split / f"{stem}_gtFine_instanceIds.png", ids)
        image = root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W, 3), 90, dtype=np.uint8)).save(image)
        painted[stem] = ids
    # distractors the converter must not pick up: another split and a non-label file
    write_ids(root / "gtFine" / "val" / "zurich" / "zurich_000000_000001_gtFine_instanceIds.png", _aachen_1())
    Image.fromarray(np.zeros((H, W), np.uint8)).save(
        root / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    )
    return painted


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "cityscapes"
    return root, make_tree(root)


def test_pil_reads_16bit_ids_exactly(tmp_path):
    ids = np.array([[0, 7, 24, 26000], [26999, 33001, 65535, 1000]], dtype=np.uint16)
    write_ids(tmp_path / "x.png", ids)
    with Image.open(tmp_path / "x.png") as image:
        assert image.mode in ("I;16", "I")  # "I;16" with this Pillow; older ones give "I"
    out = read_instance_ids(tmp_path / "x.png")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, ids.astype(np.int64))


def test_converts_to_valid_coco(tree, tmp_path):
    root, painted = tree
    out = convert_cityscapes(root, "train", tmp_path / "out" / "train.json", progress=False)
    assert out == tmp_path / "out" / "train.json"
    raw = json.loads(out.read_text())
    assert [c["id"] for c in raw["categories"]] == list(range(1, 9))
    assert [c["name"] for c in raw["categories"]] == NAMES

    dataset = load_coco(out)
    assert dataset.class_names == NAMES
    assert [(im.id, im.file_name, im.height, im.width) for im in dataset.images] == [
        (i + 1, f"train/{stem}_leftImg8bit.png", H, W) for i, (stem, _) in enumerate(FRAMES)
    ]
    for im in dataset.images:  # file names resolve under root/leftImg8bit
        assert (root / "leftImg8bit" / im.file_name).is_file()

    anns = raw["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(EXPECTED) + 1))
    assert len(anns) == len(EXPECTED)
    stems = [stem for stem, _ in FRAMES]
    for ann, (image_index, name, value, iscrowd) in zip(anns, EXPECTED, strict=True):
        assert ann["image_id"] == image_index + 1
        assert ann["category_id"] == NAMES.index(name) + 1
        assert ann["iscrowd"] == iscrowd
        assert isinstance(ann["segmentation"]["counts"], str)
        expected = painted[stems[image_index]] == value
        loaded = next(a for a in dataset.images[image_index].annotations if a.id == ann["id"])
        mask = decode_annotation_mask(loaded, H, W, "test")
        np.testing.assert_array_equal(mask, expected)
        ys, xs = np.nonzero(expected)
        assert ann["area"] == expected.sum()
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    # hand-checked: car #0 covers rows 2..5, columns 3..8
    assert anns[2]["bbox"] == [3, 2, 6, 4] and anns[2]["area"] == 24


def test_output_is_deterministic(tree, tmp_path):
    root, _ = tree
    a = convert_cityscapes(root, "train", tmp_path / "a.json", progress=False).read_bytes()
    b = convert_cityscapes(root, "train", tmp_path / "b.json", progress=False).read_bytes()
    assert a == b


def test_min_area_drops_small_instances(tree, tmp_path):
    root, _ = tree
    out = convert_cityscapes(root, "train", tmp_path / "m.json", min_area=3, progress=False)
    kept = [(a["image_id"], a["category_id"]) for a in json.loads(out.read_text())["annotations"]]
    dropped = [(3, NAMES.index("truck") + 1), (3, NAMES.index("train") + 1)]  # 2 and 1 pixels
    expected = [(i + 1, NAMES.index(n) + 1) for i, n, _, _ in EXPECTED]
    assert kept == [e for e in expected if e not in dropped]
    # the bicycle has exactly 3 pixels: kept
    assert (1, NAMES.index("bicycle") + 1) in kept


def test_missing_root(tmp_path):
    with pytest.raises(GdistillError, match="nowhere: Cityscapes root folder not found"):
        convert_cityscapes(tmp_path / "nowhere", "train", tmp_path / "o.json", progress=False)


def test_no_files_for_split_says_where_it_looked(tree, tmp_path):
    root, _ = tree
    with pytest.raises(GdistillError) as info:
        convert_cityscapes(root, "test", tmp_path / "o.json", progress=False)
    message = str(info.value)
    assert "split 'test'" in message and str(root / "gtFine" / "test") in message
    assert "\n" not in message
    assert not (tmp_path / "o.json").exists()


def test_missing_image_names_both_files(tree, tmp_path):
    root, _ = tree
    image = root / "leftImg8bit" / "train" / "bochum" / "bochum_000000_000313_leftImg8bit.png"
    image.unlink()
    with pytest.raises(GdistillError) as info:
        convert_cityscapes(root, "train", tmp_path / "o.json", progress=False)
    message = str(info.value)
    assert "bochum_000000_000313_gtFine_instanceIds.png" in message
    assert str(image) in message and "not found" in message


def test_an_image_without_its_label_file_is_named_in_a_warning(tree, tmp_path):
    root, _ = tree
    gt = root / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_instanceIds.png"
    image = root / "leftImg8bit" / "train" / "bochum" / "bochum_000000_000313_leftImg8bit.png"
    gt.unlink()
    with pytest.warns(UserWarning, match=f"{image}: no \\*_gtFine_instanceIds.png in .*: left out"):
        out = convert_cityscapes(root, "train", tmp_path / "o.json", progress=False)
    names = [im["file_name"] for im in json.loads(out.read_text())["images"]]
    assert names and not any("bochum_000000_000313" in n for n in names)


def test_image_of_another_size(tree, tmp_path):
    root, _ = tree
    image = root / "leftImg8bit" / "train" / "aachen" / "aachen_000001_000019_leftImg8bit.png"
    Image.fromarray(np.zeros((H, W + 1, 3), np.uint8)).save(image)
    with pytest.raises(GdistillError, match=r"label map is 16x32 .* is 16x33"):
        convert_cityscapes(root, "train", tmp_path / "o.json", progress=False)


def test_unreadable_png(tree, tmp_path):
    root, _ = tree
    gt = root / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_instanceIds.png"
    gt.write_bytes(b"not a png at all")
    with pytest.raises(GdistillError, match=r"aachen_000001_000019_gtFine_instanceIds.png: cannot read PNG"):
        convert_cityscapes(root, "train", tmp_path / "o.json", progress=False)


def test_truncated_png(tree, tmp_path):
    root, _ = tree
    gt = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_instanceIds.png"
    gt.write_bytes(gt.read_bytes()[:60])
    with pytest.raises(GdistillError, match=r"instanceIds.png: (corrupt or truncated|cannot read) PNG"):
        convert_cityscapes(root, "train", tmp_path / "o.json", progress=False)


def test_colour_png_is_rejected(tree, tmp_path):
    root, _ = tree
    gt = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_instanceIds.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(gt)
    with pytest.raises(GdistillError, match="has mode RGB, expected single-channel"):
        convert_cityscapes(root, "train", tmp_path / "o.json", progress=False)


def _has_cli_command() -> bool:
    from gdistill.cli import COMMANDS

    return "convert-cityscapes" in COMMANDS


@pytest.mark.skipif(not _has_cli_command(), reason="`gdistill convert-cityscapes` not wired in cli.py yet")
def test_cli_command(tree, tmp_path, capsys):
    from gdistill.cli import main

    root, _ = tree
    out = tmp_path / "cs" / "val.json"
    assert main(["convert-cityscapes", "--root", str(root), "--split", "train", "--out", str(out),
                 "--quiet"]) == 0
    assert out.read_bytes() == convert_cityscapes(root, "train", tmp_path / "direct.json",
                                                  progress=False).read_bytes()
    assert main(["convert-cityscapes", "--root", str(root), "--split", "val2", "--out", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "split 'val2'" in err


def test_the_command_counts_the_crowd_regions_it_wrote(tree, tmp_path, capsys):
    from gdistill.cli import main

    root, _ = tree
    out = tmp_path / "cs.json"
    assert main(["convert-cityscapes", "--root", str(root), "--split", "train", "--out", str(out),
                 "--quiet"]) == 0
    crowd = sum(iscrowd for *_, iscrowd in EXPECTED)
    assert crowd > 0
    assert (f"{len(FRAMES)} images, {len(EXPECTED)} instances ({crowd} of them crowd regions, not "
            f"trained on) → {out}") in capsys.readouterr().out
