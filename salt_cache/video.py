"""Decode one clip with PyAV into the deterministic 16x224x224 view the teacher sees.

The view recipe (recorded in the store):
- frames: segment sampling (TSN style): [0, n) is cut into 16 equal segments
  and one frame is taken from each, at the centre or at an offset drawn from a
  generator seeded by the clip id. Clips shorter than 16 frames always take
  the segment centres, so every frame appears and repeats pad the view.
  SSv2 webm files declare no frame count, so every frame is decoded first.
- space: the short side is resized to 224 (swscale bicubic, which widens its
  filter when shrinking, i.e. antialiased), then the centre 224x224 is cropped.
- with ``view.views_per_clip`` K >= 2, views 1..K-1 of a clip take their own
  frame offsets and a random resized crop (salt_cache/views.py); view 0 is the above.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import get_args

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from shared.config import SamplingRule
from shared.geometry import IMAGE_SIZE, NUM_FRAMES
from shared.video import decode_frames

from salt_cache.views import view_crop_box, view_seed

SAMPLING_RULES = get_args(SamplingRule)
_SWSCALE_INTERPOLATION = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "area": "AREA"}


def clip_seed(clip_id: str) -> int:
    """A stable 64-bit seed from the clip id (Python's hash() changes per process)."""
    return int.from_bytes(hashlib.blake2b(clip_id.encode(), digest_size=8).digest(), "little")


def sample_frame_indices(
    num_available: int,
    clip_id: str,
    rule: str = "segment-jitter",
    num_frames: int = NUM_FRAMES,
    seed: int | None = None,
) -> np.ndarray:
    """``num_frames`` monotone source frame indices in ``[0, num_available)``, fixed per clip id
    (jitter offsets drawn from ``seed`` when given: the views of salt_cache/views.py)."""
    if num_available <= 0:
        raise ValueError("a clip needs at least one frame")
    if rule not in SAMPLING_RULES:
        raise ValueError(f"unknown sampling rule {rule!r}; expected one of {SAMPLING_RULES}")
    edges = np.linspace(0.0, float(num_available), num_frames + 1)
    # Short clips (segments narrower than one frame) take the centre whatever the
    # rule: jittered offsets there can skip a source frame while repeating another.
    if rule == "segment-center" or num_available < num_frames:
        offsets = np.full(num_frames, 0.5)
    else:
        offsets = np.random.default_rng(clip_seed(clip_id) if seed is None else seed).random(num_frames)
    positions = edges[:-1] + offsets * (edges[1:] - edges[:-1])
    return np.clip(np.floor(positions), 0, num_available - 1).astype(np.int32)


def resized_size(height: int, width: int, short_side: int = IMAGE_SIZE) -> tuple[int, int]:
    """(height, width) with the short side at ``short_side`` and the aspect ratio kept."""
    if height <= 0 or width <= 0:
        raise ValueError(f"bad frame size {height}x{width}")
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def center_crop_box(height: int, width: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(top, left) of the centred ``size`` square in a ``height`` x ``width`` image."""
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from {height}x{width}")
    return (height - size) // 2, (width - size) // 2


_reformatter: VideoReformatter | None = None


def _shared_reformatter() -> VideoReformatter:
    """One per process: it caches the swscale context, which frame.reformat() rebuilds per frame
    (building a bicubic filter costs more than the scaling itself; this doubles decode_view's rate)."""
    global _reformatter
    if _reformatter is None:
        _reformatter = VideoReformatter()
    return _reformatter


def to_view_frame(frame: av.VideoFrame, interpolation: str = "bicubic") -> np.ndarray:
    """One decoded frame -> uint8 [224, 224, 3] RGB (short-side resize, centre crop)."""
    new_h, new_w = resized_size(frame.height, frame.width)
    rgb = (
        _shared_reformatter()
        .reformat(frame, width=new_w, height=new_h, format="rgb24", interpolation=_SWSCALE_INTERPOLATION[interpolation])
        .to_ndarray()
    )
    top, left = center_crop_box(new_h, new_w)
    return rgb[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE]


def to_crop_frame(frame: av.VideoFrame, box: tuple[int, int, int, int], interpolation: str = "bicubic") -> np.ndarray:
    """One decoded frame -> uint8 [224, 224, 3] RGB of the source box ``(top, left, height, width)``.

    swscale scales whole frames: the frame is scaled so that the box becomes 224x224 (each axis
    on its own, as a resized crop does), then the box is cut out (rounded to the pixel). The
    same antialiased filter as the centre view."""
    top, left, box_h, box_w = box
    scale_y, scale_x = IMAGE_SIZE / box_h, IMAGE_SIZE / box_w
    new_h = max(IMAGE_SIZE, round(frame.height * scale_y))
    new_w = max(IMAGE_SIZE, round(frame.width * scale_x))
    rgb = (
        _shared_reformatter()
        .reformat(frame, width=new_w, height=new_h, format="rgb24", interpolation=_SWSCALE_INTERPOLATION[interpolation])
        .to_ndarray()
    )
    y, x = min(round(top * scale_y), new_h - IMAGE_SIZE), min(round(left * scale_x), new_w - IMAGE_SIZE)
    return rgb[y : y + IMAGE_SIZE, x : x + IMAGE_SIZE]


def view_frame_indices(num_available: int, clip_id: str, k: int, rule: str) -> np.ndarray:
    """View ``k``'s source frames: view 0 by ``rule`` (the one-view store's), the others by
    segment jitter from their own generator (salt_cache/views.py)."""
    if k == 0:
        return sample_frame_indices(num_available, clip_id, rule)
    return sample_frame_indices(num_available, clip_id, "segment-jitter", seed=view_seed(clip_id, k, "time"))


def render_view(
    frames: list[av.VideoFrame],
    clip_id: str,
    k: int = 0,
    sampling: str = "segment-jitter",
    interpolation: str = "bicubic",
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """View ``k`` of decoded frames: uint8 ``[16, 224, 224, 3]``, its int32 source frame indices
    and its source box. View 0 is the centre view, made exactly as ever (resize, then crop)."""
    indices = view_frame_indices(len(frames), clip_id, k, sampling)
    box = view_crop_box(frames[0].height, frames[0].width, clip_id, k)
    view = np.empty((NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    converted: dict[int, np.ndarray] = {}
    for slot, index in enumerate(indices):
        if index not in converted:  # padded short clips repeat frames: convert once
            frame = frames[index]
            converted[int(index)] = (
                to_view_frame(frame, interpolation) if k == 0 else to_crop_frame(frame, box, interpolation)
            )
        view[slot] = converted[int(index)]
    return view, indices, box


def decode_clip_views(
    path: str | Path,
    clip_id: str,
    views: list[int],
    sampling: str = "segment-jitter",
    interpolation: str = "bicubic",
    threads: int = 1,
) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]]:
    """Views ``views`` of one clip from a single decode (see :func:`render_view`)."""
    frames = decode_frames(Path(path), threads)
    return [render_view(frames, clip_id, k, sampling, interpolation) for k in views]


def decode_view(
    path: str | Path, clip_id: str, sampling: str = "segment-jitter", interpolation: str = "bicubic", threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The clip's (centre) view: uint8 ``[16, 224, 224, 3]`` and its int32 source frame indices.

    Raises :class:`ClipDecodeError` with the reason for any clip that cannot be used.
    """
    view, indices, _ = decode_clip_views(path, clip_id, [0], sampling, interpolation, threads)[0]
    return view, indices
