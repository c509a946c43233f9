"""Token masks for the SALT student: what the encoder sees and what it must predict.

A mask is one or more *groups*; each group has its own context (the token ids
the encoder sees) and targets (the token ids whose teacher latents are
regressed), and the loss is the mean over groups. Every sample gets the same
counts in every step, so the encoder, predictor and loss see static shapes and
``torch.compile`` never recompiles. Masks are a pure function of
``(kind, ratio, batch_size, seed, step)``: a resumed run draws the masks it
would have drawn, with no generator state in the checkpoint, and rank r of K
takes slice r of the global batch's masks, so any rank count trains alike.

Kinds (token index ``i = t*196 + h*14 + w``, shared.geometry):

- ``random``: one group; M = round(ratio x 1568) targets uniformly at random,
  the other tokens are the context.
- ``tube``: one group; M/8 spatial positions are targets in all 8 temporal
  slots, the other positions are the context.
- ``multiblock`` (V-JEPA's, the default): two groups, short-range (8 blocks at
  spatial scale 0.15) and long-range (2 blocks at 0.7), each block over the
  full temporal extent. The blocks decide what is hidden: the context is drawn
  only from tokens outside every block of the group, the targets only from
  inside them, so no hidden token is ever shown to the encoder. ``ratio`` does
  not apply: the counts come from the blocks (:data:`MULTIBLOCK_GROUPS`).

Where multiblock departs from V-JEPA's ``multiblock3d`` mask collator, and why:

- Fixed counts. V-JEPA truncates each batch's contexts and targets to the batch
  minimum, which changes shapes every step (a recompile under ``torch.compile``)
  and keeps the *first* ids, i.e. the earliest frames and top rows. We keep a
  fixed number of each, chosen uniformly at random among the allowed tokens, and
  redraw the block positions of a sample whose group leaves fewer than that
  (V-JEPA too redraws a sample, when its context is empty). The counts are the
  5th percentiles of V-JEPA's own distribution (see :func:`multiblock_coverage`),
  so about 1 draw in 10 is redrawn and coverage stays close to V-JEPA's.
- Kept as V-JEPA's code has them: the aspect-ratio law (uniform in [0.75, 1.5]),
  the block size ``keep = int(196 x scale)``, ``h = round(sqrt(keep x ar))``,
  ``w = round(sqrt(keep / ar))`` clipped to the grid, drawn once per group per
  step and shared by the batch; block positions drawn per block and sample.

Everything is drawn with numpy on the CPU for a whole batch at once, in the
loader's workers (a few ms for a batch of 32); :meth:`MaskBatch.to` moves the
index tensors to the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch

from shared.config import MaskKind
from shared.geometry import GRID_H, GRID_T, GRID_W, NUM_TOKENS, TOKENS_PER_FRAME

MASK_KINDS = get_args(MaskKind)


@dataclass(frozen=True)
class BlockGroup:
    """One multiblock group: its blocks, and the fixed context and target counts per sample."""

    name: str
    blocks: int
    scale: float  # fraction of the 14x14 area one block covers
    context: int  # tokens the encoder sees, all outside the group's blocks
    targets: int  # tokens predicted, all inside the group's blocks


# Counts: 8 x the 95th (context) and 5th (targets) percentiles of the spatial
# union over V-JEPA's draw (147 and 98 cells short-range, 184 and 140 long-range;
# `python -m salt_train.masks` measures them; tests/unit/test_masks.py checks them).
MULTIBLOCK_GROUPS = (
    BlockGroup("short-range", blocks=8, scale=0.15, context=8 * (TOKENS_PER_FRAME - 147), targets=8 * 98),
    BlockGroup("long-range", blocks=2, scale=0.7, context=8 * (TOKENS_PER_FRAME - 184), targets=8 * 140),
)
MULTIBLOCK_ASPECT_RATIO = (0.75, 1.5)  # height / width, drawn uniformly as V-JEPA does
MAX_REDRAWS = 200  # per sample; a sample is redrawn with probability about 0.1, so never reached in practice


@dataclass(frozen=True)
class MaskBatch:
    """Per group, the context (``visible``) and target (``masked``) token ids of a batch, rows sorted."""

    visible: tuple[torch.Tensor, ...]  # int64 [B, V_g] per group
    masked: tuple[torch.Tensor, ...]  # int64 [B, M_g] per group

    def __getitem__(self, rows: slice) -> MaskBatch:
        """The masks of some samples (a rank's slice of the global batch)."""
        return MaskBatch(tuple(v[rows] for v in self.visible), tuple(m[rows] for m in self.masked))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskBatch:
        return MaskBatch(
            tuple(v.to(device, non_blocking=non_blocking) for v in self.visible),
            tuple(m.to(device, non_blocking=non_blocking) for m in self.masked),
        )


def _check(kind: str, ratio: float) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r} (one of {', '.join(MASK_KINDS)})")
    # Written so that NaN fails too.
    if not (0.0 < ratio < 1.0):
        raise ValueError(f"mask ratio must be strictly between 0 and 1, got {ratio}")


