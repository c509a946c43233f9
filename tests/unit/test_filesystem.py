"""shared.filesystem: stage-then-rename survives a kill -9 and a failure; the locks keep each other out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import SaltUsageError
from shared.filesystem import (
    atomic_dir,
    atomic_file,
    build_lock,
    no_build_running,
    reading_folder,
    store_lock_path,
    unless_in_use,
    write_text_atomic,
)

_WRITE_AND_HANG = """
import sys, time
from pathlib import Path
from shared.filesystem import atomic_dir, atomic_file
kind, path = sys.argv[1], Path(sys.argv[2])
staged = atomic_file(path) if kind == "file" else atomic_dir(path, replace="delete")
with staged as partial:
    if kind == "file":
        partial.write_bytes(b"new " * 100_000)
    else:
        (partial / "weights").write_bytes(b"new " * 100_000)
    print("staged", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_kill_9_mid_write_leaves_the_old_version_whole(kind: str, tmp_path: Path) -> None:
    final = tmp_path / "thing"
    if kind == "file":
        write_text_atomic(final, "old")
    else:
        with atomic_dir(final) as partial:
            (partial / "weights").write_text("old")
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITE_AND_HANG, kind, str(final)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert child.stdout.readline().strip() == "staged"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (final if kind == "file" else final / "weights").read_text() == "old"
    assert (tmp_path / "thing.partial").exists()  # the killed write's leftover, never a half final...
    with atomic_dir(final, replace="delete") if kind == "dir" else atomic_file(final) as partial:
        (partial / "weights" if kind == "dir" else partial).write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]  # ...and the next write of it clears it
    assert (final if kind == "file" else final / "weights").read_text() == "new"


@pytest.mark.parametrize("replace", ["empty", "delete", "backup"])
def test_atomic_dir_replaces_as_asked_and_a_failure_changes_nothing(replace: str, tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "a").write_text("old")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_dir(final, replace=replace) as partial:
        (partial / "a").write_text("half")
        raise RuntimeError("mid-write")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "a").read_text() == "old"

    staged = atomic_dir(final, replace=replace)
    if replace == "empty":  # rename(2) replaces only an empty folder
        with pytest.raises(OSError), staged as partial:
            (partial / "a").write_text("new")
        assert (final / "a").read_text() == "old"
        (final / "a").unlink()
        staged = atomic_dir(final, replace=replace)
    with staged as partial:
        (partial / "a").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (final / "a").read_text() == "new"


def test_the_store_lock_refuses_a_second_build_and_a_snapshot(tmp_path: Path) -> None:
    store = tmp_path / "latents.zarr"
    with no_build_running(store):  # no build ever ran: nothing to wait for, nothing created
        pass
    assert not store_lock_path(store).exists()
    with build_lock(store):
        with pytest.raises(SaltUsageError, match="another build is writing"), build_lock(store):
            pass
        with (
            pytest.raises(SaltUsageError, match="being written by a running salt-cache build"),
            no_build_running(store),
        ):
            pass
    # A snapshot holds it shared: a build is refused meanwhile.
    with no_build_running(store), pytest.raises(SaltUsageError, match="another build is writing"), build_lock(store):
        pass


def test_a_folder_read_or_staged_is_left_alone_by_a_cleaner(tmp_path: Path) -> None:
    folder = tmp_path / "snapshot"
    folder.mkdir()
    with reading_folder(folder), unless_in_use(folder) as free:
        assert not free
    with unless_in_use(folder) as free:
        assert free
    with atomic_dir(tmp_path / "taking") as partial, unless_in_use(partial) as free:
        assert not free
