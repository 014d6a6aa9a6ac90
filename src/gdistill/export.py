"""Export a trained model to ONNX or TorchScript.

The exported graph maps images to the model's raw outputs::

    images       float32 [B, 3, H, W], RGB in [0, 1]  (H, W fixed at export; B free)
    pred_logits  float32 [B, Q, K+1]                   class logits, index K = no object
    pred_masks   float32 [B, Q, H/4, W/4]              mask logits at stride 4

Normalisation (the model's ``model.pixel_mean`` / ``pixel_std``) is inside the graph. Beside
the graph, ``<file>.json`` holds what the rest needs: the input size, ``predict``'s resize
(``short_side``, ``max_side``) and number of detections, the class names and category ids.
Instance post-processing (top-k (query, class) pairs, mask upsampling, scores) stays in Python:
resize and pad an image with :func:`fit_to_input`, run the exported model, then call
:func:`outputs_to_instances`::

    info = json.loads(Path("model.onnx.json").read_text())
    x, size = fit_to_input(image, info["height"], info["width"], info["short_side"], info["max_side"],
                           info["pad_value"])
    logits, masks = session.run(None, {"images": x.numpy()})   # onnxruntime
    instances = outputs_to_instances(logits, masks, size, image.shape[:2],
                                     info["detections_per_image"])

The input size defaults to the model's evaluation size (:func:`default_input_size`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdistill.config import Config
from gdistill.data.augment import PAD_VALUE, eval_size, resize_to
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


def _fix_vit_input_size(backbone: nn.Module, height: int, width: int) -> None:
    """Built with ``dynamic_img_size``, a timm ViT resamples its position embedding (bicubic,
    antialiased: no ONNX operator) at every forward. At the fixed export size it is resampled
    once here, to the grid the backbone's input is resized to, and the ViT made static."""
    body = backbone.body
    if not hasattr(body, "set_input_size"):  # timm before 1.0
        return
    from timm.layers import Format

    ph, pw = backbone.patch_size
    body.set_input_size(img_size=(math.ceil(height / ph) * ph, math.ceil(width / pw) * pw))
    body.dynamic_img_size = False
    # The static path wants flattened tokens [B, N, D] from the patch embedding.
    embed = body.patch_embed
    embed.flatten, embed.output_fmt = True, Format.NCHW


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
    info: Path  # <path>.json: input size, predict's resize and top-k, class names and ids


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
    # Written beside, then renamed: a failed export leaves an earlier one at ``out`` as it was.
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing records shapes as constants (fine: the size is fixed at export) and warns so.
        warnings.simplefilter("ignore")
        try:
            if fmt == "onnx":
                if predictor.model.backbone.is_vit:
                    _fix_vit_input_size(predictor.model.backbone, height, width)
                try:
                    _export_onnx(module, example, partial, opset)
                except Exception as err:  # the exporter's errors run to hundreds of lines
                    first = (str(err).strip().splitlines() or [""])[0]
                    raise GdistillError(
                        f"{weights}: ONNX export of model.backbone={predictor.cfg.model.backbone} "
                        f"failed ({type(err).__name__}: {first}); --format torchscript may work "
                        "for it"
                    ) from err
            else:
                torch.jit.trace(module, (example,), check_trace=False).save(str(partial))
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    cfg = predictor.cfg
    info = {
        "format": fmt, "weights": str(Path(weights).resolve()), "model": model,
        "height": height, "width": width,
        "short_side": cfg.data.test_short_side, "max_side": cfg.data.test_max_side,
        "pad_value": cfg.data.pad_value,
        "detections_per_image": cfg.model.detections_per_image,
        "class_names": predictor.class_names, "category_ids": predictor.category_ids,
    }
    info_path = out.with_name(out.name + ".json")
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return ExportedModel(out, height, width, info_path)


def fit_to_input(
    image,
    height: int,
    width: int,
    short_side: int | None = None,
    max_side: int | None = None,
    pad_value: int = PAD_VALUE,
) -> tuple[Tensor, tuple[int, int]]:
    """Resize an image as ``predict`` does and pad it bottom / right to the export size with
    ``pad_value`` / 255 (the model's ``data.pad_value``, ``pad_value`` in the ``.json``; grey 128
    for models of this version).

    With ``short_side`` and ``max_side`` (the model's ``data.test_short_side`` and
    ``data.test_max_side``, in the ``.json`` that ``export_model`` writes beside the graph) the
    image gets ``predict``'s size (shortened further, aspect kept, if that exceeds the export
    size); without them it fills ``height`` × ``width``. Either way the pixels are resized as
    ``predict`` resizes them (bilinear, antialiased, in uint8).

    Args:
        image: what ``Predictor.predict`` takes for one image: a path, a PIL image, a uint8 array
            [H, W] or [H, W, 1|3|4], a uint8 tensor [H, W] or [1|3|4, H, W].
    Returns:
        (float32 [1, 3, height, width] in [0, 1], (h, w) of the image inside the padding).
    """
    from gdistill.inference import image_to_tensor

    image = image_to_tensor(image, "fit_to_input")
    h0, w0 = image.shape[-2:]
    if min(h0, w0) == 0:
        raise GdistillError(f"fit_to_input: the image is empty ({h0}x{w0} pixels)")
    if (short_side is None) != (max_side is None):
        raise GdistillError("fit_to_input: give both short_side and max_side, or neither")
    if short_side is not None:
        h, w = eval_size(h0, w0, short_side, max_side)
    else:
        h, w = h0 * min(height / h0, width / w0), w0 * min(height / h0, width / w0)
    if h > height or w > width:
        scale = min(height / h, width / w)
        h, w = h * scale, w * scale
    h, w = max(1, min(height, int(h + 0.5))), max(1, min(width, int(w + 0.5)))
    x = resize_to(image, (h, w))[None].float() / 255.0
    return F.pad(x, (0, width - w, 0, height - h), value=pad_value / 255.0), (h, w)


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
    returned by :func:`fit_to_input`; ``top_k`` (query, class) pairs are kept, ``predict`` keeps
    the model's ``detections_per_image`` (in the ``.json`` beside the graph)."""
    logits, masks = (
        x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
        for x in (pred_logits, pred_masks)
    )
    if logits.ndim != 3 or masks.ndim != 4 or logits.shape[0] != 1 or masks.shape[0] != 1:
        raise GdistillError(
            "outputs_to_instances: expected the outputs of one image, pred_logits [1, Q, K+1] and "
            f"pred_masks [1, Q, H/4, W/4], got {tuple(logits.shape)} and {tuple(masks.shape)}; "
            "call it once per image (pred_logits[i:i+1], pred_masks[i:i+1])"
        )
    return sorted_by_score(
        instances_from_outputs(logits, masks, [tuple(image_size)], [tuple(orig_size)], top_k)[0]
    )
