import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from gdistill.data.coco import (
    CocoAnnotation,
    check_image_files,
    compressed_rle_total,
    decode_annotation_mask,
    load_coco,
    load_targets,
    read_image,
)
from gdistill.errors import GdistillError, InvalidAnnotationError

# Hand-made 10x10 case: rows 2..4, columns 2..5 set.
EXPECTED = np.zeros((10, 10), dtype=bool)
EXPECTED[2:5, 2:6] = True
POLYGON = [[2, 2, 6, 2, 6, 5, 2, 5]]
# Column-major runs: 22 zeros, then (3 ones, 7 zeros) x3, 3 ones, 45 zeros.
UNCOMPRESSED = {"size": [10, 10], "counts": [22, 3, 7, 3, 7, 3, 7, 3, 45]}
COMPRESSED = {"size": [10, 10], "counts": "f03700000V1"}


def coco_dict(annotations=None, categories=None, images=None):
    return {
        "info": {"description": "test"},
        "images": images
        if images is not None
        else [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
        "annotations": annotations if annotations is not None else [],
        "categories": categories if categories is not None else [{"id": 1, "name": "thing"}],
    }


def ann(ann_id, segmentation, image_id=1, category_id=1, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "iscrowd": iscrowd,
    }


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_polygon_and_both_rle_forms_decode_to_the_same_pixels():
    for i, segm in enumerate([POLYGON, UNCOMPRESSED, COMPRESSED]):
        a = CocoAnnotation(id=i, category_id=1, segmentation=segm, iscrowd=0, area=12.0)
        mask = decode_annotation_mask(a, 10, 10, "x.json")
        assert mask.dtype == bool and mask.shape == (10, 10)
        np.testing.assert_array_equal(mask, EXPECTED)


def test_load_targets_contiguous_labels_and_crowd_excluded(tmp_path):
    categories = [{"id": 90, "name": "c90"}, {"id": 1, "name": "c1"}, {"id": 3, "name": "c3"}]
    anns = [
        ann(10, POLYGON, category_id=90),
        ann(11, UNCOMPRESSED, category_id=1),
        ann(12, [[0, 0, 3, 0, 3, 3, 0, 3]], category_id=3, iscrowd=1),
        ann(13, COMPRESSED, category_id=3),
    ]
    dataset = load_coco(write_json(tmp_path / "t.json", coco_dict(anns, categories)))
    labels, masks = load_targets(dataset.images[0], dataset)
    assert labels.dtype == np.int64 and labels.tolist() == [2, 0, 1]
    assert masks.dtype == bool and masks.shape == (3, 10, 10)
    for m in masks:
        np.testing.assert_array_equal(m, EXPECTED)
    assert [a.id for a in dataset.images[0].annotations] == [10, 11, 12, 13]
    assert dataset.images[0].annotations[2].iscrowd == 1


def test_contiguous_mapping_both_ways(tmp_path):
    categories = [{"id": 90, "name": "c90"}, {"id": 1, "name": "c1"}, {"id": 3, "name": "c3"}]
    dataset = load_coco(write_json(tmp_path / "t.json", coco_dict([], categories)))
    assert dataset.num_classes == 3
    assert dataset.class_names == ["c1", "c3", "c90"]
    assert [dataset.contiguous_id(c) for c in (1, 3, 90)] == [0, 1, 2]
    assert [dataset.category_id(i) for i in range(3)] == [1, 3, 90]
    with pytest.raises(GdistillError, match="unknown category_id 2"):
        dataset.contiguous_id(2)
    with pytest.raises(GdistillError, match="contiguous class id 3"):
        dataset.category_id(3)


def test_image_without_annotations_gives_empty_targets(tmp_path):
    dataset = load_coco(write_json(tmp_path / "t.json", coco_dict()))
    labels, masks = load_targets(dataset.images[0], dataset)
    assert labels.shape == (0,) and labels.dtype == np.int64
    assert masks.shape == (0, 10, 10) and masks.dtype == bool


def test_area_from_json_or_decoded(tmp_path):
    anns = [ann(1, POLYGON), dict(ann(2, COMPRESSED), area=11.5)]
    dataset = load_coco(write_json(tmp_path / "t.json", coco_dict(anns)))
    assert [a.area for a in dataset.images[0].annotations] == [12.0, 11.5]
    # null, a string or 0 beside a 12-pixel mask: the mask's area, in what split writes too
    anns = [dict(ann(1, POLYGON), area=None), dict(ann(2, POLYGON), area="12"),
            dict(ann(3, COMPRESSED), area=0)]
    dataset = load_coco(write_json(tmp_path / "u.json", coco_dict(anns)))
    assert [a.area for a in dataset.images[0].annotations] == [12.0, 12.0, 12.0]
    assert [a["area"] for a in dataset.raw["annotations"]] == [12.0, 12.0, 12.0]


def test_an_area_larger_than_the_image_is_replaced_with_a_warning(tmp_path):
    # pycocotools ignores objects above 1e10 pixels: every AP would print "-" without a word
    anns = [dict(ann(1, POLYGON), area=1e12), dict(ann(2, COMPRESSED), area=101),
            dict(ann(3, POLYGON), area=100), dict(ann(4, POLYGON), area=float("nan"))]
    with pytest.warns(UserWarning, match=r"u.json: 2 annotations have an 'area' larger than their "
                      r"image \(annotation 1: 1e\+12 > 10x10, ...\); their mask's area is used"):
        dataset = load_coco(write_json(tmp_path / "u.json", coco_dict(anns)))
    assert [a.area for a in dataset.images[0].annotations] == [12.0, 12.0, 100.0, 12.0]


def test_one_file_under_two_image_ids_is_named(tmp_path):
    images = [{"id": i, "file_name": name, "height": 10, "width": 10}
              for i, name in [(3, "a.png"), (7, "b.png"), (9, "a.png")]]
    with pytest.warns(UserWarning, match=r"t.json: 1 image file is listed under several image ids "
                      r"\('a.png': ids 3, 9\); each entry counts as an image of its own"):
        dataset = load_coco(write_json(tmp_path / "t.json", coco_dict(images=images)))
    assert [img.id for img in dataset.images] == [3, 7, 9]


def test_require_annotations_false_ignores_annotations(tmp_path):
    data = {"images": coco_dict()["images"], "annotations": [ann(1, POLYGON, category_id=7)]}
    dataset = load_coco(write_json(tmp_path / "t.json", data), require_annotations=False)
    assert [img.id for img in dataset.images] == [1]
    assert dataset.images[0].annotations == [] and dataset.num_classes == 0


def test_integral_float_sizes_are_read_as_integers(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 10.0, "width": 12.0}]  # as some tools write
    image = load_coco(write_json(tmp_path / "f.json", coco_dict(images=images))).images[0]
    assert (image.height, image.width) == (10, 12) and type(image.height) is int


