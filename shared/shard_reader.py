"""Fast reads of whole rows of the big sharded arrays (``latents`` raw, ``pixels`` zstd), beside zarr.

Zarr's own path reads a raw latent row several times slower than ``preadv`` straight
into the caller's buffer (EXPERIMENTS.md, issue 11), and the training loader needs
~5 GB/s at the GPU budget (docs/DESIGN.md). We read a shard file's index (:mod:`shared.shard_format`) only when the
array's metadata is exactly the layout :func:`shared.store.create_store` writes; any
other layout returns ``None`` from :func:`open_raw_rows` and the caller uses zarr.
Zstd rows are decompressed straight into the caller's buffer (zarr's path decodes them
on its one event-loop thread).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numcodecs import Zstd

from shared.shard_format import EMPTY, ShardLayout, decode_index, read_layout


class RawRows:
    """Reads rows of one array of one store; ``read(rows)`` -> ``[len(rows), *row_shape]``."""

    def __init__(self, array_dir: Path, layout: ShardLayout) -> None:
        self.array_dir = array_dir
        self.layout = layout
        self.zstd = Zstd() if layout.zstd is not None else None  # decoding needs no level
        self.fill_value = layout.fill_value
        self.row_shape = layout.row_shape
        self.dtype = layout.dtype
        self.shard_rows = layout.shard_rows
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize

    def shard_path(self, shard: int) -> Path:
        return self.layout.path(self.array_dir, shard)

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The rows, into ``out`` when given (e.g. a shared-memory buffer: no further copy).
        A missing shard file is an error: callers read committed rows, whose files always exist."""
        if out is None:
            out = np.empty((len(rows), *self.row_shape), self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        shards = np.asarray(rows) // self.shard_rows
        for shard in np.unique(shards):
            positions = np.flatnonzero(shards == shard)
            try:
                fd = os.open(self.shard_path(int(shard)), os.O_RDONLY)
            except FileNotFoundError:  # the rows asked for are committed: their file is written, always
                raise ValueError(
                    f"rows {[int(rows[k]) for k in positions]}: shard {shard} file "
                    f"{self.shard_path(int(shard))} is missing"
                ) from None
            try:
                index = self._index(fd, int(shard))
                for k in positions:
                    offset, nbytes = index[int(rows[k]) % self.shard_rows]
                    if offset == EMPTY and nbytes == EMPTY:  # zarr skips chunks equal to the fill value
                        out[k] = self.fill_value
                        continue
                    if self.zstd is not None:
                        chunk = os.pread(fd, int(nbytes), int(offset))
                        if len(chunk) != nbytes:
                            raise ValueError(f"row {int(rows[k])}: shard {shard} file is truncated")
                        self.zstd.decode(chunk, out=flat[k])  # raises on a damaged or wrong-sized frame
                        continue
                    if nbytes != self.row_bytes:
                        raise ValueError(
                            f"row {int(rows[k])}: chunk of {nbytes} bytes in shard {shard}, expected {self.row_bytes}"
                        )
                    if os.preadv(fd, [memoryview(flat[k])], int(offset)) != self.row_bytes:
                        raise ValueError(f"row {int(rows[k])}: shard {shard} file is truncated")
            finally:
                os.close(fd)
        return out

    def _index(self, fd: int, shard: int) -> np.ndarray:
        size = os.fstat(fd).st_size
        index_bytes = self.layout.index_bytes
        if size < index_bytes:
            raise ValueError(f"shard {shard} file is {size} bytes, shorter than its index")
        return decode_index(os.pread(fd, index_bytes, size - index_bytes), self.shard_rows, shard)


def open_raw_rows(array_dir: Path) -> RawRows | None:
    """A :class:`RawRows` for ``array_dir`` if its layout is the one we write, else None (use zarr)."""
    layout = read_layout(array_dir)
    return RawRows(array_dir, layout) if layout is not None else None
