"""`salt-train preflight`: the checks worth a minute before a run of days.

1. one batch: shapes ``(B, 3, 16, 224, 224)`` and ``(B, 1568, D)`` once on the device, finite values;
2. worker stress: 20-50 batches through the configured workers and prefetch, no errors;
3. /dev/shm: sampled during the stress, its use stays flat and under the loader's bound
   (the seed's bus errors at batch 64 were /dev/shm running out mid-run). Only this
   loader's shared memory counts (the segments this process and its workers map):
   another job allocating /dev/shm beside it does not fail the check.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared import geometry
from shared.config import PipelineConfig
from shared.console import format_bytes
from shared.device import resolve_device
from shared.store import LatentStore

from salt_train.data import (
    SHM_PATH,
    StoreStream,
    batch_bytes,
    check_shm,
    check_stream,
    make_loader,
    shm_bound,
    stream_spec,
    to_model_inputs,
)


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (the forkserver's workers included), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(text.split(maxsplit=1)[0]))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def own_shm_bytes(path: Path = SHM_PATH) -> int:
    """Bytes of the ``path`` (/dev/shm) objects mapped by this process and its descendants, each
    object once (by inode); where there is no /proc, the whole filesystem's use."""
    if not Path("/proc/self/maps").is_file():
        return shutil.disk_usage(path).used
    prefix = f"{path}/"
    sizes: dict[tuple[str, str], int] = {}
    for pid in process_tree(os.getpid()):
        try:
            lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:  # a worker that just exited
            continue
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith(prefix):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            key = (parts[3], parts[4])  # device, inode: the same segment mapped by two processes counts once
            sizes[key] = max(sizes.get(key, 0), hi - lo)
    return sum(sizes.values())


