import json
from pathlib import Path

import pytest

from gdistill.data.coco import load_coco
from gdistill.data.sources import unlabelled_from_coco
from gdistill.data.splits import split_labelled, write_split
from gdistill.errors import GdistillError


def make_dataset(tmp_path: Path, num_images: int = 20, empty_every: int = 0, name="train.json"):
    """Image i (id 1000 + i) has two annotations (the second a crowd one), except every
    `empty_every`-th image, which has only a crowd annotation."""
    images, anns = [], []
    for i in range(num_images):
        image_id = 1000 + i
        images.append({"id": image_id, "file_name": f"{i:04d}.png", "height": 8, "width": 8})
        only_crowd = empty_every and i % empty_every == 0
        if not only_crowd:
            anns.append(
                {
                    "id": 2 * i + 1,
                    "image_id": image_id,
                    "category_id": 3 if i % 2 else 90,
                    "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]],
                    "area": 16.0,
                    "iscrowd": 0,
                }
            )
        anns.append(
            {
                "id": 2 * i + 2,
                "image_id": image_id,
                "category_id": 3,
                "segmentation": {"size": [8, 8], "counts": [0, 2, 62]},
                "iscrowd": 1,
            }
        )
    data = {
        "info": {"year": 2024},
        "licenses": [{"id": 1, "name": "cc"}],
        "images": images,
        "annotations": anns,
        "categories": [{"id": 90, "name": "c90"}, {"id": 3, "name": "c3"}],
    }
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return load_coco(path)


def ids(coco: dict) -> list[int]:
    return [img["id"] for img in coco["images"]]


def test_labelled_contents_and_order(tmp_path):
    dataset = make_dataset(tmp_path)
    labelled, unlabelled = split_labelled(dataset, count=5, seed=1)
    chosen = ids(labelled)
    assert len(chosen) == 5 and chosen == sorted(chosen)  # JSON order (ids ascend in the file)
    expected_anns = [a for a in dataset.raw["annotations"] if a["image_id"] in chosen]
    assert labelled["annotations"] == expected_anns and len(expected_anns) == 10
    assert labelled["categories"] == dataset.raw["categories"]
    assert labelled["info"] == {"year": 2024} and labelled["licenses"] == [{"id": 1, "name": "cc"}]
    assert list(labelled) == ["info", "licenses", "images", "annotations", "categories"]
    assert ids(unlabelled) == ids(dataset.raw) and unlabelled["annotations"] == []
    assert unlabelled["categories"] == dataset.raw["categories"]


def test_exclude_labelled_is_disjoint_and_complete(tmp_path):
    dataset = make_dataset(tmp_path)
    labelled, unlabelled = split_labelled(dataset, fraction=0.25, seed=3, exclude_labelled=True)
    assert len(ids(labelled)) == 5 and len(ids(unlabelled)) == 15
    assert not set(ids(labelled)) & set(ids(unlabelled))
    assert sorted(ids(labelled) + ids(unlabelled)) == ids(dataset.raw)


def test_exclude_labelled_with_every_image_labelled_is_an_error(tmp_path):
    dataset = make_dataset(tmp_path)
    with pytest.raises(GdistillError, match=r"all 20 images are labelled, so excluding them"):
        split_labelled(dataset, fraction=1.0, exclude_labelled=True)


def test_fraction_counts(tmp_path):
    dataset = make_dataset(tmp_path, num_images=1000)
    assert len(split_labelled(dataset, fraction=0.001)[0]["images"]) == 1
    assert len(split_labelled(dataset, fraction=0.1)[0]["images"]) == 100
    assert len(split_labelled(dataset, fraction=0.0015)[0]["images"]) == 1  # floor
    assert len(split_labelled(dataset, fraction=1.0)[0]["images"]) == 1000
    small = make_dataset(tmp_path, num_images=100, name="small.json")
    assert len(split_labelled(small, fraction=0.29)[0]["images"]) == 29  # 0.29*100 < 29 in floats


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    dataset = make_dataset(tmp_path, num_images=50)
    a = write_split(*split_labelled(dataset, count=10, seed=7), tmp_path / "a")
    b = write_split(
        *split_labelled(make_dataset(tmp_path, 50, name="t2.json"), count=10, seed=7),
        tmp_path / "b",
    )
    c = write_split(*split_labelled(dataset, count=10, seed=8), tmp_path / "c")
    assert a == (tmp_path / "a" / "labelled.json", tmp_path / "a" / "unlabelled.json")
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert a[0].read_bytes() != c[0].read_bytes()
    assert a[0].read_bytes().endswith(b"}\n") and a[0].read_bytes().count(b"\n") == 1


def test_empty_images_never_labelled(tmp_path):
    dataset = make_dataset(tmp_path, num_images=20, empty_every=2)  # 10 images with only crowd
    labelled, _ = split_labelled(dataset, count=10, seed=0)
    assert ids(labelled) == [1000 + i for i in range(1, 20, 2)]
    with pytest.raises(GdistillError, match="11 labelled images requested but only 10 of 20"):
        split_labelled(dataset, count=11)
    labelled, unlabelled = split_labelled(dataset, fraction=1.0)  # "all": the eligible ones
    assert ids(labelled) == [1000 + i for i in range(1, 20, 2)] and len(ids(unlabelled)) == 20


def test_round_trip(tmp_path):
    dataset = make_dataset(tmp_path)
    labelled_path, unlabelled_path = write_split(
        *split_labelled(dataset, count=4, seed=2), tmp_path / "out"
    )
    labelled = load_coco(labelled_path)
    assert labelled.num_classes == 2 and labelled.class_names == ["c3", "c90"]
    by_id = {img.id: img for img in dataset.images}
    assert len(labelled.images) == 4
    for img in labelled.images:
        assert img.annotations == by_id[img.id].annotations
    unlabelled = load_coco(unlabelled_path)
    assert [img.id for img in unlabelled.images] == [img.id for img in dataset.images]
    assert all(img.annotations == [] for img in unlabelled.images)
    (tmp_path / "imgs").mkdir()
    keys = [u.key for u in unlabelled_from_coco(unlabelled_path, tmp_path / "imgs", False)]
    assert keys == [img.file_name for img in dataset.images]


def test_dropped_annotations_not_written(tmp_path):
    path = tmp_path / "d.json"
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 1]]},
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning):
        dataset = load_coco(path, drop_invalid=True)
    labelled, _ = split_labelled(dataset, count=1)
    assert [a["id"] for a in labelled["annotations"]] == [1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fraction": 0.0005}, r"fraction 0.0005 of 1000 images gives 0 labelled images"),
        ({"fraction": 0.0}, r"fraction 0.0 must be in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction 1.5 must be in \(0, 1\]"),
        ({"count": 1001}, "count 1001 is larger than the 1000 images"),
        ({"count": 0}, "count 0 must be a positive integer"),
        ({}, "give exactly one of fraction or count"),
        ({"fraction": 0.1, "count": 3}, "give exactly one of fraction or count"),
        ({"count": 3, "seed": -1}, "seed must be non-negative, got -1"),
    ],
)
def test_split_errors(tmp_path, kwargs, message):
    dataset = make_dataset(tmp_path, num_images=1000)
    with pytest.raises(GdistillError, match=message) as info:
        split_labelled(dataset, **kwargs)
    assert str(info.value).startswith(str(dataset.path))
