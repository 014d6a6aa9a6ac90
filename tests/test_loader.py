import itertools
import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import gdistill.data.loader as loader_mod
from gdistill.data.augment import PAD_VALUE, LabelledAugment, UnlabelledAugment
from gdistill.data.coco import load_coco
from gdistill.data.loader import (
    EvalDataset,
    InfiniteSampler,
    LabelledDataset,
    PickledList,
    RepeatFactorSampler,
    UnlabelledDataset,
    collate_eval,
    collate_labelled,
    collate_unlabelled,
    ignore_stop_signals,
    infinite_loader,
    repeat_factors,
    sample_seed,
    worker_count,
)
from gdistill.data.sources import UnlabelledImage
from gdistill.errors import GdistillError

# image id → (height, width, [(category_id, (y0, y1, x0, x1), iscrowd)])
SCENES = {
    1: (24, 32, [(3, (2, 10, 4, 12), 0), (7, (12, 20, 16, 30), 0)]),
    2: (32, 24, [(3, (5, 25, 3, 20), 0)]),
    3: (28, 28, [(3, (1, 9, 1, 9), 0), (7, (15, 27, 10, 20), 1)]),
    4: (20, 36, []),
}
COLOURS = {3: (220, 30, 30), 7: (30, 30, 220)}


def _write_coco(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    images, annotations = [], []
    for image_id, (h, w, objects) in SCENES.items():
        pixels = np.full((h, w, 3), 40, dtype=np.uint8)
        for category_id, (y0, y1, x0, x1), iscrowd in objects:
            pixels[y0:y1, x0:x1] = COLOURS[category_id]
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[y0:y1, x0:x1] = 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                    "area": float(mask.sum()),
                    "iscrowd": iscrowd,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                }
            )
        name = f"im{image_id}.png"
        Image.fromarray(pixels).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    categories = [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}]
    path = tmp_path / "train.json"
    content = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(content))
    return load_coco(path), images_dir


@pytest.fixture
def coco(tmp_path):
    return _write_coco(tmp_path)


def test_labelled_dataset_sample_exact(coco):
    dataset, images_dir = coco
    # size 32, s = 1 on a 24x32 image: factor 1, no resize, no crop; pad 8 rows.
    ds = LabelledDataset(dataset, images_dir, LabelledAugment(32, (1.0, 1.0), flip=False), seed=0)
    assert len(ds) == 4
    sample = ds[(0, 5)]
    assert sample["image_id"] == 1
    assert sample["labels"].tolist() == [0, 1]  # category ids 3, 7 → contiguous 0, 1
    expected = torch.zeros(2, 32, 32, dtype=torch.bool)
    expected[0, 2:10, 4:12] = True
    expected[1, 12:20, 16:30] = True
    assert torch.equal(sample["masks"], expected)
    assert sample["valid"][:24].all() and not sample["valid"][24:].any()
    assert sample["image"][:, 2, 4].tolist() == [220, 30, 30]
    assert (sample["image"][:, 24:] == PAD_VALUE).all()


def test_labelled_dataset_crowd_and_empty_images(coco):
    dataset, images_dir = coco
    ds = LabelledDataset(dataset, images_dir, LabelledAugment(32, (1.0, 1.0), flip=False), seed=0)
    assert ds[2]["labels"].tolist() == [0]  # the crowd annotation is not a target
    empty = ds[3]
    assert empty["masks"].shape == (0, 32, 32) and empty["labels"].shape == (0,)


def test_pickled_list_returns_equal_fresh_copies(coco):
    dataset, _ = coco
    records = PickledList(dataset.images)
    assert len(records) == len(dataset.images)
    assert [records[i] for i in range(len(records))] == dataset.images
    assert list(records) == dataset.images and records[-1] == dataset.images[-1]
    assert records[0] is not records[0]  # unpickled anew: workers never touch the originals
    with pytest.raises(IndexError, match="index 4 out of range for 4 items"):
        records[len(records)]
    assert len(PickledList([])) == 0


