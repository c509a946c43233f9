"""Properties of the training masks (salt_train.masks): exact counts, partition, kinds, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.geometry import GRID_H, GRID_T, GRID_W, NUM_TOKENS, TOKENS_PER_FRAME
from salt_train.masks import MASK_KINDS, MaskBatch, make_masks, masked_count, multiblock_union

ratios = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True, allow_nan=False)
kinds = st.sampled_from(MASK_KINDS)
seeds = st.integers(min_value=-(2**40), max_value=2**40)
steps = st.integers(min_value=0, max_value=10**9)
FEW = settings(max_examples=50, deadline=None)


def as_bool(indices: torch.Tensor) -> np.ndarray:
    """[B, K] token indices -> bool [B, NUM_TOKENS]."""
    out = np.zeros((indices.shape[0], NUM_TOKENS), dtype=bool)
    np.put_along_axis(out, indices.numpy(), True, axis=1)
    return out


@FEW
@given(kind=kinds, ratio=ratios, batch=st.integers(1, 6), seed=seeds, step=steps)
def test_masks_partition_tokens_with_exact_count(kind: str, ratio: float, batch: int, seed: int, step: int) -> None:
    masks = make_masks(kind, ratio, batch, seed, step)
    count = masked_count(kind, ratio)
    assert 1 <= count <= NUM_TOKENS - 1
    assert masks.masked.shape == (batch, count) and masks.visible.shape == (batch, NUM_TOKENS - count)
    assert masks.masked.dtype == torch.int64 and masks.visible.dtype == torch.int64
    assert masks.masked.device.type == "cpu"
    for row in range(batch):
        masked, visible = masks.masked[row], masks.visible[row]
        assert torch.all(masked[1:] > masked[:-1]) and torch.all(visible[1:] > visible[:-1])  # sorted, no repeats
        both = torch.cat([masked, visible]).sort().values
        assert torch.equal(both, torch.arange(NUM_TOKENS))  # disjoint and covering


@FEW
@given(ratio=ratios)
def test_masked_count_follows_ratio(ratio: float) -> None:
    assert masked_count("random", ratio) == min(max(round(ratio * NUM_TOKENS), 1), NUM_TOKENS - 1)
    assert masked_count("multiblock", ratio) == masked_count("random", ratio)
    tube = masked_count("tube", ratio)
    assert tube % GRID_T == 0
    assert tube // GRID_T == min(max(round(ratio * TOKENS_PER_FRAME), 1), TOKENS_PER_FRAME - 1)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("ratio", [1e-6, 0.003, 0.999, 1 - 1e-9])
def test_extreme_ratios_keep_one_token_masked_and_one_visible(kind: str, ratio: float) -> None:
    masks = make_masks(kind, ratio, 3, 0, 0)
    assert masks.masked.shape[1] >= 1 and masks.visible.shape[1] >= 1
    assert masks.masked.shape[1] == masked_count(kind, ratio)


def test_production_counts() -> None:
    assert masked_count("random", 0.75) == 1176
    assert masked_count("multiblock", 0.75) == 1176
    assert masked_count("tube", 0.75) == 8 * 147


@FEW
@given(ratio=ratios, seed=seeds, step=steps)
def test_tube_masks_are_constant_over_time(ratio: float, seed: int, step: int) -> None:
    masked = as_bool(make_masks("tube", ratio, 3, seed, step).masked).reshape(3, GRID_T, GRID_H, GRID_W)
    # (t, h, w) masked iff (0, h, w) masked
    assert np.array_equal(masked, np.broadcast_to(masked[:, :1], masked.shape))


@FEW
@given(kind=kinds, ratio=ratios, seed=seeds, step=steps)
def test_masks_are_a_function_of_seed_and_step(kind: str, ratio: float, seed: int, step: int) -> None:
    first = make_masks(kind, ratio, 4, seed, step)
    again = make_masks(kind, ratio, 4, seed, step)
    assert torch.equal(first.masked, again.masked) and torch.equal(first.visible, again.visible)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks_differ_across_steps_seeds_and_samples(kind: str) -> None:
    base = make_masks(kind, 0.5, 8, seed=0, step=5).masked
    assert not torch.equal(base, make_masks(kind, 0.5, 8, seed=0, step=6).masked)
    assert not torch.equal(base, make_masks(kind, 0.5, 8, seed=1, step=5).masked)
    assert len({tuple(row.tolist()) for row in base}) == 8  # every sample its own mask


def test_random_masks_are_uniform() -> None:
    # Over many samples every token is masked at about the ratio's rate.
    masked = as_bool(make_masks("random", 0.25, 2000, seed=3, step=0).masked)
    rate = masked.mean(axis=0)
    assert abs(rate.mean() - 0.25) < 1e-3
    assert np.all(np.abs(rate - 0.25) < 0.06)  # about 6 standard deviations at n=2000


@FEW
@given(batch=st.integers(1, 8), seed=st.integers(0, 2**32), step=steps)
def test_multiblock_union_is_blocks_over_full_time(batch: int, seed: int, step: int) -> None:
    union = multiblock_union(np.random.default_rng(np.random.SeedSequence([seed, step])), batch)
    assert union.shape == (batch, GRID_T, GRID_H, GRID_W) and union.dtype == bool
    assert np.array_equal(union, np.broadcast_to(union[:, :1], union.shape))  # full temporal extent
    spatial = union[:, 0]
    # Contains a 0.7-scale block: at least ~sqrt(137*0.75) x sqrt(137/1.5) cells, as full rows/columns of a box.
    area_low = math.floor(math.sqrt(0.7 * 196 * 0.75) - 0.5) * math.floor(math.sqrt(0.7 * 196 / 1.5) - 0.5)
    assert np.all(spatial.sum(axis=(1, 2)) >= area_low)
    # Blocky, not salt-and-pepper: most masked cells have a masked 4-neighbour on each axis.
    padded = np.pad(spatial, ((0, 0), (1, 1), (1, 1)))
    vertical = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1]
    horizontal = padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    assert np.all(spatial <= (vertical & horizontal))  # blocks are at least 2x2 (scale 0.15 -> about 5x5)


@FEW
@given(ratio=ratios, seed=st.integers(0, 2**32), step=steps)
def test_multiblock_trims_or_tops_up_its_union(ratio: float, seed: int, step: int) -> None:
    # make_masks draws the union first from the (seed, step) generator, so the same union can be rebuilt here.
    batch = 4
    union = multiblock_union(np.random.default_rng(np.random.SeedSequence([seed, step])), batch)
    union = union.reshape(batch, NUM_TOKENS)
    masked = as_bool(make_masks("multiblock", ratio, batch, seed, step).masked)
    count = masked_count("multiblock", ratio)
    for row in range(batch):
        if union[row].sum() >= count:
            assert np.all(masked[row] <= union[row])  # trimmed: only union tokens
        else:
            assert np.all(union[row] <= masked[row])  # topped up: the whole union and more


@FEW
@given(ratio=ratios, seed=seeds, step=steps)
def test_multiblock_masks_are_whole_tubes_but_for_the_remainder(ratio: float, seed: int, step: int) -> None:
    # Trim and top-up work in whole spatial tubes, so no masked tubelet is visible at
    # another time (the temporal leak); only M % 8 single tokens fall outside full tubes.
    count = masked_count("multiblock", ratio)
    masked = as_bool(make_masks("multiblock", ratio, 4, seed, step).masked).reshape(4, GRID_T, TOKENS_PER_FRAME)
    full_tubes = masked.all(axis=1).sum(axis=1)
    assert np.all(full_tubes == count // GRID_T)
    assert np.all(masked.sum(axis=(1, 2)) - GRID_T * full_tubes == count % GRID_T)


def test_random_masks_rarely_form_tubes() -> None:
    # The contrast to multiblock and tube: independent tokens make full tubes rare (0.75 ** 8 = 10%).
    masked = as_bool(make_masks("random", 0.75, 64, seed=0, step=0).masked).reshape(64, GRID_T, TOKENS_PER_FRAME)
    assert masked.all(axis=1).sum() * GRID_T / masked.sum() < 0.2


def test_mask_batch_to_moves_both_tensors() -> None:
    masks = make_masks("random", 0.5, 2, 0, 0)
    moved = masks.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(moved, MaskBatch)
    assert torch.equal(moved.masked, masks.masked) and torch.equal(moved.visible, masks.visible)
    with pytest.raises(AttributeError):  # frozen
        moved.masked = masks.visible  # type: ignore[misc]


@pytest.mark.parametrize("kind, ratio", [
    ("block", 0.5), ("", 0.5), ("RANDOM", 0.5),
    ("random", 0.0), ("random", 1.0), ("tube", -0.1), ("multiblock", 1.5), ("random", float("nan")),
])
def test_invalid_kind_or_ratio_is_refused(kind: str, ratio: float) -> None:
    with pytest.raises(ValueError):
        masked_count(kind, ratio)
    with pytest.raises(ValueError):
        make_masks(kind, ratio, 2, 0, 0)


def test_invalid_batch_or_step_is_refused() -> None:
    with pytest.raises(ValueError):
        make_masks("random", 0.5, 0, 0, 0)
    with pytest.raises(ValueError):
        make_masks("random", 0.5, 2, 0, -1)
