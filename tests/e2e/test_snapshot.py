"""Snapshots of a store (salt_train.snapshot), on real stores and real filesystems.

The reflink tests run on a real XFS image mounted with reflink (xfs_mount.py,
root only); the fallback tests run on this machine's tmp (ext4, which cannot clone).
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from xfs_mount import xfs_dir  # noqa: F401  (a pytest fixture)

from shared.errors import SaltUsageError
from shared.filesystem import clone_file
from shared.rows import read_row_range
from shared.store import LatentStore, RowStatus, ShardPayload, create_store, latents_shape, pixels_shape

from salt_train.snapshot import (
    check_manifest,
    list_snapshots,
    prune_snapshots,
    reuse_snapshot,
    snapshot_root,
    store_manifest,
    take_snapshot,
)

WIDTH = 8  # teacher width: latents stay tiny, pixels (2.4 MB a row) make the bytes


def make_store(path: Path, rows: int, shard_rows: int, seed: int = 0) -> LatentStore:
    """A real SALT store, every row committed with random (incompressible) pixels."""
    store = create_store(
        path,
        clip_ids=[f"clip-{i}" for i in range(rows)],
        labels=[i % 4 for i in range(rows)],
        teacher_width=WIDTH,
        shard_rows=shard_rows,
        pixels_zstd_level=0,
        attrs={},
    )
    for shard, start, stop in store.iter_shards():
        write_shard(store, shard, stop - start, np.random.default_rng(seed + shard))
    return store


def write_shard(store: LatentStore, shard: int, n: int, rng: np.random.Generator) -> None:
    store.write_shard(
        ShardPayload(
            index=shard,
            pixels=rng.integers(0, 256, pixels_shape(n), dtype=np.uint8),
            latents=rng.standard_normal(latents_shape(n, WIDTH)).astype(np.float16),
            frame_index=np.tile(np.arange(16, dtype=np.int32), (n, 1)),
            status=np.full(n, RowStatus.COMMITTED, np.uint8),
            error=[""] * n,
        )
    )


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def used_bytes(directory: Path) -> int:
    os.sync()  # XFS reserves delayed allocations, but count only settled blocks
    st = os.statvfs(directory)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextlib.contextmanager
def snapshot_log() -> Iterator[list[logging.LogRecord]]:
    """Records of logger salt_train.snapshot, whether or not the CLI's setup_logging stopped propagation."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("salt_train.snapshot")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def can_reflink(directory: Path) -> bool:
    """True if files inside ``directory`` can be cloned with FICLONE (XFS with reflink, btrfs)."""
    src, clone = directory / ".reflink-probe", directory / ".reflink-probe-clone"
    src.write_bytes(b"salt reflink probe\n")
    try:
        clone_file(src, clone)
        return True
    except OSError:
        return False
    finally:
        src.unlink()
        clone.unlink(missing_ok=True)


@pytest.fixture
def ext4_dir(tmp_path: Path) -> Path:
    """A directory where FICLONE fails (this machine's and CI's ext4 tmp)."""
    if can_reflink(tmp_path):
        pytest.skip(f"{tmp_path} can reflink, so the no-reflink fallback cannot be tested there")
    return tmp_path


# ---- reflink on XFS -----------------------------------------------------------------------


def test_reflink_cost_grows_with_files_not_bytes(xfs_dir: Path) -> None:
    small = make_store(xfs_dir / "small" / "cache", rows=2, shard_rows=1).path  # ~5 MB in 2 shards
    big = make_store(xfs_dir / "big" / "cache", rows=80, shard_rows=40).path  # ~190 MB in 2 shards
    costs = {}
    for label, store in (("small", small), ("big", big)):
        before = used_bytes(xfs_dir)
        snap = take_snapshot(store, "run-1", "reflink")
        costs[label] = (snap, used_bytes(xfs_dir) - before)
        assert snap.mode == "reflink" and snap.path == snapshot_root(store) / "run-1" / "cache"
        assert same_tree(store, snap.path)
    (small_snap, small_used), (big_snap, big_used) = costs["small"], costs["big"]
    assert small_snap.files == big_snap.files and big_snap.bytes > 30 * small_snap.bytes

    # Disk usage is the reliable measure: a clone shares the data extents, so it adds only inodes
    # and refcount metadata, whatever the bytes. Wall time is noisy (page cache, the loop device,
    # a busy CI box) and at these sizes a byte copy is also fast, so time is only checked loosely.
    assert big_used < 0.02 * big_snap.bytes, f"a 190 MB clone used {big_used} bytes of disk"
    assert big_used < small_used + (1 << 20)
    assert big_snap.seconds < 10 * small_snap.seconds + 0.5

    # The control: a real copy of the small store does take its bytes, so the measure can see them.
    before = used_bytes(xfs_dir)
    copied = take_snapshot(small, "run-copy", "copy")
    assert used_bytes(xfs_dir) - before > 0.9 * copied.bytes


