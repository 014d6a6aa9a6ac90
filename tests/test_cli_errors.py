"""Bad input through the command line: exit status 2 and ONE stderr line naming file and problem."""

import json
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from tiny_config import TINY as TINY_BASE

from gdistill.cli import main
from gdistill.data.synthetic import generate_synthetic
from gdistill.errors import TrainingStopped

TINY = [*TINY_BASE, "solver.max_iters=1", "eval_period=0", "checkpoint_period=0"]
# The first (only) iteration reads all 4 training images.
ALL_IN_ONE_BATCH = ["data.batch_size=4"]

WORKERS = [0, 1]


def _dataset(root: Path) -> tuple[Path, Path, Path]:
    train_json, val_json = generate_synthetic(root, 4, 2, image_size=64, progress=False)
    return train_json, val_json, root / "images"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Valid data shared by tests that do not modify it: (train.json, val.json, images dir)."""
    return _dataset(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def teacher(synth, tmp_path_factory):
    """A real stage-A checkpoint made through the CLI."""
    train_json, _, images = synth
    out = tmp_path_factory.mktemp("teacher")
    argv = [
        "train",
        "--labelled",
        train_json,
        "--images",
        images,
        "--out",
        out,
        "--config",
        "demo",
        "--quiet",
        *TINY,
    ]
    assert main([str(a) for a in argv]) == 0
    return out / "last.pt"


def fails(capsys, argv: list, *fragments: str) -> str:
    """Run the CLI; assert status 2 and one stderr line 'error: ...' holding every fragment."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line:\n{err}"
    for fragment in fragments:
        assert str(fragment) in err, f"{fragment!r} not in {err!r}"
    return err


def _image_paths(json_path: Path, images: Path) -> list[Path]:
    return [images / im["file_name"] for im in json.loads(json_path.read_text())["images"]]


def _train_argv(train_json: Path, images: Path, out: Path, *extra) -> list:
    return [
        "train",
        "--labelled",
        train_json,
        "--images",
        images,
        "--out",
        out,
        "--config",
        "demo",
        "--quiet",
        *TINY,
        *extra,
    ]


def _distill_argv(synth, out: Path, *extra) -> list:
    train_json, _, images = synth
    return [
        "distill",
        "--labelled",
        train_json,
        "--images",
        images,
        "--out",
        out,
        "--config",
        "demo",
        "--quiet",
        *TINY,
        *extra,
    ]


# ------------------------------------------------------------------------------------ split


def test_split_missing_annotations(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    fails(
        capsys,
        ["split", "--annotations", missing, "--fraction", "0.5", "--out", tmp_path / "s"],
        missing,
        "not found",
    )


def test_split_malformed_json_names_the_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    fails(
        capsys,
        ["split", "--annotations", bad, "--count", "1", "--out", tmp_path / "s"],
        bad,
        "malformed JSON",
        "line 3",
    )


def test_split_fraction_giving_no_images(capsys, synth, tmp_path):
    train_json = synth[0]
    fails(
        capsys,
        ["split", "--annotations", train_json, "--fraction", "0.01", "--out", tmp_path / "s"],
        train_json,
        "0.01",
        "0 labelled images",
    )
    assert not (tmp_path / "s").exists()


def test_split_over_another_split_needs_overwrite(capsys, synth, tmp_path):
    argv = ["split", "--annotations", synth[0], "--fraction", "0.5", "--out", tmp_path]
    assert main([str(a) for a in [*argv, "--seed", "0"]]) == 0
    first = (tmp_path / "labelled.json").read_text()
    assert main([str(a) for a in [*argv, "--seed", "0"]]) == 0  # the same split again: harmless
    fails(capsys, [*argv, "--seed", "1"], tmp_path / "labelled.json",
          "holds another split; pass --overwrite to replace it")
    assert (tmp_path / "labelled.json").read_text() == first
    assert main([str(a) for a in [*argv, "--seed", "1", "--overwrite"]]) == 0
    assert (tmp_path / "labelled.json").read_text() != first


def test_split_count_larger_than_images(capsys, synth, tmp_path):
    train_json = synth[0]
    fails(
        capsys,
        ["split", "--annotations", train_json, "--count", "10", "--out", tmp_path / "s"],
        train_json,
        "10",
        "4 images",
    )


# ------------------------------------------------------------------------------------- eval


def test_eval_malformed_results(capsys, synth, tmp_path):
    results = tmp_path / "results.json"
    results.write_text('[\n  {"image_id": 1 "score": 0.5}\n]\n')
    fails(
        capsys,
        ["eval", "--annotations", synth[1], "--predictions", results],
        results,
        "malformed JSON",
        "line 2",
    )


def test_eval_of_a_file_without_images_names_it(capsys, synth, tmp_path, teacher):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": json.loads(
        synth[1].read_text())["categories"]}))
    results = tmp_path / "results.json"
    results.write_text("[]")
    for source in (["--predictions", results], ["--weights", teacher, "--images", synth[2]]):
        fails(capsys, ["eval", "--annotations", empty, *source],
              f"{empty}: lists no images, so there is nothing to evaluate")


