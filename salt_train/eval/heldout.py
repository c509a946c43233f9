"""The held-out distillation loss and R^2, with the mean-latent baseline as their floor.

The loss is the training objective itself (:meth:`SaltObjective.group_outputs`:
the same gather, target normalisation and groups) on validation rows, with masks
fixed by ``eval.seed`` (batch k: ``make_masks(..., seed, k)``): per mask group the
mean error over its targets, then the mean over groups, as in training.

R^2 is per channel, ``mean_c(1 - MSE_c / Var_c)`` over the normed targets at the
masked tokens, so that a few high-variance channels cannot carry it. The
**mean-latent baseline** predicts each channel's mean over the train store's
evaluation rows (no input at all): its R^2 is 0 per channel up to the difference
between the two stores' means, and its loss is what "learnt nothing" costs.

Each figure carries a 95% bootstrap interval over validation rows (the sums are
kept per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.config import LossKind, MaskConfig
from shared.rows import read_rows
from shared.store import LatentStore

from salt_train.eval.stats import interval, resample_weights
from salt_train.loss import SaltObjective, masked_targets
from salt_train.masks import describe_masks, make_masks, mask_layout
from salt_train.model import SaltStudent
from salt_train.target_norm import LAYER_NORM, TargetNorm


@dataclass
class RowSums:
    """Per validation row: the error sums of each mask group, and per-channel sums for R^2."""

    sq: np.ndarray  # [rows, groups] sum of squared errors
    abs: np.ndarray  # [rows, groups] sum of absolute errors
    count: np.ndarray  # [rows, groups] target values (tokens x channels)
    channel_sq_err: np.ndarray  # [rows, D]
    channel_sum: np.ndarray  # [rows, D] sum of targets
    channel_sum_sq: np.ndarray  # [rows, D]
    tokens: np.ndarray  # [rows] target tokens, all groups

    @classmethod
    def zeros(cls, rows: int, groups: int, width: int) -> RowSums:
        per_group, per_channel = (rows, groups), (rows, width)
        return cls(
            np.zeros(per_group),
            np.zeros(per_group),
            np.zeros(per_group),
            np.zeros(per_channel),
            np.zeros(per_channel),
            np.zeros(per_channel),
            np.zeros(rows),
        )

    def add(self, at: slice, group: int, error: torch.Tensor, targets: torch.Tensor) -> None:
        """``error`` and ``targets`` ``[B, M, D]`` of one group for the rows at ``at``."""
        error, targets = error.double(), targets.double()
        self.sq[at, group] += error.square().sum((1, 2)).cpu().numpy()
        self.abs[at, group] += error.abs().sum((1, 2)).cpu().numpy()
        self.count[at, group] += targets.shape[1] * targets.shape[2]
        self.channel_sq_err[at] += error.square().sum(1).cpu().numpy()
        self.channel_sum[at] += targets.sum(1).cpu().numpy()
        self.channel_sum_sq[at] += targets.square().sum(1).cpu().numpy()
        self.tokens[at] += targets.shape[1]


def _figures(sums: RowSums, weights: np.ndarray) -> dict[str, np.ndarray]:
    """MSE, L1 and per-channel R^2 for each row of ``weights`` ``[k, rows]`` (a bootstrap resample each)."""
    count = weights @ sums.count
    mse = (weights @ sums.sq / count).mean(1)
    l1 = (weights @ sums.abs / count).mean(1)
    tokens = (weights @ sums.tokens)[:, None]
    variance = (weights @ sums.channel_sum_sq) / tokens - ((weights @ sums.channel_sum) / tokens) ** 2
    channel_mse = (weights @ sums.channel_sq_err) / tokens
    r2_channels = 1.0 - channel_mse / np.maximum(variance, 1e-12)
    return {"mse": mse, "l1": l1, "r2": r2_channels.mean(1), "r2_channels": r2_channels}


def summarise(sums: RowSums, loss_kind: str, seed: int) -> dict:
    """The figures of eval.json's held-out section, each with its interval."""
    whole = _figures(sums, np.ones((1, len(sums.tokens))))
    boot = _figures(sums, resample_weights(len(sums.tokens), seed))
    loss_key = "mse" if loss_kind == "mse" else "l1"
    return {
        "loss": float(whole[loss_key][0]),
        "loss_interval": list(interval(boot[loss_key])),
        "loss_kind": loss_kind,
        "mse": float(whole["mse"][0]),
        "l1": float(whole["l1"][0]),
        "r2": float(whole["r2"][0]),
        "r2_interval": list(interval(boot["r2"])),
        "r2_channels": [round(float(v), 6) for v in whole["r2_channels"][0]],
        "rows": len(sums.tokens),
    }


