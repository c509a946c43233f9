"""The narrow predictor of SALT mode (V-JEPA's shape: width 384, depth 12).

It sees the encoder's outputs at the visible tokens plus a learned mask token
at every masked position, each with its position, over all 1568 tokens, and
predicts the teacher latent at the masked ones.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from shared import geometry


def gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Predictor(nn.Module):
    def __init__(self, encoder_width: int, width: int, depth: int, heads: int, out_width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # Learned positions: the grid is fixed (contract), and V-JEPA's fixed sincos gains nothing here.
        self.pos_embed = nn.Parameter(torch.zeros(1, geometry.NUM_TOKENS, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_width)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def forward(self, context: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """context ``[B, V, encoder_width]`` at ``visible`` ids -> predictions ``[B, M, out_width]`` at ``masked``."""
        batch = context.shape[0]
        positions = self.pos_embed.expand(batch, -1, -1)
        seen = self.embed(context) + gather(positions, visible)
        queries = self.mask_token.expand(batch, masked.shape[1], -1) + gather(positions, masked)
        tokens = torch.cat([seen, queries], dim=1)  # attention needs no order: ids travel in the positions
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, seen.shape[1]:]))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
