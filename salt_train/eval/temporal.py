"""Label-free temporal probes: clip transforms that only a model of time can tell apart.

Every transform maps a store view, uint8 ``[..., 16, H, W, 3]`` (T first), to
another 16-frame view of the same clip (a frame gather), so any encoder of the
16-frame geometry takes it unchanged.

A probe is worth reporting only if raw pixels cannot pass it: the table's
``pixels`` column (:mod:`salt_train.eval.pixels`: per-tubelet downsampled frames
and frame differences, pooled as encoder tokens are) runs the same readout,
and ``tests/e2e/test_eval.py`` measures it on demo clips. The encoder's
tubelet holds 2 frames, so the cue to exclude is what a single tubelet or a
slot's average shows: a held frame (two identical frames: zero difference), a
new frame difference, a changed colour or motion energy. The probes:

- ``arrow_of_time``, forward vs ``reversed``: reversal keeps every frame and
  every absolute frame difference. On the demo's constant-speed motions no
  encoder can learn it (a reversed left-to-right clip is a right-to-left clip);
  on real clips it asks which way physics runs.
- ``order``, forward vs ``swapped``: the encoder's tubelets (frame pairs) swapped
  two by two, ``1 0 3 2 5 4 7 6``. Each tubelet keeps its two frames and its
  frame difference, and each time slot shows a moment at most one slot away, so
  neither motion energy, colour nor what each slot shows on average changes;
  only the jumps between tubelets tell. (Shuffling single frames created new
  frame differences: pixels passed it. Shuffling whole tubelets at random moved
  far moments into each slot: pixels partly passed it.)
- ``continuity``, forward vs ``stutter``: each even tubelet played twice,
  ``0 0 2 2 4 4 6 6``: the clip still moves in every frame pair, as much as it
  did, but keeps jumping back. (Frame 0 held 16 times has no motion at all:
  pixels passed it; one tubelet looped 8 times changes what the slots show
  on average: pixels partly passed it.)

The pixels figures of each design, old and new, are in EXPERIMENTS.md
(2026-12-06, issue 17); ``tests/e2e/test_eval.py`` keeps the new ones within
10 points of chance and the old ones solved.

Two more rows are kept as **sanity checks**, labelled so in the table and left
out of the summary, because pixels pass them by construction:

- ``playback_stride`` (stride 1 vs 2 vs 4 inside the 16 stored frames): slower
  playback holds frames (zero-difference tubelets) and faster motion means more
  frame-difference energy. A real-stride probe with matched spans needs the
  source frames (issue 19's protocol reads them).
- ``clip_consistency`` (the first half of a clip retrieves its second half):
  the halves share their background, so colour alone retrieves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.geometry import NUM_FRAMES, TUBELET_SIZE

STRIDES = (1, 2, 4)
TUBELETS = NUM_FRAMES // TUBELET_SIZE


def swapped_tubelets(count: int) -> np.ndarray:
    """Tubelet k shows tubelet ``k xor 1``: ``1 0 3 2 ...`` (an even count of tubelets)."""
    if count < 2 or count % 2:
        raise ValueError(f"swapping tubelet pairs needs an even number of tubelets, not {count}")
    return np.arange(count) ^ 1


def stutter_tubelets(count: int) -> np.ndarray:
    """Each even tubelet played twice: ``0 0 2 2 ...`` (two tubelets at least)."""
    if count < 2:
        raise ValueError(f"a stutter needs two tubelets at least, not {count}")
    return np.arange(count) & ~1


SWAPPED = swapped_tubelets(TUBELETS)  # tubelet k shows tubelet SWAPPED[k]
STUTTER = stutter_tubelets(TUBELETS)


def tubelet_frames(tubelets: np.ndarray) -> np.ndarray:
    """Frame indices of whole tubelets, in the given order: ``[2k, 2k+1]`` for each ``k``."""
    return (np.asarray(tubelets)[:, None] * TUBELET_SIZE + np.arange(TUBELET_SIZE)).reshape(-1)


def stride_indices(stride: int) -> np.ndarray:
    """Output frame j shows view frame ``floor(j * stride / 4)`` (stride 4 is the view itself)."""
    if stride not in STRIDES:
        raise ValueError(f"stride must be one of {STRIDES}, got {stride}")
    return (np.arange(NUM_FRAMES) * stride) // max(STRIDES)


def frame_indices(name: str, rows: np.ndarray, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """``[len(rows), num_frames]``: which input frame each output frame of variant ``name`` shows.
    Every variant is such a gather, so it runs on whatever device holds the views. Reversal, swapped pairs
    and the stutter are defined on any whole number of tubelets (the few-frame rows); the stride and
    half-clip variants on the 16 stored frames only (ValueError elsewhere)."""
    count = len(rows)
    frames = np.arange(num_frames)
    tubelets = num_frames // TUBELET_SIZE
    if name in ("original", "reversed", "swapped", "stutter") and (num_frames % TUBELET_SIZE or not tubelets):
        raise ValueError(f"{num_frames} frames are not whole tubelets of {TUBELET_SIZE}")
    if name == "original":
        order = frames
    elif name == "reversed":
        order = frames[::-1]
    elif name == "swapped":
        order = tubelet_frames(swapped_tubelets(tubelets))
    elif name == "stutter":
        order = tubelet_frames(stutter_tubelets(tubelets))
    elif name.startswith("stride") or name == "second_half":
        if num_frames != NUM_FRAMES:
            raise ValueError(f"variant {name!r} is defined on the {NUM_FRAMES} stored frames only")
        order = (
            stride_indices(int(name.removeprefix("stride"))) if name != "second_half" else NUM_FRAMES // 2 + frames // 2
        )
    else:
        raise ValueError(f"unknown variant {name!r}")
    return np.tile(order, (count, 1))


def tasks_at(num_frames: int) -> tuple[TemporalTask, ...]:
    """The summarised (non-sanity) tasks whose every class is a distinct clip at ``num_frames`` frames:
    at 2 frames (one tubelet) only the arrow of time; pairs need two tubelets to swap or repeat."""

    def distinct(name: str) -> bool:
        try:
            order = frame_indices(name, np.zeros(1), num_frames)[0]
        except ValueError:
            return False
        return name == "original" or not np.array_equal(order, np.arange(num_frames))

    return tuple(task for task in TASKS if not task.sanity and all(distinct(name) for name in task.classes))


@dataclass(frozen=True)
class Variant:
    """A named transform of a batch of views ``[B, T, H, W, 3]`` (numpy, or a torch tensor on any device)."""

    name: str

    def apply(self, views, rows: np.ndarray):
        if self.name == "original":
            return views
        index = frame_indices(self.name, rows, views.shape[1])
        if isinstance(views, np.ndarray):
            return views[np.arange(len(views))[:, None], index]
        import torch

        index_t = torch.as_tensor(index, device=views.device)
        return views[torch.arange(len(views), device=views.device)[:, None], index_t]


# "stride4" is the original view and "stride2" the first half (frames 0-7, each held twice): computed once.
VARIANTS = ("original", "reversed", "swapped", "stutter", "stride1", "stride2", "second_half")


@dataclass(frozen=True)
class TemporalTask:
    """A classification over variants: class k is ``classes[k]``; chance is 1/len(classes).
    A ``sanity`` task is one that pixels pass by construction: shown, never summarised."""

    name: str
    description: str
    classes: tuple[str, ...]
    sanity: bool = False


TASKS = (
    TemporalTask("arrow_of_time", "forward vs reversed", ("original", "reversed")),
    TemporalTask("order", "ordered vs tubelet pairs swapped", ("original", "swapped")),
    TemporalTask("continuity", "moving on vs stuttering back", ("original", "stutter")),
    TemporalTask(
        "playback_stride", "stride 1 vs 2 vs 4 (held frames)", ("stride1", "stride2", "original"), sanity=True
    ),
)
# Clip consistency (a sanity check): the first half (== stride2) retrieves the second half among the
# validation clips; the halves share their background.
RETRIEVAL_PAIR = ("stride2", "second_half")
RETRIEVAL_SANITY = True