def test_rewriting_live_store_leaves_snapshot_unchanged(xfs_dir: Path) -> None:
    live = make_store(xfs_dir / "rewrite" / "cache", rows=4, shard_rows=2, seed=10)
    original = read_row_range(live, 0, 4, ("pixels", "latents", "status", "pixels_checksum"))
    snap = take_snapshot(live.path, "run-1", "auto")
    assert snap.mode == "reflink"
    before = file_digests(snap.path)
    reader = LatentStore.open(snap.path)  # training has the snapshot open while the live store changes
    assert np.array_equal(read_row_range(reader, 0, 2)["pixels"], original["pixels"][:2])

    # In place, as a careless writer would: the clone's shared extents are copied on write.
    shard_file = next((live.path / "pixels").rglob("c/*/*/*/*/*"))
    with open(shard_file, "r+b") as handle:
        handle.seek(shard_file.stat().st_size // 2)
        handle.write(os.urandom(4096))
    # Wholesale, as a rebuild does (zarr writes a temporary file and renames it over the old one).
    write_shard(live, 1, 2, np.random.default_rng(99))
    (live.path / "extra.bin").write_bytes(b"new")
    assert not np.array_equal(read_row_range(live, 2, 4)["pixels"], original["pixels"][2:])

    assert file_digests(snap.path) == before
    after = read_row_range(reader, 0, 4, ("pixels", "latents", "status", "pixels_checksum"))
    for name, values in original.items():
        assert np.array_equal(after[name], values), name


def test_list_and_prune(xfs_dir: Path) -> None:
    store = make_store(xfs_dir / "prune" / "cache", rows=2, shard_rows=1).path
    take_snapshot(store, "run-1", "reflink")
    take_snapshot(store, "run-2", "copy")
    root = snapshot_root(store)
    (root / "run-3.partial" / "cache").mkdir(parents=True)  # what a crash mid-snapshot leaves
    (root / "run-3.partial" / "cache" / "zarr.json").write_text("{}")

    listed = list_snapshots(store)
    assert [(s["name"], s["mode"]) for s in listed] == [("run-1", "reflink"), ("run-2", "copy")]
    assert listed[0]["files"] > 0 and listed[0]["bytes"] > 0 and listed[0]["path"] == str(root / "run-1" / "cache")
    with pytest.raises(SaltUsageError, match="already exists"):
        take_snapshot(store, "run-2", "reflink")
    with pytest.raises(SaltUsageError, match="no snapshot named nope"):
        prune_snapshots(store, names=["nope"])

    assert sorted(prune_snapshots(store, keep=1)) == ["run-1", "run-3.partial"]
    assert [s["name"] for s in list_snapshots(store)] == ["run-2"]
    assert sorted(p.name for p in root.iterdir()) == ["run-2"]

    # A snapshot being taken right now (its folder flocked) is not a leftover.
    (root / "run-4.partial").mkdir()
    fd = os.open(root / "run-4.partial", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert prune_snapshots(store, names=["run-2"]) == ["run-2"]
        assert (root / "run-4.partial").is_dir()
    finally:
        os.close(fd)
    assert prune_snapshots(store) == ["run-4.partial"] and list_snapshots(store) == []


def test_many_files(xfs_dir: Path) -> None:
    # The snapshot is file-level: any tree of regular files, here more than the progress-bar threshold.
    store = xfs_dir / "many" / "cache"
    for i in range(1200):
        path = store / f"a{i % 7}" / "c" / str(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(i % 300))
    snap = take_snapshot(store, "run-1", "auto")
    assert snap.mode == "reflink" and snap.files == 1200 and same_tree(store, snap.path)
    assert len(store_manifest(store)["checksums"]) == 1200  # none of it is pixels/latents: all hashed


# ---- no reflink (ext4): fallback, copy, manifest ------------------------------------------


def test_auto_without_reflink_reads_live_store_loudly(ext4_dir: Path) -> None:
    store = make_store(ext4_dir / "cache", rows=4, shard_rows=2).path
    with snapshot_log() as records:
        snap = take_snapshot(store, "run-1", "auto")
    assert snap.mode == "none" and snap.path == store and snap.manifest is not None
    assert snap.files == len(snap.manifest["files"]) > 10
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "live store" in warnings[0] and "--snapshot copy" in warnings[0]
    assert not snapshot_root(store).exists()  # nothing left beside the store

    with pytest.raises(SaltUsageError, match="--snapshot copy"):
        take_snapshot(store, "run-2", "reflink")


def test_manifest_detects_changes(ext4_dir: Path) -> None:
    live = make_store(ext4_dir / "cache", rows=4, shard_rows=2)
    manifest = take_snapshot(live.path, "run-1", "none").manifest
    assert json.loads(json.dumps(manifest)) == manifest  # goes into run.json as is
    assert check_manifest(live.path, manifest) == []
    zarr_json = live.path / "zarr.json"
    zarr_json.write_bytes(zarr_json.read_bytes())  # same bytes rewritten: no change
    assert check_manifest(live.path, manifest) == []

    shard_file = next((live.path / "pixels").rglob("c/*/*/*/*/*"))
    rel = str(shard_file.relative_to(live.path))
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    time.sleep(0.01)  # a distinct mtime even on coarse clocks
    shard_file.write_bytes(bytes(data))
    assert check_manifest(live.path, manifest) == [f"changed: {rel} (modified since)"]

    manifest = store_manifest(live.path)
    live.arrays["status"][1] = RowStatus.FAILED  # a rebuild's commit record, same file size
    assert check_manifest(live.path, manifest) == ["changed: status/c/0 (content)"]

    (live.path / "extra.bin").write_bytes(b"x")
    (live.path / "label" / "c" / "0").unlink()
    assert check_manifest(live.path, manifest) == [
        "removed: label/c/0",
        "added: extra.bin",
        "changed: status/c/0 (content)",
    ]


def test_copy_without_reflink(ext4_dir: Path) -> None:
    store = make_store(ext4_dir / "cache", rows=2, shard_rows=1).path
    (store / "pixels" / "c" / "leftover.partial").write_bytes(b"a killed writer's temp file")
    snap = take_snapshot(store, "run-1", "copy")
    assert snap.mode == "copy" and snap.manifest is None
    (store / "pixels" / "c" / "leftover.partial").unlink()  # never part of the store, not copied
    assert same_tree(store, snap.path)
    assert LatentStore.open(snap.path).counts()["committed"] == 2
    assert [s["mode"] for s in list_snapshots(store)] == ["copy"]


def test_reuse_snapshot(ext4_dir: Path) -> None:
    store = make_store(ext4_dir / "cache", rows=2, shard_rows=1)
    record = json.loads(json.dumps(take_snapshot(store.path, "run-1", "copy").to_record()))  # via run.json
    assert reuse_snapshot(record).path == Path(record["path"])
    prune_snapshots(store.path, names=["run-1"])
    with pytest.raises(SaltUsageError, match="is gone"):
        reuse_snapshot(record)

    live = json.loads(json.dumps(take_snapshot(store.path, "run-2", "none").to_record()))
    assert reuse_snapshot(live).path == store.path
    store.arrays["status"][0] = RowStatus.FAILED
    with pytest.raises(SaltUsageError, match="changed since this run started") as err:
        reuse_snapshot(live)
    assert "\n" not in str(err.value) and "status/c/0" in str(err.value)


def test_refuses_store_being_built(ext4_dir: Path) -> None:
    store = make_store(ext4_dir / "cache", rows=2, shard_rows=1).path
    with open(store.with_name("cache.lock"), "a") as lock:  # what shared.store.build_lock holds
        fcntl.flock(lock, fcntl.LOCK_EX)
        for mode in ("auto", "copy", "none"):
            with pytest.raises(SaltUsageError, match="being written by a running salt-cache build"):
                take_snapshot(store, f"run-{mode}", mode)
    assert take_snapshot(store, "run-1", "copy").mode == "copy"  # lock released: fine


def test_bad_input(ext4_dir: Path) -> None:
    with pytest.raises(SaltUsageError, match="does not exist"):
        take_snapshot(ext4_dir / "missing", "run-1")
    store = make_store(ext4_dir / "cache", rows=2, shard_rows=1).path
    for name in ("", "a/b", ".hidden", "run.partial"):
        with pytest.raises(SaltUsageError, match="cannot name a snapshot"):
            take_snapshot(store, name, "copy")
    with pytest.raises(SaltUsageError, match="choose one of"):
        take_snapshot(store, "run-1", "fast")
    (store / "outside").symlink_to(ext4_dir)
    with pytest.raises(SaltUsageError, match="symlink"):
        take_snapshot(store, "run-1", "copy")
    shutil.rmtree(store)
    assert list_snapshots(store) == [] and prune_snapshots(store) == []
