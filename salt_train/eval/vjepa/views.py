"""Where a video's clips are in time, the spatial views of validation, and the layout the probe reads.

Time (V-JEPA's ``VideoDataset``, 16x2x3 for SSv2): a clip is ``frames`` frames ``step`` source frames
apart (a window of ``frames * step``, 64 for 16 x 4). The video is cut into ``clips`` equal parts; a part
longer than the window takes a window inside it (at a seeded random end in training, and in validation
too, as V-JEPA's loader does, from a generator seeded by the clip); a shorter part (most SSv2 videos:
about 45 frames at 12 fps) makes the clips overlap: each takes the first ``min(window, frames) - 1``
frames spaced about ``step`` apart, padded with its last frame, shifted by an even share of what the
video has beyond one window.

Space (validation): frames resized to a short side of 224 (bilinear), then ``views`` squares of 224 along
the long side, evenly spaced from one end to the other (one view: the centre).

Layout: a batch of ``[B, clips, views, 3, T, 224, 224]`` goes through the encoder as one batch in
(video, clip, view) order; the probe then sees, for each view, the tokens of all the video's clips
concatenated (clip 0's first): ``[views, B, clips * N, width]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from shared.geometry import IMAGE_SIZE


def clip_frame_indices(
    num_frames: int, clips: int, frames: int, step: int, rng: np.random.Generator | None
) -> np.ndarray:
    """``[clips, frames]`` source frame indices of a ``num_frames``-frame video (see the module's rule);
    ``rng`` None puts each window at the start of its part."""
    if num_frames <= 0:
        raise ValueError("a video needs at least one frame")
    window = frames * step
    part = num_frames // clips
    indices = np.empty((clips, frames), dtype=np.int64)
    for clip in range(clips):
        if part > window:  # a window inside this clip's own part of the video
            end = int(rng.integers(window, part)) if rng is not None else window
            start = end - window
            positions = np.clip(np.linspace(start, end, num=frames), start, end - 1)
            indices[clip] = positions.astype(np.int64) + clip * part
            continue
        span = min(window, num_frames) - 1  # overlapping clips: the first window (or the whole video)
        taken = span // step
        positions = np.concatenate([np.linspace(0, span, num=taken), np.full(frames - taken, float(span))])
        positions = np.clip(positions, 0, max(0, span - 1)).astype(np.int64)
        shift = (num_frames - window) // (clips - 1) if clips > 1 and num_frames > window else 0
        indices[clip] = positions + clip * shift
    return indices


def resize_short_side(frames: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Float ``[T, 3, H, W]`` -> short side ``size``, aspect kept (bilinear, as V-JEPA's eval resize)."""
    height, width = frames.shape[-2:]
    scale = size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    return F.interpolate(frames, size=new, mode="bilinear", align_corners=False)


def spatial_view_starts(long_side: int, views: int, size: int = IMAGE_SIZE) -> list[int]:
    """Where each of ``views`` squares starts along the long side: both ends and evenly between."""
    if views == 1:
        return [(long_side - size) // 2]
    step = (long_side - size) // (views - 1)
    return [view * step for view in range(views)]


def spatial_views(frames: Tensor, views: int, size: int = IMAGE_SIZE) -> Tensor:
    """Short-side-resized ``[T, 3, H, W]`` -> ``[views, T, 3, size, size]`` crops along the long side."""
    height, width = frames.shape[-2:]
    crops = []
    for start in spatial_view_starts(max(height, width), views, size):
        crops.append(
            frames[..., start : start + size, :size] if height > width else frames[..., :size, start : start + size]
        )
    return torch.stack(crops)


def encoder_batch(pixels: Tensor) -> Tensor:
    """``[B, clips, views, 3, T, H, W]`` -> ``[B * clips * views, 3, T, H, W]`` in (video, clip, view) order."""
    return pixels.flatten(0, 2)


def probe_inputs(tokens: Tensor, videos: int, clips: int, views: int) -> Tensor:
    """Encoder tokens ``[videos * clips * views, N, width]`` (:func:`encoder_batch`'s order) -> for each view
    the video's clips side by side: ``[views, videos, clips * N, width]``."""
    count, width = tokens.shape[1], tokens.shape[2]
    grid = tokens.reshape(videos, clips, views, count, width)
    return grid.permute(2, 0, 1, 3, 4).reshape(views, videos, clips * count, width)
