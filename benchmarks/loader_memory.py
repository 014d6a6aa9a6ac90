"""Memory of the training loader's worker processes over many batches, on a COCO-sized file.

Workers are forked from the training process; every Python object they read gets its reference
count updated, which copies the object's memory page into the worker. This script builds an
annotation file of ``--images`` images with 7 polygons each (COCO train2017 has 118 k images and
7.3 instances per image) over hard links to one 640x480 JPEG, then draws ``--batches`` batches
from 2 workers and prints each worker's private memory (``Private_Dirty`` of
/proc/PID/smaps_rollup) as it goes: once with the image records as ``PickledList`` (what
``LabelledDataset`` uses) and once as the plain list of Python objects.

    python benchmarks/loader_memory.py --images 20000 --batches 2000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from gdistill.data.augment import LabelledAugment
from gdistill.data.coco import load_coco
from gdistill.data.loader import InfiniteSampler, LabelledDataset, collate_labelled, infinite_loader


def write_dataset(root: Path, num_images: int) -> Path:
    rng = random.Random(0)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(
        root / "base.jpg", quality=85
    )
    (root / "images").mkdir()
    images, annotations = [], []
    for i in range(1, num_images + 1):
        os.link(root / "base.jpg", root / "images" / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640})
        for _ in range(7):
            x, y = rng.uniform(0, 500), rng.uniform(0, 350)
            polygon = [v for _ in range(12) for v in (x + rng.uniform(0, 120), y + rng.uniform(0, 120))]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": rng.randint(1, 80),
                "iscrowd": 0, "segmentation": [polygon], "area": 1.0, "bbox": [x, y, 120, 120],
            })
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, 81)]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def private_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(r"^Private_Dirty:\s+(\d+)", text, re.M).group(1)) / 1024


def measure(dataset: LabelledDataset, batches: int, label: str) -> None:
    stream = infinite_loader(dataset, 2, collate_labelled, InfiniteSampler(len(dataset), seed=0), 2, seed=0)
    next(stream)  # forks the workers
    workers = [int(p) for p in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()]
    started = time.perf_counter()
    print(f"{label}: workers' private MiB after the first batch {[round(private_mib(w)) for w in workers]}")
    for done in range(1, batches + 1):
        next(stream)
        if done % (batches // 4) == 0:
            print(f"  after {done} batches ({time.perf_counter() - started:.0f} s): "
                  f"{[round(private_mib(w)) for w in workers]}")
    del stream  # ends the workers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        dataset = load_coco(write_dataset(root, args.images))
        print(f"{args.images} images, {sum(len(i.annotations) for i in dataset.images)} annotations "
              f"loaded in {time.perf_counter() - started:.1f} s; main process private "
              f"{private_mib(os.getpid()):.0f} MiB")
        labelled = LabelledDataset(dataset, root / "images", LabelledAugment(128), seed=0)
        measure(labelled, args.batches, "PickledList records")
        labelled.records = dataset.images  # the plain list of Python objects
        measure(labelled, args.batches, "plain list records")


if __name__ == "__main__":
    main()
