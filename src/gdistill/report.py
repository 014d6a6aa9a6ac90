"""``gdistill report``: pictures and a Markdown summary of a run folder.

Reads what the trainer writes (``run.json``, ``config.yaml``, ``metrics.csv``, ``eval.csv``,
``best.pt`` / ``last.pt``) and writes into ``RUN/report`` (or another folder):

- the training curves of :func:`gdistill.viz.plot_training_curves`;
- ``predictions.png``: ground truth | prediction of ``best.pt`` on the first validation images
  (when a validation set and its image folder are known);
- ``pseudo_label_views.png``: weak view | strong view | pseudo-labels of the run's teacher (stage B)
  or of its model (stage A, the future teacher) on unlabelled images, when asked for;
- ``summary.md`` linking them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from gdistill.config import Config, config_from_dict, load_config
from gdistill.distill.pseudo_labels import SIZE_RANGES
from gdistill.engine.checkpoint import RUN_FILES, load_checkpoint
from gdistill.engine.evaluate import validation_picture
from gdistill.engine.run_info import read_run_info
from gdistill.errors import GdistillError
from gdistill.viz import (
    model_names,
    plot_training_curves,
    read_csv_columns,
    save_pseudo_label_grid,
    to_floats,
)

STAGE_NAMES = {
    "teacher": "A (teacher trained on labelled images)",
    "distill": "B (guided distillation of a student)",
}


def _recorded_path(value, run_dir: Path) -> Path | None:
    """A path from run.json. A relative one was relative to where training ran, usually the
    run folder's parent; as is when it exists here, else tried there."""
    if not value:
        return None
    path = Path(value)
    if path.is_absolute() or path.exists() or not (run_dir.parent / path).exists():
        return path
    return run_dir.parent / path


def _checkpoint(run_dir: Path) -> Path | None:
    for name in ("best.pt", "last.pt"):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def _last_finite(columns: dict[str, list[str]], key: str) -> tuple[float, int] | None:
    """(value, step) of the last row where ``key`` is a number."""
    if key not in columns:
        return None
    values, steps = to_floats(columns.get(key, [])), to_floats(columns.get("step", []))
    for v, s in zip(values[::-1], steps[::-1], strict=True):
        if math.isfinite(v):
            return float(v), int(s) if math.isfinite(s) else -1
    return None


def _best(columns: dict[str, list[str]], key: str) -> tuple[float, int] | None:
    if key not in columns:
        return None
    values, steps = to_floats(columns.get(key, [])), to_floats(columns.get("step", []))
    finite = [(v, s) for v, s in zip(values, steps, strict=True) if math.isfinite(v)]
    if not finite:
        return None
    v, s = max(finite, key=lambda vs: vs[0])
    return float(v), int(s) if math.isfinite(s) else -1


def prediction_picture(
    weights: Path, val_json: Path, images_dir: Path, out: Path, device: str, count: int = 8
) -> Path:
    """Ground truth | predictions of a checkpoint's student on the first ``count`` images of a
    COCO file."""
    from gdistill.data.coco import load_coco
    from gdistill.inference import load_model

    # A training run may have skipped invalid annotations (--skip-invalid-annotations); the
    # picture draws the valid ones (load_coco warns how many it left out).
    dataset = load_coco(val_json, drop_invalid=True)
    predictor = load_model(weights, "student", device)
    if predictor.class_names != dataset.class_names:
        raise GdistillError(
            f"{val_json}: classes {dataset.class_names} differ from the checkpoint's "
            f"{predictor.class_names} ({weights})"
        )
    data = predictor.cfg.data
    return validation_picture(
        predictor.model,
        dataset,
        images_dir,
        out,
        predictor.device,
        data.test_short_side,
        data.test_max_side,
        count,
    )


