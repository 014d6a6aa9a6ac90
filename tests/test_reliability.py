"""Reliability of long runs: kill -9 and resume, a truncated checkpoint, the non-finite loss
guard, and the AP of a checkpoint read back against the AP logged while training.

The kill tests run the real command line in subprocesses (``python -m gdistill``) on tiny
synthetic data; the reference run of each goes on in parallel with the run that gets killed.
"""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_config import TINY as TINY_BASE

from gdistill.config import load_config
from gdistill.data.coco import load_coco
from gdistill.data.sources import unlabelled_from_coco
from gdistill.data.synthetic import generate_synthetic
from gdistill.engine import trainer
from gdistill.engine.checkpoint import load_checkpoint
from gdistill.engine.trainer import TrainingData, train
from gdistill.errors import GdistillError, TrainingStopped
from gdistill.evaluation.coco_eval import COCO_STAT_NAMES
from gdistill.inference import evaluate_checkpoint

TINY = [*TINY_BASE, "device=cpu"]  # CPU: bit-exact comparisons, also on a GPU machine
DISTILL_ITERS, TRAIN_ITERS = 8, 6
DISTILL = [
    *TINY, f"solver.max_iters={DISTILL_ITERS}", "distill.burnin_iters=4", "eval_period=0",
    "checkpoint_period=1", "distill.score_threshold=0.0", "distill.min_mask_area=0",
    "distill.ema_decay=0.5",
]
STAGE_A = [*TINY, f"solver.max_iters={TRAIN_ITERS}", "eval_period=0", "checkpoint_period=1"]
# Where the runs get killed: fixed, so a failure reproduces; printed by the tests.
_KILL_RNG = random.Random(1729)
KILL_STEP_DISTILL = _KILL_RNG.randint(2, 6)
KILL_STEP_TRAIN = _KILL_RNG.randint(2, 4)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMEOUT = 300


# ----------------------------------------------------------------------------- helpers


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "gdistill", *map(str, args)]


class Proc:
    """A ``gdistill`` subprocess whose output goes to a log file next to its run folder."""

    def __init__(self, cmd: list[str], log: Path, new_session: bool = False) -> None:
        self.log = log
        with open(log, "w") as f:
            self.popen = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, start_new_session=new_session
            )

    def finish(self) -> None:
        try:
            rc = self.popen.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise
        assert rc == 0, f"{self.popen.args[3]} exited {rc}:\n{self.log.read_text()[-3000:]}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def _step_or_none(path: Path) -> int | None:
    """The step of ``path``, or None while it is absent: rotation moves last.pt to last.prev.pt a
    moment before the new file is renamed in. Any other load error is a failure, since
    checkpoints are written to a temporary file and renamed."""
    try:
        return load_checkpoint(path)["step"]
    except GdistillError as exc:
        if "checkpoint not found" in str(exc) or "FileNotFoundError" in str(exc):
            return None
        raise


def _kill_when_step(proc: Proc, last: Path, k: int) -> int:
    """SIGKILL ``proc`` once ``last`` holds step k or later; returns the step it held."""
    step = _kill_when_step_then(proc, last, k, signal.SIGKILL)
    assert proc.popen.wait() == -signal.SIGKILL  # alive until the kill
    return step


def _kill_when_step_then(proc: Proc, last: Path, k: int, signum: int) -> int:
    """Send ``signum`` to ``proc`` once ``last`` holds step k or later; returns the step it held."""
    seen = None
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.popen.poll() is None, f"ended before step {k}:\n{proc.log.read_text()[-3000:]}"
        try:
            st = last.stat()
            key = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            key = None
        if key is not None and key != seen:
            step = _step_or_none(last)
            if step is not None:
                seen = key
                if step >= k:
                    os.kill(proc.popen.pid, signum)
                    return step
        time.sleep(0.02)
    proc.stop()
    raise AssertionError(f"{last} did not reach step {k} in {TIMEOUT} s")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _all_finite(payload: dict) -> bool:
    return all(torch.isfinite(t).all() for t in _tensors(payload) if t.is_floating_point())


