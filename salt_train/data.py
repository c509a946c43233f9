"""Streaming ``(pixels, latents)`` batches from a (snapshot of a) latent-cache store.

The epoch's batches are a pure function of ``(committed rows, seed, epoch)``:

0. a store of K views per clip (row ``clip * K + k``) streams one view of each clip
   per epoch (:func:`epoch_views`), so an epoch is one pass over the clips;
1. the shards holding those rows are permuted from ``(seed, epoch)``;
2. their row ids stream, shard after shard, through a shuffle window of
   ``shuffle_buffer`` ids (the WebDataset buffer, applied to ids: no row data is
   held for it, so a large window costs no memory);
3. the shuffled ids are cut into global batches (``drop_last``: static shapes).

Global batch ``i`` is the same whatever the number of ranks and workers: rank
``r`` of ``K`` takes the ``r``-th slice of it, and DataLoader worker ``w`` of
``W`` handles positions ``i ≡ w (mod W)``, which the DataLoader hands back in
order. So a resumed run starts at batch ``(epoch, index)`` exactly, and a run
on K GPUs sees the same global batches as a run on one.

Each batch carries its masks, made in the worker that reads it: a pure function of
``(seed, global batch number)``, the same global batch's masks sliced like its rows,
so the same for any number of ranks and workers (and equal to the step number
while no batch has been skipped).

Memory is bounded whatever the store size. For training, each worker reads into
a fixed ring of ``prefetch_factor + 2`` shared-memory batch buffers made once for
the run (:class:`BufferRing`): no new segment per batch, and the main process
(:class:`salt_train.feed.BatchFeed`) hands a buffer back once its batch is on the
device. ``/dev/shm`` is checked for the ring before the workers start.
Normalisation and dtype casts happen on the device, inside the compiled step.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shared import geometry
from shared.config import PipelineConfig, TrainLoaderConfig
from shared.console import format_bytes
from shared.errors import SaltUsageError
from shared.parent_death import share_temp_dir, worker_init
from shared.rows import ChecksumCache, committed_rows, read_rows
from shared.store import LatentStore

from salt_train.masks import make_masks
from salt_train.state import Position

log = logging.getLogger(__name__)

SHM_PATH = Path("/dev/shm")


def batches_per_epoch(num_rows: int, batch_size: int) -> int:
    return num_rows // batch_size


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: well-spread uint64 hashes of uint64 values (wrapping arithmetic)."""
    z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def epoch_views(rows: np.ndarray, views_per_clip: int, seed: int, epoch: int) -> np.ndarray:
    """One committed row of each clip (``rows`` sorted; clip ``row // K``) for this epoch.

    Clip c with m committed views reads view ``(offset_c + epoch) mod m`` of them, ``offset_c`` a hash
    of ``(seed, c)``: a pure function of (seed, epoch, clip), so the same for any number of ranks and
    workers and after a resume, and cyclic, so K epochs read every view once (random draws would
    leave some views unread and repeat others)."""
    if views_per_clip == 1 or len(rows) == 0:
        return rows
    clips = rows // views_per_clip
    unique, first, count = np.unique(clips, return_index=True, return_counts=True)
    with np.errstate(over="ignore"):
        offset = _mix64(_mix64(np.full(len(unique), seed % 2**64, np.uint64)) ^ unique.astype(np.uint64))
    count = count.astype(np.uint64)
    pick = (offset % count + np.uint64(epoch) % count) % count
    return rows[first + pick.astype(np.int64)]


