"""A random checkpoint in V-JEPA's layout, and a forward pass of it written from V-JEPA's description.

The reference is deliberately independent of the code under test: positions built as V-JEPA's
``get_3d_sincos_pos_embed`` builds them (numpy, ``meshgrid(h, d, w)`` in its default ``xy``
indexing), and the ViT as plain functional ops on the raw tensors (no timm, no ``VideoViT``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

GRID_T, GRID = 8, 14
EPS = 1e-6  # V-JEPA's norm_layer=partial(nn.LayerNorm, eps=1e-6)


def sincos_1d(size: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(size // 2, dtype=float) / (size / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def vjepa_sincos(width: int, uniform_power: bool) -> np.ndarray:
    """``[1568, width]`` as V-JEPA lays it out: depth (time), height, width codes side by side."""
    grid_h, grid_d, grid_w = np.meshgrid(
        np.arange(GRID, dtype=float), np.arange(GRID_T, dtype=float), np.arange(GRID, dtype=float)
    )  # arrays indexed [d, h, w]
    if uniform_power:
        size_h = size_w = size_d = int(np.ceil(width / 6) * 2)
    else:
        size_h, size_w, size_d = width // 4, width // 4, width // 2
    embed = np.concatenate([sincos_1d(size_d, grid_d), sincos_1d(size_h, grid_h), sincos_1d(size_w, grid_w)], axis=1)
    return embed[:, :width]


def vjepa_encoder_state(
    width: int = 32, depth: int = 2, seed: int = 0, with_pos: bool = True, uniform_power: bool = True
) -> dict[str, Tensor]:
    """Random weights under V-JEPA's names (no prefix); LayerNorms and biases random too, so that a
    mapping that swaps two of them cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=0.05: torch.randn(*shape, generator=g) * scale  # noqa: E731
    state = {"patch_embed.proj.weight": rand(width, 3, 2, 16, 16), "patch_embed.proj.bias": rand(width)}
    if with_pos:
        state["pos_embed"] = torch.from_numpy(vjepa_sincos(width, uniform_power)).float()[None]
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {
            b + "norm1.weight": 1 + rand(width, scale=0.2),
            b + "norm1.bias": rand(width),
            b + "attn.qkv.weight": rand(3 * width, width, scale=0.2),
            b + "attn.qkv.bias": rand(3 * width),
            b + "attn.proj.weight": rand(width, width, scale=0.2),
            b + "attn.proj.bias": rand(width),
            b + "norm2.weight": 1 + rand(width, scale=0.2),
            b + "norm2.bias": rand(width),
            b + "mlp.fc1.weight": rand(4 * width, width, scale=0.2),
            b + "mlp.fc1.bias": rand(4 * width),
            b + "mlp.fc2.weight": rand(width, 4 * width, scale=0.2),
            b + "mlp.fc2.bias": rand(width),
        }
    return state | {"norm.weight": 1 + rand(width, scale=0.2), "norm.bias": rand(width)}


def write_vjepa_checkpoint(path: Path, encoder: dict[str, Tensor], prefix: str = "module.backbone.") -> Path:
    """A ``.pth.tar`` as V-JEPA's training saves it: encoder, predictor, target encoder (DDP- and
    wrapper-prefixed names), optimizer state and counters."""
    prefixed = {prefix + k: v for k, v in encoder.items()}
    torch.save(
        {
            "encoder": {k: v + 1 for k, v in prefixed.items()},
            "target_encoder": prefixed,
            "predictor": {"module.predictor_embed.weight": torch.zeros(4, 4)},
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "scaler": None,
            "epoch": 300,
            "loss": 0.1,
            "batch_size": 24,
            "world_size": 8,
            "lr": 6.25e-4,
        },
        path,
    )
    return path


def vjepa_forward(state: dict[str, Tensor], pixels: Tensor, heads: int, positions: Tensor) -> Tensor:
    """V-JEPA's encoder forward on ``[B, 3, T, 224, 224]``: tubelet Conv3d, + positions, pre-norm blocks
    (softmax attention scaled by head_dim^-0.5, exact GELU MLP), final LayerNorm."""
    x = F.conv3d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=(2, 16, 16))
    x = x.flatten(2).transpose(1, 2)
    x = x + positions.reshape(-1, x.shape[-1])[: x.shape[1]]  # fewer frames: the first time slots' positions
    batch, tokens, width = x.shape
    head = width // heads
    ln = lambda t, name: F.layer_norm(t, (width,), state[name + ".weight"], state[name + ".bias"], EPS)  # noqa: E731
    lin = lambda t, name: F.linear(t, state[name + ".weight"], state.get(name + ".bias"))  # noqa: E731
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        q, k, v = lin(ln(x, b + "norm1"), b + "attn.qkv").reshape(batch, tokens, 3, heads, head).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head), dim=-1)
        x = x + lin((weights @ v).transpose(1, 2).reshape(batch, tokens, width), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return ln(x, "norm")
