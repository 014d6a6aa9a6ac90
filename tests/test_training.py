"""End-to-end training on tiny synthetic data: learning, hand-over, resume, determinism."""

import json
import shutil
import warnings

import pytest
import torch
from tiny_config import TINY

from gdistill.config import config_from_dict, load_config
from gdistill.data.coco import load_coco
from gdistill.data.loader import repeat_factors
from gdistill.data.sources import unlabelled_from_coco
from gdistill.data.synthetic import generate_synthetic
from gdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from gdistill.engine.trainer import TrainingData, train
from gdistill.errors import GdistillError
from gdistill.inference import load_model


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    train_json, val_json = generate_synthetic(root, 6, 2, seed=3, image_size=64, progress=False)
    labelled = load_coco(train_json)
    return TrainingData(
        labelled=labelled,
        images_dir=root / "images",
        val=load_coco(val_json),
        val_images_dir=root / "images",
        unlabelled=unlabelled_from_coco(train_json, root / "images"),
    )


@pytest.fixture(scope="module")
def stage_a(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config("demo", [*TINY, "solver.max_iters=4", "eval_period=0", "checkpoint_period=0"])
    train(cfg, out, tiny_data, progress=False)
    return out


def _weights(payload, key):
    return {k: v.clone() for k, v in payload[key].items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overfits_a_few_images(tmp_path):
    """A tiny model learns 4 training images almost perfectly (mask AP on the same images)."""
    train_json, _ = generate_synthetic(tmp_path / "d", 4, 1, seed=3, image_size=64, progress=False)
    ds = load_coco(train_json)
    cfg = load_config("demo", [
        *TINY, "data.batch_size=4", "data.scale_range=[1.0,1.0]", "model.hidden_dim=64",
        "model.mask_dim=64", "model.num_queries=16", "model.dim_feedforward=128",
        "model.enc_dim_feedforward=128", "loss.num_points=256", "solver.max_iters=150",
        "solver.lr=0.001", "solver.lr_steps=[1000]", "eval_period=0", "checkpoint_period=0",
        "log_period=50",
    ])
    result = train(cfg, tmp_path / "run", TrainingData(ds, tmp_path / "d" / "images", ds,
                                                       tmp_path / "d" / "images"), progress=False)
    assert result["student_AP"] > 60.0, result
    run = tmp_path / "run"
    for name in ("config.yaml", "run.json", "metrics.csv", "eval.csv", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    machine = json.loads((run / "run.json").read_text())["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["threads"] == cfg.threads and machine["cpu"]


def _distill(tiny_data, teacher_dir, out, burn_in, max_iters, burnin_iters=3, extra=()):
    cfg = load_config("demo", [
        *TINY, f"solver.max_iters={max_iters}", "eval_period=0", "checkpoint_period=3",
        f"distill.burn_in={burn_in}", f"distill.burnin_iters={burnin_iters}",
        "distill.ema_decay=0.5", "distill.score_threshold=0.0", "distill.min_mask_area=0",
        *extra,
    ])
    train(cfg, out, tiny_data, teacher_checkpoint=teacher_dir / "best.pt", progress=False)
    return load_checkpoint(out / "last.pt")


@pytest.mark.parametrize("burn_in", ["guided", "standard"])
def test_teacher_frozen_during_burn_in_then_handed_over(tiny_data, stage_a, tmp_path, burn_in):
    teacher_a = _weights(load_checkpoint(stage_a / "best.pt"), "model")
    during = _distill(tiny_data, stage_a, tmp_path / "a", burn_in, max_iters=3)
    # Through burn-in the teacher is exactly the stage-A model: no gradient, no EMA.
    assert _equal(_weights(during, "teacher"), teacher_a)
    assert not _equal(_weights(during, "model"), teacher_a)
    # One step more: at step 3 the teacher becomes a copy of the student of step 3 (same seed and
    # data, so the same student as run "a" ends with).
    after = _distill(tiny_data, stage_a, tmp_path / "b", burn_in, max_iters=4)
    assert _equal(_weights(after, "teacher"), _weights(during, "model"))


def test_no_burn_in_hands_over_at_step_zero(tiny_data, stage_a, tmp_path):
    result = _distill(tiny_data, stage_a, tmp_path / "n", "none", max_iters=1,
                      extra=["distill.student_init=teacher"])
    teacher_a = _weights(load_checkpoint(stage_a / "best.pt"), "model")
    # student_init=teacher + hand-over at step 0: the teacher is still the stage-A weights
    assert _equal(_weights(result, "teacher"), teacher_a)


def test_resume_is_exact_across_the_handover(tiny_data, stage_a, tmp_path):
    full = _distill(tiny_data, stage_a, tmp_path / "full", "guided", max_iters=6, burnin_iters=4)
    # Rebuild the state of a run killed after step 3 (its last checkpoint) and resume it.
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tmp_path / "full" / "last.prev.pt", killed / "last.pt")
    assert load_checkpoint(killed / "last.pt")["step"] == 3
    # Given values the run did not use are named; the run's own are kept.
    with pytest.warns(UserWarning, match=r"last.pt: resuming with the run's own config; ignored: .*"
                      r"solver.max_iters=800 \(run: 6\)"):
        train(load_config("demo", TINY), killed, tiny_data, resume=True, progress=False)
    resumed = load_checkpoint(killed / "last.pt")
    assert resumed["step"] == 6
    assert _equal(_weights(resumed, "model"), _weights(full, "model"))
    assert _equal(_weights(resumed, "teacher"), _weights(full, "teacher"))


def test_a_run_saved_before_the_decayed_level_embedding_resumes(tiny_data, tmp_path, monkeypatch):
    """Builds before model.drop_path_rate kept the pixel decoder's level_embed out of weight decay:
    the parameter groups of their optimizer state differ, and resuming stopped with a traceback."""
    import gdistill.engine.trainer as trainer_module
    from gdistill.engine.optim import LEGACY_NO_DECAY, build_optimizer

    def old_build_optimizer(*args, extra_no_decay=()):
        return build_optimizer(*args, extra_no_decay=LEGACY_NO_DECAY)

    cfg = load_config("demo", [*TINY, "solver.max_iters=4", "eval_period=0", "checkpoint_period=2",
                               "data.pad_value=0"])  # those builds padded with black
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "build_optimizer", old_build_optimizer)
        train(cfg, tmp_path / "full", tiny_data, progress=False)
    old = tmp_path / "old"
    old.mkdir()
    payload = load_checkpoint(tmp_path / "full" / "last.prev.pt")
    assert payload["step"] == 2
    del payload["config"]["model"]["drop_path_rate"]  # as that build saved it
    del payload["config"]["data"]["pad_value"]
    save_checkpoint(payload, old / "last.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(load_config("demo", TINY), old, tiny_data, resume=True, progress=False)
    said = " ".join(str(w.message) for w in caught)
    assert "ignored: " in said and "pad_value" not in said and "drop_path" not in said  # keys it lacked
    resumed, full = load_checkpoint(old / "last.pt"), load_checkpoint(tmp_path / "full" / "last.pt")
    assert resumed["step"] == 4 and _equal(_weights(resumed, "model"), _weights(full, "model"))


def _stage_a_with_ema(tiny_data, stage_a, out, max_iters, extra=()):
    cfg = load_config("demo", [
        *TINY, f"solver.max_iters={max_iters}", "eval_period=0", "checkpoint_period=3",
        "solver.ema_decay=0.5", "solver.ema_start=2", *extra,
    ])
    result = train(cfg, out, tiny_data, init_weights=stage_a / "best.pt", progress=False)
    return result, load_checkpoint(out / "last.pt")


def test_stage_a_ema_model_copy_then_average_and_resume(tiny_data, stage_a, tmp_path):
    start = _weights(load_checkpoint(stage_a / "best.pt"), "model")
    # Until solver.ema_start the average has not begun: the checkpoint holds none, and asking
    # for it says why.
    _, two = _stage_a_with_ema(tiny_data, stage_a, tmp_path / "two", max_iters=2)
    assert two["ema"] is None and not _equal(_weights(two, "model"), start)
    with pytest.raises(GdistillError, match=r"last.pt: has no EMA model: its moving average "
                       r"starts after solver.ema_start=2 and this checkpoint is of step 2"):
        load_model(tmp_path / "two" / "last.pt", model="ema")
    # Before step 2 it becomes a copy of the model after 2 steps (same seed and data as "two").
    _, three = _stage_a_with_ema(tiny_data, stage_a, tmp_path / "three", max_iters=3)
    assert _equal(_weights(three, "ema"), _weights(two, "model"))
    # Before step 3: 0.5 * average + 0.5 * model after 3 steps; integer buffers are copied.
    result, four = _stage_a_with_ema(tiny_data, stage_a, tmp_path / "four", max_iters=4,
                                     extra=["eval_period=2"])
    model_two, model_three, ema = _weights(two, "model"), _weights(three, "model"), _weights(four, "ema")
    for k in ema:
        expected = 0.5 * (model_two[k] + model_three[k]) if ema[k].is_floating_point() else model_three[k]
        assert torch.allclose(ema[k], expected, atol=1e-6), k
    # It is evaluated once it has begun (not at step 2, when it was still the initial model).
    rows = [r.split(",") for r in (tmp_path / "four" / "eval.csv").read_text().splitlines()]
    column = rows[0].index("ema_AP")
    assert [r[0] for r in rows[1:]] == ["2", "4"] and rows[1][column] == ""
    assert float(rows[2][column]) == pytest.approx(result["ema_AP"])
    # Resuming the run killed after step 3 ends with the same average.
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tmp_path / "four" / "last.prev.pt", killed / "last.pt")
    with pytest.warns(UserWarning, match="resuming with the run's own config"):
        train(load_config("demo", TINY), killed, tiny_data, resume=True, progress=False)
    assert _equal(_weights(load_checkpoint(killed / "last.pt"), "ema"), ema)


def test_resuming_a_finished_run_says_so_and_trains_nothing(tiny_data, stage_a, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(stage_a / "last.pt", run / "last.pt")
    before = (run / "last.pt").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="resuming with the run's own config"):
        train(load_config("demo", TINY), run, tiny_data, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "last.pt: the run has finished (iteration 4 of 4); nothing left to train" in err
    assert (run / "last.pt").stat().st_mtime_ns == before


def test_resuming_with_another_number_of_processes_is_refused(tiny_data, stage_a, tmp_path, monkeypatch):
    payload = load_checkpoint(stage_a / "last.pt")
    payload.update(step=2, rng=[payload["rng"], payload["rng"]])  # as saved by 2 torchrun ranks
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(payload, run / "last.pt")
    with pytest.raises(GdistillError, match=r"last.pt: saved by 2 processes, resumed with 1; "
                       r"resume with as many \(torchrun --nproc_per_node 2\)"):
        train(load_config("demo", TINY), run, tiny_data, resume=True, progress=False)
    # with 3 processes, whose share of the saved batch of 2 would not divide: the same advice
    from gdistill.engine import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(GdistillError, match=r"last.pt: saved by 2 processes, resumed with 3; "):
        train(load_config("demo", TINY), run, tiny_data, resume=True, progress=False)


def test_distillation_rejects_a_stage_a_ema(tiny_data, stage_a, tmp_path):
    cfg = load_config("demo", [*TINY, "solver.max_iters=1", "solver.ema_decay=0.9"])
    with pytest.raises(GdistillError, match="solver.ema_decay.*distill.ema_decay"):
        train(cfg, tmp_path / "d", tiny_data, teacher_checkpoint=stage_a / "best.pt", progress=False)


def test_distill_logs_pseudo_label_statistics(tiny_data, stage_a, tmp_path):
    out = tmp_path / "s"
    cfg = load_config("demo", [*TINY, "solver.max_iters=2", "eval_period=2",
                               "distill.score_threshold=0.0", "distill.min_mask_area=0"])
    result = train(cfg, out, tiny_data, teacher_checkpoint=stage_a / "best.pt", progress=False)
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("loss_unsup", "pl_kept", "pl_candidates", "pl_per_image", "phase"):
        assert column in header
    eval_header = (out / "eval.csv").read_text().splitlines()[0].split(",")
    assert "teacher_pl_precision@0.7" in eval_header and "student_AP" in eval_header
    assert {f"teacher_pl_recall_{size}@0.7" for size in ("small", "medium", "large")} <= set(eval_header)
    assert "teacher_AP" in result and "student_AP" in result


def test_unchanged_teacher_is_evaluated_once(tiny_data, stage_a, tmp_path, monkeypatch):
    # Evaluations after steps 1, 2 and 3 fall in burn-in (frozen teacher): one evaluation of the
    # teacher serves all three; the hand-over at step 3 changes it, so step 4 evaluates it again.
    import gdistill.engine.trainer as trainer

    calls = []
    real = trainer.evaluate_model

    def counting(*args, **kwargs):
        calls.append(kwargs["desc"])
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate_model", counting)
    cfg = load_config("demo", [*TINY, "solver.max_iters=4", "eval_period=1", "checkpoint_period=0",
                               "distill.burnin_iters=3", "distill.ema_decay=0.5"])
    train(cfg, tmp_path / "e", tiny_data, teacher_checkpoint=stage_a / "best.pt", progress=False)
    assert calls.count("eval student") == 4
    assert calls.count("eval teacher") == 2
    rows = (tmp_path / "e" / "eval.csv").read_text().splitlines()
    header = rows[0].split(",")
    teacher_columns = [i for i, name in enumerate(header) if name.startswith("teacher_")]
    values = [[row.split(",")[i] for i in teacher_columns] for row in rows[1:]]
    assert len(teacher_columns) > 10 and values[0] == values[1] == values[2]


def test_init_weights_starts_from_checkpoint(tiny_data, stage_a, tmp_path):
    cfg = load_config("demo", [*TINY, "solver.max_iters=1", "eval_period=0", "solver.lr=1e-12"])
    train(cfg, tmp_path / "c", tiny_data, init_weights=stage_a / "best.pt", progress=False)
    start = _weights(load_checkpoint(stage_a / "best.pt"), "model")
    after = _weights(load_checkpoint(tmp_path / "c" / "last.pt"), "model")
    # lr ~ 0: parameters stay (BN statistics move with the forward pass)
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start if "running" not in k
               and "num_batches" not in k)


def test_backbone_freezing_follows_the_run_not_the_checkpoint(tiny_data, stage_a, tmp_path):
    # The stage-A checkpoint trained its BatchNorm layers; this run freezes them.
    # The hand-over at step 1 pairs the teacher's BatchNorm affines (parameters, as in stage A)
    # with the student's (buffers of FrozenBatchNorm2d): it stopped with a KeyError.
    cfg = load_config("demo", [*TINY, "solver.max_iters=2", "eval_period=0", "model.frozen_bn=true",
                               "model.frozen_stages=0", "distill.student_init=teacher",
                               "distill.burnin_iters=1"])
    train(cfg, tmp_path / "f", tiny_data, teacher_checkpoint=stage_a / "best.pt", progress=False)
    start = _weights(load_checkpoint(stage_a / "best.pt"), "model")
    after = load_checkpoint(tmp_path / "f" / "last.pt")
    assert after["config"]["model"]["frozen_bn"] is True
    assert after["config"]["model"]["frozen_stages"] == 0
    bn = [k for k in start if k.startswith("backbone.") and "running_" in k]
    assert bn and all(torch.equal(start[k], after["model"][k]) for k in bn)
    # the rest of the backbone trained (frozen_stages=0 unfreezes the demo preset's stem)
    assert not torch.equal(start["backbone.body.conv_stem.weight"],
                           after["model"]["backbone.body.conv_stem.weight"])
    # and the teacher took the student's weights at the hand-over, BatchNorm included
    assert not torch.equal(start["backbone.body.conv_stem.weight"],
                           after["teacher"]["backbone.body.conv_stem.weight"])
    assert all(torch.equal(start[k], after["teacher"][k]) for k in bn)


def test_frozen_bn_on_a_random_backbone_warns(tiny_data, tmp_path):
    cfg = load_config("demo", [*TINY, "solver.max_iters=1", "eval_period=0", "model.frozen_bn=true",
                               "model.backbone_weights=", "model.pretrained=false"])
    with pytest.warns(UserWarning, match="frozen_bn=true with a randomly initialised backbone"):
        train(cfg, tmp_path / "r", tiny_data, progress=False)


def test_resume_names_the_config_values_it_ignores(tiny_data, tmp_path, recwarn):
    overrides = [*TINY, "solver.max_iters=1", "eval_period=0", "checkpoint_period=0"]
    train(load_config("demo", overrides), tmp_path / "r", tiny_data, progress=False)
    train(load_config("demo", overrides), tmp_path / "r", tiny_data, resume=True, progress=False)
    assert not [w for w in recwarn if "resuming" in str(w.message)]  # same command: silent
    longer = load_config("demo", [*overrides, "solver.max_iters=3"])
    with pytest.warns(UserWarning, match=r"ignored: solver.max_iters=3 \(run: 1\)$"):
        train(longer, tmp_path / "r", tiny_data, resume=True, progress=False)
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 1


def test_resume_without_checkpoint_is_an_error(tiny_data, tmp_path):
    with pytest.raises(GdistillError, match="nothing to resume"):
        train(load_config("demo", TINY), tmp_path / "empty", tiny_data, resume=True, progress=False)
    assert not (tmp_path / "empty").exists()  # a mistyped --out is not created


def test_teacher_with_other_classes_is_rejected(tiny_data, stage_a, tmp_path):
    payload = load_checkpoint(stage_a / "best.pt")
    payload["class_names"] = ["a", "b"]
    torch.save(payload, tmp_path / "other.pt")
    cfg = load_config("demo", [*TINY, "solver.max_iters=1"])
    with pytest.raises(GdistillError, match="other.pt: classes"):
        train(cfg, tmp_path / "x", tiny_data, teacher_checkpoint=tmp_path / "other.pt", progress=False)


def test_tensorboard_scalars_when_installed(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("demo", [*TINY, "solver.max_iters=2", "eval_period=2"])
    train(cfg, tmp_path / "tb", tiny_data, progress=False)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "eval/student_AP" in tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


@pytest.mark.parametrize("error", [GdistillError("v.jpg: corrupt or truncated image"),
                                   RuntimeError("out of memory")])
def test_a_failed_evaluation_keeps_the_iterations_before_it(tiny_data, tmp_path, monkeypatch,
                                                            capsys, error):
    """A validation image that only fails when decoded (a JPEG cut short after its header) stops
    the run at its first evaluation: the iterations trained until then are saved in last.pt and
    --resume continues from them."""
    import gdistill.engine.trainer as trainer

    real = trainer.evaluate_model

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(trainer, "evaluate_model", failing)
    cfg = load_config("demo", [*TINY, "solver.max_iters=4", "eval_period=2", "checkpoint_period=0"])
    with pytest.raises(type(error)) as caught:
        train(cfg, tmp_path / "r", tiny_data, progress=False)
    where = (f"evaluation at iteration 2 failed; {tmp_path / 'r' / 'last.pt'} saved at iteration 2, "
             "the same command with --resume continues from it")
    if isinstance(error, GdistillError):
        assert str(caught.value) == f"v.jpg: corrupt or truncated image ({where})"
    else:
        assert caught.value is error and where in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 2
    monkeypatch.setattr(trainer, "evaluate_model", real)
    train(cfg, tmp_path / "r", tiny_data, resume=True, progress=False)
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 4
    # the evaluation that failed is done first on resume, as an uninterrupted run would have
    assert [row.split(",")[0] for row in (tmp_path / "r" / "eval.csv").read_text().splitlines()][1:] == [
        "2", "4"]


def test_an_evaluation_that_fails_is_redone_on_resume_and_logged_once(tiny_data, tmp_path,
                                                                     monkeypatch):
    """The picture drawn after the metrics fails (a full disk), and another time the last
    iteration's evaluation fails: each resume evaluates that iteration again, one eval.csv row."""
    import gdistill.engine.trainer as trainer

    real = trainer.validation_picture

    def disk_full(*args, **kwargs):
        raise GdistillError("pictures/val.png: no space left")

    cfg = load_config("demo", [*TINY, "solver.max_iters=4", "eval_period=2", "checkpoint_period=0"])
    monkeypatch.setattr(trainer, "validation_picture", disk_full)
    with pytest.raises(GdistillError, match="evaluation at iteration 2 failed"):
        train(cfg, tmp_path / "r", tiny_data, progress=False)
    monkeypatch.setattr(trainer, "validation_picture", real)
    train(cfg, tmp_path / "r", tiny_data, resume=True, progress=False)
    assert [r.split(",")[0] for r in (tmp_path / "r" / "eval.csv").read_text().splitlines()[1:]] == [
        "2", "4"]

    cfg = load_config("demo", [*TINY, "solver.max_iters=2", "eval_period=2", "checkpoint_period=0"])
    monkeypatch.setattr(trainer, "validation_picture", disk_full)
    with pytest.raises(GdistillError, match="evaluation at iteration 2 failed"):
        train(cfg, tmp_path / "last", tiny_data, progress=False)
    monkeypatch.setattr(trainer, "validation_picture", real)
    result = train(cfg, tmp_path / "last", tiny_data, resume=True, progress=False)
    assert result["step"] == 2 and "student_AP" in result
    assert load_checkpoint(tmp_path / "last" / "last.pt")["last_eval"]["step"] == 2
    assert (tmp_path / "last" / "best.pt").is_file()



def test_a_labelled_image_failing_when_drawn_keeps_the_iterations_before_it(tiny_data, tmp_path,
                                                                           monkeypatch):
    """An image that only fails when decoded, drawn at iteration 3: last.pt holds the 2 done,
    and --resume (the file fixed) ends where an uninterrupted run does."""
    import gdistill.data.loader as loader
    from gdistill.errors import UnreadableImageError

    cfg = load_config("demo", [*TINY, "solver.max_iters=4", "eval_period=0", "checkpoint_period=0",
                               "data.num_workers=0"])
    train(cfg, tmp_path / "whole", tiny_data, progress=False)
    real = loader.LabelledDataset.__getitem__
    calls = []

    def failing(self, key):
        calls.append(key)
        if len(calls) == 5:  # the first image of the third batch (batch size 2)
            raise UnreadableImageError("x.jpg: corrupt or truncated image (cut short)")
        return real(self, key)

    monkeypatch.setattr(loader.LabelledDataset, "__getitem__", failing)
    with pytest.raises(GdistillError) as caught:
        train(cfg, tmp_path / "r", tiny_data, progress=False)
    assert str(caught.value) == (
        "x.jpg: corrupt or truncated image (cut short) (drawing the batch of iteration 3 failed; "
        f"{tmp_path / 'r' / 'last.pt'} saved at iteration 2, the same command with --resume "
        "continues from it)"
    )
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 2
    monkeypatch.setattr(loader.LabelledDataset, "__getitem__", real)
    train(cfg, tmp_path / "r", tiny_data, resume=True, progress=False)
    assert _equal(load_checkpoint(tmp_path / "r" / "last.pt")["model"],
                  load_checkpoint(tmp_path / "whole" / "last.pt")["model"])


def test_schedule_points_past_the_end_of_the_run_are_named(tiny_data, stage_a, tmp_path):
    """A shortened run that kept the longer schedule's values: the learning rate never drops and
    the whole run is burn-in. Said once at the start, with the keys."""
    cfg = load_config("demo", [*TINY, "solver.max_iters=2", "eval_period=0", "checkpoint_period=0",
                               "distill.burnin_iters=5"])
    with pytest.warns(UserWarning) as caught:
        train(cfg, tmp_path / "d", tiny_data, teacher_checkpoint=stage_a / "best.pt", progress=False)
    [message] = [str(w.message) for w in caught if "ends before" in str(w.message)]
    assert message == (
        "solver.max_iters=2 ends before solver.lr_steps [700] (the learning rate is not lowered "
        "there); distill.burnin_iters=5 (the whole run is burn-in: the teacher is never handed "
        "over): scale them with the run"
    )
    cfg = load_config("demo", [*TINY, "solver.max_iters=2", "solver.lr_steps=[1]", "eval_period=0",
                               "checkpoint_period=0"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, tmp_path / "a", tiny_data, progress=False)
    assert not [w for w in caught if "ends before" in str(w.message)]


def test_a_validation_set_without_objects_is_refused(tiny_data, tmp_path):
    from dataclasses import replace

    no_objects = replace(
        tiny_data.val, images=[replace(img, annotations=[]) for img in tiny_data.val.images]
    )
    cfg = load_config("demo", [*TINY, "solver.max_iters=1"])
    with pytest.raises(GdistillError, match=r"no image has a non-crowd annotation, so there is no "
                       r"mask AP to compute \(an unlabelled file of `gdistill split`\?\)"):
        train(cfg, tmp_path / "run", replace(tiny_data, val=no_objects), progress=False)


def test_images_with_more_objects_than_queries_are_named(tiny_data):
    from gdistill.engine.trainer import _warn_more_objects_than_queries

    counts = [len(img.annotations) for img in tiny_data.labelled.images]
    most = max(counts)
    with pytest.warns(UserWarning, match=rf"{sum(c > 1 for c in counts)} labelled images have more "
                      rf"objects than model.num_queries=1 \(image \d+: {most}\)"):
        _warn_more_objects_than_queries(tiny_data.labelled, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_more_objects_than_queries(tiny_data.labelled, most)


def test_evaluation_line_names_each_model_and_the_labellers_pseudo_labels():
    from gdistill.engine.trainer import evaluation_line

    row = {"student_AP": 31.234, "teacher_AP": 30.1, "ema_AP": None, "teacher_pl_precision@0.7": 0.65,
           "teacher_pl_recall@0.7": 0.5214, "teacher_pl_precision@0.5": 0.4}
    assert evaluation_line(200, 270, row, "teacher", 0.7) == (
        "[eval] iteration 200/270: student AP 31.23, teacher AP 30.10; teacher's pseudo-labels at "
        "score > 0.7: precision 0.650, recall 0.521"
    )
    assert evaluation_line(5, 9, {"student_AP": None}, "student", 0.7) == "[eval] iteration 5/9: no AP"
    # Stage A trains the future teacher: "model", not "student".
    row = {"student_AP": 20.0, "ema_AP": 21.0, "student_pl_precision@0.7": 0.5}
    assert evaluation_line(9, 9, row, "student", 0.7) == (
        "[eval] iteration 9/9: model AP 20.00, EMA model AP 21.00; model's pseudo-labels at "
        "score > 0.7: precision 0.500"
    )


def test_progress_line_keeps_the_evaluation_on_an_80_column_terminal():
    from tqdm import tqdm

    from gdistill.engine.trainer import progress_postfix

    train = {"loss": "18", "unsup": "10.1", "pl/img": "5.5"}
    row = {"student_AP": 31.96, "teacher_pl_precision@0.7": 0.6612}
    postfix = progress_postfix(train, row, 0.7)
    assert list(postfix) == ["AP", "pl_prec", "loss", "unsup", "pl/img"]
    assert postfix["AP"] == "32.0" and postfix["pl_prec"] == "0.66"
    assert progress_postfix(train, {}, 0.7) == train
    postfix_text = ", ".join(f"{k}={v}" for k, v in postfix.items())
    line = tqdm.format_meter(405, 900, 303.0, ncols=80, prefix="distill", postfix=postfix_text)
    assert len(line) <= 80 and "AP=32.0, pl_prec=0.66" in line


def test_batch_sizes_are_over_all_processes(tiny_data, stage_a, tmp_path, monkeypatch):
    from gdistill.engine import distributed
    from gdistill.engine.trainer import per_process_batch

    assert per_process_batch(16, 4, "data.batch_size") == 4
    assert per_process_batch(16, 1, "data.batch_size") == 16
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    cfg = load_config("demo", [*TINY, "data.batch_size=3", "solver.max_iters=1"])
    with pytest.raises(GdistillError, match=r"^data.batch_size=3 is the batch over all processes and "
                       r"must divide among the 2 processes; use a multiple of 2$"):
        train(cfg, tmp_path / "a", tiny_data, progress=False)
    cfg = load_config("demo", [*TINY, "data.unlabelled_batch_size=5", "solver.max_iters=1"])
    with pytest.raises(GdistillError, match=r"^data.unlabelled_batch_size=5 is the batch"):
        train(cfg, tmp_path / "b", tiny_data, teacher_checkpoint=stage_a / "best.pt", progress=False)

    # Each of the 2 processes draws its share: the loaders get half of each batch.
    from gdistill.engine import trainer as trainer_module

    class LoadersBuilt(Exception):
        pass

    drawn = []

    def spy_loader(dataset, batch_size, *args, **kwargs):
        drawn.append((type(dataset).__name__, batch_size))
        if len(drawn) == expected_loaders:
            raise LoadersBuilt
        return iter(())

    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "wrap_ddp", lambda module, device: module)
    monkeypatch.setattr(trainer_module, "infinite_loader", spy_loader)
    cfg = load_config("demo", [*TINY, "data.batch_size=4", "data.unlabelled_batch_size=6"])
    expected_loaders = 1
    with pytest.raises(LoadersBuilt):
        train(cfg, tmp_path / "c", tiny_data, progress=False)
    assert drawn == [("LabelledDataset", 2)]
    drawn.clear()
    expected_loaders = 2
    with pytest.raises(LoadersBuilt):
        train(cfg, tmp_path / "d", tiny_data, teacher_checkpoint=stage_a / "best.pt", progress=False)
    assert drawn == [("LabelledDataset", 2), ("UnlabelledDataset", 3)]


def test_a_diverged_teacher_stops_distillation_in_one_line(tiny_data, stage_a, tmp_path):
    payload = load_checkpoint(stage_a / "best.pt")
    bias = next(k for k in payload["model"] if k.endswith("class_embed.bias"))
    payload["model"][bias] = torch.full_like(payload["model"][bias], float("nan"))
    save_checkpoint(payload, tmp_path / "diverged.pt")
    cfg = load_config("demo", [*TINY, "solver.max_iters=2", "eval_period=0"])
    with pytest.raises(GdistillError, match=r"^the teacher's outputs are not finite \(NaN or inf\)"):
        train(cfg, tmp_path / "run", tiny_data, teacher_checkpoint=tmp_path / "diverged.pt",
              progress=False)


def test_resuming_on_other_data_or_with_another_teacher_is_said(tiny_data, stage_a, tmp_path):
    from dataclasses import replace

    run = tmp_path / "run"
    run.mkdir()
    payload = load_checkpoint(stage_a / "last.pt")
    payload["step"] = 3
    save_checkpoint(payload, run / "last.pt")
    shutil.copy(stage_a / "run.json", run / "run.json")
    other_val = replace(tiny_data, val=tiny_data.labelled)  # another file as the validation set
    cfg = load_config("demo", TINY)
    with pytest.warns(UserWarning, match=r"run: resumed on other data than the run started with: "
                      r"val .*train.json \(the run: .*val.json\); it goes on with the data given "
                      r"now \(eval.csv and best.pt now mix two validation sets\)"):
        train(cfg, run, other_val, resume=True, progress=False)
    payload["step"] = 3
    save_checkpoint(payload, run / "last.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, run, tiny_data, resume=True, progress=False,
              teacher_checkpoint=tmp_path / "elsewhere.pt")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "other data" in m]  # the run's own data
    # the same file, as many images, but other ones (a split written again over it)
    images = tiny_data.labelled.images
    rewritten = replace(tiny_data.labelled, images=[replace(images[0], id=images[1].id),
                                                    replace(images[1], id=images[0].id), *images[2:]])
    payload["step"] = 3
    save_checkpoint(payload, run / "last.pt")
    with pytest.warns(UserWarning, match=r"resumed on other data than the run started with: labelled "
                      r"images other than those of the run in .*train.json; it goes on"):
        train(cfg, run, replace(tiny_data, labelled=rewritten), resume=True, progress=False)
    assert [m for m in messages if m.startswith(f"--teacher {tmp_path / 'elsewhere.pt'} is ignored "
                                                "on resume: the run goes on with its own teacher")]


def test_the_schedule_warning_names_lr_steps_only_for_a_step_schedule():
    from gdistill.engine.trainer import _warn_schedule_past_the_end

    step = load_config("coco_r50", ["solver.max_iters=1000"])
    with pytest.warns(UserWarning,
                      match=r"solver.max_iters=1000 ends before solver.lr_steps \[327778, 355092\]"):
        _warn_schedule_past_the_end(step, is_distill=False)
    poly = load_config("cityscapes_r50")  # a poly schedule: its lr_steps are not used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_schedule_past_the_end(poly, is_distill=False)


def test_stage_b_draws_labelled_images_by_repeat_factors(tiny_data, stage_a, tmp_path, monkeypatch):
    made = _recording_repeat_factor_samplers(monkeypatch)
    overrides = [*TINY, "solver.max_iters=1", "eval_period=0", "distill.repeat_factor_threshold=10"]
    train(load_config("demo", overrides), tmp_path / "a", tiny_data, progress=False)
    assert made == []  # stage A: uniform, as the authors
    stage_b = load_config("demo", [*overrides, "data.repeat_factor_threshold=2"])
    with pytest.warns(UserWarning, match=r"data.repeat_factor_threshold=2.0 is stage A's: stage B "
                      r"draws its labelled images by distill.repeat_factor_threshold=10.0"):
        train(stage_b, tmp_path / "b", tiny_data, teacher_checkpoint=stage_a / "best.pt",
              progress=False)
    assert len(made) == 1 and len(made[0]) == len(tiny_data.labelled.images)
    assert min(made[0]) >= 10 ** 0.5 - 1e-6  # every class is in at most all images: r >= sqrt(10)


def _as_saved_before_stage_b_repeat_factors(checkpoint, run, step, data_threshold):
    """A copy of ``checkpoint`` in ``run`` as a build before ``distill.repeat_factor_threshold``
    saved it (its stage B drew labelled images by ``data.repeat_factor_threshold``, as stage A);
    returns the config that the CLI then reads from the run's config.yaml."""
    run.mkdir()
    payload = load_checkpoint(checkpoint / "last.pt")
    payload["step"] = step
    del payload["config"]["distill"]["repeat_factor_threshold"]
    payload["config"]["data"]["repeat_factor_threshold"] = data_threshold
    save_checkpoint(payload, run / "last.pt")
    shutil.copy(checkpoint / "run.json", run / "run.json")
    return config_from_dict(payload["config"], "config.yaml")


def _recording_repeat_factor_samplers(monkeypatch):
    import gdistill.engine.trainer as trainer_module

    made = []
    real = trainer_module.RepeatFactorSampler

    def recording(factors, **kwargs):
        made.append(list(factors))
        return real(factors, **kwargs)

    monkeypatch.setattr(trainer_module, "RepeatFactorSampler", recording)
    return made


def test_an_old_stage_b_run_resumes_drawing_as_it_did(tiny_data, stage_a, tmp_path, monkeypatch):
    stage_b = tmp_path / "b"
    overrides = [*TINY, "solver.max_iters=2", "eval_period=0", "checkpoint_period=0"]
    train(load_config("demo", overrides), stage_b, tiny_data, teacher_checkpoint=stage_a / "best.pt",
          progress=False)
    run = tmp_path / "old"
    given = _as_saved_before_stage_b_repeat_factors(stage_b, run, 1, data_threshold=1.0)
    assert given.distill.repeat_factor_threshold == 10.0  # the key's default fills the gap
    made = _recording_repeat_factor_samplers(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(given, run, tiny_data, resume=True, progress=False)
    assert not [w for w in caught if "repeat_factor_threshold" in str(w.message)]
    assert made == [repeat_factors(tiny_data.labelled, 1.0)]  # by data.*, as before
    assert load_checkpoint(run / "last.pt")["config"]["distill"]["repeat_factor_threshold"] == 1.0


def test_an_old_stage_a_run_resumes_with_the_new_stage_b_default(tiny_data, stage_a, tmp_path,
                                                                  monkeypatch):
    run = tmp_path / "old"
    given = _as_saved_before_stage_b_repeat_factors(stage_a, run, 3, data_threshold=0.0)
    made = _recording_repeat_factor_samplers(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(given, run, tiny_data, resume=True, progress=False)
    assert not [w for w in caught if "repeat_factor_threshold" in str(w.message)]
    assert made == []  # stage A draws uniformly
    # A later `distill --teacher` from this run gets stage B's default, as from any new teacher.
    assert load_checkpoint(run / "last.pt")["config"]["distill"]["repeat_factor_threshold"] == 10.0
    # A value given now (not the default) is still named as ignored.
    given = _as_saved_before_stage_b_repeat_factors(stage_a, tmp_path / "old2", 3, 0.0)
    given.distill.repeat_factor_threshold = 4.0
    with pytest.warns(UserWarning, match=r"ignored: distill.repeat_factor_threshold=4.0 \(run: 10.0\)"):
        train(given, tmp_path / "old2", tiny_data, resume=True, progress=False)
