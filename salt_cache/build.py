"""`salt-cache build`: decode views in DataLoader workers, run the teacher, write shards.

Work unit: a shard of the store. Each shard is cut into teacher batches of at
most ``teacher.batch_size`` rows that never cross a shard boundary, so a
resumed build forms exactly the same batches as an uninterrupted one (and on
CPU computes bit-identical latents). Workers decode whole batches; the main
process runs the teacher; a writer thread commits finished shards while the
next ones compute.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from shared import geometry
from shared.config import PipelineConfig, ViewConfig, dump_pipeline
from shared.console import format_bytes, print_block, progress
from shared.errors import SaltUsageError
from shared.store import LatentStore, RowStatus, ShardPayload, create_store, pixels_shape
from salt_cache.source import ClipRecord, SsV2Source
from salt_cache.teacher import Teacher
from salt_cache.video import MIN_DECODED_SHARE, ClipDecodeError, decode_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    shard: int
    rows: tuple[int, ...]


def plan_batches(store: LatentStore, shards: list[int], batch_size: int) -> list[BatchPlan]:
    """Teacher batches for the given shards, aligned to shard starts."""
    plans = []
    for shard in shards:
        start, stop = store.shard_range(shard)
        for first in range(start, stop, batch_size):
            plans.append(BatchPlan(shard, tuple(range(first, min(first + batch_size, stop)))))
    return plans


class ViewBatches(Dataset):
    """Item k decodes the clips of batch plan k (runs inside a DataLoader worker)."""

    def __init__(self, clips: list[ClipRecord], plans: list[BatchPlan], view: ViewConfig, decode_threads: int) -> None:
        self.clips = clips
        self.plans = plans
        self.view = view
        self.decode_threads = decode_threads

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, k: int) -> dict:
        plan = self.plans[k]
        n = len(plan.rows)
        pixels = np.zeros(pixels_shape(n), dtype=np.uint8)
        frame_index = np.full((n, geometry.NUM_FRAMES), -1, dtype=np.int32)
        errors = [""] * n
        for i, row in enumerate(plan.rows):
            clip = self.clips[row]
            try:
                pixels[i], frame_index[i] = decode_view(clip.path, clip.clip_id, self.view.sampling,
                                                        self.view.interpolation, self.decode_threads)
            except ClipDecodeError as exc:
                errors[i] = str(exc)
            except Exception as exc:  # a decoder bug must not kill the build: record it
                errors[i] = f"unexpected {type(exc).__name__}: {exc}"
        info = get_worker_info()
        return {
            "shard": plan.shard,
            "rows": np.asarray(plan.rows, dtype=np.int64),
            "pixels": torch.from_numpy(pixels),
            "frame_index": frame_index,
            "errors": errors,
            "worker": info.id if info is not None else "main",
        }


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


@dataclass
class TeacherBatch:
    """A decoded batch whose latents are on their way back from the teacher."""

    batch: dict
    latents: torch.Tensor | None  # float16 [ok rows, 1568, D] on the host once ``ready`` has fired
    ready: torch.cuda.Event | None

    @property
    def size(self) -> int:
        return len(self.batch["errors"])

    def host_latents(self) -> np.ndarray | None:
        if self.ready is not None:
            self.ready.synchronize()
        return None if self.latents is None else self.latents.numpy()


def launch_teacher(teacher: Teacher, batch: dict) -> TeacherBatch:
    """Queue the teacher on the batch's decodable clips; on CUDA the copy back is non-blocking too."""
    ok = torch.tensor([not error for error in batch["errors"]])
    if not ok.any():
        return TeacherBatch(batch, None, None)
    latents = teacher.encode(batch["pixels"][ok])
    if latents.device.type != "cuda":
        return TeacherBatch(batch, latents, None)
    host = latents.to("cpu", non_blocking=True)  # lands in pinned memory
    ready = torch.cuda.Event()
    ready.record()
    return TeacherBatch(batch, host, ready)