@pytest.mark.parametrize("key", ["image_id", "category_id"])
def test_eval_result_with_unknown_id(capsys, synth, tmp_path, key):
    val = json.loads(synth[1].read_text())
    image = val["images"][0]
    mask = np.zeros((image["height"], image["width"]), dtype=np.uint8)
    mask[2:6, 2:6] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    result = {
        "image_id": image["id"],
        "category_id": val["categories"][0]["id"],
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
        "score": 0.9,
    }
    result[key] = 999
    results = tmp_path / "results.json"
    results.write_text(json.dumps([result]))
    fails(capsys, ["eval", "--annotations", synth[1], "--predictions", results], results, key, "999")


# ------------------------------------------------------------------------------------ train


@pytest.mark.parametrize("workers", WORKERS)
def test_train_missing_image(capsys, tmp_path, workers):
    # Surfaces when the first batch is read (no start-up check of the labelled files).
    train_json, _, images = _dataset(tmp_path / "d")
    missing = _image_paths(train_json, images)[1]
    missing.unlink()
    fails(
        capsys,
        _train_argv(train_json, images, tmp_path / "run", *ALL_IN_ONE_BATCH, f"data.num_workers={workers}"),
        missing,
        "not found",
    )


@pytest.mark.parametrize("workers", WORKERS)
def test_train_corrupt_image(capsys, tmp_path, workers):
    train_json, _, images = _dataset(tmp_path / "d")
    corrupt = _image_paths(train_json, images)[2]
    corrupt.write_bytes(b"\x89PNG garbage" * 8)
    fails(
        capsys,
        _train_argv(train_json, images, tmp_path / "run", *ALL_IN_ONE_BATCH, f"data.num_workers={workers}"),
        corrupt,
        "cannot read image",
    )


def test_train_truncated_image(capsys, tmp_path):
    train_json, _, images = _dataset(tmp_path / "d")
    truncated = _image_paths(train_json, images)[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    # lr_steps within the run: no schedule warning before the error line
    argv = _train_argv(train_json, images, tmp_path / "run", *ALL_IN_ONE_BATCH, "solver.max_iters=2",
                       "solver.lr_steps=[1]")
    fails(capsys, argv, truncated, "truncated")


def test_train_image_size_differs_from_json(capsys, tmp_path):
    train_json, _, images = _dataset(tmp_path / "d")
    resized = _image_paths(train_json, images)[3]
    Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8)).save(resized)
    fails(
        capsys,
        _train_argv(train_json, images, tmp_path / "run", *ALL_IN_ONE_BATCH),
        resized,
        "32x48",
        "64x64",
    )


def test_train_labelled_set_without_instances(capsys, synth, tmp_path):
    train_json, _, images = synth
    data = json.loads(train_json.read_text())
    for ann in data["annotations"]:
        ann["iscrowd"] = 1
    crowd_only = tmp_path / "crowd.json"
    crowd_only.write_text(json.dumps(data))
    fails(capsys, _train_argv(crowd_only, images, tmp_path / "run"), crowd_only, "nothing to train on")


def test_labelled_images_without_instances_are_left_out_and_counted(synth, tmp_path):
    from gdistill.data.coco import load_coco
    from gdistill.engine.trainer import trainable_images

    train_json, _, _ = synth
    data = json.loads(train_json.read_text())
    first, second = data["images"][0]["id"], data["images"][1]["id"]
    for ann in data["annotations"]:
        if ann["image_id"] == first:
            ann["iscrowd"] = 1
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != second]
    path = tmp_path / "some_empty.json"
    path.write_text(json.dumps(data))
    dataset = load_coco(path)
    crowd = sum(1 for a in data["annotations"] if a.get("iscrowd"))
    with pytest.warns(UserWarning) as record:
        kept = trainable_images(dataset)
    assert [str(w.message) for w in record] == [
        f"{path}: {crowd} of {len(data['annotations'])} annotations are crowd regions (iscrowd=1) and "
        "are not trained on (as in detectron2, their pixels count as background)",
        f"{path}: 2 of {len(data['images'])} labelled images have no non-crowd annotation and are not "
        "trained on",
    ]
    assert crowd > 0
    assert [img.id for img in kept.images] == [img["id"] for img in data["images"][2:]]
    assert kept.class_names == dataset.class_names and kept.path == dataset.path
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("workers", WORKERS)
def test_train_missing_val_image(capsys, tmp_path, workers):
    # Surfaces at the first evaluation, i.e. only after training (here at the final evaluation).
    train_json, val_json, images = _dataset(tmp_path / "d")
    missing = _image_paths(val_json, images)[0]
    missing.unlink()
    fails(
        capsys,
        _train_argv(train_json, images, tmp_path / "run", "--val", val_json, f"data.num_workers={workers}"),
        missing,
        "not found",
    )


