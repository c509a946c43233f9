"""`salt-cache bench`: the figures behind EXPERIMENTS.md (rates, not pass/fail).

From one run, on the same clips:

- decode: a plain PyAV loop (decode every frame to RGB) against our view decode,
  one process; our decode through the DataLoader with N workers, in steady state
  and over a whole pass (worker start included, as in a build): **decode-only**;
- teacher: **teacher-only** clips/s at the batch size (after warm-up and compilation),
  TFLOP/s and the share of the GPU's measured bf16 matmul rate (on CUDA), plus how
  far bf16 and fp16 autocast land from fp32;
- **end-to-end**: a real build of the clips (decode workers, teacher, shard writers)
  into a scratch store, as a share of the slower of decode-only and teacher-only;
- store: shard write MB/s and bytes per clip on disk.

``--host-path`` replaces the teacher by :class:`HostPathTeacher` (fixed latents at the
production width, no compute): the build's host path (decode, assembly, checksums,
zstd, durable writes) at D=1280, measurable on any machine.
"""

from __future__ import annotations

import dataclasses
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
from shared.config import PipelineConfig, TeacherAttention, TeacherCompileMode
from shared.console import format_bytes
from shared.distributed import Dist
from shared.errors import SaltUsageError
from shared.flops import matmul_tflops, vit_forward_flops
from shared.ssv2 import ClipRecord, SsV2Source, discover
from shared.store import RowStatus, ShardPayload, create_store, pixels_shape
from shared.teacher import Teacher, load_teacher
from shared.video import ClipDecodeError

from salt_cache.build import run_build
from salt_cache.identity import BuildTeacher
from salt_cache.loader import ViewBatches, decode_workers, make_loader, plan_batches
from salt_cache.video import decode_view

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
    decoded = 0
    views: list[np.ndarray] = []
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


@dataclass
class LoaderDecode:
    steady: float | None  # clips/s once the prefetch queue is primed; None with too few batches
    whole_pass: float  # clips/s from the loader's start to its last batch (worker start included)


def time_loader_decode(clips: list[ClipRecord], config: PipelineConfig, scratch: Path) -> LoaderDecode:
    """ViewBatches through a real DataLoader with the build's settings, timed two ways.

    Steady state: the first workers x prefetch_factor batches are decoded during worker
    start-up and arrive at once; that clock starts after them. Whole pass: like a build,
    from the loader's creation to its last batch. Rows that fail to decode are not counted.
    """
    batch_size = config.teacher.batch_size
    store = _scratch_store(scratch / "plan.zarr", len(clips), 1, config.store.shard_rows)
    plans = plan_batches(store, list(range(store.num_shards)), batch_size)
    warm = decode_workers(config.build_loader) * config.build_loader.prefetch_factor
    dataset = ViewBatches(clips, plans, config.view, config.build_loader.decode_threads, batch_size)
    total, count, steady_started = 0, 0, 0.0
    started = time.perf_counter()
    for k, batch in enumerate(make_loader(dataset, config, torch.device("cpu"))):
        decoded = sum(1 for error in batch["errors"] if not error)
        total += decoded
        if k == warm:
            steady_started = time.perf_counter()
        elif k > warm:
            count += decoded
    ended = time.perf_counter()
    steady = _rate(count, ended - steady_started) if len(plans) > warm + 1 else None
    return LoaderDecode(steady, _rate(total, ended - started))


