"""The torch device a command runs on, from ``auto``, ``cpu`` or ``cuda`` (both stages)."""

from __future__ import annotations

from typing import get_args

import torch

from shared.config import DeviceName
from shared.errors import SaltUsageError


def resolve_device(requested: str, setting: str = "--device") -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda`` without one is a usage error
    naming ``setting`` (the flag or recipe key the value came from)."""
    if requested not in get_args(DeviceName):
        raise SaltUsageError(f"{setting} {requested}: expected auto, cpu or cuda")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise SaltUsageError(f"{setting} is cuda, but torch sees no CUDA device (use cpu or auto)")
    return torch.device(requested)
