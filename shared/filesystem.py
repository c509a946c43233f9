"""The filesystem rules, once: how a file or folder is put in place, who locks what, clones.

**Stage, then rename.** Nothing is written where a reader looks for it. A file or a folder is
written under a ``.partial`` name beside its final place, flushed to disk, and renamed into
place (``rename(2)`` is atomic), then the parent folder is flushed so the rename survives a
power cut. A reader, or a ``kill -9`` at any instant, sees the old thing or the new one,
whole, never half. A name ending in ``.partial`` is therefore never a finished file: readers
skip it and cleaners delete it. :func:`atomic_file` and :func:`atomic_dir` do this for every
file and folder the package writes itself (Zarr writes its own chunks the same way);
:func:`delete_dir` is the same rule backwards. The ``.partial`` name is either fixed
(``<name>.partial``: a retry of the same job removes what a crashed attempt left) or, where
several writers may stage the same name at once, unique and hidden (``.<name>.<8 hex>.partial``).

**Locks** (``flock``: advisory, dropped by the kernel when the process dies, ``kill -9``
included, so no lock is ever stale). The whole protocol is carried out by the functions below:

============================  =========  ======  =============================================
what is locked                 how        waits   who, and when
============================  =========  ======  =============================================
``<store>.lock`` (a file)      exclusive  no      ``salt-cache build``, for the whole build
                                                  (:func:`build_lock`): a second build is refused
``<store>.lock``               shared     no      ``salt-train run`` while it snapshots the store
                                                  (:func:`no_build_running`): refused while a
                                                  build runs; no build starts meanwhile
a folder being staged          exclusive  yes     :func:`atomic_dir`, from creation to rename: a
(``<name>.partial``)                              snapshot being taken is not a leftover
a snapshot folder              shared     yes     a run, while it reads the snapshot
                                                  (:func:`reading_folder`)
a snapshot or a ``.partial``   exclusive  no      ``salt-train snapshots prune`` before deleting
                                                  (:func:`unless_in_use`): a held one is kept
``<run>/run.lock`` (a file)    exclusive  no      ``salt-train run`` (rank 0), for its whole life
                                                  (:func:`sole_writer`): a second run or
                                                  ``--resume`` of the folder is refused, naming
                                                  the holder's PID (written in the file)
============================  =========  ======  =============================================

A held lock's descriptor is closed in every child made by ``fork`` (a ``fork``-context loader worker):
the lock dies with its holder alone, not with the last of its children.

Only a build creates ``<store>.lock``: no file means no build ever ran there, and a snapshot
goes ahead without it. A run takes the store's lock before its snapshot folder's, never the
other way round, so two of them cannot deadlock.

**Clones.** :func:`clone_file` shares a file's extents (``FICLONE``: XFS with reflink, btrfs),
O(1) per file; :func:`sync_filesystem` flushes a whole filesystem once (``syncfs``), cheaper than
one ``fsync`` per cloned file.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal

from shared.errors import SaltUsageError

PARTIAL_SUFFIX = ".partial"  # a file or folder being written (or one a crash left): never a finished one
FICLONE = 0x40049409  # _IOW(0x94, 9, int): clone a whole file's extents (XFS, btrfs)

# What atomic_dir does with a folder already at the final name: "empty" lets rename(2) decide (an empty
# folder is replaced, a full one is an OSError); "delete" removes it first; "backup" moves it to
# <name>.previous until the new one is in place, then deletes it.
Replace = Literal["empty", "delete", "backup"]
# How atomic_dir flushes the staged folder: fsync every file and folder, or one syncfs (many clones).
Sync = Literal["files", "filesystem"]


# ---- flushing ------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (after a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, ``folder`` included."""
    for parent, _, names in os.walk(folder):
        for name in names:
            fsync_path(Path(parent, name))
        fsync_path(Path(parent))


def sync_filesystem(folder: Path) -> None:
    """Flush the whole filesystem holding ``folder`` (syncfs; sync where syncfs is missing)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
    except (OSError, AttributeError):
        os.sync()
    finally:
        os.close(fd)


# ---- stage, then rename --------------------------------------------------------------------


def partial_path(final: Path, *, unique: bool = False) -> Path:
    """Where ``final`` is staged: ``<name>.partial``, or ``.<name>.<8 hex>.partial`` when ``unique``."""
    final = Path(final)
    if unique:
        return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    return final.with_name(final.name + PARTIAL_SUFFIX)


@contextmanager
def atomic_file(path: Path, *, unique: bool = False) -> Iterator[Path]:
    """Yield a ``.partial`` path to write ``path``'s new content to; then fsync it and rename it over
    ``path``. If the body fails, the partial file is removed and ``path`` is untouched. The parent
    folder is not flushed: a caller renaming many files into one folder flushes it once."""
    path = Path(path)
    partial = partial_path(path, unique=unique)
    try:
        yield partial
        fsync_path(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text``: readers (and a kill -9) see the old or the new file, whole."""
    with atomic_file(path) as partial:
        partial.write_text(text)


def write_json_atomic(path: Path, record: Any) -> None:
    write_text_atomic(path, json.dumps(record, indent=1, default=str))


