import pytest
import torch
import yaml
from tiny_config import TINY

from gdistill.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    preset_names,
    validate_config,
)
from gdistill.engine.trainer import resolve_device
from gdistill.errors import GdistillError


def test_defaults_are_the_papers():
    cfg = Config()
    assert cfg.solver.lr == 1e-4 and cfg.solver.weight_decay == 0.05
    assert cfg.solver.backbone_lr_mult == 0.1 and cfg.solver.clip_grad_norm == 0.01
    assert cfg.model.num_queries == 100 and cfg.model.dec_layers == 9 and cfg.model.enc_layers == 6
    assert (cfg.loss.class_weight, cfg.loss.mask_weight, cfg.loss.dice_weight) == (2.0, 5.0, 5.0)
    assert cfg.loss.no_object_weight == 0.1 and cfg.loss.num_points == 12544
    assert cfg.distill.unsup_weight == 2.0 and cfg.distill.score_threshold == 0.7
    assert cfg.distill.ema_decay == 0.9996 and cfg.distill.burn_in == "guided"
    assert cfg.data.scale_range == (0.1, 2.0)
    assert cfg.solver.ema_decay == 0.0  # stage A keeps no moving average unless asked


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("solver:\n  max_iters: 500\n  lr_steps: [100, 200]\nmodel:\n  backbone: resnet18\n")
    cfg = load_config(path, ["solver.max_iters=700", "data.scale_range=[0.5,1.5]", "model.pretrained=false"])
    assert cfg.solver.max_iters == 700
    assert cfg.solver.lr_steps == (100, 200)
    assert cfg.data.scale_range == (0.5, 1.5)
    assert cfg.model.backbone == "resnet18" and cfg.model.pretrained is False


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["seed=7", "distill.burn_in=standard", "solver.lr=0.0003"])
    text = yaml.safe_dump(config_to_dict(cfg))
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg


