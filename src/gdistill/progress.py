"""Progress bars that also read well in a log file."""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

from tqdm import tqdm

_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class LogLines:
    """A text stream for tqdm when stderr is a file (a cluster job's log): each state of the bar
    becomes a line of its own, where a terminal would redraw it in place with carriage returns
    and cursor moves (``^M`` and ``ESC[A`` in the file)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        for piece in _ESCAPES.sub("", text).replace("\n", "\r").split("\r"):
            if piece.strip():  # tqdm clears a line by writing spaces over it
                self.stream.write(piece.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def progress_bar(iterable: Any = None, *, nested: bool = False, **kwargs: Any) -> tqdm:
    """tqdm on stderr: redrawn in place on a terminal; written to a file, a line every 30 s and
    none for ``nested`` bars (an evaluation inside training: its lines would only interleave)."""
    terminal = sys.stderr.isatty()
    if not terminal:
        # tqdm's monitor thread would also redraw a bar idle for maxinterval (10 s).
        kwargs["mininterval"] = kwargs["maxinterval"] = 30.0
        if nested:
            kwargs["disable"] = True
    return tqdm(iterable, file=sys.stderr if terminal else LogLines(sys.stderr),
                dynamic_ncols=True, **kwargs)