@torch.no_grad()
def pseudo_label_picture(
    weights: Path,
    stage: str,
    unlabelled: Path,
    unlabelled_images: Path | None,
    out: Path,
    device: str,
    count: int = 4,
) -> Path:
    """The first ``count`` unlabelled images through the training augmentation and the
    pseudo-label filter of the run's config."""
    from gdistill.data.augment import UnlabelledAugment
    from gdistill.data.loader import UnlabelledDataset, collate_unlabelled
    from gdistill.data.sources import open_unlabelled
    from gdistill.distill.pseudo_labels import pseudo_labels_from_teacher
    from gdistill.inference import load_model
    from gdistill.model.mask2former import images_to_model_input

    predictor = load_model(weights, "teacher" if stage == "distill" else "student", device)
    cfg = predictor.cfg
    items = open_unlabelled(unlabelled, unlabelled_images)[:count]
    dataset = UnlabelledDataset(
        items,
        UnlabelledAugment(cfg.data.image_size, cfg.data.scale_range, pad_value=cfg.data.pad_value),
        cfg.seed,
    )
    batch = collate_unlabelled([dataset[i] for i in range(len(items))], pad_value=cfg.data.pad_value)
    outputs = predictor.model(images_to_model_input(batch["weak"].to(predictor.device)))
    d = cfg.distill
    targets, _ = pseudo_labels_from_teacher(
        outputs["pred_logits"],
        outputs["pred_masks"],
        d.score_threshold,
        d.min_mask_area,
        d.mask_threshold,
        batch["valid"].to(predictor.device),
        d.duplicate_iou,
    )
    targets = [{k: v.cpu() for k, v in t.items()} for t in targets]
    return save_pseudo_label_grid(
        out, batch["weak"], batch["strong"], targets, predictor.class_names
    )


