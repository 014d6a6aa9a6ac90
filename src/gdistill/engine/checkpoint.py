"""Self-describing checkpoints, written atomically; resume state."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gdistill.errors import GdistillError, one_line

CHECKPOINT_FORMAT = "gdistill-checkpoint"
CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _interrupt_behind(exc: BaseException) -> BaseException | None:
    """The Ctrl-C or SystemExit (a second stop signal) that ``exc`` was raised while handling."""
    seen = set()
    cause = exc.__context__
    while cause is not None and id(cause) not in seen:
        if not isinstance(cause, Exception):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash
    leaves either the old file or the new one, never a half-written file."""
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        # A partial file would keep a full disk full. Nothing else is touched: for last.pt the
        # previous one is last.prev.pt by now (rotate_and_save), which --resume reads.
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, Exception):  # Ctrl-C, SystemExit
            raise
        interrupt = _interrupt_behind(exc)
        if interrupt is not None:  # torch's zip writer turns an interrupt into a RuntimeError
            raise interrupt from None
        # A full disk surfaces as an OSError, or as torch's zip writer's RuntimeError raised
        # while it handles that OSError.
        system = exc if isinstance(exc, OSError) else exc.__context__
        if isinstance(system, OSError) and system.strerror:
            reason = system.strerror
        else:
            reason = f"{type(exc).__name__}: {one_line(exc)}"
        free = shutil.disk_usage(path.parent).free / 2**20 if path.parent.is_dir() else 0.0
        raise GdistillError(
            f"{path}: could not save the checkpoint ({reason}; {free:.0f} MiB free there)"
        ) from exc
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a gdistill checkpoint on the CPU; a missing, truncated or foreign file, or a run folder
    given for its checkpoint, is a one-line error naming it. ``mmap``: map the tensors' storage
    instead of reading it (for a look at the config of a large checkpoint)."""
    path = Path(path)
    if path.is_dir():
        guess = next((path / name for name in ("best.pt", "last.pt") if (path / name).is_file()), None)
        hint = f" (did you mean {guess}?)" if guess else ""
        raise GdistillError(f"{path}: is a folder, not a checkpoint{hint}")
    if not path.is_file():
        raise GdistillError(f"{path}: checkpoint not found")
    try:
        # str: torch < 2.2 memory-maps only a file named by a string
        payload = torch.load(str(path), map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:  # torch raises many types for truncated / non-torch files
        raise GdistillError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise GdistillError(f"{path}: not a gdistill checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise GdistillError(f"{path}: checkpoint version {payload['version']} is newer than this gdistill")
    return payload


def latest_good_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable resume checkpoint of a run (``last.pt``, else ``last.prev.pt``)."""
    run_dir = Path(run_dir)
    errors = []
    for name in ("last.pt", "last.prev.pt"):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            payload = load_checkpoint(path)
        except GdistillError as exc:
            errors.append(str(exc))
            continue
        if path.name == "last.prev.pt" and (run_dir / "last.pt").exists():
            # Keep the damaged file for inspection, out of the way of the next rotation.
            os.replace(run_dir / "last.pt", run_dir / "last.pt.corrupt")
            warnings.warn(
                f"{errors[0]}; resuming from {path} (step {payload.get('step')}) instead, the damaged "
                "file kept as last.pt.corrupt",
                stacklevel=2,
            )
        return payload, path
    if errors:
        raise GdistillError(f"{run_dir}: no readable checkpoint to resume from ({'; '.join(errors)})")
    return None


def rotate_and_save(payload: dict[str, Any], run_dir: str | Path) -> Path:
    """Save ``last.pt``, keeping the previous one as ``last.prev.pt`` for recovery."""
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    if last.exists():
        os.replace(last, run_dir / "last.prev.pt")
    save_checkpoint(payload, last)
    return last


# Everything a training run writes in its folder (``clear_run`` removes exactly these).
RUN_FILES = (
    "last.pt", "last.prev.pt", "last.pt.corrupt", "best.pt", ".last.pt.tmp", ".best.pt.tmp",
    "config.yaml", "run.json", "ranks.json", "metrics.csv", "eval.csv",
)
RUN_FOLDERS = ("pictures", "report", "tensorboard")


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir/.gdistill.lock`` while a run writes there: a second
    run started into the same folder stops with one line instead of clearing the first one's
    files and interleaving its own with them. POSIX only (elsewhere, no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".gdistill.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip()
            raise GdistillError(
                f"{run_dir}: another gdistill run{f' (process {pid})' if pid else ''} is writing "
                "there; wait for it to end or choose another --out"
            ) from None
        except OSError as err:  # a file system without locks (some network mounts)
            warnings.warn(
                f"{run_dir}: cannot lock the run folder ({err.strerror or err}); a second run "
                "started into it would not be stopped",
                stacklevel=3,
            )
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clear_run(run_dir: str | Path) -> None:
    """Remove the files of an earlier run from ``run_dir`` (``--overwrite``), and nothing else:
    a stale ``best.pt`` or ``last.pt`` would otherwise outlive the new run or be resumed."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
