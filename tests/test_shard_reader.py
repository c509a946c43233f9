"""Raw row reads straight from shard files agree with zarr, refuse damage, and step aside for other layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import copy_store
from shared.shard_reader import open_raw_rows
from shared.store import LatentStore


def test_raw_rows_equal_zarr_on_a_built_store(reference_build, demo_reference) -> None:
    for build in (reference_build, demo_reference):  # 3-row shards with a partial last one; 2-row shards
        store = LatentStore.open(build.store)
        raw = open_raw_rows(store.path / "latents")
        assert raw is not None
        rows = np.arange(store.rows)
        np.testing.assert_array_equal(raw.read(rows), store.arrays["latents"][:])
        picked = np.array([0, store.rows - 1])
        np.testing.assert_array_equal(raw.read(picked), store.arrays["latents"].oindex[picked])


def test_pending_rows_and_damaged_index_are_refused(reference_build, mixed_set, tmp_path) -> None:
    store = copy_store(reference_build.store, tmp_path / "s.zarr")
    raw = open_raw_rows(store / "latents")
    shard_file = raw.shard_path(0)
    data = bytearray(shard_file.read_bytes())
    data[-10] ^= 0x01  # inside the index: its crc32c no longer matches
    shard_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="index checksum mismatch"):
        raw.read(np.array([0]))
    shard_file.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError):
        raw.read(np.array([1]))


def test_other_layouts_fall_back_to_zarr(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)
    group.create_array("compressed", shape=(4, 8), dtype="float16", chunks=(1, 8), shards=(2, 8))  # zstd by default
    group.create_array("plain", shape=(4, 8), dtype="float16", chunks=(1, 8), compressors=None)  # not sharded
    assert open_raw_rows(tmp_path / "g.zarr" / "compressed") is None
    assert open_raw_rows(tmp_path / "g.zarr" / "plain") is None
    assert open_raw_rows(tmp_path / "missing") is None
