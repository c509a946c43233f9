"""Streaming ``(pixels, latents)`` batches from a (snapshot of a) latent-cache store.

The epoch's batches are a pure function of ``(committed rows, seed, epoch)``:

1. the shards holding committed rows are permuted from ``(seed, epoch)``;
2. their row ids stream, shard after shard, through a shuffle window of
   ``shuffle_buffer`` ids (the WebDataset buffer, applied to ids: no row data is
   held for it, so a large window costs no memory);
3. the shuffled ids are cut into global batches (``drop_last``: static shapes).

Global batch ``i`` is the same whatever the number of ranks and workers: rank
``r`` of ``K`` takes the ``r``-th slice of it, and DataLoader worker ``w`` of
``W`` handles positions ``i ≡ w (mod W)``, which the DataLoader hands back in
order. So a resumed run starts at batch ``(epoch, index)`` exactly, and a run
on K GPUs sees the same global batches as a run on one.

Memory is bounded whatever the store size: a worker holds one batch while it
reads it, the DataLoader at most ``workers x prefetch_factor`` batches in
shared memory (checked against ``/dev/shm`` before the workers start).
Normalisation and dtype casts happen on the device (:func:`to_model_inputs`).
"""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shared import geometry
from shared.config import LoaderConfig, PipelineConfig
from shared.console import format_bytes
from shared.errors import SaltUsageError
from shared.lifeline import worker_init
from shared.shard_reader import open_raw_rows
from shared.store import LatentStore, RowStatus, row_checksum

log = logging.getLogger(__name__)

SHM_PATH = Path("/dev/shm")


@dataclass(frozen=True)
class Position:
    """Where a stream is: the next global batch to read is ``index`` of ``epoch``."""

    epoch: int = 0
    index: int = 0


def committed_rows(store: LatentStore) -> np.ndarray:
    """Row ids whose status says committed: failed, pending and unreadable rows never stream."""
    return np.flatnonzero(store.status() == RowStatus.COMMITTED).astype(np.int64)


def batches_per_epoch(num_rows: int, batch_size: int) -> int:
    return num_rows // batch_size


def epoch_order(rows: np.ndarray, shard_rows: int, seed: int, epoch: int, window: int) -> np.ndarray:
    """All of ``rows`` in this epoch's order: shards permuted, then a ``window``-id shuffle buffer."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    shard_of = rows // shard_rows
    shards, first = np.unique(shard_of, return_index=True)  # rows are sorted, so runs are contiguous
    bounds = np.append(first, len(rows))
    stream = np.concatenate([rows[bounds[k]:bounds[k + 1]] for k in rng.permutation(len(shards))]) if len(rows) else rows
    window = max(1, min(window, len(stream)))
    out = np.empty_like(stream)
    buffer = stream[:window].copy()
    picks = rng.integers(0, window, size=len(stream) - window)
    for n, incoming in enumerate(stream[window:]):  # ~0.1 s per 200k rows; once per epoch and worker
        slot = picks[n]
        out[n] = buffer[slot]
        buffer[slot] = incoming
    out[len(stream) - window:] = rng.permutation(buffer)
    return out


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to produce its batches (pickled into each worker)."""

    store_path: str
    rows: np.ndarray  # committed row ids, sorted
    shard_rows: int
    batch_size: int  # global batch, across all ranks
    seed: int
    shuffle_buffer: int
    epochs: int
    start: Position = Position()
    rank: int = 0
    world_size: int = 1
    verify_checksums: bool = False

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return batches_per_epoch(len(self.rows), self.batch_size)

    @property
    def remaining_batches(self) -> int:
        return max(0, (self.epochs - self.start.epoch) * self.steps_per_epoch - self.start.index)


def stream_spec(store: LatentStore, config: PipelineConfig, start: Position = Position(),
                rank: int = 0, world_size: int = 1) -> StreamSpec:
    """The stream a run of ``config`` reads from ``store``, starting at ``start``."""
    return StreamSpec(
        store_path=str(store.path), rows=committed_rows(store), shard_rows=store.shard_rows,
        batch_size=config.train.batch_size, seed=config.train.seed, shuffle_buffer=config.stream.shuffle_buffer,
        epochs=config.train.epochs, start=start, rank=rank, world_size=world_size,
        verify_checksums=config.stream.verify_checksums,
    )


