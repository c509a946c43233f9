"""The write side of a build: shards assembled from batches, committed on a background thread."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shared import geometry
from shared.store import LatentStore, RowStatus, ShardPayload, pixels_shape


NONFINITE_REASON = "teacher latents hold NaN or inf (e.g. a half-precision overflow): not committed"


def drop_nonfinite(errors: list[str], latents: np.ndarray | None) -> tuple[list[str], np.ndarray | None]:
    """Record decoded rows whose latents are not finite as failed (with that reason) and drop their
    latents: ``latents`` holds one row per decoded (error-free) clip, in order."""
    if latents is None or len(latents) == 0:
        return errors, latents
    finite = np.isfinite(latents.reshape(len(latents), -1)).all(axis=1)
    if finite.all():
        return errors, latents
    decoded = [i for i, error in enumerate(errors) if not error]
    errors = list(errors)
    for k in np.flatnonzero(~finite):
        errors[decoded[k]] = NONFINITE_REASON
    return errors, (latents[finite] if finite.any() else None)


@dataclass
class ShardAssembler:
    """Collects a shard's rows from several batches until every row is decided."""

    payload: ShardPayload
    start: int
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = len(self.payload.status)

    @classmethod
    def empty(cls, store: LatentStore, shard: int) -> "ShardAssembler":
        start, stop = store.shard_range(shard)
        n = stop - start
        payload = ShardPayload(  # filled batch by batch; checked when written
            index=shard,
            pixels=np.zeros(pixels_shape(n), np.uint8),
            latents=np.zeros((n, geometry.NUM_TOKENS, store.teacher_width), np.float16),
            frame_index=np.full((n, geometry.NUM_FRAMES), -1, np.int32),
            status=np.full(n, RowStatus.PENDING, np.uint8),
            error=[""] * n,
        )
        return cls(payload, start)

    def add(self, rows: np.ndarray, pixels: np.ndarray, latents: np.ndarray | None,
            frame_index: np.ndarray, errors: list[str]) -> None:
        ok = np.array([not e for e in errors])
        local = rows - self.start
        p = self.payload
        p.pixels[local[ok]] = pixels[ok]
        if latents is not None:
            p.latents[local[ok]] = latents
        p.frame_index[local[ok]] = frame_index[ok]
        p.status[local] = np.where(ok, RowStatus.COMMITTED, RowStatus.FAILED)
        for i, error in zip(local, errors):
            p.error[i] = error
        self.remaining -= len(rows)

    @property
    def complete(self) -> bool:
        return self.remaining == 0


class ShardWriter:
    """Commits shards on a background thread, at most ``depth`` waiting (bounded memory)."""

    def __init__(self, store: LatentStore, depth: int = 2) -> None:
        self.store = store
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: list[Future] = []
        self.bytes_written = 0
        self.seconds = 0.0

    def submit(self, payload: ShardPayload) -> None:
        while len(self.pending) >= self.depth:
            self.pending.pop(0).result()  # re-raises a writer error here, in the main thread
        self.pending.append(self.pool.submit(self._write, payload))

    def _write(self, payload: ShardPayload) -> None:
        started = time.perf_counter()
        self.store.write_shard(payload)
        self.seconds += time.perf_counter() - started
        self.bytes_written += payload.pixels.nbytes + payload.latents.nbytes

    def close(self) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown(wait=True)
