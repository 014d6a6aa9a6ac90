"""Datasets, collate functions, infinite samplers and the training loader.

Reproducibility design
----------------------
The training samplers are infinite streams of *keys* ``(index, draw)``: ``index`` is the dataset
item and ``draw`` its position in the global (all-ranks) stream, so every draw of an image — even
repeated draws within one epoch by ``RepeatFactorSampler`` — has its own number. Datasets seed a
fresh ``torch.Generator`` from ``sample_seed(seed, index, draw)`` and hand it to the augmentation.
The sample is therefore a pure function of ``(seed, index, draw)``: the same seed gives the same
batches whatever the number of workers, and a run resumes exactly by restarting the sampler at
``start`` (the number of keys this rank has already consumed; see
``infinite_loader(start_batch=...)``). A plain ``int`` key means ``(index, 0)``.

Sharding follows detectron2: rank r takes the global positions r, r + W, r + 2W, ... of the
concatenated epoch permutations (``indices[rank::world_size]`` of the infinite stream), so no
rank ever runs dry and the ranks never see the same draw.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import pickle
import random
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from gdistill.data.augment import PAD_VALUE, LabelledAugment, UnlabelledAugment, resize_for_eval
from gdistill.data.coco import CocoDataset, load_targets, read_image
from gdistill.data.sources import UnlabelledImage
from gdistill.errors import GdistillError, UnreadableImageError

SampleKey = int | tuple[int, int]  # (index, draw); a plain int means (index, 0)

_TAG_SAMPLE, _TAG_PERMUTATION, _TAG_REPEAT = 0, 1, 2


def sample_seed(seed: int, index: int, draw: int) -> int:
    """64-bit seed of one sample draw (a hash of the three numbers via numpy SeedSequence)."""
    entropy = [_TAG_SAMPLE, seed % 2**64, index, draw]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def _generator(*keys: int) -> torch.Generator:
    entropy = [k % 2**64 for k in keys]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _split_key(key: SampleKey) -> tuple[int, int]:
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0


def _to_chw(image: np.ndarray) -> Tensor:
    """uint8 [H, W, 3] array → uint8 [3, H, W] tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


class PickledList(Sequence):
    """A read-only list kept as its items' pickles in one numpy byte array; ``[i]`` unpickles a
    fresh copy of item i (about 10 us for a COCO image record).

    DataLoader workers are forked from the training process. Reading a Python object there
    updates its reference count, which copies its memory page into the worker: over an epoch
    each worker would copy a share of a list of image records, hundreds of MB per worker for
    COCO (measured in benchmarks/loader_memory.py). One array is a handful of objects, read
    without touching the others, and its pickles are several times smaller than the objects.
    """

    def __init__(self, items: Iterable[Any]) -> None:
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._bytes = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return pickle.loads(self._bytes[start : int(self._ends[index])])


class LabelledDataset(Dataset):
    """Labelled COCO images with LSJ; image and masks decoded once per sample.

    ``__getitem__((index, draw))`` → {"image": uint8 [3, S, S], "masks": bool [M, S, S],
    "labels": int64 [M], "valid": bool [S, S], "image_id": int}.
    """

    def __init__(
        self, dataset: CocoDataset, images_dir: Path, augment: LabelledAugment, seed: int
    ) -> None:
        self.dataset = dataset
        self.records = PickledList(dataset.images)  # read in the workers instead of .images
        self.images_dir = Path(images_dir)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, draw = _split_key(key)
        record = self.records[index]
        image = read_image(
            self.images_dir / record.file_name, expected_size=(record.height, record.width)
        )
        labels, masks = load_targets(record, self.dataset)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, index, draw))
        out = self.augment(
            _to_chw(image), torch.from_numpy(masks), torch.from_numpy(labels), generator
        )
        out["image_id"] = record.id
        return out


