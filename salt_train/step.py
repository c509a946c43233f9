"""One optimizer step of SALT, shared by `salt-train run` and `salt-train bench`.

uint8 pixels, fp16 latents and the step's masks arrive from the loader (already on
the device when a :class:`salt_train.feed.BatchFeed` delivers them). One compiled
module (:class:`SaltObjective`) goes from there to the loss: visible tubelets
normalised and embedded, encoder, predictor, target gather, per-token layer norm,
MSE (or L1), under bf16 autocast on CUDA (fp32 on CPU); then backward, clip, AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shared.config import ModelConfig, PipelineConfig, TrainConfig
from shared.distributed import Dist

from salt_train.attention import attention_backends, attention_context
from salt_train.feed import ON_DEVICE, to_device
from salt_train.finite import guarded_step
from salt_train.loss import SaltObjective
from salt_train.model import SaltStudent, build_salt_student, mask_groups
from salt_train.optim import build_optimizer
from salt_train.schedule import lr_at, set_lr
from salt_train.target_norm import LAYER_NORM, TargetNorm

if TYPE_CHECKING:
    from salt_train.pixel_teacher import PixelTeacher


def resolve_compile_mode(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "max-autotune" if device.type == "cuda" else "off"
    return requested


def seeded_student(config: PipelineConfig, teacher_width: int) -> SaltStudent:
    """The student's initial weights, a pure function of ``train.seed`` (DDP also broadcasts rank 0's)."""
    torch.manual_seed(config.train.seed)
    return build_salt_student(config.model, teacher_width, mask_groups(config.mask))


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

    def __init__(
        self,
        student: SaltStudent | PixelTeacher,
        train: TrainConfig,
        model: ModelConfig,
        device: torch.device,
        total_steps: int,
        dist: Dist = Dist(),
        objective: nn.Module | None = None,
        target_norm: TargetNorm = LAYER_NORM,
    ) -> None:
        """``student``: one :func:`seeded_student` built earlier (a run refuses a bad model before it
        writes anything, and knows its step total only once it has its snapshot). ``objective``: another
        loss module over ``student`` (stage 1's :class:`~salt_train.pixel_teacher.PixelObjective` over the
        teacher it trains), called like :class:`SaltObjective`; default: SALT's, over the student, with
        the run's ``target_norm``."""
        self.train = train
        self.device = device
        self.total_steps = total_steps
        self.model: SaltStudent | PixelTeacher = student.to(device)
        self.optimizer = build_optimizer(self.model, lr=train.lr, weight_decay=train.weight_decay, device=device)
        self.compile_mode = resolve_compile_mode(model.compile_mode, device)
        if objective is None:
            assert isinstance(self.model, SaltStudent)  # the default objective is SALT's, over a student
            objective = SaltObjective(self.model, model.loss, target_norm)
        self.objective = objective.to(device)
        trained: torch.nn.Module = self.objective
        if dist.enabled:
            trained = DistributedDataParallel(
                self.objective, device_ids=[device.index] if device.type == "cuda" else None
            )
        # One graph from uint8 views to the loss; static shapes (fixed batch, fixed mask counts)
        # and the learning rate outside it keep it from recompiling.
        self.forward = torch.compile(trained, mode=self.compile_mode) if self.compile_mode != "off" else trained
        self.autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
        self.attention = attention_backends(model.attention, device)

    def inputs(self, batch: dict) -> tuple:
        """Views, latents and, per mask group, the visible and masked ids (the loader's workers draw them,
        StreamSpec.mask_kind), on the device; no latents in a stream of pixels only (salt-train teacher): None."""
        return tuple(to_device(batch[name], self.device, True) if name in batch else None for name in ON_DEVICE)

    def step(self, batch: dict, step: int) -> StepResult:
        train = self.train
        views, latents, visible, masked = self.inputs(batch)
        lr = lr_at(
            step, lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_steps, total_steps=self.total_steps
        )
        set_lr(self.optimizer, lr)
        if self.compile_mode != "off" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (max-autotune)
        with (
            torch.autocast(
                self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
            ),
            attention_context(self.attention),
        ):
            loss = self.forward(views, latents, visible, masked)  # in float32
        # A non-finite loss must skip the step even where its gradients are finite (L1's are signs): a factor of
        # exactly 1.0, or NaN, carries it into every gradient and so into the all-reduced norm all ranks decide on.
        carry_nonfinite = loss.detach() - loss.detach() + 1.0
        (loss * carry_nonfinite).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip)
        applied = guarded_step(self.optimizer, grad_norm)  # a non-finite step is skipped on the device
        self.optimizer.zero_grad(set_to_none=True)
        # A copy: under CUDA graphs the compiled graph's output buffer is overwritten by the next
        # step, and the loss is kept until the next health line.
        return StepResult(loss.detach().clone(), grad_norm.detach(), lr, views.shape[0], applied)
