"""`salt-train eval --profile`: where the evaluation's time goes, phase by phase.

Each phase of the evaluation (eval.json's ``seconds_by_phase``) is profiled in a window of its own:
``torch.profiler`` records from the phase's start for at most :data:`WINDOW_STEPS` iterations of its
loop (extraction batches, probe optimiser steps: each calls :func:`tick`), then stops, so memory
stays bounded however long the evaluation runs (a whole demo evaluation profiled in one piece is
tens of millions of CPU events). Per phase it keeps the window's summary: how busy the compute
device was (CUDA: the union of kernel time over the window; CPU: the union of ``aten::`` operators'
time, the rest being Python, numpy and waiting) and its top operators or kernels, and writes the
window's gzipped chrome trace. A device busy 20% of a phase says the phase waits on the host.
"""

from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

WINDOW_STEPS = 30  # loop iterations recorded per phase
TOP = 8  # operators (CPU) or kernels (CUDA) listed per phase

_recording: torch.profiler.profile | None = None  # the phase window being recorded, for tick()


def tick() -> None:
    """One iteration of a phase's loop (a no-op unless ``--profile`` is recording)."""
    if _recording is not None:
        _recording.step()


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Microseconds covered by the union of ``(start, end)`` intervals."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


class EvalProfiler:
    """Profiles each phase in its own bounded window: :meth:`start_phase`, then :meth:`end_phase`."""

    def __init__(self, out_dir: Path, device: torch.device, steps: int = WINDOW_STEPS) -> None:
        self.out_dir = out_dir
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.steps = steps
        self.by_phase: dict[str, dict[str, Any]] = {}
        self._window: dict[str, Any] = {}

    def start_phase(self) -> None:
        global _recording
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._window = {}
        with warnings.catch_warnings():  # "no warmup": on purpose, the window is the phase's own start
            warnings.simplefilter("ignore", UserWarning)
            window = torch.profiler.schedule(wait=0, warmup=0, active=self.steps, repeat=1)
        profiler = torch.profiler.profile(activities=activities, schedule=window, on_trace_ready=self._keep)
        profiler.start()
        _recording = profiler

    def _keep(self, profiler: torch.profiler.profile) -> None:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        self._window = {"summary": summarise(profiler.events(), self.on_cuda), "profiler": profiler}

    def end_phase(self, name: str, wall_s: float) -> None:
        """Close the phase's window (if its loop had fewer iterations than the window), keep its summary
        beside its whole wall time, and write its trace (``out_dir/profile-NAME.json.gz``)."""
        global _recording
        assert _recording is not None, "end_phase without start_phase"
        _recording.stop()
        _recording = None
        summary = self._window.get("summary") or {"busy_fraction": None, "top": [], "window_s": 0.0}
        self.by_phase[name] = {"wall_s": round(wall_s, 2), **summary}
        profiler = self._window.get("profiler")
        if profiler is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            raw = self.out_dir / f"profile-{name}.json"
            profiler.export_chrome_trace(str(raw))
            with raw.open("rb") as source, gzip.open(raw.with_suffix(".json.gz"), "wb") as packed:
                shutil.copyfileobj(source, packed)
            raw.unlink()
        self._window = {}

    def finish(self) -> dict[str, dict[str, Any]]:
        """Drop the window opened after the last phase; the summaries, also written as ``out_dir/profile.txt``."""
        global _recording
        if _recording is not None:
            _recording.stop()
            _recording = None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "profile.txt").write_text(format_summary(self.by_phase, self.on_cuda) + "\n")
        return self.by_phase


def _is_work(event: Any, on_cuda: bool) -> bool:
    if on_cuda:
        return event.device_type.name == "CUDA" and not getattr(event, "is_user_annotation", False)
    return event.device_type.name == "CPU" and event.name.startswith("aten::")


def summarise(events: Any, on_cuda: bool) -> dict[str, Any]:
    """One window's ``busy_fraction`` (work over the window's span) and ``top`` operators (CPU) or kernels
    (CUDA) by time, each with its milliseconds, calls and share of the window's work."""
    spans = [(e.time_range.start, e.time_range.end) for e in events]
    work = [e for e in events if _is_work(e, on_cuda)]
    if not spans or not work:
        return {"busy_fraction": None, "window_s": 0.0, "top": []}
    window = max(1.0, max(end for _, end in spans) - min(start for start, _ in spans))
    busy = union_us([(e.time_range.start, e.time_range.end) for e in work]) / window
    per_name: dict[str, list[float]] = {}
    for event in work:
        per_name.setdefault(event.name, []).append(
            event.time_range.elapsed_us() if on_cuda else event.self_cpu_time_total
        )
    total = sum(sum(t) for t in per_name.values()) or 1.0
    ranked = sorted(per_name.items(), key=lambda item: -sum(item[1]))[:TOP]
    return {
        "busy_fraction": round(min(1.0, busy), 3),
        "window_s": round(window / 1e6, 2),
        "top": [
            {"name": op[:100], "ms": round(sum(t) / 1e3, 1), "calls": len(t), "share": round(sum(t) / total, 3)}
            for op, t in ranked
        ],
    }


def format_summary(by_phase: dict[str, dict[str, Any]], on_cuda: bool) -> str:
    """The summaries as text (eval/profile.txt and the console)."""
    what = "GPU kernels" if on_cuda else "aten operators"
    lines = [
        f"where the evaluation's time goes (busy: {what} over the profiled window, the first "
        f"{WINDOW_STEPS} iterations of each phase's loop)"
    ]
    for name, phase in by_phase.items():
        busy = "-" if phase["busy_fraction"] is None else f"{100 * phase['busy_fraction']:.0f}%"
        lines.append(f"{name}: {phase['wall_s']:.1f} s, busy {busy} of a {phase['window_s']:.1f} s window")
        lines += [
            f"    {op['share'] * 100:5.1f}%  {op['ms']:10.1f} ms  {op['calls']:8d} calls  {op['name']}"
            for op in phase["top"]
        ]
    return "\n".join(lines)
