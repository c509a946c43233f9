"""`salt-train eval --profile`: where the evaluation's time goes, phase by phase.

Each phase of the evaluation (eval.json's ``seconds_by_phase``) is sampled with ``torch.profiler``:
it records a window of :data:`WINDOW_S` seconds, rests :data:`REST_S` seconds, records again, and so
on to the phase's end; the loops of the long phases (extraction batches, probe optimiser steps,
L-BFGS evaluations) call :func:`tick`, which is where windows close and open. Each window's events
are summarised and dropped when it closes, so memory stays bounded however long the evaluation runs
(a whole demo evaluation in one profile is tens of millions of CPU events: 24 GB), and the samples
span every column and seed of a phase, not only its start. Per phase: its wall time, how busy the
compute device was over the sampled windows (CUDA: the union of kernel time; CPU: the union of
``aten::`` operators' time, the rest being Python, numpy and waiting) and its top operators or
kernels; the first window's gzipped chrome trace. A device busy 20% of a phase waits on the host.
"""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from salt_train.busy_time import union_us

WINDOW_S = 2.0  # seconds recorded per window
REST_S = 6.0  # seconds between windows (a quarter of a long phase is sampled)
TOP = 8  # operators (CPU) or kernels (CUDA) listed per phase

_active: EvalProfiler | None = None  # the profiler of this evaluation, for tick()


def tick() -> None:
    """One iteration of a phase's loop: where a sampling window may close or open (a no-op without
    ``--profile``)."""
    if _active is not None:
        _active.tick()


class _Phase:
    """What the windows of one phase add up to."""

    def __init__(self) -> None:
        self.window_us = 0.0
        self.busy_us = 0.0
        self.windows = 0
        self.ops: dict[str, list[float]] = {}  # name -> [microseconds, calls]

    def add(self, events: Any, on_cuda: bool) -> None:
        spans = [(e.time_range.start, e.time_range.end) for e in events]
        work = [e for e in events if _is_work(e, on_cuda)]
        if not spans:
            return
        self.windows += 1
        self.window_us += max(1.0, max(end for _, end in spans) - min(start for start, _ in spans))
        self.busy_us += union_us([(e.time_range.start, e.time_range.end) for e in work])
        for event in work:
            entry = self.ops.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us() if on_cuda else event.self_cpu_time_total
            entry[1] += 1

    def summary(self, wall_s: float) -> dict[str, Any]:
        total = sum(us for us, _ in self.ops.values()) or 1.0
        ranked = sorted(self.ops.items(), key=lambda item: -item[1][0])[:TOP]
        return {
            "wall_s": round(wall_s, 2),
            "sampled_s": round(self.window_us / 1e6, 2),
            "windows": self.windows,
            "busy_fraction": round(min(1.0, self.busy_us / self.window_us), 3) if self.window_us else None,
            "top": [
                {"name": name[:100], "ms": round(us / 1e3, 1), "calls": int(calls), "share": round(us / total, 3)}
                for name, (us, calls) in ranked
            ],
        }


class EvalProfiler:
    """Samples each phase in windows: :meth:`start_phase`, :func:`tick` from its loops, :meth:`end_phase`."""

    def __init__(self, out_dir: Path, device: torch.device, window_s: float = WINDOW_S, rest_s: float = REST_S):
        self.out_dir = out_dir
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.window_s, self.rest_s = window_s, rest_s
        self.by_phase: dict[str, dict[str, Any]] = {}
        self._recording: torch.profiler.profile | None = None
        self._first: torch.profiler.profile | None = None  # the phase's first window, kept for its trace
        self._phase = _Phase()
        self._since = 0.0  # when the current window (or rest) began

    def _open(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._recording = torch.profiler.profile(activities=activities)
        self._recording.start()
        self._since = time.perf_counter()

    def _close(self) -> None:
        assert self._recording is not None
        if self.on_cuda:
            torch.cuda.synchronize(self.device)  # the window's kernels finish inside it
        self._recording.stop()
        self._phase.add(self._recording.events(), self.on_cuda)
        if self._first is None:
            self._first = self._recording
        self._recording = None
        self._since = time.perf_counter()

    def start_phase(self) -> None:
        global _active
        _active = self
        self._phase, self._first = _Phase(), None
        self._open()

    def tick(self) -> None:
        elapsed = time.perf_counter() - self._since
        if self._recording is not None and elapsed >= self.window_s:
            self._close()
        elif self._recording is None and elapsed >= self.rest_s:
            self._open()

    def end_phase(self, name: str, wall_s: float) -> None:
        """Close the phase's last window, keep its summary beside its whole wall time, and write its first
        window's trace (``out_dir/profile-NAME.json.gz``)."""
        if self._recording is not None:
            self._close()
        self.by_phase[name] = self._phase.summary(wall_s)
        if self._first is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            raw = self.out_dir / f"profile-{name}.json"
            self._first.export_chrome_trace(str(raw))
            with raw.open("rb") as source, gzip.open(raw.with_suffix(".json.gz"), "wb") as packed:
                shutil.copyfileobj(source, packed)
            raw.unlink()
            self._first = None

    def finish(self) -> dict[str, dict[str, Any]]:
        """Drop the window opened after the last phase; the summaries, also written as ``out_dir/profile.txt``."""
        global _active
        if self._recording is not None:
            self._recording.stop()
            self._recording = None
        _active = None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        summary = format_summary(self.by_phase, self.on_cuda, self.window_s, self.rest_s)
        (self.out_dir / "profile.txt").write_text(summary + "\n")
        return self.by_phase


def _is_work(event: Any, on_cuda: bool) -> bool:
    if on_cuda:
        return event.device_type.name == "CUDA" and not getattr(event, "is_user_annotation", False)
    return event.device_type.name == "CPU" and event.name.startswith("aten::")


def format_summary(
    by_phase: dict[str, dict[str, Any]], on_cuda: bool, window_s: float = WINDOW_S, rest_s: float = REST_S
) -> str:
    """The summaries as text (eval/profile.txt and the console)."""
    what = "GPU kernels" if on_cuda else "aten operators"
    lines = [
        f"where the evaluation's time goes (busy: {what} over the sampled windows, {window_s:g} s every "
        f"{window_s + rest_s:g} s of each phase)"
    ]
    for name, phase in by_phase.items():
        busy = "-" if phase["busy_fraction"] is None else f"{100 * phase['busy_fraction']:.0f}%"
        lines.append(f"{name}: {phase['wall_s']:.1f} s, busy {busy} ({phase['sampled_s']:.1f} s sampled)")
        lines += [
            f"    {op['share'] * 100:5.1f}%  {op['ms']:10.1f} ms  {op['calls']:8d} calls  {op['name']}"
            for op in phase["top"]
        ]
    return "\n".join(lines)
