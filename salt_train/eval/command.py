"""`salt-train eval`: how good is a student encoder, next to its teacher and a random init.

One evaluation, four sections, three models (the trained student, the same
architecture at its seeded random initialisation, and the teacher):

1. held-out distillation loss: the training objective on validation rows with
   masks fixed by ``eval.seed`` (the same for every model), and
   R^2 = 1 - MSE / variance of the normed targets;
2. temporal probes (no labels): a linear probe on per-slot pooled features
   tells forward from reversed, motion from static, ordered from shuffled and
   playback stride 1/2/4; plus top-1 retrieval between the two halves of a clip;
3. SSv2 action classification: V-JEPA's attentive probe on frozen tokens
   (top-1, top-5) and a linear probe on mean-pooled tokens;
4. the references: the teacher's latents from the store for the label probes
   (no rerun), the teacher run on the transformed clips for the temporal probes
   (only with ``--teacher``), and the random-init student everywhere.

Features are computed once per model and row set (:mod:`salt_train.eval.features`);
rows, masks and probes are pure functions of ``eval.seed``.
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
from shared.rows import committed_rows, read_rows
from shared.store import LatentStore
from salt_train import run_folder
from salt_train.checkpoint import checkpoint_dir, latest_checkpoint
from salt_train.data import normalised_pixels
from salt_train.export import load_encoder, read_export_config
from salt_train.eval.features import (EncoderFeatures, ExtractionPlan, FeatureModel, Features, TeacherFeatures,
                                  describe_bound, extract, pool_tokens)
from salt_train.loss import normalise_targets
from salt_train.masks import describe_masks, make_masks, mask_layout
from salt_train.model import SaltStudent, build_salt_student, mask_groups
from salt_train.eval.probes import ProbeSettings, attentive_probe, linear_probe, retrieval_top1, stack_tasks
from salt_train.student import VideoViT, create_timm_vit, gather_tokens
from salt_train.eval.temporal import RETRIEVAL_PAIR, TASKS, VARIANTS

log = logging.getLogger(__name__)

EVAL_FORMAT = "salt-eval"
EVAL_VERSION = 1
STUDENT, RANDOM, TEACHER = "student", "random_init", "teacher"


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
            return Subject(target, "run", f"checkpoint {checkpoint.name}", config, student.encoder, student,
                           architecture, kwargs, train_cache)
        if (target / "export").is_dir():
            encoder = load_encoder(target / "export")
            return Subject(target, "run", "export", config, encoder, None, architecture, kwargs, train_cache)
        raise SaltUsageError(f"run folder {target} has neither an export/ nor a checkpoint to evaluate "
                             "(train it first, or continue it with salt-train run --resume)")
    export = read_export_config(target)
    if request.checkpoint:
        raise SaltUsageError(f"--checkpoint needs a run folder; {target} is an exported encoder")
    return Subject(target, "export", "export", config, load_encoder(target), None, export["architecture"],
                   dict(export.get("kwargs", {})), None)


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
    """The whole student of ``checkpoint``, built from the recipe and loaded strictly."""
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
            f"({one_line(exc, 200)})") from None
    return student


def random_init(subject: Subject, teacher_width: int) -> tuple[VideoViT, SaltStudent | None]:
    """The same architecture at the seeded initialisation training started from (``train.seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(subject.config.train.seed)  # as Stepper does before building the student
        if subject.student is not None:
            student = build_salt_student(subject.config.model, teacher_width, mask_groups(subject.config.mask))
            return student.encoder, student
        return VideoViT(create_timm_vit(subject.architecture, subject.kwargs)), None


def run_standardisation(subject: Subject) -> tuple[np.ndarray, np.ndarray] | None:
    """A run of ``model.target_norm: channel``: the per-channel (mean, std) it recorded, so that the
    held-out loss is the objective it trained on."""
    if subject.kind != "run" or subject.config.model.target_norm != "channel":
        return None
    stats = run_folder.read_target_stats(subject.path)
    if stats is None:
        raise SaltUsageError(f"{subject.path} trained with model.target_norm: channel but holds no "
                             f"{run_folder.TARGET_STATS}: its held-out loss cannot be measured as it trained")
    return stats.standardisation()


# ---- which stores and rows ---------------------------------------------------------------

def check_compatible(train: LatentStore, val: LatentStore) -> None:
    """Refuse a validation store made by another teacher, view recipe or geometry than the train store."""
    found = []
    t_id, v_id = train.attrs.get("identity", {}), val.attrs.get("identity", {})
    if t_id.get("teacher_weights_hash") != v_id.get("teacher_weights_hash") or train.teacher_width != val.teacher_width:
        found.append(f"another teacher ({val.attrs.get('teacher', {}).get('name')} vs "
                     f"{train.attrs.get('teacher', {}).get('name')})")
    if t_id.get("teacher_compute_dtype") != v_id.get("teacher_compute_dtype"):
        found.append("another teacher precision")
    if _view_recipe(train) != _view_recipe(val):
        found.append("another view recipe")
    if train.attrs.get("geometry") != val.attrs.get("geometry"):
        found.append("another geometry")
    if found:
        raise SaltUsageError(f"validation store {val.path} was built with {', '.join(found)} than the train store "
                             f"{train.path}: build it with the same teacher and recipe (salt-cache build --split "
                             "validation --teacher ... --pipeline ...)")


def _view_recipe(store: LatentStore) -> dict:
    """The view recipe without the sampling offset (a validation store may use centre sampling) and the
    extra views (a validation store has one view per clip, the train store's view 0)."""
    view = dict(store.attrs.get("view", {}))
    for key in ("sampling", "sampling_rule", "views_per_clip", "view_rule", "crop_scale", "crop_ratio"):
        view.pop(key, None)
    return view


def eval_candidates(store: LatentStore) -> np.ndarray:
    """The rows an evaluation may draw: committed ones, and of a store of several views per clip
    view 0 only (the centre view: one row per clip)."""
    return store.first_views(committed_rows(store))


def draw_eval_rows(store: LatentStore, count: int, seed: int, flag: str) -> tuple[np.ndarray, np.ndarray]:
    """``count`` of the :func:`eval_candidates`, a seeded choice: (sorted rows, their order of choice
    for subsets)."""
    committed = eval_candidates(store)
    if count > len(committed):
        what = "committed rows" if store.views_per_clip == 1 else "clips with a committed view 0"
        raise SaltUsageError(f"{flag} {count}: store {store.path} has only {len(committed)} {what} "
                             f"(ask for at most {len(committed)})")
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, len(committed)]))
    chosen = rng.permutation(committed)[:count]
    rank = np.empty(count, dtype=np.int64)
    order = np.argsort(chosen)
    rank[order] = np.arange(count)
    return chosen[order], rank[order]  # rank[i]: when row i was chosen (first chosen: 0)


