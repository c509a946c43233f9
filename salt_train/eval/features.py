"""Frozen features for the probes, computed once per evaluation.

A :class:`FeatureModel` maps uint8 store views ``[B, 16, 224, 224, 3]`` to
per-token features ``[B, 1568, D]``: a student encoder (its output is already
layer-normed), or the teacher run on the views (its latents layer-normed per
token, as the training targets are). The teacher's latents already in the
store need no model at all (:meth:`TargetNorm.normalise <salt_train.target_norm.TargetNorm.normalise>`).

:func:`extract` reads each batch of store rows once and runs every model on
it: the original view's tokens go to a :class:`TokenBank` (for the attentive
probe), and pooled summaries of every temporal variant are kept in memory
(the mean over tokens, and the mean over each of the 8 tubelet slots, which
keeps the order in time that the temporal probes need).

A :class:`TokenBank` holds ``[rows, 1568, D]`` fp16 tokens in memory while
they fit ``eval.feature_memory_gb``, and in a Zarr array under ``eval/``
beyond it: the bound is printed before extraction starts.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from shared import geometry
from shared.console import format_bytes, progress
from shared.rows import read_rows
from shared.store import LatentStore

from salt_train.data import normalised_pixels
from salt_train.eval.profile import tick
from salt_train.eval.temporal import Variant
from salt_train.student import VideoViT
from salt_train.target_norm import LAYER_NORM, TargetNorm

if TYPE_CHECKING:
    from shared.teacher import Teacher


class FeatureModel(Protocol):
    name: str
    width: int
    heads: int  # the attentive probe's heads: the encoder's own head count, as V-JEPA's probe

    def tokens(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, T, 224, 224, 3]`` on the CPU -> float32 ``[B, T/2 * 196, width]`` on the model's device
        (T = 16; fewer for the few-frame rows, salt_train/eval/frames.py)."""


def encoder_heads(encoder: VideoViT) -> int:
    """The head count of a timm ViT's attention blocks."""
    return int(encoder.blocks[0].attn.num_heads)


@dataclass
class EncoderFeatures:
    """A student encoder: ImageNet-normalised pixels in, its final-norm tokens out (bf16 on CUDA)."""

    name: str
    encoder: VideoViT
    device: torch.device

    def __post_init__(self) -> None:
        self.encoder.to(self.device).eval()  # tokens() runs under inference_mode: no graph, no grads
        self.width = self.encoder.width
        self.heads = encoder_heads(self.encoder)

    @torch.inference_mode()
    def tokens(self, views: torch.Tensor) -> torch.Tensor:
        x = normalised_pixels(views, self.device)
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16 if cuda else torch.float32, enabled=cuda):
            return self.encoder(x).float()


@dataclass
class TeacherFeatures:
    """The frozen teacher run on (transformed) views, its latents normed like the training targets."""

    name: str
    teacher: Teacher  # imported for the type checker only: transformers is slow to import
    target_norm: TargetNorm = LAYER_NORM
    # Its tokens of the original views are the store's latents (the build ran this teacher on those very views,
    # and encode() gives the store's float16): extract() runs it on the transformed variants only.
    originals_in_store: bool = True

    def __post_init__(self) -> None:
        self.width = self.teacher.width
        self.heads = int(self.teacher.model.config.num_attention_heads)

    def tokens(self, views: torch.Tensor) -> torch.Tensor:
        return self.target_norm.normalise(self.teacher.encode(views))


