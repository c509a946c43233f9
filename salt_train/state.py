"""Where a run is: the stream position and the non-tensor part of a checkpoint.

Its own module so that the loader, the checkpoints and the metrics share these
two records without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Position:
    """Where a stream is: the next global batch to read is ``index`` of ``epoch``."""

    epoch: int = 0
    index: int = 0


@dataclass
class TrainState:
    """The non-tensor part of a checkpoint."""

    step: int  # optimizer steps done
    position: Position  # next global batch to read
    loader_errors: int = 0
    clips_seen: int = 0
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient
