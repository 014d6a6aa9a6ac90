import pytest
import yaml

from gdistill.config import Config, apply_overrides, config_from_dict, config_to_dict, load_config
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