@pytest.mark.parametrize(
    "data, message",
    [
        ({"images": [], "annotations": []}, "missing top-level key 'categories'"),
        ({"annotations": [], "categories": []}, "missing top-level key 'images'"),
        ([1, 2], "top level must be a JSON object"),
        (
            coco_dict(images=[{"id": 1, "file_name": "a.png", "height": 10, "width": 10}] * 2),
            "duplicate image id 1",
        ),
        (coco_dict([ann(5, POLYGON), ann(5, POLYGON)]), "duplicate annotation id 5"),
        (coco_dict([ann(5, POLYGON, image_id=9)]), "annotation 5 references unknown image_id 9"),
        (
            coco_dict([ann(5, POLYGON, category_id=4)]),
            r"annotation 5 references unknown category_id 4 \(categories: 1\)",
        ),
        (
            coco_dict([ann(5, POLYGON, category_id="1")]),  # a string id is not the category 1
            r"annotation 5 references unknown category_id '1' \(categories: 1\)",
        ),
        (
            coco_dict([{k: v for k, v in ann(5, POLYGON).items() if k != "segmentation"}]),
            r"annotation 5 has no 'segmentation' \(masks are needed, not only boxes\)",
        ),
        (
            coco_dict([ann(5, [[1, 1, 5, 5]])]),
            "annotation 5 has a polygon with fewer than 3 points",
        ),
        (coco_dict([ann(5, [[1, 1, 5, 5, 8, 1, 3]])]), "annotation 5 has a polygon with an odd"),
        (coco_dict([ann(5, [])]), "annotation 5 has an empty polygon list"),
        (
            coco_dict([ann(5, [[1, 1, 4, 1, 4, 1, 1, 1]])]),
            r"annotation 5 has an empty mask \(decoded area 0\)",
        ),
        (
            coco_dict([ann(5, {"size": [10, 10], "counts": [100]})]),
            r"annotation 5 has an empty mask \(decoded area 0\)",
        ),
        (
            coco_dict([ann(5, {"size": [10, 12], "counts": "f03700000V1"})]),
            "annotation 5 has an RLE of size 10x12 but its image is 10x10 \\(height x width\\)$",
        ),
        (
            coco_dict([ann(5, {"size": [12, 10], "counts": "f03700000V1"})],
                      images=[{"id": 1, "file_name": "a.png", "height": 10, "width": 12}]),
            "annotation 5 has an RLE of size 12x10 but its image is 10x12 \\(height x width\\); one of "
            "the two has height and width swapped",
        ),
        (
            coco_dict([ann(5, {"size": [10, 10], "counts": [22, 3]})]),
            "annotation 5 has uncompressed RLE counts summing to 25",
        ),
        (
            # str(bytes) instead of bytes.decode(): pycocotools decodes it into a garbage mask
            coco_dict([ann(5, {"size": [10, 10], "counts": "b'f03700000V1'"})]),
            "annotation 5 has a compressed RLE string that is malformed",
        ),
        (
            coco_dict([ann(5, {"size": [10, 10], "counts": "f0370000"})]),  # cut short
            "annotation 5 has a compressed RLE string that is malformed or does not cover",
        ),
        (
            coco_dict([ann(5, [[1, 1, float("nan"), 5, 8, 1]])]),  # pycocotools: out of memory
            "annotation 5 has a polygon coordinate that is not finite",
        ),
        (
            coco_dict([ann(5, [[1, 1, 1e12, 5, 8, 1]])]),
            "annotation 5 has a polygon coordinate that is not finite or lies far outside",
        ),
        (coco_dict([ann(5, "nope")]), "annotation 5 has a segmentation that is neither"),
        (coco_dict([ann(5, POLYGON, iscrowd=2)]), "annotation 5 has iscrowd=2"),
        (
            coco_dict(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]),
            "duplicate category id 1",
        ),
        (
            coco_dict(images=[{"id": 1, "file_name": "a.png", "height": 0, "width": 10}]),
            "image 1 needs positive integer height and width, got 0 and 10",
        ),
        (
            coco_dict(images=[{"id": 1, "file_name": "a.png", "height": 10.5, "width": 10}]),
            "image 1 needs positive integer height and width, got 10.5 and 10",
        ),
    ],
)
def test_load_coco_errors_name_file_and_problem(tmp_path, data, message):
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(GdistillError, match=message) as info:
        load_coco(path)
    text = str(info.value)
    assert text.startswith(str(path)) and "\n" not in text


