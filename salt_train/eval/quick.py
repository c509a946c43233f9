"""The cheap part of `salt-train eval`, run during training every ``train.eval_every`` steps.

Held-out loss and per-channel R^2 on ``eval.quick_rows`` validation rows (masks
fixed by ``eval.seed``, the training objective itself, :mod:`salt_train.eval.heldout`),
and a linear probe on mean-pooled encoder features learnt on as many train rows,
but only where those rows hold at least :data:`MIN_ROWS_PER_CLASS` labelled rows
of every class (64 rows cannot teach 174 SSv2 classes: the top-1 would be noise).
The rows are chosen once, at the start; nothing here touches the global random
generator, so a run with quick evaluations trains exactly as one without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import EvalConfig, LossKind, MaskConfig
from shared.store import LatentStore

from salt_train.eval.features import EncoderFeatures, ExtractionPlan, extract
from salt_train.eval.heldout import heldout_figures
from salt_train.eval.probes import ProbeSettings, linear_probe
from salt_train.eval.rows import check_compatible, class_count, draw_eval_rows, eval_candidates, store_labels
from salt_train.model import SaltStudent
from salt_train.target_norm import LAYER_NORM, TargetNorm

MIN_ROWS_PER_CLASS = 10


def enough_labels(labels: np.ndarray, classes: int) -> bool:
    """At least :data:`MIN_ROWS_PER_CLASS` labelled rows of every class."""
    counts = np.bincount(labels[labels >= 0], minlength=classes)
    return classes > 0 and bool((counts >= MIN_ROWS_PER_CLASS).all())


class QuickEval:
    """``settings``: the recipe's eval section; ``mask``, ``loss`` and ``target_norm``: the run's objective."""

    def __init__(
        self,
        settings: EvalConfig,
        mask: MaskConfig,
        loss: LossKind,
        train_store: LatentStore,
        device: torch.device,
        spill: Path,
        target_norm: TargetNorm = LAYER_NORM,
    ) -> None:
        assert settings.val_cache, "checked at start (train.check_quick_eval)"
        self.settings, self.mask, self.loss, self.target_norm = settings, mask, loss, target_norm
        self.device, self.spill = device, spill
        self.val_store = LatentStore.open(settings.val_cache)
        check_compatible(train_store, self.val_store)
        self.train_store = train_store
        rows = min(settings.quick_rows, len(eval_candidates(train_store)), len(eval_candidates(self.val_store)))
        self.val_rows = draw_eval_rows(self.val_store, rows, settings.seed, "eval.quick_rows")[0]
        self.train_rows = draw_eval_rows(train_store, rows, settings.seed, "eval.quick_rows")[0]
        self.val_labels = store_labels(self.val_store, self.val_rows)
        self.train_labels = store_labels(train_store, self.train_rows)
        self.classes = class_count(train_store, self.val_store)
        self.probe = enough_labels(self.train_labels, self.classes) and bool((self.val_labels >= 0).any())

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        assert isinstance(model, SaltStudent)
        settings = self.settings
        was_training = model.training
        try:
            result = heldout_figures(
                self.val_store,
                self.val_rows,
                self.mask,
                self.loss,
                self.device,
                settings.batch_size,
                settings.seed,
                {"student": model},
                self.target_norm,
                None,
            )["student"]
            record: dict[str, Any] = {
                "heldout_loss": result["loss"],
                "heldout_r2": result["r2"],
                "rows": len(self.val_rows),
            }
            if self.probe:
                train_ok, val_ok = self.train_labels >= 0, self.val_labels >= 0
                features = EncoderFeatures("student", model.encoder, self.device)
                plan = lambda rows: ExtractionPlan(rows, np.zeros(len(rows), bool), (), False, settings.seed)  # noqa: E731
                train_f, _ = extract(
                    self.train_store,
                    plan(self.train_rows),
                    {"student": features},
                    settings.batch_size,
                    0,
                    self.spill,
                    "quick-train",
                )
                val_f, _ = extract(
                    self.val_store,
                    plan(self.val_rows),
                    {"student": features},
                    settings.batch_size,
                    0,
                    self.spill,
                    "quick-val",
                )
                probe = linear_probe(
                    train_f["student"].mean[train_ok],
                    self.train_labels[train_ok],
                    val_f["student"].mean[val_ok],
                    self.val_labels[val_ok],
                    self.classes,
                    ProbeSettings(
                        settings.linear_iterations,
                        0.0,
                        settings.linear_l2,
                        settings.probe_batch_size,
                        settings.seed,
                        self.device,
                    ),
                )
                record["linear_top1"] = probe.top1
            return record
        finally:
            model.train(was_training)
