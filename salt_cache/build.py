"""`salt-cache build`: decode views in DataLoader workers, run the teacher, write shards.

The pieces: ``loader`` plans shard-aligned teacher batches and decodes them in
workers; the main process keeps two teacher batches queued ahead of the host work
(so on CUDA the GPU never waits for bookkeeping); ``writer`` commits finished
shards on background threads while the next ones compute; ``identity`` keeps
one store to one teacher, view recipe and clip list.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from shared.config import PipelineConfig
from shared.console import format_bytes, print_block, progress
from shared.distributed import Dist, rank_share, warn_if_oversubscribed
from shared.errors import first_line
from shared.filesystem import build_lock
from shared.store import LatentStore

from salt_cache.disk_space import SpacePlan, check_space, plan_space
from salt_cache.fill import StoredViews, StoreSource
from salt_cache.identity import BuildSource, BuildTeacher, open_matching_store, open_or_create_store, store_identity
from salt_cache.loader import ViewBatches, decode_workers, make_loader, plan_batches
from salt_cache.repair import damaged_shards
from salt_cache.writer import ShardAssembler, ShardWriter, drop_nonfinite

log = logging.getLogger(__name__)


class Terminated(BaseException):
    """SIGTERM arrived (torchrun stops every rank this way when one fails); committed shards are intact.

    A BaseException, like KeyboardInterrupt: the ``except Exception`` that records a clip's decode
    failure must not record a stop as that clip's failure."""


_sigterm_received = threading.Event()


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread, so the build stops through its
    ``finally`` blocks (the shard writer finishes its commit) and says so, instead of vanishing.

    The raise can land inside a ``__del__`` or a weakref callback (garbage collection runs
    anywhere), where Python only prints it as "Exception ignored" and carries on. So the stop is
    also remembered, that print is kept quiet, and :func:`raise_if_stopped` raises it again at
    the build's next safe point."""

    def handle(signum: int, frame: object) -> None:
        _sigterm_received.set()
        raise Terminated("stopped by SIGTERM")

    def unraisable(hook: Any) -> None:
        if not isinstance(hook.exc_value, Terminated):
            previous_hook(hook)

    _sigterm_received.clear()
    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread (tests calling in-process from a thread)
        yield
        return
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


def raise_if_stopped() -> None:
    """Raise :class:`Terminated` if a SIGTERM arrived whose raise was swallowed (see :func:`stop_on_sigterm`)."""
    if _sigterm_received.is_set():
        raise Terminated("stopped by SIGTERM")


class DecodeWorkerDied(Exception):
    """A DataLoader worker was killed (signal, OOM killer); committed shards are intact."""


