"""Whole-shard writes of the two big arrays straight to their files, beside zarr.

Zarr's write path runs its codecs and shard assembly on one event-loop thread shared by
every caller, so several build writer threads still committed shards at one core's pace
(the figures: EXPERIMENTS.md, issue 11). A shard written whole is
simple to lay out ourselves, as the Zarr v3 sharding spec says (:mod:`shared.shard_format`,
the mirror of ``shared.shard_reader``): every inner chunk (one row) encoded with the array's own
codecs (raw little-endian bytes, or the same numcodecs zstd frame zarr would write), then the index.
``os.write`` and zstd release the GIL, so writer threads run in parallel. The file is staged, fsynced
and renamed into place (``shared.filesystem.atomic_file``): either the old or the new shard, never a
torn one. Arrays of any other layout return ``None`` from :func:`open_shard_writer` and are written through zarr.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numcodecs import Zstd

from shared.filesystem import atomic_file
from shared.shard_format import encode_index, read_layout


class ShardFileWriter:
    """Writes whole shards of one array: ``write(path, rows)`` with ``rows`` ``[shard_rows, *row_shape]``."""

    def __init__(
        self, row_shape: tuple[int, ...], dtype: np.dtype, shard_rows: int, encode: Callable[[np.ndarray], bytes] | None
    ) -> None:
        self.row_shape = row_shape
        self.shard_rows = shard_rows
        self.dtype = dtype
        self.encode = encode  # None: the row's raw bytes

    def write(self, path: Path, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.row_shape or rows.dtype != self.dtype or len(rows) > self.shard_rows:
            raise ValueError(f"rows {rows.dtype}{rows.shape} do not fit a shard of {self.dtype}{self.row_shape}")
        rows = np.ascontiguousarray(rows)
        chunks = [memoryview(row).cast("B") if self.encode is None else self.encode(row) for row in rows]
        chunks.append(encode_index(np.array([len(chunk) for chunk in chunks]), self.shard_rows))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, unique=True) as partial:  # unique: no two writers share a partial file
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view.nbytes:
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)


def open_shard_writer(array_dir: Path) -> ShardFileWriter | None:
    """A :class:`ShardFileWriter` when ``array_dir`` has the layout ``create_store`` makes for the big
    arrays (:func:`shared.shard_format.read_layout`), else None."""
    layout = read_layout(array_dir)
    if layout is None:
        return None
    if layout.zstd is None:
        return ShardFileWriter(layout.row_shape, layout.dtype, layout.shard_rows, None)
    zstd = Zstd(level=layout.zstd["level"], checksum=layout.zstd["checksum"])
    return ShardFileWriter(layout.row_shape, layout.dtype, layout.shard_rows, lambda row: zstd.encode(row))
