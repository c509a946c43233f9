"""The fast evaluation's speed pieces (issue 19, item 4): probe inputs pooled once and held for every seed,
and the profile that splits an evaluation's time by phase."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from shared import geometry

from salt_train.eval.features import TokenBank, held_rows, pool_tokens
from salt_train.eval.profile import EvalProfiler, tick


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


def test_the_profile_samples_each_phase_in_windows(tmp_path: Path) -> None:
    a = torch.randn(256, 256)
    profiler = EvalProfiler(tmp_path, torch.device("cpu"), window_s=0.05, rest_s=0.05)
    profiler.start_phase()
    # A phase's loop: each iteration lasts at least 0.03 s, so every window (0.05 s) and every rest between them
    # ends within two iterations whatever the machine's load: 20 iterations hold at least 5 windows.
    matmuls = 20
    for _ in range(matmuls):
        a @ a
        time.sleep(0.03)
        tick()
    profiler.end_phase("matmuls", 0.6)
    profiler.start_phase()
    for _ in range(3):  # a short phase without ticks is one window, recorded whole
        torch.nn.functional.gelu(a)
    profiler.end_phase("activations", 0.01)
    profiler.start_phase()  # as after the evaluation's last phase: dropped by finish()
    by_phase = profiler.finish()
    assert list(by_phase) == ["matmuls", "activations"]
    sampled = by_phase["matmuls"]
    assert sampled["windows"] >= 3 and sampled["top"][0]["name"] == "aten::mm"
    assert 0 < sampled["top"][0]["calls"] < matmuls  # sampled, not every call
    assert sampled["wall_s"] == 0.6  # the phase's whole wall time, beside its sampled seconds
    assert by_phase["activations"]["top"][0] | {"ms": 0} == {"name": "aten::gelu", "ms": 0, "calls": 3, "share": 1.0}
    assert all(0.0 < phase["busy_fraction"] <= 1.0 for phase in by_phase.values())
    assert (tmp_path / "profile-matmuls.json.gz").stat().st_size > 0
    assert "matmuls: 0.6 s" in (tmp_path / "profile.txt").read_text()
    tick()  # nothing is profiled any more: a no-op