def test_train_unknown_config_key(capsys, synth, tmp_path):
    train_json, _, images = synth
    fails(
        capsys,
        _train_argv(train_json, images, tmp_path / "run", "solver.max_iter=2"),
        "'solver.max_iter'",
        "did you mean solver.max_iters",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("solver.lr=nan", "'solver.lr' must be finite"),
        ("log_period=0", "'log_period' must be >= 1"),
        ("distill.score_threshold=2", "'distill.score_threshold' must be in [0, 1)"),
        ("device=banana", "'device' must be one of auto, cpu, cuda, cuda:N, got 'banana'"),
    ],
)
def test_train_config_value_that_cannot_work(capsys, synth, tmp_path, override, fragment):
    train_json, _, images = synth
    fails(capsys, _train_argv(train_json, images, tmp_path / "run", override), "config key", fragment)
    assert not (tmp_path / "run").exists()


def test_predict_device_flag_that_is_not_a_device(capsys, synth, teacher, tmp_path):
    out = tmp_path / "p"
    argv = ["predict", "--weights", teacher, "--input", synth[2], "--out", out, "--device", "banana"]
    err = fails(capsys, argv, "device 'banana' is not one of auto, cpu, cuda, cuda:N")
    assert "config key" not in err


def test_train_unknown_backbone(capsys, synth, tmp_path):
    train_json, _, images = synth
    fails(
        capsys,
        _train_argv(train_json, images, tmp_path / "run", "model.backbone=not_a_model"),
        "model.backbone",
        "not_a_model",
    )


def test_train_config_file_missing(capsys, synth, tmp_path):
    train_json, _, images = synth
    missing = tmp_path / "nope.yaml"
    argv = [
        "train",
        "--labelled",
        train_json,
        "--images",
        images,
        "--out",
        tmp_path / "run",
        "--config",
        missing,
        "--quiet",
    ]
    fails(capsys, argv, missing, "not found")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("solver:\n  max_iters: lots\n", ["solver.max_iters", "int", "lots"]),
        ("solver: [1, 2]\n", ["'solver'", "section"]),
        ("solver:\n  max_iters: [1\n", ["malformed YAML"]),
        ("- solver\n", ["mapping"]),
        ("solver:\n  lr: 0.1\n  lr: 0.2\n", ["duplicate key 'lr'", "line 3"]),
        ("solver:\n  lr: 0.1\n".encode("utf-16"), ["not UTF-8"]),
    ],
    ids=["wrong-type", "section-as-list", "malformed", "top-level-list", "duplicate-key", "utf-16"],
)
def test_train_bad_yaml(capsys, synth, tmp_path, text, fragments):
    train_json, _, images = synth
    config = tmp_path / "config.yaml"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    argv = [
        "train",
        "--labelled",
        train_json,
        "--images",
        images,
        "--out",
        tmp_path / "run",
        "--config",
        config,
        "--quiet",
    ]
    fails(capsys, argv, config, *fragments)


# ---------------------------------------------------------------------------------- distill


def test_distill_needs_a_teacher(capsys, synth, tmp_path):
    fails(capsys, _distill_argv(synth, tmp_path / "run", "--unlabelled", synth[2]), "--teacher")


def test_distill_teacher_missing(capsys, synth, tmp_path):
    missing = tmp_path / "nope.pt"
    fails(
        capsys,
        _distill_argv(synth, tmp_path / "run", "--unlabelled", synth[0], "--teacher", missing),
        missing,
        "checkpoint not found",
    )


def test_distill_teacher_truncated(capsys, synth, teacher, tmp_path):
    truncated = tmp_path / "half.pt"
    data = teacher.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    fails(
        capsys,
        _distill_argv(synth, tmp_path / "run", "--unlabelled", synth[0], "--teacher", truncated),
        truncated,
        "truncated",
    )


def test_distill_teacher_not_a_gdistill_checkpoint(capsys, synth, tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    fails(
        capsys,
        _distill_argv(synth, tmp_path / "run", "--unlabelled", synth[0], "--teacher", foreign),
        foreign,
        "not a gdistill checkpoint",
    )


def _first_class_renamed(train_json: Path, tmp_path: Path) -> Path:
    """A copy of the labelled JSON whose first category is called "renamed"."""
    raw = json.loads(train_json.read_text())
    raw["categories"][0]["name"] = "renamed"
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(raw))
    return renamed