def _assert_same_state(a: dict | None, b: dict | None, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is None:
        return
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in rows]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, 6, 2, seed=3, image_size=64, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_data(synth) -> TrainingData:
    labelled = load_coco(synth / "train.json")
    return TrainingData(
        labelled=labelled,
        images_dir=synth / "images",
        val=load_coco(synth / "val.json"),
        val_images_dir=synth / "images",
        unlabelled=unlabelled_from_coco(synth / "train.json", synth / "images"),
    )


@pytest.fixture(scope="module")
def teacher(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config("demo", [*TINY, "solver.max_iters=2", "eval_period=0", "checkpoint_period=0"])
    data = TrainingData(load_coco(synth / "train.json"), synth / "images")
    train(cfg, out, data, progress=False)
    return out / "best.pt"


def _distill_cmd(synth: Path, teacher: Path, out: Path) -> list[str]:
    return _cli(
        "distill", "--teacher", teacher, "--labelled", synth / "train.json",
        "--unlabelled", synth / "train.json", "--images", synth / "images", "--out", out,
        "--quiet", "--config", "demo", *DISTILL,
    )


def _train_cmd(synth: Path, out: Path) -> list[str]:
    return _cli(
        "train", "--labelled", synth / "train.json", "--images", synth / "images", "--out", out,
        "--quiet", "--config", "demo", *STAGE_A,
    )


def _kill_and_resume(make_cmd, root: Path, k: int) -> tuple[Path, Path, int]:
    """Run ``make_cmd(folder)`` uninterrupted in root/ref and, in parallel, in root/killed where
    it is killed at step >= k and resumed. Returns (ref, killed, step held when killed)."""
    ref = Proc(make_cmd(root / "ref"), root / "ref.log")
    victim = Proc(make_cmd(root / "killed"), root / "killed.log")
    try:
        killed_at = _kill_when_step(victim, root / "killed" / "last.pt", k)
        Proc([*make_cmd(root / "killed"), "--resume"], root / "resume.log").finish()
        ref.finish()
    finally:
        ref.stop()
        victim.stop()
    return root / "ref", root / "killed", killed_at


@pytest.fixture(scope="module")
def distill_runs(synth, teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_distill")
    return _kill_and_resume(lambda out: _distill_cmd(synth, teacher, out), root, KILL_STEP_DISTILL)


@pytest.fixture(scope="module")
def train_runs(synth, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_train")
    return _kill_and_resume(lambda out: _train_cmd(synth, out), root, KILL_STEP_TRAIN)


# ----------------------------------------------------------------------------- 1. kill -9, resume


def test_distill_killed_and_resumed_equals_uninterrupted(distill_runs):
    ref, killed, killed_at = distill_runs
    print(f"distill: kill asked at step {KILL_STEP_DISTILL}, last.pt held step {killed_at}")
    assert KILL_STEP_DISTILL <= killed_at < DISTILL_ITERS
    full, resumed = load_checkpoint(ref / "last.pt"), load_checkpoint(killed / "last.pt")
    assert full["step"] == resumed["step"] == DISTILL_ITERS
    _assert_same_state(resumed["model"], full["model"], "student")
    _assert_same_state(resumed["teacher"], full["teacher"], "teacher")
    # The run did distil: pseudo-labels existed, the teacher left the stage-A weights.
    assert any(float(r["pl_kept"]) > 0 for r in _rows(ref / "metrics.csv"))
    assert any(r["phase"] == "ema" for r in _rows(ref / "metrics.csv"))


def test_train_killed_and_resumed_equals_uninterrupted(train_runs):
    ref, killed, killed_at = train_runs
    print(f"train: kill asked at step {KILL_STEP_TRAIN}, last.pt held step {killed_at}")
    assert KILL_STEP_TRAIN <= killed_at < TRAIN_ITERS
    full, resumed = load_checkpoint(ref / "last.pt"), load_checkpoint(killed / "last.pt")
    assert full["step"] == resumed["step"] == TRAIN_ITERS
    _assert_same_state(resumed["model"], full["model"], "model")
    assert full["teacher"] is None and resumed["teacher"] is None
    moments = list(_tensors(full["optimizer"]["state"]))
    assert moments and len(moments) == len(list(_tensors(resumed["optimizer"]["state"])))
    assert all(map(torch.equal, _tensors(resumed["optimizer"]["state"]), moments)), "optimizer state"


def test_resumed_metrics_log_equals_uninterrupted(distill_runs):
    ref, killed, _ = distill_runs
    full = _without_timing(_rows(ref / "metrics.csv"))
    resumed = _without_timing(_rows(killed / "metrics.csv"))
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    assert resumed == full


# ----------------------------------------------------------------------------- 2. truncated last.pt


@pytest.fixture(scope="module")
def recovered(distill_runs, tiny_data, tmp_path_factory):
    """A copy of the finished distill run whose last.pt is cut to half, resumed in-process.
    Returns (run folder, the checkpoint resume picked, its step)."""
    ref = distill_runs[0]
    run = tmp_path_factory.mktemp("truncated") / "run"
    run.mkdir()
    for name in ("last.pt", "last.prev.pt", "metrics.csv", "config.yaml", "run.json"):
        shutil.copy(ref / name, run / name)
    size = (run / "last.pt").stat().st_size
    with open(run / "last.pt", "r+b") as f:
        f.truncate(size // 2)
    picked = []
    real = trainer.latest_good_checkpoint

    def spy(run_dir):
        found = real(run_dir)
        picked.append((found[1].name, found[0]["step"]))
        return found

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "latest_good_checkpoint", spy)
        with pytest.warns(UserWarning) as record:
            train(load_config("demo", TINY), run, tiny_data, resume=True, progress=False)
    messages = [str(w.message) for w in record]
    assert any("last.pt: not a readable checkpoint" in m and "resuming from" in m for m in messages)
    assert any("resuming with the run's own config" in m for m in messages)
    assert len(picked) == 1
    return run, *picked[0]


def test_truncated_last_resumes_from_prev(recovered, distill_runs):
    run, picked_name, picked_step = recovered
    assert (picked_name, picked_step) == ("last.prev.pt", DISTILL_ITERS - 1)
    full, resumed = load_checkpoint(distill_runs[0] / "last.pt"), load_checkpoint(run / "last.pt")
    assert resumed["step"] == DISTILL_ITERS
    _assert_same_state(resumed["model"], full["model"], "student")
    _assert_same_state(resumed["teacher"], full["teacher"], "teacher")


def test_recovery_keeps_a_readable_fallback(recovered):
    run = recovered[0]
    assert load_checkpoint(run / "last.prev.pt")["step"] == DISTILL_ITERS - 1


# ----------------------------------------------------------------------------- 3. SIGINT / SIGTERM


class SignalOnCall(torch.nn.Module):
    """Wraps the criterion; sends ``signum`` to this process on its ``call``-th (1-based) call,
    in the middle of an iteration."""

    def __init__(self, inner: torch.nn.Module, signum: int, call: int) -> None:
        super().__init__()
        self.inner, self.signum, self.call, self.calls = inner, signum, call, 0

    def forward(self, outputs, targets):
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), self.signum)
        return self.inner(outputs, targets)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_equals_uninterrupted(
    signum, teacher, tiny_data, distill_runs, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    real = trainer.build_criterion
    # Guided burn-in with every pseudo-label kept: two criterion calls per iteration, so the
    # fifth is in iteration 3.
    monkeypatch.setattr(trainer, "build_criterion", lambda cfg, n: SignalOnCall(real(cfg, n), signum, 5))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingStopped) as stopped:
        train(load_config("demo", DISTILL), run, tiny_data, teacher_checkpoint=teacher, progress=False)
    assert stopped.value.signum == signum
    assert str(stopped.value) == (
        f"{signal.Signals(signum).name}: stopped after iteration 3 of {DISTILL_ITERS}; "
        f"{run / 'last.pt'} saved, the same command with --resume continues"
    )
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert load_checkpoint(run / "last.pt")["step"] == 3
    assert [r["step"] for r in _rows(run / "metrics.csv")] == ["1", "2", "3"]
    assert (run / "report" / "losses.png").exists()  # the curves so far

    monkeypatch.setattr(trainer, "build_criterion", real)
    train(load_config("demo", DISTILL), run, tiny_data, resume=True, progress=False)
    full, resumed = load_checkpoint(distill_runs[0] / "last.pt"), load_checkpoint(run / "last.pt")
    assert resumed["step"] == full["step"] == DISTILL_ITERS
    _assert_same_state(resumed["model"], full["model"], "student")
    _assert_same_state(resumed["teacher"], full["teacher"], "teacher")


def _uninterrupted_and_stopped_in_iteration_3(cfg, tiny_data, tmp_path, monkeypatch, stopped_run):
    """A stage-A run trained uninterrupted, and again stopped by a SIGTERM in iteration 3 and
    resumed; ``stopped_run(run)`` looks at it before the resume. Returns both run folders."""
    train(load_config("demo", cfg), tmp_path / "full", tiny_data, progress=False)
    real = trainer.build_criterion
    # stage A: one criterion call per iteration, so the third is in iteration 3
    monkeypatch.setattr(trainer, "build_criterion",
                        lambda c, n: SignalOnCall(real(c, n), signal.SIGTERM, 3))
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="stopped after iteration 3 of "):
        train(load_config("demo", cfg), run, tiny_data, progress=False)
    stopped_run(run)
    monkeypatch.setattr(trainer, "build_criterion", real)
    train(load_config("demo", cfg), run, tiny_data, resume=True, progress=False)
    return tmp_path / "full", run


