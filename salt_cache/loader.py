"""The decode side of a build: teacher batches planned per shard, decoded in DataLoader workers.

Each shard is cut into teacher batches of at most ``teacher.batch_size`` rows
that never cross a shard boundary, so a resumed build forms exactly the same
batches as an uninterrupted one (and on CPU computes bit-identical latents).
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from shared import geometry
from shared.config import PipelineConfig, ViewConfig
from shared.lifeline import worker_init
from shared.store import LatentStore, pixels_shape
from salt_cache.source import ClipRecord
from salt_cache.video import ClipDecodeError, decode_view


@dataclass(frozen=True)
class BatchPlan:
    shard: int
    rows: tuple[int, ...]


def plan_batches(store: LatentStore, shards: list[int], batch_size: int) -> list[BatchPlan]:
    """Teacher batches for the given shards, aligned to shard starts."""
    plans = []
    for shard in shards:
        start, stop = store.shard_range(shard)
        for first in range(start, stop, batch_size):
            plans.append(BatchPlan(shard, tuple(range(first, min(first + batch_size, stop)))))
    return plans


class ViewBatches(Dataset):
    """Item k decodes the clips of batch plan k (runs inside a DataLoader worker)."""

    def __init__(self, clips: list[ClipRecord], plans: list[BatchPlan], view: ViewConfig, decode_threads: int) -> None:
        self.clips = clips
        self.plans = plans
        self.view = view
        self.decode_threads = decode_threads

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, k: int) -> dict:
        plan = self.plans[k]
        n = len(plan.rows)
        pixels = np.zeros(pixels_shape(n), dtype=np.uint8)
        frame_index = np.full((n, geometry.NUM_FRAMES), -1, dtype=np.int32)
        errors = [""] * n
        for i, row in enumerate(plan.rows):
            clip = self.clips[row]
            try:
                pixels[i], frame_index[i] = decode_view(clip.path, clip.clip_id, self.view.sampling,
                                                        self.view.interpolation, self.decode_threads)
            except ClipDecodeError as exc:
                errors[i] = str(exc)
            except Exception as exc:  # a decoder bug must not kill the build: record it
                errors[i] = f"unexpected {type(exc).__name__}: {exc}"
        info = get_worker_info()
        return {
            "shard": plan.shard,
            "rows": np.asarray(plan.rows, dtype=np.int64),
            "pixels": torch.from_numpy(pixels),
            "frame_index": frame_index,
            "errors": errors,
            "worker": info.id if info is not None else "main",
        }


def make_loader(dataset: ViewBatches, config: PipelineConfig, device: torch.device) -> DataLoader:
    settings = config.loader
    kwargs: dict = {"batch_size": None, "shuffle": False, "num_workers": settings.num_workers,
                    "pin_memory": settings.pin_memory and device.type == "cuda"}
    if settings.num_workers > 0:
        context = settings.multiprocessing_context
        if context not in multiprocessing.get_all_start_methods():
            context = "spawn"
        kwargs.update(prefetch_factor=settings.prefetch_factor, persistent_workers=settings.persistent_workers,
                      multiprocessing_context=context, worker_init_fn=worker_init)
    return DataLoader(dataset, **kwargs)
