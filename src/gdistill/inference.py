"""Using a trained model from Python::

from gdistill import load_model
model = load_model("runs/student/best.pt")
instances = model.predict(["a.jpg", "b.png"])   # list of Instances(scores, labels, masks)
instances = model.predict("a.jpg")              # one image: a list of one
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gdistill.config import Config, config_from_dict
from gdistill.data.augment import resize_for_eval
from gdistill.data.coco import CocoDataset, as_displayed, read_image, to_uint8
from gdistill.data.loader import EvalDataset, collate_eval
from gdistill.engine.checkpoint import load_checkpoint
from gdistill.engine.evaluate import evaluate_model, predict_batches
from gdistill.engine.trainer import resolve_device
from gdistill.errors import GdistillError
from gdistill.model.mask2former import Instances, Mask2Former, build_model, sorted_by_score

# What Predictor.predict takes as one image (see its docstring for the array shapes).
ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
_SINGLE_IMAGE = (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)
_NOT_UINT8 = (
    "{where}: pixels must be uint8 (0-255), got {dtype}; "
    "scale float images to 0-255 and convert them to uint8 first"
)


class Predictor:
    """A trained Mask2Former with its class names and input pipeline."""

    def __init__(
        self,
        model: Mask2Former,
        cfg: Config,
        class_names: list[str],
        category_ids: list[int],
        device: torch.device,
        which: str,
    ) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.class_names = class_names
        self.category_ids = category_ids
        self.device = device
        self.which = which

    @torch.no_grad()
    def predict(
        self,
        images: ImageLike | Sequence[ImageLike] | Iterator[ImageLike],
        score_threshold: float = 0.0,
        batch_size: int = 4,
    ) -> list[Instances]:
        """Instances of each image at its own size, sorted by score, those below ``score_threshold``
        dropped.

        Args:
            images: one image or a sequence of images. An image is a file path (str or
                os.PathLike), a PIL image, a uint8 array [H, W] or [H, W, C], or a uint8 tensor
                [H, W] or [C, H, W], with C = 1 (gray), 3 (RGB) or 4 (RGBA, alpha dropped). Float
                images are refused: scale them to 0-255 and convert to uint8 first. A 4-D array
                or tensor is refused: pass a list of images.
        Returns:
            one result per image (a list, also for one image; empty for no images): scores [N],
            labels [N], masks bool [N, H, W].
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise GdistillError(f"predict: batch_size must be a positive integer, got {batch_size!r}")
        threshold_is_number = isinstance(score_threshold, numbers.Real) and not isinstance(
            score_threshold, bool
        )
        if not (threshold_is_number and 0.0 <= score_threshold <= 1.0):
            raise GdistillError(f"predict: score_threshold must lie in [0, 1], got {score_threshold!r}")
        samples = []
        for index, image in enumerate(_as_image_list(images)):
            tensor = image_to_tensor(image, f"predict: image {index}")
            orig = tuple(tensor.shape[-2:])
            if min(orig) == 0:
                raise GdistillError(f"predict: image {index} is empty ({orig[0]}x{orig[1]} pixels)")
            resized = resize_for_eval(tensor, self.cfg.data.test_short_side, self.cfg.data.test_max_side)
            samples.append({"image": resized, "orig_size": orig, "image_id": None, "key": ""})
        pad = self.cfg.model.size_divisibility
        loader = [
            collate_eval(samples[i : i + batch_size], pad, self.cfg.data.pad_value)
            for i in range(0, len(samples), batch_size)
        ]
        out: list[Instances] = []
        for _, _, instances in predict_batches(
            self.model,
            loader,
            self.device,
            self.cfg.model.detections_per_image,
            self.cfg.solver.amp,
            min_score=score_threshold,
        ):
            for inst in instances:
                kept = sorted_by_score(inst, score_threshold)
                out.append(Instances(kept.scores.cpu(), kept.labels.cpu(), kept.masks.cpu()))
        return out


