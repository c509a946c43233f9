"""What the student learns: the teacher's latents at masked tokens.

- ``salt`` mode (docs/DESIGN.md's default): the encoder sees only the visible tokens, the
  narrow predictor fills in the masked ones.
- ``mask-token`` mode: a learned mask token replaces every patch outside the
  context inside the encoder, which runs over all 1568 tokens; a linear head predicts.

The loss is MSE (or L1) on the target tokens only, against per-token layer-normed
teacher latents (VideoMAEModel's output has no final norm), in float32; with
several mask groups (multiblock: short- and long-range), the mean of the groups'
losses, each group with its own context and targets (salt_train/masks.py).
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared import geometry
from shared.config import LossKind, ModelConfig, ModelMode
from shared.flops import vit_forward_flops
from salt_train.predictor import Predictor
from salt_train.student import VideoViT, build_student, gather_tokens, tubelets, view_tubelets

MODES = get_args(ModelMode)
LOSSES = get_args(LossKind)


def normalise_targets(latents: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """Per-token layer norm without affine parameters, in float32 (fp16 latents would lose the small ones).
    With ``mean`` and ``std`` (``model.target_norm: channel``), each channel is first standardised,
    ``(x - mean) / std``, with the store's statistics, so that no outlier channel dominates the norm."""
    latents = latents.float()
    if mean is not None and std is not None:
        latents = (latents - mean) / std
    return F.layer_norm(latents, latents.shape[-1:])


def regression_loss(predicted: Tensor, targets: Tensor, kind: str) -> Tensor:
    """Mean MSE or L1 in float32 over aligned ``[B, K, D]`` predictions and (normalised) targets."""
    if predicted.shape != targets.shape:  # broadcasting would silently average the wrong pairs
        raise ValueError(f"predictions {tuple(predicted.shape)} and targets {tuple(targets.shape)} differ in shape")
    if kind == "mse":
        return F.mse_loss(predicted.float(), targets.float())
    if kind == "l1":
        return F.l1_loss(predicted.float(), targets.float())
    raise ValueError(f"unknown loss {kind!r} (one of {', '.join(LOSSES)})")


def masked_loss(predictions: Tensor, latents: Tensor, masked: Tensor, kind: str = "mse") -> Tensor:
    """The loss of full-grid predictions ``[B, 1568, D]``: only the tokens at ``masked`` count."""
    targets = normalise_targets(gather_tokens(latents, masked))
    return regression_loss(gather_tokens(predictions, masked), targets, kind)


class SaltStudent(nn.Module):
    """Encoder plus predictor (``salt``) or encoder with mask tokens plus a linear head (``mask-token``)."""

    def __init__(self, encoder: VideoViT, mode: str, teacher_width: int, predictor_width: int,
                 predictor_depth: int, predictor_heads: int) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        self.encoder = encoder
        self.mode = mode
        if mode == "salt":
            self.predictor = Predictor(encoder.width, predictor_width, predictor_depth, predictor_heads, teacher_width)
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.width))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.head = nn.Linear(encoder.width, teacher_width)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward(self, pixels: Tensor, visible: Tensor, masked: Tensor) -> Tensor:
        """Predictions ``[B, M, teacher_width]`` at the ``masked`` token ids, in their order,
        from normalised float pixels ``[B, 3, 16, 224, 224]``."""
        return self.predict(tubelets(pixels), visible, masked, from_uint8=False)

    def predict(self, patches: Tensor, visible: Tensor, masked: Tensor, from_uint8: bool) -> Tensor:
        """The same from tubelets ``[B, 1568, 1536]`` (:func:`tubelets` or :func:`view_tubelets`);
        uint8 ones are normalised after the gather, so only the tubelets embedded are converted."""
        embed = self.encoder.patch_embed
        prepare = embed.normalise if from_uint8 else (lambda x: x)
        if self.mode == "salt":
            context = self.encoder.encode_tokens(self.encoder.embed_at(prepare(gather_tokens(patches, visible)), visible))
            return self.predictor(context, visible, masked)
        # Mask tokens replace the patch content of every token outside the context (targets and
        # tokens left out of both alike, so nothing hidden leaks); positions are added after, so
        # each mask token still knows where it is.
        tokens = embed.embed_tubelets(prepare(patches))
        seen = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        seen.scatter_(1, visible, True)
        tokens = torch.where(seen.unsqueeze(-1), tokens, self.mask_token.to(tokens.dtype))
        tokens = self.encoder.encode_tokens(tokens + self.encoder.positions())
        return self.head(gather_tokens(tokens, masked))


