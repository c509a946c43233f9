"""`salt-train eval --protocol vjepa`: V-JEPA's frozen SSv2 evaluation of an encoder, end to end.

The encoder is frozen; an attentive probe over both clips' tokens trains for ``eval.vjepa.epochs`` epochs
on the whole train split, each video decoded and augmented again every epoch (features cannot be
cached), then scores the whole validation split with 2 clips x 3 spatial views, the softmax averaged over
the views. Every setting is ``eval.vjepa`` (shared/config.py) and is recorded in ``eval.json``.

One process: micro-batches accumulate to the global batch. Under torchrun: each rank decodes and encodes
its share of every global batch, DDP all-reduces the probe's gradients once per step (NCCL on GPUs, gloo
on CPU), and validation results are gathered to rank 0, which writes the report. bf16 autocast on CUDA,
float32 on CPU. Progress bars give the rate and the time left.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from shared.config import PipelineConfig, VjepaEvalConfig, dump_pipeline
from shared.console import print_block, progress
from shared.device import resolve_device
from shared.distributed import Dist, backend_for, distributed, warn_if_oversubscribed
from shared.errors import SaltUsageError, one_line
from shared.filesystem import write_json_atomic
from shared.geometry import TOKENS_PER_FRAME, TUBELET_SIZE

from salt_train import run_folder
from salt_train.eval.command import (
    EVAL_FORMAT,
    EVAL_VERSION,
    EvalRequest,
    Subject,
    open_subject_and_stores,
    subject_config,
)
from salt_train.eval.features import encoder_heads
from salt_train.eval.output import prepare_output
from salt_train.eval.stats import seeded_score
from salt_train.eval.vjepa.clips import SplitClips, check_held_out, split_clips
from salt_train.eval.vjepa.data import VALIDATION, ProtocolClips, epoch_steps, make_loader, validation_batches
from salt_train.eval.vjepa.optim import CosineSchedule, accumulate, make_optimizer, optimizer_step
from salt_train.eval.vjepa.probe import averaged_softmax, build_probe, top_k_correct, view_logits
from salt_train.eval.vjepa.views import encoder_batch, probe_inputs
from salt_train.export import keep_first_slots
from salt_train.student import VideoViT

log = logging.getLogger(__name__)

PROTOCOL = "vjepa"
OUT_NAME = "eval-vjepa"  # beside the fast protocol's eval/, never over it


@dataclass
class Setup:
    config: PipelineConfig
    settings: VjepaEvalConfig
    subject: Subject
    train: SplitClips
    val: SplitClips
    out_dir: Path


def _setup(request: EvalRequest, dist: Dist) -> Setup:
    """What is evaluated, on which videos, and every refusal (one line, exit 2) before any work."""
    config = subject_config(request)
    settings = config.eval.vjepa
    subject, train_store, val_store = open_subject_and_stores(
        request, config, "a store built from the validation split (its source videos are decoded again)"
    )
    train = split_clips(train_store, settings.train_clips, settings.seed, "eval.vjepa.train_clips")
    val = split_clips(val_store, settings.val_clips, settings.seed, "eval.vjepa.val_clips")
    check_held_out(train, val)
    if settings.batch_size % dist.world_size:
        raise SaltUsageError(
            f"eval.vjepa.batch_size {settings.batch_size} is not a multiple of the {dist.world_size} "
            "ranks: each rank takes an equal share of every global batch"
        )
    if settings.batch_size > len(train.clips):
        raise SaltUsageError(
            f"eval.vjepa.batch_size {settings.batch_size} is more than the {len(train.clips)} "
            "train videos: no whole batch to step on"
        )
    out_dir = request.out or subject.path / OUT_NAME
    if dist.is_main:
        prepare_output(out_dir, 0)  # an output folder that cannot be written is refused before hours of work
    return Setup(config, settings, subject, train, val, out_dir)


def _autocast(device: torch.device) -> AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def frozen_encoder(encoder: VideoViT, frames: int, device: torch.device) -> VideoViT:
    if frames != 2 * encoder.temporal_embed.shape[1]:
        encoder = keep_first_slots(encoder, frames)
    return encoder.to(device).eval().requires_grad_(False)


def encode(encoder: VideoViT, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[B, clips, views, 3, T, 224, 224]`` -> tokens ``[B * clips * views, N, width]``, frozen."""
    with torch.no_grad(), _autocast(device):
        return encoder(encoder_batch(pixels.to(device, non_blocking=True)))


def run_vjepa(request: EvalRequest) -> dict[str, Any] | None:
    """Train and score the probe; rank 0 prints the result, writes ``eval.json`` and returns the report."""
    started = time.perf_counter()
    device = resolve_device(request.device or "auto", "--device")
    with distributed(backend_for(device)) as dist:
        device = dist.device(device)
        setup = dist.agree(lambda: _setup(request, dist))
        return _evaluate(setup, dist, device, started)