def test_labelled_dataset_decodes_once_and_is_keyed(coco, monkeypatch):
    dataset, images_dir = coco
    calls = {"read": 0, "targets": 0}
    real_read, real_targets = loader_mod.read_image, loader_mod.load_targets

    def counting_read(*args, **kwargs):
        calls["read"] += 1
        return real_read(*args, **kwargs)

    def counting_targets(*args, **kwargs):
        calls["targets"] += 1
        return real_targets(*args, **kwargs)

    monkeypatch.setattr(loader_mod, "read_image", counting_read)
    monkeypatch.setattr(loader_mod, "load_targets", counting_targets)
    ds = LabelledDataset(dataset, images_dir, LabelledAugment(32), seed=11)
    a, b, c = ds[(0, 3)], ds[(0, 3)], ds[(0, 4)]
    assert calls == {"read": 3, "targets": 3}
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
    assert not torch.equal(a["image"], c["image"])  # another draw of the same image
    other_seed = LabelledDataset(dataset, images_dir, LabelledAugment(32), seed=12)[(0, 3)]
    assert not torch.equal(a["image"], other_seed["image"])


def test_labelled_dataset_wrong_image_size_is_an_error(coco):
    dataset, images_dir = coco
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(images_dir / "im2.png")
    ds = LabelledDataset(dataset, images_dir, LabelledAugment(32), seed=0)
    with pytest.raises(GdistillError, match="im2.png"):
        ds[1]


def test_sample_seed_distinct():
    seeds = {sample_seed(s, i, d) for s in range(3) for i in range(4) for d in range(4)}
    assert len(seeds) == 48
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)


def test_unlabelled_dataset(coco, tmp_path):
    dataset, images_dir = coco
    images = [
        UnlabelledImage(key=im.file_name, path=images_dir / im.file_name, image_id=None)
        for im in dataset.images
    ]
    ds = UnlabelledDataset(images, UnlabelledAugment(32), seed=0)
    sample = ds[(1, 0)]
    assert sample["key"] == "im2.png"
    assert sample["weak"].shape == sample["strong"].shape == (3, 32, 32)
    assert sample["valid"].shape == (32, 32) and sample["valid"].any()
    again = ds[(1, 0)]
    assert torch.equal(sample["strong"], again["strong"])


def test_an_unlabelled_image_that_cannot_be_decoded_gives_way_to_the_next(coco, tmp_path):
    """A JPEG cut short after its header passes the start-up check; when drawn, the next image
    is used in its place, with a warning naming the file, and the run goes on."""
    dataset, images_dir = coco
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    images = [UnlabelledImage("cut.jpg", tmp_path / "cut.jpg", None)] + [
        UnlabelledImage(im.file_name, images_dir / im.file_name, None) for im in dataset.images
    ]
    ds = UnlabelledDataset(images, UnlabelledAugment(32), seed=0)
    with pytest.warns(UserWarning, match=r"cut.jpg: corrupt or truncated image .*: skipped, the "
                                         "next unlabelled image used instead"):
        sample = ds[(0, 0)]
    assert sample["key"] == images[1].key and sample["weak"].shape == (3, 32, 32)
    only_broken = UnlabelledDataset(images[:1], UnlabelledAugment(32), seed=0)
    with pytest.warns(UserWarning), pytest.raises(GdistillError, match="none of the 1 unlabelled"):
        only_broken[(0, 0)]


