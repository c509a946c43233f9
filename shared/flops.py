"""FLOP accounting for ViT-style encoders (forward pass; a training step is ~3x)."""

from __future__ import annotations


def vit_forward_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds counted as 2 FLOPs: per layer, the qkv/out projections
    (8*N*D^2), the MLP (4*mlp_ratio*N*D^2) and attention scores and mixing (4*N^2*D).

    ViT-H on 1568 tokens (D=1280, 32 layers) gives ~2.37 TFLOP, DESIGN.md's teacher budget.
    """
    per_layer = (8 + 4 * mlp_ratio) * tokens * width**2 + 4 * tokens**2 * width
    return depth * per_layer
