"""The training loader's worker processes, seen from the main process: waiting for a batch without
ever hanging, and ending the workers in bounded time whatever they are doing.

Why: a worker whose read never returns (a hung NFS or NVMe read; SIGSTOP looks the same from
outside) is alive, so DataLoader waits for it forever. The main process can even hang half-way
through taking a batch the worker already sent: its shared-memory file descriptors come through
a socket the (stopped) worker must answer. And DataLoader's own shutdown joins each worker for
5 s, then sends a SIGTERM that a stopped process never handles. So:

- the main process waits for a batch inside :func:`waiting_for_batch`: a stop signal's handler
  calls :func:`interrupt_wait`, which ends the wait at once (:class:`StopWaiting`, wherever it
  blocks), and a timer (SIGALRM) ends it after ``train_loader.stall_timeout_s``
  (:class:`LoaderStalled`). Outside the wait (mid-step, mid-checkpoint) a signal only asks the
  run to stop after the step. Both are BaseExceptions, so no ``except Exception`` on the way
  (DataLoader's, the stream's) mistakes them for a read error; the run stops either way, so the
  batch being taken is not needed;
- :func:`end_workers` ends them: SIGKILL for a stopped one, SIGTERM for the others (their handler,
  ``shared.parent_death``, exits), ``END_GRACE_S`` to go, then SIGKILL. A worker in
  uninterruptible I/O (state D) dies when its read returns, not before: no signal can end it
  sooner, which is why the run writes its checkpoint before ending them.

A stopped run therefore exits within ``STOP_BOUND_S``: the step in flight, the checkpoint, and
``END_GRACE_S`` plus a moment for the workers.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

END_GRACE_S = 3.0  # workers told to exit get this long before SIGKILL
STOP_BOUND_S = 30  # documented: SIGINT/SIGTERM to exit, for a step and a checkpoint of a few seconds each

_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "in uninterruptible I/O",
    "T": "stopped",
    "t": "stopped",
    "Z": "exited",
}


class StopWaiting(BaseException):
    """A stop signal arrived while the main process waited for a batch: the wait ends at once."""


class LoaderStalled(BaseException):
    """No batch came within ``train_loader.stall_timeout_s``."""


_waiting = False  # the main process is inside waiting_for_batch


def interrupt_wait() -> None:
    """For a stop signal's handler: end a wait for a batch now (outside one, nothing happens)."""
    if _waiting:
        raise StopWaiting


def _stalled(signum: int, frame: Any) -> None:
    if _waiting:
        raise LoaderStalled


@contextmanager
def waiting_for_batch(stall_timeout_s: float | None) -> Iterator[None]:
    """The main process waits for a batch in here: :func:`interrupt_wait` and, after ``stall_timeout_s``
    (None: never), the timer end the wait wherever it blocks. Check for a stop that came just before, in here."""
    global _waiting
    timed, previous = False, None
    if stall_timeout_s:
        try:
            previous = signal.signal(signal.SIGALRM, _stalled)
            timed = True
        except ValueError:  # not the main thread (tests calling in-process from a thread): no timer
            pass
    if timed and stall_timeout_s:  # timed only with a timeout
        signal.setitimer(signal.ITIMER_REAL, stall_timeout_s)
    _waiting = True
    try:
        yield
    finally:
        _waiting = False
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def worker_processes(iterator: Any) -> list[Any]:
    """The ``multiprocessing`` processes of a DataLoader iterator (none for ``num_workers=0`` or a plain one)."""
    return list(getattr(iterator, "_workers", None) or [])


def process_state(pid: int) -> str:
    """What ``/proc`` says the process is doing, in words."""
    try:
        letter = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return _STATES.get(letter, letter)


def describe_workers(iterator: Any) -> str:
    """``worker pids 12 (stopped), 13 (sleeping)``, or that there are none."""
    pids = [process.pid for process in worker_processes(iterator)]
    if not pids:
        return "no worker processes"
    return "worker pids " + ", ".join(f"{pid} ({process_state(pid)})" for pid in pids)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # already gone
        pass


def end_workers(iterator: Any, grace_s: float = END_GRACE_S) -> list[int]:
    """End the iterator's workers within about ``grace_s`` s, running, sleeping or stopped; then let
    DataLoader close its queues (its joins find them gone). Returns the pids that needed SIGKILL."""
    alive = [process for process in worker_processes(iterator) if process.is_alive()]
    for process in alive:
        # A stopped worker is killed as it is: resumed, its threads would first answer the main process's
        # abandoned requests (tracebacks). It holds nothing to clean: the temp folder is the main process's.
        _signal(process.pid, signal.SIGKILL if process_state(process.pid) == "stopped" else signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        wait([process.sentinel for process in alive], timeout=deadline - time.monotonic())
        alive = [process for process in alive if process.is_alive()]
    killed = [process.pid for process in alive]
    for pid in killed:
        _signal(pid, signal.SIGKILL)
    if killed:
        log.warning(
            "loader worker(s) %s did not exit within %.0f s of a SIGTERM: killed (a process in "
            "uninterruptible I/O ends only when its read returns)",
            killed,
            grace_s,
        )
        wait([process.sentinel for process in alive], timeout=1.0)
    if any(process.is_alive() for process in alive):
        # DataLoader's own shutdown would join each of them for 5 s, twice: leave them to the kernel.
        iterator._shutdown = True
    elif hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    return killed