class UnlabelledDataset(Dataset):
    """Unlabelled images → weak and strong views of the same geometry.

    ``__getitem__((index, draw))`` → {"weak": uint8 [3, S, S], "strong": uint8 [3, S, S],
    "valid": bool [S, S], "key": str}.
    """

    def __init__(
        self, images: Sequence[UnlabelledImage], augment: UnlabelledAugment, seed: int
    ) -> None:
        self.images = PickledList(images)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, draw = _split_key(key)
        # An image that passed the start-up header check but cannot be decoded (a file cut
        # short, as large scraped folders hold) gives way to the next readable one, with a
        # warning, instead of ending a run of 10^5 iterations at a random one.
        for offset in range(len(self.images)):
            record = self.images[(index + offset) % len(self.images)]
            try:
                image = read_image(record.path)
                break
            except UnreadableImageError as e:
                warnings.warn(f"{e}: skipped, the next unlabelled image used instead", stacklevel=2)
        else:
            raise GdistillError(f"none of the {len(self.images)} unlabelled images can be read")
        generator = torch.Generator().manual_seed(sample_seed(self.seed, index, draw))
        out = self.augment(_to_chw(image), generator)
        out["key"] = record.key
        return out


class EvalDataset(Dataset):
    """Evaluation / prediction images resized with ``resize_for_eval``.

    `dataset` is a COCO file (images read from `images_dir`, sizes checked against the JSON) or a
    list of ``UnlabelledImage`` (paths used as they are; `images_dir` ignored).

    ``__getitem__(i)`` → {"image": uint8 [3, h, w], "orig_size": (H, W), "image_id": int | None,
    "key": str}.
    """

    def __init__(
        self,
        dataset: CocoDataset | Sequence[UnlabelledImage],
        images_dir: Path | None,
        short_side: int,
        max_side: int,
    ) -> None:
        if isinstance(dataset, CocoDataset):
            if images_dir is None:
                raise GdistillError(f"{dataset.path}: an images directory is needed to read it")
            root = Path(images_dir)
            self.items = [
                (root / im.file_name, (im.height, im.width), im.id, im.file_name)
                for im in dataset.images
            ]
        else:
            self.items = [(im.path, None, im.image_id, im.key) for im in dataset]
        self.short_side = short_side
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, _ = _split_key(key)
        path, expected_size, image_id, name = self.items[index]
        image = _to_chw(read_image(path, expected_size=expected_size))
        return {
            "image": resize_for_eval(image, self.short_side, self.max_side),
            "orig_size": (image.shape[1], image.shape[2]),
            "image_id": image_id,
            "key": name,
        }


def padded_size(sizes: Sequence[tuple[int, int]], size_divisibility: int = 32) -> tuple[int, int]:
    """Max (H, W) over `sizes`, each rounded up to a multiple of `size_divisibility` (if > 0)."""
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    if size_divisibility > 0:
        h = math.ceil(h / size_divisibility) * size_divisibility
        w = math.ceil(w / size_divisibility) * size_divisibility
    return h, w


def _pad_stack(tensors: Sequence[Tensor], size: tuple[int, int], fill: int = 0) -> Tensor:
    """Pad [..., h_i, w_i] tensors on the right/bottom with ``fill`` to `size` and stack →
    [B, ..., H, W]."""
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], *size), fill)
    for i, t in enumerate(tensors):
        out[i, ..., : t.shape[-2], : t.shape[-1]] = t
    return out


def _pad_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """bool [N, h, w] → bool [N, H, W], zero-padded right/bottom."""
    out = masks.new_zeros((masks.shape[0], *size))
    out[:, : masks.shape[-2], : masks.shape[-1]] = masks
    return out


def collate_labelled(
    samples: list[dict], size_divisibility: int = 32, pad_value: int = PAD_VALUE
) -> dict[str, Any]:
    """→ {"images": uint8 [B, 3, H, W], "valid": bool [B, H, W],
    "targets": [{"labels": int64 [N], "masks": bool [N, H, W]}], "image_ids": list[int]}
    with H, W the batch maximum rounded up to a multiple of `size_divisibility`."""
    size = padded_size([s["image"].shape[-2:] for s in samples], size_divisibility)
    return {
        "images": _pad_stack([s["image"] for s in samples], size, pad_value),
        "valid": _pad_stack([s["valid"] for s in samples], size),
        "targets": [
            {"labels": s["labels"], "masks": _pad_masks(s["masks"], size)} for s in samples
        ],
        "image_ids": [s["image_id"] for s in samples],
    }


