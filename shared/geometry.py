"""Token geometry shared by teacher, store and student (docs/DESIGN.md: contract).

16 frames of 224x224, cut into 2x16x16 tubelets: a grid of T'=8, H'=W'=14,
N=1568 tokens, token index ``i = t*196 + h*14 + w``.
"""

from __future__ import annotations

import functools

import torch

NUM_FRAMES = 16
IMAGE_SIZE = 224
TUBELET_SIZE = 2
PATCH_SIZE = 16

GRID_T = NUM_FRAMES // TUBELET_SIZE  # 8
GRID_H = IMAGE_SIZE // PATCH_SIZE  # 14
GRID_W = IMAGE_SIZE // PATCH_SIZE  # 14
TOKENS_PER_FRAME = GRID_H * GRID_W  # 196
NUM_TOKENS = GRID_T * TOKENS_PER_FRAME  # 1568

TEACHER_WIDTH_HUGE = 1280
STUDENT_WIDTH_BASE = 768

# ImageNet statistics on [0, 1] values, for teacher and student alike.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@functools.cache
def pixel_statistics(device: torch.device, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """PIXEL_MEAN and PIXEL_STD as float32 tensors of ``shape`` (the channel axis of length 3) on
    ``device``, made once: a fresh host-to-device copy every step would be a synchronising copy.
    Made on the CPU first, explicitly: under a ``torch.device("meta")`` context (FLOPs counted on a
    shapes-only model) an implicit device would give meta tensors that cannot be copied anywhere."""
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32, device="cpu").view(shape).to(device)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32, device="cpu").view(shape).to(device)
    return mean, std


def normalise_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 values -> float32 ``(x / 255 - mean) / std``, the one pixel rule of teacher and student
    (``mean`` and ``std`` from :func:`pixel_statistics`, shaped to broadcast over ``pixels``)."""
    return (pixels.float() / 255.0 - mean) / std


def token_index(t: int, h: int, w: int) -> int:
    """Flat index of the token at tubelet slot ``t``, patch row ``h``, patch column ``w``."""
    if not (0 <= t < GRID_T and 0 <= h < GRID_H and 0 <= w < GRID_W):
        raise ValueError(f"token position out of grid: t={t} h={h} w={w}")
    return t * TOKENS_PER_FRAME + h * GRID_W + w


def as_dict() -> dict[str, object]:
    """The geometry as recorded in a store's attributes."""
    return {
        "num_frames": NUM_FRAMES,
        "image_size": IMAGE_SIZE,
        "tubelet_size": TUBELET_SIZE,
        "patch_size": PATCH_SIZE,
        "grid": [GRID_T, GRID_H, GRID_W],
        "num_tokens": NUM_TOKENS,
        "token_index": "t*196 + h*14 + w",
    }
