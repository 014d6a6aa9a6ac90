"""Using a trained model from Python::

from gdistill import load_model
model = load_model("runs/student/best.pt")
instances = model.predict(["a.jpg", "b.png"])   # list of Instances(scores, labels, masks)
"""

from __future__ import annotations

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
from gdistill.model.mask2former import Instances, Mask2Former, build_model


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

    def _to_tensor(self, image) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            array = read_image(Path(image))
        elif isinstance(image, Image.Image):
            # as read_image does for files: turned as displayed, 16-bit, P, ... converted
            array = np.array(to_uint8(as_displayed(image)))
        elif isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.repeat(image[:, :, None], 3, axis=2)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise GdistillError(
                    f"predict: expected a uint8 array [H, W, 3], got {image.dtype} {image.shape}"
                )
            array = image
        elif isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                raise GdistillError(
                    f"predict: expected a uint8 tensor [3, H, W], got {image.dtype} {tuple(image.shape)}"
                )
            return image
        else:
            raise GdistillError(f"predict: unsupported image type {type(image).__name__}")
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)

    @torch.no_grad()
    def predict(self, images: list, score_threshold: float = 0.0, batch_size: int = 4) -> list[Instances]:
        """Images (paths, PIL images, uint8 arrays [H, W, 3] or tensors [3, H, W]) → instances at
        each image's own size, sorted by score, those below ``score_threshold`` dropped."""
        samples = []
        for index, image in enumerate(images):
            tensor = self._to_tensor(image)
            orig = tuple(tensor.shape[-2:])
            if min(orig) == 0:
                raise GdistillError(f"predict: image {index} is empty ({orig[0]}x{orig[1]} pixels)")
            resized = resize_for_eval(tensor, self.cfg.data.test_short_side, self.cfg.data.test_max_side)
            samples.append({"image": resized, "orig_size": orig, "image_id": None, "key": ""})
        loader = [collate_eval(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
        out: list[Instances] = []
        for _, _, instances in predict_batches(
            self.model, loader, self.device, self.cfg.model.detections_per_image, self.cfg.solver.amp
        ):
            for inst in instances:
                keep = inst.scores >= score_threshold
                order = inst.scores[keep].argsort(descending=True)
                out.append(
                    Instances(
                        inst.scores[keep][order].cpu(),
                        inst.labels[keep][order].cpu(),
                        inst.masks[keep][order].cpu(),
                    )
                )
        return out


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
        collate_fn=collate_eval,
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