def count_clips(rows: np.ndarray, views_per_clip: int) -> int:
    """Clips with at least one committed row: what an epoch passes over."""
    return len(np.unique(rows // views_per_clip)) if views_per_clip > 1 else len(rows)


def epoch_order(rows: np.ndarray, shard_rows: int, seed: int, epoch: int, window: int) -> np.ndarray:
    """All of ``rows`` in this epoch's order: shards permuted, then a ``window``-id shuffle buffer."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    shard_of = rows // shard_rows
    shards, first = np.unique(shard_of, return_index=True)  # rows are sorted, so runs are contiguous
    bounds = np.append(first, len(rows))
    runs = [rows[bounds[k] : bounds[k + 1]] for k in rng.permutation(len(shards))]
    stream = np.concatenate(runs) if len(rows) else rows
    window = max(1, min(window, len(stream)))
    out = np.empty_like(stream)
    buffer = stream[:window].copy()
    picks = rng.integers(0, window, size=len(stream) - window)
    for n, incoming in enumerate(stream[window:]):  # ~0.1 s per 200k rows; once per epoch and worker
        slot = picks[n]
        out[n] = buffer[slot]
        buffer[slot] = incoming
    out[len(stream) - window :] = rng.permutation(buffer)
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
    mask_kind: str | None = None  # None: batches carry no masks (the step draws them)
    mask_ratio: float = 0.75
    views_per_clip: int = 1  # the store's: an epoch reads one view of each clip
    arrays: tuple[str, ...] = ("pixels", "latents")  # what a batch carries; stage 1 (salt-train teacher): pixels

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.world_size

    @functools.cached_property
    def clips(self) -> int:
        return count_clips(self.rows, self.views_per_clip)

    @property
    def steps_per_epoch(self) -> int:
        return batches_per_epoch(self.clips, self.batch_size)

    @property
    def remaining_batches(self) -> int:
        return max(0, (self.epochs - self.start.epoch) * self.steps_per_epoch - self.start.index)


def stream_spec(
    store: LatentStore,
    config: PipelineConfig,
    start: Position = Position(),
    rank: int = 0,
    world_size: int = 1,
    arrays: tuple[str, ...] = ("pixels", "latents"),
) -> StreamSpec:
    """The stream a run of ``config`` reads from ``store``, starting at ``start``; ``arrays``: what it reads."""
    return StreamSpec(
        store_path=str(store.path),
        rows=committed_rows(store),
        shard_rows=store.shard_rows,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
        shuffle_buffer=config.stream.shuffle_buffer,
        epochs=config.train.epochs,
        start=start,
        rank=rank,
        world_size=world_size,
        verify_checksums=config.stream.verify_checksums,
        mask_kind=config.mask.kind,
        mask_ratio=config.mask.ratio,
        views_per_clip=store.views_per_clip,
        arrays=arrays,
    )


def check_stream(spec: StreamSpec, store_path: Path) -> None:
    """Refuse, with one line, a stream that could never yield a batch."""
    if len(spec.rows) == 0:
        raise SaltUsageError(
            f"store {store_path} has no committed rows to train on (run salt-cache build, then salt-cache verify)"
        )
    if spec.batch_size % spec.world_size:
        raise SaltUsageError(f"train.batch_size {spec.batch_size} is not divisible by the {spec.world_size} ranks")
    if spec.batch_size > spec.clips:
        what = "committed rows" if spec.views_per_clip == 1 else "clips with a committed view"
        raise SaltUsageError(
            f"train.batch_size {spec.batch_size} is larger than the {spec.clips} {what} of {store_path} "
            "(batches drop the last partial batch, so an epoch would be empty): lower train.batch_size"
        )


class BufferRing:
    """Per-worker rings of shared-memory batch buffers, reused for the whole run.

    ``state[w, s]`` (an int32 tensor in shared memory, made by the main process before the
    workers start) is 1 while worker ``w``'s slot ``s`` holds a batch the main process has
    not handed back, 0 when the worker may fill it. A worker fills its slots in turn and
    waits for a busy one; the main process frees a slot once the batch's bytes are on the
    device. It holds at most two batches at a time (the one stepping and the next one being
    copied), so ``slots >= 3`` can never wait forever.
    """

    def __init__(self, workers: int, slots: int) -> None:
        if slots < 3:
            raise ValueError(f"a buffer ring needs at least 3 slots per worker, got {slots}")
        self.state = torch.zeros(workers, slots, dtype=torch.int32).share_memory_()
        self.slots = slots
        self._buffers: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # this worker's, made on first use
        self._next = 0
        self._parent = 0

    def __getstate__(self) -> dict:  # a worker gets the shared state, not the main process's buffers
        return {"state": self.state, "slots": self.slots}

    def __setstate__(self, state: dict) -> None:
        self.state, self.slots = state["state"], state["slots"]
        self._buffers, self._next, self._parent = [], 0, os.getppid()

    def claim(
        self, worker: int, pixels_shape: tuple[int, ...], latents_shape: tuple[int, ...] | None
    ) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """The worker's next slot, once the main process has freed it, and its buffers (no latents buffer
        for a stream of pixels only)."""
        if not self._buffers:
            self._buffers = [
                (
                    shared_buffer(pixels_shape, torch.uint8),
                    shared_buffer(latents_shape, torch.float16) if latents_shape else None,
                )
                for _ in range(self.slots)
            ]
        slot, self._next = self._next, (self._next + 1) % self.slots
        while int(self.state[worker, slot]) != 0:
            if os.getppid() != self._parent:  # the main process is gone: nobody will free it
                raise SystemExit(0)
            time.sleep(0.0005)
        self.state[worker, slot] = 1
        pixels, latents = self._buffers[slot]
        if latents is not None:
            assert latents_shape is not None  # a latents buffer is made only from its shape
            latents = latents[: latents_shape[0]]
        return slot, pixels[: pixels_shape[0]], latents

    def release(self, worker: int, slot: int) -> None:
        self.state[worker, slot] = 0


class StoreStream(IterableDataset):
    """Yields this rank's slice of every global batch from ``spec.start`` to the last epoch's end.

    Items are dicts: ``pixels`` uint8 [b, 16, 224, 224, 3], ``latents`` float16 [b, 1568, D],
    ``rows`` int64 [b], ``epoch``, ``index``, and with ``spec.mask_kind`` the batch's ``visible``
    and ``masked`` token ids, a tuple with one [b, V_g] and one [b, M_g] per mask group; from a
    :class:`BufferRing`, ``slot`` ([worker, slot], to hand back). A batch that cannot be read becomes
    ``{"error": reason, "rows", "epoch", "index", "worker"}`` so the trainer counts it and goes on.
    """

    def __init__(self, spec: StreamSpec, ring: BufferRing | None = None) -> None:
        self.spec = spec
        self.ring = ring
        self._store: LatentStore | None = None
        self._checksums: ChecksumCache | None = None  # the worker's, kept for the run: read once per chunk

    def positions(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(epoch, index, this rank's rows)`` of every remaining global batch, in order. A global batch
        is sorted (read locality) before it is sliced, so sample i and its mask i are the same for any K."""
        spec = self.spec
        lo, hi = spec.rank * spec.local_batch, (spec.rank + 1) * spec.local_batch
        for epoch in range(spec.start.epoch, spec.epochs):
            rows = epoch_views(spec.rows, spec.views_per_clip, spec.seed, epoch)
            order = epoch_order(rows, spec.shard_rows, spec.seed, epoch, spec.shuffle_buffer)
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

    def store(self) -> LatentStore:
        if self._store is None:  # opened lazily, inside the worker process
            self._store = LatentStore.open(self.spec.store_path)
            self._checksums = ChecksumCache(self._store)
        return self._store

    def masks(self, epoch: int, index: int) -> dict[str, tuple[torch.Tensor, ...]]:
        """This rank's slice of global batch ``(epoch, index)``'s masks (none without ``mask_kind``)."""
        spec = self.spec
        if spec.mask_kind is None:
            return {}
        number = epoch * spec.steps_per_epoch + index  # the step that reads it, while none is skipped
        masks = make_masks(spec.mask_kind, spec.mask_ratio, spec.batch_size, spec.seed, number)
        lo, hi = spec.rank * spec.local_batch, (spec.rank + 1) * spec.local_batch
        masks = masks[lo:hi]
        return {"visible": masks.visible, "masked": masks.masked}

    def read_batch(self, epoch: int, index: int, rows: np.ndarray, worker: int) -> dict:
        slot = None
        try:
            store = self.store()
            n = len(rows)
            pixels_shape = (n, *store.arrays["pixels"].shape[1:])
            latents_shape = (n, *store.arrays["latents"].shape[1:]) if "latents" in self.spec.arrays else None
            if self.ring is not None and get_worker_info() is not None:
                slot, pixels, latents = self.ring.claim(worker, pixels_shape, latents_shape)
            elif get_worker_info() is not None:
                pixels = shared_buffer(pixels_shape, torch.uint8)
                latents = shared_buffer(latents_shape, torch.float16) if latents_shape else None
            else:
                pixels = torch.empty(pixels_shape, dtype=torch.uint8)
                latents = torch.empty(latents_shape, dtype=torch.float16) if latents_shape else None
            buffers = (pixels, latents) if latents is not None else (pixels,)
            read_rows(
                store,
                rows,
                self.spec.arrays,
                out=tuple(buffer.numpy() for buffer in buffers),
                check=self.spec.verify_checksums,
                checksums=self._checksums,
            )
            masks = self.masks(epoch, index)
        except Exception as exc:  # a damaged chunk or file: reported, counted, skipped
            if slot is not None:
                assert self.ring is not None  # a slot comes from the ring
                self.ring.release(worker, slot)
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return {"error": reason, "rows": torch.from_numpy(rows), "epoch": epoch, "index": index, "worker": worker}
        batch = {
            "pixels": pixels,
            **({"latents": latents} if latents is not None else {}),
            "rows": torch.from_numpy(rows),
            "epoch": epoch,
            "index": index,
            **masks,
        }
        if slot is not None:
            batch["slot"] = torch.tensor([worker, slot])
        return batch


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


def ring_slots(loader: TrainLoaderConfig) -> int:
    """Buffers per worker: its prefetched batches, the one it reads, and one the main process holds."""
    return loader.prefetch_factor + 2


def shm_bound(loader: TrainLoaderConfig, local_batch: int, teacher_width: int) -> int:
    """The /dev/shm the training loader holds: every worker's ring of batch buffers."""
    if loader.num_workers == 0:
        return 0
    return loader.num_workers * ring_slots(loader) * batch_bytes(local_batch, teacher_width)


def check_shm(
    loader: TrainLoaderConfig, local_batch: int, teacher_width: int, shm: Path = SHM_PATH, processes: int = 1
) -> None:
    """Refuse to start workers that would exhaust /dev/shm (a bus error mid-run, not an error message).
    ``processes``: the ranks on this node, whose loaders share its /dev/shm."""
    needed = processes * shm_bound(loader, local_batch, teacher_width)
    if needed == 0 or not shm.is_dir():
        return
    free = shutil.disk_usage(shm).free
    if needed > free:
        raise SaltUsageError(
            f"the loader can hold up to {format_bytes(needed)} in {shm} "
            f"({processes} rank(s) x {loader.num_workers} workers x {ring_slots(loader)} batches x "
            f"{format_bytes(batch_bytes(local_batch, teacher_width))}) "
            f"but only {format_bytes(free)} is free: lower train_loader.num_workers, train_loader.prefetch_factor "
            "or train.batch_size, "
            "or give the container more shared memory (docker run --shm-size)"
        )


def make_loader(spec: StreamSpec, loader: TrainLoaderConfig, pin_memory: bool, ring: bool = False) -> DataLoader:
    """A DataLoader over :class:`StoreStream`: batches are formed by the stream, so ``batch_size=None``.

    One iterator spans the whole run (epochs included), so ``persistent_workers`` has nothing to keep.
    ``ring``: workers read into a :class:`BufferRing` (with workers only); its consumer must hand
    each batch back (:class:`salt_train.feed.BatchFeed` does, and pins the buffers itself, so the
    DataLoader's pinning copy is off).
    """
    workers = loader.num_workers
    buffers = BufferRing(workers, ring_slots(loader)) if ring and workers else None
    if workers:
        share_temp_dir()  # a worker killed by a stop leaves no temp folder of its own
    return DataLoader(
        StoreStream(spec, buffers),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory and buffers is None,
        prefetch_factor=loader.prefetch_factor if workers else None,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        worker_init_fn=worker_init if workers else None,  # die with the main process; Ctrl-C is its to handle
    )


def normalised_pixels(views: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[B, 16, 224, 224, 3]`` -> ImageNet-normalised float32 ``[B, 3, 16, 224, 224]`` on the device
    (autocast takes it to bf16 on CUDA)."""
    mean, std = geometry.pixel_statistics(device, (1, 3, 1, 1, 1))
    x = views.to(device, non_blocking=True).permute(0, 4, 1, 2, 3)
    return geometry.normalise_pixels(x, mean, std).contiguous()


def to_model_inputs(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixels and fp16 latents moved as they are (the loss normalises them in float32)."""
    return normalised_pixels(batch["pixels"], device), batch["latents"].to(device, non_blocking=True)
