"""Checkpoints: everything a run needs to continue exactly, without pickle.

A checkpoint is a folder ``checkpoints/step-00000500/``:

- ``model.safetensors``: the student's weights;
- ``optimizer.safetensors``: the optimizer's per-parameter tensors (``state.<i>.<key>``);
- ``rng.safetensors``: the torch CPU (and CUDA) generator states;
- ``state.json``: step, loader position, error count, optimizer hyperparameters.

The learning rate is a pure function of the step (``schedule.lr_at``) and masks
and data order are pure functions of ``(seed, step)`` and ``(seed, epoch)``, so
these four files are the whole state. A checkpoint is written aside
(``.partial``), fsynced and renamed: a ``kill -9`` leaves either the previous
checkpoint or the new one, never half of one. Loading reads safetensors and
JSON only: no file a user did not write is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.errors import SaltUsageError, first_line, one_line
from shared.filesystem import atomic_dir, write_json_atomic
from salt_train.data import Position

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "salt-train-checkpoint"
CHECKPOINT_VERSION = 1
PREFIX = "step-"


@dataclass
class TrainState:
    """The non-tensor part of a checkpoint."""

    step: int  # optimizer steps done
    position: Position  # next global batch to read
    loader_errors: int = 0
    clips_seen: int = 0
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient


class CheckpointUnreadable(SaltUsageError):
    """A checkpoint's files are damaged or incomplete (a resume falls back to the one before)."""


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, folder gone); the previous ones are intact."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses aliased or non-contiguous tensors: save independent CPU copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer state dict as (flat tensors, JSON-able rest)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return _tensors(tensors), {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = cuda_state
    return _tensors(tensors)


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, keep: int) -> Path:
    """Write ``step-N`` atomically, point ``latest.json`` at it, drop all but the newest ``keep``."""
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{state.step:08d}"
    try:
        # A rerun of the same step (resume from an older checkpoint) replaces it.
        with atomic_dir(final, replace="delete") as partial:
            optimizer_tensors, optimizer_rest = _optimizer_split(optimizer)
            save_file(_tensors(model.state_dict()), partial / "model.safetensors")
            save_file(optimizer_tensors, partial / "optimizer.safetensors")
            save_file(_rng_tensors(), partial / "rng.safetensors")
            record = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                **asdict(state),
                "optimizer": optimizer_rest,
            }
            (partial / "state.json").write_text(json.dumps(record, indent=1))  # the whole folder is renamed
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        previous = latest_checkpoint(run_dir)
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        raise CheckpointWriteError(
            f"cannot write checkpoint {final.name} in {root}: {reason}; "
            + (f"{previous.name} is intact: free space and continue with --resume" if previous else
               "no earlier checkpoint")) from None
    write_json_atomic(root / "latest.json", {"checkpoint": final.name, "step": state.step})
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints, newest first."""
    root = checkpoint_dir(run_dir)
    return sorted((p for p in root.glob(f"{PREFIX}*")
                   if p.is_dir() and not p.name.endswith(".partial") and (p / "state.json").is_file()), reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None (a run killed before its first one)."""
    complete = complete_checkpoints(run_dir)
    return complete[0] if complete else None


def _count(record: dict[str, Any], key: str, default: int | None = None) -> int:
    value = record.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"state.json {key} is {value!r}, not a count")
    return value


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore model, optimizer and RNG from ``path``; returns the step and loader position."""
    try:
        record = json.loads((path / "state.json").read_text())
        if record.get("format") != CHECKPOINT_FORMAT or record.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"not a version {CHECKPOINT_VERSION} SALT checkpoint")
        model_state = load_file(path / "model.safetensors")
        optimizer_state = _optimizer_join(load_file(path / "optimizer.safetensors"), record["optimizer"])
        rng = load_file(path / "rng.safetensors")
        step = _count(record, "step")
        position = Position(epoch=_count(record["position"], "epoch"), index=_count(record["position"], "index"))
        counts = {key: _count(record, key, 0) for key in ("loader_errors", "clips_seen", "nonfinite_steps")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError, SafetensorError) as exc:
        raise CheckpointUnreadable(f"checkpoint {path} is unreadable ({one_line(exc, 200)})") from None
    try:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SaltUsageError(f"checkpoint {path} does not fit this model ({first_line(exc)})") from None
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda.")]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return TrainState(step=step, position=position, **counts)
