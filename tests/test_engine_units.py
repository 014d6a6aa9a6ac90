import os
import platform
import signal

import pytest
import torch

from gdistill.engine.allocator import keep_freed_memory
from gdistill.engine.checkpoint import (
    latest_good_checkpoint,
    load_checkpoint,
    rotate_and_save,
    run_folder_lock,
    save_checkpoint,
)
from gdistill.engine.optim import build_optimizer, lr_factor
from gdistill.engine.stop_signals import StopOnSignal
from gdistill.errors import GdistillError


def test_lr_factor_step_schedule_with_warmup():
    f = lambda s: lr_factor(s, 100, "step", (50, 80), 0.1, 0.9, 10, 0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.1 * 0.5 + 0.5)
    assert f(10) == 1.0 and f(49) == 1.0
    assert f(50) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)


def test_lr_factor_poly():
    assert lr_factor(0, 100, "poly", (), 0.1, 0.9, 0, 1.0) == 1.0
    assert lr_factor(50, 100, "poly", (), 0.1, 0.9, 0, 1.0) == pytest.approx(0.5**0.9)
    assert lr_factor(100, 100, "poly", (), 0.1, 0.9, 0, 1.0) == 0.0


def test_optimizer_groups_backbone_lr_and_no_decay_for_norms():
    model = torch.nn.Module()
    model.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model.head = torch.nn.Linear(4, 2)
    model.query = torch.nn.Embedding(5, 4)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.backbone[0].weight)] == (pytest.approx(1e-5), 0.05)
    assert by_param[id(model.backbone[1].weight)] == (pytest.approx(1e-5), 0.0)
    assert by_param[id(model.head.weight)] == (1e-4, 0.05)
    assert by_param[id(model.query.weight)] == (1e-4, 0.0)
    assert len(by_param) == len(list(model.parameters()))


def test_optimizer_decays_what_mask2former_decays_in_the_real_model():
    from tiny_config import TINY

    from gdistill.config import load_config
    from gdistill.model.mask2former import build_model

    cfg = load_config("demo", [*TINY, "model.pretrained=false", "model.backbone_weights="])
    model = build_model(cfg.model, 3)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    # the pixel decoder's level embedding is a bare parameter: decayed, as in Mask2Former
    assert decay[id(named["pixel_decoder.level_embed"])] == 0.05
    # exactly the parameters of norm layers and embedding tables are not
    modules = dict(model.named_modules())
    for name, param in named.items():
        if id(param) in decay:
            kind = type(modules[name.rpartition(".")[0]]).__name__
            exempt = "Norm" in kind or kind == "Embedding"
            assert (decay[id(param)] == 0.0) == exempt, (name, kind)