@contextmanager
def atomic_dir(
    final: Path, *, unique: bool = False, replace: Replace = "empty", sync: Sync = "files"
) -> Iterator[Path]:
    """Yield an empty ``.partial`` folder beside ``final`` to fill; then flush it (``sync``), rename it
    to ``final`` (``replace`` says what happens to a folder already there) and flush the parent.

    The staged folder is locked exclusively until it is in place, so a cleaner leaves it alone
    (:func:`unless_in_use`). A fixed partial name left by a crashed attempt is removed first. If
    anything fails, the partial folder is removed and ``final`` is untouched (or, for ``"backup"``,
    still at ``<name>.previous`` if the failure came between the two renames)."""
    final = Path(final)
    partial = partial_path(final, unique=unique)
    final.parent.mkdir(parents=True, exist_ok=True)
    if not unique:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()  # plain mkdir, not mkdtemp: the renamed folder keeps the umask's mode
    try:
        with _flock(partial, exclusive=True, wait=True):
            yield partial
            if sync == "files":
                fsync_tree(partial)
            else:
                sync_filesystem(partial)
            _rename_into_place(partial, final, replace)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _rename_into_place(partial: Path, final: Path, replace: Replace) -> None:
    previous = final.with_name(final.name + ".previous")
    if replace == "delete" and final.exists():
        shutil.rmtree(final)
    elif replace == "backup":
        shutil.rmtree(previous, ignore_errors=True)
        if final.exists():
            os.replace(final, previous)
    os.replace(partial, final)
    fsync_path(final.parent)
    if replace == "backup":
        shutil.rmtree(previous, ignore_errors=True)


def delete_dir(folder: Path) -> None:
    """Delete ``folder``: renamed to its ``.partial`` name first (atomic), so a crash mid-delete
    leaves a leftover that is never mistaken for the whole folder."""
    partial = partial_path(folder)
    os.rename(folder, partial)
    shutil.rmtree(partial)


# ---- locks (the protocol is in the module docstring) ------------------------------------------


@contextmanager
def _flock(path: Path, *, exclusive: bool, wait: bool, create: bool = False) -> Iterator[bool]:
    """flock ``path`` (a file or a folder) for the ``with`` block. Yields True when held, False when
    ``wait`` is off and another process holds a conflicting lock (then nothing is held)."""
    fd = os.open(path, os.O_RDONLY | (os.O_CREAT if create else 0), 0o666)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        yield held
    finally:
        os.close(fd)


# Descriptors of the sole_writer locks this process holds: closed in a forked child (see the docstring).
_HELD_BY_THIS_PROCESS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _HELD_BY_THIS_PROCESS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_BY_THIS_PROCESS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)

WRITER_LOCK = "run.lock"


@contextmanager
def sole_writer(folder: Path, what: str = "run folder") -> Iterator[None]:
    """Be ``folder``'s one writer for the ``with`` block (``folder`` exists): an exclusive flock on
    ``<folder>/run.lock``, taken without waiting, with this process's PID written in it. Held by another
    process: a :class:`SaltUsageError` naming that process's PID. The file stays (deleting a lock file
    lets two processes lock two different files)."""
    lock = Path(folder) / WRITER_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            raise SaltUsageError(
                f"{what} {folder} is in use by another process ({f'PID {holder}' if holder else 'PID unknown'}, "
                f"holding {lock}): one process writes a run folder at a time; wait for it to end or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD_BY_THIS_PROCESS.add(fd)
        yield
    finally:
        _HELD_BY_THIS_PROCESS.discard(fd)
        os.close(fd)  # releases the lock


def _holder_pid(fd: int, attempts: int = 20) -> int | None:
    """The PID the lock's holder wrote (it writes just after locking: read again briefly while empty)."""
    for _ in range(attempts):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def store_lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


@contextmanager
def _store_lock(store: Path, *, exclusive: bool, refusal: str) -> Iterator[None]:
    """Hold ``<store>.lock`` without waiting, or refuse with ``refusal`` (``{lock}`` is filled in)."""
    lock = store_lock_path(store)
    if exclusive:
        lock.parent.mkdir(parents=True, exist_ok=True)
    elif not lock.exists():  # no build ever ran here: nothing to wait for
        yield
        return
    with _flock(lock, exclusive=exclusive, wait=False, create=exclusive) as held:
        if not held:
            raise SaltUsageError(refusal.format(lock=lock))
        yield


def build_lock(store: Path) -> AbstractContextManager[None]:
    """A build's exclusive hold on the store (a second writer is refused, not interleaved)."""
    return _store_lock(
        store,
        exclusive=True,
        refusal=(
            f"another build is writing {store}, or salt-train is taking a snapshot of it (either holds {{lock}}); "
            "wait for it to finish or stop it"
        ),
    )


def no_build_running(store: Path) -> AbstractContextManager[None]:
    """Refuse a store a build is writing, and hold it shared meanwhile so no build starts while the
    files are cloned."""
    return _store_lock(
        store,
        exclusive=False,
        refusal=(
            f"store {store} is being written by a running salt-cache build (it holds {{lock}}); "
            "wait for the build to finish, then start the run"
        ),
    )


def reading_folder(folder: Path) -> AbstractContextManager[bool]:
    """Hold a shared lock on ``folder`` while it is read: :func:`unless_in_use` leaves it alone."""
    return _flock(folder, exclusive=False, wait=True)


def unless_in_use(folder: Path) -> AbstractContextManager[bool]:
    """An exclusive lock on ``folder`` if nobody reads or stages it (yields True), else yields False
    at once: what a cleaner takes before deleting ``folder``."""
    return _flock(folder, exclusive=True, wait=False)


# ---- clones --------------------------------------------------------------------------------


def clone_file(src: Path, dst: Path) -> None:
    """Create ``dst`` sharing all of ``src``'s extents (raises OSError where cloning is unsupported)."""
    src_fd = os.open(src, os.O_RDONLY)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
