"""Configuration: dataclasses whose defaults are the paper's values (COCO, ResNet-50).

YAML files and ``key=value`` command-line overrides only change fields; they never add any.
Keys are dotted paths into :class:`Config`, e.g. ``solver.max_iters=2000`` or
``model.backbone=swin_tiny_patch4_window7_224``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gdistill.errors import GdistillError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Input pipeline. Sizes are in pixels; the paper's COCO LSJ pipeline is the default."""

    image_size: int = 1024  # side of the square training crop (LSJ fixed-size crop)
    scale_range: tuple[float, float] = (0.1, 2.0)  # large-scale jitter of the crop side
    test_short_side: int = 800  # evaluation resize: shortest edge ...
    test_max_side: int = 1333  # ... with the longest edge capped
    batch_size: int = 16  # labelled images per step, over all processes (split among them)
    unlabelled_batch_size: int = 16  # unlabelled images per step, all processes, stage B only
    num_workers: int = 4  # per loader, at most one per usable CPU (batches do not depend on it)
    # > 0: LVIS repeat-factor sampling of the labelled images in stage A (the authors: uniform);
    # stage B has its own, distill.repeat_factor_threshold
    repeat_factor_threshold: float = 0.0
    eval_batch_size: int = 4
    pad_value: int = 128  # pixel value (0-255) around padded images; the authors' crop: grey 128


@dataclass
class ModelConfig:
    """Mask2Former (paper: R50 config of Mask2Former / GuidedDistillation)."""

    # any timm model name; tv_in1k: torchvision's ImageNet weights, which the paper's R50 starts
    # from (timm's plain "resnet50" is another recipe's, a1_in1k)
    backbone: str = "resnet50.tv_in1k"
    pretrained: bool = True  # timm weights (downloads); ignored when backbone_weights is set
    backbone_weights: str = ""  # local weights file for the backbone (state dict)
    frozen_stages: int = 0  # 0: train all; n: freeze stem and the first n - 1 stages
    frozen_bn: bool = True  # backbone BatchNorm: fixed statistics and affine (COCO R50: FrozenBN)
    # the backbone's stochastic depth; -1: the timm model's own (Swin 0.1, most CNNs none);
    # Mask2Former trains Swin with 0.3
    drop_path_rate: float = -1.0
    num_classes: int = 0  # K thing classes; filled in from the labelled data
    hidden_dim: int = 256
    num_queries: int = 100
    dec_layers: int = 9  # masked-attention layers; predictions = dec_layers + 1
    nheads: int = 8
    dim_feedforward: int = 2048
    enc_layers: int = 6  # deformable-attention encoder layers of the pixel decoder
    enc_points: int = 4
    enc_dim_feedforward: int = 1024
    mask_dim: int = 256
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # images enter the model in [0, 1]
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    size_divisibility: int = 32  # batches are padded to a multiple (the model itself does not pad)
    detections_per_image: int = 100


@dataclass
class LossConfig:
    """Set criterion and Hungarian matcher weights (Mask2Former R50 configs)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544  # 112 * 112
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass
class SolverConfig:
    """AdamW with a multi-step (COCO) or poly (Cityscapes) schedule, iteration based."""

    max_iters: int = 368750
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    clip_grad_norm: float = 0.01  # full-model L2 norm; 0 disables
    lr_schedule: str = "step"  # step | poly
    lr_steps: tuple[int, ...] = (327778, 355092)
    lr_gamma: float = 0.1
    poly_power: float = 0.9
    warmup_iters: int = 10
    warmup_factor: float = 1.0
    amp: str = "fp16"  # fp16 | bf16 | none; CUDA only, CPU always runs fp32
    # > 0: `gdistill train` also keeps an exponential moving average of the model (a copy at
    # step ema_start, then this decay per step), evaluated and saved beside it (--model ema).
    # Stage B has its own: its teacher (distill.ema_decay).
    ema_decay: float = 0.0
    ema_start: int = 0


@dataclass
class DistillConfig:
    """Stage B (guided distillation). Defaults are GuidedDistillation's."""

    burn_in: str = "guided"  # guided | standard | none
    burnin_iters: int = 50000
    ema_decay: float = 0.9996
    unsup_weight: float = 2.0
    score_threshold: float = 0.7  # max softmax over K+1 classes must exceed this
    min_mask_area: float = 5.0  # soft area (sum of sigmoid) at mask resolution must exceed this
    mask_threshold: float = 0.5  # pseudo-mask = sigmoid(logit) > mask_threshold
    duplicate_iou: float = 0.0  # > 0: drop pseudo-labels overlapping a better one (GD: off)
    student_init: str = "pretrained"  # pretrained (fresh heads) | teacher
    diagnostic_thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    # Stage B's labelled sampler: LVIS repeat factors with this threshold (the authors: 10,
    # class-frequency-balanced oversampling); 0 = uniform
    repeat_factor_threshold: float = 10.0


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_period: int = 5000
    checkpoint_period: int = 5000
    log_period: int = 20
    picture_period: int = 0  # > 0: a pseudo-label picture every N stage-B steps
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


