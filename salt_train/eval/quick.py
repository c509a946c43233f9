"""The cheap part of `salt-train eval`, run during training every ``train.eval_every`` steps.

Held-out loss and R^2 on ``eval.quick_rows`` validation rows (masks fixed by
``eval.seed``), and a linear probe on mean-pooled encoder features learnt on
as many train rows. The rows are chosen once, at the start; nothing here
touches the global random generator, so a run with quick evaluations trains
exactly as one without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.config import PipelineConfig
from shared.store import LatentStore
from salt_train.eval.command import check_compatible, class_count, draw_eval_rows, eval_candidates, heldout_loss
from salt_train.eval.features import EncoderFeatures, ExtractionPlan, extract
from salt_train.model import SaltStudent
from salt_train.eval.probes import ProbeSettings, linear_probe


class QuickEval:
    def __init__(self, config: PipelineConfig, train_store: LatentStore, device: torch.device, spill: Path,
                 standardisation: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        settings = config.eval
        self.standardisation = standardisation  # model.target_norm: channel: the run's (mean, std)
        assert settings.val_cache, "checked at start (train.check_quick_eval)"
        self.config, self.device, self.spill = config, device, spill
        self.val_store = LatentStore.open(settings.val_cache)
        check_compatible(train_store, self.val_store)
        self.train_store = train_store
        rows = min(settings.quick_rows, len(eval_candidates(train_store)), len(eval_candidates(self.val_store)))
        self.val_rows = draw_eval_rows(self.val_store, rows, settings.seed, "eval.quick_rows")[0]
        self.train_rows = draw_eval_rows(train_store, rows, settings.seed, "eval.quick_rows")[0]
        self.val_labels = np.asarray(self.val_store.array("label")[:], dtype=np.int64)[self.val_rows]
        self.train_labels = np.asarray(train_store.array("label")[:], dtype=np.int64)[self.train_rows]
        self.classes = class_count(train_store, self.val_store)

    def __call__(self, model: SaltStudent) -> dict[str, Any]:
        settings = self.config.eval
        was_training = model.training
        try:
            result = heldout_loss(model, self.val_store, self.val_rows, self.config, self.device,
                                  settings.batch_size, settings.seed, self.standardisation)
            record: dict[str, Any] = {"heldout_loss": result["loss"], "heldout_r2": result["r2"],
                                      "rows": len(self.val_rows)}
            train_ok, val_ok = self.train_labels >= 0, self.val_labels >= 0
            if train_ok.any() and val_ok.any():
                features = EncoderFeatures("student", model.encoder, self.device)
                plan = lambda rows: ExtractionPlan(rows, np.zeros(len(rows), bool), (), False, settings.seed)  # noqa: E731
                train_f, _ = extract(self.train_store, plan(self.train_rows), {"student": features},
                                     settings.batch_size, 0, self.spill, "quick-train")
                val_f, _ = extract(self.val_store, plan(self.val_rows), {"student": features},
                                   settings.batch_size, 0, self.spill, "quick-val")
                probe = linear_probe(train_f["student"].mean[train_ok], self.train_labels[train_ok],
                                     val_f["student"].mean[val_ok], self.val_labels[val_ok], self.classes,
                                     ProbeSettings(settings.linear_iterations, 0.0, settings.linear_l2,
                                                   settings.probe_batch_size, settings.seed, self.device))
                record["linear_top1"] = probe.top1
            return record
        finally:
            model.train(was_training)
