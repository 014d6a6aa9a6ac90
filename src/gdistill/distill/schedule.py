"""The phases of stage B: guided / standard / no burn-in, hand-over, then EMA.

``step`` is the 0-based stage-B iteration. With ``burn_in``:

- ``guided`` (GuidedDistillation): the frozen stage-A teacher produces pseudo-labels from step 0;
  at ``step == burnin_iters`` the teacher becomes a copy of the student; then EMA.
- ``standard`` (prior work): labelled loss only until ``burnin_iters``; then the same hand-over,
  EMA, and the unlabelled loss from there on.
- ``none``: the hand-over happens at step 0 (teacher := student), EMA after. Meant for
  ``student_init=teacher``, where it is a classic mean teacher started from the stage-A model.
"""

from __future__ import annotations


def handover_step(burn_in: str, burnin_iters: int) -> int:
    return 0 if burn_in == "none" else burnin_iters


def ema_decay_for_step(step: int, start: int, ema_decay: float) -> float | None:
    """The decay to apply to an EMA model *before* step ``step`` when the average starts at
    ``start``: None (unchanged), 0.0 (copy of the trained model), or ``ema_decay``."""
    if step < start:
        return None
    if step == start:
        return 0.0
    return ema_decay


def teacher_decay_for_step(step: int, burn_in: str, burnin_iters: int, ema_decay: float) -> float | None:
    """The EMA decay to apply to the teacher *before* step ``step``: None (frozen), 0.0 (copy of
    the student), or ``ema_decay``."""
    return ema_decay_for_step(step, handover_step(burn_in, burnin_iters), ema_decay)


def unsupervised_loss_active(step: int, burn_in: str, burnin_iters: int) -> bool:
    """Whether the student is trained on pseudo-labels at ``step``."""
    if burn_in == "standard":
        return step >= burnin_iters
    return True


def phase_name(step: int, burn_in: str, burnin_iters: int) -> str:
    """A short label for logs: burn-in or ema."""
    return "burn-in" if step < handover_step(burn_in, burnin_iters) else "ema"
