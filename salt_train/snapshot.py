"""Snapshots of a latent-cache store: what `salt-train run` reads instead of the live store.

Why: a store can be rebuilt (`salt-cache build --retry-failed`, a re-run) while a
run is training from it, and a run must read one fixed set of bytes from start
to finish (and again on ``--resume``). A reflink (FICLONE) clone of every file
shares the data extents with the live store, so it costs O(files), not O(bytes),
and a later rewrite of the live store copies-on-write away from the snapshot.

Modes (``--snapshot``):
  reflink  clone every file, or refuse where the filesystem cannot (ext4, tmpfs)
  copy     a full byte copy: explicit, since it can be terabytes
  none     read the live store; its manifest is recorded so a change is detected
  auto     reflink where the filesystem can, else ``none`` with a loud warning

Layout, beside the store so a clone stays on the same filesystem::

    <store>.snapshots/<name>/snapshot.json     what, when, how many files and bytes
    <store>.snapshots/<name>/<store name>/     the cloned store (what training opens)
    <store>.snapshots/<name>.partial/          a snapshot being taken (or a crashed one)

A snapshot is built under ``<name>.partial`` and renamed into place last, so a
crash never leaves a half snapshot that looks whole. The locks that keep a build, a
snapshot, a run and a prune out of each other's way are ``shared.filesystem``'s.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from shared.config import SnapshotMode
from shared.console import format_bytes, progress
from shared.errors import SaltUsageError
from shared.filesystem import (
    PARTIAL_SUFFIX,
    atomic_dir,
    clone_file,
    delete_dir,
    no_build_running,
    partial_path,
    reading_folder,
    unless_in_use,
)

log = logging.getLogger(__name__)

SNAPSHOT_MODES = get_args(SnapshotMode)
RECORD_FILE = "snapshot.json"
RECORD_FORMAT = "salt-train-snapshot"
ROOT_SUFFIX = ".snapshots"
MANIFEST_VERSION = 1
# The two big arrays are not hashed (that would read every byte); each of their rows has a
# checksum (crc32c) in pixels_checksum / latents_checksum, which are
# hashed, so a rebuilt row still shows. Every other file (zarr.json, status, checksums, labels, ...) is O(rows)
# and hashed.
UNHASHED_ARRAYS = ("pixels", "latents")
PROGRESS_MIN_FILES = 1000


@dataclass
class Snapshot:
    mode: str  # "reflink", "copy" or "none": what was actually done
    path: Path  # the directory training reads (the live store itself for "none")
    source: Path  # the live store
    name: str  # the run name it was taken for
    files: int
    bytes: int  # logical bytes of the files
    seconds: float
    manifest: dict | None  # for "none": the live store's manifest, re-checked on --resume

    def to_record(self) -> dict:
        """JSON-able, for the run folder's run.json (and :func:`reuse_snapshot` on --resume)."""
        return {
            "mode": self.mode,
            "path": str(self.path),
            "source": str(self.source),
            "name": self.name,
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 4),
            "manifest": self.manifest,
        }

    @classmethod
    def from_record(cls, record: dict) -> Snapshot:
        """The snapshot a run recorded (:meth:`to_record`); a damaged record is a usage error."""
        try:
            snapshot = cls(
                mode=str(record["mode"]),
                path=Path(record["path"]),
                source=Path(record["source"]),
                name=str(record["name"]),
                files=int(record["files"]),
                bytes=int(record["bytes"]),
                seconds=float(record["seconds"]),
                manifest=record.get("manifest"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SaltUsageError(
                f"the run's snapshot record is damaged ({type(exc).__name__}: {exc}); start a new run"
            ) from None
        if snapshot.mode not in ("reflink", "copy", "none"):
            raise SaltUsageError(f"the run's snapshot record has unknown mode {snapshot.mode!r}; start a new run")
        return snapshot


# ---- where snapshots live, and whether the filesystem can clone ---------------------------


def snapshot_root(store: Path) -> Path:
    """``<store>.snapshots`` beside the store: the same filesystem, so a reflink can work."""
    store = Path(store).resolve()
    return store.with_name(store.name + ROOT_SUFFIX)


def _clone_works(directory: Path, src: Path | None = None) -> bool:
    """Clone ``src`` (or a tiny temp file) into ``directory``; True if the kernel did it."""
    directory = Path(directory)
    made: list[Path] = []
    try:
        if src is None:
            fd, name = tempfile.mkstemp(prefix=".reflink-probe-", dir=directory)
            src = Path(name)
            made.append(src)
            os.write(fd, b"salt reflink probe\n")
            os.close(fd)
        dst = directory / f".reflink-probe-{os.getpid()}-{time.monotonic_ns()}"
        made.append(dst)
        clone_file(src, dst)
        return True
    except OSError as exc:
        log.debug("FICLONE into %s failed: %s", directory, exc)
        return False
    finally:
        for path in made:
            path.unlink(missing_ok=True)


# ---- walking a store ---------------------------------------------------------------------


def _check_store(store: Path) -> Path:
    store = Path(store)
    if not store.exists():
        raise SaltUsageError(f"store {store} does not exist")
    if not store.is_dir():
        raise SaltUsageError(f"store {store} is not a directory (a Zarr store is a folder)")
    return store.resolve()


def _walk(store: Path) -> tuple[list[str], list[tuple[str, int, int]]]:
    """The store's directories and its files as (relative path, size, mtime_ns), sorted.
    Zarr's temporary ``*.partial`` files (a write in flight or a killed writer's) are never part
    of the store and are skipped. A symlink is refused: a clone of it would still point at live data."""
    dirs: list[str] = []
    files: list[tuple[str, int, int]] = []
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(store / rel_dir) as entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_symlink():
                    raise SaltUsageError(
                        f"store {store} holds a symlink ({rel}); a snapshot clones regular "
                        "files only: replace the link by the data, or use --snapshot none"
                    )
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(rel)
                    pending.append(rel)
                elif entry.is_file(follow_symlinks=False):
                    if entry.name.endswith(PARTIAL_SUFFIX):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                    files.append((rel, stat.st_size, stat.st_mtime_ns))
                else:
                    raise SaltUsageError(f"store {store} holds {rel}, which is not a regular file or folder")
    return sorted(dirs), sorted(files)


# ---- manifest: detecting a change of the live store ---------------------------------------


def _hashed(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1] == "zarr.json" or rel.split("/", 1)[0] not in UNHASHED_ARRAYS


def _blake2b(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def store_manifest(store: Path) -> dict:
    """Every file's size and mtime, plus content hashes of everything but the two big arrays:
    O(files + rows) work, cheap for a multi-TB store (see UNHASHED_ARRAYS)."""
    store = _check_store(store)
    _, files = _walk(store)
    return {
        "version": MANIFEST_VERSION,
        "algorithm": "blake2b-128",
        "files": {rel: [size, mtime_ns] for rel, size, mtime_ns in files},
        "checksums": {rel: _blake2b(store / rel) for rel, _, _ in files if _hashed(rel)},
    }


def check_manifest(store: Path, manifest: dict) -> list[str]:
    """Differences between the store now and ``manifest`` (human-readable); [] if unchanged."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise SaltUsageError("the recorded store manifest is damaged (no 'files' mapping)")
    if manifest.get("version") != MANIFEST_VERSION:
        raise SaltUsageError(
            f"the recorded store manifest has version {manifest.get('version')!r}, "
            f"this salt-train reads {MANIFEST_VERSION}"
        )
    if not Path(store).is_dir():
        return [f"the store {store} no longer exists"]
    now = store_manifest(store)
    old_files, new_files = manifest["files"], now["files"]
    old_sums, new_sums = manifest.get("checksums", {}), now["checksums"]
    differences = [f"removed: {rel}" for rel in sorted(old_files.keys() - new_files.keys())]
    differences += [f"added: {rel}" for rel in sorted(new_files.keys() - old_files.keys())]
    for rel in sorted(old_files.keys() & new_files.keys()):
        (old_size, old_mtime), (new_size, new_mtime) = old_files[rel], new_files[rel]
        if old_size != new_size:
            differences.append(f"changed: {rel} (size {old_size} -> {new_size} bytes)")
        elif rel in old_sums and rel in new_sums:
            if old_sums[rel] != new_sums[rel]:  # same bytes rewritten (new mtime) is no change
                differences.append(f"changed: {rel} (content)")
        elif old_mtime != new_mtime:  # a big-array shard: rewritten, maybe with new rows
            differences.append(f"changed: {rel} (modified since)")
    return differences


# ---- taking a snapshot -------------------------------------------------------------------


def _check_name(name: str) -> None:
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\0" in name
        or name.startswith(".")
        or name.endswith(PARTIAL_SUFFIX)
    ):
        raise SaltUsageError(
            f"{name!r} cannot name a snapshot (one folder name, not hidden, not ending in {PARTIAL_SUFFIX})"
        )


@contextmanager
def reading_snapshot(snapshot: Snapshot) -> Iterator[None]:
    """Hold a shared lock on a snapshot while a run reads it: prune leaves it alone."""
    if snapshot.mode == "none":  # the live store itself: nothing to protect from prune
        yield
        return
    with reading_folder(snapshot.path.parent):
        yield


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def _reflink_refusal(store: Path, root: Path) -> SaltUsageError:
    return SaltUsageError(
        f"--snapshot reflink: the filesystem of {root} cannot clone files from {store} (FICLONE is "
        "unsupported there; it needs XFS with reflink or btrfs, both holding store and snapshots); "
        "use --snapshot copy (a full copy) or --snapshot none (read the live store), "
        "or put the store on XFS/btrfs"
    )


def _finished_by(final: Path, owner: Path | None, mode: str, store: Path) -> Snapshot | None:
    """The snapshot at ``final`` if ``owner`` (a run folder) finished it in ``mode``: a run stopped between
    finishing its snapshot and recording it uses it as it is (it was flushed before it got its name)."""
    if owner is None:
        return None
    try:
        record = json.loads((final / RECORD_FILE).read_text())
        if (
            record.get("owner") != str(Path(owner).resolve())
            or record.get("mode") != mode
            or record.get("source") != str(store)
        ):
            return None
        return Snapshot(
            mode=mode,
            path=final / record["store_dir"],
            source=store,
            name=final.name,
            files=int(record["files"]),
            bytes=int(record["bytes"]),
            seconds=float(record["seconds"]),
            manifest=None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _materialize(store: Path, root: Path, name: str, mode: str, owner: Path | None = None) -> Snapshot:
    """Clone (or copy) every file of ``store`` into ``<root>/<name>``, atomically."""
    started = time.perf_counter()
    final = root / name
    if final.exists():
        finished = _finished_by(final, owner, mode, store)
        if finished is not None:
            log.info("using snapshot %s (%s), which this run finished before it was stopped", final, mode)
            return finished
        raise SaltUsageError(
            f"a snapshot named {name} already exists at {final}; "
            "pick another run name, or remove it with `salt-train snapshots prune --name`"
        )
    if partial_path(final).exists():  # atomic_dir removes it
        log.warning("removing %s, left by an interrupted snapshot of the same name", partial_path(final))
    # Flushed with one syncfs, not an fsync per clone: every clone durable before the snapshot claims to exist.
    with atomic_dir(final, sync="filesystem") as partial:
        dirs, files = _walk(store)
        total = sum(size for _, size, _ in files)
        if mode == "copy":
            free = shutil.disk_usage(root).free
            log.info(
                "copying %d files, %s, from %s (a full copy: --snapshot copy)", len(files), format_bytes(total), store
            )
            if total > free:
                raise SaltUsageError(
                    f"--snapshot copy needs {format_bytes(total)} but {root} has "
                    f"{format_bytes(free)} free; free space, use --snapshot none, "
                    "or put the store on XFS/btrfs (reflink)"
                )
        target = partial / store.name
        target.mkdir()
        for rel in dirs:
            (target / rel).mkdir()
        bar = (
            progress(total=len(files), description=f"snapshot ({mode})", unit="file")
            if len(files) > PROGRESS_MIN_FILES
            else None
        )
        for rel, _size, _ in files:
            try:
                if mode == "copy":
                    shutil.copyfile(store / rel, target / rel)
                else:
                    clone_file(store / rel, target / rel)
            except OSError as exc:
                if mode == "reflink" and exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    raise _reflink_refusal(store, root) from None
                verb = "copying" if mode == "copy" else "cloning"
                raise SaltUsageError(f"snapshot of {store} failed {verb} {rel}: {exc.strerror or exc}") from None
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        record = {
            "format": RECORD_FORMAT,
            "mode": mode,
            "name": name,
            "source": str(store),
            "store_dir": store.name,
            "created": _now_iso(),
            "files": len(files),
            "bytes": total,
            "seconds": round(time.perf_counter() - started, 4),  # the final flush not included
            "owner": str(Path(owner).resolve()) if owner is not None else None,
        }
        (partial / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    seconds = time.perf_counter() - started
    log.info(
        "snapshot %s (%s) of %s: %d files, %s in %.2f s -> %s",
        name,
        mode,
        store,
        len(files),
        format_bytes(total),
        seconds,
        final / store.name,
    )
    return Snapshot(
        mode=mode,
        path=final / store.name,
        source=store,
        name=name,
        files=len(files),
        bytes=total,
        seconds=seconds,
        manifest=None,
    )


def _live(store: Path, name: str) -> Snapshot:
    started = time.perf_counter()
    manifest = store_manifest(store)
    sizes = [size for size, _ in manifest["files"].values()]
    return Snapshot(
        mode="none",
        path=store,
        source=store,
        name=name,
        files=len(sizes),
        bytes=sum(sizes),
        seconds=time.perf_counter() - started,
        manifest=manifest,
    )


def take_snapshot(store: Path, name: str, mode: str = "auto", owner: Path | None = None) -> Snapshot:
    """Snapshot ``store`` for the run ``name`` (see the module docstring for the modes). ``owner``: the run
    folder, recorded in the snapshot, so that the run, stopped before it recorded a snapshot it finished,
    takes that one again rather than being refused for the name."""
    if mode not in SNAPSHOT_MODES:
        raise SaltUsageError(f"--snapshot {mode!r}: choose one of {', '.join(SNAPSHOT_MODES)}")
    _check_name(name)
    store = _check_store(store)
    with no_build_running(store):
        if mode == "none":
            log.info("--snapshot none: reading the live store %s; its manifest is recorded", store)
            return _live(store, name)
        root: Path | None  # None: "auto" could not make it
        root = snapshot_root(store)
        try:
            root.mkdir(exist_ok=True)
        except OSError as exc:
            if mode != "auto":
                raise SaltUsageError(f"cannot create the snapshot folder {root}: {exc.strerror or exc}") from None
            root = None
        if mode in ("auto", "reflink"):
            # Probe with a real store file: it also catches a store on another filesystem than its root.
            probe = store / "zarr.json"
            clones = root is not None and _clone_works(root, probe if probe.is_file() else None)
            if mode == "reflink" and not clones:
                assert root is not None  # only "auto" goes on without its folder
                raise _reflink_refusal(store, root)
            if mode == "auto" and clones:
                mode = "reflink"
            elif mode == "auto":
                if root is not None:
                    _remove_if_empty(root)  # no litter beside the store on every run
                log.warning(
                    "NO SNAPSHOT: %s cannot be cloned (reflink) where its snapshots would live (%s), so training "
                    "reads the live store: a salt-cache build rewriting it during training would change what "
                    "is read (the recorded manifest detects that on --resume). To get a snapshot, keep the "
                    "store on XFS (reflink=1) or btrfs, or pass --snapshot copy (a full copy); "
                    "--snapshot none silences this warning.",
                    store,
                    snapshot_root(store),
                )
                return _live(store, name)
        assert root is not None  # "auto" without its folder read the live store above
        return _materialize(store, root, name, mode, owner)


# ---- resuming, listing, pruning ------------------------------------------------------------


def reuse_snapshot(record: dict) -> Snapshot:
    """The snapshot a run recorded in run.json, checked before a --resume reads it again."""
    snapshot = Snapshot.from_record(record)
    if snapshot.mode == "none":
        if snapshot.manifest is None:
            raise SaltUsageError("the run read the live store but recorded no manifest; start a new run")
        differences = check_manifest(snapshot.source, snapshot.manifest)
        if differences:
            raise SaltUsageError(
                f"the live store {snapshot.source} changed since this run started (it read the store itself, "
                f"--snapshot none): {len(differences)} difference(s), e.g. {'; '.join(differences[:3])}; "
                "resuming would mix data: start a new run (on XFS/btrfs it gets a reflink snapshot)"
            )
        log.warning(
            "NO SNAPSHOT: resuming on the live store %s, as this run started (its manifest is unchanged since)",
            snapshot.source,
        )
        return snapshot
    if not snapshot.path.is_dir():
        raise SaltUsageError(
            f"the snapshot this run read ({snapshot.path}) is gone (pruned?); a resumed run must "
            "read the same data: start a new run instead of --resume"
        )
    log.info("resuming on snapshot %s (%s)", snapshot.path, snapshot.mode)
    return snapshot


def list_snapshots(store: Path) -> list[dict]:
    """Finished snapshots of ``store``, oldest first (``.partial`` leftovers are not listed)."""
    root = snapshot_root(store)
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.endswith(PARTIAL_SUFFIX):
            continue
        try:
            record = json.loads((entry / RECORD_FILE).read_text())
            item = {
                "name": entry.name,
                "path": str(entry / record["store_dir"]),
                "mode": record["mode"],
                "files": record["files"],
                "bytes": record["bytes"],
                "created": record["created"],
                "source": record.get("source"),
                "seconds": record.get("seconds"),
            }
            dt.datetime.fromisoformat(item["created"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s is not a readable snapshot (%s: %s); remove it by hand", entry, type(exc).__name__, exc)
            continue
        found.append(item)
    return sorted(found, key=lambda item: (dt.datetime.fromisoformat(item["created"]), item["name"]))


def _remove_partials(root: Path) -> list[str]:
    """Delete leftovers of interrupted snapshots; one still being built (flocked) is left alone."""
    removed = []
    for entry in sorted(root.glob(f"*{PARTIAL_SUFFIX}")):
        if not entry.is_dir():
            continue
        with unless_in_use(entry) as free:
            if not free:
                log.info("%s is being taken right now; left alone", entry.name)
                continue
            shutil.rmtree(entry)
        removed.append(entry.name)
    return removed


def prune_snapshots(store: Path, keep: int = 0, names: list[str] | None = None) -> list[str]:
    """Delete the named snapshots, or all but the ``keep`` newest, and any interrupted ones.
    Returns the names removed. A reflink snapshot frees only the extents the live store no longer shares."""
    if keep < 0:
        raise SaltUsageError(f"--keep {keep}: must be 0 or more")
    root = snapshot_root(store)
    present = list_snapshots(store)
    if names:
        unknown = sorted(set(names) - {item["name"] for item in present})
        if unknown:
            have = ", ".join(item["name"] for item in present) or "none"
            raise SaltUsageError(f"no snapshot named {', '.join(unknown)} of {store} (have: {have})")
        doomed = [item["name"] for item in present if item["name"] in names]
    else:
        doomed = [item["name"] for item in present[: max(len(present) - keep, 0)]]
    if not root.is_dir():
        return []
    removed = _remove_partials(root)
    for name in doomed:
        with unless_in_use(root / name) as free:
            if not free:
                log.warning("snapshot %s is being read by a running salt-train run: kept", name)
                continue
            delete_dir(root / name)  # a crash mid-delete leaves a .partial leftover, never half a snapshot
        removed.append(name)
        log.info("removed snapshot %s", name)
    return removed