def test_a_signal_at_an_evaluation_step_saves_first_and_evaluates_on_resume(tiny_data, tmp_path,
                                                                            monkeypatch):
    """A scheduler's grace period may be shorter than an evaluation: the stop does not wait for
    it, and the resumed run evaluates that step before going on, as the uninterrupted run did."""

    def saved_unevaluated(run):
        assert load_checkpoint(run / "last.pt")["step"] == 3
        assert not (run / "eval.csv").exists() or not _rows(run / "eval.csv")

    cfg = [*TINY, "solver.max_iters=6", "eval_period=3", "checkpoint_period=0"]
    full, run = _uninterrupted_and_stopped_in_iteration_3(cfg, tiny_data, tmp_path, monkeypatch,
                                                          saved_unevaluated)
    assert _rows(run / "eval.csv") == _rows(full / "eval.csv")
    assert [r["step"] for r in _rows(run / "eval.csv")] == ["3", "6"]
    full, resumed = load_checkpoint(full / "last.pt"), load_checkpoint(run / "last.pt")
    _assert_same_state(resumed["model"], full["model"], "model")
    assert resumed["best_ap"] == full["best_ap"]


def test_a_resumed_run_logs_the_same_rows_with_a_log_window_open_at_the_stop(tiny_data, tmp_path,
                                                                             monkeypatch):
    cfg = [*TINY, "solver.max_iters=4", "eval_period=0", "checkpoint_period=0", "log_period=2"]
    full, run = _uninterrupted_and_stopped_in_iteration_3(cfg, tiny_data, tmp_path, monkeypatch,
                                                          lambda run: None)
    # the row of iteration 4 averages iterations 3 (before the stop) and 4 (after it)
    full_rows = _without_timing(_rows(full / "metrics.csv"))
    assert [r["step"] for r in full_rows] == ["2", "4"]
    assert _without_timing(_rows(run / "metrics.csv")) == full_rows


