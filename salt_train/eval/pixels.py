"""The encoder-free feature: the floor a real encoder must clear on every probe.

:class:`PixelFeatures` is a :class:`~salt_train.eval.features.FeatureModel`
with no weights at all. Each token of the contract's grid (a 2-frame, 16x16
tubelet) gets 36 numbers computed from its own pixels only:

- each of its two frames averaged down to 2x2 (RGB in [0, 1]): 24 numbers, what
  the tubelet looks like, coarsely;
- the mean absolute difference between its two frames over each of the four
  8x8 quarters (RGB, at full resolution): 12 numbers, how much it moves.

The evaluation then pools these tokens exactly as it pools an encoder's (the
mean over tokens, the mean per time slot, the tokens themselves for the
attentive probe), so a probe that this column passes can be passed by colour
and motion energy alone, with no model of time or objects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared import geometry

POOL = 8  # 16x16 patch -> 2x2 per frame
WIDTH = 2 * 3 * (geometry.PATCH_SIZE // POOL) ** 2 + 3 * (geometry.PATCH_SIZE // POOL) ** 2  # 24 + 12
HEADS = 4  # the attentive probe's heads on this 36-wide feature (no encoder to take a head count from)


def pixel_tokens(views: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, T, 224, 224, 3]`` -> float32 ``[B, T/2 * 196, 36]`` in the token order ``t*196 + h*14 + w``
    (T = 16: 1568 tokens; any even T for the few-frame rows)."""
    batch, slots = views.shape[0], views.shape[1] // geometry.TUBELET_SIZE
    frames = views.float().div_(255).permute(0, 1, 4, 2, 3)  # [B, T, 3, 224, 224]
    pairs = frames.reshape(batch, slots, geometry.TUBELET_SIZE, 3, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE)
    motion = (pairs[:, :, 1] - pairs[:, :, 0]).abs()  # [B, T/2, 3, 224, 224]
    looks = F.avg_pool2d(frames.reshape(-1, 3, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE), POOL)
    moves = F.avg_pool2d(motion.reshape(-1, 3, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE), POOL)
    sub = geometry.PATCH_SIZE // POOL  # 2 pooled cells per patch side
    grid = geometry.GRID_H
    # [B, T/2, 2 frames, 3, 14, 2, 14, 2] -> [B, T/2, 14, 14, (2 frames, 3, 2, 2)]
    looks = looks.view(batch, slots, geometry.TUBELET_SIZE, 3, grid, sub, grid, sub)
    looks = looks.permute(0, 1, 4, 6, 2, 3, 5, 7).reshape(batch, slots, grid, grid, -1)
    moves = moves.view(batch, slots, 3, grid, sub, grid, sub)
    moves = moves.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch, slots, grid, grid, -1)
    return torch.cat([looks, moves], dim=-1).reshape(batch, slots * geometry.TOKENS_PER_FRAME, WIDTH)


class PixelFeatures:
    """The ``pixels`` column: :func:`pixel_tokens` on the CPU (no weights, a few ms per clip)."""

    def __init__(self, name: str = "pixels") -> None:
        self.name = name
        self.width = WIDTH
        self.heads = HEADS
        self.device = torch.device("cpu")

    @torch.inference_mode()
    def tokens(self, views: torch.Tensor) -> torch.Tensor:
        return pixel_tokens(views.cpu())
