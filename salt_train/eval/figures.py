"""Probe figures as eval.json records them: each probe trained once per seed, per column.

Shared by the 16-frame rows (:mod:`salt_train.eval.command`) and the few-frame rows
(:mod:`salt_train.eval.frames`), so that both read the same way: the mean over probe seeds and a
95% bootstrap interval over validation rows (:mod:`salt_train.eval.stats`), and ``not_run`` with
the reason where a column has no model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from shared.console import progress

from salt_train.eval.features import Features, held_rows
from salt_train.eval.probes import ProbeScore, ProbeSettings, attentive_probe, linear_probe, stack_tasks
from salt_train.eval.stats import seeded_score
from salt_train.eval.temporal import TemporalTask

# The probe settings of one seed (the command builds them from the recipe's eval section).
SettingsFor = Callable[[int], ProbeSettings]


def over_seeds(scores: list[ProbeScore], row_of_sample: np.ndarray, seed: int) -> dict[str, Any]:
    """eval.json's record of one probe figure: the mean over probe seeds and its interval over rows."""
    correct1 = np.array([s.correct for s in scores], dtype=np.float64)
    correct5 = np.array([s.correct5 for s in scores], dtype=np.float64) if scores[0].correct5 is not None else None
    return seeded_score(correct1, correct5, row_of_sample, scores[0].chance, seed).record()


def temporal_figures(
    task: TemporalTask,
    train: dict[str, Features],
    val: dict[str, Features],
    columns: Iterable[str],
    val_temporal_rows: np.ndarray,
    seeds: list[int],
    linear: SettingsFor,
    seed: int,
    not_run: dict[str, str],
) -> dict[str, Any]:
    """One temporal task: a linear probe on the per-slot pooled features of its variants, per column;
    ``not_run[column]`` is the reason for a column without features."""
    figures: dict[str, Any] = {
        "description": task.description,
        "chance": 1 / len(task.classes),
        "sanity_check": task.sanity,
    }
    row_of_sample = np.tile(val_temporal_rows, len(task.classes))
    for name in columns:
        if name not in train:
            figures[name] = {"not_run": not_run[name]}
            continue
        train_x, train_y = stack_tasks(train[name].slots, task.classes)
        val_x, val_y = stack_tasks(val[name].slots, task.classes)
        scores = [linear_probe(train_x, train_y, val_x, val_y, len(task.classes), linear(s)) for s in seeds]
        figures[name] = over_seeds(scores, row_of_sample, seed)
    return figures


def attentive_figure(
    train: Features,
    val: Features,
    train_ids: np.ndarray,
    train_y: np.ndarray,
    val_ids: np.ndarray,
    val_y: np.ndarray,
    val_rows: np.ndarray,
    classes: int,
    heads: int,
    pool: int,
    memory_bytes: int,
    seeds: list[int],
    attentive: SettingsFor,
    seed: int,
    label: str = "attentive probe",
) -> dict[str, Any]:
    """The attentive probe on one column's kept tokens (rows ``train_ids`` and ``val_ids`` of its banks),
    pooled ``pool x pool``; ``memory_bytes`` bounds the pooled copy held for the seeds."""
    assert train.tokens is not None and val.tokens is not None
    width = train.mean.shape[1]
    device = attentive(seeds[0]).device
    # Pooled once for every seed (held on the probe's device where they fit), not gathered per batch per epoch.
    read_train = held_rows(train.tokens, train_ids, pool, device, memory_bytes)
    read_val = held_rows(val.tokens, val_ids, pool, device, memory_bytes)
    scores = []
    for probe_seed in progress(total=len(seeds), description=label, unit="seed", iterable=seeds):
        settings = attentive(probe_seed)
        scores.append(attentive_probe(read_train, train_y, read_val, val_y, width, classes, settings, heads))
    return over_seeds(scores, val_rows, seed)


def probe_settings(settings: Any, device: Any) -> tuple[SettingsFor, SettingsFor]:
    """The recipe's (``eval.*``) settings of the attentive probe and of the linear probes, per seed."""

    def attentive(seed: int) -> ProbeSettings:
        return ProbeSettings(
            settings.probe_epochs,
            settings.probe_lr,
            settings.probe_weight_decay,
            settings.probe_batch_size,
            seed,
            device,
        )

    def linear(seed: int) -> ProbeSettings:
        return ProbeSettings(
            settings.linear_iterations, 0.0, settings.linear_l2, settings.probe_batch_size, seed, device
        )

    return attentive, linear