class ShmSampler(threading.Thread):
    """Samples this loader's /dev/shm bytes every ``interval`` seconds, tagged with the batches consumed so far."""

    def __init__(self, path: Path = SHM_PATH, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path, self.interval = path, interval
        self.baseline = own_shm_bytes(path)
        self.batches = 0  # updated by the consumer
        self.samples: list[tuple[int, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((self.batches, own_shm_bytes(self.path) - self.baseline))
            time.sleep(self.interval)

    def stop(self) -> tuple[list[tuple[int, int]], int]:
        """The samples, and the growth left once the loader is gone (a leak if large)."""
        self._stop_event.set()
        self.join()
        return self.samples, own_shm_bytes(self.path) - self.baseline


def check_single_batch(stream: StoreStream, teacher_width: int, device: torch.device) -> CheckResult:
    epoch, index, rows = next(stream.positions())
    batch = stream.read_batch(epoch, index, rows, worker=0)
    if "error" in batch:
        return CheckResult("single batch", False, f"rows {rows.tolist()} unreadable: {batch['error']}")
    pixels, latents = to_model_inputs(batch, device)
    b = len(rows)
    want_pixels = (b, 3, geometry.NUM_FRAMES, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE)
    want_latents = (b, geometry.NUM_TOKENS, teacher_width)
    problems = []
    if tuple(pixels.shape) != want_pixels:
        problems.append(f"pixels {tuple(pixels.shape)} != {want_pixels}")
    if tuple(latents.shape) != want_latents:
        problems.append(f"latents {tuple(latents.shape)} != {want_latents}")
    if latents.dtype != torch.float16:
        problems.append(f"latents dtype {latents.dtype}, expected float16")
    if not torch.isfinite(pixels).all():
        problems.append("pixels hold non-finite values")
    if not torch.isfinite(latents.float()).all():
        problems.append("latents hold NaN or inf")
    if problems:
        return CheckResult("single batch", False, "; ".join(problems))
    return CheckResult(
        "single batch",
        True,
        f"pixels {tuple(pixels.shape)} {pixels.dtype} in [{pixels.min():.2f}, {pixels.max():.2f}], "
        f"latents {tuple(latents.shape)} {latents.dtype}, finite, on {device}",
    )


def check_workers(
    spec, config: PipelineConfig, batches: int, device: torch.device, bound: int
) -> tuple[CheckResult, CheckResult]:
    """The stress test and, sampled meanwhile, the /dev/shm probe."""
    settings = config.train_loader
    loader = make_loader(spec, settings, pin_memory=settings.pin_memory and device.type == "cuda")
    sampler = ShmSampler()
    sampler.start()
    started = time.perf_counter()
    seen = errors = clips = 0
    first_error = ""
    for batch in loader:
        if "error" in batch:
            errors += 1
            first_error = first_error or f"rows {batch['rows'].tolist()}: {batch['error']}"
        else:
            clips += len(batch["rows"])
        seen += 1
        sampler.batches = seen
        if seen >= batches:
            break
    elapsed = time.perf_counter() - started
    del loader, batch  # workers exit; the last batch's shared memory is released
    time.sleep(0.2)
    samples, left_over = sampler.stop()
    workers = config.train_loader.num_workers
    stress = CheckResult(
        f"worker stress ({workers} workers, prefetch {config.train_loader.prefetch_factor})",
        errors == 0 and seen > 0,
        f"{seen} batches, {clips / elapsed:.1f} clips/s including worker start"
        + (f", {errors} unreadable (first: {first_error})" if errors else ", no errors"),
    )
    return stress, shm_verdict(samples, left_over, bound, workers, seen, one_batch=bound // max(1, 3 * workers))


def shm_verdict(
    samples: list[tuple[int, int]], left_over: int, bound: int, workers: int, batches: int, one_batch: int
) -> CheckResult:
    """Flat: once batches flow, use never passes the loader's bound (a leak of even one batch per
    step would, within the stress); and it is all released when the loader goes."""
    name = "/dev/shm use"
    if workers == 0:
        return CheckResult(name, True, "no workers: batches stay in this process, /dev/shm unused")
    early = [used for n, used in samples if 1 <= n <= batches // 2]
    late = [used for n, used in samples if n > batches // 2]
    if not early or not late:
        return CheckResult(name, True, f"too few samples to judge ({len(samples)}); bound {format_bytes(bound)}")
    flat = max(early + late) <= bound
    released = left_over <= one_batch
    return CheckResult(
        name,
        flat and released,
        f"{'flat' if flat else 'ABOVE THE BOUND'}: first half peak +{format_bytes(max(early))}, "
        f"second half +{format_bytes(max(late))} (bound {format_bytes(bound)} = workers x "
        f"(prefetch + 1) x batch); {'released' if released else 'NOT released'} after the loader "
        f"(+{format_bytes(max(0, left_over))}), {len(samples)} samples",
    )


def run_preflight(cache: Path, config: PipelineConfig, stress_batches: int = 30) -> list[CheckResult]:
    device = resolve_device(config.train.device, "train.device")
    store = LatentStore.open(cache).checked()
    spec = stream_spec(store, config)
    check_stream(spec, store.path)
    check_shm(config.train_loader, spec.local_batch, store.teacher_width)
    counts = store.counts()
    print(
        f"preflight of {cache}: {counts['committed']} committed rows ({counts['failed']} failed, "
        f"{counts['pending']} pending), batch {spec.batch_size}, "
        f"{format_bytes(batch_bytes(spec.local_batch, store.teacher_width))} per batch",
        flush=True,
    )
    results = [check_single_batch(StoreStream(spec), store.teacher_width, device)]
    print(results[-1].line(), flush=True)
    bound = shm_bound(config.train_loader, spec.local_batch, store.teacher_width)
    for result in check_workers(spec, config, stress_batches, device, bound):
        results.append(result)
        print(result.line(), flush=True)
    verdict = "all checks passed" if all(r.passed for r in results) else "some checks FAILED"
    print(f"preflight: {verdict}", file=sys.stdout, flush=True)
    return results
