"""Decoding workers and the order of the videos: every epoch decodes and augments its clips again.

An epoch is a seeded permutation of the train videos cut into global batches of ``batch_size`` (the
last, partial one is dropped, as a permutation per epoch still reaches every video); rank ``r`` of
``K`` takes its contiguous share of each global batch and cuts it into micro-batches of at most
``micro_batch_size``. Each video's clips and augmentation are drawn from ``(seed, epoch, video)`` only,
so the data of a step is the same for any rank count, worker count or micro-batch size.

A video that cannot be decoded any more is recorded with its reason and left out of its batch (its
share of the loss is zero; validation scores the others and counts it).
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shared import geometry
from shared.config import VjepaEvalConfig
from shared.distributed import rank_share
from shared.parent_death import worker_init
from shared.ssv2 import ClipRecord
from shared.video import ClipDecodeError, decode_frames

from salt_train.eval.vjepa.augment import AugmentSettings, TrainAugment, eval_views
from salt_train.eval.vjepa.views import clip_frame_indices

VALIDATION = -1  # the "epoch" of validation draws


def video_seed(seed: int, epoch: int, video: int) -> int:
    """One 64-bit seed per (seed, epoch, video); validation uses epoch :data:`VALIDATION`."""
    return int(np.random.SeedSequence([seed, epoch + 1, video]).generate_state(1, dtype=np.uint64)[0])


def decode_clips(clip: ClipRecord, settings: VjepaEvalConfig, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[clips, T, H, W, 3]``: the video's clips at source resolution."""
    frames = decode_frames(clip.path)
    indices = clip_frame_indices(len(frames), settings.clips, settings.frames_per_clip, settings.frame_step, rng)
    converted: dict[int, np.ndarray] = {}
    for index in np.unique(indices):
        converted[int(index)] = frames[int(index)].to_ndarray(format="rgb24")
    return np.stack([np.stack([converted[int(i)] for i in row]) for row in indices])


class ProtocolClips(Dataset):
    """Item ``(epoch, video)`` -> the video's clips: training ``[clips, 1, 3, T, 224, 224]`` augmented,
    validation (epoch :data:`VALIDATION`) ``[clips, views, 3, T, 224, 224]``."""

    def __init__(self, clips: list[ClipRecord], settings: VjepaEvalConfig) -> None:
        self.clips = clips
        self.settings = settings
        self.augment = TrainAugment(AugmentSettings.from_config(settings))

    def __len__(self) -> int:
        return len(self.clips)

    def shape(self, training: bool) -> tuple[int, ...]:
        s = self.settings
        size = geometry.IMAGE_SIZE
        return (s.clips, 1 if training else s.spatial_views, 3, s.frames_per_clip, size, size)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, video = key
        training = epoch != VALIDATION
        seeds = np.random.SeedSequence(video_seed(self.settings.seed, epoch, video)).generate_state(
            1 + self.settings.clips, dtype=np.uint64
        )
        clip = self.clips[video]
        error = ""
        try:
            decoded = decode_clips(clip, self.settings, np.random.default_rng(int(seeds[0])))
            if training:
                pixels = torch.stack(
                    [self.augment(frames, int(seed))[None] for frames, seed in zip(decoded, seeds[1:], strict=False)]
                )
            else:
                pixels = torch.stack([eval_views(frames, self.settings.spatial_views) for frames in decoded])
        except ClipDecodeError as exc:
            pixels, error = torch.zeros(self.shape(training)), str(exc)
        except Exception as exc:  # a decoder bug must not end a day-long evaluation: record it
            pixels, error = torch.zeros(self.shape(training)), f"unexpected {type(exc).__name__}: {exc}"
        return {"pixels": pixels, "label": clip.label, "video": video, "error": error}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixels": torch.stack([i["pixels"] for i in items]),
        "labels": torch.tensor([i["label"] for i in items], dtype=torch.long),
        "videos": np.array([i["video"] for i in items], dtype=np.int64),
        "errors": [i["error"] for i in items],
    }


@dataclass(frozen=True)
class Step:
    """One optimizer step on this rank: its micro-batches of videos, and the global batch's size."""

    micro_batches: list[np.ndarray]
    global_size: int


def epoch_steps(videos: int, settings: VjepaEvalConfig, epoch: int, rank: int, world_size: int) -> list[Step]:
    """This rank's steps of ``epoch`` (see the module's rule). Every rank gets as many micro-batches per step
    (the shares are equal: ``batch_size`` is a multiple of the rank count)."""
    order = np.random.default_rng(np.random.SeedSequence([settings.seed, epoch, 7])).permutation(videos)
    batch = settings.batch_size
    steps = []
    for start in range(0, videos - batch + 1, batch):
        share = np.asarray(rank_share(order[start : start + batch].tolist(), rank, world_size), dtype=np.int64)
        pieces = -(-len(share) // settings.micro_batch_size)
        steps.append(Step([np.sort(p) for p in np.array_split(share, pieces)], batch))
    return steps


def validation_batches(videos: int, settings: VjepaEvalConfig, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's share of the validation videos, in micro-batches."""
    share = np.asarray(rank_share(range(videos), rank, world_size), dtype=np.int64)
    return [share[i : i + settings.micro_batch_size] for i in range(0, len(share), settings.micro_batch_size)]


def make_loader(
    dataset: ProtocolClips, batches: list[np.ndarray], epoch: int, workers: int, pin_memory: bool
) -> DataLoader:
    """A DataLoader yielding ``batches`` (lists of videos) of ``epoch`` in order, decoded by ``workers``."""
    keyed = [[(epoch, int(v)) for v in batch] for batch in batches]
    kwargs: dict[str, Any] = {
        "batch_sampler": keyed,
        "collate_fn": collate,
        "num_workers": workers,
        "pin_memory": pin_memory,
    }
    if workers > 0:
        context = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        kwargs.update(multiprocessing_context=context, worker_init_fn=worker_init, prefetch_factor=2)
    return DataLoader(dataset, **kwargs)