def collate_unlabelled(
    samples: list[dict], size_divisibility: int = 32, pad_value: int = PAD_VALUE
) -> dict[str, Any]:
    """→ {"weak": uint8 [B, 3, H, W], "strong": uint8 [B, 3, H, W], "valid": bool [B, H, W],
    "keys": list[str]}."""
    size = padded_size([s["weak"].shape[-2:] for s in samples], size_divisibility)
    return {
        "weak": _pad_stack([s["weak"] for s in samples], size, pad_value),
        "strong": _pad_stack([s["strong"] for s in samples], size, pad_value),
        "valid": _pad_stack([s["valid"] for s in samples], size),
        "keys": [s["key"] for s in samples],
    }


def collate_eval(
    samples: list[dict], size_divisibility: int = 32, pad_value: int = PAD_VALUE
) -> dict[str, Any]:
    """→ {"images": uint8 [B, 3, H, W], "image_sizes": [(h, w)] (resized, before padding),
    "orig_sizes": [(H, W)], "image_ids": list[int | None], "keys": list[str]}."""
    sizes = [tuple(s["image"].shape[-2:]) for s in samples]
    return {
        "images": _pad_stack(
            [s["image"] for s in samples], padded_size(sizes, size_divisibility), pad_value
        ),
        "image_sizes": sizes,
        "orig_sizes": [tuple(s["orig_size"]) for s in samples],
        "image_ids": [s["image_id"] for s in samples],
        "keys": [s["key"] for s in samples],
    }