def channel_means(store: LatentStore, rows: np.ndarray, target_norm: TargetNorm, batch_size: int) -> torch.Tensor:
    """Each channel's mean of the normed targets over ``rows`` (all tokens): the baseline's prediction."""
    total = torch.zeros(store.teacher_width, dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        (latents,) = read_rows(store, rows[start : start + batch_size], ("latents",))
        total += target_norm.normalise(latents).double().sum((0, 1))
    return (total / (len(rows) * latents.shape[1])).float()


def make_objective(
    student: SaltStudent, loss: LossKind, target_norm: TargetNorm, device: torch.device
) -> SaltObjective:
    """The run's training objective around ``student``, with its target normalisation."""
    return SaltObjective(student, loss, target_norm).to(device).eval()


@torch.inference_mode()
def heldout_sums(
    store: LatentStore,
    rows: np.ndarray,
    mask: MaskConfig,
    device: torch.device,
    batch_size: int,
    seed: int,
    objectives: dict[str, SaltObjective | None],
    baseline: torch.Tensor | None,
    target_norm: TargetNorm = LAYER_NORM,
) -> dict[str, RowSums]:
    """One pass over ``rows``: per-row sums of every objective's errors and, with ``baseline`` (per-channel
    means), of the mean-latent baseline's (under the name ``mean_latent``)."""
    groups = len(mask_layout(mask.kind, mask.ratio))
    width = store.teacher_width
    names = [n for n, o in objectives.items() if o is not None] + (["mean_latent"] if baseline is not None else [])
    sums = {name: RowSums.zeros(len(rows), groups, width) for name in names}
    cuda = device.type == "cuda"
    on_device = target_norm.to(device)
    for k, start in enumerate(range(0, len(rows), batch_size)):
        ids = rows[start : start + batch_size]
        at = slice(start, start + len(ids))
        read_views, read_latents = read_rows(store, ids, ("pixels", "latents"))
        masks = make_masks(mask.kind, mask.ratio, len(ids), seed, k).to(device)
        views, latents = torch.from_numpy(read_views).to(device), torch.from_numpy(read_latents).to(device)
        for name, objective in objectives.items():
            if objective is None:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16 if cuda else torch.float32, enabled=cuda):
                outputs = objective.group_outputs(views, latents, masks.visible, masks.masked)
            for group, (predicted, targets) in enumerate(outputs):
                sums[name].add(at, group, predicted.float() - targets, targets)
        if baseline is not None:
            for group, masked in enumerate(masks.masked):
                targets = masked_targets(latents, masked, on_device.mean, on_device.std)
                sums["mean_latent"].add(at, group, baseline.to(device) - targets, targets)
    return sums


def heldout_figures(
    store: LatentStore,
    rows: np.ndarray,
    mask: MaskConfig,
    loss: LossKind,
    device: torch.device,
    batch_size: int,
    seed: int,
    students: dict[str, SaltStudent | None],
    target_norm: TargetNorm,
    baseline: torch.Tensor | None,
) -> dict[str, dict]:
    """Held-out figures per student (None: not run) and for the mean-latent baseline, with the run's masks
    (``mask``), loss and target normalisation."""
    objectives = {
        name: make_objective(s, loss, target_norm, device) if s is not None else None for name, s in students.items()
    }
    sums = heldout_sums(store, rows, mask, device, batch_size, seed, objectives, baseline, target_norm)
    described = describe_masks(mask.kind, mask.ratio)
    return {name: {**summarise(s, loss, seed), "mask": described} for name, s in sums.items()}
