"""Whole-shard writes of the two big arrays straight to their files, beside zarr.

Zarr's write path runs its codecs and shard assembly on one event-loop thread shared by
every caller, so several build writer threads still committed shards at one core's pace
(about 35 clips/s at D=1280 on the developer box, EXPERIMENTS.md). A shard written whole is
simple to lay out ourselves, as the Zarr v3 sharding spec says (the mirror of
``shared.shard_reader``): every inner chunk (one row) encoded with the array's own codecs
(raw little-endian bytes, or the same numcodecs zstd frame zarr would write), then the index
of ``(offset, nbytes)`` uint64 pairs and its crc32c. ``os.write`` and zstd release the GIL,
so writer threads run in parallel. The file is staged, fsynced and renamed into place
(``shared.filesystem.atomic_file``): either the old or the new shard, never a torn one. Arrays of any other
layout return ``None`` from :func:`open_shard_writer` and are written through zarr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import google_crc32c
import numpy as np
from numcodecs import Zstd

from shared.filesystem import atomic_file

_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}
_BYTES = {"name": "bytes"}  # single-byte types carry no endianness


class ShardFileWriter:
    """Writes whole shards of one array: ``write(path, rows)`` with ``rows`` ``[shard_rows, *row_shape]``."""

    def __init__(self, row_shape: tuple[int, ...], dtype: np.dtype, shard_rows: int,
                 encode: Callable[[np.ndarray], bytes] | None) -> None:
        self.row_shape = row_shape
        self.shard_rows = shard_rows
        self.dtype = dtype
        self.encode = encode  # None: the row's raw bytes

    def write(self, path: Path, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.row_shape or rows.dtype != self.dtype or len(rows) > self.shard_rows:
            raise ValueError(f"rows {rows.dtype}{rows.shape} do not fit a shard of {self.dtype}{self.row_shape}")
        rows = np.ascontiguousarray(rows)
        chunks = [memoryview(row).cast("B") if self.encode is None else self.encode(row) for row in rows]
        sizes = np.array([len(chunk) for chunk in chunks], dtype="<u8")
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype("<u8")
        # The index has an entry per inner chunk of a whole shard; past the array's end (a last,
        # shorter shard) they are absent: offset = nbytes = 2^64-1.
        index = np.full((self.shard_rows, 2), 2**64 - 1, dtype="<u8")
        index[:len(rows)] = np.stack([offsets, sizes], axis=1)
        index = index.tobytes()
        chunks.append(index + google_crc32c.value(index).to_bytes(4, "little"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, unique=True) as partial:  # unique: no two writers share a partial file
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view.nbytes:
                        view = view[os.write(fd, view):]
            finally:
                os.close(fd)


def open_shard_writer(array_dir: Path) -> ShardFileWriter | None:
    """A :class:`ShardFileWriter` when ``array_dir`` has the layout ``create_store`` makes for the big
    arrays (one row per inner chunk; bytes, optionally zstd; index at the end with crc32c), else None."""
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
        shape = tuple(meta["shape"])
        (codec,) = meta["codecs"]
        config = codec["configuration"]
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    codecs = config.get("codecs", [])
    if (codec.get("name") != "sharding_indexed"
            or config.get("index_codecs") != [_BYTES_LE, {"name": "crc32c"}]
            or config.get("index_location", "end") != "end"
            or tuple(config.get("chunk_shape", ())) != (1, *shape[1:])
            or not codecs or codecs[0] not in (_BYTES_LE, _BYTES) or len(codecs) > 2
            or meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}):
        return None
    if len(codecs) == 1:
        return ShardFileWriter(shape[1:], dtype, shard_rows, None)
    if codecs[1].get("name") != "zstd":
        return None
    zstd = Zstd(level=int(codecs[1]["configuration"]["level"]), checksum=bool(codecs[1]["configuration"]["checksum"]))
    return ShardFileWriter(shape[1:], dtype, shard_rows, lambda row: zstd.encode(row))