def masked_count(kind: str, ratio: float) -> int:
    """M, the targets per sample of the one-group kinds; at least one token is masked and one visible.

    Tube masks whole spatial positions, so M is a multiple of 8 there.
    """
    _check(kind, ratio)
    if kind == "multiblock":
        raise ValueError("multiblock has two groups with fixed counts: use mask_layout")
    if kind == "tube":
        return GRID_T * min(max(round(ratio * TOKENS_PER_FRAME), 1), TOKENS_PER_FRAME - 1)
    return min(max(round(ratio * NUM_TOKENS), 1), NUM_TOKENS - 1)


def mask_layout(kind: str, ratio: float) -> tuple[tuple[int, int], ...]:
    """``(context, targets)`` token counts of each group, the same for every sample and step."""
    _check(kind, ratio)
    if kind == "multiblock":
        return tuple((group.context, group.targets) for group in MULTIBLOCK_GROUPS)
    count = masked_count(kind, ratio)
    return ((NUM_TOKENS - count, count),)


def describe_masks(kind: str, ratio: float) -> str:
    """One line for logs and reports: the kind and each group's context and target counts."""
    layout = mask_layout(kind, ratio)
    if kind == "multiblock":
        pairs = zip(MULTIBLOCK_GROUPS, layout, strict=True)
        groups = ", ".join(f"{g.name} {c} context / {t} targets" for g, (c, t) in pairs)
        return f"multiblock: {groups} tokens per clip (losses averaged)"
    context, targets = layout[0]
    return f"{kind}, ratio {ratio}: {targets} masked / {context} visible tokens per clip"


def _rng(seed: int, step: int) -> np.random.Generator:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    # SeedSequence takes non-negative entropy only; the modulo keeps negative seeds usable and distinct.
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, step]))