def test_distill_teacher_classes_differ(capsys, synth, teacher, tmp_path):
    train_json, _, images = synth
    renamed = _first_class_renamed(train_json, tmp_path)
    argv = [
        "distill",
        "--labelled",
        renamed,
        "--unlabelled",
        train_json,
        "--images",
        images,
        "--out",
        tmp_path / "run",
        "--teacher",
        teacher,
        "--config",
        "demo",
        "--quiet",
        *TINY,
    ]
    fails(capsys, argv, teacher, "classes", "renamed")


def test_train_init_weights_missing(capsys, synth, tmp_path):
    train_json, _, images = synth
    missing = tmp_path / "nope.pt"
    argv = _train_argv(train_json, images, tmp_path / "run", "--init-weights", missing)
    fails(capsys, argv, missing, "checkpoint not found")


def test_train_init_weights_with_other_classes(capsys, synth, teacher, tmp_path):
    train_json, _, images = synth
    renamed = _first_class_renamed(train_json, tmp_path)
    argv = _train_argv(renamed, images, tmp_path / "run", "--init-weights", teacher)
    fails(capsys, argv, teacher, "classes", "renamed")


def test_train_init_weights_fine_tunes_the_checkpoint(synth, teacher, tmp_path):
    train_json, _, images = synth
    out = tmp_path / "run"
    # lr ~ 0: the fine-tuned model must still be the checkpoint's, weight for weight.
    argv = _train_argv(train_json, images, out, "--init-weights", teacher, "solver.lr=1e-12")
    assert main([str(a) for a in argv]) == 0
    start = torch.load(teacher, map_location="cpu", weights_only=False)["model"]
    after = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert start.keys() == after.keys()
    moved = [k for k in start if start[k].is_floating_point() and "running" not in k
             and not torch.allclose(start[k], after[k], atol=1e-6)]
    assert moved == []
    assert json.loads((out / "run.json").read_text())["init_weights"] == str(teacher)


def test_distill_empty_unlabelled_folder(capsys, synth, teacher, tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    fails(
        capsys,
        _distill_argv(synth, tmp_path / "run", "--unlabelled", empty, "--teacher", teacher),
        empty,
        "no images",
    )


def test_distill_unlabelled_folder_does_not_exist(capsys, synth, teacher, tmp_path):
    missing = tmp_path / "nowhere"
    fails(
        capsys,
        _distill_argv(synth, tmp_path / "run", "--unlabelled", missing, "--teacher", teacher),
        missing,
        "does not exist",
    )


def test_distill_unlabelled_json_with_missing_image(capsys, teacher, tmp_path):
    data = _dataset(tmp_path / "d")
    train_json, _, images = data
    missing = _image_paths(train_json, images)[0]
    missing.unlink()
    # The labelled set is the val split (intact); the unlabelled JSON's images are checked up front.
    argv = [
        "distill",
        "--labelled",
        data[1],
        "--unlabelled",
        train_json,
        "--images",
        images,
        "--out",
        tmp_path / "run",
        "--teacher",
        teacher,
        "--config",
        "demo",
        "--quiet",
        *TINY,
    ]
    fails(capsys, argv, train_json, missing, "not found")


@pytest.mark.parametrize("workers", WORKERS)
def test_distill_corrupt_unlabelled_image(capsys, synth, teacher, tmp_path, workers):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    corrupt = folder / "a.png"
    corrupt.write_bytes(b"not an image")
    argv = _distill_argv(
        synth,
        tmp_path / "run",
        "--unlabelled",
        folder,
        "--teacher",
        teacher,
        "distill.burn_in=none",
        "distill.student_init=teacher",
        f"data.num_workers={workers}",
    )
    fails(capsys, argv, corrupt, "cannot read image")


def test_distill_without_burn_in_starts_the_student_from_the_teacher(capsys, synth, teacher,
                                                                     tmp_path):
    import yaml

    run = tmp_path / "run"
    argv = _distill_argv(synth, run, "--unlabelled", synth[0], "--teacher", teacher,
                         "--burn-in", "none", "solver.max_iters=1")
    assert main([str(a) for a in argv]) == 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())["distill"]
    assert (resolved["burn_in"], resolved["student_init"]) == ("none", "teacher")
    # a fresh student without burn-in would replace the trained teacher at step 0
    argv = _distill_argv(synth, tmp_path / "r2", "--unlabelled", synth[0], "--teacher", teacher,
                         "--burn-in", "none", "distill.student_init=pretrained")
    fails(capsys, argv, "distill.burn_in=none", "set distill.student_init=teacher")
    argv = _distill_argv(synth, tmp_path / "r3", "--unlabelled", synth[0], "--teacher", teacher,
                         "distill.burnin_iters=0", "distill.student_init=pretrained")
    fails(capsys, argv, "distill.burnin_iters=0 hands the teacher over", "student_init=teacher")


