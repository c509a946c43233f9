"""Label-free temporal probes: clip transforms that only a model of time can tell apart.

Every transform maps a store view, uint8 ``[..., 16, H, W, 3]`` (T first), to
another 16-frame view of the same clip, so any encoder of the 16-frame
geometry takes it unchanged:

- ``reversed``: the clip played backwards (arrow of time);
- ``static``: frame 0 repeated 16 times (motion vs static);
- ``shuffled``: the 16 frames in a seeded random order (ordered vs shuffled);
- ``stride s`` (s in 1, 2, 4): output frame j shows view frame ``floor(j*s/4)``:
  stride 4 is the view itself, stride 2 plays its first half at half speed,
  stride 1 its first quarter at quarter speed. The store keeps only the 16
  frames the teacher saw, so slower playback holds frames rather than
  reading more of the source;
- ``first_half`` / ``second_half``: frames 0-7 / 8-15, each held for two
  frames: two temporal sub-views of one clip, for the retrieval test
  (``first_half`` equals stride 2).

The probes learn on features of these views (see :mod:`salt_train.eval.command`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.geometry import NUM_FRAMES

STRIDES = (1, 2, 4)


def reverse(views: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(views[..., ::-1, :, :, :])


def static(views: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(views[..., :1, :, :, :], NUM_FRAMES, axis=-4))


def shuffle_order(seed: int, row: int) -> np.ndarray:
    """A permutation of the 16 frames, a pure function of (seed, row), never the identity."""
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, row, 7]))
    while True:
        order = rng.permutation(NUM_FRAMES)
        if not np.array_equal(order, np.arange(NUM_FRAMES)):
            return order


def shuffle(views: np.ndarray, rows: np.ndarray, seed: int) -> np.ndarray:
    """Each view's frames in its own seeded order (``rows`` names each view: same row, same order)."""
    return np.stack([view[shuffle_order(seed, int(row))] for view, row in zip(views, rows)])


def stride_indices(stride: int) -> np.ndarray:
    if stride not in STRIDES:
        raise ValueError(f"stride must be one of {STRIDES}, got {stride}")
    return (np.arange(NUM_FRAMES) * stride) // max(STRIDES)


def playback(views: np.ndarray, stride: int) -> np.ndarray:
    return np.ascontiguousarray(views[..., stride_indices(stride), :, :, :])


def half(views: np.ndarray, second: bool) -> np.ndarray:
    """Frames 0-7 (or 8-15) of each view, every frame held twice: 16 frames again."""
    offset = NUM_FRAMES // 2 if second else 0
    return np.ascontiguousarray(views[..., offset + np.arange(NUM_FRAMES) // 2, :, :, :])


def frame_indices(name: str, rows: np.ndarray, seed: int) -> np.ndarray:
    """``[len(rows), 16]``: which view frame each output frame of variant ``name`` shows.
    Every variant is such a gather, so it runs on whatever device holds the views."""
    count = len(rows)
    frames = np.arange(NUM_FRAMES)
    if name == "original":
        order = frames
    elif name == "reversed":
        order = frames[::-1]
    elif name == "static":
        order = np.zeros(NUM_FRAMES, dtype=np.int64)
    elif name == "shuffled":
        return np.stack([shuffle_order(seed, int(row)) for row in rows]) if count else np.empty((0, NUM_FRAMES), int)
    elif name.startswith("stride"):
        order = stride_indices(int(name.removeprefix("stride")))
    elif name == "second_half":
        order = NUM_FRAMES // 2 + frames // 2
    else:
        raise ValueError(f"unknown variant {name!r}")
    return np.tile(order, (count, 1))


@dataclass(frozen=True)
class Variant:
    """A named transform of a batch of views ``[B, 16, H, W, 3]`` (numpy, or a torch tensor on any device)."""

    name: str

    def apply(self, views, rows: np.ndarray, seed: int):
        if self.name == "original":
            return views
        index = frame_indices(self.name, rows, seed)
        if isinstance(views, np.ndarray):
            return views[np.arange(len(views))[:, None], index]
        import torch

        index_t = torch.as_tensor(index, device=views.device)
        return views[torch.arange(len(views), device=views.device)[:, None], index_t]


# "stride4" is the original view and "stride2" the first half: computed once, named once.
VARIANTS = ("original", "reversed", "static", "shuffled", "stride1", "stride2", "second_half")


@dataclass(frozen=True)
class TemporalTask:
    """A classification over variants: class k is ``classes[k]``; chance is 1/len(classes)."""

    name: str
    description: str
    classes: tuple[str, ...]


TASKS = (
    TemporalTask("arrow_of_time", "forward vs reversed", ("original", "reversed")),
    TemporalTask("motion_static", "motion vs frame 0 repeated", ("original", "static")),
    TemporalTask("order", "ordered vs frames shuffled", ("original", "shuffled")),
    TemporalTask("playback_stride", "stride 1 vs 2 vs 4", ("stride1", "stride2", "original")),
)
# Clip consistency: first half (== stride2) retrieves the second half among the validation clips.
RETRIEVAL_PAIR = ("stride2", "second_half")
