"""Token masks for the SALT student: which of the 1568 tokens it must predict.

Every sample of a batch gets exactly the same number M of masked tokens, so
the encoder, predictor and loss see static shapes and ``torch.compile`` never
recompiles (V-JEPA's collator instead truncates to the batch minimum, which
changes shapes from step to step). Masks are a pure function of
``(kind, ratio, batch_size, seed, step)``: a resumed run draws the masks it
would have drawn, with no generator state in the checkpoint.

Kinds (token index ``i = t*196 + h*14 + w``, shared.geometry):

- ``random``: M tokens uniformly at random.
- ``tube``: M/8 spatial positions, masked in all 8 temporal slots.
- ``multiblock`` (V-JEPA's default): the union of 8 blocks at spatial scale
  0.15 and 2 at 0.7, each over the full temporal extent, then topped up with
  random extra tokens or trimmed by random tokens to exactly M; whole
  spatial tubes first, so the mask stays constant over time except for
  ``M % 8`` tokens (see :func:`_fit_union`).

Everything is drawn with numpy on the CPU for a whole batch at once (about
1 ms for a batch of 32, any kind); the trainer moves the index tensors to the
device with :meth:`MaskBatch.to`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.geometry import GRID_H, GRID_T, GRID_W, NUM_TOKENS, TOKENS_PER_FRAME

MASK_KINDS = ("random", "tube", "multiblock")

# V-JEPA's multiblock recipe: (number of blocks, fraction of the 14x14 area).
MULTIBLOCK_BLOCKS = ((8, 0.15), (2, 0.7))
MULTIBLOCK_ASPECT_RATIO = (0.75, 1.5)  # height / width, drawn log-uniformly


@dataclass(frozen=True)
class MaskBatch:
    """Masked and visible token indices of a batch, each row sorted ascending."""

    masked: torch.Tensor  # int64 [B, M]
    visible: torch.Tensor  # int64 [B, NUM_TOKENS - M]

    def __getitem__(self, rows: slice) -> "MaskBatch":
        """The masks of some samples (a rank's slice of the global batch)."""
        return MaskBatch(self.masked[rows], self.visible[rows])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MaskBatch":
        return MaskBatch(self.masked.to(device, non_blocking=non_blocking),
                         self.visible.to(device, non_blocking=non_blocking))


def _check(kind: str, ratio: float) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r} (one of {', '.join(MASK_KINDS)})")
    # Written so that NaN fails too.
    if not (0.0 < ratio < 1.0):
        raise ValueError(f"mask ratio must be strictly between 0 and 1, got {ratio}")


def masked_count(kind: str, ratio: float) -> int:
    """M, the masked tokens per sample; at least one token is masked and one visible.

    Tube masks whole spatial positions, so M is a multiple of 8 there.
    """
    _check(kind, ratio)
    if kind == "tube":
        return GRID_T * min(max(round(ratio * TOKENS_PER_FRAME), 1), TOKENS_PER_FRAME - 1)
    return min(max(round(ratio * NUM_TOKENS), 1), NUM_TOKENS - 1)


def _rng(seed: int, step: int) -> np.random.Generator:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    # SeedSequence takes non-negative entropy only; the modulo keeps negative seeds usable and distinct.
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, step]))


