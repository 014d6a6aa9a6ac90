"""Export a trained model to ONNX or TorchScript.

The exported graph maps images to the model's raw outputs::

    images       float32 [B, 3, H, W], RGB in [0, 1]  (H, W fixed at export; B free)
    pred_logits  float32 [B, Q, K+1]                   class logits, index K = no object
    pred_masks   float32 [B, Q, H/4, W/4]              mask logits at stride 4

Normalisation (ImageNet mean / std) is inside the graph. Instance post-processing (top-k
(query, class) pairs, mask upsampling, scores) stays in Python: resize and pad an image with
:func:`fit_to_input`, run the exported model, then call :func:`outputs_to_instances`::

    x, size = fit_to_input(image, 160, 160)                    # image: uint8 [H, W, 3]
    logits, masks = session.run(None, {"images": x.numpy()})   # onnxruntime
    instances = outputs_to_instances(logits, masks, size, image.shape[:2])

The input size defaults to the model's evaluation size (:func:`default_input_size`).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdistill.config import Config
from gdistill.errors import GdistillError
from gdistill.model.mask2former import Instances, instances_from_outputs, sorted_by_score

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17  # GridSample (deformable attention) needs opset >= 16


class RawOutputs(nn.Module):
    """Mask2Former without the auxiliary outputs: images [B, 3, H, W] in [0, 1] →
    (pred_logits [B, Q, K+1], pred_masks [B, Q, H/4, W/4])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(images)
        return out["pred_logits"], out["pred_masks"]


def _and_symbolic(g, a, b):
    return g.op("And", a, b)


def _export_onnx(module: nn.Module, example: Tensor, out: Path, opset: int) -> None:
    # The TorchScript-based exporter: the torch.export-based default needs the optional
    # onnxscript package. It has no rule for in-place `&=` (the decoder's attention mask).
    torch.onnx.register_custom_op_symbolic("aten::__iand_", _and_symbolic, opset)
    torch.onnx.export(
        module,
        (example,),
        str(out),
        input_names=["images"],
        output_names=["pred_logits", "pred_masks"],
        dynamic_axes={name: {0: "batch"} for name in ("images", "pred_logits", "pred_masks")},
        opset_version=opset,
        dynamo=False,
    )


def _max_onnx_opset() -> int:
    """The newest opset torch's TorchScript-based ONNX exporter writes."""
    try:
        from torch.onnx import _constants
    except ImportError:  # a torch that moved its private constants: let the exporter decide
        return 10**6
    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))


class ExportedModel(NamedTuple):
    path: Path
    height: int
    width: int


def default_input_size(cfg: Config) -> tuple[int, int]:
    """(height, width) at which a landscape image meets the model at its evaluation scale: the
    shortest side ``data.test_short_side``, the longest up to ``data.test_max_side``, each rounded
    up to a multiple of 32 (COCO presets 800 x 1344, the demo 160 x 160). A portrait image fits
    into it at a smaller scale: give ``height`` and ``width`` for portrait inputs."""

    def up32(n: int) -> int:
        return -(-n // 32) * 32

    long_side = cfg.data.test_max_side
    return up32(min(cfg.data.test_short_side, long_side)), up32(long_side)


def export_model(
    weights: str | Path,
    out: str | Path,
    fmt: str = "onnx",
    model: str = "student",
    height: int | None = None,
    width: int | None = None,
    opset: int = ONNX_OPSET,
) -> ExportedModel:
    """Export the student (or teacher) of a checkpoint for inputs of ``height`` × ``width``
    (multiples of 32; by default :func:`default_input_size` of its config) to ``out``; see the
    module docstring for inputs and outputs."""
    from gdistill.inference import load_model

    if fmt not in FORMATS:
        raise GdistillError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for name, side in (("height", height), ("width", width)):
        if side is not None and (side <= 0 or side % 32):
            raise GdistillError(f"export size must be positive multiples of 32, got {name} {side}")
    if fmt == "onnx" and not 16 <= opset <= _max_onnx_opset():
        raise GdistillError(
            f"ONNX opset must be from 16 (GridSample) to {_max_onnx_opset()} (this torch's exporter), "
            f"got {opset}"
        )
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise GdistillError("ONNX export needs the onnx package (pip install onnx)")
    predictor = load_model(weights, model, device="cpu")
    default_height, default_width = default_input_size(predictor.cfg)
    height, width = height or default_height, width or default_width
    # An inference graph: outputs that require grad would make every call build autograd state.
    module = RawOutputs(predictor.model).eval().requires_grad_(False)
    example = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing records shapes as constants (fine: the size is fixed at export) and warns so.
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            _export_onnx(module, example, out, opset)
        else:
            torch.jit.trace(module, (example,), check_trace=False).save(str(out))
    return ExportedModel(out, height, width)


def fit_to_input(image, height: int, width: int) -> tuple[Tensor, tuple[int, int]]:
    """Resize an image to fit inside ``height`` × ``width`` (aspect kept) and pad it bottom /
    right with zeros.

    Args:
        image: uint8 [H, W, 3] array or uint8 [3, H, W] tensor.
    Returns:
        (float32 [1, 3, height, width] in [0, 1], (h, w) of the image inside the padding).
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [H, W, 3] or [3, H, W], got {tuple(image.shape)}")
    h0, w0 = image.shape[-2:]
    scale = min(height / h0, width / w0)
    h, w = max(1, min(height, round(h0 * scale))), max(1, min(width, round(w0 * scale)))
    x = image[None].float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=scale < 1)
    x = x.round().clamp(0, 255) / 255.0
    return F.pad(x, (0, width - w, 0, height - h)), (h, w)


def outputs_to_instances(
    pred_logits,
    pred_masks,
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    top_k: int = 100,
) -> Instances:
    """Raw outputs of one image ([1, Q, K+1], [1, Q, H/4, W/4], arrays or tensors) → instances
    at ``orig_size`` (scores [N], labels [N], masks bool [N, H, W]), sorted by score as
    :meth:`gdistill.inference.Predictor.predict` returns them; ``image_size`` is the (h, w)
    returned by :func:`fit_to_input`."""
    logits, masks = (
        x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
        for x in (pred_logits, pred_masks)
    )
    return sorted_by_score(
        instances_from_outputs(logits, masks, [tuple(image_size)], [tuple(orig_size)], top_k)[0]
    )
