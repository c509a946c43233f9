"""The encoder's latency per clip at T = 2, 4, 8 and 16 input frames, on the evaluation's device.

What a policy that encodes one clip at a time waits for: batch 1, uint8 frames already on the
device (their normalisation counted, the upload not), the evaluation's own precision (bf16 autocast
on CUDA, fp32 on CPU, :class:`~salt_train.eval.features.EncoderFeatures`), ``WARMUP`` untimed
forwards then ``repeats`` timed ones, each closed by a CUDA synchronise. The median is the figure;
min and max beside it show the spread (a shared CPU varies a lot).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from shared import geometry

from salt_train.eval.features import EncoderFeatures
from salt_train.eval.frames import with_slots
from salt_train.student import VideoViT

LATENCY_FRAMES = (2, 4, 8, 16)
WARMUP = 2


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_latency(
    encoder: VideoViT, device: torch.device, repeats: int, frames: tuple[int, ...] = LATENCY_FRAMES
) -> dict[str, Any]:
    """eval.json's ``latency`` section: milliseconds per clip (median, min, max) at each frame count."""
    if repeats <= 0:
        return {"not_run": "eval.latency_repeats is 0"}
    generator = torch.Generator().manual_seed(0)
    figures: dict[str, Any] = {}
    for count in frames:
        model = EncoderFeatures(
            "latency", encoder if count == geometry.NUM_FRAMES else with_slots(encoder, count), device
        )
        size = geometry.IMAGE_SIZE
        views = torch.randint(0, 256, (1, count, size, size, 3), dtype=torch.uint8, generator=generator).to(device)
        times = []
        for k in range(WARMUP + repeats):
            _synchronise(device)
            start = time.perf_counter()
            model.tokens(views)
            _synchronise(device)
            if k >= WARMUP:
                times.append(1000 * (time.perf_counter() - start))
        ms = np.asarray(times)
        figures[str(count)] = {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()), "max_ms": float(ms.max())}
    cuda = device.type == "cuda"
    return {
        "model": "student",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads",
        "precision": "bfloat16 autocast" if cuda else "float32",
        "batch": 1,
        "warmup": WARMUP,
        "repeats": repeats,
        "frames": figures,
    }