# ----------------------------------------------------------------------------- conversion


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) suitable for YAML or a checkpoint."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        ftype = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys.extend(_all_keys(ftype, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key_error(key: str, source: str) -> GdistillError:
    close = difflib.get_close_matches(key, _all_keys(Config), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return GdistillError(f"{source}: unknown config key '{key}'{hint}")


def _coerce(value: Any, ftype: Any, key: str, source: str) -> Any:
    """Convert a YAML / command-line value to the field's declared type."""
    origin = typing.get_origin(ftype)
    try:
        if ftype is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if ftype is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if ftype is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if ftype is str:
            if isinstance(value, (list, tuple, dict)):
                raise ValueError(value)
            return "" if value is None else str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            args = typing.get_args(ftype)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], key, source) for v in value)
            if len(args) != len(value):
                raise ValueError(f"expected {len(args)} values")
            return tuple(_coerce(v, a, key, source) for v, a in zip(value, args, strict=True))
        if origin in (typing.Union, types.UnionType):
            raise ValueError("union types are not supported")
    except (ValueError, TypeError) as exc:
        raise GdistillError(
            f"{source}: config key '{key}' expects {_type_name(ftype)}, got {value!r}"
        ) from exc
    return value


def _type_name(ftype: Any) -> str:
    return getattr(ftype, "__name__", None) or str(ftype).replace("typing.", "")


