"""A tiny run of the whole demo pipeline (the real budgets are measured, not tested)."""

import json

import pytest
from tiny_config import TINY as TINY_BASE

import gdistill.demo
from gdistill.cli import main
from gdistill.demo import ARMS, DemoTier, format_demo_table, guided_minus, run_demo
from gdistill.errors import GdistillError

TINY = [*TINY_BASE, "distill.score_threshold=0.0"]


def test_tiny_demo_writes_results_plot_and_pictures(tmp_path, capsys, monkeypatch):
    tier = DemoTier("tiny", train_images=10, val_images=3, fraction=0.4, teacher_iters=2,
                    student_iters=2, burnin_iters=1, eval_period=1, seeds=(0,), image_size=64)
    step1_guided = tmp_path / "guided_step1.pt"  # kept aside to fake an interruption below
    drop = gdistill.demo.drop_recovery_copy

    def keep_guided_step1(run_dir):
        if run_dir.name == "guided_burnin":
            (run_dir / "last.prev.pt").rename(step1_guided)
        drop(run_dir)

    monkeypatch.setattr(gdistill.demo, "drop_recovery_copy", keep_guided_step1)
    result = run_demo(tmp_path, overrides=TINY, progress=False, tier=tier)
    monkeypatch.setattr(gdistill.demo, "drop_recovery_copy", drop)
    # finished runs keep last.pt (what --resume looks for), not the recovery copy
    for run in ("teacher", *ARMS):
        assert (tmp_path / "seed0" / run / "last.pt").is_file()
        assert not (tmp_path / "seed0" / run / "last.prev.pt").exists()
    assert step1_guided.is_file()
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for arm in ARMS:
        assert set(saved[arm]) >= {"AP", "AP50", "AP75", "AP_std", "AP_per_seed"}
        assert 0.0 <= saved[arm]["AP"] <= 100.0
        detail = saved["per_seed"]["0"][arm]
        assert [step for step, _ in detail["curve"]] == [1, 2]
        assert (tmp_path / f"predictions_{arm}.png").stat().st_size > 1000
    # the distillation arms report the teacher's pseudo-label precision over stage B
    for arm in ("standard_burnin", "guided_burnin"):
        assert len(saved["per_seed"]["0"][arm]["pl_precision"]) == 2
    assert "pl_precision" not in saved["per_seed"]["0"]["supervised"]
    # ... and every arm its moving average's final AP: the EMA teacher of a distillation arm,
    # the supervised arm's EMA model (started at the end of burn-in, as the EMA teachers are)
    for arm in ARMS:
        assert 0.0 <= saved[arm]["ema_AP"] <= 100.0
    with open(tmp_path / "seed0" / "supervised" / "eval.csv") as f:
        header = f.readline().strip().split(",")
        rows = [line.strip().split(",") for line in f]
    ema_ap = [row[header.index("ema_AP")] for row in rows]
    assert ema_ap[0] == "" and float(ema_ap[1]) == saved["supervised"]["ema_AP"]
    assert saved["tier"]["name"] == "tiny" and saved["tier"]["seeds"] == [0]
    for arm in ("supervised", "standard_burnin"):
        gain = saved["guided_minus"][arm]
        assert gain["per_seed"] == [saved["guided_burnin"]["AP"] - saved[arm]["AP"]]
        assert gain["mean"] == gain["per_seed"][0] and gain["std"] == 0.0
    assert set(saved["machine"]) >= {"cpu", "cpu_capability", "threads"}
    assert (tmp_path / "demo_curves.png").stat().st_size > 5000
    assert (tmp_path / "seed0" / "split" / "labelled.json").is_file()
    printed = capsys.readouterr().out
    assert "guided_burnin" in printed and "teacher (stage A)" in printed

    # Interrupted in the guided arm after its first checkpoint: --resume trains that arm on
    # from step 1 and the finished runs not at all, to the same numbers.
    seed_dir = tmp_path / "seed0"
    (seed_dir / "guided_burnin" / "last.pt").unlink()
    step1_guided.rename(seed_dir / "guided_burnin" / "last.prev.pt")
    (tmp_path / "demo_results.json").unlink()
    finished = {run: (seed_dir / run / "last.pt").stat().st_mtime_ns for run in ("teacher", *ARMS[:2])}
    started = (seed_dir / "guided_burnin" / "run.json").stat().st_mtime_ns  # written by fresh runs only
    resumed = run_demo(tmp_path, overrides=TINY, progress=False, tier=tier, resume=True)
    assert {run: (seed_dir / run / "last.pt").stat().st_mtime_ns for run in finished} == finished
    assert (seed_dir / "guided_burnin" / "last.pt").exists()
    assert not (seed_dir / "guided_burnin" / "last.prev.pt").exists()
    assert (seed_dir / "guided_burnin" / "run.json").stat().st_mtime_ns == started
    for arm in ARMS:
        assert resumed["per_seed"]["0"][arm] == saved["per_seed"]["0"][arm]
    assert resumed["teacher"] == saved["teacher"]
    # another budget cannot resume it: its runs would mix two tiers under one name
    longer = DemoTier("tiny", train_images=10, val_images=3, fraction=0.4, teacher_iters=3,
                      student_iters=2, burnin_iters=1, eval_period=1, seeds=(0,), image_size=64)
    with pytest.raises(GdistillError, match="holds a demo of the tiny tier .* resume it with the same flags"):
        run_demo(tmp_path, overrides=TINY, progress=False, tier=longer, resume=True)
    with pytest.raises(GdistillError, match="resume it with the same flags"):
        run_demo(tmp_path, overrides=[*TINY, "solver.lr=1e-3"], progress=False, tier=tier, resume=True)