class TokenBank:
    """``[rows, tokens, width]`` fp16 tokens (1568 per clip, fewer for fewer frames): a numpy array in memory,
    or a Zarr array on disk past the bound."""

    def __init__(
        self, rows: int, width: int, memory_bytes: int, spill_dir: Path, name: str, tokens: int = geometry.NUM_TOKENS
    ) -> None:
        shape = (rows, tokens, width)
        self.nbytes = int(np.prod(shape)) * 2
        self.on_disk = self.nbytes > memory_bytes
        self.path: Path | None = None
        self.data: zarr.Array | np.ndarray
        if self.on_disk:
            self.path = spill_dir / f"{name}.zarr"
            shutil.rmtree(self.path, ignore_errors=True)
            self.data = zarr.create_array(
                zarr.storage.LocalStore(self.path),
                shape=shape,
                dtype="float16",
                chunks=(1, *shape[1:]),
                compressors=None,
                zarr_format=3,
            )
        else:
            self.data = np.empty(shape, dtype=np.float16)

    def write(self, start: int, tokens: torch.Tensor) -> None:
        self.data[start : start + len(tokens)] = tokens.to(torch.float16).cpu().numpy()

    def read(self, ids: np.ndarray, device: torch.device) -> torch.Tensor:
        """Rows ``ids`` (sorted) as float32 on ``device``."""
        block = self.data[ids] if isinstance(self.data, np.ndarray) else self.data.get_orthogonal_selection((ids,))
        return torch.from_numpy(np.ascontiguousarray(block)).to(device).float()

    def release(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class Features:
    """What one model gives on one set of rows."""

    tokens: TokenBank | None  # original views, for the attentive probe
    mean: torch.Tensor  # [rows, width] mean over tokens of the original view
    slots: dict[str, torch.Tensor] = field(default_factory=dict)  # variant -> [temporal rows, slots * width]


def slot_pool(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, S * 196, D]`` -> ``[B, S * D]``: the mean over each tubelet slot's 196 tokens, in time order
    (S = 8 for 16 frames)."""
    batch, _, width = tokens.shape
    return tokens.view(batch, -1, geometry.TOKENS_PER_FRAME, width).mean(2).reshape(batch, -1)


def pool_tokens(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, S * 196, D]`` -> ``[B, S * (14/f)^2, D]``: ``f x f`` spatial mean pooling in each tubelet slot
    (``factor`` 1: unchanged). The attentive probe's cost falls by f^2; where things are stays coarse."""
    if factor == 1:
        return tokens
    batch, _, width = tokens.shape
    grid = tokens.view(-1, geometry.GRID_H, geometry.GRID_W, width).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, factor)
    return pooled.permute(0, 2, 3, 1).reshape(batch, -1, width)


