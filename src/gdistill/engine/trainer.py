"""The training loop. One loop serves both stages:

- stage A (``gdistill train``): the model learns from labelled images only;
- stage B (``gdistill distill``): a teacher (its own module, never trained by the optimizer)
  turns the weak view of unlabelled images into pseudo-labels for the student's strong view.

Read it top to bottom: set-up, resume, then one iteration = (teacher or EMA update) → labelled loss →
(unlabelled loss) → backward → step → log → evaluate → checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import math
import random
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from gdistill.config import (
    DEVICE_FORMS,
    Config,
    ModelConfig,
    config_differences,
    config_from_dict,
    config_to_dict,
    is_device_name,
)
from gdistill.data.augment import LabelledAugment, UnlabelledAugment
from gdistill.data.coco import CocoDataset, check_image_files
from gdistill.data.loader import (
    EvalDataset,
    InfiniteSampler,
    LabelledDataset,
    RepeatFactorSampler,
    UnlabelledDataset,
    collate_eval,
    collate_labelled,
    collate_unlabelled,
    ignore_stop_signals,
    infinite_loader,
    repeat_factors,
    worker_count,
)
from gdistill.data.sources import UnlabelledImage
from gdistill.distill.ema import ema_update
from gdistill.distill.pseudo_labels import class_histogram, pseudo_labels_from_teacher
from gdistill.distill.schedule import (
    ema_decay_for_step,
    phase_name,
    teacher_decay_for_step,
    unsupervised_loss_active,
)
from gdistill.engine import distributed
from gdistill.engine.allocator import keep_freed_memory
from gdistill.engine.checkpoint import (
    RUN_FILES,
    clear_run,
    latest_good_checkpoint,
    load_checkpoint,
    rng_state,
    rotate_and_save,
    run_folder_lock,
    save_checkpoint,
    set_rng_state,
)
from gdistill.engine.evaluate import autocast_for, evaluate_model, validation_picture
from gdistill.engine.optim import LEGACY_NO_DECAY, build_optimizer, build_scheduler
from gdistill.engine.run_info import read_run_info, write_run_info
from gdistill.engine.stop_signals import StopOnSignal
from gdistill.errors import GdistillError, NonFiniteOutputsError, TrainingStopped, one_line
from gdistill.model.backbone import FrozenBatchNorm2d
from gdistill.model.criterion import SetCriterion
from gdistill.model.mask2former import (
    Mask2Former,
    build_model,
    check_finite_outputs,
    images_to_model_input,
)
from gdistill.model.matcher import HungarianMatcher
from gdistill.progress import progress_bar
from gdistill.viz import model_names, plot_training_curves, save_pseudo_label_grid

MAX_NONFINITE_IN_A_ROW = 5


@dataclass
class TrainingData:
    """What a run learns from. ``unlabelled`` is only used by stage B."""

    labelled: CocoDataset
    images_dir: Path
    val: CocoDataset | None = None
    val_images_dir: Path | None = None
    unlabelled: list[UnlabelledImage] | None = None
    unlabelled_source: Path | None = None  # the JSON or folder `unlabelled` came from
    unlabelled_root: Path | None = None  # image root of a JSON source


def _warn_schedule_past_the_end(cfg: Config, is_distill: bool) -> None:
    """Schedule points at or past solver.max_iters never happen: say so (a shortened run that
    kept the defaults, e.g. solver.max_iters=20000 with the COCO learning-rate steps)."""
    end = cfg.solver.max_iters
    never = []
    late = [s for s in cfg.solver.lr_steps if s >= end] if cfg.solver.lr_schedule == "step" else []
    if late:
        never.append(f"solver.lr_steps {late} (the learning rate is not lowered there)")
    if is_distill and cfg.distill.burn_in != "none" and cfg.distill.burnin_iters >= end:
        never.append(
            f"distill.burnin_iters={cfg.distill.burnin_iters} (the whole run is burn-in: the "
            "teacher is never handed over)"
        )
    if not is_distill and cfg.solver.ema_decay > 0 and cfg.solver.ema_start >= end:
        never.append(
            f"solver.ema_start={cfg.solver.ema_start} (the moving average stays the model at step 0)"
        )
    if never:
        warnings.warn(
            f"solver.max_iters={end} ends before {'; '.join(never)}: scale them with the run",
            stacklevel=2,
        )


def _resolved(path: str | Path | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def resolve_device(name: str) -> torch.device:
    """The torch device for a config's ``device`` or a ``--device`` flag: auto, cpu, cuda, cuda:N."""
    if not is_device_name(name):
        raise GdistillError(f"device {name!r} is not one of {', '.join(DEVICE_FORMS)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GdistillError(f"device {name!r}: CUDA is not available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise GdistillError(f"device {name!r}: no such CUDA device ({count} visible)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_criterion(cfg: Config, num_classes: int) -> SetCriterion:
    loss = cfg.loss
    matcher = HungarianMatcher(loss.class_weight, loss.mask_weight, loss.dice_weight, loss.num_points)
    return SetCriterion(
        num_classes,
        matcher,
        no_object_weight=loss.no_object_weight,
        class_weight=loss.class_weight,
        mask_weight=loss.mask_weight,
        dice_weight=loss.dice_weight,
        num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio,
    )


def per_process_batch(total: int, world: int, key: str) -> int:
    """Each process's share of a batch size given for all processes together."""
    if total % world:
        raise GdistillError(
            f"{key}={total} is the batch over all processes and must divide among the {world} "
            f"processes; use a multiple of {world}"
        )
    return total // world


def check_class_names(expected: list[str], found: list[str], what: str) -> None:
    if list(expected) != list(found):
        raise GdistillError(f"{what}: classes {found} do not match the labelled data's classes {expected}")


def _architecture_from(checkpoint_model: ModelConfig, run_model: ModelConfig) -> ModelConfig:
    """The checkpoint's architecture, with this run's choices of how the backbone trains
    (``frozen_stages``, ``frozen_bn``, ``drop_path_rate``): they change training, not the weights'
    shapes."""
    model = copy.deepcopy(checkpoint_model)
    model.frozen_stages = run_model.frozen_stages
    model.frozen_bn = run_model.frozen_bn
    model.drop_path_rate = run_model.drop_path_rate
    return model


def teacher_from_checkpoint(path: Path, class_names: list[str]) -> tuple[Mask2Former, Config]:
    """Build the frozen teacher from a stage-A (or stage-B: its student) checkpoint."""
    payload = load_checkpoint(path)
    check_class_names(class_names, payload["class_names"], str(path))
    teacher_cfg = config_from_dict(payload["config"], str(path))
    teacher = build_model(_no_download(copy.deepcopy(teacher_cfg)).model, len(class_names))
    teacher.load_state_dict(payload["model"])
    return teacher, teacher_cfg


def trainable_images(dataset: CocoDataset) -> CocoDataset:
    """The labelled images with at least one non-crowd annotation, as detectron2's
    FILTER_EMPTY_ANNOTATIONS keeps: the others would teach nothing but background. Says how many
    it leaves out, and how many crowd annotations are not trained on; none left is an error."""
    kept = [img for img in dataset.images if any(not a.iscrowd for a in img.annotations)]
    if not kept:
        raise GdistillError(f"{dataset.path}: no image has a non-crowd annotation, nothing to train on")
    annotations = [a for img in dataset.images for a in img.annotations]
    crowd = sum(1 for a in annotations if a.iscrowd)
    if crowd:
        # Some converters mark every RLE mask iscrowd=1: the count makes such a file visible.
        warnings.warn(
            f"{dataset.path}: {crowd} of {len(annotations)} annotations are crowd regions (iscrowd=1) "
            "and are not trained on (as in detectron2, their pixels count as background)",
            stacklevel=3,
        )
    if len(kept) < len(dataset.images):
        warnings.warn(
            f"{dataset.path}: {len(dataset.images) - len(kept)} of {len(dataset.images)} labelled "
            "images have no non-crowd annotation and are not trained on",
            stacklevel=3,
        )
    return replace(dataset, images=kept)


def evaluation_line(step: int, max_iters: int, row: dict, labeller: str, threshold: float) -> str:
    """One evaluation's numbers as a log line: the AP of each model evaluated, and the
    pseudo-label precision and recall of ``labeller`` (the model that makes them) at the
    configured score threshold."""
    names = model_names(stage_b=labeller == "teacher")
    aps = [f"{names[who]} AP {row[f'{who}_AP']:.2f}" for who in ("student", "teacher", "ema")
           if row.get(f"{who}_AP") is not None]
    parts = [", ".join(aps) or "no AP"]
    quality = [f"{kind} {value:.3f}" for kind in ("precision", "recall")
               if (value := row.get(f"{labeller}_pl_{kind}@{threshold:g}")) is not None]
    if quality:
        parts.append(f"{names[labeller]}'s pseudo-labels at score > {threshold:g}: "
                     f"{', '.join(quality)}")
    return f"[eval] iteration {step}/{max_iters}: {'; '.join(parts)}"


def progress_postfix(train: dict[str, str], evaluation: dict, threshold: float) -> dict[str, str]:
    """The progress bar's numbers: the student's AP and its teacher's pseudo-label precision at
    the last evaluation, if any, then ``train`` (the last log window's). The evaluation comes
    first because tqdm cuts a line wider than the terminal at its end (an 80-column terminal keeps
    about 30 characters of postfix), and the losses are in metrics.csv anyway."""
    postfix = {}
    if evaluation.get("student_AP") is not None:
        postfix["AP"] = f"{evaluation['student_AP']:.1f}"
        precision = evaluation.get(f"teacher_pl_precision@{threshold:g}")
        if precision is not None:
            postfix["pl_prec"] = f"{precision:.2f}"
    postfix.update(train)
    return postfix


def _warn_more_objects_than_queries(dataset: CocoDataset, num_queries: int) -> None:
    """The model predicts at most ``num_queries`` objects per image; the matcher leaves the others
    of a more crowded image unmatched."""
    counts = [(sum(not a.iscrowd for a in img.annotations), img.id) for img in dataset.images]
    crowded = [c for c in counts if c[0] > num_queries]
    if crowded:
        most, image_id = max(crowded)
        warnings.warn(
            f"{dataset.path}: {len(crowded)} labelled images have more objects than "
            f"model.num_queries={num_queries} (image {image_id!r}: {most}); the model predicts "
            f"at most {num_queries} per image, raise model.num_queries to learn them all",
            stacklevel=3,
        )


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tensorboard_writer(out_dir: Path):
    """A TensorBoard writer when the ``tensorboard`` package is installed, else None (CSV only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _add_scalars(writer, row: dict, prefix: str) -> None:
    if writer is None:
        return
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{key}", value, row["step"])
    writer.flush()


@contextlib.contextmanager
def _setup_warnings_from_first_rank() -> Iterator[None]:
    """Under torchrun every rank checks the same config and data: only the first says what it
    found."""
    with warnings.catch_warnings():
        if distributed.launched_rank() > 0:
            warnings.simplefilter("ignore")
        yield


def _warn_config_ignored_on_resume(
    given: Config, run: Config, state_path: Path, saved_without: set[str] = frozenset()
) -> None:
    """A resumed run keeps its own config: name the given values that this ignores. Keys in
    ``saved_without`` came after the run's build: their default is not a value given."""
    derived = {"model.num_classes"}  # set from the data by the trainer
    given_not_default = {key for key, _, _ in config_differences(given, Config())}
    ignored = [
        f"{key}={mine} (run: {theirs})"
        for key, mine, theirs in config_differences(given, run)
        if key not in derived and (key not in saved_without or key in given_not_default)
    ]
    if ignored:
        warnings.warn(
            f"{state_path}: resuming with the run's own config; ignored: {', '.join(ignored)}",
            stacklevel=4,
        )


class MetricsLog:
    """Append-only CSV. A row with new keys adds columns (the file is rewritten once, earlier rows
    empty there). On resume, rows after the resume step are dropped so the file matches an
    uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.fields: list[str] | None = None
        if resume_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            rows = [r for r in rows if int(float(r["step"])) <= resume_step]
            if rows:
                self.fields = list(rows[0].keys())
                with open(path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self.fields)
                    writer.writeheader()
                    writer.writerows(rows)
            else:
                path.unlink()
        elif path.exists():
            path.unlink()

    def write(self, row: dict) -> None:
        if self.fields is None:
            self.fields = list(row.keys())
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fields).writeheader()
        new_fields = [k for k in row if k not in self.fields]
        if new_fields:
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self.fields += new_fields
            with open(self.path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields, restval="")
                writer.writeheader()
                writer.writerows(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(
                {k: _fmt(row.get(k, "")) for k in self.fields}
            )


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)  # e.g. the AP of a size bucket without objects


def _to_device_targets(targets: list[dict], device: torch.device) -> list[dict]:
    return [{"labels": t["labels"].to(device), "masks": t["masks"].to(device)} for t in targets]


def _sum_losses(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(losses.values())


def images_digest(dataset: CocoDataset) -> str:
    """A short hash of a dataset's image ids and file names: the same file with other images (a
    split written again) gives another."""
    listing = "\n".join(sorted(f"{img.id}\t{img.file_name}" for img in dataset.images))
    return hashlib.sha1(listing.encode()).hexdigest()[:16]


def _check_resumed_run(
    state: dict, state_path: Path, out_dir: Path, data: TrainingData, teacher_checkpoint: Path | None
) -> None:
    """A resumed run must see the classes it was trained on; other data than the run started
    with (run.json), or another teacher, is said."""
    check_class_names(data.labelled.class_names, state.get("class_names", []), str(state_path))
    info = read_run_info(out_dir)
    evaluated_on = info.get("val")
    if evaluated_on and data.val is None:
        warnings.warn(
            f"{out_dir}: the run was evaluated on {evaluated_on}; resumed without --val, it is not "
            "evaluated again and best.pt stays as it was",
            stacklevel=4,
        )
    given = {
        "labelled": (_resolved(data.labelled.path), len(data.labelled.images)),
        "val": (_resolved(data.val.path) if data.val else None, None),  # run.json has no count
        "unlabelled": (_resolved(data.unlabelled_source), len(data.unlabelled or [])),
    }
    recorded = {
        "labelled": (info.get("labelled"), info.get("labelled_images")),
        "val": (evaluated_on, None),
        "unlabelled": (info.get("unlabelled"), info.get("unlabelled_images")),
    }
    changed = []
    digest = info.get("labelled_digest")
    if digest is not None and digest != images_digest(data.labelled):
        changed.append(f"labelled images other than those of the run in {given['labelled'][0]}")
        given.pop("labelled")
    for key, (path, count) in given.items():
        old_path, old_count = recorded[key]
        if (key == "val" and path is None) or (key == "unlabelled" and state.get("stage") != "distill"):
            continue
        if old_path is not None and path != old_path:
            changed.append(f"{key} {path} (the run: {old_path})")
        elif old_count is not None and count != old_count:
            changed.append(f"{key} with {count} images (the run: {old_count})")
    if changed:
        mixed = " (eval.csv and best.pt now mix two validation sets)" if any(
            c.startswith("val ") for c in changed) else ""
        warnings.warn(
            f"{out_dir}: resumed on other data than the run started with: {'; '.join(changed)}; "
            f"it goes on with the data given now{mixed}",
            stacklevel=4,
        )
    started_from = info.get("teacher_checkpoint")
    if teacher_checkpoint is not None and _resolved(teacher_checkpoint) != started_from:
        warnings.warn(
            f"--teacher {teacher_checkpoint} is ignored on resume: the run goes on with its own "
            f"teacher, saved in {state_path.name} (it started from {started_from})",
            stacklevel=4,
        )


def _config_of_resumed_run(
    cfg: Config,
    state: dict,
    state_path: Path,
    out_dir: Path,
    data: TrainingData,
    teacher_checkpoint: str | Path | None,
) -> tuple[Config, bool]:
    """The config a resumed run goes on with: its own (overrides given now that differ are said
    to be ignored), read as the build that saved it trained. Also whether it was saved before
    batch sizes were over all processes (and its optimizer left bare embedding tables undecayed)."""
    run_cfg = config_from_dict(state["config"], str(state_path))
    saved_without = set()
    if "repeat_factor_threshold" not in state["config"].get("distill", {}):
        saved_without.add("distill.repeat_factor_threshold")
        if state["stage"] == "distill":
            # Saved by a build before the key, whose stage B drew its labelled images by
            # data.repeat_factor_threshold as stage A did: go on drawing them so.
            run_cfg.distill.repeat_factor_threshold = run_cfg.data.repeat_factor_threshold
    # Saved before model.drop_path_rate existed, by a build whose batch sizes were per process
    # and whose optimizer left bare embedding tables undecayed: resume as it trained.
    saved_before_global_batch = "drop_path_rate" not in state["config"].get("model", {})
    if saved_before_global_batch:
        saved_without.add("model.drop_path_rate")
    if "pad_value" not in state["config"].get("data", {}):
        saved_without.add("data.pad_value")  # its images were padded with black: 0 is kept
    with _setup_warnings_from_first_rank():
        _warn_config_ignored_on_resume(cfg, run_cfg, state_path, saved_without)
        _check_resumed_run(state, state_path, out_dir, data, teacher_checkpoint)
    if saved_before_global_batch:
        saved_by = len(state["rng"]) if isinstance(state["rng"], list) else 1
        run_cfg.data.batch_size *= saved_by
        run_cfg.data.unlabelled_batch_size *= saved_by
    return run_cfg, saved_before_global_batch


def _checked_inputs(cfg: Config, data: TrainingData, is_distill: bool) -> CocoDataset:
    """Refuse configs that cannot train and data that cannot be read, before any work; returns
    the labelled images that have something to train on."""
    distill_cfg = cfg.distill
    if is_distill and distill_cfg.student_init == "pretrained" and (
        distill_cfg.burn_in == "none" or distill_cfg.burnin_iters == 0
    ):
        given = "distill.burn_in=none" if distill_cfg.burn_in == "none" else "distill.burnin_iters=0"
        raise GdistillError(
            f"{given} hands the teacher over to the student at step 0: with "
            "distill.student_init=pretrained the stage-A teacher would never be used; "
            "set distill.student_init=teacher"
        )
    if is_distill and cfg.solver.ema_decay > 0:
        raise GdistillError(
            "config key 'solver.ema_decay' is for `gdistill train`; in distillation the teacher is "
            "the moving average of the student (distill.ema_decay)"
        )
    with _setup_warnings_from_first_rank():
        labelled = trainable_images(data.labelled)
        _warn_more_objects_than_queries(labelled, cfg.model.num_queries)
    check_image_files(labelled, data.images_dir)
    if data.val is not None:
        if not any(not a.iscrowd for img in data.val.images for a in img.annotations):
            raise GdistillError(
                f"{data.val.path}: no image has a non-crowd annotation, so there is no mask AP to "
                "compute (an unlabelled file of `gdistill split`?); pass annotated validation images"
            )
        check_image_files(data.val, data.val_images_dir)
    return labelled


def _data_streams(
    cfg: Config,
    data: TrainingData,
    labelled: CocoDataset,
    is_distill: bool,
    labelled_batch: int,
    unlabelled_batch: int,
    start_step: int,
) -> tuple[Iterator[dict], Iterator[dict] | None, torch.utils.data.DataLoader | None]:
    """This process's labelled stream, unlabelled stream (stage B) and validation loader (its
    shard of the validation images). The streams are seeded and start where a run stopped at
    ``start_step`` left off."""
    rank, world = distributed.rank(), distributed.world_size()
    dcfg = cfg.data
    labelled_ds = LabelledDataset(
        labelled,
        data.images_dir,
        LabelledAugment(dcfg.image_size, dcfg.scale_range, pad_value=dcfg.pad_value),
        seed=cfg.seed,
    )
    # The authors sample labelled images uniformly in stage A, by repeat factors in stage B.
    repeat_threshold = cfg.distill.repeat_factor_threshold if is_distill else dcfg.repeat_factor_threshold
    if repeat_threshold > 0:
        sampler = RepeatFactorSampler(
            repeat_factors(labelled, repeat_threshold),
            seed=cfg.seed,
            rank=rank,
            world_size=world,
        )
    else:
        sampler = InfiniteSampler(len(labelled_ds), seed=cfg.seed, rank=rank, world_size=world)
    labelled_iter = infinite_loader(
        labelled_ds,
        labelled_batch,
        partial(collate_labelled, size_divisibility=cfg.model.size_divisibility, pad_value=dcfg.pad_value),
        sampler,
        dcfg.num_workers,
        seed=cfg.seed,
        start_batch=start_step,
    )
    unlabelled_iter = None
    if is_distill:
        if not data.unlabelled:
            raise GdistillError("distillation needs unlabelled images (--unlabelled)")
        unlabelled_ds = UnlabelledDataset(
            data.unlabelled, UnlabelledAugment(dcfg.image_size, dcfg.scale_range, pad_value=dcfg.pad_value),
            seed=cfg.seed + 1,
        )
        consumed = sum(
            unsupervised_loss_active(s, cfg.distill.burn_in, cfg.distill.burnin_iters)
            for s in range(start_step)
        )
        unlabelled_iter = infinite_loader(
            unlabelled_ds,
            unlabelled_batch,
            partial(
                collate_unlabelled, size_divisibility=cfg.model.size_divisibility, pad_value=dcfg.pad_value
            ),
            InfiniteSampler(len(unlabelled_ds), seed=cfg.seed + 1, rank=rank, world_size=world),
            dcfg.num_workers,
            seed=cfg.seed + 1,
            start_batch=consumed,
        )
    val_loader = None
    if data.val is not None:
        val_set = EvalDataset(data.val, data.val_images_dir, dcfg.test_short_side, dcfg.test_max_side)
        if world > 1:  # each rank evaluates a shard; results are gathered
            val_set = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
        val_loader = torch.utils.data.DataLoader(
            val_set,
            batch_size=dcfg.eval_batch_size,
            shuffle=False,
            collate_fn=partial(
                collate_eval, size_divisibility=cfg.model.size_divisibility, pad_value=dcfg.pad_value
            ),
            generator=torch.Generator(),  # evaluation must not draw from the training RNG
            num_workers=worker_count(min(dcfg.num_workers, 2)),
            worker_init_fn=ignore_stop_signals,
        )
    return labelled_iter, unlabelled_iter, val_loader


def train(
    cfg: Config,
    out_dir: str | Path,
    data: TrainingData,
    teacher_checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    init_weights: str | Path | None = None,
) -> dict:
    """Train and return the final metrics. Stage B when ``teacher_checkpoint`` is given (or when
    resuming a stage-B run). ``init_weights``: start stage A from the model of a checkpoint (its
    architecture is used) instead of a fresh model. SIGINT or SIGTERM during the iterations saves
    ``last.pt`` at the end of the current one and raises :class:`TrainingStopped`."""
    if resume and not any((Path(out_dir) / name).exists() for name in ("last.pt", "last.prev.pt")):
        raise GdistillError(f"{out_dir}: nothing to resume (no last.pt)")  # before the lock makes it
    # One writer per run folder: under torchrun the first rank writes for all.
    lock = run_folder_lock(out_dir) if distributed.launched_rank() == 0 else contextlib.nullcontext()
    with lock, StopOnSignal() as stop:
        return _train(cfg, out_dir, data, teacher_checkpoint, resume, progress, init_weights, stop)


def _train(
    cfg: Config,
    out_dir: str | Path,
    data: TrainingData,
    teacher_checkpoint: str | Path | None,
    resume: bool,
    progress: bool,
    init_weights: str | Path | None,
    stop: StopOnSignal,
) -> dict:
    out_dir = Path(out_dir)
    resumed = latest_good_checkpoint(out_dir) if resume else None
    if resume and resumed is None:
        raise GdistillError(f"{out_dir}: nothing to resume (no last.pt)")
    out_dir.mkdir(parents=True, exist_ok=True)
    if resumed is not None:
        state, state_path = resumed
        cfg, saved_before_global_batch = _config_of_resumed_run(
            cfg, state, state_path, out_dir, data, teacher_checkpoint
        )
        stage = state["stage"]
    else:
        state = None
        stage = "distill" if teacher_checkpoint else "teacher"
        saved_before_global_batch = False
    is_distill = stage == "distill"
    labelled = _checked_inputs(cfg, data, is_distill)

    device = distributed.init_distributed(cfg.device) or resolve_device(cfg.device)
    rank, world = distributed.rank(), distributed.world_size()
    main_process = rank == 0
    progress = progress and main_process
    if state is not None:
        # One RNG state per rank; the data streams are sharded by rank as well.
        saved_by = len(state["rng"]) if isinstance(state["rng"], list) else 1
        if saved_by != world:
            raise GdistillError(
                f"{state_path}: saved by {saved_by} process{'es' if saved_by > 1 else ''}, "
                f"resumed with {world}; resume with as many (torchrun --nproc_per_node {saved_by})"
            )
    # The batch sizes are over all processes (detectron2's IMS_PER_BATCH): the presets' 16 + 16
    # stay the paper's on any number of GPUs.
    labelled_batch = per_process_batch(cfg.data.batch_size, world, "data.batch_size")
    unlabelled_batch = (
        per_process_batch(cfg.data.unlabelled_batch_size, world, "data.unlabelled_batch_size")
        if is_distill
        else 0
    )
    if state is None:
        for given in (teacher_checkpoint, init_weights):
            given_path = Path(given).resolve() if given is not None else None
            if given_path and given_path.parent == out_dir.resolve() and given_path.name in RUN_FILES:
                raise GdistillError(
                    f"{given}: lies in the run folder {out_dir}, which a new run clears; "
                    "copy it elsewhere or choose another --out"
                )
        if main_process:
            clear_run(out_dir)  # nothing of an earlier run outlives this one (a stale best.pt)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    # Every rank builds identical models from the same seed; the data and point sampling of each
    # rank then differ through the rank-offset seed and the samplers' shards.
    seed_everything(cfg.seed)
    class_names = data.labelled.class_names
    category_ids = [data.labelled.category_id(c) for c in range(data.labelled.num_classes)]
    num_classes = len(class_names)
    cfg.model.num_classes = num_classes

    # ---- models: student (trained) and, in stage B, a teacher (its own module, frozen)
    teacher = None
    if is_distill:
        if state is not None:
            teacher_cfg = config_from_dict(state["config"], "checkpoint")
            teacher = build_model(_no_download(teacher_cfg).model, num_classes)
        else:
            teacher, teacher_cfg = teacher_from_checkpoint(Path(teacher_checkpoint), class_names)
            # The student is built as the teacher was at the start of stage A (same architecture,
            # same backbone initialisation), unless other backbone weights are given.
            student_model_cfg = _architecture_from(teacher_cfg.model, cfg.model)
            if cfg.model.backbone_weights:
                student_model_cfg.backbone_weights = cfg.model.backbone_weights
            cfg.model = student_model_cfg
        freeze(teacher).to(device)
    init_payload = None
    if init_weights is not None and state is None:
        init_payload = load_checkpoint(init_weights)
        check_class_names(class_names, init_payload["class_names"], str(init_weights))
        cfg.model = _architecture_from(
            config_from_dict(init_payload["config"], str(init_weights)).model, cfg.model
        )
    from_checkpoint = state is not None or init_payload is not None
    student_cfg = _no_download(copy.deepcopy(cfg)) if from_checkpoint else cfg
    student = build_model(student_cfg.model, num_classes)
    if (
        main_process
        and not from_checkpoint
        and student_cfg.model.frozen_bn
        and not student_cfg.model.pretrained
        and not student_cfg.model.backbone_weights
        and any(isinstance(m, FrozenBatchNorm2d) for m in student.backbone.modules())
    ):
        warnings.warn(
            "model.frozen_bn=true with a randomly initialised backbone (no pretrained weights): "
            "its BatchNorm layers stay at identity; set model.frozen_bn=false to train from scratch",
            stacklevel=2,
        )
    if init_payload is not None:
        student.load_state_dict(init_payload["model"])
    if is_distill and state is None and cfg.distill.student_init == "teacher":
        student.load_state_dict(teacher.state_dict())
    student.to(device).train()
    # Stage A may keep a moving average of the model beside it: never trained, evaluated and
    # checkpointed on its own (the supervised counterpart of stage B's EMA teacher).
    ema_model = freeze(copy.deepcopy(student)) if cfg.solver.ema_decay > 0 else None
    criterion = build_criterion(cfg, num_classes).to(device)
    optimizer = build_optimizer(
        student,
        cfg.solver.lr,
        cfg.solver.weight_decay,
        cfg.solver.backbone_lr_mult,
        extra_no_decay=LEGACY_NO_DECAY if saved_before_global_batch else (),
    )
    # The student is DDP-wrapped; the teacher never is (it only changes through the EMA, which
    # every rank applies to its own copy from identical student weights).
    model = student
    if world > 1:
        model = distributed.wrap_ddp(student, device)
    scheduler = build_scheduler(optimizer, cfg.solver)
    use_scaler = device.type == "cuda" and cfg.solver.amp == "fp16"
    if hasattr(torch.amp, "GradScaler"):
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    else:  # torch < 2.3
        scaler = torch.cuda.amp.GradScaler(enabled=use_scaler)

    start_step, best_ap, last_eval = 0, -1.0, {}
    if state is not None:
        student.load_state_dict(state["model"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        if ema_model is not None and state.get("ema") is not None:
            ema_model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step = state["step"]
        best_ap = state["best_ap"]
        last_eval = state.get("last_eval", {})
        rng = state["rng"]
        set_rng_state(rng[rank] if isinstance(rng, list) else rng)
        if start_step >= cfg.solver.max_iters and main_process:
            print(
                f"{state_path}: the run has finished (iteration {start_step} of "
                f"{cfg.solver.max_iters}); nothing left to train",
                file=sys.stderr,
            )
    else:
        seed_everything(cfg.seed + rank)
    if state is None and main_process:
        write_run_info(
            out_dir,
            cfg,
            {
                "stage": stage,
                "teacher_checkpoint": _resolved(teacher_checkpoint),
                "init_weights": _resolved(init_weights),
                "labelled": str(Path(data.labelled.path).resolve()),
                "images": str(Path(data.images_dir).resolve()),
                "labelled_images": len(data.labelled.images),
                "labelled_digest": images_digest(data.labelled),
                "labelled_images_trained": len(labelled.images),
                "unlabelled_images": len(data.unlabelled or []),
                "unlabelled": _resolved(data.unlabelled_source),
                "unlabelled_root": _resolved(data.unlabelled_root),
                "val": str(Path(data.val.path).resolve()) if data.val else None,
                "val_images": str(Path(data.val_images_dir).resolve()) if data.val else None,
                "classes": class_names,
                "world_size": world,
            },
        )

    # ---- data: infinite seeded streams, positioned where an interrupted run left off
    labelled_iter, unlabelled_iter, val_loader = _data_streams(
        cfg, data, labelled, is_distill, labelled_batch, unlabelled_batch, start_step
    )

    tensorboard = None
    if main_process:
        tensorboard = tensorboard_writer(out_dir)
        step_log = MetricsLog(out_dir / "metrics.csv", start_step if state is not None else None)
        eval_log = MetricsLog(out_dir / "eval.csv", start_step if state is not None else None)

    diagnostic_thresholds = tuple(sorted({*cfg.distill.diagnostic_thresholds, cfg.distill.score_threshold}))
    # The teacher's metrics while it does not change (frozen through burn-in): evaluated once,
    # reused by later evaluations, dropped when the hand-over or an EMA update changes it.
    teacher_metrics: dict = {}

    def evaluate_frozen(net: torch.nn.Module, prefix: str, thresholds: tuple[float, ...]) -> dict:
        """Metrics of the teacher or the EMA model (fp32), keys prefixed with ``prefix``."""
        metrics, _ = evaluate_model(
            net,
            val_loader,
            data.val,
            device,
            cfg.model.detections_per_image,
            "none",
            pseudo_label_thresholds=thresholds,
            min_mask_area=cfg.distill.min_mask_area,
            mask_threshold=cfg.distill.mask_threshold,
            duplicate_iou=cfg.distill.duplicate_iou,
            desc=f"eval {prefix}",
            progress=progress,
        )
        return {f"{prefix}_{k}": v for k, v in metrics.items() if not isinstance(v, dict)}

    def evaluate(step: int) -> dict:
        if val_loader is None:
            return {}
        row: dict = {"step": step}
        # In stage A the model is the future teacher: its pseudo-label quality is worth knowing.
        metrics, _ = evaluate_model(
            student,
            val_loader,
            data.val,
            device,
            cfg.model.detections_per_image,
            cfg.solver.amp,
            pseudo_label_thresholds=() if teacher is not None else diagnostic_thresholds,
            min_mask_area=cfg.distill.min_mask_area,
            mask_threshold=cfg.distill.mask_threshold,
            duplicate_iou=cfg.distill.duplicate_iou,
            desc="eval student",
            progress=progress,
        )
        row.update({f"student_{k}": v for k, v in metrics.items() if not isinstance(v, dict)})
        if teacher is not None and not teacher_metrics:
            teacher_metrics.update(evaluate_frozen(teacher, "teacher", diagnostic_thresholds))
        row.update(teacher_metrics)
        if ema_model is not None and step > cfg.solver.ema_start:  # the average has begun
            row.update(evaluate_frozen(ema_model, "ema", ()))
        if main_process:
            validation_picture(
                student,
                data.val,
                data.val_images_dir,
                out_dir / "pictures" / f"val_{step:07d}.png",
                device,
                cfg.data.test_short_side,
                cfg.data.test_max_side,
            )
            # Last: an evaluation that fails before this line is redone on resume, not logged twice.
            eval_log.write(row)
            _add_scalars(tensorboard, row, "eval")
        return row

    def checkpoint_payload(step: int, with_optimizer: bool) -> dict:
        payload = {
            "stage": stage,
            "config": config_to_dict(cfg),
            "class_names": class_names,
            "category_ids": category_ids,
            "model": student.state_dict(),
            "teacher": teacher.state_dict() if teacher is not None else None,
            # Before solver.ema_start the average has not begun (it is overwritten by a copy of
            # the model there): nothing to save, and `--model ema` says so.
            "ema": ema_model.state_dict()
            if ema_model is not None and step > cfg.solver.ema_start
            else None,
            "step": step,
            "best_ap": best_ap,
            "last_eval": last_eval,
            # the loop's counters and open log window, so that a resumed run's metrics.csv rows
            # average the same iterations as an uninterrupted run's
            "loop_state": {"sums": dict(window), "steps": window_steps,
                           "seconds": time.perf_counter() - t_window,
                           "skipped_steps": skipped_steps, "nonfinite_in_a_row": nonfinite_in_a_row},
        }
        if with_optimizer:
            rng_states = distributed.all_gather_objects(rng_state())
            payload.update(
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if use_scaler else None,
                rng=rng_states if world > 1 else rng_states[0],
            )
        return payload

    def save_then_raise(err: Exception, step: int, what: str) -> None:
        """Save the ``step`` iterations done, then re-raise ``err`` saying so. One process
        only: elsewhere other ranks would wait in the checkpoint's collective."""
        if world > 1:
            raise err
        rotate_and_save(checkpoint_payload(step, with_optimizer=True), out_dir)
        where = (f"{what}; {out_dir / 'last.pt'} saved at iteration {step}, the same command with "
                 "--resume continues from it")
        if isinstance(err, GdistillError):
            raise GdistillError(f"{one_line(err)} ({where})") from err
        print(f"gdistill: {where}", file=sys.stderr)
        raise err

    # ---- the loop
    dist = cfg.distill
    max_iters = cfg.solver.max_iters
    if main_process and start_step < max_iters:  # after every input check: errors come first
        _warn_schedule_past_the_end(cfg, is_distill)
    if main_process and is_distill and state is None and cfg.data.repeat_factor_threshold > 0:
        warnings.warn(
            f"data.repeat_factor_threshold={cfg.data.repeat_factor_threshold} is stage A's: stage B "
            "draws its labelled images by distill.repeat_factor_threshold="
            f"{cfg.distill.repeat_factor_threshold}",
            stacklevel=2,
        )
    bar = progress_bar(
        total=max_iters,
        initial=start_step,
        disable=not progress,
        desc="distill" if is_distill else "train",
    )

    def eval_due(done: int) -> bool:
        return (cfg.eval_period > 0 and done % cfg.eval_period == 0) or done == max_iters

    def evaluate_and_keep_best(done: int) -> None:
        nonlocal last_eval, best_ap
        try:
            last_eval = evaluate(done)
        except NonFiniteOutputsError as err:  # diverged weights: nothing to resume from
            raise GdistillError(f"{err} (evaluation at iteration {done})") from err
        except Exception as err:
            # Bad validation data shows up here, eval_period iterations in: keep them.
            save_then_raise(err, done, f"evaluation at iteration {done} failed")
        if progress and val_loader is not None:
            # Before the line is written: the bar drawn under it shows this evaluation.
            bar.set_postfix(progress_postfix(postfix, last_eval, dist.score_threshold), refresh=False)
            who = "teacher" if teacher is not None else "student"
            bar.write(evaluation_line(done, max_iters, last_eval, who, dist.score_threshold),
                      file=sys.stderr)
        ap = last_eval.get("student_AP")
        ap = -1.0 if ap is None else ap
        if val_loader is not None and ap > best_ap:
            best_ap = ap
            if main_process:
                save_checkpoint(checkpoint_payload(done, with_optimizer=False), out_dir / "best.pt")

    loop_state = (state or {}).get("loop_state") or {}  # {} for a fresh run or an older build's
    window: dict[str, float] = dict(loop_state.get("sums", {}))
    window_steps = loop_state.get("steps", 0)
    nonfinite_in_a_row = loop_state.get("nonfinite_in_a_row", 0)
    skipped_steps = loop_state.get("skipped_steps", 0)
    t_window = time.perf_counter() - loop_state.get("seconds", 0.0)
    postfix: dict[str, str] = {}  # the progress bar's latest training numbers
    stop.armed = True  # a signal from here on stops after an iteration, with a checkpoint
    if 0 < start_step <= max_iters and eval_due(start_step) and val_loader is not None and (
        last_eval.get("step") != start_step
    ):
        # A run stopped by a signal at an evaluation step saved before evaluating (a scheduler's
        # grace period may be shorter than an evaluation), or its evaluation failed: it comes
        # first now.
        evaluate_and_keep_best(start_step)
        if start_step == max_iters:  # nothing more to train: the finished run's state says so
            payload = checkpoint_payload(start_step, with_optimizer=True)
            if main_process:
                rotate_and_save(payload, out_dir)
    for step in range(start_step, max_iters):
        with_unlabelled = unlabelled_iter is not None and unsupervised_loss_active(
            step, dist.burn_in, dist.burnin_iters
        )
        try:
            batch = next(labelled_iter)
            ubatch = next(unlabelled_iter) if with_unlabelled else None
        except GdistillError as err:
            # A labelled image that only fails when decoded can be drawn hours in: keep the
            # iterations done (nothing of this step has run yet).
            if step == start_step:
                raise
            save_then_raise(err, step, f"drawing the batch of iteration {step + 1} failed")
        if teacher is not None:
            decay = teacher_decay_for_step(step, dist.burn_in, dist.burnin_iters, dist.ema_decay)
            if decay is not None:
                ema_update(teacher, student, decay)
                teacher_metrics.clear()
        if ema_model is not None:
            decay = ema_decay_for_step(step, cfg.solver.ema_start, cfg.solver.ema_decay)
            if decay is not None:
                ema_update(ema_model, student, decay)

        images = images_to_model_input(batch["images"].to(device, non_blocking=True))
        targets = _to_device_targets(batch["targets"], device)
        step_stats: dict[str, float] = {}
        unsup_targets = None
        if ubatch is not None:
            with torch.no_grad():  # the teacher: eval mode, fp32, weak view
                weak = images_to_model_input(ubatch["weak"].to(device, non_blocking=True))
                t_out = teacher(weak)
                check_finite_outputs(t_out["pred_logits"], t_out["pred_masks"], "the teacher")
                unsup_targets, step_stats = pseudo_labels_from_teacher(
                    t_out["pred_logits"],
                    t_out["pred_masks"],
                    dist.score_threshold,
                    dist.min_mask_area,
                    dist.mask_threshold,
                    ubatch["valid"].to(device),
                    dist.duplicate_iou,
                )
            for t in unsup_targets:
                t.pop("scores")
            strong = images_to_model_input(ubatch["strong"].to(device, non_blocking=True))

        # The forward pass moves BatchNorm statistics; a skipped step must not keep that change.
        norm_stats = {
            k: b.clone() for k, b in student.named_buffers() if "running" in k or "num_batches" in k
        }
        with autocast_for(device, cfg.solver.amp):
            if unsup_targets is not None:
                # One student forward over [labelled; strong], split afterwards: both are
                # data.image_size crops padded alike, and DDP wants one forward per backward.
                outputs = model(torch.cat([images, strong]))
                sup_out, unsup_out = _split_outputs(outputs, images.shape[0])
            else:
                sup_out, unsup_out = model(images), None
            sup_losses = criterion(sup_out, targets)
            loss_sup = _sum_losses(sup_losses)
            loss = loss_sup
            loss_unsup = torch.zeros((), device=device)
            if unsup_out is not None:
                loss_unsup = dist.unsup_weight * _sum_losses(criterion(unsup_out, unsup_targets))
                loss = loss + loss_unsup

        # Every rank must skip a step together, or DDP would wait forever, and stop together on
        # a signal that reached some of them: one all-reduce of (finite, -signal number) with MIN.
        flags = torch.stack([torch.isfinite(loss.detach()).float(),
                             torch.tensor(-float(stop.signum or 0), device=device)])
        if world > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        finite, stop_flag = flags.tolist()
        stop_after_step = stop_flag < 0
        skipped = not finite
        if skipped:
            # A non-finite loss never reaches the weights or a checkpoint.
            optimizer.zero_grad(set_to_none=True)
            buffers = dict(student.named_buffers())
            for k, saved in norm_stats.items():
                buffers[k].copy_(saved)
            nonfinite_in_a_row += 1
            skipped_steps += 1
            if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise GdistillError(
                    f"training stopped at step {step}: loss was not finite {nonfinite_in_a_row} "
                    "steps in a row (lower solver.lr, check the data, or use solver.amp=bf16)"
                )
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": meant
                warnings.simplefilter("ignore")
                scheduler.step()
        else:
            nonfinite_in_a_row = 0
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.solver.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.solver.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            # ---- logging (averages over the log window)
            values = {"loss": loss.item(), "loss_sup": loss_sup.item(), "loss_unsup": loss_unsup.item()}
            for key in ("loss_ce", "loss_mask", "loss_dice"):
                values[key] = sup_losses[key].item()
            if teacher is not None:
                values.update(
                    {
                        k: step_stats.get(k, 0.0)
                        for k in (
                            "pl_kept",
                            "pl_candidates",
                            "pl_mean_score",
                            "pl_images_without",
                            "pl_per_image",
                        )
                    }
                )
            for k, v in values.items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
        if world > 1:
            # Every rank trains, evaluates, averages into the teacher and saves the same model.
            distributed.broadcast_buffers(student)
        done = step + 1
        if window_steps and (done % cfg.log_period == 0 or done == max_iters):
            elapsed = time.perf_counter() - t_window
            row = {"step": done, "lr": optimizer.param_groups[-1]["lr"]}
            if teacher is not None:
                row["phase"] = phase_name(step, dist.burn_in, dist.burnin_iters)
            row.update({k: v / window_steps for k, v in window.items()})
            row["sec_per_iter"] = elapsed / window_steps
            row["skipped_steps"] = skipped_steps
            if teacher is not None and unsup_targets is not None:
                row["pl_per_class"] = "|".join(str(c) for c in class_histogram(unsup_targets, num_classes))
            if main_process:
                step_log.write(row)
                _add_scalars(tensorboard, row, "train")
            postfix["loss"] = f"{row['loss']:.3g}"
            if teacher is not None:
                postfix["unsup"] = f"{row['loss_unsup']:.3g}"
                postfix["pl/img"] = f"{row['pl_per_image']:.1f}"
            bar.set_postfix(progress_postfix(postfix, last_eval, dist.score_threshold), refresh=False)
            window, window_steps, t_window = {}, 0, time.perf_counter()
        if (
            main_process
            and unsup_targets is not None
            and cfg.picture_period > 0
            and done % cfg.picture_period == 0
        ):
            save_pseudo_label_grid(
                out_dir / "pictures" / f"pseudo_{done:07d}.png",
                ubatch["weak"],
                ubatch["strong"],
                [{k: v.cpu() for k, v in t.items()} for t in unsup_targets],
                class_names,
            )
        bar.update(1)

        # ---- evaluation, checkpoints
        if eval_due(done) and not (stop_after_step and done < max_iters):
            evaluate_and_keep_best(done)
        periodic = (cfg.checkpoint_period > 0 and done % cfg.checkpoint_period == 0) or done == max_iters
        if periodic or stop_after_step:
            payload = checkpoint_payload(done, with_optimizer=True)  # collective: every rank
            if main_process:
                rotate_and_save(payload, out_dir)
        if stop_after_step and done < max_iters:
            bar.close()
            if main_process:
                plot_training_curves(out_dir)  # the curves so far
            distributed.barrier()
            signum = int(-stop_flag)  # the signal, also on a rank it did not reach
            raise TrainingStopped(
                f"{signal.Signals(signum).name}: stopped after iteration {done} of {max_iters}; "
                f"{out_dir / 'last.pt'} saved, the same command with --resume continues",
                signum,
            )
    bar.close()
    if main_process and skipped_steps:
        warnings.warn(
            f"{skipped_steps} of the {max_iters} steps of this run were skipped: their "
            "loss was not finite (skipped_steps in metrics.csv); lower solver.lr if that recurs",
            stacklevel=2,
        )
    if main_process:
        plot_training_curves(out_dir)
    if main_process and val_loader is None and not (out_dir / "best.pt").exists():
        save_checkpoint(checkpoint_payload(max_iters, with_optimizer=False), out_dir / "best.pt")
    result = {"best_AP": best_ap, **last_eval}
    if world > 1:
        # DDP and the buffer broadcast keep the replicas identical; check it (student, teacher and
        # moving average, parameters and buffers), and say so in the run folder.
        models = [m for m in (student, teacher, ema_model) if m is not None]
        prints = distributed.all_gather_objects(distributed.weights_fingerprint(*models))
        in_sync = all(p == prints[0] for p in prints)
        if main_process:
            (out_dir / "ranks.json").write_text(
                json.dumps({"world_size": world, "in_sync": in_sync, "fingerprints": prints}) + "\n"
            )
        if not in_sync:
            raise GdistillError(f"{out_dir}: the models of the {world} processes diverged")
        distributed.barrier()
    return result


def _split_outputs(outputs: dict, n: int) -> tuple[dict, dict]:
    def part(d: dict, sl: slice) -> dict:
        return {"pred_logits": d["pred_logits"][sl], "pred_masks": d["pred_masks"][sl]}

    first = part(outputs, slice(0, n))
    second = part(outputs, slice(n, None))
    first["aux_outputs"] = [part(a, slice(0, n)) for a in outputs["aux_outputs"]]
    second["aux_outputs"] = [part(a, slice(n, None)) for a in outputs["aux_outputs"]]
    return first, second


def _no_download(cfg: Config) -> Config:
    """A config whose model is built without fetching or reading backbone weights (they are
    about to be overwritten from a checkpoint)."""
    cfg.model.pretrained = False
    cfg.model.backbone_weights = ""
    return cfg