def _summary(
    run_dir: Path,
    out_dir: Path,
    info: dict,
    cfg: Config | None,
    pictures: list[Path],
    notes: list[str],
) -> str:
    metrics = read_csv_columns(run_dir / "metrics.csv")
    evals = read_csv_columns(run_dir / "eval.csv")
    stage = info.get("stage")
    rows: list[tuple[str, str]] = []
    if stage:
        rows.append(("stage", STAGE_NAMES.get(stage, str(stage))))
    classes = info.get("classes")
    if classes:
        rows.append(("classes", f"{len(classes)}: {', '.join(map(str, classes))}"))
    last_step = _last_finite(metrics, "step")
    if last_step is not None or cfg is not None:
        done = f"{int(last_step[0])}" if last_step else "?"
        rows.append(("iterations", done + (f" of {cfg.solver.max_iters}" if cfg else "")))
    for key, label in (
        ("labelled_images", "labelled images"),
        ("unlabelled_images", "unlabelled images"),
    ):
        if info.get(key):
            rows.append((label, str(info[key])))
    if info.get("unlabelled"):
        rows.append(("unlabelled source", f"`{info['unlabelled']}`"))
    if info.get("teacher_checkpoint"):
        rows.append(("teacher checkpoint", f"`{info['teacher_checkpoint']}`"))
    names = model_names(stage_b=stage == "distill" or "teacher_AP" in evals)
    best = _best(evals, "student_AP")
    if best:
        rows.append((f"best {names['student']} AP", f"{best[0]:.2f} (iteration {best[1]})"))
    for key, label in (("teacher_AP", "final teacher AP"), ("ema_AP", "final EMA model AP")):
        final = _last_finite(evals, key)
        if final:
            rows.append((label, f"{final[0]:.2f} (iteration {final[1]})"))
    if cfg is not None:
        t = cfg.distill.score_threshold
        who = "teacher" if any(k.startswith("teacher_pl_") for k in evals) else "student"
        precision = _last_finite(evals, f"{who}_pl_precision@{t:g}")
        recall = _last_finite(evals, f"{who}_pl_recall@{t:g}")
        if precision and recall:
            rows.append(
                (
                    f"pseudo-label precision / recall at score > {t:g}",
                    f"{precision[0]:.3f} / {recall[0]:.3f} ({names[who]}, iteration {precision[1]})",
                )
            )
        by_size = [
            (name, _last_finite(evals, f"{who}_pl_recall_{name}@{t:g}"))
            for name, _, _ in SIZE_RANGES
        ]
        if any(found for _, found in by_size):
            rows.append(
                (
                    f"pseudo-label recall by object size at score > {t:g}",
                    ", ".join(f"{name} {found[0]:.3f}" for name, found in by_size if found),
                )
            )
    lines = [f"# Run report: {run_dir.name}", ""]
    if rows:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows] + [""]
    else:
        lines += ["No run.json, config.yaml or eval.csv found.", ""]
    titles = {
        "losses.png": "Training losses",
        "ap.png": "Validation mask AP",
        "pseudo_labels.png": "Pseudo-labels per image",
        "pseudo_label_quality.png": "Pseudo-label precision and recall",
        "predictions.png": "Validation images: ground truth and predictions",
        "pseudo_label_views.png": "Unlabelled images: views and pseudo-labels",
    }
    for path in pictures:
        rel = path.relative_to(out_dir).as_posix() if path.is_relative_to(out_dir) else str(path)
        lines += [f"## {titles.get(path.name, path.stem)}", "", f"![{path.stem}]({rel})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A Markdown table cell: one line, ``|`` escaped (class names may hold either)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def write_report(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    val: str | Path | None = None,
    images: str | Path | None = None,
    unlabelled: str | Path | None = None,
    unlabelled_images: str | Path | None = None,
    device: str = "auto",
    num_images: int = 8,
) -> dict:
    """Write the report; returns ``{"summary": path, "pictures": [paths], "notes": [str]}``.
    ``val`` / ``images`` default to run.json's ``val`` / ``val_images``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        found = "is a file, not a run folder" if run_dir.exists() else "run folder not found"
        raise GdistillError(f"{run_dir}: {found}")
    if not any((run_dir / name).is_file() for name in RUN_FILES):
        runs = sorted(d.name for d in run_dir.iterdir() if d.is_dir() and (d / "run.json").is_file())
        hint = f" (runs inside it: {', '.join(runs[:5])})" if runs else ""
        raise GdistillError(
            f"{run_dir}: not a run folder of `gdistill train` / `distill` (no run.json, config.yaml, "
            "metrics.csv or checkpoint)"
            + hint
        )
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    info = read_run_info(run_dir)
    if unlabelled and not unlabelled_images and Path(unlabelled).suffix.lower() == ".json":
        # as distill: the image root of a JSON source defaults to the run's own
        unlabelled_images = _recorded_path(info.get("unlabelled_root"), run_dir) or _recorded_path(
            info.get("images"), run_dir
        )
        if not unlabelled_images:
            raise GdistillError(f"{unlabelled}: a COCO JSON unlabelled source needs --unlabelled-images")
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    pictures = plot_training_curves(run_dir, out)
    notes: list[str] = []
    weights = _checkpoint(run_dir)
    if cfg is None and weights is not None:
        cfg = config_from_dict(load_checkpoint(weights)["config"], str(weights))

    val = val or _recorded_path(info.get("val"), run_dir)
    images = images or _recorded_path(info.get("val_images"), run_dir)
    if val and not images:
        notes.append(f"no prediction picture: pass --images (the image folder of {val})")
    elif val and weights is None:
        notes.append(f"no prediction picture: {run_dir} has no best.pt or last.pt")
    elif val:
        pictures.append(
            prediction_picture(
                weights, Path(val), Path(images), out / "predictions.png", device, num_images
            )
        )
    if unlabelled:
        if weights is None:
            notes.append(f"no pseudo-label picture: {run_dir} has no best.pt or last.pt")
        else:
            stage = info.get("stage") or load_checkpoint(weights).get("stage", "teacher")
            pictures.append(
                pseudo_label_picture(
                    weights,
                    stage,
                    Path(unlabelled),
                    Path(unlabelled_images) if unlabelled_images else None,
                    out / "pseudo_label_views.png",
                    device,
                )
            )
    summary = out / "summary.md"
    summary.write_text(_summary(run_dir, out, info, cfg, pictures, notes))
    return {"summary": summary, "pictures": pictures, "notes": notes}
