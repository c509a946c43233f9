"""The Zarr v3 sharding layout of our stores, in one place: where a shard's file is, whether an
array's ``zarr.json`` describes the layout :func:`shared.store.create_store` writes for the two big
arrays, and the shard index at the end of each file.

The layout (a published spec): a shard file holds its inner chunks (here one row each) back to back,
then an index of ``(offset, nbytes)`` little-endian uint64 pairs, one per inner chunk of a whole shard
(``2^64-1`` twice for an absent chunk), then the index's crc32c. :mod:`shared.shard_reader` reads rows
through it and :mod:`shared.shard_writer` writes whole shards; every other array goes through zarr.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr

BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}
BYTES = {"name": "bytes"}  # single-byte types carry no endianness
INDEX_CODECS = [BYTES_LE, {"name": "crc32c"}]
CHUNK_KEY_ENCODING = {"name": "default", "configuration": {"separator": "/"}}
EMPTY = np.uint64(2**64 - 1)  # the index marks an absent inner chunk with offset = nbytes = 2^64-1
CRC_BYTES = 4


def shard_path(array_dir: Path, shard: int, ndim: int) -> Path:
    """The file holding shard (or, unsharded, chunk) ``shard`` of the ``ndim``-dimensional array in
    ``array_dir``: the default chunk-key encoding, ``c/<shard>/0/...``, every array of a store uses."""
    return array_dir.joinpath("c", str(shard), *["0"] * (ndim - 1))


def rows_per_file(array: zarr.Array) -> int:
    """How many rows one file of ``array`` holds: its shard's rows, or its chunk's when unsharded
    (``shard_rows`` for every per-row data array; more for ``clip_id`` and ``label``)."""
    return int((array.shards or array.chunks)[0])


@dataclass(frozen=True)
class ShardLayout:
    """One big array's layout, read from its ``zarr.json`` by :func:`read_layout`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    shard_rows: int
    fill_value: float
    zstd: dict[str, Any] | None  # the zstd codec's configuration (level, checksum); None: raw bytes

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def index_bytes(self) -> int:
        """Bytes of a shard file's index: an (offset, nbytes) pair per row, then crc32c."""
        return self.shard_rows * 16 + CRC_BYTES

    def path(self, array_dir: Path, shard: int) -> Path:
        return shard_path(array_dir, shard, len(self.shape))


def read_layout(array_dir: Path) -> ShardLayout | None:
    """The layout of the array in ``array_dir`` when it is exactly ours (sharded, one row per inner chunk,
    ``bytes`` little-endian then optionally zstd, the index at the end with crc32c, default chunk keys),
    else None: the caller reads or writes that array through zarr."""
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
        shape = tuple(meta["shape"])
        (codec,) = meta["codecs"]
        config = codec["configuration"]
        shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        fill_value = float(meta["fill_value"])
        codecs = config.get("codecs") or []
        ours = (
            codec.get("name") == "sharding_indexed"
            and len(codecs) in (1, 2)
            and codecs[0] in (BYTES_LE, BYTES)
            and (len(codecs) == 1 or codecs[1].get("name") == "zstd")
            and config.get("index_codecs") == INDEX_CODECS
            and config.get("index_location", "end") == "end"
            and tuple(config.get("chunk_shape", ())) == (1, *shape[1:])
            and shard_shape[1:] == shape[1:]
            and meta.get("chunk_key_encoding") == CHUNK_KEY_ENCODING
        )
        if not ours:
            return None
        zstd = None
        if len(codecs) == 2:
            zstd = {
                "level": int(codecs[1]["configuration"]["level"]),
                "checksum": bool(codecs[1]["configuration"]["checksum"]),
            }
        return ShardLayout(shape, dtype, int(shard_shape[0]), fill_value, zstd)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def encode_index(sizes: np.ndarray, shard_rows: int) -> bytes:
    """The index of a shard whose first ``len(sizes)`` inner chunks are written back to back with these
    sizes; entries past them (a last, shorter shard) are absent. Its crc32c included."""
    sizes = np.asarray(sizes, dtype="<u8")
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype("<u8")
    index = np.full((shard_rows, 2), EMPTY, dtype="<u8")
    index[: len(sizes)] = np.stack([offsets, sizes], axis=1)
    body = index.tobytes()
    return body + google_crc32c.value(body).to_bytes(CRC_BYTES, "little")


def decode_index(raw: bytes, shard_rows: int, shard: int) -> np.ndarray:
    """``[shard_rows, 2]`` (offset, nbytes) from the index bytes at a shard file's end; a checksum that
    does not match raises ``ValueError`` (a damaged shard file)."""
    body, stored = raw[:-CRC_BYTES], raw[-CRC_BYTES:]
    if google_crc32c.value(body).to_bytes(CRC_BYTES, "little") != stored:
        raise ValueError(f"shard {shard} index checksum mismatch (damaged shard file)")
    return np.frombuffer(body, "<u8").reshape(shard_rows, 2)