class HostPathTeacher:
    """Stands in for the teacher (``--host-path``): the same fp16 latents at ``width`` for every
    batch, made once, so a build times only its host path at the production width."""

    def __init__(self, width: int, batch_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.latents = torch.randn(batch_size, geometry.NUM_TOKENS, width, generator=generator).half()
        self.width = width
        self.name = f"host-path stand-in (fixed random latents, D={width})"
        self.device = torch.device("cpu")
        self.compute_dtype = "none"
        self.weights_hash = "0" * 32
        self.final_norm = False

    def identity(self) -> dict[str, object]:
        return {
            "name": self.name,
            "weights_hash": self.weights_hash,
            "width": self.width,
            "compute_dtype": self.compute_dtype,
            "final_norm": self.final_norm,
        }

    def encode(self, views: torch.Tensor) -> torch.Tensor:
        return self.latents[: len(views)]


@dataclass
class BuildTiming:
    steady: float | None  # clips/s once the workers run, to the last shard handed to the writer
    whole: float  # clips/s over the whole build (worker start and the final flush included)
    host_ms_per_clip: float  # the main thread's CPU per clip, teacher launches excluded


def time_build(source: SsV2Source, teacher: BuildTeacher, config: PipelineConfig, scratch: Path) -> BuildTiming:
    """A real build of ``source`` into a scratch store, timed: in steady state (like the decode's,
    the final flush left out), over the whole build, and the main thread's host cost per clip."""
    report = run_build(source, teacher, config, scratch / "build.zarr", dist=Dist())
    warm = decode_workers(config.build_loader) * config.build_loader.prefetch_factor
    return BuildTiming(report.steady_clips_per_second(warm), report.clips_per_second, report.host_ms_per_clip)


def _scratch_store(path: Path, rows: int, width: int, shard_rows: int):
    return create_store(
        path,
        clip_ids=[str(i) for i in range(rows)],
        labels=[-1] * rows,
        teacher_width=width,
        shard_rows=shard_rows,
        pixels_zstd_level=1,
        attrs={"identity": {}, "teacher": {}},
    )


def time_teacher(teacher: Teacher, batch_size: int, repeats: int) -> float:
    views = torch.randint(
        0, 256, (batch_size, geometry.NUM_FRAMES, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE, 3), dtype=torch.uint8
    )
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
    views = torch.randint(
        0,
        256,
        (batch_size, geometry.NUM_FRAMES, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE, 3),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.uint8,
    )
    saved = teacher.compute_dtype
    results = {}
    try:
        teacher.compute_dtype = "float32"
        reference = teacher.encode(views, reference=True).float()
        for dtype in ("bfloat16", "float16"):
            teacher.compute_dtype = dtype
            latents = teacher.encode(views, reference=True).float()
            results[dtype] = float((latents - reference).norm() / reference.norm())
    finally:
        teacher.compute_dtype = saved
    return results


def time_store_write(views: np.ndarray, width: int, shard_rows: int, scratch: Path) -> tuple[float, float]:
    """MB/s of durable shard writes of real pixels and random fp16 latents; bytes per row on disk."""
    rows = len(views)
    store = _scratch_store(scratch / "write.zarr", rows, width, shard_rows)
    latents = np.random.default_rng(0).standard_normal((rows, geometry.NUM_TOKENS, width)).astype(np.float16)
    started = time.perf_counter()
    for shard, start, stop in store.iter_shards():
        n = stop - start
        store.write_shard(
            ShardPayload(
                shard,
                views[start:stop],
                latents[start:stop],
                np.zeros((n, geometry.NUM_FRAMES), np.int32),
                np.full(n, RowStatus.COMMITTED, np.uint8),
                [""] * n,
            )
        )
    seconds = time.perf_counter() - started
    return (views.nbytes + latents.nbytes) / 1e6 / seconds, store.disk_bytes() / rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(
    batch_size: int,
    workers: int,
    writers: int,
    teacher_compile: TeacherCompileMode = "auto",
    teacher_attention: TeacherAttention = "auto",
) -> PipelineConfig:
    """The production recipe's build settings, with the bench's batch, workers, writers and the teacher's
    compilation and attention kernel."""
    config = PipelineConfig()
    config.teacher.compile_mode = teacher_compile
    config.teacher.attention = teacher_attention
    config.teacher.batch_size = batch_size
    config.build_loader.num_workers = workers
    config.build_loader.persistent_workers = False
    config.store.writers = writers
    return config


def run_bench(
    src: Path,
    clips: int,
    teacher_name: str,
    batch_size: int,
    workers: int,
    device: str,
    scratch: Path | None,
    host_path: bool = False,
    width: int = geometry.TEACHER_WIDTH_HUGE,
    writers: int = 4,
    teacher_compile: TeacherCompileMode = "auto",
    teacher_attention: TeacherAttention = "auto",
) -> tuple[dict[str, str], dict[str, float | None]]:
    """Printed figures, and the same as numbers, each with its unit in its name (``--json``; None: not measured)."""
    source = discover(src, "train", clips)
    config = bench_config(batch_size, workers, writers, teacher_compile, teacher_attention)
    figures: dict[str, str] = {
        "clips": "",
        "clips skipped (undecodable)": "",
        "torch threads": str(torch.get_num_threads()),
    }
    numbers: dict[str, float | None] = {
        "batch_size_clips": batch_size,
        "decode_workers_count": workers,
        "teacher_only_clips_per_s": None,
        "teacher_tflop_per_clip": None,
        "teacher_achieved_tflop_per_s": None,
        "matmul_bf16_tflop_per_s": None,
        "teacher_share_of_matmul_fraction": None,
    }
    work = Path(tempfile.mkdtemp(prefix="salt-bench-", dir=scratch))
    try:
        decode = time_decode(source.clips)
        if not decode.good:
            raise SaltUsageError(
                f"none of the {len(source.clips)} clips of {source.split_file} could be decoded "
                f"(missing or corrupt videos under {source.video_dir})"
            )
        figures["clips"] = str(len(decode.good))
        figures["clips skipped (undecodable)"] = str(len(decode.skipped))
        if decode.skipped:
            log.warning("bench skips %d undecodable clips (first: %s)", len(decode.skipped), decode.skipped[0])
        figures["decode, plain PyAV loop (1 proc)"] = f"{decode.plain:.1f} clips/s"
        figures["decode, salt view (1 proc)"] = f"{decode.ours:.1f} clips/s"
        loader = time_loader_decode(decode.good, config, work)
        numbers |= {
            "clips_count": len(decode.good),
            "clips_skipped_count": len(decode.skipped),
            "decode_plain_pyav_clips_per_s": decode.plain,
            "decode_salt_view_clips_per_s": decode.ours,
            "decode_only_clips_per_s": loader.steady,
            "decode_whole_pass_clips_per_s": loader.whole_pass,
        }
        label = f"DataLoader, {workers} workers, batch {batch_size}"
        figures[f"DECODE-ONLY ({label}, steady state)"] = (
            f"{loader.steady:.1f} clips/s"
            if loader.steady is not None
            else "n/a (needs more than workers x prefetch batches; use more --clips)"
        )
        figures[f"decode, {label}, whole pass (worker start included)"] = f"{loader.whole_pass:.1f} clips/s"

        if host_path:
            teacher: Teacher | HostPathTeacher = HostPathTeacher(width, batch_size)
            teacher_rate = float("inf")
            figures["TEACHER-ONLY"] = "n/a (--host-path: no teacher; the build's host path alone)"
        else:
            teacher = load_teacher(
                teacher_name,
                device=device,
                compile_mode=config.teacher.compile_mode,
                attention=config.teacher.attention,
            )
            # Before the first half-precision encode: that one converts the weights for good.
            drift = precision_drift(teacher, min(batch_size, 2))
            per_clip = vit_forward_flops(
                geometry.NUM_TOKENS,
                teacher.width,
                teacher.model.config.num_hidden_layers,
                teacher.model.config.intermediate_size / teacher.width,
            )
            teacher_rate = time_teacher(teacher, batch_size, repeats=3)  # warms up (compiles) for the build too
            figures["teacher"] = (
                f"{teacher.name} on {teacher.device} ({teacher.compute_dtype}, "
                f"compile {teacher.compile_mode}, attention {teacher.attention}), batch {batch_size}"
            )
            figures["TEACHER-ONLY"] = f"{teacher_rate:.2f} clips/s"
            figures["teacher FLOP per clip"] = f"{per_clip / 1e12:.3f} TFLOP"
            figures["teacher achieved"] = f"{teacher_rate * per_clip / 1e12:.2f} TFLOP/s"
            numbers |= {
                "teacher_only_clips_per_s": teacher_rate,
                "teacher_tflop_per_clip": per_clip / 1e12,
                "teacher_achieved_tflop_per_s": teacher_rate * per_clip / 1e12,
            }
            if teacher.device.type == "cuda":
                peak = matmul_tflops(teacher.device)
                numbers |= {
                    "matmul_bf16_tflop_per_s": peak,
                    "teacher_share_of_matmul_fraction": teacher_rate * per_clip / 1e12 / peak,
                }
                figures["GPU bf16 matmul (8192^3)"] = f"{peak:.0f} TFLOP/s"
                figures["teacher share of matmul rate"] = f"{teacher_rate * per_clip / 1e12 / peak:.0%}"
            figures["bf16 autocast vs fp32 (rel L2)"] = f"{drift['bfloat16']:.2e}"
            figures["fp16 autocast vs fp32 (rel L2)"] = f"{drift['float16']:.2e}"

        good = dataclasses.replace(source, clips=decode.good)  # the clips both decoders read
        build = time_build(good, teacher, config, work)
        slower = min(loader.steady or loader.whole_pass, teacher_rate)
        figures[f"END-TO-END build (D={teacher.width}, {writers} writers, steady state)"] = (
            f"{build.steady:.1f} clips/s = {build.steady / slower:.0%} of the slower of decode-only and teacher-only"
            if build.steady is not None
            else "n/a (too few batches; use more --clips)"
        )
        figures["end-to-end build, whole (worker start and final flush included)"] = f"{build.whole:.1f} clips/s"
        figures["MAIN-THREAD HOST COST (build loop CPU, teacher launches excluded)"] = (
            f"{build.host_ms_per_clip:.2f} ms/clip (budget 6; 200 clips/s needs under 5)"
        )
        numbers |= {
            "end_to_end_clips_per_s": build.steady,
            "end_to_end_whole_clips_per_s": build.whole,
            "end_to_end_share_of_slower_fraction": build.steady / slower if build.steady is not None else None,
            "main_thread_host_ms_per_clip": build.host_ms_per_clip,
        }

        write_rate, per_row = time_store_write(decode.views, teacher.width, shard_rows=4, scratch=work)
        figures["store write (durable shards, 1 thread)"] = f"{write_rate:.0f} MB/s"
        figures["bytes per clip on disk"] = f"{format_bytes(per_row)} (pixels zstd-1 + fp16 latents, D={teacher.width})"
        numbers |= {"store_write_mb_per_s": write_rate, "disk_bytes_per_clip": per_row}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures, numbers
