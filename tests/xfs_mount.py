"""A real XFS filesystem with reflink, mounted on a loop device, for the snapshot tests.

Why real: FICLONE's O(files) cost and copy-on-write isolation are properties of
the filesystem; ext4 (this machine's and CI's disk) cannot clone at all. The
image is a sparse file, so only the blocks the tests write take disk space.

Needs root (mount), xfsprogs (mkfs.xfs) and a loop device. CI installs
xfsprogs and runs as root (.ci/run). Elsewhere the fixture skips and says why;
set SALT_REQUIRE_XFS=1 to turn that skip into a failure (so CI cannot pass by skipping).

Use: ``from xfs_mount import xfs_dir`` in a test module, then take ``xfs_dir``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

IMAGE_BYTES = 1 << 30  # sparse; XFS wants >= 300 MB, and the tests hold a 200 MB store plus a copy


def _unavailable(reason: str) -> None:
    if os.environ.get("SALT_REQUIRE_XFS") == "1":
        pytest.fail(f"XFS test filesystem required (SALT_REQUIRE_XFS=1) but unavailable: {reason}")
    pytest.skip(f"no XFS test filesystem: {reason}")


def _mkfs_xfs() -> str | None:
    # /sbin is not on every PATH (sudo-less shells, CI containers)
    return shutil.which("mkfs.xfs") or next(
        (p for p in ("/usr/sbin/mkfs.xfs", "/sbin/mkfs.xfs") if os.access(p, os.X_OK)), None
    )


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)


def _tail(proc: subprocess.CompletedProcess) -> str:
    """The last line the command printed (its error), for a one-line skip reason."""
    lines = (proc.stderr + proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


@pytest.fixture(scope="session")
def xfs_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh, empty directory on a mounted XFS filesystem created with ``-m reflink=1``."""
    if os.geteuid() != 0:
        _unavailable("mounting a loop device needs root (CI runs the suite as root)")
    mkfs = _mkfs_xfs()
    if mkfs is None:
        _unavailable("mkfs.xfs not found: install xfsprogs (apt-get install -y xfsprogs)")
    base = tmp_path_factory.mktemp("xfs")
    image, mountpoint = base / "xfs.img", base / "mnt"
    mountpoint.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(IMAGE_BYTES)
    made = _run(mkfs, "-q", "-m", "reflink=1", "-f", image)
    if made.returncode != 0:
        image.unlink()
        _unavailable(f"mkfs.xfs -m reflink=1 failed: {_tail(made)}")
    mounted = _run("mount", "-t", "xfs", "-o", "loop", image, mountpoint)
    if mounted.returncode != 0:
        image.unlink()
        _unavailable(f"mount -o loop of the XFS image failed (no loop device? no privilege?): {_tail(mounted)}")
    try:
        work = mountpoint / "work"
        work.mkdir()
        yield work
    finally:
        if _run("umount", mountpoint).returncode != 0:
            _run("umount", "-l", mountpoint)  # something still open: detach now, freed when closed
        image.unlink(missing_ok=True)
