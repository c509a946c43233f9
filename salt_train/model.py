"""The model: the student encoder with its predictor (``salt``) or mask token and linear head
(``mask-token``), built from a pipeline's ``model`` section, and its FLOPs per clip.

- ``salt`` mode (docs/DESIGN.md's default): the encoder sees only the visible tokens, the
  narrow predictor fills in the masked ones.
- ``mask-token`` mode: a learned mask token replaces every patch outside the
  context inside the encoder, which runs over all 1568 tokens; a linear head predicts.

What it learns from is the loss (salt_train/loss.py).
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import Tensor, nn

from shared import geometry
from shared.config import MaskConfig, ModelConfig, ModelMode
from shared.flops import vit_forward_flops

from salt_train.masks import mask_layout
from salt_train.predictor import Predictor
from salt_train.student import VideoViT, build_student, gather_tokens, tubelets

MODES = get_args(ModelMode)


class SaltStudent(nn.Module):
    """Encoder plus predictor (``salt``) or encoder with mask tokens plus a linear head (``mask-token``)."""

    def __init__(
        self,
        encoder: VideoViT,
        mode: str,
        teacher_width: int,
        predictor_width: int,
        predictor_depth: int,
        predictor_heads: int,
        groups: int = 1,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        self.encoder = encoder
        self.mode = mode
        if mode == "salt":
            self.predictor = Predictor(
                encoder.width, predictor_width, predictor_depth, predictor_heads, teacher_width, groups
            )
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.width))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.head = nn.Linear(encoder.width, teacher_width)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward(self, pixels: Tensor, visible: Tensor, masked: Tensor, group: int = 0) -> Tensor:
        """Predictions ``[B, M, teacher_width]`` at the ``masked`` token ids, in their order,
        from normalised float pixels ``[B, 3, 16, 224, 224]``; ``group``: the mask group of the targets."""
        return self.predict(tubelets(pixels), visible, masked, from_uint8=False, group=group)

    def predict(self, patches: Tensor, visible: Tensor, masked: Tensor, from_uint8: bool, group: int = 0) -> Tensor:
        """The same from tubelets ``[B, 1568, 1536]`` (:func:`tubelets` or :func:`view_tubelets`);
        uint8 ones are normalised after the gather, so only the tubelets embedded are converted."""
        embed = self.encoder.patch_embed
        prepare = embed.normalise if from_uint8 else (lambda x: x)
        if self.mode == "salt":
            embedded = self.encoder.embed_at(prepare(gather_tokens(patches, visible)), visible)
            context = self.encoder.encode_tokens(embedded)
            return self.predictor(context, visible, masked, group)
        # Mask tokens replace the patch content of every token outside the context (targets and
        # tokens left out of both alike, so nothing hidden leaks); positions are added after, so
        # each mask token still knows where it is.
        tokens = embed.embed_tubelets(prepare(patches))
        seen = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        seen.scatter_(1, visible, True)
        tokens = torch.where(seen.unsqueeze(-1), tokens, self.mask_token.to(tokens.dtype))
        tokens = self.encoder.encode_tokens(tokens + self.encoder.positions())
        return self.head(gather_tokens(tokens, masked))


def build_salt_student(model_cfg: ModelConfig, teacher_width: int, groups: int = 1) -> SaltStudent:
    """The student of a pipeline's ``model`` section, predicting ``teacher_width``-wide latents;
    ``groups``: the mask groups its predictor has a mask token for (:func:`mask_groups`)."""
    encoder = build_student(
        model_cfg.student,
        kwargs=dict(model_cfg.student_kwargs),
        pretrained=model_cfg.pretrained,
        grad_checkpointing=model_cfg.grad_checkpointing,
    )
    return SaltStudent(
        encoder,
        model_cfg.mode,
        teacher_width,
        model_cfg.predictor_width,
        model_cfg.predictor_depth,
        model_cfg.predictor_heads,
        groups,
    )


def mask_groups(mask_cfg: MaskConfig) -> int:
    """How many mask groups a step draws (multiblock: 2), so how many predictor mask tokens."""
    return len(mask_layout(mask_cfg.kind, mask_cfg.ratio))


def student_flops_per_clip(
    model_cfg: ModelConfig, teacher_width: int, layout: tuple[tuple[int, int], ...]
) -> dict[str, float]:
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
            predictor_flops += (
                vit_forward_flops(context + targets, pw, model_cfg.predictor_depth)
                + 2 * context * width * pw  # embed the context
                + 2 * targets * pw * teacher_width
            )  # output projection
            patch_flops += context * tubelet_flops  # only the context's tubelets are embedded
        else:
            encoder_flops += vit_forward_flops(geometry.NUM_TOKENS, width, depth, mlp_ratio)
            predictor_flops += 2 * targets * width * teacher_width  # the linear head
            patch_flops += geometry.NUM_TOKENS * tubelet_flops
    forward = encoder_flops + predictor_flops + patch_flops
    return {
        "encoder": encoder_flops,
        "predictor": predictor_flops,
        "patch_embed": patch_flops,
        "train_step": 3 * forward,
    }


def _mlp_ratio(encoder: VideoViT, width: int) -> float:
    """Hidden/width of the first block's MLP (timm's ``mlp.fc1``), 4 when the block has another shape."""
    fc1 = getattr(getattr(encoder.blocks[0], "mlp", None), "fc1", None) if len(encoder.blocks) else None
    return fc1.out_features / width if isinstance(fc1, nn.Linear) else 4.0
