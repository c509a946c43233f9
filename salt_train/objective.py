"""What the student learns: teacher latents at masked tokens.

- ``salt`` mode (DESIGN's default): the encoder sees only the visible tokens, the
  narrow predictor fills in the masked ones.
- ``mask-token`` mode: a learned mask token replaces the masked patches inside
  the encoder, which runs over all 1568 tokens; a linear head predicts.

The loss is MSE (or L1) on masked tokens only, against per-token layer-normed
teacher latents (VideoMAEModel's output has no final norm), in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared import geometry
from shared.config import ModelConfig
from shared.flops import vit_forward_flops
from salt_train.predictor import Predictor, gather
from salt_train.student import VideoViT, build_student


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[b, ids[b]]``: ``[B, N, D]`` and ``[B, K]`` -> ``[B, K, D]``."""
    return gather(x, ids)


def normalise_targets(latents: torch.Tensor) -> torch.Tensor:
    """Per-token layer norm without affine parameters, in float32."""
    latents = latents.float()
    return F.layer_norm(latents, latents.shape[-1:])


def regression_loss(predicted: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(predicted.float(), targets)
    if kind == "l1":
        return F.l1_loss(predicted.float(), targets)
    raise ValueError(f"unknown loss {kind!r} (mse or l1)")


def masked_loss(predictions: torch.Tensor, latents: torch.Tensor, masked: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The loss of full-grid predictions ``[B, 1568, D]``: only the masked tokens count."""
    return regression_loss(gather_tokens(predictions, masked), normalise_targets(gather_tokens(latents, masked)), kind)


class SaltStudent(nn.Module):
    """Encoder plus predictor (``salt``) or encoder with mask tokens plus a linear head (``mask-token``)."""

    def __init__(self, encoder: VideoViT, mode: str, teacher_width: int, predictor_width: int,
                 predictor_depth: int, predictor_heads: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.mode = mode
        if mode == "salt":
            self.predictor = Predictor(encoder.width, predictor_width, predictor_depth, predictor_heads, teacher_width)
        elif mode == "mask-token":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.width))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.head = nn.Linear(encoder.width, teacher_width)
        else:
            raise ValueError(f"unknown mode {mode!r}")

    def forward(self, pixels: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Predictions ``[B, M, teacher_width]`` at the ``masked`` token ids."""
        if self.mode == "salt":
            return self.predictor(self.encoder(pixels, token_ids=visible), visible, masked)
        patches = self.encoder.patch_embed(pixels)
        is_masked = torch.zeros(patches.shape[:2], dtype=torch.bool, device=patches.device)
        is_masked.scatter_(1, masked, True)
        patches = torch.where(is_masked.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        tokens = self.encoder.encode_tokens(patches + self.encoder.positions())
        return self.head(gather(tokens, masked))


def build_salt_student(model_cfg: ModelConfig, teacher_width: int) -> SaltStudent:
    encoder = build_student(model_cfg.student, kwargs=dict(model_cfg.student_kwargs), pretrained=model_cfg.pretrained,
                            grad_checkpointing=model_cfg.grad_checkpointing)
    return SaltStudent(encoder, model_cfg.mode, teacher_width, model_cfg.predictor_width,
                       model_cfg.predictor_depth, model_cfg.predictor_heads)


def student_flops_per_clip(model_cfg: ModelConfig, teacher_width: int, masked_count: int) -> dict[str, float]:
    """Forward FLOPs of the encoder and the predictor (or head), and a training step (~3x forward)."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        encoder = build_student(model_cfg.student, kwargs=dict(model_cfg.student_kwargs))
    width, depth = encoder.width, len(encoder.blocks)
    mlp_ratio = encoder.blocks[0].mlp.fc1.out_features / width
    if model_cfg.mode == "salt":
        encoder_flops = vit_forward_flops(geometry.NUM_TOKENS - masked_count, width, depth, mlp_ratio)
        head_flops = vit_forward_flops(geometry.NUM_TOKENS, model_cfg.predictor_width, model_cfg.predictor_depth)
        head_flops += 2 * masked_count * model_cfg.predictor_width * teacher_width
    else:
        encoder_flops = vit_forward_flops(geometry.NUM_TOKENS, width, depth, mlp_ratio)
        head_flops = 2 * masked_count * width * teacher_width
    patch_flops = 2 * geometry.NUM_TOKENS * 3 * geometry.TUBELET_SIZE * geometry.PATCH_SIZE**2 * width
    forward = encoder_flops + head_flops + patch_flops
    return {"encoder": encoder_flops, "predictor": head_flops, "train_step": 3 * forward}