def worker_batches(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches, with a dead worker reported as such (clip errors never get here:
    ViewBatches records them per row), not as a broken pipe mistaken for a store error."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (RuntimeError, ConnectionError, EOFError) as exc:
            raise DecodeWorkerDied(f"a decode worker died ({first_line(exc)})") from exc
        yield batch


TEACHER_BATCHES_IN_FLIGHT = 2  # queued on the GPU while the host assembles an older one


@dataclass
class TeacherBatch:
    """A decoded batch whose latents are on their way back from the teacher."""

    batch: dict
    latents: torch.Tensor | None  # float16 [batch size, 1568, D] on the host once ``ready`` has fired
    ready: torch.cuda.Event | None
    finite: torch.Tensor | None = None  # bool [batch size], checked on the device (CUDA); None: on the host

    @property
    def size(self) -> int:
        return len(self.batch["errors"])

    def host_latents(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The latents on the host, and which rows are finite where the device said (else None: the
        shard copies check them, off the main thread)."""
        if self.ready is not None:
            self.ready.synchronize()
        if self.latents is None:
            return None, None
        return self.latents.numpy(), self.finite.numpy() if self.finite is not None else None


def launch_teacher(teacher: BuildTeacher, batch: dict) -> TeacherBatch:
    """Queue the teacher on the whole padded batch (failed rows are zeros: one shape for every
    batch); on CUDA the copy back is non-blocking too, and which rows are finite is decided there
    (a reduction on the device, 16 bytes back, no host pass over 64 MB of latents)."""
    if all(batch["errors"]):
        return TeacherBatch(batch, None, None)
    latents = teacher.encode(batch["pixels"])
    if latents.device.type != "cuda":
        return TeacherBatch(batch, latents, None)
    finite = torch.isfinite(latents).flatten(1).all(dim=1).to("cpu", non_blocking=True)
    host = latents.to("cpu", non_blocking=True)  # lands in pinned memory
    ready = torch.cuda.Event()
    ready.record()
    return TeacherBatch(batch, host, ready, finite)


class BatchCollector:
    """Logs failures, fills shard assemblers, and hands complete shards to the writer."""

    def __init__(self, store: LatentStore, source: BuildSource, writer: ShardWriter) -> None:
        self.store = store
        self.source = source
        self.writer = writer
        self.open_shards: dict[int, ShardAssembler] = {}
        self.decode_failed = 0
        self.nonfinite: list[int] = []  # rows whose latents the shard copies found not finite (CPU teacher)

    @property
    def failed(self) -> int:
        return self.decode_failed + len(self.nonfinite)

    def add(self, item: TeacherBatch) -> None:
        batch = item.batch
        latents, finite = item.host_latents()
        errors = drop_nonfinite(batch["errors"], finite)  # never commit NaN or inf (checked on the device)
        check_on_host = self.nonfinite if finite is None else None  # else the shard copies check them
        # The DataLoader's default_convert turns numpy arrays into tensors; index with numpy.
        rows, frame_index = np.asarray(batch["rows"]), np.asarray(batch["frame_index"])
        crop_box = np.asarray(batch["crop_box"])
        for row, error in zip(rows, errors, strict=False):
            if error:
                self.decode_failed += 1
                clip = self.source.clips[row // self.store.views_per_clip]
                log.warning(
                    "clip %s failed (row %d, %s, worker %s): %s", clip.clip_id, row, clip.path, batch["worker"], error
                )
        pixels = batch["pixels"].numpy()
        shard_of = rows // self.store.shard_rows
        for shard in np.unique(shard_of):  # a batch may span shards
            where = np.flatnonzero(shard_of == shard)
            at = slice(int(where[0]), int(where[-1]) + 1)  # rows are sorted: a view, not a copy
            shard = int(shard)
            if shard not in self.open_shards:
                self.open_shards[shard] = ShardAssembler.empty(self.store, shard, self.writer.buffers)
            assembler = self.open_shards[shard]
            assembler.add(
                rows[at],
                pixels[at],
                None if latents is None else latents[at],
                frame_index[at],
                errors[at],
                crop_box[at],
                self.writer.copier,
                check_on_host,
            )
            if assembler.complete:
                done = self.open_shards.pop(shard)
                self.writer.submit(done.payload, done.copies)


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
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # rank 0: (perf_counter, clips) per batch
    handed_over: float = 0.0  # rank 0: perf_counter once its last shard was with the writer (before the flush)
    host_cpu_seconds: float = 0.0  # rank 0: its main thread's CPU in the build loop, teacher launches excluded
    views_per_clip: int = 1  # rows per clip: the counts and rates below are per row

    def steady_clips_per_second(self, skip: int) -> float | None:
        """clips/s after the first ``skip`` batches (those decoded while the workers started), to the
        last shard handed to the writer: the final flush (the last few shards written after the
        input has ended) is no steady state. None with too few batches. ``salt-cache bench``
        compares it with decode-only."""
        if len(self.arrivals) <= skip + 1:
            return None
        started = self.arrivals[skip][0]
        return sum(clips for _, clips in self.arrivals[skip + 1 :]) / (self.handed_over - started)

    @property
    def host_ms_per_clip(self) -> float:
        """The main thread's CPU per clip this run (rank 0): receiving batches, finiteness, shard
        assembly, hand-off to the writer; the teacher's own launches are not counted."""
        clips = sum(clips for _, clips in self.arrivals)
        return 1e3 * self.host_cpu_seconds / clips if clips else 0.0

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
            **(
                {"views per clip": f"{self.views_per_clip}: a row is one view, the figures above count rows"}
                if self.views_per_clip > 1
                else {}
            ),
        }


def run_build(
    source: BuildSource,
    teacher: BuildTeacher,
    config: PipelineConfig,
    out: Path,
    retry_failed: bool = False,
    dist: Dist = Dist(),
    force: bool = False,
    repair: bool = False,
) -> BuildReport:
    """Build (or resume) the store at ``out``; returns counts and rates.

    A finished store is only read (a rerun on a read-only mount works); any writing happens
    under the store's lock. ``retry_failed`` also redoes the shards that hold failed rows; ``repair``
    the committed shards verify's row checks find damaged (salt_cache/repair.py).
    A build whose rows to write could need more than the free disk space is refused before
    anything is written, unless ``force`` (salt_cache/disk_space.py).

    Under torchrun, rank 0 takes the lock, creates or opens the store and lists the pending
    shards; each rank then builds its contiguous share of them (shard files are per shard,
    so ranks never write the same file). Rank 0 alone reads the store's counts, reports and
    writes the attributes, and every rank gets its report. A resume lists what is pending
    again, so it works with any number of ranks.
    """
    identity = store_identity(teacher, config, source)
    damaged: list[int] = []  # with ``repair``: found by rank 0's survey, redone with the pending ones

    def report_finished() -> BuildReport:
        store = LatentStore.open(out)
        _print_plan(store, source, teacher, config, [], 0, dist, _space_plan(out, store, [], source, teacher, config))
        return _report(store, todo=0, failed=0, seconds=0.0, write_mb_per_s=0.0)

    def survey() -> SpacePlan | None:  # rank 0, before anything is written; None: nothing left to build
        store = open_matching_store(out, identity, False) if out.exists() else None
        if store is not None and repair:
            damaged.extend(damaged_shards(store))
            log.info("--repair: %d damaged shard(s) to rebuild%s", len(damaged), f": {damaged[:20]}" if damaged else "")
        pending = sorted({*store.pending_shards(retry_failed), *damaged}) if store is not None else []
        if store is not None and not pending:
            return None
        plan = _space_plan(out, store, pending, source, teacher, config)
        check_space(plan, force)
        return plan

    # Rank 0 decides: the others must not look at a store it may be creating meanwhile.
    space = dist.on_main(survey)
    if space is None:
        return dist.on_main(report_finished)
    with ExitStack() as held:

        def prepare() -> list[int]:  # rank 0: lock, create or open, clean up, list the work
            held.enter_context(build_lock(out))
            store = open_or_create_store(out, teacher, config, source)
            store.remove_partial_files()  # what a killed writer left; nobody else writes now
            return sorted({*store.pending_shards(retry_failed), *damaged})

        pending = dist.on_main(prepare)
        warn_if_oversubscribed(
            dist, decode_workers(config.build_loader, dist.local_world_size), "build_loader.num_workers"
        )
        store = dist.agree(lambda: open_matching_store(out, identity, writable=True))
        shards = rank_share(pending, dist.rank, dist.world_size)
        if dist.is_main:
            _print_plan(store, source, teacher, config, pending, _rows_in(store, pending), dist, space, len(damaged))
        started = time.perf_counter()
        mine = _build_shards(store, source, teacher, config, shards, dist)
        raise_if_stopped()  # a SIGTERM whose raise was swallowed stops here, not at the barrier
        # Wait for every rank's shards; then the store's counts are final.
        done = dist.all_gather(mine)

        def finish() -> BuildReport:  # rank 0; the others wait for its report (and so for the attributes)
            report = _report(
                store,
                todo=sum(work.todo for work in done),
                failed=sum(work.failed for work in done),
                seconds=time.perf_counter() - started,
                write_mb_per_s=sum(work.write_mb_per_s for work in done),
            )
            report.arrivals, report.handed_over = mine.arrivals, mine.handed_over
            report.host_cpu_seconds = mine.host_cpu_seconds
            if report.pending == 0:
                store.update_attrs(
                    build={
                        "complete": True,
                        "committed": report.committed,
                        "failed": report.failed,
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    }
                )
            return report

        return dist.on_main(finish)


def _rows_in(store: LatentStore, shards: list[int]) -> int:
    return sum(stop - start for start, stop in map(store.shard_range, shards))


def _space_plan(
    out: Path,
    store: LatentStore | None,
    pending: list[int],
    source: BuildSource,
    teacher: BuildTeacher,
    config: PipelineConfig,
) -> SpacePlan:
    """The store's projected size and what the ``pending`` shards need; ``store`` None: one yet to create."""
    views, shard_rows = config.view.views_per_clip, config.store.shard_rows
    if store is None:
        rows = todo = len(source.clips) * views
        shards = -(-rows // shard_rows)
    else:
        rows, todo, shards = store.rows, _rows_in(store, pending), len(pending)
    return plan_space(out, rows, todo, shards, teacher.width, views, config.store.pixels_zstd_level)


def _print_plan(
    store: LatentStore,
    source: BuildSource,
    teacher: BuildTeacher,
    config: PipelineConfig,
    shards: list[int],
    todo: int,
    dist: Dist,
    space: SpacePlan,
    damaged: int = 0,
) -> None:
    counts = store.counts()
    views = store.views_per_clip
    print_block(
        "salt-cache build",
        {
            **source.describe(),
            "store": f"{store.path} ({counts['committed']} committed, {counts['failed']} failed, {todo} to do"
            + (f"; {counts['other']} rows with an unknown status, redone" if counts["other"] else "")
            + (f"; {damaged} damaged shard(s) rebuilt (--repair)" if damaged else "")
            + ")",
            **(
                {
                    "views": f"{views} per clip: {counts['rows']} rows = {counts['rows'] // views} clips x {views} "
                    "(view 0 the centre view, the others random resized crops)"
                }
                if views > 1
                else {}
            ),
            "store size": space.describe(),
            "teacher": f"{teacher.name} (width {teacher.width}, {teacher.compute_dtype}, "
            f"hash {teacher.weights_hash[:12]})",
            "device": teacher.device,
            "shards": f"{store.num_shards} of {store.shard_rows} rows, {len(shards)} to do",
            "loader": (
                f"workers={decode_workers(config.build_loader, dist.local_world_size)}"
                f"{' (auto)' if config.build_loader.num_workers == 'auto' else ''} "
                f"prefetch={config.build_loader.prefetch_factor} "
                f"pin_memory={config.build_loader.pin_memory and teacher.device.type == 'cuda'} "
                f"persistent={config.build_loader.persistent_workers} "
                f"context={config.build_loader.multiprocessing_context} "
                f"decode_threads={config.build_loader.decode_threads}"
            ),
            "teacher batch": config.teacher.batch_size,
            **(
                {
                    "ranks": f"{dist.world_size} (torchrun), each building a contiguous share of the shards to do; "
                    f"the bar shows rank 0's share"
                }
                if dist.enabled
                else {}
            ),
        },
    )


@dataclass
class RankWork:
    """What one rank did: summed over ranks for the report."""

    todo: int
    failed: int
    write_mb_per_s: float
    arrivals: list[tuple[float, int]]
    handed_over: float  # perf_counter once the last shard was handed to the writer (before its final flush)
    host_cpu_seconds: float  # the main thread's CPU time in the build loop, the teacher's launches left out


def _build_shards(
    store: LatentStore,
    source: BuildSource,
    teacher: BuildTeacher,
    config: PipelineConfig,
    shards: list[int],
    dist: Dist,
) -> RankWork:
    """Decode, encode and commit ``shards`` (this rank's share of the pending ones)."""
    plans = plan_batches(store, shards, config.teacher.batch_size)
    todo = sum(len(plan.rows) for plan in plans)
    writer = ShardWriter(store, config.store.writers)
    arrivals: list[tuple[float, int]] = []
    collector = BatchCollector(store, source, writer)
    if plans:
        dataset = (
            StoredViews(source.store.path, plans, config.teacher.batch_size)
            if isinstance(source, StoreSource)
            else ViewBatches(
                source.clips, plans, config.view, config.build_loader.decode_threads, config.teacher.batch_size
            )
        )  # --from-store reads its views, never decodes
        label = f"teacher, rank 0 of {dist.world_size}" if dist.enabled else "teacher"
        bar = progress(todo, label, unit="clip")
        in_flight: deque[TeacherBatch] = deque()
        cpu_started, teacher_cpu = time.thread_time(), 0.0

        def collect(item: TeacherBatch) -> None:
            collector.add(item)
            bar.update(item.size)
            bar.set_postfix(failed=collector.failed, refresh=False)

        try:
            for batch in worker_batches(make_loader(dataset, config, teacher.device, dist.local_world_size)):
                raise_if_stopped()
                arrivals.append((time.perf_counter(), len(batch["rows"])))
                launched = time.thread_time()
                in_flight.append(launch_teacher(teacher, batch))  # asynchronous on CUDA
                teacher_cpu += time.thread_time() - launched
                if len(in_flight) > TEACHER_BATCHES_IN_FLIGHT:
                    collect(in_flight.popleft())  # host work for batch k-2 overlaps the GPU on k-1 and k
            raise_if_stopped()
            while in_flight:
                collect(in_flight.popleft())
            handed_over = time.perf_counter()  # every shard is with the writer: the final flush starts
            host_cpu = time.thread_time() - cpu_started - teacher_cpu
        finally:
            bar.close()
            writer.close()
    else:
        handed_over, host_cpu = time.perf_counter(), 0.0
    rate = writer.bytes_written / 1e6 / writer.seconds if writer.seconds else 0.0
    return RankWork(todo, collector.failed, rate, arrivals, handed_over, host_cpu)


def _report(store: LatentStore, todo: int, failed: int, seconds: float, write_mb_per_s: float) -> BuildReport:
    counts = store.counts()
    return BuildReport(
        rows=counts["rows"],
        committed=counts["committed"],
        failed=counts["failed"],
        pending=counts["pending"],
        processed_this_run=todo,
        failed_this_run=failed,
        seconds=seconds,
        disk_bytes=store.disk_bytes(),
        write_mb_per_s=write_mb_per_s,
        views_per_clip=store.views_per_clip,
    )