def class_count(*stores: LatentStore) -> int:
    return int(max(int(np.max(s.array("label")[:], initial=-1)) for s in stores)) + 1


# ---- held-out distillation loss --------------------------------------------------------

@torch.inference_mode()
def heldout_loss(student: SaltStudent, store: LatentStore, rows: np.ndarray, config: PipelineConfig,
                 device: torch.device, batch_size: int, seed: int,
                 standardisation: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """The training objective on ``rows`` with masks fixed by ``seed`` (batch k: ``make_masks(..., seed, k)``):
    per mask group the mean error over its targets, then the mean over groups, as in training.
    R^2 is 1 - that MSE / the variance of all the groups' normed targets. ``standardisation``:
    the run's per-channel (mean, std) of ``model.target_norm: channel``."""
    student.to(device).eval()
    mean, std = ((torch.as_tensor(a, dtype=torch.float32, device=device) for a in standardisation)
                 if standardisation is not None else (None, None))
    groups = len(mask_layout(config.mask.kind, config.mask.ratio))
    sse, sae, count = np.zeros(groups), np.zeros(groups), np.zeros(groups)
    total = total_sq = 0.0
    cuda = device.type == "cuda"
    for k, start in enumerate(range(0, len(rows), batch_size)):
        ids = rows[start:start + batch_size]
        views, latents = read_rows(store, ids, ("pixels", "latents"))
        masks = make_masks(config.mask.kind, config.mask.ratio, len(ids), seed, k).to(device)
        pixels, latents = normalised_pixels(torch.from_numpy(views), device), torch.from_numpy(latents).to(device)
        for group, (visible, masked) in enumerate(zip(masks.visible, masks.masked)):
            with torch.autocast(device.type, dtype=torch.bfloat16 if cuda else torch.float32, enabled=cuda):
                predicted = student(pixels, visible, masked)
            targets = normalise_targets(gather_tokens(latents, masked), mean, std)
            error = predicted.float() - targets
            sse[group] += float(error.square().sum())
            sae[group] += float(error.abs().sum())
            count[group] += targets.numel()
            total += float(targets.sum())
            total_sq += float(targets.square().sum())
    mse = float(np.mean(sse / count))
    variance = total_sq / count.sum() - (total / count.sum()) ** 2
    return {"loss": mse if config.model.loss == "mse" else float(np.mean(sae / count)), "loss_kind": config.model.loss,
            "mse": mse, "r2": 1.0 - mse / variance, "rows": len(rows),
            "mask": describe_masks(config.mask.kind, config.mask.ratio)}


# ---- the evaluation ----------------------------------------------------------------------

@dataclass
class RowSet:
    store: LatentStore
    rows: np.ndarray
    temporal: np.ndarray  # bool per row
    labels: np.ndarray  # per row, -1 unknown


def _row_set(store: LatentStore, count: int, temporal_rows: int | None, seed: int, flag: str) -> RowSet:
    rows, rank = draw_eval_rows(store, count, seed, flag)
    temporal = rank < (temporal_rows if temporal_rows is not None else count)
    labels = np.asarray(store.array("label")[:], dtype=np.int64)[rows]
    return RowSet(store, rows, temporal, labels)


def run_eval(request: EvalRequest) -> dict[str, Any]:
    """Evaluate, print the table, write ``eval/eval.json`` and ``eval/eval.png``; returns the report."""
    started = time.perf_counter()
    device = resolve_device(request.device or "auto", "--device")
    config = subject_config(request)
    val_path = request.val_cache or (Path(config.eval.val_cache) if config.eval.val_cache else None)
    if val_path is None:
        raise SaltUsageError("--val-cache is required: a store of held-out clips (salt-cache build --src DIR "
                             "--split validation --out DIR/latents-val.zarr)")
    val_store = LatentStore.open(val_path)
    subject = load_subject(request, config, val_store.teacher_width)
    train_path = request.train_cache or subject.train_cache
    if train_path is None:
        raise SaltUsageError(f"--train-cache is required for {subject.path} (an export records no training store)")
    train_store = LatentStore.open(train_path)
    check_compatible(train_store, val_store)
    settings: EvalConfig = subject.config.eval
    out_dir = request.out or subject.path / "eval"

    train_set = _row_set(train_store, settings.train_rows, settings.temporal_rows, settings.seed, "--train-rows")
    val_set = _row_set(val_store, settings.val_rows, settings.temporal_rows, settings.seed, "--val-rows")
    standardisation = run_standardisation(subject)
    random_encoder, random_student = random_init(subject, val_store.teacher_width)
    models: dict[str, FeatureModel] = {
        RANDOM: EncoderFeatures(RANDOM, random_encoder, device),
        STUDENT: EncoderFeatures(STUDENT, subject.encoder, device),
    }
    teacher_note = "not run (pass --teacher to run the teacher on the transformed clips)"
    if request.teacher:
        models[TEACHER] = TeacherFeatures(TEACHER, _load_matching_teacher(request.teacher, train_store, device))
        teacher_note = f"{request.teacher} run on the transformed clips"
    labelled = (train_set.labels >= 0).any() and (val_set.labels >= 0).any()
    memory = int(settings.feature_memory_gb * 1e9)
    print_block("salt-train eval", {
        "subject": f"{subject.path} ({subject.source}; {subject.architecture} {subject.kwargs or ''})",
        "device": str(device),
        "train store": f"{train_store.path}: {len(train_set.rows)} rows ({int(train_set.temporal.sum())} with temporal "
                       f"variants), {int((train_set.labels >= 0).sum())} labelled",
        "val store": f"{val_store.path}: {len(val_set.rows)} rows ({int(val_set.temporal.sum())} with temporal "
                     f"variants), {int((val_set.labels >= 0).sum())} labelled",
        "teacher (temporal)": teacher_note,
        "tokens": describe_bound(len(train_set.rows), {m: models[m].width for m in models}, memory)
                  if labelled else "not kept (no labels)",
        "seed": settings.seed,
    })
    spill = out_dir / "features"
    # Retrieval pairs halves of validation clips only: the train rows skip the second half.
    train_variants = tuple(v for v in VARIANTS if v != RETRIEVAL_PAIR[1])
    train_features, train_latents = extract(
        train_store, ExtractionPlan(train_set.rows, train_set.temporal, train_variants, bool(labelled), settings.seed),
        models, settings.batch_size, memory, spill, "train", with_latents=bool(labelled))
    val_features, val_latents = extract(
        val_store, ExtractionPlan(val_set.rows, val_set.temporal, VARIANTS, bool(labelled), settings.seed),
        models, settings.batch_size, memory, spill, "val", with_latents=bool(labelled))
    probe = lambda epochs, lr, wd, batch: ProbeSettings(epochs, lr, wd, batch, settings.seed, device)  # noqa: E731
    linear = probe(settings.linear_iterations, 0.0, settings.linear_l2, settings.probe_batch_size)

    heldout: dict[str, Any] = {}
    for name, student in ((RANDOM, random_student), (STUDENT, subject.student)):
        heldout[name] = (heldout_loss(student, val_store, val_set.rows, subject.config, device, settings.batch_size,
                                      settings.seed, standardisation) if student is not None
                         else {"not_run": "an export holds the encoder only (no predictor): evaluate a run folder"})
    heldout[TEACHER] = {"not_run": "the teacher's own latents are the targets"}

    temporal: dict[str, Any] = {}
    for task in TASKS:
        temporal[task.name] = {"description": task.description, "chance": 1 / len(task.classes)}
        for name in (RANDOM, STUDENT, TEACHER):
            if name not in models:
                temporal[task.name][name] = {"not_run": teacher_note}
                continue
            train_x, train_y = stack_tasks(train_features[name].slots, task.classes)
            val_x, val_y = stack_tasks(val_features[name].slots, task.classes)
            temporal[task.name][name] = vars(linear_probe(train_x, train_y, val_x, val_y, len(task.classes), linear))
    first, second = RETRIEVAL_PAIR
    temporal["clip_consistency"] = {"description": "top-1 retrieval: first half finds second half",
                                    "chance": 1 / max(1, int(val_set.temporal.sum()))}
    for name in (RANDOM, STUDENT, TEACHER):
        temporal["clip_consistency"][name] = (
            vars(retrieval_top1(val_features[name].slots[first], val_features[name].slots[second]))
            if name in models else {"not_run": teacher_note})

    classification = _classification(train_set, val_set, train_features, val_features, train_latents, val_latents,
                                     models, settings, probe, linear)
    for features in (*train_features.values(), *val_features.values(), train_latents, val_latents):
        if features is not None and features.tokens is not None:
            features.tokens.release()

    report = {
        "format": EVAL_FORMAT, "format_version": EVAL_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "subject": {"path": str(subject.path), "kind": subject.kind, "source": subject.source,
                    "architecture": subject.architecture, "kwargs": subject.kwargs},
        "models": {RANDOM: f"{subject.architecture} at its seeded initialisation (train.seed "
                           f"{subject.config.train.seed})",
                   STUDENT: subject.source, TEACHER: f"latents in the store; temporal: {teacher_note}"},
        "stores": {"train": _store_record(train_store), "val": _store_record(val_store)},
        "rows": {"train": train_set.rows.tolist(), "val": val_set.rows.tolist(),
                 "train_temporal": int(train_set.temporal.sum()), "val_temporal": int(val_set.temporal.sum())},
        "seed": settings.seed, "device": str(device),
        "recipe": dump_pipeline(subject.config),
        "versions": run_folder.versions(),
        "heldout": heldout, "temporal": temporal, "classification": classification,
        "seconds": round(time.perf_counter() - started, 1),
    }
    from salt_train.eval.report import print_table, write_outputs

    write_outputs(report, out_dir, subject.path / "metrics.jsonl" if subject.kind == "run" else None)
    print_table(report)
    return report


def _classification(train_set: RowSet, val_set: RowSet, train_features: dict[str, Features],
                    val_features: dict[str, Features], train_latents: Features | None, val_latents: Features | None,
                    models: dict[str, FeatureModel], settings: EvalConfig, probe: Any, linear: ProbeSettings) -> dict:
    """Attentive and linear probes on the train store's labels, scored on the validation store's."""
    train_ok, val_ok = train_set.labels >= 0, val_set.labels >= 0
    if not train_ok.any() or not val_ok.any():
        which = "train" if not train_ok.any() else "validation"
        log.info("SSv2 classification skipped: the %s store has no labelled rows", which)
        return {"skipped": f"the {which} store has no labels"}
    classes = class_count(train_set.store, val_set.store)
    train_ids, val_ids = np.flatnonzero(train_ok), np.flatnonzero(val_ok)
    train_y, val_y = train_set.labels[train_ids], val_set.labels[val_ids]
    attentive = probe(settings.probe_epochs, settings.probe_lr, settings.probe_weight_decay, settings.probe_batch_size)
    sources = {RANDOM: (train_features[RANDOM], val_features[RANDOM]),
               STUDENT: (train_features[STUDENT], val_features[STUDENT]),
               TEACHER: (train_latents, val_latents)}
    result: dict[str, Any] = {"classes": classes, "chance": 1 / classes, "train_rows": len(train_ids),
                              "val_rows": len(val_ids), "attentive": {}, "linear": {}}
    for name, (train_f, val_f) in sources.items():
        assert train_f is not None and val_f is not None and train_f.tokens is not None and val_f.tokens is not None
        width = train_f.mean.shape[1]
        pool = settings.probe_pool
        read_train = lambda ids, f=train_f: pool_tokens(f.tokens.read(train_ids[ids], attentive.device), pool)  # noqa: E731
        read_val = lambda ids, f=val_f: pool_tokens(f.tokens.read(val_ids[ids], attentive.device), pool)  # noqa: E731
        probe = attentive_probe(read_train, train_y, read_val, val_y, width, classes, attentive)
        result["attentive"][name] = vars(probe)
        result["linear"][name] = vars(linear_probe(train_f.mean[train_ids], train_y, val_f.mean[val_ids], val_y,
                                                   classes, linear))
    return result


def _load_matching_teacher(name: str, store: LatentStore, device: torch.device) -> Any:
    """The teacher named by ``--teacher``, refused unless its weights are the ones the store records."""
    from shared.teacher import load_teacher

    recorded = store.attrs.get("teacher", {})
    teacher = load_teacher(name, device=str(device) if device.type == "cpu" else "cuda",
                           dtype=recorded.get("compute_dtype", "auto"))
    if recorded.get("weights_hash") and teacher.weights_hash != recorded["weights_hash"]:
        raise SaltUsageError(f"--teacher {name} is not the teacher the store {store.path} was built with "
                             f"({recorded.get('name')}): its weights differ")
    return teacher


def _store_record(store: LatentStore) -> dict[str, Any]:
    return {"path": str(store.path.resolve()), "identity": store.attrs.get("identity"),
            "teacher": store.attrs.get("teacher"), "counts": store.counts(),
            "split": store.attrs.get("source", {}).get("split")}
