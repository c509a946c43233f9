"""Decode one clip with PyAV into the deterministic 16x224x224 view the teacher sees.

The view recipe (recorded in the store):
- frames: segment sampling (TSN style): [0, n) is cut into 16 equal segments
  and one frame is taken from each, at the centre or at an offset drawn from a
  generator seeded by the clip id. Clips shorter than 16 frames always take
  the segment centres, so every frame appears and repeats pad the view.
  SSv2 webm files declare no frame count, so every frame is decoded first.
- space: the short side is resized to 224 (swscale bicubic, which widens its
  filter when shrinking, i.e. antialiased), then the centre 224x224 is cropped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from shared.geometry import IMAGE_SIZE, NUM_FRAMES

SAMPLING_RULES = ("segment-jitter", "segment-center")
# Decoding less than this share of the declared duration means the file is cut short.
MIN_DECODED_SHARE = 0.9
_SWSCALE_INTERPOLATION = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "area": "AREA"}


class ClipDecodeError(Exception):
    """A clip that cannot give a view; the message is the reason stored in the row."""


def clip_seed(clip_id: str) -> int:
    """A stable 64-bit seed from the clip id (Python's hash() changes per process)."""
    return int.from_bytes(hashlib.blake2b(clip_id.encode(), digest_size=8).digest(), "little")


def sample_frame_indices(num_available: int, clip_id: str, rule: str = "segment-jitter",
                         num_frames: int = NUM_FRAMES) -> np.ndarray:
    """``num_frames`` monotone source frame indices in ``[0, num_available)``, fixed per clip id."""
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
        offsets = np.random.default_rng(clip_seed(clip_id)).random(num_frames)
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


def _decode_all_frames(path: Path, threads: int = 1) -> list[av.VideoFrame]:
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


def _check_not_truncated(container: av.container.InputContainer, stream: av.VideoStream,
                         frames: list[av.VideoFrame]) -> None:
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
    rgb = _shared_reformatter().reformat(frame, width=new_w, height=new_h, format="rgb24",
                                         interpolation=_SWSCALE_INTERPOLATION[interpolation]).to_ndarray()
    top, left = center_crop_box(new_h, new_w)
    return rgb[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]


def decode_view(path: str | Path, clip_id: str, sampling: str = "segment-jitter",
                interpolation: str = "bicubic", threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The clip's view: uint8 ``[16, 224, 224, 3]`` and its int32 source frame indices.

    Raises :class:`ClipDecodeError` with the reason for any clip that cannot be used.
    """
    frames = _decode_all_frames(Path(path), threads)
    indices = sample_frame_indices(len(frames), clip_id, sampling)
    view = np.empty((NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    converted: dict[int, np.ndarray] = {}
    for slot, index in enumerate(indices):
        if index not in converted:  # padded short clips repeat frames: convert once
            converted[int(index)] = to_view_frame(frames[index], interpolation)
        view[slot] = converted[int(index)]
    return view, indices
