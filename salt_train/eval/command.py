"""`salt-train eval`: how good is a student encoder, next to a floor and its references.

One evaluation, four sections, four columns: the encoder-free ``pixels``
feature (:mod:`salt_train.eval.pixels`, the floor), the same architecture at
its seeded random initialisation, the trained student, and the teacher.

1. held-out distillation loss and per-channel R^2 (:mod:`salt_train.eval.heldout`):
   the training objective itself on validation rows with masks fixed by
   ``eval.seed``, beside the mean-latent baseline (no input at all);
2. temporal probes (no labels, :mod:`salt_train.eval.temporal`): a linear probe
   on per-slot pooled features; the probes that pixels pass by construction are
   labelled sanity checks and left out of the summary;
3. SSv2 action classification: V-JEPA's attentive probe on frozen tokens (with
   the encoder's own head count) and a linear probe on mean-pooled tokens;
4. the references: the teacher's latents from the store for the label probes,
   the teacher run on the transformed clips for the temporal probes (only with
   ``--teacher``), normalised exactly as the training targets are.

Every probe figure is the mean over ``eval.probe_seeds`` probe seeds with a 95%
bootstrap interval over validation rows (:mod:`salt_train.eval.stats`). The
validation store must be held out: another split, and no clip shared with the
train store. Rows, masks and probes are pure functions of ``eval.seed``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from shared.config import EvalConfig, PipelineConfig, dump_pipeline, load_pipeline
from shared.console import print_block
from shared.device import resolve_device
from shared.errors import SaltUsageError, one_line
from shared.store import LatentStore

from salt_train import run_folder
from salt_train.checkpoint import checkpoint_dir, latest_checkpoint, verify_checkpoint
from salt_train.eval.features import (
    EncoderFeatures,
    ExtractionPlan,
    FeatureModel,
    Features,
    TeacherFeatures,
    describe_bound,
    extract,
    spilled_bytes,
)
from salt_train.eval.figures import attentive_figure, over_seeds, probe_settings, temporal_figures
from salt_train.eval.frames import RULE as FEW_FRAMES_RULE
from salt_train.eval.frames import few_frame_figures, few_frame_spill
from salt_train.eval.heldout import channel_means, heldout_figures
from salt_train.eval.latency import encoder_latency
from salt_train.eval.output import prepare_output, scratch
from salt_train.eval.pixels import PixelFeatures
from salt_train.eval.probes import linear_probe, retrieval_top1
from salt_train.eval.profile import EvalProfiler, format_summary
from salt_train.eval.report import COLUMNS, print_table, write_outputs
from salt_train.eval.rows import RowSet, check_compatible, class_count, row_set
from salt_train.eval.temporal import RETRIEVAL_PAIR, RETRIEVAL_SANITY, TASKS, VARIANTS
from salt_train.export import load_encoder, read_export_config
from salt_train.model import SaltStudent, build_salt_student, mask_groups
from salt_train.student import VideoViT, create_timm_vit
from salt_train.target_norm import LAYER_NORM, TargetNorm, run_target_norm

log = logging.getLogger(__name__)

EVAL_FORMAT = "salt-eval"
EVAL_VERSION = 2


@dataclass
class EvalRequest:
    target: Path  # a run folder or an exported encoder folder
    val_cache: Path | None = None
    train_cache: Path | None = None
    checkpoint: str | None = None
    teacher: str | None = None  # runs the teacher on transformed clips for the temporal probes
    pipeline: str | None = None  # eval settings for a bare export (a run folder uses its own recipe)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted recipe fields, e.g. eval.train_rows
    device: str | None = None
    out: Path | None = None
    profile: bool = False  # torch.profiler samples of each phase: eval/profile.txt and a trace per phase


@dataclass
class Subject:
    """The encoder under evaluation, where it came from, and its recipe."""

    path: Path
    kind: str  # "run" or "export"
    source: str  # "checkpoint step-00000150" or "export"
    config: PipelineConfig
    encoder: VideoViT
    student: SaltStudent | None  # the whole student (with predictor) when a checkpoint was read
    architecture: str
    kwargs: dict
    train_cache: Path | None


# ---- what is evaluated ------------------------------------------------------------------


def subject_config(request: EvalRequest) -> PipelineConfig:
    """The recipe of what is evaluated, with the ``eval.*`` overrides: a run folder's own, else ``--pipeline``."""
    target = request.target
    if not target.exists():
        raise SaltUsageError(f"{target} does not exist (a run folder or an exported encoder folder)")
    if (target / "config.yaml").is_file():
        return load_pipeline(target / "config.yaml", request.overrides)
    if (target / "config.json").is_file():
        return load_pipeline(request.pipeline, request.overrides)
    raise SaltUsageError(f"{target} is neither a run folder (config.yaml) nor an exported encoder (config.json)")