def test_malformed_json_reports_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    with pytest.raises(GdistillError, match=r"broken.json: malformed JSON at line 3 column"):
        load_coco(path)


def test_missing_json_file(tmp_path):
    with pytest.raises(GdistillError, match="nothere.json: annotation file not found"):
        load_coco(tmp_path / "nothere.json")


def test_drop_invalid_keeps_valid_annotations(tmp_path):
    anns = [ann(1, POLYGON), ann(2, [[1, 1, 4, 1, 4, 1, 1, 1]]), ann(3, [[0, 0, 1, 1]])]
    path = write_json(tmp_path / "t.json", coco_dict(anns))
    with pytest.warns(UserWarning, match="dropped 2 invalid annotation"):
        dataset = load_coco(path, drop_invalid=True)
    assert [a.id for a in dataset.images[0].annotations] == [1]
    assert len(dataset.dropped) == 2 and "annotation 2" in dataset.dropped[0]
    # what evaluation scores against and split writes leaves them out too
    assert [a["id"] for a in dataset.raw["annotations"]] == [1]
    with pytest.raises(InvalidAnnotationError, match="annotation 2 has an empty mask"):
        load_coco(path)
    # a box-only annotation is skipped and listed like a bad mask
    box_only = {k: v for k, v in ann(4, POLYGON).items() if k != "segmentation"}
    path = write_json(tmp_path / "b.json", coco_dict([ann(1, POLYGON), box_only]))
    with pytest.warns(UserWarning, match="dropped 1 invalid annotation"):
        dataset = load_coco(path, drop_invalid=True)
    assert dataset.dropped == [f"{path}: annotation 4 has no 'segmentation' (masks are needed, "
                               "not only boxes)"]
    # Structural errors are still raised.
    path = write_json(tmp_path / "u.json", coco_dict([ann(1, POLYGON, image_id=4)]))
    with pytest.raises(GdistillError, match="unknown image_id 4"):
        load_coco(path, drop_invalid=True)
    path = write_json(tmp_path / "s.json", coco_dict([ann(1, POLYGON, image_id="1")]))
    with pytest.raises(GdistillError, match="annotation 1 references unknown image_id '1'"):
        load_coco(path)


