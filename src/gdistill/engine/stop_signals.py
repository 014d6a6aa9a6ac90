"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption) with a
checkpoint to resume from, instead of losing the iterations since the last periodic one."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from tqdm import tqdm

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Context manager. Once :attr:`armed` (the training loop has started), the first SIGINT or
    SIGTERM sets :attr:`signum`; the loop then saves a checkpoint at the end of its iteration and
    stops. Before that, and for a second signal, they act at once: SIGINT raises
    KeyboardInterrupt, SIGTERM exits with status 143. The previous handlers come back on exit.
    Outside the main thread, where Python cannot install handlers, it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.armed or self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
        tqdm.write(
            f"{signal.Signals(signum).name}: stopping after this iteration with a checkpoint "
            f"({again} to stop at once)",
            file=sys.stderr,
        )
