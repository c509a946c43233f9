"""Which scaled-dot-product-attention kernel the student runs (``model.attention``).

timm's blocks (encoder and predictor) call ``F.scaled_dot_product_attention``; the
choice is made with ``torch.nn.attention.sdpa_kernel`` around the forward, so the
compiled graph bakes in the kernel chosen at trace time and eager runs pick it per call.

- ``auto``: on Hopper (compute capability 9.x), cuDNN attention first when this torch
  has it, then FlashAttention-2, memory-efficient, math. FlashAttention-2 is slow at the
  predictor's head_dim 32 on Hopper; cuDNN's fused kernel is not. Elsewhere torch's default.
- ``flash``, ``cudnn``, ``efficient``, ``math``: that kernel only (an unsupported shape then
  fails loudly instead of silently falling back). On CPU only ``flash`` and ``math`` exist;
  a CUDA-only choice falls back to torch's default there, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from typing import get_args

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from shared.config import AttentionKernel

log = logging.getLogger(__name__)

ATTENTION_CHOICES = get_args(AttentionKernel)
NAMED = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
CPU_KERNELS = ("flash", "math")


def attention_backends(requested: str, device: torch.device) -> list[SDPBackend] | None:
    """The kernels to allow, in priority order; None: torch's own default order."""
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention {requested!r} (one of {', '.join(ATTENTION_CHOICES)})")
    if requested == "auto":
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
            return None
        order = ["cudnn", "flash", "efficient", "math"]
        return [getattr(SDPBackend, NAMED[name]) for name in order if hasattr(SDPBackend, NAMED[name])]
    if device.type != "cuda" and requested not in CPU_KERNELS:
        log.warning("model.attention %s needs CUDA: using torch's default kernels on %s", requested, device)
        return None
    if not hasattr(SDPBackend, NAMED[requested]):
        raise ValueError(f"model.attention {requested}: this torch ({torch.__version__}) has no such kernel")
    return [getattr(SDPBackend, NAMED[requested])]


def attention_context(backends: list[SDPBackend] | None) -> AbstractContextManager[None]:
    """``sdpa_kernel`` for ``backends`` (in that priority order where torch supports priorities)."""
    if backends is None:
        return contextlib.nullcontext()
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # a torch without set_priority: the allowed set, torch's own order
        return sdpa_kernel(backends)


def describe(backends: list[SDPBackend] | None) -> str:
    return "torch default" if backends is None else " > ".join(b.name.lower() for b in backends)
