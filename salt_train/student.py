"""The student encoder: any timm VisionTransformer made into a video encoder.

timm gives the blocks and the final norm (their state-dict keys stay timm's);
we replace the 2D patch embedding with a Conv3d tubelet embedding (2x16x16)
inflated from the 2D weights, and the 196 spatial positions with 1568: the
spatial ones repeated over the 8 temporal slots, plus a learned temporal
embedding. No class token: SALT regresses per-token latents.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from shared import geometry
from shared.errors import SaltUsageError


def create_timm_vit(model_name: str, kwargs: dict | None = None) -> nn.Module:
    """``timm.create_model`` of a ViT, refusing unknown names and non-ViT models with one line."""
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (close: {', '.join(close)})" if close else " (timm.list_models('vit_*') lists them)"
        raise SaltUsageError(f"model.student: unknown timm model {model_name}{hint}")
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **(kwargs or {}))
    except TypeError as exc:
        raise SaltUsageError(f"model.student_kwargs: {model_name} refuses them ({exc})") from None
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not (hasattr(model, "blocks") and hasattr(model, "norm") and hasattr(model, "pos_embed")
            and isinstance(proj, nn.Conv2d) and tuple(proj.kernel_size) == (geometry.PATCH_SIZE,) * 2):
        raise SaltUsageError(f"model.student: {model_name} is not a timm ViT with 16x16 patches "
                             "(needs blocks, norm, pos_embed and a Conv2d patch_embed.proj)")
    return model


def load_2d_weights(model: nn.Module, path: str) -> None:
    """A local 2D timm checkpoint into the freshly created 2D model (timm's loader: safetensors, no pickle)."""
    file = Path(path)
    if not file.is_file():
        raise SaltUsageError(f"model.pretrained: {path} is not a file")
    try:
        timm.models.load_checkpoint(model, str(file), strict=False, weights_only=True)
    except Exception as exc:
        raise SaltUsageError(f"model.pretrained: cannot load {path} ({type(exc).__name__}: {exc})".splitlines()[0]) from None


class PatchEmbed3d(nn.Module):
    """Conv3d tubelet embedding stored as ``patch_embed.proj`` (timm's key)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        kernel = (geometry.TUBELET_SIZE, geometry.PATCH_SIZE, geometry.PATCH_SIZE)
        self.proj = nn.Conv3d(3, width, kernel_size=kernel, stride=kernel)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [B, 1568, D], index t*196 + h*14 + w


class VideoViT(nn.Module):
    """A timm ViT turned into a video encoder over the 1568-token grid."""

    def __init__(self, vit: nn.Module, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.width = int(vit.embed_dim)
        self.patch_embed = PatchEmbed3d(self.width)
        proj2d = vit.patch_embed.proj
        with torch.no_grad():  # a static video gives the 2D embedding: the two frames share the weight
            self.patch_embed.proj.weight.copy_(proj2d.weight.unsqueeze(2).repeat(1, 1, geometry.TUBELET_SIZE, 1, 1)
                                               / geometry.TUBELET_SIZE)
            if proj2d.bias is not None:
                self.patch_embed.proj.bias.copy_(proj2d.bias)
            else:
                self.patch_embed.proj.bias.zero_()
        spatial = vit.pos_embed.detach()[:, getattr(vit, "num_prefix_tokens", 0):]
        if spatial.shape[1] != geometry.TOKENS_PER_FRAME:
            raise SaltUsageError(f"model.student: {spatial.shape[1]} spatial positions, expected "
                                 f"{geometry.TOKENS_PER_FRAME} (a 224 px, patch 16 ViT)")
        self.pos_embed = nn.Parameter(spatial.repeat(1, geometry.GRID_T, 1).clone())
        self.temporal_embed = nn.Parameter(torch.zeros(1, geometry.GRID_T, 1, self.width))
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.grad_checkpointing = grad_checkpointing

    def positions(self) -> torch.Tensor:
        temporal = self.temporal_embed.expand(-1, -1, geometry.TOKENS_PER_FRAME, -1).reshape(1, geometry.NUM_TOKENS, -1)
        return self.pos_embed + temporal

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus positions: ``[B, 1568, width]``."""
        return self.patch_embed(pixels) + self.positions()

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, pixels: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 3, 16, 224, 224]`` -> ``[B, K, width]`` for the given token ids (all 1568 when None)."""
        tokens = self.embed(pixels)
        if token_ids is not None:
            tokens = torch.gather(tokens, 1, token_ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.encode_tokens(tokens)


def build_student(model_name: str, *, kwargs: dict | None = None, pretrained: str | None = None,
                  grad_checkpointing: bool = False) -> VideoViT:
    vit = create_timm_vit(model_name, kwargs)
    if pretrained:
        load_2d_weights(vit, pretrained)
    return VideoViT(vit, grad_checkpointing)
