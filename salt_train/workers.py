"""The training loader's worker processes, seen from the main process: waiting for a batch without
ever hanging, and ending the workers in bounded time whatever they are doing.

Why: a worker whose read never returns (a hung NFS or NVMe read; SIGSTOP looks the same from
outside) is alive, so DataLoader waits for it forever, and its own shutdown joins each worker
for 5 s and then sends a SIGTERM that a stopped process never handles. So:

- the run's DataLoader gets ``timeout=POLL_S``: a wait for a batch comes back every ``POLL_S``
  seconds (:func:`timed_out` tells that apart from a real error), and the caller looks at the
  stop signals and at ``train_loader.stall_timeout_s`` in between (``batches.next_batch``);
- :func:`end_workers` ends them: SIGTERM and SIGCONT (a stopped worker resumes to handle it; its
  handler, ``shared.lifeline``, removes its temp folder and exits), ``END_GRACE_S`` to go, then
  SIGKILL. A worker in uninterruptible I/O (state D) dies when its read returns, not before:
  no signal can end it sooner, which is why the run writes its checkpoint before ending them.

A stopped run therefore exits within ``STOP_BOUND_S``: the step in flight, at most ``POLL_S``
of waiting for a batch, the checkpoint, and ``END_GRACE_S`` plus a moment for the workers.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 1.0  # a wait for a batch looks up this often (signals, the stall bound)
END_GRACE_S = 3.0  # workers told to exit get this long before SIGKILL
STOP_BOUND_S = 30  # documented: SIGINT/SIGTERM to exit, for a step and a checkpoint of a few seconds each
_TIMED_OUT = "DataLoader timed out after"  # torch's words for a wait of ``timeout`` seconds with no batch

_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O", "T": "stopped", "t": "stopped",
           "Z": "exited"}


def timed_out(exc: BaseException) -> bool:
    """True for DataLoader's "no batch within ``timeout``" error: nothing is lost, ask again."""
    return isinstance(exc, RuntimeError) and str(exc).startswith(_TIMED_OUT)


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
        _signal(process.pid, signal.SIGTERM)
        _signal(process.pid, signal.SIGCONT)  # a stopped worker handles the SIGTERM once it runs
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        wait([process.sentinel for process in alive], timeout=deadline - time.monotonic())
        alive = [process for process in alive if process.is_alive()]
    killed = [process.pid for process in alive]
    for pid in killed:
        _signal(pid, signal.SIGKILL)
    if killed:
        log.warning("loader worker(s) %s did not exit within %.0f s of a SIGTERM: killed (a process in "
                    "uninterruptible I/O ends only when its read returns)", killed, grace_s)
        wait([process.sentinel for process in alive], timeout=1.0)
    if any(process.is_alive() for process in alive):
        # DataLoader's own shutdown would join each of them for 5 s, twice: leave them to the kernel.
        iterator._shutdown = True
    elif hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    return killed
