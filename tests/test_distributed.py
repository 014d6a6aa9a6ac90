"""Two CPU processes with the gloo backend, launched by torchrun as users do."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from tiny_config import TINY as TINY_BASE

from gdistill.data.coco import load_coco
from gdistill.data.splits import split_labelled, write_split
from gdistill.data.synthetic import generate_synthetic
from gdistill.engine.checkpoint import load_checkpoint

TINY = [
    *TINY_BASE, "eval_period=3", "checkpoint_period=3", "solver.max_iters=3", "distill.burnin_iters=2",
    "distill.ema_decay=0.5", "distill.score_threshold=0.0", "distill.min_mask_area=0",
]


def _torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "gdistill", *args, "--quiet", *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deprecated" not in done.stderr, done.stderr[-3000:]  # e.g. DDP's broadcast_buffers
    return done


def test_two_processes_train_and_distill_in_sync(tmp_path):
    train_json, val_json = generate_synthetic(tmp_path / "d", 8, 3, seed=5, image_size=64,
                                              progress=False)
    labelled, unlabelled = split_labelled(load_coco(train_json), count=4, seed=0)
    lab, unl = write_split(labelled, unlabelled, tmp_path / "split")
    images = str(tmp_path / "d" / "images")
    _torchrun("train", "--labelled", str(lab), "--images", images, "--val", str(val_json),
              "--out", str(tmp_path / "t"), "--config", "demo")
    _torchrun("distill", "--teacher", str(tmp_path / "t" / "best.pt"), "--labelled", str(lab),
              "--unlabelled", str(unl), "--images", images, "--val", str(val_json),
              "--out", str(tmp_path / "s"), "--config", "demo")
    for run in ("t", "s"):
        ranks = json.loads((tmp_path / run / "ranks.json").read_text())
        assert ranks["world_size"] == 2 and ranks["in_sync"]
        fingerprints = ranks["fingerprints"]
        assert fingerprints[0] == fingerprints[1]
        run_info = json.loads((tmp_path / run / "run.json").read_text())
        assert run_info["world_size"] == 2
    last = load_checkpoint(tmp_path / "s" / "last.pt")
    assert isinstance(last["rng"], list) and len(last["rng"]) == 2  # one RNG state per rank
    # the teacher is a plain module (never DDP-wrapped): no "module." prefix in its weights
    assert not any(k.startswith("module.") for k in last["teacher"])
    assert not any(k.startswith("module.") for k in last["model"])
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    # rank 0 alone wrote the logs: one header and one row per step
    rows = (tmp_path / "s" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of ``rank`` (Linux /proc), or None while absent."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().split()[3]) != launcher_pid:
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def _train_until_stopped(tmp_path: Path, port: int, send_sigterm, *extra: str) -> tuple[str, Path]:
    """torchrun, 2 ranks, an endless tiny train run; once it has a checkpoint,
    ``send_sigterm(launcher)``; returns the launcher's output and the run folder."""
    train_json, _ = generate_synthetic(tmp_path / "d", 4, 1, seed=5, image_size=64, progress=False)
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), "-m", "gdistill", "train", "--labelled", str(train_json),
           "--images", str(tmp_path / "d" / "images"), "--out", str(out), "--config", "demo",
           "--quiet", *TINY_BASE, "solver.max_iters=100000", "eval_period=0", "checkpoint_period=1",
           *extra]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "last.pt").exists() and launcher.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint in 300 s"
            time.sleep(0.1)
        send_sigterm(launcher)
        log, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return log, out


def _assert_both_stopped_at_one_iteration(log: str, out: Path) -> None:
    # The first process says it once; the checkpoint, a collective of both ranks, holds their
    # RNG states at that iteration (a rank at another iteration would not have joined it).
    stops = re.findall(r"SIGTERM: stopped after iteration (\d+) of 100000", log)
    assert len(stops) == 1 and "process 1:" not in log, log[-3000:]
    last = load_checkpoint(out / "last.pt")
    assert last["step"] == int(stops[0]) and len(last["rng"]) == 2


def test_a_signal_to_one_rank_stops_both_at_the_same_iteration(tmp_path):
    def to_rank1(launcher):
        rank1 = _worker_pid(launcher.pid, 1)
        assert rank1 is not None, launcher.stdout.read() if launcher.poll() is not None else ""
        os.kill(rank1, signal.SIGTERM)  # rank 0 is not told

    _assert_both_stopped_at_one_iteration(*_train_until_stopped(tmp_path, 29518, to_rank1))


def test_sigterm_to_torchrun_with_dataloader_workers_stops_both_ranks(tmp_path):
    # What a scheduler's pre-emption does: torchrun's agent passes SIGTERM on to each rank's whole
    # process group, DataLoader workers included; the ranks still finish their iteration and save.
    log, out = _train_until_stopped(
        tmp_path, 29519, lambda launcher: launcher.send_signal(signal.SIGTERM), "data.num_workers=1"
    )
    assert "exited unexpectedly" not in log, log[-3000:]
    _assert_both_stopped_at_one_iteration(log, out)