def _set_key(cfg: Any, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    target = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(target) or part not in _field_types(type(target)):
            raise _unknown_key_error(key, source)
        ftype = _field_types(type(target))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(ftype):
                if not isinstance(value, dict):
                    raise GdistillError(f"{source}: config key '{key}' is a section, not a value")
                for sub_key, sub_value in value.items():
                    _set_key(cfg, f"{key}.{sub_key}", sub_value, source)
            else:
                setattr(target, part, _coerce(value, ftype, key, source))
        else:
            target = getattr(target, part)


def config_differences(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """``(key, value in a, value in b)`` for every dotted key where the two configs differ."""
    out = []
    for key in _all_keys(Config):
        va, vb = _lookup(a, key), _lookup(b, key)
        if va != vb:
            out.append((key, va, vb))
    return out


def _lookup(cfg: Any, key: str) -> Any:
    """The value at a dotted key, e.g. ``_lookup(cfg, "solver.lr")``."""
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def apply_dict(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """Apply a nested dict of overrides in place; unknown keys are errors naming `source`."""
    for key, value in values.items():
        _set_key(cfg, str(key), value, source)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings (values parsed as YAML scalars) in place."""
    for item in overrides:
        if "=" not in item:
            raise GdistillError(f"command line: override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _set_key(cfg, key, _parse_scalar(raw), "command line")
    return cfg


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides."""
    cfg = Config()
    if path:
        path = resolve_preset(path)
        values = read_config_file(path)
        if not isinstance(values, dict):
            raise GdistillError(f"{path}: expected a mapping of config keys at the top level")
        apply_dict(cfg, values, str(path))
    if overrides:
        apply_overrides(cfg, overrides)
    validate_config(cfg)
    return cfg


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    def __init__(self, key: Any, mark: yaml.Mark) -> None:
        super().__init__(problem=f"duplicate key {key!r}", problem_mark=mark)
        self.key = key


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (``safe_load`` keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKeyError(key, key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_config_file(path: Path) -> Any:
    """The parsed contents of a UTF-8 YAML config file; every problem is a one-line error naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GdistillError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise GdistillError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        if isinstance(exc, _DuplicateKeyError):
            raise GdistillError(f"{path}: duplicate key '{exc.key}'{where}") from exc
        raise GdistillError(f"{path}: malformed YAML{where}") from exc


PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_preset(path: str | Path) -> Path:
    """A YAML file path, or the name of a packaged preset (``demo``, ``coco_r50`` ...)."""
    path = Path(path)
    if path.is_file():
        return path
    packaged = PRESETS_DIR / f"{path.name}.yaml"
    if path.suffix == "" and packaged.is_file():
        return packaged
    found = "is a folder, not a config file" if path.is_dir() else "config file not found"
    raise GdistillError(f"{path}: {found} (packaged presets: {', '.join(preset_names())})")


def config_from_dict(values: dict[str, Any], source: str = "checkpoint") -> Config:
    cfg = apply_dict(Config(), values, source)
    if "pad_value" not in values.get("data", {}):  # saved by a build that padded with black
        cfg.data.pad_value = 0
    validate_config(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


_CHOICES = {
    "solver.lr_schedule": ("step", "poly"),
    "solver.amp": ("fp16", "bf16", "none"),
    "distill.burn_in": ("guided", "standard", "none"),
    "distill.student_init": ("pretrained", "teacher"),
}

DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def is_device_name(name: str) -> bool:
    """Whether ``name`` is one of :data:`DEVICE_FORMS` (N a CUDA device index)."""
    return _DEVICE_PATTERN.fullmatch(name) is not None


@dataclass(frozen=True)
class _Bound:
    text: str  # completes "must be ...", e.g. ">= 0"
    holds: Callable[[float], bool]


_AT_LEAST_0 = _Bound(">= 0", lambda v: v >= 0)
_AT_LEAST_1 = _Bound(">= 1", lambda v: v >= 1)
_ABOVE_0 = _Bound("> 0", lambda v: v > 0)
_IN_0_1 = _Bound("in [0, 1]", lambda v: 0 <= v <= 1)
_IN_0_1_OPEN_TOP = _Bound("in [0, 1)", lambda v: 0 <= v < 1)
_IN_0_1_OPEN = _Bound("in (0, 1)", lambda v: 0 < v < 1)

# Every element of a tuple value must hold the bound. NaN fails every bound.
_BOUNDS = {
    "data.image_size": _AT_LEAST_1,
    "data.scale_range": _ABOVE_0,
    "data.test_short_side": _AT_LEAST_1,
    "data.test_max_side": _AT_LEAST_1,  # below test_short_side is fine: the cap wins
    "data.batch_size": _AT_LEAST_1,
    "data.unlabelled_batch_size": _AT_LEAST_1,
    "data.num_workers": _AT_LEAST_0,
    "data.repeat_factor_threshold": _AT_LEAST_0,
    "distill.repeat_factor_threshold": _AT_LEAST_0,
    "data.eval_batch_size": _AT_LEAST_1,
    "data.pad_value": _Bound("in 0..255", lambda v: 0 <= v <= 255),
    "model.hidden_dim": _AT_LEAST_1,
    "model.num_queries": _AT_LEAST_1,
    "model.dec_layers": _AT_LEAST_0,  # 0: the prediction heads on the learned queries only
    "model.nheads": _AT_LEAST_1,
    "model.dim_feedforward": _AT_LEAST_1,
    "model.enc_layers": _AT_LEAST_0,  # 0: the pixel decoder's input projections only
    "model.enc_points": _AT_LEAST_1,
    "model.enc_dim_feedforward": _AT_LEAST_1,
    "model.mask_dim": _AT_LEAST_1,
    "model.pixel_std": _ABOVE_0,
    "model.drop_path_rate": _Bound("-1 (the model's own) or in [0, 1)", lambda v: v == -1 or 0 <= v < 1),
    "model.size_divisibility": _AT_LEAST_1,
    "model.detections_per_image": _AT_LEAST_1,
    "loss.class_weight": _AT_LEAST_0,
    "loss.mask_weight": _AT_LEAST_0,
    "loss.dice_weight": _AT_LEAST_0,
    "loss.no_object_weight": _AT_LEAST_0,
    "loss.num_points": _AT_LEAST_1,
    "loss.oversample_ratio": _AT_LEAST_1,
    "loss.importance_sample_ratio": _IN_0_1,
    "solver.max_iters": _AT_LEAST_1,
    "solver.lr": _ABOVE_0,
    "solver.weight_decay": _AT_LEAST_0,
    "solver.backbone_lr_mult": _AT_LEAST_0,  # 0: the backbone does not learn
    "solver.clip_grad_norm": _AT_LEAST_0,  # 0: no clipping
    "solver.lr_gamma": _ABOVE_0,  # the LR is multiplied by it at each of lr_steps
    "solver.poly_power": _AT_LEAST_0,
    "solver.warmup_iters": _AT_LEAST_0,
    "solver.warmup_factor": _AT_LEAST_0,
    "solver.ema_decay": _IN_0_1,
    "solver.ema_start": _AT_LEAST_0,
    "distill.burnin_iters": _AT_LEAST_0,
    "distill.ema_decay": _IN_0_1,
    "distill.unsup_weight": _AT_LEAST_0,
    "distill.score_threshold": _IN_0_1_OPEN_TOP,  # the score must exceed it: 1 keeps nothing
    "distill.min_mask_area": _AT_LEAST_0,
    "distill.mask_threshold": _IN_0_1_OPEN,
    "distill.duplicate_iou": _IN_0_1,
    "distill.diagnostic_thresholds": _IN_0_1_OPEN_TOP,
    "eval_period": _AT_LEAST_0,  # 0: evaluate only at the end
    "checkpoint_period": _AT_LEAST_0,  # 0: save only at the end
    "log_period": _AT_LEAST_1,
    "picture_period": _AT_LEAST_0,  # 0: no pictures
    "threads": _AT_LEAST_0,  # 0: torch's default
}


_FLOAT32_MAX = 3.4028234663852886e38


def validate_config(cfg: Config) -> None:
    """Reject values that cannot work, naming the key."""
    for key, allowed in _CHOICES.items():
        value = _lookup(cfg, key)
        if value not in allowed:
            raise GdistillError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    if not is_device_name(cfg.device):
        raise GdistillError(
            f"config key 'device' must be one of {', '.join(DEVICE_FORMS)}, got {cfg.device!r}"
        )
    for key in _all_keys(Config):
        value = _lookup(cfg, key)
        items = value if isinstance(value, tuple) else (value,)
        # Values reach the model as float32, whose largest is 3.4e38 (1e39 would be inf there).
        huge = [v for v in items if isinstance(v, float) and not abs(v) <= _FLOAT32_MAX]
        if huge:
            note = " (inf in float32)" if all(math.isfinite(v) for v in huge) else ""
            raise GdistillError(f"config key '{key}' must be finite, got {value}{note}")
    for key, bound in _BOUNDS.items():
        value = _lookup(cfg, key)
        items = value if isinstance(value, tuple) else (value,)
        if not all(bound.holds(v) for v in items):
            raise GdistillError(f"config key '{key}' must be {bound.text}, got {value}")
    steps = cfg.solver.lr_steps
    if any(not isinstance(v, int) or v < 1 for v in steps) or list(steps) != sorted(set(steps)):
        raise GdistillError(
            f"config key 'solver.lr_steps' must be increasing positive iterations, got {list(steps)}"
        )
    lo, hi = cfg.data.scale_range
    if lo > hi:
        raise GdistillError(f"config key 'data.scale_range' must satisfy min <= max, got {lo, hi}")
    if cfg.model.hidden_dim % cfg.model.nheads:
        raise GdistillError("config key 'model.hidden_dim' must be divisible by 'model.nheads'")