def test_eval_dataset_coco_and_folder(coco):
    dataset, images_dir = coco
    ds = EvalDataset(dataset, images_dir, short_side=48, max_side=64)
    s = ds[0]  # 24x32 → x2 = 48x64
    assert s["image"].shape == (3, 48, 64) and s["orig_size"] == (24, 32)
    assert s["image_id"] == 1 and s["key"] == "im1.png"
    s = ds[3]  # 20x36 → 48x86.4 capped at 64: 35.6x64 → 36x64
    assert s["image"].shape == (3, 36, 64) and s["orig_size"] == (20, 36)
    listed = EvalDataset([UnlabelledImage("b/x.png", images_dir / "im2.png", None)], None, 24, 100)
    s = listed[0]
    assert s["image"].shape == (3, 32, 24) and s["image_id"] is None and s["key"] == "b/x.png"
    batch = collate_eval([ds[0], ds[3], listed[0]])
    assert batch["images"].shape == (3, 3, 64, 64)
    assert batch["image_sizes"] == [(48, 64), (36, 64), (32, 24)]
    assert batch["orig_sizes"] == [(24, 32), (20, 36), (32, 24)]
    assert batch["image_ids"] == [1, 4, None]
    assert (batch["images"][1, :, 36:] == PAD_VALUE).all()
    assert torch.equal(batch["images"][2, :, :32, :24], listed[0]["image"])


def _labelled_sample(h, w, n, fill):
    return {
        "image": torch.full((3, h, w), fill, dtype=torch.uint8),
        "masks": torch.ones(n, h, w, dtype=torch.bool),
        "labels": torch.arange(n),
        "valid": torch.ones(h, w, dtype=torch.bool),
        "image_id": fill,
    }


def test_collate_labelled_padding():
    batch = collate_labelled([_labelled_sample(20, 30, 2, 5), _labelled_sample(40, 10, 0, 9)])
    assert batch["images"].shape == (2, 3, 64, 32) and batch["images"].dtype == torch.uint8
    assert batch["valid"].shape == (2, 64, 32)
    assert batch["valid"][0].sum() == 20 * 30 and batch["valid"][0, :20, :30].all()
    assert batch["valid"][1].sum() == 40 * 10 and batch["valid"][1, :40, :10].all()
    assert (batch["images"][0, :, :20, :30] == 5).all()
    assert batch["images"][0].sum() == 5 * 3 * 600 + PAD_VALUE * 3 * (64 * 32 - 600)
    masks = batch["targets"][0]["masks"]
    assert masks.shape == (2, 64, 32) and masks.sum() == 2 * 600 and masks[:, :20, :30].all()
    assert batch["targets"][1]["masks"].shape == (0, 64, 32)
    assert batch["targets"][0]["labels"].tolist() == [0, 1]
    assert batch["image_ids"] == [5, 9]
    exact = collate_labelled([_labelled_sample(20, 30, 1, 5)], size_divisibility=0)
    assert exact["images"].shape == (1, 3, 20, 30)
    assert collate_labelled([_labelled_sample(64, 33, 1, 1)])["images"].shape == (1, 3, 64, 64)