def _top_k(keys: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` largest keys of each row (ties are impossible with float keys in practice)."""
    if k == 0:
        return np.zeros(keys.shape, dtype=bool)
    top = np.argpartition(keys, keys.shape[1] - k, axis=1)[:, keys.shape[1] - k:]
    chosen = np.zeros(keys.shape, dtype=bool)
    np.put_along_axis(chosen, top, True, axis=1)
    return chosen


def _block_sizes(rng: np.random.Generator, count: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Heights and widths of ``count`` blocks covering ``scale`` of the grid's area."""
    low, high = np.log(MULTIBLOCK_ASPECT_RATIO)
    aspect = np.exp(rng.uniform(low, high, size=count))
    area = scale * GRID_H * GRID_W
    # As in V-JEPA, a block is always narrower than the grid (it may not span a whole axis).
    heights = np.clip(np.round(np.sqrt(area * aspect)), 1, GRID_H - 1).astype(np.int64)
    widths = np.clip(np.round(np.sqrt(area / aspect)), 1, GRID_W - 1).astype(np.int64)
    return heights, widths


def multiblock_union(rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """The union of the multiblock blocks of each sample: bool ``[B, GRID_T, GRID_H, GRID_W]``.

    Before the top-up or trim to M; constant over time by construction.
    """
    spatial = np.zeros((batch_size, GRID_H, GRID_W), dtype=bool)
    rows, cols = np.arange(GRID_H), np.arange(GRID_W)
    for count, scale in MULTIBLOCK_BLOCKS:
        heights, widths = _block_sizes(rng, batch_size * count, scale)
        tops = rng.integers(0, GRID_H - heights + 1)
        lefts = rng.integers(0, GRID_W - widths + 1)
        in_rows = (rows >= tops[:, None]) & (rows < (tops + heights)[:, None])  # [B*count, H]
        in_cols = (cols >= lefts[:, None]) & (cols < (lefts + widths)[:, None])  # [B*count, W]
        blocks = in_rows[:, :, None] & in_cols[:, None, :]
        spatial |= blocks.reshape(batch_size, count, GRID_H, GRID_W).any(axis=1)
    return np.broadcast_to(spatial[:, None], (batch_size, GRID_T, GRID_H, GRID_W)).copy()


def _masked_tokens(kind: str, rng: np.random.Generator, batch_size: int, count: int) -> np.ndarray:
    """Bool ``[B, NUM_TOKENS]`` with exactly ``count`` True per row."""
    if kind == "random":
        return _top_k(rng.random((batch_size, NUM_TOKENS)), count)
    if kind == "tube":
        spatial = _top_k(rng.random((batch_size, TOKENS_PER_FRAME)), count // GRID_T)
        return np.tile(spatial, (1, GRID_T))  # slot t repeats slot 0: i = t*196 + (h*14 + w)
    return _fit_union(multiblock_union(rng, batch_size)[:, 0].reshape(batch_size, TOKENS_PER_FRAME), rng, count)


def _fit_union(union: np.ndarray, rng: np.random.Generator, count: int) -> np.ndarray:
    """Top up or trim a spatial union ``[B, 196]`` to exactly ``count`` tokens, whole tubes first.

    Trimming single tokens would leave most masked positions visible in some
    other time slot, and the student could copy the neighbouring tubelet (the
    temporal leak tube masking exists to avoid): at ratio 0.75 only about a
    quarter of the masked tokens would stay in fully masked tubes. So
    ``count // 8`` whole spatial positions are chosen first, union positions
    before the others, and only the last ``count % 8`` tokens are single
    tokens, again union tokens first. The result is a subset of the union
    when the union has at least ``count`` tokens, and a superset otherwise.
    """
    batch_size = union.shape[0]
    # Union entries sort above all others (keys in [1, 2) vs [0, 1)), in random order among themselves.
    tubes = _top_k(union + rng.random(union.shape), count // GRID_T)
    masked = np.tile(tubes, (1, GRID_T))
    remainder = count % GRID_T
    if remainder:
        keys = np.tile(union, (1, GRID_T)) + rng.random((batch_size, NUM_TOKENS))
        keys[masked] = -1.0  # already masked: never chosen again
        masked |= _top_k(keys, remainder)
    return masked


def make_masks(kind: str, ratio: float, batch_size: int, seed: int, step: int) -> MaskBatch:
    """The masks of training step ``step``: CPU int64 index tensors, the same for the same arguments."""
    count = masked_count(kind, ratio)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    masked = _masked_tokens(kind, _rng(seed, step), batch_size, count)
    # Row-major nonzero lists each row's indices in ascending order; every row has the same count.
    masked_idx = np.nonzero(masked)[1].reshape(batch_size, count)
    visible_idx = np.nonzero(~masked)[1].reshape(batch_size, NUM_TOKENS - count)
    return MaskBatch(torch.from_numpy(masked_idx.astype(np.int64)),
                     torch.from_numpy(visible_idx.astype(np.int64)))


__all__ = ["MASK_KINDS", "MaskBatch", "make_masks", "masked_count", "multiblock_union"]