def check_stream(spec: StreamSpec, store_path: Path) -> None:
    """Refuse, with one line, a stream that could never yield a batch."""
    if len(spec.rows) == 0:
        raise SaltUsageError(f"store {store_path} has no committed rows to train on (run salt-cache build, then salt-cache verify)")
    if spec.batch_size % spec.world_size:
        raise SaltUsageError(f"train.batch_size {spec.batch_size} is not divisible by the {spec.world_size} ranks")
    if spec.batch_size > len(spec.rows):
        raise SaltUsageError(
            f"train.batch_size {spec.batch_size} is larger than the {len(spec.rows)} committed rows of {store_path} "
            "(batches drop the last partial batch, so an epoch would be empty): lower train.batch_size"
        )


class StoreStream(IterableDataset):
    """Yields this rank's slice of every global batch from ``spec.start`` to the last epoch's end.

    Items are dicts: ``pixels`` uint8 [b, 16, 224, 224, 3], ``latents`` float16 [b, 1568, D],
    ``rows`` int64 [b], ``epoch``, ``index``. A batch that cannot be read becomes
    ``{"error": reason, "rows", "epoch", "index", "worker"}`` so the trainer counts it and goes on.
    """

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self._reader: RowReader | None = None

    def positions(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(epoch, index, this rank's rows)`` of every remaining global batch, in order. A global batch
        is sorted (read locality) before it is sliced, so sample i and its mask i are the same for any K."""
        spec = self.spec
        lo, hi = spec.rank * spec.local_batch, (spec.rank + 1) * spec.local_batch
        for epoch in range(spec.start.epoch, spec.epochs):
            order = epoch_order(spec.rows, spec.shard_rows, spec.seed, epoch, spec.shuffle_buffer)
            batches = order[: spec.steps_per_epoch * spec.batch_size].reshape(spec.steps_per_epoch, spec.batch_size)
            first = spec.start.index if epoch == spec.start.epoch else 0
            for index in range(first, spec.steps_per_epoch):
                yield epoch, index, np.sort(batches[index])[lo:hi]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for n, (epoch, index, rows) in enumerate(self.positions()):
            if n % workers == worker:
                yield self.read_batch(epoch, index, rows, worker)

    def reader(self) -> RowReader:
        if self._reader is None:  # opened lazily, inside the worker process
            self._reader = RowReader(LatentStore.open(self.spec.store_path))
        return self._reader

    def read_batch(self, epoch: int, index: int, rows: np.ndarray, worker: int) -> dict:
        try:
            reader = self.reader()
            n = len(rows)
            in_worker = get_worker_info() is not None
            make = shared_buffer if in_worker else (lambda shape, dtype: torch.empty(shape, dtype=dtype))
            pixels = make((n, *reader.store.arrays["pixels"].shape[1:]), torch.uint8)
            latents = make((n, *reader.store.arrays["latents"].shape[1:]), torch.float16)
            reader.read(rows, out=(pixels.numpy(), latents.numpy()))
            if self.spec.verify_checksums:
                self._check(rows, pixels.numpy(), latents.numpy())
        except Exception as exc:  # a damaged chunk or file: reported, counted, skipped
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return {"error": reason, "rows": torch.from_numpy(rows), "epoch": epoch, "index": index, "worker": worker}
        return {
            "pixels": pixels,
            "latents": latents,
            "rows": torch.from_numpy(rows),
            "epoch": epoch,
            "index": index,
        }

    def _check(self, rows: np.ndarray, pixels: np.ndarray, latents: np.ndarray) -> None:
        expected_pixels, expected_latents = self.reader().read(rows, ("pixels_checksum", "latents_checksum"))
        for k, row in enumerate(rows):
            if row_checksum(pixels[k]) != int(expected_pixels[k]):
                raise ValueError(f"row {row}: pixels checksum mismatch")
            if row_checksum(latents[k]) != int(expected_latents[k]):
                raise ValueError(f"row {row}: latents checksum mismatch")


def row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted row ids as maximal contiguous ``[start, stop)`` runs."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks) if len(run)]


class RowReader:
    """Reads sorted rows of a store's arrays in as few, as large reads as the layout allows.

    Latents (raw fp16) come straight from the shard files (``shared.shard_reader``: 3.7x
    zarr's path on 4 MB rows); the rest through zarr, one range read per contiguous run
    of rows (~100x faster than zarr's ``oindex`` on an id list: 9 ms against 1.3 s for
    4 rows of pixels).
    """

    RAW_ARRAYS = ("latents",)

    def __init__(self, store: LatentStore) -> None:
        self.store = store
        self.raw = {name: open_raw_rows(store.path / name) for name in self.RAW_ARRAYS}

    def read(self, rows: np.ndarray, names: tuple[str, ...] = ("pixels", "latents"),
             out: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, ...]:
        """The rows of each array, written into ``out`` when given (the batch's shared-memory buffers)."""
        runs = row_runs(rows)
        results = []
        for n, name in enumerate(names):
            array = self.store.arrays[name]
            target = out[n] if out is not None else np.empty((len(rows), *array.shape[1:]), array.dtype)
            raw = self.raw.get(name)
            if raw is not None:
                raw.read(rows, out=target)
            else:
                self._require_files(name, runs)  # zarr would read a missing file as zeros
                filled = 0
                for a, b in runs:
                    target[filled:filled + b - a] = array[a:b]
                    filled += b - a
            results.append(target)
        return tuple(results)

    def _require_files(self, name: str, runs: list[tuple[int, int]]) -> None:
        shard_rows = self.store.shard_rows
        for shard in sorted({k for a, b in runs for k in range(a // shard_rows, (b - 1) // shard_rows + 1)}):
            if not self.store.shard_file(name, shard).is_file():
                raise ValueError(f"{name} shard {shard} file {self.store.shard_file(name, shard)} is missing")


def shared_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor allocated in shared memory, as DataLoader's own collate does: a worker
    that reads into it hands the batch over without copying it again."""
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def batch_bytes(local_batch: int, teacher_width: int) -> int:
    pixels = local_batch * geometry.NUM_FRAMES * geometry.IMAGE_SIZE**2 * 3
    latents = local_batch * geometry.NUM_TOKENS * teacher_width * 2
    return pixels + latents


def shm_bound(loader: LoaderConfig, local_batch: int, teacher_width: int) -> int:
    """The most /dev/shm the DataLoader can hold: every worker's prefetched batches, plus one in flight each."""
    if loader.num_workers == 0:
        return 0
    return loader.num_workers * (loader.prefetch_factor + 1) * batch_bytes(local_batch, teacher_width)


def check_shm(loader: LoaderConfig, local_batch: int, teacher_width: int, shm: Path = SHM_PATH,
              processes: int = 1) -> None:
    """Refuse to start workers that would exhaust /dev/shm (a bus error mid-run, not an error message).
    ``processes``: the ranks on this node, whose loaders share its /dev/shm."""
    needed = processes * shm_bound(loader, local_batch, teacher_width)
    if needed == 0 or not shm.is_dir():
        return
    free = shutil.disk_usage(shm).free
    if needed > free:
        raise SaltUsageError(
            f"the loader can hold up to {format_bytes(needed)} in {shm} "
            f"({processes} rank(s) x {loader.num_workers} workers x {loader.prefetch_factor + 1} batches x {format_bytes(batch_bytes(local_batch, teacher_width))}) "
            f"but only {format_bytes(free)} is free: lower loader.num_workers, loader.prefetch_factor or train.batch_size, "
            "or give the container more shared memory (docker run --shm-size)"
        )


def make_loader(spec: StreamSpec, loader: LoaderConfig, pin_memory: bool) -> DataLoader:
    """A DataLoader over :class:`StoreStream`: batches are formed by the stream, so ``batch_size=None``.

    One iterator spans the whole run (epochs included), so ``persistent_workers`` has nothing to keep.
    """
    workers = loader.num_workers
    return DataLoader(
        StoreStream(spec),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=loader.prefetch_factor if workers else None,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        worker_init_fn=worker_init if workers else None,  # die with the main process; Ctrl-C is its to handle
    )


@functools.lru_cache(maxsize=None)
def _pixel_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std on the device, made once: a fresh host-to-device copy every step
    would be a synchronising copy from pageable memory."""
    mean = torch.tensor(geometry.PIXEL_MEAN, dtype=torch.float32).view(1, 3, 1, 1, 1).to(device)
    std = torch.tensor(geometry.PIXEL_STD, dtype=torch.float32).view(1, 3, 1, 1, 1).to(device)
    return mean, std


def to_model_inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[B, 16, 224, 224, 3]`` -> normalised float32 ``[B, 3, 16, 224, 224]`` on the device
    (autocast takes it to bf16 on CUDA); fp16 latents moved as they are (the loss normalises them in float32)."""
    pixels = batch["pixels"].to(device, non_blocking=True)
    latents = batch["latents"].to(device, non_blocking=True)
    mean, std = _pixel_statistics(device)
    x = pixels.permute(0, 4, 1, 2, 3).float().div_(255.0)
    x = (x - mean) / std
    return x.contiguous(), latents