def load_subject(request: EvalRequest, config: PipelineConfig, teacher_width: int) -> Subject:
    """A run folder (its newest checkpoint, or ``--checkpoint``, else its export) or a bare export."""
    target = request.target
    if (target / "config.yaml").is_file():
        record = run_folder.read_run_record(target) if (target / "run.json").is_file() else {}
        train_cache = Path(record["cache"]) if record.get("cache") else None
        architecture, kwargs = config.model.student, dict(config.model.student_kwargs)
        checkpoint = _checkpoint_path(target, request.checkpoint)
        if checkpoint is not None:
            student = _load_student(checkpoint, config, teacher_width)
            return Subject(
                target,
                "run",
                f"checkpoint {checkpoint.name}",
                config,
                student.encoder,
                student,
                architecture,
                kwargs,
                train_cache,
            )
        if (target / "export").is_dir():
            encoder = load_encoder(target / "export")
            return Subject(target, "run", "export", config, encoder, None, architecture, kwargs, train_cache)
        raise SaltUsageError(
            f"run folder {target} has neither an export/ nor a checkpoint to evaluate "
            "(train it first, or continue it with salt-train run --resume)"
        )
    export = read_export_config(target)
    if request.checkpoint:
        raise SaltUsageError(f"--checkpoint needs a run folder; {target} is an exported encoder")
    return Subject(
        target,
        "export",
        "export",
        config,
        load_encoder(target),
        None,
        export["architecture"],
        dict(export.get("kwargs", {})),
        None,
    )


def _checkpoint_path(run_dir: Path, name: str | None) -> Path | None:
    if name is None:
        return latest_checkpoint(run_dir)
    path = Path(name)
    for candidate in (path, checkpoint_dir(run_dir) / name):
        if (candidate / "model.safetensors").is_file():
            return candidate
    kept = sorted(p.name for p in checkpoint_dir(run_dir).glob("step-*") if p.is_dir())
    raise SaltUsageError(f"--checkpoint {name}: no such checkpoint in {run_dir} (kept: {', '.join(kept) or 'none'})")


def _load_student(checkpoint: Path, config: PipelineConfig, teacher_width: int) -> SaltStudent:
    """The whole student of ``checkpoint``, proved by its checksums (a damaged one is refused in one line),
    built from the recipe and loaded strictly."""
    verify_checkpoint(checkpoint)
    student = build_salt_student(config.model, teacher_width, mask_groups(config.mask))
    try:
        state = load_file(checkpoint / "model.safetensors")
    except Exception as exc:  # truncated or not safetensors
        raise SaltUsageError(f"checkpoint {checkpoint} is unreadable ({one_line(exc)})") from None
    try:
        student.load_state_dict(state)
    except RuntimeError as exc:
        raise SaltUsageError(
            f"checkpoint {checkpoint} is not a {config.model.student} {dict(config.model.student_kwargs) or ''} "
            f"student predicting {teacher_width}-wide latents, as the run's recipe says "
            f"({one_line(exc, 200)})"
        ) from None
    return student


