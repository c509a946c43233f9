"""FLOP accounting for ViT-style encoders (forward pass; a training step is ~3x)."""

from __future__ import annotations

import time

import torch


def vit_forward_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds counted as 2 FLOPs: per layer, the qkv/out projections
    (8*N*D^2), the MLP (4*mlp_ratio*N*D^2) and attention scores and mixing (4*N^2*D).

    ViT-H on 1568 tokens (D=1280, 32 layers) gives ~2.37 TFLOP, docs/DESIGN.md's teacher budget.
    """
    per_layer = (8 + 4 * mlp_ratio) * tokens * width**2 + 4 * tokens**2 * width
    return depth * per_layer


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# in order against torch.cuda.get_device_name(): the more specific names first.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("GH200", "GH200", 989.0),
    ("H200", "H200", 989.0),
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100", "H100 SXM", 989.0),
    ("H800", "H800 SXM", 989.0),
    ("B200", "B200", 2250.0),
    ("A100", "A100", 312.0),
    ("A800", "A800", 312.0),
    ("L40S", "L40S", 362.0),
    ("L40", "L40", 181.0),
    ("L4", "L4", 121.0),
    ("A10G", "A10G", 70.0),
    ("A10", "A10", 125.0),
    ("RTX 4090", "RTX 4090", 165.0),
)


def peak_bf16_tflops(device_name: str) -> tuple[str, float] | None:
    """(model, dense bf16 peak TFLOP/s) of a GPU by its name; None when not in the table."""
    for key, label, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return label, peak
    return None


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """The device's measured bf16 matmul rate (TFLOP/s) on ``size``-square random matrices, after warm-up."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12