class BatchCollector:
    """Logs failures, fills shard assemblers, and hands complete shards to the writer."""

    def __init__(self, store: LatentStore, source: SsV2Source, writer: "ShardWriter") -> None:
        self.store = store
        self.source = source
        self.writer = writer
        self.open_shards: dict[int, ShardAssembler] = {}
        self.failed = 0

    def add(self, item: TeacherBatch) -> None:
        batch = item.batch
        errors = batch["errors"]
        # The DataLoader's default_convert turns numpy arrays into tensors; index with numpy.
        rows, frame_index = np.asarray(batch["rows"]), np.asarray(batch["frame_index"])
        for row, error in zip(rows, errors):
            if error:
                self.failed += 1
                clip = self.source.clips[row]
                log.warning("clip %s failed (row %d, %s, worker %s): %s",
                            clip.clip_id, row, clip.path, batch["worker"], error)
        shard = int(batch["shard"])
        if shard not in self.open_shards:
            self.open_shards[shard] = ShardAssembler.empty(self.store, shard)
        assembler = self.open_shards[shard]
        assembler.add(rows, batch["pixels"].numpy(), item.host_latents(), frame_index, errors)
        if assembler.complete:
            self.writer.submit(self.open_shards.pop(shard).payload)


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


def store_identity(teacher: Teacher, config: PipelineConfig, source: SsV2Source) -> dict[str, object]:
    """What must match for a build to add rows to an existing store."""
    ids = "\n".join(clip.clip_id for clip in source.clips).encode()
    return {
        "teacher_weights_hash": teacher.weights_hash,
        "teacher_compute_dtype": teacher.compute_dtype,
        "view": view_attrs(config),
        "rows_sha256": hashlib.sha256(ids).hexdigest(),
    }


def view_attrs(config: PipelineConfig) -> dict[str, object]:
    return {
        "sampling": config.view.sampling,
        "sampling_rule": "16 equal segments of [0, n), one frame each; offset 0.5 (center) "
                         "or uniform from numpy default_rng(blake2b-64(clip_id)) (jitter); "
                         "clips shorter than 16 frames take offset 0.5, so every frame appears and repeats pad",
        "resize": f"short side to {geometry.IMAGE_SIZE}, swscale {config.view.interpolation} (antialiased)",
        "crop": f"centre {geometry.IMAGE_SIZE}x{geometry.IMAGE_SIZE}",
        "mean": list(geometry.PIXEL_MEAN),
        "std": list(geometry.PIXEL_STD),
        "truncation_rule": f"fail when under {MIN_DECODED_SHARE:.0%} of the declared duration decodes",
    }


def _describe_mismatch(found: dict, wanted: dict) -> str:
    keys = [k for k in wanted if found.get(k) != wanted[k]]
    messages = {
        "teacher_weights_hash": "another teacher",
        "teacher_compute_dtype": "another teacher precision",
        "view": "another view recipe",
        "rows_sha256": "another clip list (split, --limit or source)",
    }
    return ", ".join(messages.get(k, k) for k in keys)


def open_or_create_store(out: Path, teacher: Teacher, config: PipelineConfig, source: SsV2Source) -> LatentStore:
    identity = store_identity(teacher, config, source)
    if out.exists():
        store = LatentStore.open(out, writable=True)
        found = store.attrs.get("identity", {})
        if found != identity:
            raise SaltUsageError(
                f"store {out} was built with {_describe_mismatch(found, identity)} "
                f"(teacher {store.attrs.get('teacher', {}).get('name')}); refusing to mix. "
                "Pass a new --out, or delete the store to rebuild it"
            )
        return store
    return create_store(
        out,
        clip_ids=[clip.clip_id for clip in source.clips],
        labels=[clip.label for clip in source.clips],
        teacher_width=teacher.width,
        shard_rows=config.store.shard_rows,
        pixels_zstd_level=config.store.pixels_zstd_level,
        attrs={
            "identity": identity,
            "teacher": teacher.identity(),
            "view": view_attrs(config),
            "source": source.to_attrs(),
            "pipeline": dump_pipeline(config),
            "versions": {"torch": torch.__version__, "zarr": __import__("zarr").__version__,
                         "av": __import__("av").__version__,
                         "transformers": __import__("transformers").__version__},
        },
    )


