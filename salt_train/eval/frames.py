"""Few-frame rows: what the encoder gives from T < 16 input frames (``eval.few_frames``).

A vision-language-action policy encodes the few frames it has just seen, not 16 spread over a whole
clip. These rows measure the encoder in that setting, with the same probes as the 16-frame rows:

- **which frames**: the T consecutive frames at the centre of the 16-frame store view, starting on a
  tubelet boundary (:func:`frame_window`: frames 6-7 for T=2, 6-9 for T=4, 4-11 for T=8). Consecutive,
  so that the frame rate is the one the encoder trained at; at the centre, where SSv2's action is; on
  a tubelet boundary, so that each of the T/2 input tubelets is one of the 16-frame clip's own pairs.
- **which encoder**: ``load_encoder(num_frames=T)``'s rule (:func:`with_slots`): the positions of the
  first T/2 time slots, the same weights.
- **which probes**: the SSv2 attentive probe (when both stores are labelled) and the temporal probes
  that are defined on T/2 tubelets (:func:`salt_train.eval.temporal.tasks_at`: the arrow of time at
  every T, tubelet order and continuity from 4 frames), their variants applied to the T frames.
- **which columns**: pixels (the floor, on the same T frames), random-init and student. The teacher is
  not run: VideoMAE's fixed positions take 16 frames only.

Each T costs an extraction of about T/16 of the 16-frame one (fewer tokens, fewer variants).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from shared import geometry
from shared.config import EvalConfig

from salt_train.eval.features import EncoderFeatures, ExtractionPlan, FeatureModel, extract, spilled_bytes
from salt_train.eval.figures import SettingsFor, attentive_figure, temporal_figures
from salt_train.eval.pixels import PixelFeatures
from salt_train.eval.rows import RowSet, class_count
from salt_train.eval.temporal import TASKS, tasks_at
from salt_train.export import keep_first_slots
from salt_train.student import VideoViT

RULE = (
    "T consecutive frames at the centre of the 16-frame view, from a tubelet boundary; the encoder keeps "
    "the positions of its first T/2 time slots (load_encoder(num_frames=T))"
)
TEACHER_NOT_RUN = "the teacher takes 16 frames (VideoMAE's positions are fixed)"


def frame_window(num_frames: int) -> np.ndarray:
    """The view frames of the T-frame clip: T consecutive ones at the centre, starting on a tubelet boundary."""
    start = geometry.TUBELET_SIZE * ((geometry.NUM_FRAMES - num_frames) // (2 * geometry.TUBELET_SIZE))
    return np.arange(start, start + num_frames)


def with_slots(encoder: VideoViT, num_frames: int) -> VideoViT:
    """The encoder for ``num_frames`` input frames: positions of its first T/2 slots (a copy of its own),
    every other module shared with ``encoder``, not copied."""
    shared = {id(module): module for module in encoder.children()}
    return keep_first_slots(copy.deepcopy(encoder, shared), num_frames)


def few_frame_models(models: dict[str, FeatureModel], num_frames: int) -> dict[str, FeatureModel]:
    """The columns that run on ``num_frames`` frames: the encoders with their slots cut, the pixel feature."""
    out: dict[str, FeatureModel] = {}
    for name, model in models.items():
        if isinstance(model, EncoderFeatures):
            out[name] = EncoderFeatures(name, with_slots(model.encoder, num_frames), model.device)
        elif isinstance(model, PixelFeatures):
            out[name] = model
    return out


def few_frame_spill(
    train_rows: int, val_rows: int, widths: dict[str, int], memory_bytes: int, frames: list[int]
) -> int:
    """Bytes of the few-frame token banks that will go to disk (one frame count's at a time)."""
    tokens = lambda t: t // geometry.TUBELET_SIZE * geometry.TOKENS_PER_FRAME  # noqa: E731
    return max(
        (
            spilled_bytes(train_rows, widths, memory_bytes, tokens(t))
            + spilled_bytes(val_rows, widths, memory_bytes, tokens(t))
            for t in frames
        ),
        default=0,
    )


def few_frame_figures(
    train_set: RowSet,
    val_set: RowSet,
    models: dict[str, FeatureModel],
    settings: EvalConfig,
    columns: tuple[str, ...],
    seeds: list[int],
    attentive: SettingsFor,
    linear: SettingsFor,
    memory_bytes: int,
    spill_dir: Path,
    labelled: bool,
) -> dict[str, Any]:
    """eval.json's ``few_frames`` section: per frame count, its frames, temporal probes and SSv2 probe."""
    result: dict[str, Any] = {"rule": RULE, "frames": {}}
    val_temporal_rows = val_set.rows[val_set.temporal]
    for count in settings.few_frames:
        window = frame_window(count)
        tasks = tasks_at(count)
        variants = tuple(dict.fromkeys(("original", *(name for task in tasks for name in task.classes))))
        few_models = few_frame_models(models, count)
        not_run = {name: TEACHER_NOT_RUN for name in columns if name not in few_models}
        features = {}
        for label, rows in (("train", train_set), ("val", val_set)):
            plan = ExtractionPlan(rows.rows, rows.temporal, variants, labelled, settings.seed, frames=window)
            features[label], _ = extract(
                rows.store, plan, few_models, settings.batch_size, memory_bytes, spill_dir, f"{label}-{count}-frames"
            )
        temporal = {
            task.name: temporal_figures(
                task,
                features["train"],
                features["val"],
                columns,
                val_temporal_rows,
                seeds,
                linear,
                settings.seed,
                not_run,
            )
            for task in tasks
        }
        classification = (
            _attentive(train_set, val_set, features, few_models, columns, settings, seeds, attentive, not_run)
            if labelled
            else {"skipped": "the stores have no labels"}
        )
        for side in features.values():
            for feature in side.values():
                if feature.tokens is not None:
                    feature.tokens.release()
        result["frames"][str(count)] = {
            "frames": window.tolist(),
            "tubelets": count // geometry.TUBELET_SIZE,
            "temporal": temporal,
            "undefined": [t.name for t in TASKS if not t.sanity and t not in tasks],
            "classification": classification,
        }
    return result


def _attentive(
    train_set: RowSet,
    val_set: RowSet,
    features: dict[str, dict],
    models: dict[str, FeatureModel],
    columns: tuple[str, ...],
    settings: EvalConfig,
    seeds: list[int],
    attentive: SettingsFor,
    not_run: dict[str, str],
) -> dict[str, Any]:
    """The SSv2 attentive probe on the T-frame tokens of every column that ran (labelled rows only)."""
    train_ids, val_ids = np.flatnonzero(train_set.labels >= 0), np.flatnonzero(val_set.labels >= 0)
    classes = class_count(train_set.store, val_set.store)
    result: dict[str, Any] = {"classes": classes, "chance": 1 / classes, "attentive": {}, "heads": {}}
    for name in columns:
        if name not in models:
            result["attentive"][name] = {"not_run": not_run[name]}
            continue
        result["attentive"][name] = attentive_figure(
            features["train"][name],
            features["val"][name],
            train_ids,
            train_set.labels[train_ids],
            val_ids,
            val_set.labels[val_ids],
            val_set.rows[val_ids],
            classes,
            models[name].heads,
            settings.probe_pool,
            int(settings.feature_memory_gb * 1e9),
            seeds,
            attentive,
            settings.seed,
        )
        result["heads"][name] = models[name].heads
    return result
