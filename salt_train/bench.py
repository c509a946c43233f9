"""`salt-train bench`: what the loader and the step cost, in figures.

- raw read: the store's shard files read with plain ``read()`` (page cache warm):
  the ceiling for any loader on this machine;
- loader: clips/s of the training loader (configured workers, buffer ring, masks made
  in the workers, the configured ``pin_memory``, batches delivered on the device by
  :class:`BatchFeed`) on the same files;
- step from memory: one batch kept on the device, stepped repeatedly;
- step with the loader: the same step fed by the real loader. The gap is what
  the loader costs; on a GPU it should be ~0 (docs/DESIGN.md: "the loader never the bottleneck");
- FLOPs per clip of the configured student, the TFLOP/s the step reached and, on a GPU
  in ``shared.flops.PEAK_BF16_TFLOPS``, the fraction of its dense bf16 peak;
- ``--profile DIR``: a torch.profiler trace of a few steps from memory (chrome trace JSON).

``--synthetic N`` stores have pixels that compress like real video (zstd-1 about 1.8x).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from shared import geometry
from shared.config import PipelineConfig
from shared.console import format_bytes, progress
from shared.device import resolve_device
from shared.distributed import Dist
from shared.flops import peak_bf16_tflops
from shared.store import CHECKSUM_ALGORITHM, CHECKSUM_ARRAYS, LatentStore, RowStatus, ShardPayload, create_store

from salt_train.busy_time import union_us
from salt_train.data import check_stream, make_loader, ring_slots, stream_spec
from salt_train.feed import BatchFeed, batch_to_device
from salt_train.masks import mask_layout
from salt_train.model import student_flops_per_clip
from salt_train.step import Stepper, resolve_compile_mode, seeded_student

READ_BLOCK = 16 << 20


def realistic_pixels(rng: np.random.Generator, n: int, textured: float = 0.5) -> np.ndarray:
    """uint8 views ``[n, 16, 224, 224, 3]`` that zstd-1 compresses about 1.8x, as real frames do
    (docs/DESIGN.md: 1.3-3x): a static blocky scene, and over ``textured`` of the 16x16 patches a
    texture that changes every frame (noise zstd cannot shrink)."""
    size, frames = geometry.IMAGE_SIZE, geometry.NUM_FRAMES
    scene = rng.integers(0, 256, (n, 1, size // 8, size // 8, 3), dtype=np.uint8)
    views = np.broadcast_to(np.repeat(np.repeat(scene, 8, axis=2), 8, axis=3), (n, frames, size, size, 3)).copy()
    grid = size // geometry.PATCH_SIZE
    busy = rng.random((n, 1, grid, grid, 1)) < textured
    busy = np.repeat(np.repeat(busy, geometry.PATCH_SIZE, axis=2), geometry.PATCH_SIZE, axis=3)
    return np.where(busy, views + rng.integers(0, 32, views.shape, dtype=np.uint8), views)


def write_synthetic_store(
    path: Path, rows: int, teacher_width: int = geometry.TEACHER_WIDTH_HUGE, shard_rows: int = 16, seed: int = 0
) -> LatentStore:
    """A store of the production shape without running a teacher, to measure the loader anywhere.

    Pixels compress like real video (:func:`realistic_pixels`); latents are random fp16 at the
    teacher's width, like real ones incompressible.
    """
    checksums = {"algorithm": CHECKSUM_ALGORITHM, "arrays": dict(CHECKSUM_ARRAYS)}
    store = create_store(
        path,
        clip_ids=[f"synthetic-{r}" for r in range(rows)],
        labels=[-1] * rows,
        teacher_width=teacher_width,
        shard_rows=shard_rows,
        pixels_zstd_level=1,
        attrs={"teacher": {"name": "synthetic (random latents)"}, "checksums": checksums},
    )
    rng = np.random.default_rng(seed)
    for shard, start, stop in progress(
        store.num_shards, "synthetic store", unit="shard", iterable=list(store.iter_shards())
    ):
        n = stop - start
        latents = rng.standard_normal((n, geometry.NUM_TOKENS, teacher_width), dtype=np.float32).astype(np.float16)
        frames = np.tile(np.arange(geometry.NUM_FRAMES, dtype=np.int32), (n, 1))
        store.write_shard(
            ShardPayload(
                shard, realistic_pixels(rng, n), latents, frames, np.full(n, RowStatus.COMMITTED, np.uint8), [""] * n
            )
        )
    return store


def shard_files(store: LatentStore) -> list[Path]:
    return sorted(
        p
        for name in ("pixels", "latents")
        for p in (store.path / name).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )


def raw_read(files: list[Path]) -> tuple[int, float]:
    """Bytes read and seconds, reading every file start to end in 16 MB blocks."""
    total = 0
    started = time.perf_counter()
    for path in files:
        with path.open("rb", buffering=0) as handle:
            while chunk := handle.read(READ_BLOCK):
                total += len(chunk)
    return total, time.perf_counter() - started


LOADER_MIN_BATCHES = 40  # a loader rate over fewer batches (well under a second) is mostly noise


def training_feed(spec, config: PipelineConfig, device: torch.device) -> BatchFeed:
    """The loader exactly as `salt-train run` builds it, delivering batches on ``device``."""
    settings = config.train_loader
    loader = make_loader(spec, settings, pin_memory=settings.pin_memory and device.type == "cuda", ring=True)
    return BatchFeed(loader, device)


def ring_warmup(spec, config: PipelineConfig, timed: int) -> int:
    """Batches to take before timing: every buffer of every worker's ring once, so each is mapped (first
    touch) and, on CUDA, pinned by :class:`BatchFeed` outside the timed window (at the ssv2 recipe 64
    buffers, 6.4 GB, which the issue saw as much of a 19% gap), and the prefetch queue primed; fewer where
    the stream is short."""
    ring = config.train_loader.num_workers * ring_slots(config.train_loader)
    return max(2, min(ring, spec.remaining_batches - timed))


def loader_window(spec, config: PipelineConfig, batches: int, device: torch.device) -> tuple[int, float, float]:
    """Clips the training loader delivered on the device once every ring buffer had arrived (worker
    start and first-touch pinning excluded), and the wall-clock start and end of that window
    (comparable between the ranks of a node)."""
    batches = max(batches, LOADER_MIN_BATCHES)
    warmup = ring_warmup(spec, config, batches)
    loader = training_feed(spec, config, device)
    clips, started = 0, float("nan")
    for n, batch in enumerate(loader):
        if n == warmup:
            started = time.time()
        if n >= warmup:
            clips += len(batch["rows"])
        if n + 1 >= warmup + batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ended = time.time()
    loader.close()
    del loader
    return clips, started, ended


def step_rate(stepper: Stepper, batches, count: int, warmup: int = 2) -> float:
    """clips/s of ``count`` steps after ``warmup`` (compilation and autotuning excluded)."""
    clips, started = 0, None
    for n, batch in enumerate(batches):
        if n == warmup:
            if stepper.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        result = stepper.step(batch, n)
        if n >= warmup:
            clips += result.clips
        if n + 1 >= warmup + count:
            break
    if stepper.device.type == "cuda":
        torch.cuda.synchronize()
    assert started is not None  # the batches outlast the warmup
    return clips / (time.perf_counter() - started)


PROFILE_TOP = 10  # kernels (CUDA) or operators (CPU) in the profile table


def profile_steps(stepper: Stepper, batch: dict, out: Path, steps: int = 4) -> tuple[Path, dict]:
    """A torch.profiler chrome trace of ``steps`` steps on one batch (after the measured ones: warm), and
    its summary (:func:`profile_summary`)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if stepper.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"salt-train-step-{stepper.device.type}.json"
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        for n in range(steps):
            with torch.profiler.record_function(f"step {n}"):
                stepper.step(batch, n)
        if stepper.device.type == "cuda":
            torch.cuda.synchronize(stepper.device)
    profiler.export_chrome_trace(str(trace))
    return trace, profile_summary(profiler.events(), stepper.device.type == "cuda", steps)


