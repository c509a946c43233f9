"""PyAV decode of a clip's frames, shared by ``salt-cache build`` (the cached view) and ``salt-train eval
--protocol vjepa`` (clips decoded again every epoch), and the random resized crop box both draw.

A clip decodes whole (SSv2 webm files declare no frame count); a missing, empty, unreadable or
truncated file raises :class:`ClipDecodeError` with the reason a store records for the row.
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np

# Decoding less than this share of the declared duration means the file is cut short.
MIN_DECODED_SHARE = 0.9
CROP_TRIES = 10  # torchvision's draws before the centred fallback


class ClipDecodeError(Exception):
    """A clip that cannot give a view; the message is the reason stored in the row."""


def decode_frames(path: Path, threads: int = 1) -> list[av.VideoFrame]:
    if not path.exists():
        raise ClipDecodeError("missing file")
    if path.stat().st_size == 0:
        raise ClipDecodeError("zero-byte file")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise ClipDecodeError(f"unreadable container (truncated, corrupt or not a video): {exc}") from None
    with container:
        if not container.streams.video:
            raise ClipDecodeError("no video stream")
        stream = container.streams.video[0]
        if threads == 0:
            stream.thread_type = "AUTO"  # FFmpeg's choice: best when one process decodes alone
        else:
            # One thread per DataLoader worker: 16 workers x FFmpeg's default thread pools
            # oversubscribe the CPU, and at 240p frame threading buys little (EXPERIMENTS.md).
            stream.codec_context.thread_count = threads
        frames: list[av.VideoFrame] = []
        try:
            for frame in container.decode(stream):
                frames.append(frame)
        except (av.FFmpegError, OSError) as exc:
            raise ClipDecodeError(f"undecodable stream after {len(frames)} frames: {exc}") from None
        if not frames:
            raise ClipDecodeError("no frames decoded (empty or truncated stream)")
        _check_not_truncated(container, stream, frames)
    return frames


def _check_not_truncated(
    container: av.container.InputContainer, stream: av.VideoStream, frames: list[av.VideoFrame]
) -> None:
    """Compare what was decoded with the duration the container declares."""
    declared = None
    if stream.duration is not None and stream.time_base is not None:
        declared = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        declared = container.duration / av.time_base
    last = frames[-1]
    if not declared or last.time is None:
        return
    rate = float(stream.average_rate or stream.guessed_rate or 0) or len(frames) / declared
    decoded = last.time + 1.0 / rate - (frames[0].time or 0.0)
    if decoded < MIN_DECODED_SHARE * declared:
        raise ClipDecodeError(
            f"truncated stream: decoded {decoded:.2f} s of the {declared:.2f} s the container declares"
        )


def random_resized_crop(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) inside a ``height`` x ``width`` frame, torchvision's
    ``RandomResizedCrop.get_params`` rule: ``scale`` of the area, aspect ratio w/h in ``ratio`` drawn
    log-uniformly, 10 tries, then the largest centred box within the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w