def test_drop_invalid_removes_only_the_degenerate_parts_of_a_polygon_list(tmp_path):
    # Annotation 1: the valid rectangle plus a 2-point and a 1-point part; annotation 2: a
    # single 2-point part (nothing valid left, so dropped whole).
    anns = [ann(1, [POLYGON[0], [7, 7, 8, 8], [3, 3]]), ann(2, [[0, 0, 1, 1]])]
    path = write_json(tmp_path / "t.json", coco_dict(anns))
    with pytest.warns(UserWarning) as caught:
        dataset = load_coco(path, drop_invalid=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "removed polygon parts of fewer than 3 points from 1 annotation" in messages
    assert "dropped 1 invalid annotation" in messages
    [kept] = dataset.images[0].annotations
    assert kept.id == 1 and kept.segmentation == POLYGON
    assert dataset.repaired == [
        f"{path}: annotation 1: removed 2 of its 3 polygon parts (fewer than 3 points each, "
        "no area), kept the rest"
    ]
    assert dataset.raw["annotations"] == [{**anns[0], "segmentation": POLYGON, "area": 12.0}]
    mask = decode_annotation_mask(kept, 10, 10, str(path))
    assert np.array_equal(mask, EXPECTED)
    # Without drop_invalid the degenerate part still stops loading.
    with pytest.raises(InvalidAnnotationError, match="annotation 1 has a polygon with fewer than 3"):
        load_coco(path)


# --- images -----------------------------------------------------------------------------


def test_read_rgb_keeps_values(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
    Image.fromarray(rgb).save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png", expected_size=(2, 3))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out, rgb)


def test_read_grayscale(tmp_path):
    Image.fromarray(np.array([[7, 200]], dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out[0], [[7, 7, 7], [200, 200, 200]])


def test_read_rgba_drops_alpha(tmp_path):
    rgba = np.array([[[10, 20, 30, 40], [50, 60, 70, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0], [[10, 20, 30], [50, 60, 70]])


def test_read_palette(tmp_path):
    image = Image.fromarray(np.array([[0, 1, 1]], dtype=np.uint8), mode="P")
    image.putpalette([255, 0, 0, 0, 128, 255] + [0] * 762)
    image.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 128, 255], [0, 128, 255]])


def test_read_palette_with_transparency_no_warning(tmp_path, recwarn):
    image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    image.putpalette([1, 2, 3, 4, 5, 6] + [0] * 762)
    image.save(tmp_path / "p.png", transparency=bytes([0, 255]))
    out = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0], [[1, 2, 3], [4, 5, 6]])
    assert not [w for w in recwarn if "Transparency" in str(w.message)]


def test_read_16bit_scales_to_8bit(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_read_cmyk(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    out = read_image(tmp_path / "c.tif")
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])


def _save_with_orientation(path, array, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif.tobytes())