def _as_image_list(images: ImageLike | Sequence[ImageLike] | Iterator[ImageLike]) -> list:
    """``predict``'s ``images`` as a list: one image becomes a list of one."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        raise GdistillError(
            f"predict: got a 4-D {type(images).__name__} {tuple(images.shape)}; "
            "pass one image or a list of images"
        )
    if isinstance(images, _SINGLE_IMAGE):
        return [images]
    if isinstance(images, (list, tuple, Iterator)):
        return list(images)
    raise GdistillError(f"predict: expected an image or a list of images, got {type(images).__name__}")


def image_to_tensor(image: ImageLike, where: str = "image") -> torch.Tensor:
    """One image (see ``Predictor.predict``) → uint8 [3, H, W]; errors start with ``where``."""
    if isinstance(image, (str, os.PathLike)):
        return torch.from_numpy(read_image(Path(image))).permute(2, 0, 1)
    if isinstance(image, Image.Image):
        # as read_image does for files: turned as displayed, 16-bit, P, ... converted
        return torch.from_numpy(np.array(to_uint8(as_displayed(image)))).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise GdistillError(_NOT_UINT8.format(where=where, dtype=image.dtype))
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise GdistillError(
                f"{where}: expected an array [H, W] or [H, W, 1|3|4], got {image.shape}"
            )
        return _rgb(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise GdistillError(_NOT_UINT8.format(where=where, dtype=image.dtype))
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise GdistillError(
                f"{where}: expected a tensor [H, W] or [1|3|4, H, W], got {tuple(image.shape)}"
            )
        return _rgb(image)
    raise GdistillError(f"{where}: unsupported image type {type(image).__name__}")


def _rgb(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] with C = 1, 3 or 4 → [3, H, W]: gray repeated, alpha dropped."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


# --model name -> (checkpoint key, what to say when the checkpoint lacks it)
_CHECKPOINT_MODELS = {
    "student": ("model", ""),
    "teacher": ("teacher", "has no teacher (only `gdistill distill` checkpoints have one)"),
    "ema": ("ema", "has no EMA model (`gdistill train` keeps one with solver.ema_decay > 0)"),
}


def load_model(weights: str | Path, model: str = "student", device: str = "auto") -> Predictor:
    """Load a checkpoint of ``gdistill train`` or ``gdistill distill``. ``model`` picks the student
    (the trained model), the teacher of a distillation checkpoint, or the moving average that
    ``gdistill train`` keeps with ``solver.ema_decay > 0``."""
    if model not in _CHECKPOINT_MODELS:
        raise GdistillError(f"--model must be one of {', '.join(_CHECKPOINT_MODELS)}, got {model!r}")
    payload = load_checkpoint(weights)
    key, missing = _CHECKPOINT_MODELS[model]
    state = payload.get(key)
    if state is None:
        if model == "ema" and payload.get("teacher") is not None:
            missing += "; in a distillation checkpoint the moving average is the teacher: --model teacher"
        solver = (payload.get("config") or {}).get("solver") or {}
        if model == "ema" and (solver.get("ema_decay") or 0) > 0:
            missing = (
                f"has no EMA model: its moving average starts after solver.ema_start="
                f"{solver.get('ema_start')} and this checkpoint is of step {payload.get('step')}"
            )
        raise GdistillError(f"{weights}: {missing}")
    cfg = config_from_dict(payload["config"], str(weights))
    cfg.model.pretrained = False
    cfg.model.backbone_weights = ""
    net = build_model(cfg.model, len(payload["class_names"]))
    net.load_state_dict(state)
    dev = resolve_device(device)
    return Predictor(net.to(dev), cfg, payload["class_names"], payload["category_ids"], dev, model)


def evaluate_checkpoint(
    weights: str | Path,
    dataset: CocoDataset,
    images_dir: Path,
    model: str = "student",
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Mask AP (12 numbers and per class) of a checkpoint on a COCO dataset."""
    predictor = load_model(weights, model, device)
    if predictor.class_names != dataset.class_names:
        raise GdistillError(
            f"{dataset.path}: classes {dataset.class_names} differ from the checkpoint's "
            f"{predictor.class_names}"
        )
    cfg = predictor.cfg
    loader = DataLoader(
        EvalDataset(dataset, images_dir, cfg.data.test_short_side, cfg.data.test_max_side),
        batch_size=cfg.data.eval_batch_size,
        collate_fn=partial(
            collate_eval, size_divisibility=cfg.model.size_divisibility, pad_value=cfg.data.pad_value
        ),
    )
    metrics, _ = evaluate_model(
        predictor.model,
        loader,
        dataset,
        predictor.device,
        cfg.model.detections_per_image,
        cfg.solver.amp,
        per_class=True,
        progress=progress,
    )
    metrics["model"] = model
    return metrics