def test_checkpoint_round_trip_and_atomic_rotation(tmp_path):
    rotate_and_save({"step": 1, "model": {"w": torch.ones(2)}}, tmp_path)
    rotate_and_save({"step": 2, "model": {"w": torch.zeros(2)}}, tmp_path)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert load_checkpoint(tmp_path / "last.prev.pt")["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("surfaces_as", ["OSError", "RuntimeError"])
def test_a_full_disk_while_saving_leaves_no_partial_file_and_says_why(tmp_path, monkeypatch,
                                                                      surfaces_as):
    save_checkpoint({"step": 1}, tmp_path / "best.pt")

    def save_onto_a_full_disk(obj, f):
        f.write(b"x" * 1000)
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            if surfaces_as == "RuntimeError":  # what torch's zip writer raises on closing
                raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None
            raise

    monkeypatch.setattr(torch, "save", save_onto_a_full_disk)
    with pytest.raises(GdistillError, match=r"best.pt: could not save the checkpoint \(No space "
                       r"left on device; \d+ MiB free there\)"):
        save_checkpoint({"step": 2}, tmp_path / "best.pt")
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 1  # the old file is intact


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_a_second_stop_signal_while_saving_is_an_interrupt_not_a_disk_error(tmp_path, monkeypatch,
                                                                           interrupt):
    def save_interrupted(obj, f):
        f.write(b"x" * 1000)
        try:
            raise interrupt()  # the stop handler, at the second signal
        except BaseException:
            # what torch's zip writer raises while the interrupt unwinds through it
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    monkeypatch.setattr(torch, "save", save_interrupted)
    with pytest.raises(interrupt):
        save_checkpoint({"step": 2}, tmp_path / "last.pt")
    assert not list(tmp_path.glob(".*.tmp"))


def test_truncated_checkpoint_is_detected_and_previous_used(tmp_path):
    rotate_and_save({"step": 1}, tmp_path)
    rotate_and_save({"step": 2}, tmp_path)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(GdistillError, match="last.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "last.pt")
    warned = r"last.pt: not a readable checkpoint .*; resuming from .*last.prev.pt \(step 1\) instead"
    with pytest.warns(UserWarning, match=warned + ", the damaged file kept as last.pt.corrupt"):
        payload, path = latest_good_checkpoint(tmp_path)
    assert payload["step"] == 1 and path.name == "last.prev.pt"
    assert (tmp_path / "last.pt.corrupt").is_file() and not (tmp_path / "last.pt").exists()


def test_foreign_file_is_rejected(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(GdistillError, match="x.pt: not a gdistill checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(GdistillError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    save_checkpoint({"step": 0}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["format"] == "gdistill-checkpoint"


def test_keep_freed_memory_on_glibc_unless_the_user_set_malloc(monkeypatch):
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GDISTILL_SYSTEM_MALLOC"):
        monkeypatch.delenv(var, raising=False)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_freed_memory() is True
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GDISTILL_SYSTEM_MALLOC", "1")
    assert keep_freed_memory() is False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        monkeypatch.setenv("GDISTILL_SYSTEM_MALLOC", "0")  # a switch, not "set at all"
        assert keep_freed_memory() is True


def test_metrics_log_adds_columns_and_truncates_on_resume(tmp_path):
    from gdistill.engine.trainer import MetricsLog

    path = tmp_path / "eval.csv"
    log = MetricsLog(path)
    log.write({"step": 1, "a": 0.5})
    log.write({"step": 2, "a": 0.25, "b": 3})  # a column appears: earlier rows are empty there
    log.write({"step": 3, "b": 4})
    assert path.read_text().splitlines() == ["step,a,b", "1,0.5,", "2,0.25,3", "3,,4"]
    MetricsLog(path, resume_step=2).write({"step": 3, "a": 1.0, "b": 5})
    assert path.read_text().splitlines() == ["step,a,b", "1,0.5,", "2,0.25,3", "3,1,5"]


def test_stop_on_signal_before_and_after_arming():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        with pytest.raises(KeyboardInterrupt):  # setup is not yet the loop: stop at once
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(SystemExit) as exited:
            os.kill(os.getpid(), signal.SIGTERM)
        assert exited.value.code == 128 + signal.SIGTERM and not stop.requested
        stop.armed = True
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second signal does not wait
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from gdistill.engine.checkpoint import run_folder_lock\n"
         f"with run_folder_lock({str(tmp_path)!r}):\n"
         "    print('held', flush=True); time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GdistillError, match=rf"another gdistill run \(process {holder.pid}\) is "
                           "writing there; wait for it to end or choose another --out"):
            with run_folder_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_folder_lock(tmp_path):  # free again once the other run has ended
        pass


def test_a_folder_that_cannot_be_locked_is_used_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(f, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=r"cannot lock the run folder \(No locks available\); a "
                      "second run started into it would not be stopped"):
        with run_folder_lock(tmp_path / "run"):
            (tmp_path / "run" / "x").write_text("written")
    assert (tmp_path / "run" / "x").read_text() == "written"


def test_git_commit_only_of_a_checkout_that_tracks_the_package(tmp_path):
    import subprocess
    from pathlib import Path

    from gdistill.engine import run_info

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    package = tmp_path / "src" / "gdistill" / "engine"
    package.mkdir(parents=True)
    (package / "run_info.py").write_text("# tracked\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert run_info.git_commit(package) == head
    installed = tmp_path / ".venv" / "site-packages" / "gdistill" / "engine"  # the user's project
    installed.mkdir(parents=True)
    (installed / "run_info.py").write_text("# installed copy\n")
    assert run_info.git_commit(installed) is None
    assert run_info.git_commit(Path("/")) is None
