"""`salt-cache bench`: the figures behind EXPERIMENTS.md (rates, not pass/fail).

- decode: a plain PyAV loop (decode every frame to RGB) against our view decode,
  one process, and our decode through the DataLoader with N workers;
- teacher: clips/s at a batch size, TFLOP/s and the share of the GPU's measured
  bf16 matmul rate (on CUDA), plus how far bf16 and fp16 autocast land from fp32;
- store: shard write MB/s and bytes per clip on disk.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from shared import geometry
from shared.config import PipelineConfig
from shared.console import format_bytes
from shared.errors import SaltUsageError
from shared.flops import vit_forward_flops
from shared.store import RowStatus, ShardPayload, create_store, pixels_shape
from salt_cache.loader import ViewBatches, make_loader, plan_batches
from salt_cache.source import ClipRecord, discover
from shared.teacher import Teacher, load_teacher
from salt_cache.video import ClipDecodeError, decode_view

log = logging.getLogger(__name__)


def plain_pyav_decode(path: Path) -> int:
    """The baseline a user would write: decode every frame to an RGB array."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            return sum(1 for frame in container.decode(stream) if frame.to_ndarray(format="rgb24") is not None)
    except (av.FFmpegError, OSError, IndexError) as exc:  # IndexError: no video stream
        raise ClipDecodeError(f"plain PyAV decode failed: {exc}") from None


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


@dataclass
class DecodeTiming:
    plain: float  # clips/s, plain PyAV loop
    ours: float  # clips/s, decode_view
    good: list[ClipRecord]  # clips both decoders read
    skipped: list[str]  # ids of clips either decoder could not read (missing, corrupt, ...)
    views: np.ndarray  # the first few good views, for the store-write figure


def time_decode(clips: list[ClipRecord], keep_views: int = 16) -> DecodeTiming:
    """Time both decoders over ``clips``; a clip that fails either is skipped in every later phase."""
    failed: set[str] = set()
    decoded = 0
    started = time.perf_counter()
    for clip in clips:
        try:
            plain_pyav_decode(clip.path)
            decoded += 1
        except ClipDecodeError:
            failed.add(clip.clip_id)
    plain = _rate(decoded, time.perf_counter() - started)
    decoded, views = 0, []
    started = time.perf_counter()
    for clip in clips:
        try:
            view, _ = decode_view(clip.path, clip.clip_id)
            decoded += 1
        except ClipDecodeError:
            failed.add(clip.clip_id)
            continue
        if len(views) < keep_views:
            views.append(view)
    ours = _rate(decoded, time.perf_counter() - started)
    good = [clip for clip in clips if clip.clip_id not in failed]
    kept = np.stack(views) if views else np.empty(pixels_shape(0), np.uint8)
    return DecodeTiming(plain, ours, good, [c.clip_id for c in clips if c.clip_id in failed], kept)


def time_loader_decode(clips: list[ClipRecord], workers: int, batch_size: int, scratch: Path) -> float | None:
    """Steady-state clips/s of ViewBatches through a real DataLoader; None with too few clips.

    The first workers x prefetch_factor batches are decoded during worker start-up and arrive
    at once; the clock starts after them, so only batches produced at the running rate count.
    Rows that fail to decode are not counted.
    """
    config = PipelineConfig()
    config.loader.num_workers = workers
    config.loader.persistent_workers = False
    store = _scratch_store(scratch / "plan.zarr", len(clips), 1, batch_size)
    plans = plan_batches(store, list(range(store.num_shards)), batch_size)
    warm = workers * config.loader.prefetch_factor
    if len(plans) <= warm + 1:
        return None  # too few clips for a steady state
    dataset = ViewBatches(clips, plans, config.view, config.loader.decode_threads, batch_size)
    count, started = 0, 0.0
    for k, batch in enumerate(make_loader(dataset, config, torch.device("cpu"))):
        if k == warm:
            started = time.perf_counter()
        elif k > warm:
            count += sum(1 for error in batch["errors"] if not error)
    return _rate(count, time.perf_counter() - started)


def _scratch_store(path: Path, rows: int, width: int, shard_rows: int):
    return create_store(path, clip_ids=[str(i) for i in range(rows)], labels=[-1] * rows, teacher_width=width,
                        shard_rows=shard_rows, pixels_zstd_level=1, attrs={"identity": {}, "teacher": {}})


def time_teacher(teacher: Teacher, batch_size: int, repeats: int) -> float:
    views = torch.randint(0, 256, (batch_size, geometry.NUM_FRAMES, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE, 3),
                          dtype=torch.uint8)
    if teacher.device.type == "cuda":
        views = views.pin_memory()
    teacher.encode(views)  # warm-up: kernels, autotuning, allocator
    _sync(teacher.device)
    started = time.perf_counter()
    for _ in range(repeats):
        teacher.encode(views)
    _sync(teacher.device)
    return _rate(batch_size * repeats, time.perf_counter() - started)


