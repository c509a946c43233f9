"""Learning-rate schedule: linear warmup, then cosine down to a floor.

The rate is a pure function of the step, so a resumed run needs no scheduler
state: the trainer calls :func:`lr_at` every step and writes the result into
the optimizer with :func:`set_lr`.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of step ``step`` (0-based).

    - ``step < warmup_steps``: ``lr * (step + 1) / warmup_steps``, so the first
      step already moves and the last warmup step reaches ``lr``;
    - ``warmup_steps <= step < total_steps``: cosine from ``lr`` to ``min_lr``;
    - ``step >= total_steps``: ``min_lr``.

    Always within ``[min_lr, lr]`` (early warmup steps are lifted to the floor).
    With ``warmup_steps >= total_steps`` the whole run is warmup.
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step ({step}) and warmup_steps ({warmup_steps}) must be >= 0")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"need 0 <= min_lr <= lr, got min_lr={min_lr}, lr={lr}")
    if step >= total_steps:
        return min_lr
    if step < warmup_steps:
        value = lr * (step + 1) / warmup_steps
    else:
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        value = min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    # The clamp also absorbs float rounding at both ends.
    return min(lr, max(min_lr, value))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
