"""The write side of a build: shards assembled from batches, committed on background threads."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shared import geometry
from shared.store import CROP_BOX_FIELDS, LatentStore, RowStatus, ShardPayload, pixels_shape

log = logging.getLogger(__name__)

NONFINITE_REASON = "teacher latents hold NaN or inf (e.g. a half-precision overflow): not committed"


FP16_EXPONENT = 0x7C00  # all five exponent bits set: inf or NaN, whatever the sign and mantissa


def finite_rows(latents: np.ndarray) -> np.ndarray:
    """bool ``[rows]``: which rows of fp16 ``latents`` hold only finite values, read from the exponent
    bits (no float conversion: about 1 ms per 1568x1280 row against 4.4 for ``np.isfinite`` here)."""
    bits = latents.reshape(len(latents), -1).view(np.uint16)
    return (bits & np.uint16(FP16_EXPONENT)).max(axis=1, initial=0) != FP16_EXPONENT


def drop_nonfinite(errors: list[str], finite: np.ndarray | None) -> list[str]:
    """Record decoded rows whose latents are not finite (``finite[k]`` False, one flag per batch row,
    failed rows padded) as failed, with that reason: the assembler then stores zeros for them."""
    if finite is None or finite.all():
        return errors
    return [error or (NONFINITE_REASON if not finite[k] else "") for k, error in enumerate(errors)]


class BufferPool:
    """Shard buffers reused from shard to shard. A new 100 MB buffer per shard at D=1280 pays
    its first-touch page faults every time (the cost: EXPERIMENTS.md, issue 21)."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        self._lock = threading.Lock()

    def take(self, rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixels and latents buffers for ``rows`` rows, holding stale data: every row gets overwritten."""
        with self._lock:
            free = self._free.get((rows, width))
            if free:
                return free.pop()
        return (np.empty(pixels_shape(rows), np.uint8), np.empty((rows, geometry.NUM_TOKENS, width), np.float16))

    def give(self, payload: ShardPayload) -> None:
        """Back to the pool once the shard is on disk."""
        rows, width = payload.latents.shape[0], payload.latents.shape[2]
        with self._lock:
            self._free.setdefault((rows, width), []).append((payload.pixels, payload.latents))


@dataclass
class ShardAssembler:
    """Collects a shard's rows from several batches until every row is decided.

    The bookkeeping (status, errors, frame indices) happens in the caller's thread; the rows' bytes
    can be copied by a ``copier`` thread pool (``copies`` holds those copies: the shard is written
    once they are done), so the build's main thread does not spend ~4-6 ms per clip copying them."""

    payload: ShardPayload
    start: int
    remaining: int = field(init=False)
    copies: list[Future] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.remaining = len(self.payload.status)

    @classmethod
    def empty(cls, store: LatentStore, shard: int, pool: BufferPool | None = None) -> ShardAssembler:
        start, stop = store.shard_range(shard)
        n = stop - start
        pixels, latents = (
            pool.take(n, store.teacher_width)
            if pool is not None
            else (
                np.zeros(pixels_shape(n), np.uint8),
                np.zeros((n, geometry.NUM_TOKENS, store.teacher_width), np.float16),
            )
        )
        payload = ShardPayload(  # filled batch by batch (failed rows zeroed); checked when written
            index=shard,
            pixels=pixels,
            latents=latents,
            frame_index=np.full((n, geometry.NUM_FRAMES), -1, np.int32),
            status=np.full(n, RowStatus.PENDING, np.uint8),
            error=[""] * n,
            crop_box=np.full((n, len(CROP_BOX_FIELDS)), -1, np.int32) if store.views_per_clip > 1 else None,
        )
        return cls(payload, start)

    def add(
        self,
        rows: np.ndarray,
        pixels: np.ndarray,
        latents: np.ndarray | None,
        frame_index: np.ndarray,
        errors: list[str],
        crop_box: np.ndarray | None = None,
        copier: Executor | None = None,
        nonfinite: list[int] | None = None,
    ) -> None:
        """``rows`` of this shard with their pixels, latents (None when all failed), frame indices,
        errors and (several views per clip) crop boxes, aligned. ``copier``: where the bytes are
        copied (else here). ``nonfinite``: check the copied latents' exponent bits there too (the
        teacher did not check them on its device); rows that fail are recorded failed and listed in it."""
        ok = np.array([not e for e in errors], dtype=bool)
        local = rows - self.start
        p = self.payload
        p.frame_index[local[ok]] = frame_index[ok]
        if p.crop_box is not None:
            assert crop_box is not None  # a store of several views: every batch carries its crop boxes
            p.crop_box[local[ok]] = crop_box[ok]
        p.status[local] = np.where(ok, RowStatus.COMMITTED, RowStatus.FAILED)
        for i, error in zip(local, errors, strict=False):
            p.error[i] = error
        self.remaining -= len(rows)
        if copier is None:
            self._copy(local, pixels, latents, ok, nonfinite)
        else:
            self.copies.append(copier.submit(self._copy, local, pixels, latents, ok, nonfinite))

    def _copy(
        self,
        local: np.ndarray,
        pixels: np.ndarray,
        latents: np.ndarray | None,
        ok: np.ndarray,
        nonfinite: list[int] | None,
    ) -> None:
        """Each row's bytes copied once into the shard buffers (failed rows zeroed), then, with
        ``nonfinite``, the copied latents checked (these rows only: no other thread writes them)."""
        p = self.payload
        if ok.all() and np.all(np.diff(local) == 1):  # the usual case: one copy of a contiguous run
            run = slice(int(local[0]), int(local[-1]) + 1)
            p.pixels[run] = pixels
            if latents is not None:
                p.latents[run] = latents
        else:  # row by row, each copied once (a boolean index would copy every row twice)
            for k, row in enumerate(local):
                if ok[k]:
                    p.pixels[row] = pixels[k]
                    if latents is not None:
                        p.latents[row] = latents[k]
                else:  # failed rows hold zeros (a reused buffer holds another shard's rows)
                    p.pixels[row] = 0
                    p.latents[row] = 0
        if nonfinite is None or latents is None:
            return
        for row in local[ok]:
            if not finite_rows(p.latents[row : row + 1])[0]:  # never commit NaN or inf
                p.status[row], p.error[row] = RowStatus.FAILED, NONFINITE_REASON
                p.pixels[row] = 0
                p.latents[row] = 0
                nonfinite.append(self.start + int(row))  # list.append: atomic under the GIL
                log.warning("row %d failed: %s", self.start + int(row), NONFINITE_REASON)

    @property
    def complete(self) -> bool:
        return self.remaining == 0


class ShardWriter:
    """Commits shards on ``threads`` background threads, at most ``2 x threads`` waiting (bounded memory).

    One shard costs a single core about 0.4 s at D=1280 (checksums, zstd of the pixels, the latents'
    bytes, fsync): one thread would cap a build near 40 clips/s. Shards are independent files with
    their own commit record, so several commit at once; zstd, crc32c and fsync release the GIL.
    """

    def __init__(self, store: LatentStore, threads: int = 4) -> None:
        self.store = store
        self.buffers = BufferPool()  # payload buffers come back here once written
        self.depth = 2 * threads
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-writer")
        # Rows copied into shard buffers (ShardAssembler.add): a pool of its own, so a write that waits
        # for its shard's copies never holds the thread a copy needs. numpy copies release the GIL.
        self.copier = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-copy")
        self.pending: list[Future] = []
        self.bytes_written = 0
        self.busy_seconds = 0.0  # summed over threads
        self.threads = threads
        self._lock = threading.Lock()

    @property
    def seconds(self) -> float:
        """Wall-clock seconds the writers needed if they all stayed busy (busy time over threads)."""
        return self.busy_seconds / self.threads

    def submit(self, payload: ShardPayload, copies: list[Future] | None = None) -> None:
        """Write ``payload`` once its ``copies`` (its rows' copies into its buffers) are done."""
        done = [future for future in self.pending if future.done()]
        for future in done:
            future.result()  # re-raises a writer error here, in the main thread
        self.pending = [future for future in self.pending if future not in done]
        while len(self.pending) >= self.depth:
            self.pending.pop(0).result()  # re-raises a writer error here, in the main thread
        self.pending.append(self.pool.submit(self._write, payload, copies or []))

    def _write(self, payload: ShardPayload, copies: list[Future]) -> None:
        for copy in copies:
            copy.result()  # a copy's error fails this write, and so the build, in the main thread
        started = time.perf_counter()
        self.store.write_shard(payload)
        self.buffers.give(payload)
        with self._lock:
            self.busy_seconds += time.perf_counter() - started
            self.bytes_written += payload.pixels.nbytes + payload.latents.nbytes

    def close(self) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.copier.shutdown(wait=True)  # copies of shards never completed (a stopped build) end too
            self.pool.shutdown(wait=True)