def precision_drift(teacher: Teacher, batch_size: int) -> dict[str, float]:
    """Relative L2 distance of bf16 and fp16 autocast latents from fp32 on the same views."""
    views = torch.randint(0, 256, (batch_size, geometry.NUM_FRAMES, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE, 3),
                          generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    saved = teacher.compute_dtype
    results = {}
    try:
        teacher.compute_dtype = "float32"
        reference = teacher.encode(views).float()
        for dtype in ("bfloat16", "float16"):
            teacher.compute_dtype = dtype
            latents = teacher.encode(views).float()
            results[dtype] = float((latents - reference).norm() / reference.norm())
    finally:
        teacher.compute_dtype = saved
    return results


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def time_store_write(views: np.ndarray, width: int, shard_rows: int, scratch: Path) -> tuple[float, float]:
    """MB/s of durable shard writes of real pixels and random fp16 latents; bytes per row on disk."""
    rows = len(views)
    store = _scratch_store(scratch / "write.zarr", rows, width, shard_rows)
    latents = np.random.default_rng(0).standard_normal((rows, geometry.NUM_TOKENS, width)).astype(np.float16)
    started = time.perf_counter()
    for shard, start, stop in store.iter_shards():
        n = stop - start
        store.write_shard(ShardPayload(shard, views[start:stop], latents[start:stop],
                                       np.zeros((n, geometry.NUM_FRAMES), np.int32),
                                       np.full(n, RowStatus.COMMITTED, np.uint8), [""] * n))
    seconds = time.perf_counter() - started
    return (views.nbytes + latents.nbytes) / 1e6 / seconds, store.disk_bytes() / rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(src: Path, clips: int, teacher_name: str, batch_size: int, workers: int,
              device: str, scratch: Path | None) -> dict[str, str]:
    source = discover(src, "train", clips)
    figures: dict[str, str] = {"clips": "", "clips skipped (undecodable)": "",
                               "torch threads": str(torch.get_num_threads())}
    work = Path(tempfile.mkdtemp(prefix="salt-bench-", dir=scratch))
    try:
        decode = time_decode(source.clips)
        if not decode.good:
            raise SaltUsageError(f"none of the {len(source.clips)} clips of {source.split_file} could be decoded "
                                 f"(missing or corrupt videos under {source.video_dir})")
        figures["clips"] = str(len(decode.good))
        figures["clips skipped (undecodable)"] = str(len(decode.skipped))
        if decode.skipped:
            log.warning("bench skips %d undecodable clips (first: %s)", len(decode.skipped), decode.skipped[0])
        figures["decode, plain PyAV loop (1 proc)"] = f"{decode.plain:.1f} clips/s"
        figures["decode, salt view (1 proc)"] = f"{decode.ours:.1f} clips/s"
        if workers > 0:
            loader_rate = time_loader_decode(decode.good, workers, batch_size, work)
            figures[f"decode, DataLoader ({workers} workers, steady state)"] = (
                f"{loader_rate:.1f} clips/s" if loader_rate is not None
                else "n/a (needs more than workers x prefetch batches; use more --clips)")

        teacher = load_teacher(teacher_name, device=device)
        per_clip = vit_forward_flops(geometry.NUM_TOKENS, teacher.width, teacher.model.config.num_hidden_layers,
                                     teacher.model.config.intermediate_size / teacher.width)
        rate = time_teacher(teacher, batch_size, repeats=3)
        figures["teacher"] = f"{teacher.name} on {teacher.device} ({teacher.compute_dtype}), batch {batch_size}"
        figures["teacher clips/s"] = f"{rate:.2f}"
        figures["teacher FLOP per clip"] = f"{per_clip / 1e12:.3f} TFLOP"
        figures["teacher achieved"] = f"{rate * per_clip / 1e12:.2f} TFLOP/s"
        if teacher.device.type == "cuda":
            peak = matmul_tflops(teacher.device)
            figures["GPU bf16 matmul (8192^3)"] = f"{peak:.0f} TFLOP/s"
            figures["teacher share of matmul rate"] = f"{rate * per_clip / 1e12 / peak:.0%}"
        drift = precision_drift(teacher, min(batch_size, 2))
        figures["bf16 autocast vs fp32 (rel L2)"] = f"{drift['bfloat16']:.2e}"
        figures["fp16 autocast vs fp32 (rel L2)"] = f"{drift['float16']:.2e}"

        write_rate, per_row = time_store_write(decode.views, teacher.width, shard_rows=4, scratch=work)
        figures["store write (durable shards)"] = f"{write_rate:.0f} MB/s"
        figures["bytes per clip on disk"] = f"{format_bytes(per_row)} (pixels zstd-1 + fp16 latents, D={teacher.width})"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures
