"""How busy a device was in a profile: the union of its operators' or kernels' time intervals.

Shared by ``salt-train bench --profile`` (the training step) and ``salt-train eval --profile`` (each phase);
overlapping kernels (streams) or nested operators count once.
"""

from __future__ import annotations


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Microseconds covered by the union of ``(start, end)`` intervals."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered
