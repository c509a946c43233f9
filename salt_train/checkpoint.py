"""Checkpoints: everything a run needs to continue exactly, without pickle.

A checkpoint is a folder ``checkpoints/step-00000500/``:

- ``model.safetensors``: the student's weights;
- ``optimizer.safetensors``: the optimizer's per-parameter tensors (``state.<i>.<key>``);
- ``rng.safetensors``: the torch CPU (and CUDA) generator states;
- ``state.json``: step, loader position, error count, optimizer hyperparameters;
- ``checksums.json``: the crc32c of each of the four files above, taken at save time.

A checkpoint proves itself before it is trusted (:func:`verify_checkpoint`): every file's content
matches its recorded crc32c (safetensors checks structure, not content: a flipped byte in a
tensor loads silently), ``state.json``'s step is the one its folder is named after and its stream
position lies within the run's stream. A resume, and :func:`latest_checkpoint` (what eval reads),
pass over a checkpoint that fails, with one line, to the whole one before it. Checkpoints written
before checksums (version 1) are read unverified, with a warning.

The learning rate is a pure function of the step (``schedule.lr_at``) and masks
and data order are pure functions of ``(seed, step)`` and ``(seed, epoch)``, so
these four files are the whole state. A checkpoint is written aside
(``.partial``), fsynced and renamed: a ``kill -9`` leaves either the previous
checkpoint or the new one, never half of one. Loading reads safetensors and
JSON only: no file a user did not write is ever unpickled.

During a run, :class:`Checkpointer` writes them: rank 0 writes while the other
ranks wait at a barrier, never from non-finite weights (the checks around a
checkpoint are salt_train/run_checks.py's).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import google_crc32c
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.distributed import Dist
from shared.errors import SaltUsageError, first_line, one_line
from shared.filesystem import PARTIAL_SUFFIX, atomic_dir, delete_dir, write_json_atomic

from salt_train.state import Position, TrainState

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "salt-train-checkpoint"
CHECKPOINT_VERSION = 2  # 2: checksums.json; version 1 checkpoints still load, unverified
READABLE_VERSIONS = (1, 2)
PREFIX = "step-"
CHECKSUMS = "checksums.json"
CHECKSUM_ALGORITHM = "crc32c"  # as the store's rows; about twice as fast as sha256 from a file (EXPERIMENTS.md)
CHECKED_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


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


def save_checkpoint(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, keep: int
) -> Path:
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
            (partial / CHECKSUMS).write_text(
                json.dumps(
                    {
                        "algorithm": CHECKSUM_ALGORITHM,
                        "files": {name: file_checksum(partial / name) for name in CHECKED_FILES},
                    },
                    indent=1,
                )
            )
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        previous = latest_checkpoint(run_dir)
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise CheckpointWriteError(
            f"cannot write checkpoint {final.name} in {root}: {reason}; "
            + (
                f"{previous.name} is intact: free space and continue with --resume"
                if previous
                else "no earlier checkpoint"
            )
        ) from None
    write_json_atomic(root / "latest.json", {"checkpoint": final.name, "step": state.step})
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX))
    for old in done[:-keep]:
        try:  # renamed first: a kill mid-delete leaves a .partial, never a half checkpoint under its name
            delete_dir(old)
        except OSError as exc:
            log.warning("could not delete the old checkpoint %s: %s", old, exc)
    for leftover in root.glob(f"{PREFIX}*{PARTIAL_SUFFIX}"):  # of a crash mid-save or mid-delete (rank 0 only saves)
        shutil.rmtree(leftover, ignore_errors=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints, newest first."""
    root = checkpoint_dir(run_dir)
    return sorted(
        (
            p
            for p in root.glob(f"{PREFIX}*")
            if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX) and (p / "state.json").is_file()
        ),
        reverse=True,
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run that proves itself (:func:`verify_checkpoint`), or None
    (a run killed before its first one). Each newer one that fails is passed over with one warning."""
    for path in complete_checkpoints(run_dir):
        try:
            verify_checkpoint(path)
        except CheckpointUnreadable as exc:
            log.warning("%s; passing over it to the checkpoint before it", exc)
            continue
        return path
    return None


def file_checksum(path: Path, chunk: int = 64 << 20) -> str:
    """The crc32c of a file's content, as 8 hex digits."""
    checksum = google_crc32c.Checksum()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            checksum.update(block)
    return checksum.digest().hex()


def step_of(path: Path) -> int | None:
    """The step a checkpoint folder is named after (``step-00000500`` -> 500), None for another name."""
    digits = path.name.removeprefix(PREFIX)
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def _count(record: dict[str, Any], key: str, default: int | None = None) -> int:
    value = record.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"state.json {key} is {value!r}, not a count")
    return value


