"""How the probe learns: V-JEPA's ``init_opt`` and step, with gradient accumulation to the global batch.

- AdamW (torch's defaults otherwise) in two groups: weights take ``weight_decay``; biases and every 1-D
  tensor (norm scales) take none. The learned query (``[1, 1, width]``) is not 1-D: it decays, as in V-JEPA.
- Per optimizer step ``s`` of ``S`` (no warmup): ``lr = final + (lr0 - final) * (1 + cos(pi * (s + 1) / S)) / 2``,
  from just under ``lr`` to ``final_lr`` at the last step; the decayed group's weight decay follows the
  same cosine from ``weight_decay`` to ``final_weight_decay`` (V-JEPA's ``CosineWDSchedule``).
- A step's gradient is that of the mean cross-entropy over its whole global batch: each micro-batch adds
  its summed loss divided by the global batch size (times the rank count, which DDP's all-reduce divides
  again), so micro-batches and ranks change nothing but the rounding. Then the gradient norm is clipped
  (``grad_clip``, 1.0 in V-JEPA) and AdamW steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

# (model, inputs) -> logits [B, classes]
LogitsFn = Callable[[nn.Module, Tensor], Tensor]


def decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed): biases and 1-D tensors are not decayed."""
    decayed: list[nn.Parameter] = []
    kept: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (kept if name.endswith("bias") or parameter.ndim == 1 else decayed).append(parameter)
    return decayed, kept


def make_optimizer(model: nn.Module, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    decayed, kept = decay_groups(model)
    groups = [
        {"params": decayed, "weight_decay": weight_decay, "decays": True},
        {"params": kept, "weight_decay": 0.0, "decays": False},
    ]
    return torch.optim.AdamW(groups, fused=fused)


@dataclass(frozen=True)
class CosineSchedule:
    """Learning rate and weight decay of optimizer step ``step`` (0-based) of ``total``."""

    total: int
    lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float

    def _cosine(self, step: int, start: float, end: float) -> float:
        progress = min(1.0, (step + 1) / max(1, self.total))
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_at(self, step: int) -> float:
        return max(self.final_lr, self._cosine(step, self.lr, self.final_lr))

    def weight_decay_at(self, step: int) -> float:
        value = self._cosine(step, self.weight_decay, self.final_weight_decay)
        low, high = sorted((self.weight_decay, self.final_weight_decay))
        return min(high, max(low, value))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr_at(step)
            if group.get("decays"):
                group["weight_decay"] = self.weight_decay_at(step)


def accumulate(
    model: nn.Module,
    logits_of: LogitsFn,
    inputs: Tensor,
    labels: Tensor,
    keep: Tensor,
    global_size: int,
    world_size: int,
    last: bool,
) -> Tensor:
    """Add one micro-batch's share of the global batch's mean cross-entropy to the gradients; returns the
    per-video losses (detached). Under DDP only the ``last`` micro-batch of a step all-reduces."""
    sync = nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
    with sync:
        per_video = F.cross_entropy(logits_of(model, inputs).float(), labels, reduction="none") * keep
        (per_video.sum() * (world_size / global_size)).backward()
    return per_video.detach()


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, schedule: CosineSchedule, step: int, grad_clip: float
) -> float:
    """Clip the accumulated gradient, step with the schedule's values for ``step``, clear; the norm before."""
    schedule.apply(optimizer, step)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)