def test_collate_unlabelled_padding():
    def sample(h, w, key):
        valid = torch.zeros(h, w, dtype=torch.bool)
        valid[: h // 2] = True
        return {
            "weak": torch.full((3, h, w), 3, dtype=torch.uint8),
            "strong": torch.full((3, h, w), 4, dtype=torch.uint8),
            "valid": valid,
            "key": key,
        }

    batch = collate_unlabelled([sample(32, 32, "a"), sample(20, 50, "b")])
    assert batch["weak"].shape == batch["strong"].shape == (2, 3, 32, 64)
    assert batch["valid"].shape == (2, 32, 64)
    assert batch["valid"][1].sum() == 10 * 50 and batch["valid"][0].sum() == 16 * 32
    assert (batch["strong"][1, :, 20:] == PAD_VALUE).all() and (batch["strong"][1, :, :20, :50] == 4).all()
    assert batch["keys"] == ["a", "b"]


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_infinite_sampler_epochs_and_determinism():
    keys = _take(InfiniteSampler(7, seed=3), 21)
    assert [d for _, d in keys] == list(range(21))
    epochs = [[i for i, _ in keys[e * 7 : (e + 1) * 7]] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    assert keys == _take(InfiniteSampler(7, seed=3), 21)
    assert keys != _take(InfiniteSampler(7, seed=4), 21)
    ordered = [i for i, _ in _take(InfiniteSampler(4, seed=0, shuffle=False), 10)]
    assert ordered == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]


def test_infinite_sampler_sharding_and_resume():
    full = _take(InfiniteSampler(9, seed=1), 40)
    rank0 = _take(InfiniteSampler(9, seed=1, rank=0, world_size=2), 20)
    rank1 = _take(InfiniteSampler(9, seed=1, rank=1, world_size=2), 20)
    assert rank0 == full[0::2] and rank1 == full[1::2]
    even = _take(InfiniteSampler(10, seed=1), 10)
    r0 = _take(InfiniteSampler(10, seed=1, rank=0, world_size=2), 5)
    r1 = _take(InfiniteSampler(10, seed=1, rank=1, world_size=2), 5)
    assert {i for i, _ in r0}.isdisjoint({i for i, _ in r1})
    assert {i for i, _ in r0} | {i for i, _ in r1} == {i for i, _ in even} == set(range(10))
    assert _take(InfiniteSampler(9, seed=1, rank=1, world_size=2, start=13), 7) == rank1[13:20]
    with pytest.raises(ValueError):
        InfiniteSampler(5, seed=0, rank=2, world_size=2)


def _write_freq_coco(tmp_path, image_cats, crowd=()):
    """One 8x8 image per entry of `image_cats` (a list of category-id lists)."""
    images, annotations = [], []
    rle = {"size": [8, 8], "counts": [0, 4, 60]}
    for image_id, cats in enumerate(image_cats, start=1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 8, "width": 8})
        for c in cats:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": c,
                    "segmentation": rle,
                    "area": 4.0,
                    "iscrowd": int((image_id, c) in crowd),
                }
            )
    path = tmp_path / "freq.json"
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return load_coco(path)


def test_repeat_factors_hand_computed(tmp_path):
    # f(a) = 3/4, f(b) = 1/4 (the crowd b on image 4 does not count).
    dataset = _write_freq_coco(tmp_path, [[1], [1, 2], [1], [2]], crowd={(4, 2)})
    factors = repeat_factors(dataset, threshold=1.0)
    r_a, r_b = math.sqrt(1 / 0.75), 2.0
    assert factors == pytest.approx([r_a, r_b, r_a, 1.0])
    assert repeat_factors(dataset, threshold=0.1) == pytest.approx([1.0, 1.0, 1.0, 1.0])
    with pytest.raises(GdistillError):
        repeat_factors(dataset, threshold=0.0)


def test_repeat_factor_sampler():
    factors = [1.0, 2.0, 1.5]
    keys = _take(RepeatFactorSampler(factors, seed=0), 4500)  # ~1000 epochs of 4.5 draws
    counts = np.bincount([i for i, _ in keys], minlength=3) / 4500 * 4.5
    assert counts == pytest.approx([1.0, 2.0, 1.5], rel=0.05)
    assert [d for _, d in keys[:50]] == list(range(50))
    assert keys[:100] == _take(RepeatFactorSampler(factors, seed=0), 100)
    assert keys[:100] != _take(RepeatFactorSampler(factors, seed=1), 100)
    rank1 = _take(RepeatFactorSampler(factors, seed=0, rank=1, world_size=2), 50)
    assert rank1 == keys[1:100:2]
    resumed = _take(RepeatFactorSampler(factors, seed=0, rank=1, world_size=2, start=30), 20)
    assert resumed == rank1[30:50]


