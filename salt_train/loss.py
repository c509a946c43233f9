"""What the student learns: the teacher's latents at masked tokens (the model is salt_train/model.py).

The loss is MSE (or L1) on the target tokens only, against per-token layer-normed
teacher latents (VideoMAEModel's output has no final norm), in float32; with
several mask groups (multiblock: short- and long-range), the mean of the groups'
losses, each group with its own context and targets (salt_train/masks.py).
:class:`SaltObjective` wraps the student and this loss into one module for ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.config import LossKind

from salt_train.model import SaltStudent
from salt_train.student import gather_tokens, view_tubelets
from salt_train.target_norm import LAYER_NORM, TargetNorm, normalise_targets


def masked_targets(latents: Tensor, masked: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """The targets at token ids ``masked`` ``[B, M]``: those latents, normalised (:func:`normalise_targets`)."""
    return normalise_targets(gather_tokens(latents, masked), mean, std)


def regression_loss(predicted: Tensor, targets: Tensor, kind: LossKind) -> Tensor:
    """Mean MSE or L1 in float32 over aligned ``[B, K, D]`` predictions and (normalised) targets."""
    if predicted.shape != targets.shape:  # broadcasting would silently average the wrong pairs
        raise ValueError(f"predictions {tuple(predicted.shape)} and targets {tuple(targets.shape)} differ in shape")
    if kind == "l1":  # the recipe allows mse and l1 only (shared.config.LossKind)
        return F.l1_loss(predicted.float(), targets.float())
    return F.mse_loss(predicted.float(), targets.float())


class SaltObjective(nn.Module):
    """The whole differentiable step, from what the loader delivers to the loss, as one module
    so that ``torch.compile`` makes it one graph: uint8 views to normalised visible tubelets,
    the student, the target gather, the per-token layer norm and the loss.

    Its parameters are the student's: DDP wraps it, checkpoints save ``student``.
    """

    # Buffers (register_buffer below), declared for the type checker.
    target_mean: Tensor | None
    target_std: Tensor | None

    def __init__(self, student: SaltStudent, loss: LossKind, target_norm: TargetNorm = LAYER_NORM) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        # Buffers, so that .to(device) moves them with the student (None: layer norm only).
        self.register_buffer("target_mean", _copy(target_norm.mean), persistent=False)
        self.register_buffer("target_std", _copy(target_norm.std), persistent=False)

    def forward(
        self, views: Tensor, latents: Tensor, visible: tuple[Tensor, ...], masked: tuple[Tensor, ...]
    ) -> Tensor:
        """uint8 ``[B, 16, 224, 224, 3]``, fp16 ``[B, 1568, D]`` and, per mask group, context ids
        ``[B, V_g]`` and target ids ``[B, M_g]`` -> the mean of the groups' losses."""
        losses = [
            regression_loss(predicted, targets, self.loss)
            for predicted, targets in self.group_outputs(views, latents, visible, masked)
        ]
        return torch.stack(losses).mean()

    def group_outputs(
        self, views: Tensor, latents: Tensor, visible: tuple[Tensor, ...], masked: tuple[Tensor, ...]
    ) -> list[tuple[Tensor, Tensor]]:
        """Per mask group, the student's predictions and the normalised targets ``[B, M_g, D]`` at its
        target tokens: what :meth:`forward` scores, and what the evaluation's held-out loss reads."""
        patches = view_tubelets(views)
        outputs = []
        for group, (group_visible, group_masked) in enumerate(zip(visible, masked, strict=True)):  # unrolled
            predicted = self.student.predict(patches, group_visible, group_masked, from_uint8=True, group=group)
            targets = masked_targets(latents, group_masked, self.target_mean, self.target_std)
            outputs.append((predicted, targets))
        return outputs


def _copy(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.clone()
