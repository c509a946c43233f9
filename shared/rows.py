"""Reading rows of a store: the one read path of verify, the training loader, eval and the latent statistics.

:func:`read_rows` reads the named per-row arrays of any rows, in the order given:

- ``pixels`` (zstd) and ``latents`` (raw fp16) straight from their shard files when their layout is
  the one :func:`shared.store.create_store` writes (:mod:`shared.shard_reader`: 3.7x zarr's path on
  4 MB latent rows, ~20 ms less per batch of 8 pixel rows), one open per shard, one range read per row;
- every other array through zarr, one range read per contiguous run of rows (~100x faster than
  zarr's ``oindex`` on an id list: 9 ms against 1.3 s for 4 rows of pixels).

A missing shard file is an error, never zeros (zarr reads one as the fill value): the rows read are
committed ones, and a committed row's files are always written. With ``check`` each row's pixels and
latents are compared with the checksums stored beside them, so a flipped byte is never trained on;
a reader of many batches (a loader worker) passes a :class:`ChecksumCache`, so it reads each chunk of
the checksum arrays once (two zarr reads per batch were ~18 ms of a 46 ms batch of 8 rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.shard_format import rows_per_file
from shared.store import CHECKSUM_ARRAYS, LatentStore, RowStatus, row_checksum


def committed_rows(store: LatentStore) -> np.ndarray:
    """Row ids whose status says committed: failed, pending and unreadable rows are never read for use."""
    return np.flatnonzero(store.status() == RowStatus.COMMITTED).astype(np.int64)


def row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Row ids as maximal contiguous ``[start, stop)`` runs, in their order."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks) if len(run)]


def checksum_problem(name: str, row: np.ndarray, expected: int) -> str | None:
    """``"<name> checksum mismatch"`` when one row's bytes do not match its stored checksum, else None."""
    return None if row_checksum(row) == int(expected) else f"{name} checksum mismatch"


class ChecksumCache:
    """The stored checksums of one store that a reader has read, kept for its next reads.

    Whole chunks are read (one zarr read per run of missing chunks) and never read again. Only for
    rows whose checksums cannot change while it lives: committed rows of a snapshot, or of a live store
    that nothing repairs meanwhile (a repaired row would then fail its check, never pass a wrong one).
    """

    def __init__(self, store: LatentStore) -> None:
        self.store = store
        self.values: dict[str, np.ndarray] = {}  # checksum array -> uint64 [rows], valid where loaded
        self.loaded: dict[str, np.ndarray] = {}  # checksum array -> bool [chunks]

    def expected(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The stored checksums of ``rows`` in the checksum array ``name``, reading only chunks not yet held."""
        array = self.store.arrays[name]
        chunk, total = array.chunks[0], array.shape[0]
        if name not in self.values:
            self.values[name] = np.zeros(total, np.uint64)
            self.loaded[name] = np.zeros(-(-total // chunk), bool)
        values, loaded = self.values[name], self.loaded[name]
        chunks = np.unique(rows // chunk)
        missing = chunks[~loaded[chunks]]
        if len(missing):
            _require_files(self.store, name, missing * chunk)
            for a, b in row_runs(missing):
                values[a * chunk : min(b * chunk, total)] = array[a * chunk : min(b * chunk, total)]
            loaded[missing] = True
        return values[rows]


def read_rows(
    store: LatentStore,
    rows: np.ndarray,
    names: Sequence[str] = ("pixels", "latents"),
    out: Sequence[np.ndarray] | None = None,
    check: bool = False,
    checksums: ChecksumCache | None = None,
) -> tuple[np.ndarray, ...]:
    """The ``rows`` of each array of ``names`` (``[len(rows), *row_shape]`` each), written into ``out``
    when given (one buffer per name, e.g. the loader's shared-memory batch: no further copy).

    ``check``: compare the rows of every named array that has stored checksums (pixels, latents) with
    them; the first mismatch raises ``ValueError("row R: <name> checksum mismatch")``. Damaged or missing
    files raise too (``ValueError`` from the shard files, zarr's own errors otherwise). ``checksums``:
    where the stored checksums come from when held already (else they are read for these rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    runs = row_runs(rows)
    results = []
    for n, name in enumerate(names):
        array = store.arrays[name]
        target = out[n] if out is not None else np.empty((len(rows), *array.shape[1:]), array.dtype)
        raw = store.raw_rows.get(name)
        if raw is not None:
            raw.read(rows, out=target)
        else:
            _require_files(store, name, rows)
            filled = 0
            for a, b in runs:
                target[filled : filled + b - a] = array[a:b]
                filled += b - a
        results.append(target)
    if check:
        _check_checksums(store, rows, dict(zip(names, results, strict=False)), checksums)
    return tuple(results)


def read_row_range(
    store: LatentStore, start: int, stop: int, names: Sequence[str] = ("pixels", "latents")
) -> dict[str, np.ndarray]:
    """Contiguous rows ``[start, stop)`` by array name."""
    return dict(zip(names, read_rows(store, np.arange(start, stop), names), strict=False))


def _require_files(store: LatentStore, name: str, rows: np.ndarray) -> None:
    """zarr reads a missing shard file as the fill value; for rows being read it is damage."""
    grid = rows_per_file(store.arrays[name])  # shard_rows, or more for clip_id and label
    for shard in np.unique(rows // grid):
        path = store.shard_file(name, int(shard))
        if not path.is_file():
            raise ValueError(f"{name} shard {shard} file {path} is missing")


def _check_checksums(
    store: LatentStore, rows: np.ndarray, data: dict[str, np.ndarray], checksums: ChecksumCache | None
) -> None:
    checked = [name for name in CHECKSUM_ARRAYS if name in data]
    sums = [CHECKSUM_ARRAYS[name] for name in checked]
    if checksums is not None:
        expected = {name: checksums.expected(sum_name, rows) for name, sum_name in zip(checked, sums, strict=False)}
    else:
        expected = dict(zip(checked, read_rows(store, rows, sums), strict=False))
    for k, row in enumerate(rows):
        for name in checked:
            problem = checksum_problem(name, data[name][k], expected[name][k])
            if problem:
                raise ValueError(f"row {row}: {problem}")