def _top_k(keys: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` largest keys of each row (ties are impossible with float keys in practice)."""
    if k == 0:
        return np.zeros(keys.shape, dtype=bool)
    top = np.argpartition(keys, keys.shape[1] - k, axis=1)[:, keys.shape[1] - k :]
    chosen = np.zeros(keys.shape, dtype=bool)
    np.put_along_axis(chosen, top, True, axis=1)
    return chosen


def block_size(rng: np.random.Generator, scale: float) -> tuple[int, int]:
    """Height and width of a group's blocks for one step, as V-JEPA's ``_sample_block_size``."""
    keep = int(GRID_H * GRID_W * scale)
    aspect = rng.uniform(*MULTIBLOCK_ASPECT_RATIO)
    height = min(round(math.sqrt(keep * aspect)), GRID_H)
    width = min(round(math.sqrt(keep / aspect)), GRID_W)
    return height, width


def blocks_union(rng: np.random.Generator, samples: int, blocks: int, height: int, width: int) -> np.ndarray:
    """The spatial union of ``blocks`` boxes of ``height x width`` per sample, at random places:
    bool ``[samples, GRID_H, GRID_W]`` (a block covers all 8 time slots, so this is the whole mask)."""
    tops = rng.integers(0, GRID_H - height + 1, size=(samples, blocks))
    lefts = rng.integers(0, GRID_W - width + 1, size=(samples, blocks))
    rows, cols = np.arange(GRID_H), np.arange(GRID_W)
    in_rows = (rows >= tops[..., None]) & (rows < tops[..., None] + height)  # [S, blocks, H]
    in_cols = (cols >= lefts[..., None]) & (cols < lefts[..., None] + width)  # [S, blocks, W]
    return np.asarray(
        (in_rows[..., :, None] & in_cols[..., None, :]).any(axis=1)
    )  # numpy types any() as maybe a scalar


def group_hidden(rng: np.random.Generator, batch_size: int, group: BlockGroup) -> tuple[np.ndarray, int]:
    """The tokens inside the group's blocks, bool ``[B, NUM_TOKENS]``, each sample leaving at least
    ``group.context`` tokens outside and ``group.targets`` inside; and how many draws were redrawn."""
    height, width = block_size(rng, group.scale)
    spatial = np.zeros((batch_size, GRID_H, GRID_W), dtype=bool)
    pending = np.arange(batch_size)
    redrawn = 0
    for _ in range(MAX_REDRAWS):
        drawn = blocks_union(rng, len(pending), group.blocks, height, width)
        hidden = GRID_T * drawn.sum(axis=(1, 2))
        fits = (hidden >= group.targets) & (NUM_TOKENS - hidden >= group.context)
        spatial[pending[fits]] = drawn[fits]
        redrawn += int((~fits).sum())
        pending = pending[~fits]
        if not len(pending):
            return np.tile(spatial.reshape(batch_size, TOKENS_PER_FRAME), (1, GRID_T)), redrawn
    raise RuntimeError(f"multiblock {group.name}: no fitting block draw in {MAX_REDRAWS} tries ({height}x{width})")


def _multiblock(rng: np.random.Generator, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per group, bool ``[B, NUM_TOKENS]`` context and targets: disjoint, fixed counts."""
    groups = []
    for group in MULTIBLOCK_GROUPS:
        hidden, _ = group_hidden(rng, batch_size, group)
        keys = rng.random((batch_size, NUM_TOKENS))
        # Keys of disallowed tokens are -1, below every allowed key in [0, 1): only allowed ones are chosen.
        context = _top_k(np.where(hidden, -1.0, keys), group.context)
        targets = _top_k(np.where(hidden, keys, -1.0), group.targets)
        groups.append((context, targets))
    return groups


def _one_group(kind: str, rng: np.random.Generator, batch_size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``random`` or ``tube``: ``count`` targets per sample, the context is every other token."""
    if kind == "random":
        targets = _top_k(rng.random((batch_size, NUM_TOKENS)), count)
    else:
        spatial = _top_k(rng.random((batch_size, TOKENS_PER_FRAME)), count // GRID_T)
        targets = np.tile(spatial, (1, GRID_T))  # slot t repeats slot 0: i = t*196 + (h*14 + w)
    return ~targets, targets


def _ids(chosen: np.ndarray) -> torch.Tensor:
    """Bool ``[B, N]`` with the same count per row -> int64 ``[B, count]`` ids, ascending per row."""
    return torch.from_numpy(np.nonzero(chosen)[1].reshape(chosen.shape[0], -1).astype(np.int64))


def make_masks(kind: str, ratio: float, batch_size: int, seed: int, step: int) -> MaskBatch:
    """The masks of training step ``step``: CPU int64 index tensors, the same for the same arguments."""
    _check(kind, ratio)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = _rng(seed, step)
    if kind == "multiblock":
        groups = _multiblock(rng, batch_size)
    else:
        groups = [_one_group(kind, rng, batch_size, masked_count(kind, ratio))]
    return MaskBatch(tuple(_ids(context) for context, _ in groups), tuple(_ids(targets) for _, targets in groups))


def multiblock_coverage(draws: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per group, over ``draws`` samples (steps of 32): the mean share of the grid inside the
    blocks as V-JEPA draws them and after the count-fitting redraws, the share of draws redrawn,
    and the 5th/95th percentiles of V-JEPA's spatial union that the fixed counts come from."""
    report = {}
    for group in MULTIBLOCK_GROUPS:
        unfitted, fitted, redrawn = [], [], 0
        for step in range(max(1, draws // 32)):
            rng = _rng(seed, step)
            unfitted.append(blocks_union(rng, 32, group.blocks, *block_size(rng, group.scale)).sum(axis=(1, 2)))
            hidden, count = group_hidden(rng, 32, group)
            fitted.append(hidden.sum(axis=1) / GRID_T)
            redrawn += count
        free, kept = np.concatenate(unfitted), np.concatenate(fitted)
        report[group.name] = {
            "coverage_vjepa": float(free.mean() / TOKENS_PER_FRAME),
            "coverage": float(kept.mean() / TOKENS_PER_FRAME),
            "redrawn_share": redrawn / (redrawn + len(kept)),
            "union_cells_p5": float(np.percentile(free, 5)),
            "union_cells_p95": float(np.percentile(free, 95)),
            "context_tokens": group.context,
            "target_tokens": group.targets,
        }
    return report


__all__ = [
    "MASK_KINDS",
    "MULTIBLOCK_GROUPS",
    "BlockGroup",
    "MaskBatch",
    "blocks_union",
    "describe_masks",
    "make_masks",
    "mask_layout",
    "masked_count",
    "multiblock_coverage",
]

if __name__ == "__main__":  # python -m salt_train.masks: the coverage figures in EXPERIMENTS.md
    import json

    print(json.dumps(multiblock_coverage(draws=4096), indent=2))
