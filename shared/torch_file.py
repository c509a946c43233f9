"""Reading a ``torch.save`` file without running its pickle code.

In `shared` because both stages convert released checkpoints: `salt-cache convert-teacher`
(an original VideoMAE) and `salt-train import-encoder` (a V-JEPA ``.pth.tar``). The file is
read with ``torch.load(weights_only=True)``: only tensors, plain containers and numbers come
back. ``argparse.Namespace`` is also allowed, for the ``args`` entry training scripts save
beside the weights (a plain attribute bag: building one runs no code of the file's). Every
problem is one :class:`SaltUsageError` line.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shared.errors import SaltUsageError, first_line


def load_weights_only(path: Path, what: str = "the .pth file") -> Any:
    """The object saved in ``path``, read without pickle code; memory-mapped where the format allows
    (torch.save's zip format), so an optimizer state saved beside the weights is never read into memory."""
    path = Path(path)
    if not path.is_file():
        raise SaltUsageError(f"{path} " + (f"is a folder; pass {what}" if path.is_dir() else "does not exist"))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says it all
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise SaltUsageError(
            f"{path} {refused_pickle(exc)}; refusing: nothing in it ran, and only tensors and plain "
            "containers are read (a torch.save state dict)"
        ) from None
    except Exception as exc:  # torch raises many types for a file that is no checkpoint at all
        raise SaltUsageError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {first_line(exc)})") from None


def refused_pickle(exc: pickle.UnpicklingError) -> str:
    """What torch's weights-only reader refused, in our words: torch's own message goes on to advise
    ``weights_only=False``, which would run the file's code, so it is never passed on."""
    text = str(exc)
    refused = re.search(r"GLOBAL (\S+)", text)
    if refused:
        return f"needs pickle code to load (it calls {refused.group(1)})"
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand:
        return (
            f"is not a PyTorch checkpoint readable without pickle code (pickle opcode {operand.group(1)} is "
            "outside torch.save's weights-only format: a plain pickle file, or no checkpoint at all)"
        )
    detail = first_line(exc) if "weights_only" not in text else "not torch.save's weights-only format"
    return f"is not a PyTorch checkpoint ({detail})"


def tensors_only(state: Any, path: Path, what: str = "the state dict") -> dict[str, Tensor]:
    """``state`` checked to be a non-empty mapping of names to tensors."""
    if not isinstance(state, dict):
        raise SaltUsageError(f"{path}: {what} is a {type(state).__name__}, not a state dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise SaltUsageError(f"{path}: entry {key!r} of {what} is a {type(value).__name__}, not a tensor")
    if not state:
        raise SaltUsageError(f"{path} holds an empty state dict")
    return state