class SaltObjective(nn.Module):
    """The whole differentiable step, from what the loader delivers to the loss, as one module
    so that ``torch.compile`` makes it one graph: uint8 views to normalised visible tubelets,
    the student, the target gather, the per-token layer norm and the loss.

    Its parameters are the student's: DDP wraps it, checkpoints save ``student``.
    """

    def __init__(self, student: SaltStudent, loss: str, standardised_width: int | None = None) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r} (one of {', '.join(LOSSES)})")
        self.student = student
        self.loss = loss
        # model.target_norm: channel: per-channel (x - mean) / std of the targets before the layer norm,
        # set with set_target_standardisation before the first step (None buffers: layer norm only).
        channel = standardised_width is not None
        self.register_buffer("target_mean", torch.zeros(standardised_width) if channel else None, persistent=False)
        self.register_buffer("target_std", torch.ones(standardised_width) if channel else None, persistent=False)

    @torch.no_grad()
    def set_target_standardisation(self, mean: Tensor, std: Tensor) -> None:
        """The run's recorded per-channel statistics (in place: a compiled graph keeps reading these buffers)."""
        if self.target_mean is None or self.target_std is None:
            raise ValueError("this objective was built without per-channel standardisation (model.target_norm: layer)")
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    def forward(self, views: Tensor, latents: Tensor, visible: tuple[Tensor, ...],
                masked: tuple[Tensor, ...]) -> Tensor:
        """uint8 ``[B, 16, 224, 224, 3]``, fp16 ``[B, 1568, D]`` and, per mask group, context ids
        ``[B, V_g]`` and target ids ``[B, M_g]`` -> the mean of the groups' losses."""
        patches = view_tubelets(views)
        losses = []
        for group_visible, group_masked in zip(visible, masked, strict=True):  # unrolled: one graph
            predicted = self.student.predict(patches, group_visible, group_masked, from_uint8=True)
            targets = normalise_targets(gather_tokens(latents, group_masked), self.target_mean, self.target_std)
            losses.append(regression_loss(predicted, targets, self.loss))
        return torch.stack(losses).mean()


def build_salt_student(model_cfg: ModelConfig, teacher_width: int) -> SaltStudent:
    """The student of a pipeline's ``model`` section, predicting ``teacher_width``-wide latents."""
    encoder = build_student(model_cfg.student, kwargs=dict(model_cfg.student_kwargs), pretrained=model_cfg.pretrained,
                            grad_checkpointing=model_cfg.grad_checkpointing)
    return SaltStudent(encoder, model_cfg.mode, teacher_width, model_cfg.predictor_width,
                       model_cfg.predictor_depth, model_cfg.predictor_heads)


def student_flops_per_clip(model_cfg: ModelConfig, teacher_width: int,
                           layout: tuple[tuple[int, int], ...]) -> dict[str, float]:
    """Forward FLOPs per clip of the encoder blocks, the predictor (or head) and the patch
    embedding, summed over the mask groups of ``layout`` (``(context, targets)`` per group,
    :func:`salt_train.masks.mask_layout`), and ``train_step``: 3x their sum (backward ~2x forward)."""
    with torch.device("meta"):  # shapes only: no memory, no init cost, whatever the model size
        encoder = build_student(model_cfg.student, kwargs=dict(model_cfg.student_kwargs))
    width, depth = encoder.width, len(encoder.blocks)
    mlp_ratio = _mlp_ratio(encoder, width)
    tubelet_flops = 2 * 3 * geometry.TUBELET_SIZE * geometry.PATCH_SIZE**2 * width
    encoder_flops = predictor_flops = patch_flops = 0.0
    for context, targets in layout:  # each group runs the encoder and the predictor once
        if model_cfg.mode == "salt":
            encoder_flops += vit_forward_flops(context, width, depth, mlp_ratio)
            pw = model_cfg.predictor_width
            predictor_flops += (vit_forward_flops(context + targets, pw, model_cfg.predictor_depth)
                                + 2 * context * width * pw  # embed the context
                                + 2 * targets * pw * teacher_width)  # output projection
            patch_flops += context * tubelet_flops  # only the context's tubelets are embedded
        else:
            encoder_flops += vit_forward_flops(geometry.NUM_TOKENS, width, depth, mlp_ratio)
            predictor_flops += 2 * targets * width * teacher_width  # the linear head
            patch_flops += geometry.NUM_TOKENS * tubelet_flops
    forward = encoder_flops + predictor_flops + patch_flops
    return {"encoder": encoder_flops, "predictor": predictor_flops, "patch_embed": patch_flops,
            "train_step": 3 * forward}


def _mlp_ratio(encoder: VideoViT, width: int) -> float:
    """Hidden/width of the first block's MLP (timm's ``mlp.fc1``), 4 when the block has another shape."""
    fc1 = getattr(getattr(encoder.blocks[0], "mlp", None), "fc1", None) if len(encoder.blocks) else None
    return fc1.out_features / width if isinstance(fc1, nn.Linear) else 4.0
