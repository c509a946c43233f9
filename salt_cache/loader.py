"""The decode side of a build: teacher batches planned over the pending rows, decoded in DataLoader workers.

The rows of the shards to do are cut, in order, into teacher batches of
``teacher.batch_size`` rows, whatever the shard size (a batch may span shards).
Every batch has that many pixel rows: the last one, and rows that fail to decode,
are zero-padded rather than left out, so the teacher always sees one shape (no
recompiles, CUDA graphs possible). A row's latents depend only on its own pixels
at a fixed batch shape, so a resumed build, whose batches group other rows, still
writes bit-identical latents on CPU (tested by kill -9 and resume).
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from shared import geometry
from shared.config import BuildLoaderConfig, PipelineConfig, ViewConfig
from shared.parent_death import worker_init
from shared.ssv2 import ClipRecord
from shared.store import CROP_BOX_FIELDS, LatentStore, pixels_shape
from shared.video import ClipDecodeError

from salt_cache.video import decode_clip_views


@dataclass(frozen=True)
class BatchPlan:
    rows: tuple[int, ...]  # at most the teacher batch size; the pixels are padded to it


def plan_batches(store: LatentStore, shards: list[int], batch_size: int) -> list[BatchPlan]:
    """Teacher batches of ``batch_size`` consecutive rows of the given shards, in order."""
    rows = [row for shard in shards for row in range(*store.shard_range(shard))]
    return [BatchPlan(tuple(rows[first : first + batch_size])) for first in range(0, len(rows), batch_size)]


class ViewBatches(Dataset):
    """Item k decodes the clips of batch plan k (runs inside a DataLoader worker).

    Row ``r`` is view ``r % K`` of clip ``r // K`` (``view.views_per_clip`` K); a clip whose views
    share a batch is decoded once for all of them."""

    def __init__(
        self, clips: list[ClipRecord], plans: list[BatchPlan], view: ViewConfig, decode_threads: int, batch_size: int
    ) -> None:
        self.clips = clips
        self.plans = plans
        self.view = view
        self.decode_threads = decode_threads
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, k: int) -> dict:
        plan = self.plans[k]
        n = len(plan.rows)
        pixels = np.zeros(pixels_shape(self.batch_size), dtype=np.uint8)  # rows past n: padding
        frame_index = np.full((n, geometry.NUM_FRAMES), -1, dtype=np.int32)
        crop_box = np.full((n, len(CROP_BOX_FIELDS)), -1, dtype=np.int32)
        errors = [""] * n
        views = self.view.views_per_clip
        by_clip: dict[int, list[int]] = {}  # clip -> its batch positions, in row order
        for i, row in enumerate(plan.rows):
            by_clip.setdefault(row // views, []).append(i)
        for clip_number, positions in by_clip.items():
            clip = self.clips[clip_number]
            try:
                made = decode_clip_views(
                    clip.path,
                    clip.clip_id,
                    [plan.rows[i] % views for i in positions],
                    self.view.sampling,
                    self.view.interpolation,
                    self.decode_threads,
                )
                for i, (view, indices, box) in zip(positions, made, strict=False):
                    pixels[i], frame_index[i], crop_box[i] = view, indices, box
            except ClipDecodeError as exc:
                for i in positions:
                    errors[i] = str(exc)
            except Exception as exc:  # a decoder bug must not kill the build: record it
                for i in positions:
                    errors[i] = f"unexpected {type(exc).__name__}: {exc}"
        info = get_worker_info()
        return {
            "rows": np.asarray(plan.rows, dtype=np.int64),
            "pixels": torch.from_numpy(pixels),
            "frame_index": frame_index,
            "crop_box": crop_box,
            "errors": errors,
            "worker": info.id if info is not None else "main",
        }


def decode_workers(settings: BuildLoaderConfig, ranks_on_node: int = 1) -> int:
    """``build_loader.num_workers``, with ``auto`` sized from the cores: those this process may run
    on, shared by the node's ranks, less two (the main thread, and the shard writers' copies, zstd
    and checksums), at least one. At ~30 ms of CPU per clip a decoder gives ~33 clips/s, so 200
    clips/s needs 6-7 of them: a 16-core box gives 14."""
    if settings.num_workers != "auto":
        return settings.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, ranks_on_node) - 2)


def make_loader(dataset: Dataset, config: PipelineConfig, device: torch.device, ranks_on_node: int = 1) -> DataLoader:
    settings = config.build_loader
    workers = decode_workers(settings, ranks_on_node)
    kwargs: dict = {
        "batch_size": None,
        "shuffle": False,
        "num_workers": workers,
        "pin_memory": settings.pin_memory and device.type == "cuda",
    }
    if workers > 0:
        context = settings.multiprocessing_context
        if context not in multiprocessing.get_all_start_methods():
            context = "spawn"
        kwargs.update(
            prefetch_factor=settings.prefetch_factor,
            persistent_workers=settings.persistent_workers,
            multiprocessing_context=context,
            worker_init_fn=worker_init,
        )
    return DataLoader(dataset, **kwargs)