def test_infinite_loader_same_batches_with_and_without_workers(coco):
    dataset, images_dir = coco
    ds = LabelledDataset(dataset, images_dir, LabelledAugment(32, (0.5, 1.5)), seed=5)
    runs = []
    for workers in (0, 2):
        it = infinite_loader(ds, 2, collate_labelled, InfiniteSampler(len(ds), seed=9), workers, 9)
        runs.append([next(it) for _ in range(3)])  # 6 samples: crosses an epoch boundary
        it.close()
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["valid"], b["valid"])
        assert a["image_ids"] == b["image_ids"]
        for ta, tb in zip(a["targets"], b["targets"], strict=True):
            assert torch.equal(ta["masks"], tb["masks"]) and torch.equal(ta["labels"], tb["labels"])
    assert runs[0][0]["images"].shape == (2, 3, 32, 32)
    drawn = [(i, b["images"][k]) for b in runs[0] for k, i in enumerate(b["image_ids"])]
    assert {i for i, _ in drawn[:4]} == {1, 2, 3, 4}  # the first epoch is a permutation
    for i, image in drawn[4:]:  # second-epoch draws of an image get a new augmentation
        first = next(im for j, im in drawn[:4] if j == i)
        assert not torch.equal(first, image)


def test_infinite_loader_start_batch_resumes_stream(coco):
    dataset, images_dir = coco
    ds = LabelledDataset(dataset, images_dir, LabelledAugment(32, (0.5, 1.5)), seed=5)
    full = infinite_loader(ds, 2, collate_labelled, InfiniteSampler(len(ds), seed=9), 0, 9)
    batches = [next(full) for _ in range(5)]
    resumed = infinite_loader(
        ds, 2, collate_labelled, InfiniteSampler(len(ds), seed=9), 0, 9, start_batch=3
    )
    for expected in batches[3:]:
        got = next(resumed)
        assert got["image_ids"] == expected["image_ids"]
        assert torch.equal(got["images"], expected["images"])
    # a sampler without `shifted` (here a finite list) is skipped on its first pass only
    plain = infinite_loader(ds, 2, collate_labelled, [(0, 0), (1, 1), (2, 2), (3, 3)], 0, 9, 1)
    assert [next(plain)["image_ids"] for _ in range(3)] == [[3, 4], [1, 2], [3, 4]]


def test_worker_count_is_capped_at_the_usable_cpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [worker_count(n) for n in (0, 1, 2, 4, 16)] == [0, 1, 2, 2, 2]
    monkeypatch.delattr("os.sched_getaffinity", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert worker_count(4) == 1


class _Keys(torch.utils.data.Dataset):
    def __getitem__(self, key):
        return key


def test_loader_with_more_workers_than_cpus_does_not_warn(monkeypatch, recwarn):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    keys = infinite_loader(_Keys(), 2, list, InfiniteSampler(6, seed=0), 8, seed=0)
    first = next(keys)
    assert len(first) == 2 and {index for index, _ in first} <= set(range(6))
    assert not [w for w in recwarn if "worker" in str(w.message)]


class _WorkerPid(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return os.getpid()


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="the sender of a signal is not known")
def test_a_worker_outlives_a_sigterm_to_the_group_and_ends_on_its_main_process_one():
    loader = torch.utils.data.DataLoader(
        _WorkerPid(), batch_size=None, num_workers=2, worker_init_fn=ignore_stop_signals
    )
    batches = iter(loader)
    pids = {next(batches) for _ in range(4)}
    workers = {w.pid: w for w in batches._workers}
    assert pids == set(workers)
    first, second = sorted(pids)
    # Sent by another process, as scancel or a shell's `kill -- -PGID` would: the main process
    # handles that stop, the worker keeps serving it.
    subprocess.run(["kill", "-TERM", str(first)], check=True)
    subprocess.run(["kill", "-INT", str(first)], check=True)
    time.sleep(0.5)
    assert workers[first].is_alive() and first in {next(batches) for _ in range(4)}
    # Sent by the main process, as PyTorch and multiprocessing end their workers: it ends.
    os.kill(second, signal.SIGTERM)
    workers[second].join(timeout=10)
    assert workers[second].exitcode == 0
    del batches  # shuts the other worker down through the same path
    workers[first].join(timeout=10)
    assert workers[first].exitcode == 0