def test_ctrl_c_on_the_command_line_stops_with_a_checkpoint(synth, tmp_path):
    out = tmp_path / "run"
    cmd = _cli("train", "--labelled", synth / "train.json", "--images", synth / "images",
               "--out", out, "--quiet", "--config", "demo", *TINY, "solver.max_iters=100000",
               "eval_period=0", "checkpoint_period=1")
    proc = Proc(cmd, tmp_path / "train.log")
    try:
        _kill_when_step_then(proc, out / "last.pt", 2, signal.SIGINT)
        rc = proc.popen.wait(timeout=TIMEOUT)
    finally:
        proc.stop()
    log = (tmp_path / "train.log").read_text()
    assert rc == 128 + signal.SIGINT, log[-3000:]
    line = log.strip().splitlines()[-1]
    assert line.startswith("SIGINT: stopped after iteration ") and line.endswith(
        f"{out / 'last.pt'} saved, the same command with --resume continues"
    ), log[-3000:]
    stopped_at = int(line.split("iteration ")[1].split(" ")[0])
    assert load_checkpoint(out / "last.pt")["step"] == stopped_at >= 2


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="the sender of a signal is not known")
def test_sigterm_to_the_process_group_with_workers_stops_with_a_checkpoint(synth, tmp_path):
    # scancel, SLURM pre-emption and torchrun's agent signal the whole process group, the
    # DataLoader workers with it: the run must still finish its iteration (whose batch may
    # come from a worker), save and exit, leaving no process behind.
    out = tmp_path / "run"
    cmd = _cli("train", "--labelled", synth / "train.json", "--images", synth / "images",
               "--out", out, "--quiet", "--config", "demo", *TINY, "solver.max_iters=100000",
               "eval_period=0", "checkpoint_period=1", "data.num_workers=2")
    proc = Proc(cmd, tmp_path / "train.log", new_session=True)
    try:
        _kill_when_step_then(proc, out / "last.pt", 2, 0)  # signal 0: only waits for step 2
        os.killpg(proc.popen.pid, signal.SIGTERM)
        rc = proc.popen.wait(timeout=60)
    finally:
        proc.stop()
    log = (tmp_path / "train.log").read_text()
    assert rc == 128 + signal.SIGTERM, log[-3000:]
    line = log.strip().splitlines()[-1]
    assert line.startswith("SIGTERM: stopped after iteration "), log[-3000:]
    stopped_at = int(line.split("iteration ")[1].split(" ")[0])
    assert load_checkpoint(out / "last.pt")["step"] == stopped_at >= 2
    deadline = time.monotonic() + 10
    while _processes_in_group(proc.popen.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_in_group(proc.popen.pid) == []


def _processes_in_group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def test_an_image_that_fails_in_a_worker_ends_the_run_in_one_line(synth, teacher, tmp_path):
    # The header check passes, the decode in a DataLoader worker fails. An unlabelled image
    # gives way to the next one with a warning; a labelled one ends the run with the file named
    # (not torch's worker traceback), without hanging while the workers shut down.
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for image in sorted((synth / "images").rglob("*.png"))[:3]:
        shutil.copy(image, folder / image.name)
    whole = image.read_bytes()
    (folder / "z_cut.png").write_bytes(whole[: len(whole) // 2])
    cmd = _cli("distill", "--teacher", teacher, "--labelled", synth / "train.json",
               "--unlabelled", folder, "--images", synth / "images", "--out", tmp_path / "run",
               "--quiet", "--config", "demo", *DISTILL, "data.num_workers=2")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"warning: {folder / 'z_cut.png'}: corrupt or truncated image (") in done.stderr
    assert "skipped, the next unlabelled image used instead" in done.stderr

    images = tmp_path / "images"
    shutil.copytree(synth / "images", images)
    first = images / load_coco(synth / "train.json").images[0].file_name
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    cmd = _cli("train", "--labelled", synth / "train.json", "--images", images, "--out",
               tmp_path / "run_a", "--quiet", "--config", "demo", *STAGE_A, "data.num_workers=2")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {first}: corrupt or truncated image ("), last


# ----------------------------------------------------------------------------- 4. non-finite guard


class NaNOnCalls(torch.nn.Module):
    """Wraps the criterion; on the chosen (1-based) calls, or on all, its losses are NaN (still
    attached to the outputs, and without running the matcher)."""

    def __init__(self, inner: torch.nn.Module, calls: set[int] | None) -> None:
        super().__init__()
        self.inner, self.nan_calls, self.calls = inner, calls, 0

    def forward(self, outputs, targets):
        self.calls += 1
        if self.nan_calls is None or self.calls in self.nan_calls:
            nan = outputs["pred_logits"].sum() * float("nan")
            return {"loss_ce": nan, "loss_mask": nan, "loss_dice": nan}
        return self.inner(outputs, targets)


def _nan_criterion(monkeypatch, calls: set[int] | None) -> None:
    real = trainer.build_criterion
    monkeypatch.setattr(trainer, "build_criterion", lambda cfg, n: NaNOnCalls(real(cfg, n), calls))


def _stage_a(max_iters: int) -> object:
    return load_config("demo", [*TINY, f"solver.max_iters={max_iters}", "eval_period=0",
                                "checkpoint_period=1"])


def _no_val(data: TrainingData) -> TrainingData:
    return TrainingData(data.labelled, data.images_dir)


def test_nonfinite_steps_are_skipped(tiny_data, tmp_path, monkeypatch):
    _nan_criterion(monkeypatch, {1, 2, 3})  # stage A: one criterion call per step
    with pytest.warns(UserWarning, match="3 of the 6 steps of this run were skipped") as caught:
        train(_stage_a(6), tmp_path, _no_val(tiny_data), progress=False)
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # skipping is meant
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["4", "5", "6"]
    assert [r["skipped_steps"] for r in rows] == ["3", "3", "3"]
    for name in ("last.pt", "last.prev.pt", "best.pt"):
        assert _all_finite(load_checkpoint(tmp_path / name)), name
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 6


def test_skipped_steps_are_counted_across_a_resume(tiny_data, tmp_path, monkeypatch):
    _nan_criterion(monkeypatch, {1, 2, 3})
    with pytest.warns(UserWarning, match="3 of the 6 steps"):
        train(_stage_a(6), tmp_path, _no_val(tiny_data), progress=False)
    monkeypatch.undo()
    # as if killed after step 5: resume from the checkpoint before the last
    shutil.copy(tmp_path / "last.prev.pt", tmp_path / "last.pt")
    with pytest.warns(UserWarning, match="3 of the 6 steps of this run were skipped"):
        train(_stage_a(6), tmp_path, _no_val(tiny_data), resume=True, progress=False)
    assert [r["skipped_steps"] for r in _rows(tmp_path / "metrics.csv")] == ["3", "3", "3"]


def test_nonfinite_every_step_stops_before_any_checkpoint(tiny_data, tmp_path, monkeypatch):
    _nan_criterion(monkeypatch, None)
    with pytest.raises(GdistillError, match="not finite 5 steps in a row") as err:
        train(_stage_a(8), tmp_path, _no_val(tiny_data), progress=False)
    assert "\n" not in str(err.value)
    assert "step 4" in str(err.value)
    for name in ("last.pt", "last.prev.pt"):
        assert not (tmp_path / name).exists() or _all_finite(load_checkpoint(tmp_path / name))


def test_nonfinite_last_step_still_writes_final_checkpoint(tiny_data, tmp_path, monkeypatch):
    _nan_criterion(monkeypatch, {2})
    train(_stage_a(2), tmp_path, _no_val(tiny_data), progress=False)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def _nan_images_on_call(monkeypatch, call: int) -> None:
    """The model input of the ``call``-th training step (1-based) is all NaN."""
    real = trainer.images_to_model_input
    calls = []

    def images_to_model_input(images):
        calls.append(1)
        x = real(images)
        return torch.full_like(x, float("nan")) if len(calls) == call else x

    monkeypatch.setattr(trainer, "images_to_model_input", images_to_model_input)


def test_nonfinite_forward_is_skipped_not_a_crash(tiny_data, tmp_path, monkeypatch):
    _nan_images_on_call(monkeypatch, 2)
    train(_stage_a(3), tmp_path, _no_val(tiny_data), progress=False)
    assert _rows(tmp_path / "metrics.csv")[-1]["skipped_steps"] == "1"


def test_nonfinite_forward_does_not_poison_batchnorm(tiny_data, tmp_path, monkeypatch):
    _nan_images_on_call(monkeypatch, 2)
    _nan_criterion(monkeypatch, {2})  # keeps the matcher out of it (see the test above)
    train(_stage_a(3), tmp_path, _no_val(tiny_data), progress=False)
    assert _rows(tmp_path / "metrics.csv")[-1]["skipped_steps"] == "1"
    model = load_checkpoint(tmp_path / "last.pt")["model"]
    bad = [k for k, t in model.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"{len(bad)} non-finite tensors, e.g. {bad[:3]}"


# ----------------------------------------------------------------------------- 5. AP read back


def _same_metrics(got: dict, logged: dict) -> None:
    for name in COCO_STAT_NAMES:
        want = logged[f"student_{name}"]
        if want is None:  # e.g. APm on images without medium objects
            assert got[name] is None, name
        else:
            assert got[name] == pytest.approx(want, abs=1e-9), name


def test_eval_of_weights_equals_ap_logged_in_training(tiny_data, synth, tmp_path):
    # Evaluated on its own training images so that 20 steps already give a non-zero AP.
    data = TrainingData(tiny_data.labelled, synth / "images", tiny_data.labelled, synth / "images")
    run, iters = tmp_path / "run", 20
    cfg = load_config("demo", [
        *TINY, f"solver.max_iters={iters}", f"eval_period={iters}", "checkpoint_period=0",
        "log_period=100", "solver.lr=0.003", "solver.lr_steps=[1000]", "data.scale_range=[1.0,1.0]",
    ])
    result = train(cfg, run, data, progress=False)
    logged = load_checkpoint(run / "last.pt")["last_eval"]
    assert logged["step"] == iters and logged["student_AP"] == result["student_AP"]
    assert logged["student_AP"] > 0
    row = _rows(run / "eval.csv")[-1]
    assert row["step"] == str(iters)
    # eval.csv holds 6 significant digits; the checkpoint keeps the full numbers.
    assert row["student_AP"] == f"{logged['student_AP']:.6g}"

    metrics = evaluate_checkpoint(run / "last.pt", data.val, synth / "images", device="cpu",
                                  progress=False)
    _same_metrics(metrics, logged)
    out = tmp_path / "m.json"
    Proc(_cli("eval", "--annotations", synth / "train.json", "--weights", run / "last.pt",
              "--images", synth / "images", "--out", out, "--device", "cpu", "--quiet"),
         tmp_path / "eval.log").finish()
    from_cli = json.loads(out.read_text())
    _same_metrics(from_cli, logged)
    print(f"AP logged {logged['student_AP']!r}, evaluate_checkpoint {metrics['AP']!r}, "
          f"CLI {from_cli['AP']!r}")


def test_evaluating_does_not_change_training(tiny_data, tmp_path):
    finals = []
    for eval_period in (1, 2):
        cfg = load_config("demo", [*TINY, "solver.max_iters=2", f"eval_period={eval_period}",
                                   "checkpoint_period=0"])
        train(cfg, tmp_path / str(eval_period), tiny_data, progress=False)
        finals.append(load_checkpoint(tmp_path / str(eval_period) / "last.pt")["model"])
    _assert_same_state(finals[0], finals[1], "model trained with eval_period 1 vs 2")


def test_eval_lines_only_for_runs_with_a_validation_set(tiny_data, tmp_path, capsys, monkeypatch):
    real, calls = trainer.evaluate_model, []

    def evaluate_model(*args, **kwargs):  # the real one, with an AP that differs every time
        metrics, rest = real(*args, **kwargs)
        calls.append(1)
        return dict(metrics, AP=11.0 * len(calls)), rest

    monkeypatch.setattr(trainer, "evaluate_model", evaluate_model)
    cfg = load_config("demo", [*TINY, "solver.max_iters=2", "eval_period=1", "checkpoint_period=0"])
    train(cfg, tmp_path / "val", tiny_data, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[eval]")]
    assert [line.split(";")[0] for line in lines] == ["[eval] iteration 1/2: model AP 11.00",
                                                      "[eval] iteration 2/2: model AP 22.00"]
    final_bar = err.strip().splitlines()[-1]
    assert final_bar.startswith("train: 100%") and "AP=22.0" in final_bar, final_bar  # not 11.0
    # Written to a file (not a terminal): whole lines, no evaluation bars, no cursor moves.
    assert "\r" not in err and "\x1b" not in err and "eval " not in err
    train(cfg, tmp_path / "none", _no_val(tiny_data), progress=True)
    assert "[eval]" not in capsys.readouterr().err