def _read_record(path: Path) -> dict[str, Any]:
    """``state.json``, once every file's content matched ``checksums.json`` (raises ValueError, OSError)."""
    record = json.loads((path / "state.json").read_text())
    if (
        not isinstance(record, dict)
        or record.get("format") != CHECKPOINT_FORMAT
        or record.get("version") not in READABLE_VERSIONS
    ):
        raise ValueError(f"not a version {CHECKPOINT_VERSION} SALT checkpoint")
    if record["version"] >= 2 or (path / CHECKSUMS).exists():  # a version edited down to 1 is still checked
        manifest = json.loads((path / CHECKSUMS).read_text())
        if (
            not isinstance(manifest, dict)
            or manifest.get("algorithm") != CHECKSUM_ALGORITHM
            or not isinstance(manifest.get("files"), dict)
            or set(manifest["files"]) != set(CHECKED_FILES)
        ):
            raise ValueError(f"{CHECKSUMS} does not list the {CHECKSUM_ALGORITHM} of {', '.join(CHECKED_FILES)}")
        for name in CHECKED_FILES:
            actual = file_checksum(path / name)
            if actual != manifest["files"][name]:
                raise ValueError(
                    f"{name} is damaged: its {CHECKSUM_ALGORITHM} is {actual}, "
                    f"{manifest['files'][name]} when it was saved"
                )
    else:
        log.warning("checkpoint %s predates checksums (version 1): its content cannot be verified", path)
    return record


def _check_state(path: Path, record: dict[str, Any], stream: tuple[int, int] | None) -> TrainState:
    """The record's counts as a TrainState, checked against the folder's name and the stream's size
    (``stream``: its epochs and batches per epoch)."""
    step = _count(record, "step")
    if step != step_of(path):
        raise ValueError(f"state.json says step {step} in folder {path.name}")
    position = Position(epoch=_count(record["position"], "epoch"), index=_count(record["position"], "index"))
    if stream is not None:
        epochs, steps_per_epoch = stream
        if position.epoch > epochs:
            raise ValueError(f"state.json position.epoch {position.epoch} is past the stream's {epochs} epochs")
        if position.index >= steps_per_epoch:
            raise ValueError(
                f"state.json position.index {position.index} is past the stream's {steps_per_epoch} batches per epoch"
            )
        if step > position.epoch * steps_per_epoch + position.index:
            raise ValueError(
                f"state.json says step {step} after reading only {position.epoch} epoch(s) and "
                f"{position.index} batch(es) of {steps_per_epoch}"
            )
    counts = {key: _count(record, key, 0) for key in ("loader_errors", "clips_seen", "nonfinite_steps")}
    return TrainState(step=step, position=position, **counts)


_DAMAGE = (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError, SafetensorError)


def verify_checkpoint(path: Path, stream: tuple[int, int] | None = None) -> TrainState:
    """Check a checkpoint without loading it: every file's crc32c, ``state.json`` against the folder's
    name and (given ``stream``, its epochs and batches per epoch) the stream's size. Returns its state;
    raises :class:`CheckpointUnreadable` in one line."""
    try:
        return _check_state(path, _read_record(path), stream)
    except _DAMAGE as exc:
        raise CheckpointUnreadable(f"checkpoint {path} is unreadable ({one_line(exc, 200)})") from None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream: tuple[int, int] | None = None
) -> TrainState:
    """Restore model, optimizer and RNG from ``path`` once it proved itself (:func:`verify_checkpoint`,
    with the stream's epochs and batches per epoch when given); returns the step and loader position."""
    try:
        record = _read_record(path)
        state = _check_state(path, record, stream)
        model_state = load_file(path / "model.safetensors")
        optimizer_state = _optimizer_join(load_file(path / "optimizer.safetensors"), record["optimizer"])
        rng = load_file(path / "rng.safetensors")
    except _DAMAGE as exc:
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
    return state


class TrainingStopped(Exception):
    """The run stopped early on purpose (too many loader errors or non-finite steps, a dead loader
    worker); a checkpoint of the last whole step was written, or the reason says why not."""


class Checkpointer:
    """A run's checkpoints of ``state``: every rank calls :meth:`save`; rank 0 writes while the others
    wait at a barrier (none exits, and is reported failed, meanwhile). It never writes non-finite
    weights: the last finite checkpoint stays the newest (salt_train/run_checks.py says when to save)."""

    def __init__(
        self,
        run_dir: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        keep: int,
        dist: Dist,
    ) -> None:
        self.run_dir, self.model, self.optimizer, self.state = run_dir, model, optimizer, state
        self.keep, self.dist = keep, dist

    def save(self) -> Path | None:
        """Checkpoint ``state``; the path on rank 0, None on the others."""
        main = self.dist.is_main
        if main and not weights_finite(self.model):
            previous = latest_checkpoint(self.run_dir)
            raise TrainingStopped(
                f"the weights are not finite at step {self.state.step}: no checkpoint written; "
                f"the last finite one is {previous.name if previous else 'none'}"
            )
        path = save_checkpoint(self.run_dir, self.model, self.optimizer, self.state, self.keep) if main else None
        self.dist.barrier()
        return path

    def save_alone(self) -> str:
        """After a peer died: rank 0 checkpoints without the (now impossible) barrier."""
        if not self.dist.is_main:
            return "rank 0 writes the checkpoint"
        path = save_checkpoint(self.run_dir, self.model, self.optimizer, self.state, self.keep)
        return f"checkpoint {path.name} written; continue with --resume, with any number of ranks"


def weights_finite(model: torch.nn.Module) -> bool:
    """Every parameter and buffer finite (one host read; before a checkpoint is written)."""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True
