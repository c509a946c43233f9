"""The narrow predictor of SALT mode (V-JEPA's shape: width 384, depth 12, 12 heads).

It sees the encoder's outputs at the context (visible) tokens plus a learned
mask token at every target (masked) position, each with its grid position, and
predicts the teacher latent at the targets. As V-JEPA's predictor, it learns one
mask token per mask group (multiblock: short- and long-range), so the predictor
can tell which kind of gap it fills. Narrow on purpose: the predictor
runs on context and targets together (up to all 1568 tokens), the encoder on
the context only (a quarter or less of the grid).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from shared import geometry
from shared.errors import SaltUsageError

from salt_train.student import gather_tokens


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``[N]`` positions -> ``[N, dim]`` (dim even): sin then cos at geometric frequencies (MAE, V-JEPA)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_positions_3d(width: int) -> Tensor:
    """Fixed 3D sin-cos positions ``[1, 1568, width]`` in token order ``t*196 + h*14 + w``.

    As V-JEPA's predictor: half the channels encode time, a quarter each the
    row and the column; channels left over by odd splits stay zero.
    """
    t, h, w = torch.meshgrid(
        torch.arange(geometry.GRID_T), torch.arange(geometry.GRID_H), torch.arange(geometry.GRID_W), indexing="ij"
    )
    dims = [2 * (width // 4), 2 * (width // 8), 2 * (width // 8)]
    parts = [_sincos_1d(d, axis.flatten()) for d, axis in zip(dims, (t, h, w), strict=False) if d > 0]
    table = torch.cat(parts, dim=1) if parts else torch.zeros(geometry.NUM_TOKENS, 0, dtype=torch.float64)
    table = nn.functional.pad(table, (0, width - table.shape[1]))
    return table.float().unsqueeze(0)


class Predictor(nn.Module):
    """Encoder outputs at ``visible`` plus mask tokens at ``masked`` -> predictions at ``masked``."""

    pos_embed: Tensor  # a buffer (register_buffer below), declared for the type checker

    def __init__(self, encoder_width: int, width: int, depth: int, heads: int, out_width: int, groups: int = 1) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"predictor width {width} is not divisible by its {heads} heads")
        if groups < 1:
            raise ValueError(f"a predictor needs at least one mask group, got {groups}")
        self.embed = nn.Linear(encoder_width, width)
        self.mask_tokens = nn.Parameter(torch.zeros(groups, 1, width))  # one per mask group, as V-JEPA's
        # Fixed 3D sin-cos positions (V-JEPA's predictor, VideoMAE's decoder): the predictor
        # starts from scratch, and a fixed table tells it where every mask token sits from
        # step 0, with no parameters to learn. Non-persistent: rebuilt, never checkpointed.
        self.register_buffer("pos_embed", sincos_positions_3d(width), persistent=False)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # timm ViT's and V-JEPA's
        self.blocks = nn.ModuleList(
            # timm types norm_layer type[Module] but only calls it; its own ViT passes such a partial.
            Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)  # type: ignore[arg-type]
            for _ in range(depth)
        )
        self.norm = norm_layer(width)
        self.head = nn.Linear(width, out_width)
        nn.init.trunc_normal_(self.mask_tokens, std=0.02)
        self.apply(_init_linear)

    @property
    def groups(self) -> int:
        return self.mask_tokens.shape[0]

    def forward(self, context: Tensor, visible: Tensor, masked: Tensor, group: int = 0) -> Tensor:
        """context ``[B, V, encoder_width]`` at ``visible`` ids -> ``[B, M, out_width]`` at ``masked``, in its
        order; ``group``: the mask group the targets come from (its mask token fills them)."""
        batch = context.shape[0]
        positions = self.pos_embed.to(context.dtype).expand(batch, -1, -1)
        seen = self.embed(context) + gather_tokens(positions, visible)
        queries = self.mask_tokens[group].expand(batch, masked.shape[1], -1) + gather_tokens(positions, masked)
        # Attention is order-free: ids travel in the positions, so no scatter into grid order is needed.
        tokens = torch.cat([seen, queries], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, seen.shape[1] :]))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        """Refuse, in one line, weights of the one-token predictor this one replaced."""
        if prefix + "mask_token" in state_dict and prefix + "mask_tokens" not in state_dict:
            raise SaltUsageError(
                f"these weights have one predictor mask token ({prefix}mask_token), from before the predictor "
                f"learned one per mask group ({prefix}mask_tokens, V-JEPA's): this version cannot load them; "
                "train a new run (its export/, the encoder alone, still loads)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