def test_demo_command_refuses_a_folder_holding_a_demo(tmp_path, capsys):
    (tmp_path / "seed0" / "teacher").mkdir(parents=True)
    (tmp_path / "seed0" / "teacher" / "metrics.csv").write_text("step\n")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "holds a demo (seed0/teacher/metrics.csv); pass --resume" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "new: no demo to resume there" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite exclude each other" in capsys.readouterr().err


def test_demo_command_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("the user's own file\n")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty and holds no demo" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # nothing written
    assert main(["demo", "--out", str(tmp_path), "--resume"]) == 2
    assert "no demo to resume there" in capsys.readouterr().err


def test_demo_table_shows_spread_over_seeds():
    result = {
        "teacher": {"AP": 20.0},
        "supervised": {"AP": 21.0, "AP50": 40.0, "AP75": 20.0, "AP_std": 0.0, "ema_AP": None},
        "standard_burnin": {"AP": 22.5, "AP50": 41.0, "AP75": 21.0, "AP_std": 0.7,
                            "ema_AP": 23.04},
        "guided_burnin": {"AP": 26.25, "AP50": 45.0, "AP75": 25.0, "AP_std": 1.2,
                          "ema_AP": 27.96},
        "tier": {"name": "full", "seeds": [0, 1, 2]},
        "minutes": 12.0,
    }
    result["guided_minus"] = guided_minus(
        {
            "0": {"guided_burnin": {"AP": 25.0}, "supervised": {"AP": 21.0}, "standard_burnin": {"AP": 23.0}},
            "1": {"guided_burnin": {"AP": 27.5}, "supervised": {"AP": 22.0}, "standard_burnin": {"AP": 22.0}},
            "2": {"guided_burnin": {"AP": 26.25}, "supervised": {"AP": 20.0},
                  "standard_burnin": {"AP": None}},
        }
    )
    assert result["guided_minus"]["supervised"]["per_seed"] == [4.0, 5.5, 6.25]
    assert result["guided_minus"]["supervised"]["mean"] == 5.25
    # a seed whose arm has no AP (an interrupted run) is left out of the pairs, not counted as 0
    assert result["guided_minus"]["standard_burnin"]["per_seed"] == [2.0, 5.5]
    table = format_demo_table(result)
    # the sample standard deviation of 4.0, 5.5, 6.25 is 1.146
    assert "guided_burnin minus supervised: +5.2 ± 1.1 (per seed +4.0 / +5.5 / +6.2)" in table
    assert "guided_burnin minus standard_burnin: +3.8 ± 2.5 (per seed +2.0 / +5.5)" in table
    assert "26.2±1.2" in table or "26.3±1.2" in table
    assert "22.5±0.7" in table and "21.0 " in table
    rows = {line.split()[0]: line.split() for line in table.splitlines() if "minus" not in line}
    assert rows["supervised"][-1] == "-"
    assert rows["standard_burnin"][-1] == "23.0" and rows["guided_burnin"][-1] == "28.0"


def test_demo_command_rejects_unknown_override(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path), "solver.max_iter=3"]) == 2
    assert "unknown config key 'solver.max_iter'" in capsys.readouterr().err