def held_rows(
    bank: TokenBank, ids: np.ndarray, pool: int, device: torch.device, memory_bytes: int, chunk: int = 64
) -> Callable[[np.ndarray], torch.Tensor]:
    """A reader of positions ``ids[k]`` of ``bank``'s rows, pooled ``pool x pool`` (:func:`pool_tokens`), for a
    probe trained once per seed: pooled once and held on ``device`` (bf16 on CUDA, the probes' autocast
    dtype; float32 elsewhere, the same numbers as pooling each batch) when that fits ``memory_bytes``, so
    no epoch of any seed gathers, converts or pools rows again; else read and pooled batch by batch."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = bank.data.shape[1] // (pool * pool)
    width = bank.data.shape[2]
    if len(ids) * tokens * width * dtype.itemsize > memory_bytes:
        return lambda k: pool_tokens(bank.read(ids[k], device), pool)
    held = torch.empty(len(ids), tokens, width, dtype=dtype, device=device)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        held[start : start + len(part)] = pool_tokens(bank.read(part, device), pool)
    return lambda k: held[torch.as_tensor(k, device=device)]


@dataclass(frozen=True)
class ExtractionPlan:
    """Which rows of a store to read, and what to compute on them."""

    rows: np.ndarray  # sorted store rows
    temporal: np.ndarray  # bool [rows]: the rows that also get every temporal variant
    variants: tuple[str, ...]
    keep_tokens: bool
    seed: int
    frames: np.ndarray | None = None  # the view frames the models see (the few-frame rows); None: all 16


def extract(
    store: LatentStore,
    plan: ExtractionPlan,
    models: dict[str, FeatureModel],
    batch_size: int,
    memory_bytes: int,
    spill_dir: Path,
    label: str,
    with_latents: bool = False,
    target_norm: TargetNorm = LAYER_NORM,
) -> tuple[dict[str, Features], Features | None]:
    """Run every model over the plan's rows (each batch read once); with ``with_latents`` also
    the store's own teacher latents as features (``None`` otherwise), normed as the training targets."""
    rows, count = plan.rows, len(plan.rows)
    temporal_index = np.cumsum(plan.temporal) - 1  # row position -> position among temporal rows
    temporal_count = int(plan.temporal.sum())
    slots = geometry.GRID_T if plan.frames is None else len(plan.frames) // geometry.TUBELET_SIZE
    stored = {name for name, model in models.items() if getattr(model, "originals_in_store", False)}
    if stored and plan.frames is not None:
        raise ValueError(f"{sorted(stored)}: the store holds their 16-frame tokens only, not the few-frame ones")
    out: dict[str, Features] = {}
    for name, model in models.items():
        bank = (
            TokenBank(count, model.width, memory_bytes, spill_dir, f"{label}-{name}", slots * geometry.TOKENS_PER_FRAME)
            if plan.keep_tokens and name not in stored  # the label probes read the store's latents (with_latents)
            else None
        )
        out[name] = Features(
            bank,
            torch.empty(count, model.width),
            {v: torch.empty(temporal_count, slots * model.width) for v in plan.variants},
        )
    latents_features = None
    if with_latents:
        width = store.teacher_width
        bank = (
            TokenBank(count, width, memory_bytes, spill_dir, f"{label}-teacher-latents") if plan.keep_tokens else None
        )
        latents_features = Features(bank, torch.empty(count, width))
    bar = progress(total=count, description=f"features ({label})", unit="clip")
    names = ("pixels", "latents") if with_latents or stored else ("pixels",)
    starts = list(range(0, count, batch_size))
    device = next((d for m in models.values() if (d := getattr(m, "device", None)) is not None), torch.device("cpu"))
    with ThreadPoolExecutor(max_workers=1) as reading:  # the next batch is read while this one runs
        pending = reading.submit(read_rows, store, rows[:batch_size], names) if starts else None
        for n, start in enumerate(starts):
            ids = rows[start : start + batch_size]
            assert pending is not None  # submitted before the loop and at the end of each step
            arrays = pending.result()
            if n + 1 < len(starts):
                pending = reading.submit(read_rows, store, rows[starts[n + 1] : starts[n + 1] + batch_size], names)
            # One upload per batch (of the plan's frames only); the temporal variants are frame gathers on the device.
            pixels = arrays[0] if plan.frames is None else np.ascontiguousarray(arrays[0][:, plan.frames])
            views = torch.from_numpy(pixels).to(device, non_blocking=True)
            stored_tokens = target_norm.normalise(arrays[1]) if len(arrays) > 1 else None
            if latents_features is not None:
                assert stored_tokens is not None
                latents_features.mean[start : start + len(ids)] = stored_tokens.mean(1)
                if latents_features.tokens is not None:
                    latents_features.tokens.write(start, stored_tokens)
            in_temporal = plan.temporal[start : start + len(ids)]
            where = torch.as_tensor(temporal_index[start : start + len(ids)][in_temporal])
            subset = views[torch.as_tensor(in_temporal, device=device)] if in_temporal.any() else None
            # Every transformed variant of the temporal rows, stacked: they run as full batches, not one small
            # forward per variant (a batch with 3 temporal rows and 6 variants is one forward of 18 clips).
            varied_names = [v for v in plan.variants if v != "original"]
            varied = (
                torch.cat([Variant(v).apply(subset, ids[in_temporal]) for v in varied_names])
                if subset is not None and varied_names
                else None
            )
            for name, model in models.items():
                features = out[name]
                tokens = stored_tokens if name in stored and stored_tokens is not None else model.tokens(views)
                features.mean[start : start + len(ids)] = tokens.mean(1).cpu()
                if features.tokens is not None:
                    features.tokens.write(start, tokens)
                if subset is None:
                    continue
                pooled = {"original": slot_pool(tokens[torch.as_tensor(in_temporal, device=tokens.device)])}
                if varied is not None:
                    chunks = [slot_pool(model.tokens(part)) for part in varied.split(batch_size)]
                    pooled.update(zip(varied_names, torch.cat(chunks).split(len(subset)), strict=True))
                for variant in plan.variants:
                    features.slots[variant][where] = pooled[variant].cpu()
            bar.update(len(ids))
            tick()
    bar.close()
    return out, latents_features


def spilled_bytes(rows: int, widths: dict[str, int], memory_bytes: int, tokens: int = geometry.NUM_TOKENS) -> int:
    """Bytes of tokens that will go to disk: each model's ``[rows, tokens, width]`` fp16 beyond the bound."""
    sizes = (rows * tokens * width * 2 for width in widths.values())
    return sum(size for size in sizes if size > memory_bytes)


def describe_bound(rows: int, widths: dict[str, int], memory_bytes: int) -> str:
    """One line: where each model's tokens will live, for the startup block."""
    parts = []
    for name, width in widths.items():
        size = rows * geometry.NUM_TOKENS * width * 2
        parts.append(f"{name} {format_bytes(size)} {'on disk' if size > memory_bytes else 'in memory'}")
    return ", ".join(parts) + f" (bound {format_bytes(memory_bytes)} each)"
