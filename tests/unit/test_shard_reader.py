"""Raw row reads straight from shard files agree with zarr, refuse damage, and step aside for other layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import copy_store
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.shard_reader import open_raw_rows
from shared.store import LatentStore


def test_raw_rows_equal_zarr_on_a_built_store(reference_build, demo_reference) -> None:
    for build in (reference_build, demo_reference):  # 3-row shards with a partial last one; 2-row shards
        store = LatentStore.open(build.store)
        for name in ("latents", "pixels"):  # raw fp16; zstd uint8 (failed rows: absent chunks)
            raw = open_raw_rows(store.path / name)
            assert raw is not None
            rows = np.arange(store.rows)
            np.testing.assert_array_equal(raw.read(rows), store.arrays[name][:])
            picked = np.array([0, store.rows - 1])
            np.testing.assert_array_equal(raw.read(picked), store.arrays[name].oindex[picked])


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
    group.create_array(
        "compressed", shape=(4, 8), dtype="float16", chunks=(1, 8), shards=(2, 8), compressors=zarr.codecs.BloscCodec()
    )  # a codec the raw reader does not decode
    group.create_array("plain", shape=(4, 8), dtype="float16", chunks=(1, 8), compressors=None)  # not sharded
    assert open_raw_rows(tmp_path / "g.zarr" / "compressed") is None
    assert open_raw_rows(tmp_path / "g.zarr" / "plain") is None
    assert open_raw_rows(tmp_path / "missing") is None


@settings(max_examples=5, deadline=None)
@given(rows=st.integers(1, 7), shard_rows=st.integers(1, 4), level=st.sampled_from([0, 1, 3]), seed=st.integers(0, 99))
def test_shards_written_to_their_files_read_back_through_zarr(
    tmp_path_factory, rows: int, shard_rows: int, level: int, seed: int
) -> None:
    """The big arrays' shard files written by shared.shard_writer (raw latents, zstd or raw pixels,
    a shorter last shard, all-zero rows) read back identically through zarr and the raw reader."""
    from shared.shard_writer import open_shard_writer
    from shared.store import RowStatus, ShardPayload, create_store

    path = tmp_path_factory.mktemp("written") / "s.zarr"
    store = create_store(
        path,
        clip_ids=[str(r) for r in range(rows)],
        labels=[-1] * rows,
        teacher_width=4,
        shard_rows=shard_rows,
        pixels_zstd_level=level,
        attrs={},
    )
    assert open_shard_writer(path / "pixels") is not None and open_shard_writer(path / "latents") is not None
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (rows, 16, 224, 224, 3), dtype=np.uint8)
    latents = rng.standard_normal((rows, 1568, 4)).astype(np.float16)
    pixels[0], latents[0] = 0, 0  # a row equal to the fill value: zarr itself would leave it out
    for shard, start, stop in store.iter_shards():
        n = stop - start
        store.write_shard(
            ShardPayload(
                shard,
                pixels[start:stop],
                latents[start:stop],
                np.zeros((n, 16), np.int32),
                np.full(n, RowStatus.COMMITTED, np.uint8),
                [""] * n,
            )
        )
    reopened = LatentStore.open(path)
    np.testing.assert_array_equal(reopened.arrays["pixels"][:], pixels)
    np.testing.assert_array_equal(reopened.arrays["latents"][:], latents)
    np.testing.assert_array_equal(open_raw_rows(path / "latents").read(np.arange(rows)), latents)
    np.testing.assert_array_equal(open_raw_rows(path / "pixels").read(np.arange(rows)), pixels)
    assert list(path.rglob("*.partial")) == []


def test_shard_files_are_named_as_zarr_names_them_and_other_chunk_keys_are_refused(tmp_path: Path) -> None:
    """shared.shard_format.shard_path names every array's files as zarr does for the layout create_store
    writes; a store whose array uses other chunk keys is refused (its files would be looked for elsewhere)."""
    from shared.errors import SaltUsageError
    from shared.store import create_store

    store = create_store(
        tmp_path / "s.zarr",
        clip_ids=["a", "b"],
        labels=[-1, -1],
        teacher_width=4,
        shard_rows=1,
        pixels_zstd_level=0,
        attrs={},
    )
    for name, array in store.arrays.items():
        key = array.metadata.encode_chunk_key((1,) + (0,) * (array.ndim - 1))
        assert store.shard_file(name, 1) == store.path / name / key
    meta_file = store.path / "label" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["chunk_key_encoding"]["configuration"]["separator"] = "."
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(SaltUsageError, match="array label has chunk keys"):
        LatentStore.open(store.path).check_layout()


# ---- shared.rows.read_rows: the one read path over every per-row array --------------------------

ROW_ARRAYS = (
    "pixels",
    "latents",
    "frame_index",
    "status",
    "pixels_checksum",
    "latents_checksum",
    "error",
    "clip_id",
    "label",
)


@settings(max_examples=8, deadline=None)
@given(picks=st.lists(st.integers(0, 10_000), min_size=1, max_size=6))
def test_read_rows_equals_zarr_for_any_rows(reference_build, picks: list[int]) -> None:
    """Any rows (unsorted, repeated, across shards, failed ones included) of every per-row array read
    the same through the one read path as through zarr, into the caller's buffers when given."""
    from shared.rows import read_rows

    store = LatentStore.open(reference_build.store)
    rows = np.array([p % store.rows for p in picks])
    expected = [store.arrays[name].oindex[rows] for name in ROW_ARRAYS]
    for got, want in zip(read_rows(store, rows, ROW_ARRAYS), expected, strict=False):
        np.testing.assert_array_equal(got, want)
    buffers = tuple(np.empty_like(want) for want in expected[:2])
    returned = read_rows(store, rows, ROW_ARRAYS[:2], out=buffers)
    # Filled in place: the loader's ring relies on it.
    assert all(r is b for r, b in zip(returned, buffers, strict=True))
    for got, want in zip(buffers, expected, strict=False):
        np.testing.assert_array_equal(got, want)


def test_read_rows_checks_checksums_and_refuses_missing_files(reference_build, tmp_path) -> None:
    """Latents rewritten without their checksum read back as written, and are named with ``check``;
    a missing shard file is an error, where zarr alone reads the fill value."""
    from shared.rows import committed_rows, read_rows

    path = copy_store(reference_build.store, tmp_path / "s.zarr")
    store = LatentStore.open(path)
    rows = committed_rows(store)[:3]
    (latents,) = read_rows(store, rows, ("latents",), check=True)  # sound rows pass
    changed = latents[1].copy()
    changed[0, 0] += np.float16(1)
    zarr.open_group(str(path), mode="r+")["latents"][int(rows[1])] = changed
    (silent,) = read_rows(store, rows, ("latents",))
    np.testing.assert_array_equal(silent[1], changed)
    with pytest.raises(ValueError, match=f"row {rows[1]}: latents checksum mismatch"):
        read_rows(store, rows, ("pixels", "latents"), check=True)

    frames_file = store.shard_file("frame_index", int(rows[0]) // store.shard_rows)
    frames_file.unlink()
    assert (store.arrays["frame_index"][int(rows[0])] == -1).all()  # what zarr makes of it
    with pytest.raises(ValueError, match="frame_index shard .* is missing"):
        read_rows(store, rows[:1], ("frame_index",))