def test_train_init_weights_without_config_starts_from_the_checkpoints_config(capsys, synth,
                                                                             teacher, tmp_path):
    """Fine-tuning a 64-px model trains at 64 px with its batch, not at the COCO defaults."""
    import yaml

    train_json, _, images = synth
    run = tmp_path / "run"
    argv = ["train", "--labelled", train_json, "--images", images, "--out", run, "--quiet",
            "--init-weights", teacher, "solver.max_iters=1"]
    assert main([str(a) for a in argv]) == 0
    assert f"train: no --config, starting from the config of {teacher}" in capsys.readouterr().err
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["image_size"] == 64 and resolved["data"]["batch_size"] == 2
    assert resolved["model"]["hidden_dim"] == 32 and resolved["solver"]["max_iters"] == 1


def test_a_relative_backbone_weights_path_is_stored_resolved(synth, tmp_path, monkeypatch):
    """The run's config names the file wherever a later run (distill from this teacher) starts."""
    import timm
    import yaml

    train_json, _, images = synth
    monkeypatch.chdir(tmp_path)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    run = tmp_path / "run"
    argv = _train_argv(train_json, images, run, "--backbone-weights", "r18.pth",
                       "model.backbone=resnet18", "solver.max_iters=1", "eval_period=0")
    assert main([str(a) for a in argv]) == 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["backbone_weights"] == str(tmp_path / "r18.pth")


def test_split_skip_invalid_annotations_lists_what_it_drops(capsys, tmp_path):
    train_json, _ = generate_synthetic(tmp_path / "d", 4, 1, image_size=64, progress=False)
    raw = json.loads(train_json.read_text())
    bad_id = raw["annotations"][0]["id"]
    raw["annotations"][0]["segmentation"] = [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]  # zero-area polygon
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    args = ["split", "--annotations", str(bad), "--count", "2", "--out", str(tmp_path / "s")]
    assert main(args) == 2
    assert "bad.json" in capsys.readouterr().err
    assert main([*args, "--skip-invalid-annotations"]) == 0
    err = capsys.readouterr().err
    assert "skipped invalid annotation" in err and str(bad_id) in err
    labelled = json.loads((tmp_path / "s" / "labelled.json").read_text())
    assert bad_id not in {a["id"] for a in labelled["annotations"]}


@pytest.mark.parametrize("argv", [
    ["synth", "--out", "{file}/sub"],
    ["predict", "--weights", "w.pt", "--input", "x.png", "--out", "{file}"],
    ["train", "--labelled", "t.json", "--images", "i", "--out", "{file}"],
    ["export", "--weights", "w.pt", "--format", "onnx", "--out", "{file}/m.onnx"],
    ["eval", "--annotations", "a.json", "--predictions", "r.json", "--out", "{file}/m.json"],
])
def test_out_under_a_file_is_one_line(capsys, tmp_path, argv):
    (tmp_path / "taken").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "taken")) for a in argv]
    fails(capsys, argv, "cannot write there", "taken is a file, not a folder")


def test_file_out_that_is_a_folder_is_one_line(capsys, tmp_path):
    fails(capsys, ["export", "--weights", "w.pt", "--format", "onnx", "--out", tmp_path],
          tmp_path, "is a folder; --out takes a file name")


def test_every_command_help_renders_its_text_as_written():
    """argparse formats argument help with %, not descriptions: a literal '%%' there shows as is."""
    import argparse

    from gdistill.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        text = command.format_help()
        assert "%%" not in text, name
    assert "labels 10 % of it" in sub.choices["demo"].format_help().replace("\n", " ").replace("  ", " ")


def test_final_line_is_printed_by_the_first_process_only(capsys, monkeypatch):
    from gdistill import cli
    from gdistill.engine import distributed

    cli._print_final({"student_AP": 1.0, "best_AP": 2.0}, Path("run"))
    assert capsys.readouterr().out == "final mask AP 1.00 (best 2.00)\noutputs in run\n"
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    cli._print_final({"student_AP": 1.0, "best_AP": 2.0}, Path("run"))
    assert capsys.readouterr().out == ""


