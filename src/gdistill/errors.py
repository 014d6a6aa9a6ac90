"""The one exception type users see: a clear, one-line message about their input."""


class GdistillError(Exception):
    """Bad input or configuration. The CLI prints `error: <message>` and exits with status 2.

    Messages name the file (or config key) and the problem in one line, e.g.
    ``train.json: annotation 17 references unknown image_id 9``.
    """


class InvalidAnnotationError(GdistillError):
    """An annotation whose mask is invalid (a polygon with fewer than 3 points, an empty mask, a
    malformed RLE): what ``load_coco(..., drop_invalid=True)`` skips instead of raising."""


class UnreadableImageError(GdistillError):
    """An image file that is missing or cannot be decoded: what ``predict --skip-unreadable``
    skips instead of stopping."""


class NonFiniteOutputsError(GdistillError):
    """A model whose outputs are NaN or infinite: its weights have diverged, so resuming from
    them cannot help; training again with a lower learning rate can."""


class TrainingStopped(Exception):
    """Training stopped on SIGINT or SIGTERM after saving the checkpoint that ``--resume``
    continues from. The CLI prints the message and exits with 128 + ``signum``, as a process
    ended by that signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


_OUT_OF_MEMORY = ("out of memory", "not enough memory", "can't allocate memory",
                  "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: torch's OutOfMemoryError (CUDA), the CPU allocator's
    RuntimeError, MPS's, or Python's MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OUT_OF_MEMORY)


def one_line(exc: Exception) -> str:
    """The message of an error, also when torch re-raised it from a DataLoader worker (its
    message then holds the worker's whole traceback; the last line is ours)."""
    text = str(exc).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1].strip()
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "  # torch re-raises the same type
    return last[len(prefix) :] if last.startswith(prefix) else last