def make_loader(dataset: ViewBatches, config: PipelineConfig, device: torch.device) -> DataLoader:
    settings = config.loader
    kwargs: dict = {"batch_size": None, "shuffle": False, "num_workers": settings.num_workers,
                    "pin_memory": settings.pin_memory and device.type == "cuda"}
    if settings.num_workers > 0:
        context = settings.multiprocessing_context
        if context not in multiprocessing.get_all_start_methods():
            context = "spawn"
        kwargs.update(prefetch_factor=settings.prefetch_factor, persistent_workers=settings.persistent_workers,
                      multiprocessing_context=context)
    return DataLoader(dataset, **kwargs)


@dataclass
class BuildReport:
    rows: int
    committed: int
    failed: int
    pending: int
    processed_this_run: int
    failed_this_run: int
    seconds: float
    disk_bytes: int
    write_mb_per_s: float

    @property
    def clips_per_second(self) -> float:
        return self.processed_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_clip(self) -> float:
        return self.disk_bytes / self.committed if self.committed else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "committed": self.committed,
            "failed": self.failed,
            "pending": self.pending,
            "clips this run": f"{self.processed_this_run} ({self.failed_this_run} failed)",
            "clips/s": f"{self.clips_per_second:.2f}",
            "bytes per clip": format_bytes(self.bytes_per_clip),
            "store size": format_bytes(self.disk_bytes),
            "write MB/s": f"{self.write_mb_per_s:.1f}",
        }


def run_build(source: SsV2Source, teacher: Teacher, config: PipelineConfig, out: Path) -> BuildReport:
    """Build (or resume) the store at ``out``; returns counts and rates."""
    store = open_or_create_store(out, teacher, config, source)
    shards = store.pending_shards()
    plans = plan_batches(store, shards, config.teacher.batch_size)
    todo = sum(len(plan.rows) for plan in plans)
    counts = store.counts()
    print_block("salt-cache build", {
        **source.describe(),
        "store": f"{out} ({counts['committed']} committed, {counts['failed']} failed, {todo} to do)",
        "teacher": f"{teacher.name} (width {teacher.width}, {teacher.compute_dtype}, hash {teacher.weights_hash[:12]})",
        "device": teacher.device,
        "shards": f"{store.num_shards} of {store.shard_rows} rows, {len(shards)} to do",
        "loader": (f"workers={config.loader.num_workers} prefetch={config.loader.prefetch_factor} "
                   f"pin_memory={config.loader.pin_memory and teacher.device.type == 'cuda'} "
                   f"persistent={config.loader.persistent_workers} context={config.loader.multiprocessing_context}"),
        "teacher batch": config.teacher.batch_size,
    })
    started = time.perf_counter()
    writer = ShardWriter(store)
    collector = BatchCollector(store, source, writer)
    if plans:
        dataset = ViewBatches(source.clips, plans, config.view, config.loader.decode_threads)
        bar = progress(todo, "teacher", unit="clip")
        in_flight: TeacherBatch | None = None
        try:
            for batch in make_loader(dataset, config, teacher.device):
                current = launch_teacher(teacher, batch)  # asynchronous on CUDA
                if in_flight is not None:
                    collector.add(in_flight)  # host work for batch k-1 overlaps the GPU on batch k
                    bar.update(in_flight.size)
                in_flight = current
                bar.set_postfix(failed=collector.failed, refresh=False)
            if in_flight is not None:
                collector.add(in_flight)
                bar.update(in_flight.size)
        finally:
            bar.close()
            writer.close()
    seconds = time.perf_counter() - started
    counts = store.counts()
    if counts["pending"] == 0:
        store.update_attrs(build={"complete": True, "committed": counts["committed"], "failed": counts["failed"],
                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return BuildReport(
        rows=counts["rows"], committed=counts["committed"], failed=counts["failed"], pending=counts["pending"],
        processed_this_run=todo, failed_this_run=collector.failed, seconds=seconds, disk_bytes=store.disk_bytes(),
        write_mb_per_s=(writer.bytes_written / 1e6 / writer.seconds) if writer.seconds else 0.0,
    )
