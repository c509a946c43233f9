"""The batches every rank agrees to step on.

Each rank takes its next batch (its slice of the global batch), then one small all-reduce
says whether any rank must stop (a signal, a dead loader worker), skip (an unreadable
batch: every rank skips it, so the ranks stay on the same global batch) or has run out.
Only batches every rank can step on come out, with the stream position after them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from shared.distributed import Dist
from shared.errors import one_line

from salt_train.checkpoint import TrainingStopped
from salt_train.feed import BatchFeed
from salt_train.metrics import HealthWindow
from salt_train.run_checks import Checkpoints
from salt_train.run_folder import MetricsLog
from salt_train.state import Position
from salt_train.workers import LoaderStalled, StopWaiting, waiting_for_batch

log = logging.getLogger(__name__)


def next_position(position: Position, steps_per_epoch: int) -> Position:
    if position.index + 1 >= steps_per_epoch:
        return Position(position.epoch + 1, 0)
    return Position(position.epoch, position.index + 1)


def next_batch(
    batches: Iterable[dict],
    stop_requested: Callable[[], bool] = lambda: False,
    stall_timeout_s: float | None = None,
    describe_workers: Callable[[], str] = lambda: "",
) -> tuple[dict | None, str | None]:
    """The next batch; ``(None, None)`` at the stream's end, or when a stop signal came before or during
    the wait; ``(None, reason)`` when a loader worker died (OOM killer, a signal) or no batch came within
    ``stall_timeout_s`` (a hung read): the run then stops between two whole steps, with a checkpoint.
    A stop signal's handler ends the wait at once (salt_train/workers.py)."""
    started = time.monotonic()
    try:
        with waiting_for_batch(stall_timeout_s):
            if stop_requested():  # the signal came before the wait began
                return None, None
            return next(batches, None), None  # type: ignore[call-overload]
    except StopWaiting:
        return None, None
    except LoaderStalled:
        return None, (
            f"no batch from the loader in {time.monotonic() - started:.0f} s "
            f"(train_loader.stall_timeout_s={stall_timeout_s:g}): a read is hanging ({describe_workers()})"
        )
    except (RuntimeError, ConnectionError, EOFError) as exc:
        # A worker killed while the main process fetches its batch's shared-memory handles shows up as a
        # reset connection before torch's own liveness check sees the worker gone (forkserver reaps late).
        text = one_line(str(exc), None)
        if isinstance(exc, RuntimeError) and "DataLoader worker" not in text:
            raise
        if not isinstance(exc, RuntimeError):
            text = f"lost the connection to it: {one_line(exc, None)}"
        return None, f"a loader worker died ({text[:160]})"


def _loader_error(batch: dict) -> dict[str, Any]:
    return {"rows": batch["rows"].tolist(), "worker": batch["worker"], "error": batch["error"]}


def log_skipped_batch(position: Position, errors: list[dict[str, Any] | None]) -> None:
    """One warning per rank whose slice of the global batch was unreadable (all ranks skip it)."""
    for rank, error in enumerate(errors):
        if error is not None:
            log.warning(
                "loader: batch %d of epoch %d (rows %s, %sworker %s) skipped: %s",
                position.index,
                position.epoch,
                error["rows"],
                f"rank {rank} " if len(errors) > 1 else "",
                error["worker"],
                error["error"],
            )


class AgreedBatches:
    """Iterating yields ``(batch, position after it)`` while the run's ``state.step < steps``.

    It ends early when a rank is stopping (``interrupted``; ``loader_failure`` says why when a loader
    worker died here or no batch came within ``train_loader.stall_timeout_s``) or the stream has run
    out; past ``max_errors`` (``stream.max_errors``) unreadable batches it writes a checkpoint and raises
    :class:`TrainingStopped`. With ``record_rows`` (``train.record_rows``), rank 0
    records every step's rows (all ranks') in ``rows.jsonl``. ``close()`` when done."""

    def __init__(
        self,
        feed: BatchFeed,
        steps: int,
        steps_per_epoch: int,
        checkpoints: Checkpoints,
        stop_requested: Callable[[], bool],
        window: HealthWindow,
        run_dir: Path,
        dist: Dist,
        *,
        stall_timeout_s: float,
        max_errors: int,
        record_rows: bool,
    ) -> None:
        self.feed: BatchFeed | None = feed  # the next batch's copy overlaps this step (CUDA)
        self.steps, self.steps_per_epoch = steps, steps_per_epoch
        self.checkpoints, self.state = checkpoints, checkpoints.checkpointer.state
        self.stop_requested, self.window, self.dist = stop_requested, window, dist  # whether a signal arrived
        self.stall_timeout_s, self.max_errors, self.record_rows = stall_timeout_s, max_errors, record_rows
        self.rows_log = MetricsLog(run_dir / "rows.jsonl") if dist.is_main and record_rows else None
        self.interrupted = False
        self.loader_failure: str | None = None

    def __iter__(self) -> Iterator[tuple[dict, Position]]:
        while self.state.step < self.steps:
            feed = self.feed
            assert feed is not None  # None only once close() ran, after the loop
            waited = time.perf_counter()
            batch, self.loader_failure = next_batch(
                feed, self.stop_requested, self.stall_timeout_s, feed.describe_workers
            )
            self.window.data_wait += time.perf_counter() - waited
            unreadable = batch is not None and "error" in batch
            stop = self.stop_requested() or bool(self.loader_failure)
            stopping, skipping, exhausted = self.dist.any_of(stop, unreadable, batch is None)
            if stopping:
                self.interrupted = True
                return
            if exhausted:
                return
            assert batch is not None  # this rank's None made exhausted true
            position = Position(batch["epoch"], batch["index"])
            following = next_position(position, self.steps_per_epoch)
            if skipping:
                self._skip(batch if unreadable else None, position, following)
                continue
            if self.record_rows:
                rows = self.dist.all_gather(batch["rows"].tolist())
                if self.rows_log is not None:
                    self.rows_log.write(
                        {"step": self.state.step, "epoch": position.epoch, "index": position.index, "rows": rows}
                    )
            yield batch, following

    def _skip(self, unreadable: dict | None, position: Position, following: Position) -> None:
        """Every rank skips a global batch some rank could not read; past stream.max_errors, stop."""
        state, max_errors = self.state, self.max_errors
        state.position = following
        state.loader_errors += 1
        log_skipped_batch(position, self.dist.all_gather(_loader_error(unreadable) if unreadable else None))
        if state.loader_errors > max_errors:
            self.checkpoints.save(last_step=True)
            raise TrainingStopped(
                f"{state.loader_errors} unreadable batches, more than stream.max_errors={max_errors}: "
                f"stopped at step {state.step} with a checkpoint; check the store with `salt-cache verify --deep`"
            )

    def close(self) -> None:
        """Stop the loader workers (the feed holds the loader's iterator) and close rows.jsonl."""
        if self.feed is not None:
            self.feed.close()
            self.feed = None
        if self.rows_log is not None:
            self.rows_log.close()