def _check_shard(rank: int, world_size: int, start: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    if start < 0:
        raise ValueError(f"sampler start must be >= 0, got {start}")


class InfiniteSampler(Sampler):
    """Infinite stream of ``(index, draw)`` keys over ``range(size)``.

    Epoch e is a permutation seeded by (seed, e) (identity order if not `shuffle`); the epochs are
    concatenated and rank r takes global positions r, r + W, ...; ``draw`` is that global
    position. `start` skips this rank's first `start` keys (resume).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError(f"InfiniteSampler needs size >= 1, got {size}")
        _check_shard(rank, world_size, start)
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.start = rank, world_size, start

    def shifted(self, count: int) -> InfiniteSampler:
        """A copy that starts `count` keys later."""
        return InfiniteSampler(
            self.size, self.seed, self.shuffle, self.rank, self.world_size, self.start + count
        )

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = _generator(_TAG_PERMUTATION, self.seed, epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.rank + self.start * self.world_size
        epoch = position // self.size
        while True:
            order, offset = self._order(epoch), epoch * self.size
            while position < offset + self.size:
                yield order[position - offset], position
                position += self.world_size
            epoch += 1


class RepeatFactorSampler(Sampler):
    """LVIS-style repeat-factor sampling (detectron2 ``RepeatFactorTrainingSampler``), infinite.

    Each epoch e, image i appears floor(r_i) times plus once more with probability frac(r_i)
    (stochastic rounding seeded by (seed, e)); the resulting list is shuffled and the epochs are
    sharded like ``InfiniteSampler``. Yields ``(index, draw)`` keys.
    """

    def __init__(
        self,
        repeat_factors: Sequence[float],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        factors = torch.as_tensor(list(repeat_factors), dtype=torch.float64)
        if factors.numel() == 0 or bool((factors < 1).any()):
            raise ValueError("repeat factors must be a non-empty list of values >= 1")
        _check_shard(rank, world_size, start)
        self.factors = factors.tolist()
        self.integer = factors.floor()
        self.fraction = factors - self.integer
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start

    def shifted(self, count: int) -> RepeatFactorSampler:
        """A copy that starts `count` keys later."""
        return RepeatFactorSampler(
            self.factors, self.seed, self.rank, self.world_size, self.start + count
        )

    def _counts(self, generator: torch.Generator) -> Tensor:
        draws = torch.rand(self.fraction.shape, generator=generator, dtype=torch.float64)
        return (self.integer + (draws < self.fraction)).long()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.rank + self.start * self.world_size
        epoch, offset = 0, 0
        while True:
            g = _generator(_TAG_REPEAT, self.seed, epoch)
            counts = self._counts(g)
            length = int(counts.sum())
            if position < offset + length:
                indices = np.repeat(np.arange(len(counts)), counts.numpy())
                order = indices[torch.randperm(length, generator=g).numpy()].tolist()
                while position < offset + length:
                    yield order[position - offset], position
                    position += self.world_size
            offset += length
            epoch += 1


def repeat_factors(dataset: CocoDataset, threshold: float) -> list[float]:
    """Per-image LVIS repeat factors.

    r(c) = max(1, sqrt(threshold / f(c))) with f(c) the fraction of images that contain class c
    (non-crowd annotations, the ones trained on); an image's factor is the max over its classes,
    1.0 for an image without any.
    """
    if threshold <= 0:
        raise GdistillError(f"repeat-factor threshold must be > 0, got {threshold}")
    per_image = [{a.category_id for a in im.annotations if not a.iscrowd} for im in dataset.images]
    counts: dict[int, int] = {}
    for cats in per_image:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    n = max(len(per_image), 1)
    class_factor = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return [max((class_factor[c] for c in cats), default=1.0) for cats in per_image]


class _SkipSampler(Sampler):
    """Fallback for samplers without ``shifted``: the first pass omits its first `count` keys,
    later passes (a finite sampler restarted by ``infinite_loader``) are complete."""

    def __init__(self, sampler: Sampler, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __iter__(self) -> Iterator[Any]:
        count, self.count = self.count, 0
        return itertools.islice(iter(self.sampler), count, None)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn`` for the main process's stop on a signal
    (``engine/stop_signals.py``): a worker survives the stop signals meant for its main process,
    which finishes its iteration (it may need the worker's batch), saves and shuts it down.

    - SIGINT (a terminal's Ctrl-C reaches the whole process group) is ignored.
    - SIGTERM from the main process (how PyTorch and multiprocessing end workers) ends the worker
      with status 0: ignoring it would hang their shutdown, and dying of it would make PyTorch's
      SIGCHLD handler abort the main process.
    - SIGTERM from anyone else is ignored: that is a signal to the whole process group (SLURM's
      scancel and pre-emption, torchrun's agent ending its ranks, ``kill -- -PGID``), which the
      main process got too. A worker whose main process is gone ends by itself (PyTorch's
      watchdog) within seconds.
    Where the sender cannot be told (no ``sigwaitinfo``: macOS), every SIGTERM ends the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = multiprocessing.parent_process()
    main_pid = parent.pid if parent is not None else os.getppid()
    # Blocked here, before the worker starts any thread, SIGTERM stays blocked in every thread
    # and is only taken by sigwaitinfo, which tells who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(main_pid,), daemon=True).start()


def _end_on_sigterm_from(main_pid: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == main_pid:
            os._exit(0)


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(0)


def _seed_worker(worker_id: int) -> None:
    ignore_stop_signals()
    # torch already seeds each worker from the loader's generator; align numpy and random too
    # for any third-party randomness (the augmentations themselves use explicit generators).
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def worker_count(requested: int) -> int:
    """`requested` DataLoader workers, at most one per CPU this process may run on: more only
    queue behind each other (and make PyTorch warn). Batches do not depend on the count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(requested, cpus))


def infinite_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable[[list[dict]], Any],
    sampler: Sampler,
    num_workers: int,
    seed: int,
    start_batch: int = 0,
    pin_memory: bool = False,
) -> Iterator[Any]:
    """Yield batches forever from a DataLoader over `sampler` (restarted if it ever ends).

    Workers are persistent; their global RNGs are seeded from `seed`. Batch contents depend only
    on the sampler's keys and the dataset's seed, not on `num_workers`. `start_batch` skips the
    first `start_batch` batches (resume): the sampler starts `start_batch * batch_size` keys later,
    so the stream continues exactly where an uninterrupted run would be.
    """
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if start_batch:
        skip = start_batch * batch_size
        shifted = getattr(sampler, "shifted", None)
        sampler = shifted(skip) if callable(shifted) else _SkipSampler(sampler, skip)
    workers = worker_count(num_workers)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed % 2**63),
        pin_memory=pin_memory,
        drop_last=True,
    )
    while True:
        yield from loader
