"""AdamW for the student, with weight decay only where it regularises.

Decay shrinks weights towards zero; on norm scales and biases that only
fights the normalisation, and on positional/temporal embeddings and special
tokens it erases learned positions. So, as in timm, MAE and V-JEPA, those go
into a ``no_decay`` group: every parameter with ``ndim <= 1`` and every
parameter whose name contains one of :data:`NO_DECAY_NAMES`.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

NO_DECAY_NAMES = ("pos_embed", "temporal_embed", "cls_token", "mask_token", "reg_token")

BETAS = (0.9, 0.999)  # torch's default, as in V-JEPA
EPS = 1e-8


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim > 1 and not any(key in name for key in NO_DECAY_NAMES)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """``decay`` and ``no_decay`` groups of the trainable parameters (empty groups left out).

    Each trainable parameter appears exactly once (``named_parameters`` drops
    shared duplicates); frozen ones are left out.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if _decays(name, param) else no_decay).append(param)
    log.debug(
        "parameter groups: %d decay (%d values), %d no_decay (%d values)",
        len(decay),
        sum(p.numel() for p in decay),
        len(no_decay),
        sum(p.numel() for p in no_decay),
    )
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    model: torch.nn.Module, *, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`, fused (one kernel per step on CUDA; on the CPU too, so both
    take the device-side skip flag of :func:`salt_train.finite.guarded_step`)."""
    groups = parameter_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, fused=True)