def profile_summary(events, on_cuda: bool, steps: int) -> dict:
    """The steps' top kernels by device time (CUDA; on CPU the top operators by CPU time) and how busy the
    device was: the union of kernel (CPU: ``aten::`` operator) time over the window of the profiled steps."""
    step_events = [e for e in events if e.name.startswith("step ") and e.device_type.name == "CPU"]
    if on_cuda:  # kernels, copies and sets; not the GPU-side copies of the "step n" annotations
        work = [
            e
            for e in events
            if e.device_type.name == "CUDA"
            and not e.name.startswith("step ")
            and not getattr(e, "is_user_annotation", False)
        ]
        total_us = lambda e: e.time_range.elapsed_us()  # noqa: E731
    else:
        work = [e for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::")]
        total_us = lambda e: e.self_cpu_time_total  # noqa: E731
    if not step_events or not work:
        return {"top": [], "busy_fraction": None, "kernels_per_step_count": None, "window_ms_per_step": None}
    window_start = min(e.time_range.start for e in step_events)
    window_end = max(max(e.time_range.end for e in step_events), max(e.time_range.end for e in work))
    busy = union_us([(e.time_range.start, e.time_range.end) for e in work]) / max(1.0, window_end - window_start)
    per_name: dict[str, list[float]] = {}
    for event in work:
        per_name.setdefault(event.name, []).append(total_us(event))
    total = sum(sum(times) for times in per_name.values()) or 1.0
    ranked = sorted(per_name.items(), key=lambda item: -sum(item[1]))[:PROFILE_TOP]
    top = [
        {
            "name": name[:120],
            "ms_per_step": sum(times) / 1e3 / steps,
            "calls_per_step_count": len(times) / steps,
            "share_fraction": sum(times) / total,
        }
        for name, times in ranked
    ]
    kernels = len(work) / steps if on_cuda else None
    return {
        "top": top,
        "busy_fraction": min(1.0, busy),
        "kernels_per_step_count": kernels,
        "window_ms_per_step": (window_end - window_start) / 1e3 / steps,
    }


def repeat(batch: dict):
    while True:
        yield batch


def run_bench(
    cache: Path, config: PipelineConfig, batches: int = 20, dist: Dist = Dist(), profile: Path | None = None
) -> tuple[dict[str, str], dict[str, float | dict | None]]:
    """Printed figures, and the same as numbers (``salt-train scaling`` compares them across K; None: no
    bf16 peak known for this device; ``profile``: the profile summary, with ``--profile``).

    Under torchrun every rank runs its loader and its DDP step at the same time on its slice of
    the global batch: loader clips/s are summed over ranks, step clips/s count the global batch."""
    device = dist.device(resolve_device(config.train.device, "train.device"))
    store = dist.agree(lambda: LatentStore.open(cache))
    spec = stream_spec(store, config, rank=dist.rank, world_size=dist.world_size)
    dist.agree(lambda: check_stream(spec, store.path))
    files = shard_files(store)
    if dist.is_main:
        raw_read(files)  # warm the page cache
    raw = dist.broadcast(raw_read(files) if dist.is_main else None)
    assert raw is not None  # rank 0's read, on every rank
    raw_bytes, raw_seconds = raw
    rows_on_disk = max(1, store.rows)
    bytes_per_clip = raw_bytes / rows_on_disk
    dist.barrier()  # the loaders start together; the job's rate is all clips over the union of the windows
    windows = dist.all_gather(loader_window(spec, config, batches, device))
    loader_clips = sum(w[0] for w in windows) / (max(w[2] for w in windows) - min(w[1] for w in windows))

    stepper = Stepper(
        seeded_student(config, store.teacher_width),
        config.train,
        config.model,
        device,
        total_steps=10 * batches,
        dist=dist,
    )
    first = next(iter(make_loader(spec, config.train_loader.model_copy(update={"num_workers": 0}), pin_memory=False)))
    on_device = batch_to_device(first, device)
    memory_clips = step_rate(stepper, repeat(on_device), batches) * dist.world_size  # DDP keeps ranks in lockstep
    trace, profiled = (
        profile_steps(stepper, on_device, profile) if profile is not None and dist.is_main else (None, None)
    )
    loader = training_feed(spec, config, device)
    fed_warmup = ring_warmup(spec, config, batches) if device.type == "cuda" else 2  # CPU: nothing to pin
    fed_clips = step_rate(stepper, loader, batches, warmup=fed_warmup) * dist.world_size
    loader.close()
    del loader

    flops = student_flops_per_clip(config.model, store.teacher_width, mask_layout(config.mask.kind, config.mask.ratio))
    step_flops = flops["train_step"]
    ranks = f", {dist.world_size} ranks (torchrun): sums over ranks" if dist.enabled else ""
    figures = {
        "device": f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "") + ranks,
        "store": f"{cache} ({len(spec.rows)} committed rows, {format_bytes(bytes_per_clip)}/clip on disk)",
        "raw read (page cache)": f"{raw_bytes / raw_seconds / 1e6:.0f} MB/s = "
        f"{raw_bytes / raw_seconds / bytes_per_clip:.0f} clips/s",
        "loader": f"{loader_clips:.1f} clips/s ({config.train_loader.num_workers} workers"
        f"{' per rank' if dist.enabled else ''}, "
        f"batch {spec.batch_size}, checksums {'on' if spec.verify_checksums else 'off'})",
        "step, batch from memory": f"{memory_clips:.1f} clips/s",
        "step, batch from loader": f"{fed_clips:.1f} clips/s "
        f"({100 * (1 - fed_clips / memory_clips):.0f}% below memory)",
        "FLOPs per clip": ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops.items()),
        "achieved": achieved(memory_clips * step_flops, fed_clips * step_flops, device, dist.world_size),
        "student": f"{config.model.student} {dict(config.model.student_kwargs) or ''} mode {config.model.mode}, "
        f"compile {resolve_compile_mode(config.model.compile_mode, device)}",
    }
    if trace is not None:
        figures["profile"] = f"{trace} (chrome://tracing or https://ui.perfetto.dev)"
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    per_gpu_peak = peak[1] * dist.world_size if peak is not None else None
    numbers: dict[str, float | dict | None] = {
        "processes": dist.world_size,
        "threads": torch.get_num_threads(),
        "batch": spec.batch_size,
        "raw_read_clips_per_s": raw_bytes / raw_seconds / bytes_per_clip,
        "loader_clips_per_s": loader_clips,
        "step_memory_clips_per_s": memory_clips,
        "step_loader_clips_per_s": fed_clips,
        "step_memory_tflops": memory_clips * step_flops / 1e12,
        "step_loader_tflops": fed_clips * step_flops / 1e12,
        "train_step_gflop_per_clip": step_flops / 1e9,
        "peak_bf16_tflops": peak[1] if peak is not None else None,
        "step_memory_peak_fraction": memory_clips * step_flops / 1e12 / per_gpu_peak if per_gpu_peak else None,
        "step_loader_peak_fraction": fed_clips * step_flops / 1e12 / per_gpu_peak if per_gpu_peak else None,
    }
    if profiled is not None:
        numbers["profile"] = profiled
    return figures, numbers


def achieved(memory_flops: float, fed_flops: float, device: torch.device, gpus: int = 1) -> str:
    """TFLOP/s of the step from memory and from the loader (the job's), and per GPU their share of
    its dense bf16 peak."""
    text = f"{memory_flops / 1e12:.2f} TFLOP/s from memory, {fed_flops / 1e12:.2f} from the loader"
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if peak is not None:
        label, tflops = peak
        per_gpu = f" per GPU ({gpus} GPUs)" if gpus > 1 else ""
        text += (
            f" = {memory_flops / gpus / 1e12 / tflops:.1%} and {fed_flops / gpus / 1e12 / tflops:.1%}{per_gpu} "
            f"of the {label}'s {tflops:.0f} TFLOP/s dense bf16 peak"
        )
    elif device.type == "cuda":
        text += " (this GPU is not in shared.flops.PEAK_BF16_TFLOPS: no fraction of peak)"
    return text
