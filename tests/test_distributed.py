"""Two CPU processes with the gloo backend, launched by torchrun as users do."""

import json
import subprocess
import sys

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