def test_under_torchrun_errors_name_their_process_and_a_stop_is_said_once(capsys, tmp_path,
                                                                          monkeypatch):
    import gdistill.cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["eval", "--annotations", str(tmp_path / "missing.json"), "--predictions",
                 str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("process 1: error: ") and err.count("\n") == 1

    def stopped(args):
        raise TrainingStopped("SIGTERM: stopped after iteration 3 of 9; ...", signal.SIGTERM)

    monkeypatch.setitem(gdistill.cli.COMMANDS, "synth", stopped)
    assert main(["synth", "--out", str(tmp_path / "d")]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == ""  # the first process says it
    monkeypatch.setenv("RANK", "0")
    assert main(["synth", "--out", str(tmp_path / "d")]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "SIGTERM: stopped after iteration 3 of 9; ...\n"


def test_train_into_a_run_folder_needs_resume_or_overwrite(capsys, synth, teacher, tmp_path):
    train_json, _, images = synth
    fails(capsys, _train_argv(train_json, images, teacher.parent), teacher.parent,
          "holds a run (last.pt)", "--resume", "--overwrite")
    fails(capsys, _train_argv(train_json, images, teacher.parent, "--resume", "--overwrite"),
          "--resume and --overwrite exclude each other")
    earlier = tmp_path / "run"
    (earlier / "pictures").mkdir(parents=True)
    (earlier / "metrics.csv").write_text("step,loss\n1,99\n")
    # stopped before its first checkpoint: --resume cannot help, so it is not offered
    fails(capsys, _train_argv(train_json, images, earlier), earlier,
          "holds a run (metrics.csv) with no last.pt to resume from; pass --overwrite to start "
          "afresh there, or another --out")
    for stale in ("best.pt", "last.prev.pt", "pictures/val_000099.png"):
        (earlier / stale).write_text("from the earlier run")
    (earlier / "notes.txt").write_text("the user's")
    assert main([str(a) for a in _train_argv(train_json, images, earlier, "--overwrite")]) == 0
    assert (earlier / "last.pt").is_file()
    assert "1,99" not in (earlier / "metrics.csv").read_text().splitlines()
    # nothing of the earlier run is left to be evaluated or resumed; other files stay
    best = torch.load(earlier / "best.pt", map_location="cpu", weights_only=False)
    assert best["step"] == 1
    assert not (earlier / "last.prev.pt").exists() and not (earlier / "pictures" / "val_000099.png").exists()
    assert (earlier / "notes.txt").read_text() == "the user's"


def test_resume_checks_the_run_kind_and_its_classes(capsys, synth, teacher, tmp_path):
    train_json, val_json, images = synth
    run = tmp_path / "run"
    assert main([str(a) for a in _train_argv(train_json, images, run, "--val", val_json)]) == 0
    fails(capsys, _distill_argv(synth, run, "--unlabelled", train_json, "--resume"),
          run, "holds a stage-A run", "gdistill train --resume")
    renamed = _first_class_renamed(train_json, tmp_path)
    fails(capsys, _train_argv(renamed, images, run, "--resume"), "last.pt", "classes", "renamed")
    with pytest.warns(UserWarning, match="resumed without --val, it is not evaluated again"):
        assert main([str(a) for a in _train_argv(train_json, images, run, "--resume")]) == 0


def test_a_new_run_refuses_to_clear_its_own_teacher(capsys, synth, teacher, tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(teacher, run / "last.pt")
    argv = _distill_argv(synth, run, "--unlabelled", synth[0], "--teacher", run / "last.pt", "--overwrite")
    fails(capsys, argv, "last.pt: lies in the run folder", "choose another --out")
    assert (run / "last.pt").is_file()


def test_warnings_are_one_line_on_the_command_line(capsys):
    from gdistill import cli

    line = cli._warning_line(UserWarning("a.json: 3 of 10 labelled\n  images"), UserWarning, "x.py", 7)
    assert line == "warning: a.json: 3 of 10 labelled images\n"
    before = warnings.formatwarning
    assert main(["split", "--annotations", "missing.json", "--fraction", "0.5", "--out", "x"]) == 2
    assert warnings.formatwarning is before  # restored for whoever called main()


def _with_invalid_annotation(json_path: Path, out: Path) -> tuple[Path, int]:
    """A copy of a COCO file whose first annotation is a 2-point polygon; returns (copy, its id)."""
    raw = json.loads(json_path.read_text())
    raw["annotations"][0]["segmentation"] = [[10.0, 10.0, 20.0, 10.0]]
    out.write_text(json.dumps(raw))
    return out, raw["annotations"][0]["id"]


def test_eval_skip_invalid_annotations_scores_without_them(capsys, synth, tmp_path):
    _, val_json, _ = synth
    bad, bad_id = _with_invalid_annotation(val_json, tmp_path / "val_bad.json")
    # The valid ground truth as predictions: 100 AP only if the skipped annotation is not scored.
    raw = json.loads(bad.read_text())
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
         "score": 1.0}
        for a in raw["annotations"]
        if a["id"] != bad_id
    ]
    assert results and all(isinstance(r["segmentation"], dict) for r in results)  # synthetic: RLE
    predictions = tmp_path / "results.json"
    predictions.write_text(json.dumps(results))
    argv = ["eval", "--annotations", bad, "--predictions", predictions, "--out", tmp_path / "m.json"]
    fails(capsys, argv, "val_bad.json", f"annotation {bad_id}", "--skip-invalid-annotations")
    assert main([str(a) for a in [*argv, "--skip-invalid-annotations"]]) == 0
    assert f"skipped invalid annotation: {bad}" in capsys.readouterr().err
    assert json.loads((tmp_path / "m.json").read_text())["AP"] == pytest.approx(100.0)


def test_train_evaluates_a_val_set_with_skipped_annotations(capsys, synth, tmp_path):
    train_json, val_json, images = synth
    bad, bad_id = _with_invalid_annotation(val_json, tmp_path / "val_bad.json")
    out = tmp_path / "run"
    argv = _train_argv(train_json, images, out, "--val", bad, "--skip-invalid-annotations")
    argv = [a for a in argv if a != "eval_period=0"] + ["eval_period=1"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert f"annotation {bad_id}" in capsys.readouterr().err
    header, row = (out / "eval.csv").read_text().splitlines()[:2]
    assert "student_AP" in header.split(",") and row


def test_report_on_a_folder_that_is_not_a_run(capsys, synth, teacher, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    fails(capsys, ["report", tmp_path], tmp_path, "not a run folder")
    # a folder of runs: the message names them
    fails(capsys, ["report", teacher.parent.parent], "runs inside it", teacher.parent.name)


def test_out_in_a_folder_that_is_not_writable(capsys, tmp_path, monkeypatch):
    import gdistill.cli

    # Root may write anywhere, so the refusal of the system (os.access) is simulated.
    monkeypatch.setattr(gdistill.cli.os, "access", lambda path, mode: Path(path) != tmp_path)
    fails(capsys, ["synth", "--out", tmp_path / "data"], tmp_path / "data", f"{tmp_path} is not writable")


def test_system_refusal_mid_command_is_one_line(capsys, tmp_path, monkeypatch):
    import gdistill.cli

    def full_disk(args):
        raise OSError(28, "No space left on device", str(tmp_path / "last.pt.tmp"))

    monkeypatch.setitem(gdistill.cli.COMMANDS, "synth", full_disk)
    fails(capsys, ["synth", "--out", tmp_path / "d"], "last.pt.tmp: No space left on device")

    def full_disk_in_a_picture(args):
        args.out.mkdir()
        raise OSError(28, "No space left on device")  # matplotlib / PIL write through a file object

    monkeypatch.setitem(gdistill.cli.COMMANDS, "synth", full_disk_in_a_picture)
    err = fails(capsys, ["synth", "--out", tmp_path / "e"],
                f"error: {tmp_path / 'e'}: No space left on device while writing the outputs there; ")
    assert err.rstrip().endswith("MiB free there")


def test_distill_names_the_model_keys_it_ignores(capsys, synth, teacher, tmp_path):
    """The student is built as the teacher: a given model.* value that differs is not silently
    dropped; the ones that match (all of TINY and the demo preset here) are not listed."""
    train_json = synth[0]
    argv = _distill_argv(synth, tmp_path / "run", "--unlabelled", train_json, "--teacher", teacher,
                         "model.hidden_dim=64", "model.frozen_stages=1")
    with pytest.warns(UserWarning) as record:
        assert main([str(a) for a in argv]) == 0
    warned = [str(w.message) for w in record if "ignored" in str(w.message)]
    assert warned == [
        f"{teacher}: the model is built as the teacher's; ignored: model.hidden_dim=64 (teacher: 32)"
    ]


def test_distill_without_config_starts_from_the_teacher_runs_config(capsys, synth, teacher, tmp_path):
    """`train --config demo ...` then `distill --teacher ...`: the student trains at the teacher's
    sizes (64 px here), not at the paper defaults' 1024; a bare --resume warns about nothing."""
    import yaml

    train_json, _, images = synth
    run = tmp_path / "run"
    argv = ["distill", "--labelled", train_json, "--images", images, "--unlabelled", train_json,
            "--teacher", teacher, "--out", run, "--quiet", "solver.max_iters=2"]
    assert main([str(a) for a in argv]) == 0
    assert f"distill: no --config, starting from the config of {teacher}" in capsys.readouterr().err
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["image_size"] == 64 and resolved["threads"] == 1
    assert resolved["solver"]["max_iters"] == 2 and resolved["distill"]["unsup_weight"] == 0.5  # demo's
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["teacher_checkpoint"] == str(Path(teacher).resolve())
    assert recorded["unlabelled"] == str(Path(train_json).resolve())
    assert recorded["unlabelled_root"] == str(Path(images).resolve())
    resume = ["distill", "--labelled", train_json, "--images", images, "--unlabelled", train_json,
              "--out", run, "--quiet", "--resume"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([str(a) for a in resume]) == 0
    assert not [w for w in caught if "ignored" in str(w.message)]  # nothing was given
    assert "the run has finished (iteration 2 of 2)" in capsys.readouterr().err


def test_distill_without_config_leaves_the_teachers_stage_a_average_off(capsys, synth, teacher, tmp_path):
    """A teacher trained with solver.ema_decay > 0: its config is the base, without the stage-A
    moving average (refused in distillation, whose teacher is its own EMA)."""
    import yaml

    from gdistill.engine.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(teacher)
    payload["config"]["solver"].update(ema_decay=0.9, ema_start=1)
    with_ema = tmp_path / "teacher_with_ema.pt"
    save_checkpoint(payload, with_ema)
    train_json, _, images = synth
    run = tmp_path / "run"
    argv = ["distill", "--labelled", train_json, "--images", images, "--unlabelled", train_json,
            "--teacher", with_ema, "--out", run, "--quiet"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["solver"]["ema_decay"] == 0.0


@pytest.mark.parametrize("argv, fragments", [
    (["export", "--weights", "w.pt", "--out", "{tmp}/m.onnx", "--opset", "99"],
     ["ONNX opset must be from 16", "got 99"]),
    (["export", "--weights", "w.pt", "--out", "{tmp}/m.onnx", "--opset", "15"], ["got 15"]),
    (["report", "{tmp}", "--num-images", "0"], ["--num-images must be at least 1, got 0"]),
    (["predict", "--weights", "w.pt", "--input", "x", "--out", "{tmp}/p", "--threads", "-1"],
     ["--threads must be >= 0, got -1"]),
    (["eval", "--weights", "w.pt", "--annotations", "a.json", "--threads", "-2"],
     ["--threads must be >= 0, got -2"]),
])
def test_out_of_range_flags_stop_before_any_work(capsys, tmp_path, argv, fragments):
    fails(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], *fragments)


def test_a_closed_output_pipe_ends_quietly(synth, tmp_path):
    """`gdistill eval ... | head`: the reader goes away; no error line, no traceback."""
    import subprocess
    import sys

    _, val_json, _ = synth
    raw = json.loads(val_json.read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"],
                "segmentation": a["segmentation"], "score": 1.0} for a in raw["annotations"]]
    predictions = tmp_path / "results.json"
    predictions.write_text(json.dumps(results))
    cmd = [sys.executable, "-m", "gdistill", "eval", "--annotations", str(val_json),
           "--predictions", str(predictions)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command has written anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_threads_flag_sets_torchs_cpu_threads_only_when_given(monkeypatch):
    import torch

    from gdistill.cli import _set_threads

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    _set_threads(0)
    _set_threads(3)
    assert calls == [3]


CPU_OUT_OF_MEMORY = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                     "memory: you tried to allocate 95420006400 bytes.")


def test_out_of_memory_is_one_line_with_what_to_lower(capsys, synth, teacher, tmp_path, monkeypatch):
    from gdistill.model.backbone import TimmBackbone

    def no_memory(self, x):
        raise RuntimeError(CPU_OUT_OF_MEMORY)

    monkeypatch.setattr(TimmBackbone, "forward", no_memory)
    argv = ["predict", "--weights", str(teacher), "--input", str(synth[2]), "--out",
            str(tmp_path / "p"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    advice = "lower --batch-size (1 reads one image at a time)"
    assert err == f"error: out of memory ({CPU_OUT_OF_MEMORY}); {advice}"
    train_json, val_json, images = synth
    argv = ["train", "--labelled", str(train_json), "--images", str(images), "--out",
            str(tmp_path / "t"), "--config", "demo", "--quiet", *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: out of memory (") and "lower data.batch_size" in err[-1]


def test_errors_that_are_not_out_of_memory_keep_their_traceback(synth, teacher, tmp_path, monkeypatch):
    from gdistill.model.backbone import TimmBackbone

    def broken(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(TimmBackbone, "forward", broken)
    argv = ["predict", "--weights", str(teacher), "--input", str(synth[2]), "--out",
            str(tmp_path / "p"), "--quiet"]
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        main(argv)
