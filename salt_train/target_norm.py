"""What the student regresses: the teacher latents layer-normed per token, or with ``model.target_norm:
channel`` first standardised per channel, ``(x - mean) / std``, with statistics the run recorded.

:class:`TargetNorm` is that choice made once, where it is decided (the run's start, from the recipe and
the run folder; `salt-train eval`, from the run folder), and handed to what normalises targets: the loss
(training and held-out), the quick evaluation and the evaluation's teacher features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from shared.console import print_block
from shared.errors import SaltUsageError
from shared.latent_stats import DEFAULT_ROWS, SUMMARY_ROWS, LatentStats, compute_stats
from shared.store import LatentStore

from salt_train import run_folder
from salt_train.checkpoint import complete_checkpoints

log = logging.getLogger(__name__)


def normalise_targets(latents: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """Per-token layer norm without affine parameters, in float32 (fp16 latents would lose the small ones).
    With ``mean`` and ``std`` (``model.target_norm: channel``), each channel is first standardised,
    ``(x - mean) / std``, with the store's statistics, so that no outlier channel dominates the norm."""
    latents = latents.float()
    if mean is not None and std is not None:
        latents = (latents - mean) / std
    return F.layer_norm(latents, latents.shape[-1:])


@dataclass(frozen=True)
class TargetNorm:
    """The targets' normalisation: per-channel float32 ``mean`` and ``std`` ``[D]`` (channel, then layer
    norm), or neither (layer norm only)."""

    mean: Tensor | None = None
    std: Tensor | None = None

    @classmethod
    def from_stats(cls, stats: LatentStats) -> TargetNorm:
        """``model.target_norm: channel`` with ``stats`` (std floored, shared/latent_stats.py)."""
        mean, std = stats.standardisation()
        return cls(torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32))

    @property
    def per_channel(self) -> bool:
        return self.mean is not None

    def to(self, device: torch.device) -> TargetNorm:
        if self.mean is None or self.std is None:
            return self
        return TargetNorm(self.mean.to(device), self.std.to(device))

    def normalise(self, latents: np.ndarray | Tensor) -> Tensor:
        """Teacher latents ``[..., D]`` normed exactly as the training targets are."""
        latents = torch.as_tensor(latents)
        on_device = self.to(latents.device)
        return normalise_targets(latents, on_device.mean, on_device.std)

    def describe(self) -> str:
        return "per-channel standardisation, then layer norm" if self.per_channel else "layer norm"


LAYER_NORM = TargetNorm()  # model.target_norm: layer


def recorded_stats(kind: Literal["layer", "channel"], run_dir: Path | None, resume: bool) -> LatentStats | None:
    """The statistics a ``model.target_norm: channel`` run recorded; None before it recorded them (and for
    ``layer``). Refused: a resume whose checkpoints trained with statistics that are no longer there."""
    if kind != "channel" or run_dir is None:
        return None
    stats = run_folder.read_target_stats(run_dir)
    if stats is None and resume and complete_checkpoints(run_dir):
        raise SaltUsageError(
            f"{run_dir} has checkpoints trained with model.target_norm: channel but no "
            f"{run_folder.TARGET_STATS}: its targets cannot be normalised as before; restore the "
            "file or start a new run"
        )
    return stats


def training_target_norm(
    kind: Literal["layer", "channel"], seed: int, run_dir: Path, store: LatentStore, recorded: LatentStats | None
) -> TargetNorm:
    """Rank 0 at a run's start: the target statistics block, and the run's :class:`TargetNorm`. With
    ``channel``, the statistics ``recorded`` in the run folder (:func:`recorded_stats`; a resume never
    recomputes them), else measured on the snapshot and recorded there. With ``layer``, a small sample
    of rows, for the block only."""
    if kind == "layer":
        sample = compute_stats(store, rows=SUMMARY_ROWS, seed=seed)
        print_block("target statistics (model.target_norm: layer)", sample.summary())
        if sample.warns:
            log.warning(sample.warning())
        return LAYER_NORM
    stats, source = recorded, f"read back from {run_dir / run_folder.TARGET_STATS}"
    if stats is None:
        stats = compute_stats(store, rows=DEFAULT_ROWS, seed=seed)
        run_folder.write_target_stats(run_dir, stats, store.path)
        source = f"measured on the snapshot, recorded in {run_dir / run_folder.TARGET_STATS}"
    print_block("target statistics (model.target_norm: channel)", {**stats.summary(), "statistics": source})
    if stats.warns:
        log.info(
            "outlier channels %s are standardised per channel before the layer norm (model.target_norm: channel)",
            stats.outlier_channels[:8],
        )
    return TargetNorm.from_stats(stats)


def run_target_norm(kind: Literal["layer", "channel"], run_dir: Path) -> TargetNorm:
    """What a finished (or stopped) run trained with, for its evaluation: its recorded statistics under
    ``channel`` (refused in one line when they are gone), else layer norm."""
    if kind != "channel":
        return LAYER_NORM
    stats = run_folder.read_target_stats(run_dir)
    if stats is None:
        raise SaltUsageError(
            f"{run_dir} trained with model.target_norm: channel but holds no "
            f"{run_folder.TARGET_STATS}: its held-out loss cannot be measured as it trained"
        )
    return TargetNorm.from_stats(stats)