def test_exif_orientation_follows_the_annotation_file(tmp_path):
    stored = (np.arange(2 * 5 * 3, dtype=np.uint8) * 5).reshape(2, 5, 3)
    _save_with_orientation(tmp_path / "e.png", stored, 6)  # "turn 90 degrees clockwise"
    displayed = np.rot90(stored, -1)  # [5, 2, 3]
    np.testing.assert_array_equal(read_image(tmp_path / "e.png"), displayed)  # no annotation
    np.testing.assert_array_equal(read_image(tmp_path / "e.png", (5, 2)), displayed)
    np.testing.assert_array_equal(read_image(tmp_path / "e.png", (2, 5)), stored)
    with pytest.raises(
        GdistillError,
        match=r"e.png: image is 2x5 \(height x width\) \(5x2 as displayed: EXIF orientation 6\)"
        " but the annotation file says 3x3",
    ):
        read_image(tmp_path / "e.png", (3, 3))


def test_polygons_drawn_on_the_displayed_photo_but_sized_as_stored_are_refused(tmp_path):
    """A phone photo stored 20 high x 30 wide, EXIF 6 (shown 30 high x 20 wide), labelled on
    the displayed image (polygon down to y=28) while a converter wrote the stored size: read as
    stored, the mask would be cut at y=20 and lie on other pixels."""
    _save_with_orientation(tmp_path / "p.jpg", np.zeros((20, 30, 3), np.uint8), 6)
    image = [{"id": 1, "file_name": "p.jpg", "height": 20, "width": 30}]
    tall = [[2, 4, 16, 4, 16, 28, 2, 28]]
    path = write_json(tmp_path / "a.json", coco_dict([ann(1, tall)], images=image))
    with pytest.raises(GdistillError, match=(
        r"a.json: .*p.jpg: polygons reach x=16, y=28, past the width 30 and height 20 that the "
        r"annotation file gives \(the stored size; EXIF orientation 6 turns the photo\) but "
        r"inside the displayed size: give width 20 and height 30")):
        check_image_files(load_coco(path), tmp_path)
    # drawn on the stored pixels: accepted (a pixel or two past the border as well)
    wide = [[2, 4, 31, 4, 31, 18, 2, 18]]
    check_image_files(load_coco(write_json(tmp_path / "b.json",
                                           coco_dict([ann(1, wide)], images=image))), tmp_path)