def test_unknown_key_names_key_and_close_match():
    with pytest.raises(GdistillError, match=r"unknown config key 'solver.max_iter'.*solver.max_iters"):
        apply_overrides(Config(), ["solver.max_iter=3"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbon: resnet18\n")
    with pytest.raises(GdistillError, match=r"bad.yaml: unknown config key 'model.backbon'.*model.backbone"):
        load_config(path)


def test_wrong_types_and_values():
    with pytest.raises(GdistillError, match="'solver.max_iters' expects int"):
        apply_overrides(Config(), ["solver.max_iters=abc"])
    with pytest.raises(GdistillError, match="'model.backbone' expects str"):
        apply_overrides(Config(), ["model.backbone=[resnet18]"])
    with pytest.raises(GdistillError, match="distill.burn_in.*guided, standard, none"):
        load_config(None, ["distill.burn_in=sometimes"])
    with pytest.raises(GdistillError, match="not of the form key=value"):
        apply_overrides(Config(), ["solver.max_iters"])
    with pytest.raises(GdistillError, match=r"'solver.ema_decay' must be in \[0, 1\], got 1.5"):
        load_config(None, ["solver.ema_decay=1.5"])
    with pytest.raises(GdistillError, match="'solver.ema_start' must be >= 0, got -1"):
        load_config(None, ["solver.ema_start=-1"])


def test_malformed_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(GdistillError, match="broken.yaml: malformed YAML"):
        load_config(path)
    with pytest.raises(GdistillError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(GdistillError, match=r"^.*: is a folder, not a config file \(packaged presets: "):
        load_config(tmp_path)


@pytest.mark.parametrize("name", preset_names())
def test_presets_validate_alone_and_with_the_tiny_test_overrides(name):
    load_config(name)
    load_config(name, TINY)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("solver.lr=nan", "'solver.lr' must be finite, got nan"),
        ("solver.lr=inf", "'solver.lr' must be finite, got inf"),
        ("loss.class_weight=1e39", r"'loss.class_weight' must be finite, got 1e\+39 \(inf in float32\)"),
        ("solver.lr=0", "'solver.lr' must be > 0, got 0.0"),
        ("solver.lr_gamma=-1", "'solver.lr_gamma' must be > 0, got -1.0"),
        ("solver.weight_decay=-0.1", "'solver.weight_decay' must be >= 0, got -0.1"),
        ("solver.clip_grad_norm=nan", "'solver.clip_grad_norm' must be finite, got nan"),
        ("solver.clip_grad_norm=-1", "'solver.clip_grad_norm' must be >= 0, got -1.0"),
        ("solver.backbone_lr_mult=-1", "'solver.backbone_lr_mult' must be >= 0, got -1.0"),
        ("solver.poly_power=-0.5", "'solver.poly_power' must be >= 0, got -0.5"),
        ("solver.warmup_iters=-1", "'solver.warmup_iters' must be >= 0, got -1"),
        ("solver.warmup_factor=-1", "'solver.warmup_factor' must be >= 0, got -1.0"),
        ("solver.ema_decay=nan", "'solver.ema_decay' must be finite, got nan"),
        ("data.num_workers=-1", "'data.num_workers' must be >= 0, got -1"),
        ("data.eval_batch_size=0", "'data.eval_batch_size' must be >= 1, got 0"),
        ("data.unlabelled_batch_size=0", "'data.unlabelled_batch_size' must be >= 1, got 0"),
        ("data.test_short_side=0", "'data.test_short_side' must be >= 1, got 0"),
        ("data.test_max_side=0", "'data.test_max_side' must be >= 1, got 0"),
        ("data.repeat_factor_threshold=-1", "'data.repeat_factor_threshold' must be >= 0, got -1.0"),
        ("data.scale_range=[0.5,inf]", r"'data.scale_range' must be finite, got \(0.5, inf\)"),
        ("data.scale_range=[0,1]", r"'data.scale_range' must be > 0, got \(0.0, 1.0\)"),
        ("data.scale_range=[2,1]", r"'data.scale_range' must satisfy min <= max, got \(2.0, 1.0\)"),
        ("model.nheads=0", "'model.nheads' must be >= 1, got 0"),
        ("model.mask_dim=0", "'model.mask_dim' must be >= 1, got 0"),
        ("model.enc_points=0", "'model.enc_points' must be >= 1, got 0"),
        ("model.dec_layers=-1", "'model.dec_layers' must be >= 0, got -1"),
        ("model.enc_layers=-1", "'model.enc_layers' must be >= 0, got -1"),
        ("model.detections_per_image=0", "'model.detections_per_image' must be >= 1, got 0"),
        ("model.dim_feedforward=0", "'model.dim_feedforward' must be >= 1, got 0"),
        ("model.enc_dim_feedforward=0", "'model.enc_dim_feedforward' must be >= 1, got 0"),
        ("model.size_divisibility=0", "'model.size_divisibility' must be >= 1, got 0"),
        ("model.pixel_std=[0.5,0,0.5]", r"'model.pixel_std' must be > 0, got \(0.5, 0.0, 0.5\)"),
        ("model.hidden_dim=30", "'model.hidden_dim' must be divisible by 'model.nheads'"),
        ("log_period=0", "'log_period' must be >= 1, got 0"),
        ("eval_period=-1", "'eval_period' must be >= 0, got -1"),
        ("checkpoint_period=-1", "'checkpoint_period' must be >= 0, got -1"),
        ("picture_period=-1", "'picture_period' must be >= 0, got -1"),
        ("threads=-1", "'threads' must be >= 0, got -1"),
        ("loss.oversample_ratio=0.1", "'loss.oversample_ratio' must be >= 1, got 0.1"),
        ("loss.importance_sample_ratio=1.5", r"'loss.importance_sample_ratio' must be in \[0, 1\], got 1.5"),
        ("loss.class_weight=-2", "'loss.class_weight' must be >= 0, got -2.0"),
        ("loss.dice_weight=inf", "'loss.dice_weight' must be finite, got inf"),
        ("loss.no_object_weight=-0.1", "'loss.no_object_weight' must be >= 0, got -0.1"),
        ("distill.score_threshold=2", r"'distill.score_threshold' must be in \[0, 1\), got 2.0"),
        ("distill.score_threshold=1", r"'distill.score_threshold' must be in \[0, 1\), got 1.0"),
        ("distill.mask_threshold=0", r"'distill.mask_threshold' must be in \(0, 1\), got 0.0"),
        ("distill.min_mask_area=-1", "'distill.min_mask_area' must be >= 0, got -1.0"),
        ("distill.duplicate_iou=1.5", r"'distill.duplicate_iou' must be in \[0, 1\], got 1.5"),
        ("distill.unsup_weight=nan", "'distill.unsup_weight' must be finite, got nan"),
        ("distill.unsup_weight=-1", "'distill.unsup_weight' must be >= 0, got -1.0"),
        ("distill.burnin_iters=-1", "'distill.burnin_iters' must be >= 0, got -1"),
        (
            "distill.diagnostic_thresholds=[0.5,1.0]",
            r"'distill.diagnostic_thresholds' must be in \[0, 1\), got \(0.5, 1.0\)",
        ),
        ("device=banana", "'device' must be one of auto, cpu, cuda, cuda:N, got 'banana'"),
        ("device=cuda:x", "'device' must be one of auto, cpu, cuda, cuda:N, got 'cuda:x'"),
    ],
)
def test_values_that_cannot_work_name_the_key(override, message):
    with pytest.raises(GdistillError, match=f"^config key {message}$"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override",
    [
        "model.enc_layers=0",  # the pixel decoder's input projections only
        "model.dec_layers=0",  # predictions from the learned queries only
        "eval_period=0",  # only at the end
        "checkpoint_period=0",
        "picture_period=0",
        "threads=0",
        "data.num_workers=0",
        "data.test_max_side=100",  # below test_short_side: the cap wins
        "solver.clip_grad_norm=0",
        "solver.backbone_lr_mult=0",
        "distill.score_threshold=0",
        "distill.duplicate_iou=1",
        "distill.diagnostic_thresholds=[]",
        "device=cuda:1",
    ],
)
def test_edge_values_that_work_validate(override):
    load_config(None, [override])


@pytest.mark.parametrize("name", ["banana", "cuda:x", "CPU", "meta"])
def test_resolve_device_rejects_unknown_names_without_saying_config_key(name):
    with pytest.raises(GdistillError, match=rf"^device '{name}' is not one of auto, cpu, cuda, cuda:N$"):
        resolve_device(name)


def test_resolve_device_names_a_cuda_device_that_is_not_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GdistillError, match="^device 'cuda': CUDA is not available$"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(GdistillError, match=r"^device 'cuda:1': no such CUDA device \(1 visible\)$"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_validate_config_checks_the_device():
    cfg = Config()
    cfg.device = "banana"
    with pytest.raises(GdistillError, match="config key 'device'.*'banana'"):
        validate_config(cfg)


def test_config_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "utf16.yaml"
    path.write_bytes("solver:\n  lr: 0.1\n".encode("utf-16"))  # starts with the BOM ff fe
    with pytest.raises(GdistillError, match=r"^.*utf16.yaml: not UTF-8 text \(byte 0\)$"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("solver:\n  lr: 0.1\n  max_iters: 5\n  lr: 0.2\n", "lr", 4),
        ("seed: 1\nsolver:\n  lr: 0.1\nseed: 2\n", "seed", 4),
        ("model:\n  nheads: 4\nmodel:\n  nheads: 8\n", "model", 3),
    ],
    ids=["nested", "top-level", "section"],
)
def test_duplicate_keys_in_a_config_file_name_file_and_key(tmp_path, text, key, line):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(GdistillError, match=rf"^.*dup.yaml: duplicate key '{key}' \(line {line}\)$"):
        load_config(path)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("solver:\n  <<: {lr: 0.1, max_iters: 5}\n  lr: 0.2\n")
    cfg = load_config(path)
    assert (cfg.solver.lr, cfg.solver.max_iters) == (0.2, 5)



@pytest.mark.parametrize("steps", ["[0]", "[-5]", "[100,50]", "[50,50]"])
def test_learning_rate_steps_must_be_increasing_positive_iterations(steps):
    with pytest.raises(GdistillError, match=r"'solver.lr_steps' must be increasing positive"):
        validate_config(load_config(None, [f"solver.lr_steps={steps}"]))
