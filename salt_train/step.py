"""One optimizer step of SALT, shared by `salt-train run` and `salt-train bench`.

uint8 pixels and fp16 latents arrive from the loader; on the device: normalise,
draw the step's masks (a pure function of seed and step), forward under bf16
autocast on CUDA (fp32 on CPU), MSE (or L1) on the masked tokens against
per-token layer-normed teacher latents, backward, clip, AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from shared.config import PipelineConfig
from shared.distributed import Dist
from salt_train.data import to_model_inputs
from salt_train.finite import guarded_step
from salt_train.masks import make_masks
from salt_train.objective import SaltStudent, build_salt_student, gather_tokens, normalise_targets, regression_loss
from salt_train.optim import build_optimizer
from salt_train.schedule import lr_at, set_lr


def resolve_compile_mode(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "max-autotune" if device.type == "cuda" else "off"
    return requested


@dataclass
class StepResult:
    loss: torch.Tensor  # detached, on the device: read it only at log time (no sync per step)
    grad_norm: torch.Tensor
    lr: float
    clips: int
    applied: torch.Tensor | None = None  # device bool: False when non-finite gradients skipped the update


class Stepper:
    """The student, its optimizer and the (optionally compiled) forward, stepping one batch at a time.

    Under torchrun the forward runs through DistributedDataParallel: each rank steps on its
    slice of the global batch, with that slice's masks, and DDP averages the gradients, so
    every rank takes the step one process would take on the whole batch (float rounding aside).
    """

    def __init__(self, config: PipelineConfig, teacher_width: int, device: torch.device, total_steps: int,
                 dist: Dist = Dist()) -> None:
        self.config = config
        self.device = device
        self.total_steps = total_steps
        self.rank, self.world_size = dist.rank, dist.world_size
        torch.manual_seed(config.train.seed)  # the student's initial weights (DDP also broadcasts rank 0's)
        self.model: SaltStudent = build_salt_student(config.model, teacher_width).to(device)
        self.optimizer = build_optimizer(self.model, lr=config.train.lr, weight_decay=config.train.weight_decay,
                                         device=device)
        self.compile_mode = resolve_compile_mode(config.model.compile_mode, device)
        trained: torch.nn.Module = self.model
        if dist.enabled:
            trained = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        # Static shapes (fixed batch, fixed masked count) keep the compiled graph from recompiling.
        self.forward = torch.compile(trained, mode=self.compile_mode) if self.compile_mode != "off" else trained
        self.autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    def step(self, batch: dict, step: int) -> StepResult:
        train, mask = self.config.train, self.config.mask
        pixels, latents = to_model_inputs(batch, self.device)
        local = pixels.shape[0]  # this rank's slice of the global batch, and of its masks
        masks = make_masks(mask.kind, mask.ratio, local * self.world_size, train.seed, step)
        masks = masks[self.rank * local:(self.rank + 1) * local].to(self.device, non_blocking=True)
        lr = lr_at(step, lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_steps, total_steps=self.total_steps)
        set_lr(self.optimizer, lr)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            predicted = self.forward(pixels, masks.visible, masks.masked)
        targets = normalise_targets(gather_tokens(latents, masks.masked))
        loss = regression_loss(predicted, targets, self.config.model.loss)  # in float32
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip)
        applied = guarded_step(self.optimizer, grad_norm)  # a non-finite step is skipped on the device
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss.detach(), grad_norm.detach(), lr, pixels.shape[0], applied)
