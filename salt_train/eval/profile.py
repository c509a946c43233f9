"""`salt-train eval --profile`: where the evaluation's time goes, phase by phase.

The whole evaluation runs under ``torch.profiler``; each phase's end is marked by an empty
profiler range (:func:`mark_phase`), so the trace splits into the same phases as eval.json's
``seconds_by_phase``. :func:`phase_summary` gives, per phase, its wall time, how busy the compute
device was (CUDA: the union of kernel time over the phase's window; CPU: the union of ``aten::``
operators' time, so the rest is Python, numpy and waiting) and its top operators or kernels.
A device that is busy 20% of a phase says the phase waits on the host, not on arithmetic.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

import torch

PHASE_MARK = "salt-eval phase end: "
PHASE_START = "salt-eval start"
TOP = 8  # operators (CPU) or kernels (CUDA) listed per phase


def mark_phase(name: str) -> None:
    """An empty profiler range at the end of phase ``name`` (nothing recorded without a profiler)."""
    with torch.profiler.record_function(PHASE_MARK + name):
        pass


def start_profiler(device: torch.device) -> torch.profiler.profile:
    """A started ``torch.profiler`` (CPU operators, and CUDA kernels on a GPU), its start marked."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    with torch.profiler.record_function(PHASE_START):
        pass
    return profiler


def finish_profile(profiler: torch.profiler.profile, out_dir: Path, device: torch.device) -> dict[str, Any]:
    """Stop ``profiler``, write its gzipped chrome trace (``out_dir/profile-trace.json.gz``) and
    ``out_dir/profile.txt``; returns :func:`phase_summary`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    profiler.stop()
    on_cuda = device.type == "cuda"
    summary = phase_summary(profiler.events(), on_cuda)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "profile-trace.json"
    profiler.export_chrome_trace(str(raw))
    with raw.open("rb") as source, gzip.open(out_dir / "profile-trace.json.gz", "wb") as packed:
        shutil.copyfileobj(source, packed)
    raw.unlink()
    (out_dir / "profile.txt").write_text(format_summary(summary, on_cuda) + "\n")
    return summary


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Microseconds covered by the union of ``(start, end)`` intervals."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def _is_work(event: Any, on_cuda: bool) -> bool:
    if on_cuda:
        return event.device_type.name == "CUDA" and not getattr(event, "is_user_annotation", False)
    return event.device_type.name == "CPU" and event.name.startswith("aten::")


def phase_summary(events: Any, on_cuda: bool) -> dict[str, dict[str, Any]]:
    """Per phase (in order): ``wall_s``, ``busy_fraction`` and the ``top`` operators (CPU) or kernels (CUDA)
    by time, each with its milliseconds, calls and share of the phase's work."""
    marks = sorted(
        (e.time_range.start, e.name.removeprefix(PHASE_MARK))
        for e in events
        if e.device_type.name == "CPU" and (e.name.startswith(PHASE_MARK) or e.name == PHASE_START)
    )
    windows = [(start, end, name) for (start, _), (end, name) in zip(marks, marks[1:], strict=False)]
    buckets: dict[str, list[Any]] = {name: [] for _, _, name in windows}
    for event in events:
        if not _is_work(event, on_cuda):
            continue
        for start, end, name in windows:  # a handful of phases: a linear scan is enough
            if start <= event.time_range.start < end:
                buckets[name].append(event)
                break
    summary: dict[str, dict[str, Any]] = {}
    for start, end, name in windows:
        work = buckets[name]
        wall = max(1.0, end - start)
        busy = union_us([(e.time_range.start, min(e.time_range.end, end)) for e in work]) / wall
        per_name: dict[str, list[float]] = {}
        for event in work:
            time_us = event.time_range.elapsed_us() if on_cuda else event.self_cpu_time_total
            per_name.setdefault(event.name, []).append(time_us)
        total = sum(sum(t) for t in per_name.values()) or 1.0
        ranked = sorted(per_name.items(), key=lambda item: -sum(item[1]))[:TOP]
        summary[name] = {
            "wall_s": round(wall / 1e6, 2),
            "busy_fraction": round(min(1.0, busy), 3),
            "top": [
                {"name": op[:100], "ms": round(sum(t) / 1e3, 1), "calls": len(t), "share": round(sum(t) / total, 3)}
                for op, t in ranked
            ],
        }
    return summary


def format_summary(summary: dict[str, dict[str, Any]], on_cuda: bool) -> str:
    """The summary as text (eval/profile.txt and the console)."""
    what = "GPU kernels" if on_cuda else "aten operators"
    lines = [f"where the evaluation's time goes (busy: {what} over the phase's wall time)"]
    for name, phase in summary.items():
        lines.append(f"{name}: {phase['wall_s']:.1f} s, busy {100 * phase['busy_fraction']:.0f}%")
        lines += [
            f"    {op['share'] * 100:5.1f}%  {op['ms']:10.1f} ms  {op['calls']:8d} calls  {op['name']}"
            for op in phase["top"]
        ]
    return "\n".join(lines)
