"""Every helper process dies with the main process, however the main process dies.

A ``kill -9`` of the main process (the OOM killer's or a scheduler's way) runs no
cleanup in it. Under the ``forkserver`` context the DataLoader workers are children
of the forkserver, and torch's worker watchdog watches *its parent*, the forkserver,
which lives as long as any worker holds its pipe: without help all of them, and the
resource tracker they keep open, outlive the job indefinitely.

The chain here, each link a Linux parent-death signal (``prctl(PR_SET_PDEATHSIG)``):

- the forkserver (imported as a forkserver *preload* module) gets SIGTERM when the
  main process dies; its handler removes the main process's ``/tmp/pymp-*`` folder
  (which holds the forkserver's socket) and exits;
- every DataLoader worker (:func:`worker_init`) gets SIGTERM when its parent, the
  forkserver or the main process, dies; its handler removes the worker's own
  ``pymp-*`` folder (torch passes batches' file descriptors through a socket there)
  and exits;
- the resource tracker then reads EOF on its pipe (nobody holds it any more), unlinks
  the ``/dev/shm/sem.mp-*`` semaphores it was told about, and exits.

Workers also ignore SIGINT: Ctrl-C in a terminal reaches the whole process group,
and it is the main process's to handle (finish the step, checkpoint, stop).
Elsewhere than Linux these calls do nothing.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

MAIN_PID_ENV = "SALT_MAIN_PID"
FORKSERVER_PID_ENV = "SALT_FORKSERVER_PID"
_PR_SET_PDEATHSIG = 1


def _die_with_parent(signum: int) -> bool:
    """Ask the kernel to send ``signum`` when our parent dies; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _env_pid(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def install() -> None:
    """In the main process of a command that starts workers, before any worker or forkserver starts."""
    os.environ[MAIN_PID_ENV] = str(os.getpid())
    try:
        # Python's default preload is ["__main__"]: keep it, add ours.
        multiprocessing.get_context("forkserver").set_forkserver_preload(["__main__", __name__])
    except ValueError:  # no forkserver on this platform
        pass


def _worker_exit(signum: int, frame: object) -> None:
    """SIGTERM in a worker (its parent died, or a stop): remove the worker's own multiprocessing temp
    folder (it holds the socket through which torch passes batch file descriptors) and exit."""
    tempdir = multiprocessing.current_process()._config.get("tempdir")
    if isinstance(tempdir, str) and Path(tempdir).name.startswith("pymp-"):
        shutil.rmtree(tempdir, ignore_errors=True)
    os._exit(128 + signum)


def worker_init(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: die with the parent, leave Ctrl-C to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_exit)  # not the forkserver's handler below
    if not _die_with_parent(signal.SIGTERM):
        return
    # The parent may have died before the prctl: then no signal will ever come.
    forkserver, main = _env_pid(FORKSERVER_PID_ENV), _env_pid(MAIN_PID_ENV)
    if forkserver is not None:  # forked by our forkserver (its preload set this)
        orphaned = os.getppid() != forkserver
    else:
        orphaned = main is not None and os.getppid() != main and not _alive(main)
    if orphaned:
        os._exit(1)


def _forkserver_exit(signum: int, frame: object) -> None:
    """The main process died: remove its multiprocessing temp folder (our socket's) and exit.
    Forked children inherit this handler until ``worker_init`` resets it: act only in the forkserver."""
    if str(os.getpid()) != os.environ.get(FORKSERVER_PID_ENV):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if os.getppid() == _env_pid(MAIN_PID_ENV):  # a signal while the main process lives: it closes us itself
        return
    from multiprocessing import forkserver

    address = getattr(forkserver._forkserver, "_forkserver_address", None)
    if isinstance(address, str) and Path(address).parent.name.startswith("pymp-"):
        shutil.rmtree(Path(address).parent, ignore_errors=True)
    os._exit(0)


def _in_forkserver() -> None:
    """Runs when the forkserver imports this module (its preload), before it serves any fork."""
    main = _env_pid(MAIN_PID_ENV)
    if main is None:
        return
    os.environ[FORKSERVER_PID_ENV] = str(os.getpid())
    signal.signal(signal.SIGTERM, _forkserver_exit)
    if _die_with_parent(signal.SIGTERM) and (os.getppid() != main or not _alive(main)):
        _forkserver_exit(signal.SIGTERM, None)


# The forkserver runs ``from multiprocessing.forkserver import main; main(...)`` with ``-c``
# and imports its preload modules from there; nowhere else is this module imported that way.
if multiprocessing.current_process().name == "MainProcess" and sys.argv[:1] == ["-c"] \
        and "multiprocessing.forkserver" in sys.modules and os.environ.get(FORKSERVER_PID_ENV) is None:
    _in_forkserver()
