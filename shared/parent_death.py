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
  forkserver or the main process, dies; its handler exits, and once the main process
  is gone it first removes the ``pymp-*`` folder it shares with it (torch passes
  batches' file descriptors through sockets there; while the main process lives the
  folder is its to remove, and a worker killed by a stop leaves nothing else);
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


def die_with_parent() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: the child gets SIGTERM when the process that started it dies."""
    _die_with_parent(signal.SIGTERM)


def _alive(pid: int) -> bool:
    """Running: a zombie (killed, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): the kill above said it exists
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


def share_temp_dir() -> None:
    """In the main process, before workers start: make its multiprocessing temp folder now, so that every
    worker's Process object carries it and none makes its own. A worker killed where it stands (SIGKILL
    of a stopped one) then leaves nothing: the folder is removed with the main process, however it ends."""
    from multiprocessing import util

    util.get_temp_dir()


def _worker_exit(signum: int, frame: object) -> None:
    """SIGTERM in a worker (its parent died, or a stop): remove its multiprocessing temp folder (it holds
    the sockets through which torch passes batch file descriptors) and exit. A worker whose Process
    object was made after the main process had its folder shares that one (the object carries it):
    while the main process lives, that folder is the main process's to remove at exit (removed under
    it, its exit printed a finaliser's traceback)."""
    # multiprocessing's private state (no public way to ask for a process's temp folder); not in typeshed.
    tempdir = multiprocessing.current_process()._config.get("tempdir")  # type: ignore[attr-defined]
    main = _env_pid(MAIN_PID_ENV)
    if (
        isinstance(tempdir, str)
        and Path(tempdir).name.startswith("pymp-")
        and (_made_here(tempdir) or main is None or not _alive(main))
    ):
        shutil.rmtree(tempdir, ignore_errors=True)
    os._exit(128 + signum)


def _made_here(tempdir: str) -> bool:
    """Whether this process made ``tempdir`` (multiprocessing registers its removal where it is made)."""
    from multiprocessing import util

    return any(
        getattr(finalizer, "_callback", None) is util._remove_temp_dir  # type: ignore[attr-defined]  # private
        and tempdir in (getattr(finalizer, "_args", None) or ())
        for finalizer in list(util._finalizer_registry.values())  # type: ignore[attr-defined]  # private
    )


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
if (
    multiprocessing.current_process().name == "MainProcess"
    and sys.argv[:1] == ["-c"]
    and "multiprocessing.forkserver" in sys.modules
    and os.environ.get(FORKSERVER_PID_ENV) is None
):
    _in_forkserver()