def _evaluate(setup: Setup, dist: Dist, device: torch.device, started: float) -> dict[str, Any] | None:
    settings, train, val = setup.settings, setup.train, setup.val
    encoder = frozen_encoder(setup.subject.encoder, settings.frames_per_clip, device)
    width, heads = encoder.width, encoder_heads(encoder)
    probe = build_probe(width, train.classes, heads, settings.seed).to(device)
    model = (
        DistributedDataParallel(probe, device_ids=[device.index] if device.type == "cuda" else None)
        if dist.enabled
        else probe
    )
    optimizer = make_optimizer(probe, settings.weight_decay, fused=device.type == "cuda")
    steps_per_epoch = len(train.clips) // settings.batch_size
    schedule = CosineSchedule(
        settings.epochs * steps_per_epoch,
        settings.lr,
        settings.final_lr,
        settings.weight_decay,
        settings.final_weight_decay,
    )
    micro_per_step = len(epoch_steps(len(train.clips), settings, 0, dist.rank, dist.world_size)[0].micro_batches)
    tokens_per_clip = settings.frames_per_clip // TUBELET_SIZE * TOKENS_PER_FRAME
    warn_if_oversubscribed(dist, settings.num_workers, "eval.vjepa.num_workers")
    print_block(
        "salt-train eval --protocol vjepa",
        {
            "subject": f"{setup.subject.path} ({setup.subject.source}; {setup.subject.architecture})",
            "device": f"{device} x {dist.world_size} rank(s), "
            f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}",
            "train": f"{len(train.clips)} {train.split} videos of {train.root} ({train.missing} missing, left out)",
            "val": f"{len(val.clips)} {val.split} videos ({val.missing} missing, left out), {train.classes} classes",
            "clips": f"{settings.clips} x {settings.frames_per_clip} frames, step {settings.frame_step}; validation "
            f"{settings.clips} x {settings.spatial_views} views",
            "probe": f"attentive, {heads} heads over {settings.clips} x {tokens_per_clip} tokens of width {width}",
            "optimiser": f"AdamW lr {settings.lr:g} -> {settings.final_lr:g} cosine, weight decay "
            f"{settings.weight_decay:g} -> {settings.final_weight_decay:g}, {settings.epochs} epochs x "
            f"{steps_per_epoch} steps of {settings.batch_size} ({micro_per_step} micro-batch(es) per rank)",
            "output": setup.out_dir,
        },
    )
    train_data, val_data = ProtocolClips(train.clips, settings), ProtocolClips(val.clips, settings)
    pin = device.type == "cuda"
    epochs: list[dict[str, Any]] = []
    failures: list[str] = []
    train_started = time.perf_counter()
    bar = progress(settings.epochs * steps_per_epoch * settings.batch_size, "probe training", unit="video")
    step = 0
    for epoch in range(settings.epochs):
        model.train()
        steps = epoch_steps(len(train.clips), settings, epoch, dist.rank, dist.world_size)
        micro = [
            (piece, index == len(s.micro_batches) - 1, s.global_size)
            for s in steps
            for index, piece in enumerate(s.micro_batches)
        ]
        loader = make_loader(train_data, [m[0] for m in micro], epoch, settings.num_workers, pin)
        loss_sum, right, seen, failed = 0.0, 0, 0, 0
        for (_, last, global_size), batch in zip(micro, loader, strict=False):
            keep = torch.tensor([not e for e in batch["errors"]], dtype=torch.float32, device=device)
            labels = batch["labels"].to(device)
            tokens = encode(encoder, batch["pixels"], device)
            inputs = probe_inputs(tokens, len(labels), settings.clips, 1)
            logits_seen: list[torch.Tensor] = []

            def logits_of(module: torch.nn.Module, x: torch.Tensor, seen: list = logits_seen) -> torch.Tensor:
                seen.append(view_logits(module, x)[0])
                return seen[-1]

            with _autocast(device):
                losses = accumulate(model, logits_of, inputs, labels, keep, global_size, dist.world_size, last)
            if last:
                optimizer_step(model, optimizer, schedule, step, settings.grad_clip)
                step += 1
            kept = keep.bool()
            loss_sum += float(losses.sum())
            right += int((logits_seen[0].detach().argmax(1) == labels)[kept].sum())
            seen += int(kept.sum())
            failed += len(labels) - int(kept.sum())
            failures += [
                f"{train.clips[v].clip_id}: {e}" for v, e in zip(batch["videos"], batch["errors"], strict=True) if e
            ]
            bar.update(len(labels) * dist.world_size)
        totals = np.sum(dist.all_gather(np.array([loss_sum, right, seen, failed], dtype=np.float64)), axis=0)
        videos_ok = max(1.0, totals[2])
        record = {
            "epoch": epoch + 1,
            "loss": totals[0] / videos_ok,
            "train_top1": totals[1] / videos_ok,
            "decode_failures": int(totals[3]),
            "lr_last": schedule.lr_at(step - 1),
        }
        epochs.append(record)
        log.info(
            "epoch %d/%d: loss %.4f, train top-1 %.1f%% (augmented clips), %d video(s) failed to decode",
            epoch + 1,
            settings.epochs,
            record["loss"],
            100 * record["train_top1"],
            record["decode_failures"],
        )
    bar.close()
    train_seconds = time.perf_counter() - train_started

    val_started = time.perf_counter()
    scored = _validate(probe, encoder, val_data, settings, dist, device)
    val_seconds = time.perf_counter() - val_started
    gathered = dist.all_gather(scored)
    if not dist.is_main:
        return None
    videos = np.concatenate([g[0] for g in gathered])
    correct1, correct5 = np.concatenate([g[1] for g in gathered]), np.concatenate([g[2] for g in gathered])
    errors = [e for g in gathered for e in g[3]]
    decoded = np.array([not e for e in errors], dtype=bool)
    if not decoded.any():
        raise SaltUsageError(f"no validation video of {val.root} could be decoded (first: {errors[0]})")
    score = seeded_score(
        correct1[decoded][None].astype(np.float64),
        correct5[decoded][None].astype(np.float64) if train.classes > 5 else None,
        videos[decoded],
        1 / train.classes,
        settings.seed,
    ).record()
    report = {
        "format": EVAL_FORMAT,
        "format_version": EVAL_VERSION,
        "protocol": PROTOCOL,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "subject": {
            "path": str(setup.subject.path),
            "kind": setup.subject.kind,
            "source": setup.subject.source,
            "architecture": setup.subject.architecture,
            "kwargs": setup.subject.kwargs,
        },
        "settings": settings.model_dump(mode="json"),
        "splits": {"train": train.record(), "val": val.record()},
        "probe": {
            "heads": heads,
            "width": width,
            "tokens": settings.clips * tokens_per_clip,
            "parameters": sum(p.numel() for p in probe.parameters()),
        },
        "schedule": {
            "epochs": settings.epochs,
            "steps_per_epoch": steps_per_epoch,
            "steps": step,
            "global_batch": settings.batch_size,
            "micro_batches_per_rank_step": micro_per_step,
            "world_size": dist.world_size,
        },
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "device": str(device),
        "epochs": epochs,
        "classification": {
            "attentive": score,
            "classes": train.classes,
            "val_videos": int(decoded.sum()),
            "view_averaged": f"{settings.clips} clips x {settings.spatial_views} spatial views",
        },
        "decode_failures": {
            "train": failures[:100],
            "val": [f"{val.clips[v].clip_id}: {e}" for v, e in zip(videos, errors, strict=False) if e][:100],
        },
        "seconds": {
            "train": round(train_seconds, 1),
            "val": round(val_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "recipe": dump_pipeline(setup.config),
        "versions": run_folder.versions(),
    }
    _print_result(report)
    try:
        write_json_atomic(setup.out_dir / "eval.json", report)
    except OSError as exc:
        raise SaltUsageError(
            f"could not write {setup.out_dir / 'eval.json'} ({one_line(exc)}); the lines above hold the figures"
        ) from None
    return report


def _validate(
    probe: torch.nn.Module,
    encoder: VideoViT,
    data: ProtocolClips,
    settings: VjepaEvalConfig,
    dist: Dist,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """This rank's validation videos: (videos, top-1 right, top-5 right, decode error or "")."""
    probe.eval()
    batches = validation_batches(len(data), settings, dist.rank, dist.world_size)
    loader = make_loader(data, batches, VALIDATION, settings.num_workers, device.type == "cuda")
    videos, right1, right5, errors = [], [], [], []
    bar = progress(len(data), "validation", unit="video")
    with torch.no_grad():
        for batch in loader:
            labels = batch["labels"].to(device)
            inputs = probe_inputs(
                encode(encoder, batch["pixels"], device), len(labels), settings.clips, settings.spatial_views
            )
            with _autocast(device):
                probabilities = averaged_softmax(view_logits(probe, inputs))
            videos.append(batch["videos"])
            right1.append(top_k_correct(probabilities, labels, 1).cpu().numpy())
            right5.append(top_k_correct(probabilities, labels, 5).cpu().numpy())
            errors += batch["errors"]
            bar.update(len(labels) * dist.world_size)
    bar.close()
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.concatenate(videos) if videos else empty,
        np.concatenate(right1) if right1 else empty.astype(bool),
        np.concatenate(right5) if right5 else empty.astype(bool),
        errors,
    )


def _print_result(report: dict[str, Any]) -> None:
    score = report["classification"]["attentive"]
    low, high = score["top1_interval"]
    lines = {
        "SSv2 attentive probe top-1": f"{100 * score['top1']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] over "
        f"{score['rows']} validation videos (chance {100 * score['chance']:.1f}%)"
    }
    if score["top5"] is not None:
        lines["top-5"] = f"{100 * score['top5']:.1f}%"
    lines["time"] = (
        f"{report['seconds']['train']:.0f} s training, {report['seconds']['val']:.0f} s validation on "
        f"{report['device']} x {report['schedule']['world_size']}"
    )
    shape = "x".join(str(report["settings"][key]) for key in ("frames_per_clip", "clips", "spatial_views"))
    print_block(f"V-JEPA frozen protocol ({shape})", lines)
