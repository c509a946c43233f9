"""The fast evaluation's speed pieces (issue 19, item 4): probe inputs pooled once and held for every seed,
and the profile that splits an evaluation's time by phase."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared import geometry

from salt_train.eval.features import TokenBank, held_rows, pool_tokens
from salt_train.eval.profile import PHASE_START, format_summary, mark_phase, phase_summary


def _bank(tmp_path: Path, memory_bytes: int) -> TokenBank:
    rows, width = 10, 8
    bank = TokenBank(rows, width, memory_bytes, tmp_path, "bank")
    tokens = torch.from_numpy(np.random.default_rng(0).normal(size=(rows, geometry.NUM_TOKENS, width)))
    bank.write(0, tokens.float())
    return bank


def test_held_rows_give_the_numbers_of_pooling_each_batch(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    ids = np.array([1, 3, 4, 8, 9])  # the labelled rows of the bank, in order
    banks = (_bank(tmp_path, 1 << 30), _bank(tmp_path, 1))
    assert [bank.on_disk for bank in banks] == [False, True]  # in memory, spilled to a Zarr array
    for bank in banks:
        for pool in (1, 2):
            batch = np.array([0, 2, 4])  # positions in ids, as the probe asks for them
            expected = pool_tokens(bank.read(ids[batch], cpu), pool)
            held = held_rows(bank, ids, pool, cpu, memory_bytes=1 << 30, chunk=2)  # pooled once, held
            per_batch = held_rows(bank, ids, pool, cpu, memory_bytes=1)  # over the bound: read per batch
            assert torch.equal(held(batch), expected)  # bit for bit: the CPU figures do not move
            assert torch.equal(per_batch(batch), expected)
            assert held(batch).shape == (3, geometry.NUM_TOKENS // pool**2, 8)


def test_the_profile_splits_real_work_by_phase() -> None:
    a = torch.randn(256, 256)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    profiler.start()
    with torch.profiler.record_function(PHASE_START):
        pass
    for _ in range(20):
        a @ a
    mark_phase("matmuls")
    for _ in range(20):
        torch.nn.functional.gelu(a)
    mark_phase("activations")
    profiler.stop()
    summary = phase_summary(profiler.events(), on_cuda=False)
    assert list(summary) == ["matmuls", "activations"]
    assert summary["matmuls"]["top"][0]["name"] == "aten::mm" and summary["matmuls"]["top"][0]["calls"] == 20
    assert summary["activations"]["top"][0]["name"] == "aten::gelu"
    assert all(0.0 < phase["busy_fraction"] <= 1.0 for phase in summary.values())
    assert "matmuls" in format_summary(summary, on_cuda=False)