@pytest.mark.parametrize(
    "orientation, turn",
    [
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (4, lambda a: a[::-1]),
        (5, lambda a: a.transpose(1, 0, 2)),
        (6, lambda a: np.rot90(a, -1)),
        (7, lambda a: a[::-1, ::-1].transpose(1, 0, 2)),
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_every_exif_orientation_is_turned_as_displayed(tmp_path, orientation, turn):
    stored = (np.arange(2 * 5 * 3, dtype=np.uint8) * 5).reshape(2, 5, 3)
    _save_with_orientation(tmp_path / "o.png", stored, orientation)
    np.testing.assert_array_equal(read_image(tmp_path / "o.png"), turn(stored))


def test_check_image_files_warns_when_the_size_cannot_tell_the_orientation(tmp_path):
    rng = np.random.default_rng(0)
    _save_with_orientation(tmp_path / "wide.png", rng.integers(0, 255, (4, 6, 3), np.uint8), 6)
    _save_with_orientation(tmp_path / "square.png", rng.integers(0, 255, (4, 4, 3), np.uint8), 8)
    images = [
        {"id": 1, "file_name": "wide.png", "height": 4, "width": 6},
        {"id": 2, "file_name": "square.png", "height": 4, "width": 4},
    ]
    (tmp_path / "a.json").write_text(
        json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]})
    )
    dataset = load_coco(tmp_path / "a.json")
    with pytest.warns(
        UserWarning, match=r"a.json: the EXIF orientation of square.png \(8\) leaves the size unchanged"
    ):
        check_image_files(dataset, tmp_path)
    images.pop()
    (tmp_path / "a.json").write_text(
        json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_image_files(load_coco(tmp_path / "a.json"), tmp_path)  # its stored size decides


def test_read_missing_image(tmp_path):
    with pytest.raises(GdistillError, match="gone.png: image file not found"):
        read_image(tmp_path / "gone.png")


def test_read_corrupt_image(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(GdistillError, match="junk.png: cannot read image"):
        read_image(tmp_path / "junk.png")


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_read_truncated_image(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"t.{suffix}"
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(GdistillError, match=f"t.{suffix}: corrupt or truncated image") as info:
        read_image(path)
    assert "\n" not in str(info.value)


def test_read_size_mismatch(tmp_path):
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    with pytest.raises(GdistillError, match=r"s.png: image is 4x6 .* annotation file says 6x4"):
        read_image(tmp_path / "s.png", expected_size=(6, 4))


def test_compressed_rle_total_matches_pycocotools_on_valid_strings():
    rng = np.random.default_rng(0)
    lengths = set()
    for i in range(60):
        h, w = rng.integers(1, 60, 2)
        mask = np.asfortranarray(rng.random((h, w)) < rng.random(), dtype=np.uint8)
        if i % 3 == 0:  # a few long runs: a short string
            mask = np.asfortranarray(np.zeros((h, w), dtype=np.uint8))
            mask[h // 3 :, : w // 2] = 1
        counts = mask_utils.encode(mask)["counts"]
        lengths.add(len(counts) < 256)
        assert compressed_rle_total(counts) == h * w
        for cut in (1, len(counts) // 2):  # cut short: malformed or too few pixels
            assert compressed_rle_total(counts[:-cut]) != h * w
    assert lengths == {True, False}  # both decoders ran


def test_check_image_files_names_missing_and_empty_files(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 2, "width": 2} for i in (1, 2)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    dataset = load_coco(path)
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "img/1.png")
    with pytest.raises(GdistillError, match="d.json: image file .*2.png not found$"):
        check_image_files(dataset, tmp_path / "img")
    # a near miss is named: another letter case, or the file right in the images folder
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "img/2.PNG")
    with pytest.raises(GdistillError, match=r"2.png not found, but .*img/2.PNG is there \(letter case"):
        check_image_files(dataset, tmp_path / "img")
    (tmp_path / "img/2.PNG").unlink()
    nested = [{"id": 1, "file_name": "val/1.png", "height": 2, "width": 2}]
    (tmp_path / "n.json").write_text(json.dumps({"images": nested, "annotations": [], "categories": []}))
    with pytest.raises(GdistillError, match=r"val/1.png not found, but .*img/1.png is there \(file_names are "
                       r"paths under the images folder\)"):
        check_image_files(load_coco(tmp_path / "n.json"), tmp_path / "img")
    (tmp_path / "img/2.png").write_bytes(b"")
    with pytest.raises(GdistillError, match=r"d.json: image file .*2.png is empty \(0 bytes\)"):
        check_image_files(dataset, tmp_path / "img")
    # Found from the headers, before training: not an image, another size than the JSON's.
    (tmp_path / "img/2.png").write_text("not a picture")
    with pytest.raises(GdistillError, match=r"2.png: cannot read image"):
        check_image_files(dataset, tmp_path / "img")
    Image.fromarray(np.zeros((3, 2, 3), np.uint8)).save(tmp_path / "img/2.png")
    with pytest.raises(GdistillError, match=r"2.png: image is 3x2 \(height x width\) but the annotation"):
        check_image_files(dataset, tmp_path / "img")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "img/2.png")
    check_image_files(dataset, tmp_path / "img")


def test_json_with_a_byte_order_mark_loads(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}]
    data = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "crème"}]}
    path = tmp_path / "bom.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8-sig")
    assert load_coco(path).class_names == ["crème"]


def test_windows_folder_separators_in_file_names_are_read_as_folders(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    Image.fromarray(np.full((10, 10, 3), 7, np.uint8)).save(tmp_path / "images" / "train" / "a.png")
    images = [{"id": 1, "file_name": "train\\a.png", "height": 10, "width": 10}]
    dataset = load_coco(write_json(tmp_path / "w.json", coco_dict([ann(1, POLYGON)], images=images)))
    assert dataset.images[0].file_name == "train/a.png"
    assert dataset.raw["images"][0]["file_name"] == "train\\a.png"  # split writes the file as it was
    pixels = read_image(tmp_path / "images" / dataset.images[0].file_name, (10, 10))
    assert pixels.shape == (10, 10, 3) and int(pixels[0, 0, 0]) == 7
