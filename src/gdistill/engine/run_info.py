"""What every run writes next to its outputs: resolved config, seed, versions, git commit."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gdistill.config import Config, save_config
from gdistill.errors import GdistillError


def git_commit(here: Path | None = None) -> str | None:
    """The commit of the gdistill source tree (the folder ``here`` holding this module's file),
    if it is a git checkout. An installed copy that merely lies inside another repository (a
    venv in the user's project) has none."""
    here = here or Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", Path(__file__).name],
            cwd=here, capture_output=True, text=True, timeout=5,
        )
        if tracked.returncode != 0:
            return None
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    import numpy
    import scipy
    import timm
    import torch
    import torchvision

    import gdistill

    return {
        "gdistill": gdistill.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "cuda": torch.version.cuda or "none",
    }


def machine_info() -> dict[str, Any]:
    """The hardware a run's numbers depend on: float rounding differs between CPU kinds (ATen
    dispatches other kernels on AVX2 and AVX-512), and with it every AP of a run."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_run_info(out_dir: Path, cfg: Config, extra: dict[str, Any] | None = None) -> None:
    """Write ``config.yaml`` (fully resolved) and ``run.json`` (seed, versions, commit, command)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    info = {
        "seed": cfg.seed,
        "command": sys.argv,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "platform": platform.platform(),
        "machine": machine_info(),
        **(extra or {}),
    }
    (out_dir / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``run.json`` ({} when there is none); malformed JSON is an error naming it."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GdistillError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    return info if isinstance(info, dict) else {}
