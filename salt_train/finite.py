"""Non-finite steps: skipped on the device, without a host sync, and reported at log time.

One ``inf`` in one latent row makes a step's loss and gradients NaN; applied, that NaN
reaches every weight and every later checkpoint. :func:`guarded_step` decides on the
device: the fused AdamW kernel takes a ``found_inf`` flag (the one ``GradScaler``
uses) and then leaves weights, moments and step count untouched. The flag is read
with the losses at log time (:class:`salt_train.metrics.HealthWindow`), and the
skipped steps and their rows are logged (:class:`salt_train.run_checks.SkippedSteps`).

The decision uses the gradient norm only: under DDP it is computed from the
all-reduced gradients, so every rank skips the same steps. A non-finite loss does not
always give non-finite gradients (L1's are signs), so the step multiplies the loss by a
factor that is exactly 1.0 when it is finite and NaN when not before its backward
(:meth:`salt_train.step.Stepper.step`): nothing non-finite is missed.
"""

from __future__ import annotations

import numpy as np
import torch


def guarded_step(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
    """``optimizer.step()`` unless ``grad_norm`` is non-finite; returns the device-side "applied" flag."""
    finite = torch.isfinite(grad_norm).detach()
    if optimizer.defaults.get("fused"):
        # read by the fused kernel on the device; an attribute torch's Optimizer does not declare
        optimizer.found_inf = (~finite).to(torch.float32)  # type: ignore[attr-defined]
        optimizer.step()
    elif bool(finite):  # other AdamW implementations take no flag: a host read (CPU-only in practice)
        optimizer.step()
    return finite


def nonfinite_latent_rows(store, rows: list[int]) -> list[int]:
    """Which of ``rows`` hold a NaN or inf latent (read again from the store: rare, so no per-step cost)."""
    from shared.rows import read_rows

    ordered = np.unique(np.asarray(rows, dtype=np.int64))
    try:
        (latents,) = read_rows(store, ordered, ("latents",))
    except Exception:  # the row is unreadable now: the loader's own checks will say so
        return []
    bad = ~np.isfinite(latents.reshape(len(ordered), -1)).all(axis=1)
    return [int(r) for r in ordered[bad]]