def random_init(subject: Subject, teacher_width: int) -> tuple[VideoViT, SaltStudent | None]:
    """The same architecture at the seeded initialisation training started from (``train.seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(subject.config.train.seed)  # as Stepper does before building the student
        if subject.student is not None:
            student = build_salt_student(subject.config.model, teacher_width, mask_groups(subject.config.mask))
            return student.encoder, student
        return VideoViT(create_timm_vit(subject.architecture, subject.kwargs)), None


def open_subject_and_stores(
    request: EvalRequest, config: PipelineConfig, val_hint: str
) -> tuple[Subject, LatentStore, LatentStore]:
    """The validation store (``--val-cache``, else the recipe's ``eval.val_cache``; ``val_hint`` says what it
    must be), what is evaluated, and its train store (``--train-cache``, else the run's own)."""
    val_path = request.val_cache or (Path(config.eval.val_cache) if config.eval.val_cache else None)
    if val_path is None:
        raise SaltUsageError(f"--val-cache is required: {val_hint}")
    val_store = LatentStore.open(val_path)
    subject = load_subject(request, config, val_store.teacher_width)
    train_path = request.train_cache or subject.train_cache
    if train_path is None:
        raise SaltUsageError(f"--train-cache is required for {subject.path} (an export records no training store)")
    return subject, LatentStore.open(train_path), val_store


def subject_target_norm(subject: Subject) -> TargetNorm:
    """The targets' normalisation a run trained with (its recorded statistics under ``model.target_norm:
    channel``), so that the held-out loss is the objective it trained on; an export's is layer norm."""
    return run_target_norm(subject.config.model.target_norm, subject.path) if subject.kind == "run" else LAYER_NORM


# ---- the evaluation ----------------------------------------------------------------------

PIXELS, RANDOM, STUDENT, TEACHER, MEAN_LATENT = "pixels", "random_init", "student", "teacher", "mean_latent"


def run_eval(request: EvalRequest) -> dict[str, Any]:
    """Evaluate, print the table, write ``eval/eval.json`` and ``eval/eval.png``; returns the report."""
    started = time.perf_counter()
    device = resolve_device(request.device or "auto", "--device")
    config = subject_config(request)
    subject, train_store, val_store = open_subject_and_stores(
        request,
        config,
        "a store of held-out clips (salt-cache build --src DIR --split validation --out DIR/latents-val.zarr)",
    )
    check_compatible(train_store, val_store)
    settings: EvalConfig = subject.config.eval
    out_dir = request.out or subject.path / "eval"

    train_set = row_set(train_store, settings.train_rows, settings.temporal_rows, settings.seed, "--train-rows")
    val_set = row_set(val_store, settings.val_rows, settings.temporal_rows, settings.seed, "--val-rows")
    target_norm = subject_target_norm(subject)
    random_encoder, random_student = random_init(subject, val_store.teacher_width)
    models: dict[str, FeatureModel] = {
        RANDOM: EncoderFeatures(RANDOM, random_encoder, device),
        STUDENT: EncoderFeatures(STUDENT, subject.encoder, device),
    }
    teacher_note = "not run (pass --teacher to run the teacher on the transformed clips)"
    if request.teacher:
        models[TEACHER] = TeacherFeatures(
            TEACHER, _load_matching_teacher(request.teacher, train_store, device), target_norm
        )
        teacher_note = f"{request.teacher} run on the transformed clips"
    models[PIXELS] = PixelFeatures(PIXELS)
    labelled = bool((train_set.labels >= 0).any() and (val_set.labels >= 0).any())
    memory = int(settings.feature_memory_gb * 1e9)
    seeds = [settings.seed + k for k in range(settings.probe_seeds)]
    # Token banks: every encoder's and the store's latents (the teacher's own tokens of the views are those latents).
    banked = {m: models[m].width for m in models if m != TEACHER}
    widths = banked | {"teacher latents": val_store.teacher_width}
    spill_bytes = spilled_bytes(len(train_set.rows), widths, memory) + spilled_bytes(len(val_set.rows), widths, memory)
    # The few-frame banks come after the 16-frame ones are released: the larger of the two is the peak.
    few_widths = {m: models[m].width for m in (PIXELS, RANDOM, STUDENT)}
    spill_bytes = max(
        spill_bytes, few_frame_spill(len(train_set.rows), len(val_set.rows), few_widths, memory, settings.few_frames)
    )
    prepare_output(out_dir, spill_bytes if labelled else 0)
    print_block(
        "salt-train eval",
        {
            "subject": f"{subject.path} ({subject.source}; {subject.architecture} {subject.kwargs or ''})",
            "device": str(device),
            "train store": f"{train_store.path}: {len(train_set.rows)} rows "
            f"({int(train_set.temporal.sum())} with temporal variants), {int((train_set.labels >= 0).sum())} labelled",
            "val store": f"{val_store.path}: {len(val_set.rows)} rows ({int(val_set.temporal.sum())} with temporal "
            f"variants), {int((val_set.labels >= 0).sum())} labelled (held out: no shared clip)",
            "teacher (temporal)": teacher_note,
            "targets": target_norm.describe(),
            "tokens": describe_bound(len(train_set.rows), widths, memory) if labelled else "not kept (no labels)",
            "probes": f"{len(seeds)} seeds each ({', '.join(map(str, seeds))}), 95% bootstrap intervals over "
            f"validation rows",
            "few frames": (
                f"T = {', '.join(map(str, settings.few_frames))}: {FEW_FRAMES_RULE}"
                if settings.few_frames
                else "none (eval.few_frames: [])"
            ),
        },
    )
    phases: dict[str, float] = {}  # wall seconds of each part (eval.json "seconds_by_phase"; make gpu-check reads it)
    profiler = EvalProfiler(out_dir, device) if request.profile else None
    if profiler is not None:
        profiler.start_phase()
    mark = _phase_clock(phases, started, profiler)
    mark("setup")
    with scratch(out_dir) as spill:
        # Retrieval pairs halves of validation clips only: the train rows skip the second half.
        train_variants = tuple(v for v in VARIANTS if v != RETRIEVAL_PAIR[1])
        train_features, train_latents = extract(
            train_store,
            ExtractionPlan(train_set.rows, train_set.temporal, train_variants, labelled, settings.seed),
            models,
            settings.batch_size,
            memory,
            spill,
            "train",
            with_latents=labelled,
            target_norm=target_norm,
        )
        mark("features_train")
        val_features, val_latents = extract(
            val_store,
            ExtractionPlan(val_set.rows, val_set.temporal, VARIANTS, labelled, settings.seed),
            models,
            settings.batch_size,
            memory,
            spill,
            "val",
            with_latents=labelled,
            target_norm=target_norm,
        )
        mark("features_val")
        attentive, linear = probe_settings(settings, device)

        baseline = channel_means(train_store, train_set.rows, target_norm, settings.batch_size)
        heldout: dict[str, Any] = heldout_figures(
            val_store,
            val_set.rows,
            subject.config.mask,
            subject.config.model.loss,
            device,
            settings.batch_size,
            settings.seed,
            {RANDOM: random_student, STUDENT: subject.student},
            target_norm,
            baseline,
        )
        for name, student in ((RANDOM, random_student), (STUDENT, subject.student)):
            if student is None:
                heldout[name] = {"not_run": "an export holds the encoder only (no predictor): evaluate a run folder"}
        heldout[TEACHER] = {"not_run": "the teacher's own latents are the targets"}
        heldout[PIXELS] = {"not_run": "pixels predict no latents; the mean-latent baseline is the floor"}
        mark("heldout")

        val_temporal_rows = val_set.rows[val_set.temporal]
        temporal: dict[str, Any] = {
            task.name: temporal_figures(
                task,
                train_features,
                val_features,
                COLUMNS,
                val_temporal_rows,
                seeds,
                linear,
                settings.seed,
                {TEACHER: teacher_note},
            )
            for task in TASKS
        }
        first, second = RETRIEVAL_PAIR
        temporal["clip_consistency"] = {
            "description": "first half retrieves second half (shared background)",
            "chance": 1 / max(1, len(val_temporal_rows)),
            "sanity_check": RETRIEVAL_SANITY,
        }
        for name in COLUMNS:
            temporal["clip_consistency"][name] = (
                over_seeds(
                    [retrieval_top1(val_features[name].slots[first], val_features[name].slots[second])],
                    val_temporal_rows,
                    settings.seed,
                )
                if name in models
                else {"not_run": teacher_note}
            )

        mark("temporal_probes")
        classification = _classification(
            train_set,
            val_set,
            train_features,
            val_features,
            train_latents,
            val_latents,
            models,
            settings,
            seeds,
            attentive,
            linear,
            train_store,
        )
        for features in (*train_features.values(), *val_features.values(), train_latents, val_latents):
            if features is not None and features.tokens is not None:
                features.tokens.release()
        mark("classification_probes")
        few_frames = {"not_run": "eval.few_frames is [] (e.g. --set eval.few_frames=[2,4,8])"}
        if settings.few_frames:
            few_frames = few_frame_figures(
                train_set, val_set, models, settings, COLUMNS, seeds, attentive, linear, memory, spill, labelled
            )
            mark("few_frames")
    latency = encoder_latency(subject.encoder, device, settings.latency_repeats)
    mark("latency")
    profile = profiler.finish() if profiler is not None else None

    report = {
        "format": EVAL_FORMAT,
        "format_version": EVAL_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "subject": {
            "path": str(subject.path),
            "kind": subject.kind,
            "source": subject.source,
            "architecture": subject.architecture,
            "kwargs": subject.kwargs,
        },
        "models": {
            PIXELS: "no encoder: per-tubelet 2x2 colours and frame differences (salt_train/eval/pixels.py)",
            RANDOM: f"{subject.architecture} at its seeded initialisation (train.seed {subject.config.train.seed})",
            STUDENT: subject.source,
            TEACHER: f"latents in the store; temporal: {teacher_note}",
            MEAN_LATENT: "each channel's mean of the normed targets over the train rows (no input)",
        },
        "stores": {"train": _store_record(train_store), "val": _store_record(val_store)},
        "rows": {
            "train": train_set.rows.tolist(),
            "val": val_set.rows.tolist(),
            "train_temporal": int(train_set.temporal.sum()),
            "val_temporal": int(val_set.temporal.sum()),
        },
        "seed": settings.seed,
        "probe_seeds": seeds,
        "device": str(device),
        "recipe": dump_pipeline(subject.config),
        "versions": run_folder.versions(),
        "heldout": heldout,
        "temporal": temporal,
        "classification": classification,
        "summary": temporal_summary(temporal),
        "few_frames": few_frames,
        "latency": latency,
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_by_phase": {name: round(seconds, 2) for name, seconds in phases.items()},
    }
    if profile is not None:
        report["profile"] = {"by_phase": profile, "traces": str(out_dir / "profile-PHASE.json.gz")}
    print_table(report)  # first: a failed write below still leaves the figures on screen
    if profile is not None:
        print(format_summary(profile, device.type == "cuda"))
    write_outputs(report, out_dir, subject.path / "metrics.jsonl" if subject.kind == "run" else None)
    return report


def _phase_clock(phases: dict[str, float], started: float, profiler: EvalProfiler | None):
    """``mark(name)``: wall seconds since the previous mark (the first: since ``started``) into ``phases[name]``;
    with ``--profile`` it also closes that phase's profiled window and opens the next one's."""
    last = [started]

    def mark(name: str) -> None:
        now = time.perf_counter()
        phases[name] = now - last[0]
        last[0] = now
        if profiler is not None:
            profiler.end_phase(name, phases[name])
            profiler.start_phase()

    return mark


def temporal_summary(temporal: dict[str, Any]) -> dict[str, Any]:
    """The mean top-1 over the temporal probes that are not sanity checks, per column."""
    tasks = [name for name, task in temporal.items() if not task.get("sanity_check")]
    summary: dict[str, Any] = {"tasks": tasks}
    for column in COLUMNS:
        values = [temporal[t][column]["top1"] for t in tasks if "top1" in temporal[t].get(column, {})]
        summary[column] = float(np.mean(values)) if values and len(values) == len(tasks) else None
    summary["chance"] = float(np.mean([temporal[t]["chance"] for t in tasks])) if tasks else None
    return summary


def _classification(
    train_set: RowSet,
    val_set: RowSet,
    train_features: dict[str, Features],
    val_features: dict[str, Features],
    train_latents: Features | None,
    val_latents: Features | None,
    models: dict[str, FeatureModel],
    settings: EvalConfig,
    seeds: list[int],
    attentive: Any,
    linear: Any,
    train_store: LatentStore,
) -> dict:
    """Attentive and linear probes on the train store's labels, scored on the validation store's."""
    train_ok, val_ok = train_set.labels >= 0, val_set.labels >= 0
    if not train_ok.any() or not val_ok.any():
        which = "train" if not train_ok.any() else "validation"
        log.info("SSv2 classification skipped: the %s store has no labelled rows", which)
        return {"skipped": f"the {which} store has no labels"}
    classes = class_count(train_set.store, val_set.store)
    train_ids, val_ids = np.flatnonzero(train_ok), np.flatnonzero(val_ok)
    train_y, val_y = train_set.labels[train_ids], val_set.labels[val_ids]
    val_rows = val_set.rows[val_ids]
    sources: dict[str, tuple[Features | None, Features | None, int]] = {
        name: (train_features[name], val_features[name], models[name].heads) for name in (PIXELS, RANDOM, STUDENT)
    }
    sources[TEACHER] = (train_latents, val_latents, int(train_store.attrs.get("teacher", {}).get("heads", 16)))
    result: dict[str, Any] = {
        "classes": classes,
        "chance": 1 / classes,
        "train_rows": len(train_ids),
        "val_rows": len(val_ids),
        "attentive": {},
        "linear": {},
        "heads": {},
    }
    for name, (train_f, val_f, heads) in sources.items():
        assert train_f is not None and val_f is not None
        # Each probe is a pure function of its seed: attentive and linear need not interleave.
        result["attentive"][name] = attentive_figure(
            train_f,
            val_f,
            train_ids,
            train_y,
            val_ids,
            val_y,
            val_rows,
            classes,
            heads,
            settings.probe_pool,
            int(settings.feature_memory_gb * 1e9),
            seeds,
            attentive,
            settings.seed,
            label=f"attentive probe ({name})",
        )
        linear_scores = [
            linear_probe(train_f.mean[train_ids], train_y, val_f.mean[val_ids], val_y, classes, linear(seed))
            for seed in seeds
        ]
        result["linear"][name] = over_seeds(linear_scores, val_rows, settings.seed)
        result["heads"][name] = heads
    return result


def _load_matching_teacher(name: str, store: LatentStore, device: torch.device) -> Any:
    """The teacher named by ``--teacher``, refused unless its weights are the ones the store records."""
    from shared.teacher import load_teacher

    recorded = store.attrs.get("teacher", {})
    teacher = load_teacher(
        name, device=str(device) if device.type == "cpu" else "cuda", dtype=recorded.get("compute_dtype", "auto")
    )
    if recorded.get("weights_hash") and teacher.weights_hash != recorded["weights_hash"]:
        raise SaltUsageError(
            f"--teacher {name} is not the teacher the store {store.path} was built with "
            f"({recorded.get('name')}): its weights differ"
        )
    return teacher


def _store_record(store: LatentStore) -> dict[str, Any]:
    return {
        "path": str(store.path.resolve()),
        "identity": store.attrs.get("identity"),
        "teacher": store.attrs.get("teacher"),
        "counts": store.counts(),
        "split": store.attrs.get("source", {}).get("split"),
    }
