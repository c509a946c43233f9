"""The latent-cache store: one Zarr v3 group, one row per clip view (docs/DESIGN.md).

Layout: every per-row array is cut into shards of ``shard_rows`` rows; the two
big arrays (``pixels``, ``latents``) hold one chunk per row inside each shard
file, so a shard is one file and a row is one cheap range read.

Commit protocol (why a row is never half-written): the writer writes a whole
shard at a time. Zarr's LocalStore writes every file to a temporary name and
renames it into place, so a file is either the old or the new one. We write all
data arrays of the shard, fsync them, and only then write the shard's ``status``
chunk (committed or failed per row) and fsync it. A crash at any point leaves
the shard's rows pending, and a resumed build redoes the whole shard.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, cast

import google_crc32c
import numpy as np
import zarr
import zarr.codecs
from zarr.core.metadata import ArrayV3Metadata

from shared import geometry
from shared.errors import SaltUsageError
from shared.filesystem import atomic_dir, fsync_path
from shared.shard_format import CHUNK_KEY_ENCODING, rows_per_file, shard_path
from shared.shard_reader import RawRows, open_raw_rows
from shared.shard_writer import ShardFileWriter, open_shard_writer

log = logging.getLogger(__name__)

STORE_FORMAT = "salt-latent-cache"
SCHEMA_VERSION = 1
ATTRS_KEY = "salt"
# Per-row checksums, recorded in the store's attributes; a store of any other algorithm is refused at open.
CHECKSUM_ALGORITHM = "crc32c of the row's C-order bytes"
CHECKSUM_ARRAYS = {"pixels": "pixels_checksum", "latents": "latents_checksum"}  # the array holding each's digests

# Arrays written shard by shard, status last (it is the commit record).
DATA_ARRAYS = ("pixels", "latents", "frame_index", "pixels_checksum", "latents_checksum", "error")
FILE_WRITTEN_ARRAYS = ("pixels", "latents")  # written by shared.shard_writer, not zarr (when the layout fits)
CONTRACT_ARRAYS = ("pixels", "latents", "clip_id", "label", "frame_index", "status")
ALL_ARRAYS = tuple(dict.fromkeys(CONTRACT_ARRAYS + DATA_ARRAYS))
# Only in stores of several views per clip (attribute views_per_clip >= 2; row = clip * K + k):
# view_index is written at creation like clip_id, crop_box shard by shard like frame_index.
VIEW_ARRAYS = ("view_index", "crop_box")
VIEW_DATA_ARRAYS = ("crop_box",)
# Absent from a pixels-only store (attribute ``pixels_only``; salt-cache build --pixels-only): it holds the
# views for stage 1 (salt-train teacher) and for a later build of latents from it (salt-cache build --from-store).
LATENT_ARRAYS = ("latents", "latents_checksum")
CROP_BOX_FIELDS = ("top", "left", "height", "width")  # in source-frame pixels


class RowStatus(IntEnum):
    PENDING = 0
    COMMITTED = 1
    FAILED = 2


# Reported (never stored) for rows whose status chunk cannot be read: a damaged commit record.
STATUS_UNREADABLE = 255


def row_checksum(row: np.ndarray) -> int:
    """A digest of one row's bytes, stored beside the row and re-checked by verify and the loader.
    CRC32C detects every burst of up to 32 flipped bits, so any single damaged byte."""
    return int(google_crc32c.value(np.ascontiguousarray(row).reshape(-1).view(np.uint8)))


def clip_ids_sha256(clip_ids: list[str]) -> str:
    """Digest of the row order (part of a store's identity; verify re-checks the clip_id array)."""
    return hashlib.sha256("\n".join(clip_ids).encode()).hexdigest()


def labels_sha256(labels: np.ndarray | Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(labels, dtype="<i4").tobytes()).hexdigest()


def pixels_shape(rows: int) -> tuple[int, ...]:
    return (rows, geometry.NUM_FRAMES, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE, 3)


def latents_shape(rows: int, width: int) -> tuple[int, ...]:
    return (rows, geometry.NUM_TOKENS, width)


@dataclass
class ShardPayload:
    """Everything the writer needs for one shard. Failed rows carry zeros and a reason."""

    index: int
    pixels: np.ndarray  # uint8 [n, 16, 224, 224, 3]
    latents: np.ndarray  # float16 [n, 1568, D]
    frame_index: np.ndarray  # int32 [n, 16]
    status: np.ndarray  # uint8 [n], COMMITTED or FAILED, never PENDING
    error: list[str]  # "" for committed rows
    crop_box: np.ndarray | None = None  # int32 [n, 4], stores of several views per clip only (-1: failed)

    def check(self) -> None:
        n = len(self.status)
        if not (len(self.pixels) == len(self.latents) == len(self.frame_index) == len(self.error) == n):
            raise ValueError("shard payload arrays disagree on row count")
        if self.crop_box is not None and len(self.crop_box) != n:
            raise ValueError("shard payload arrays disagree on row count")
        if np.any(self.status == RowStatus.PENDING):
            raise ValueError("a shard is written only once every row is committed or failed")


def status_counts(status: np.ndarray) -> dict[str, int]:
    """Rows per status; ``other`` counts values outside 0/1/2 (a damaged status chunk), never trained on."""
    counts = {
        "rows": len(status),
        "committed": int(np.sum(status == RowStatus.COMMITTED)),
        "failed": int(np.sum(status == RowStatus.FAILED)),
        "pending": int(np.sum(status == RowStatus.PENDING)),
    }
    counts["other"] = counts["rows"] - counts["committed"] - counts["failed"] - counts["pending"]
    return counts


def _damaged_attrs(attrs: dict[str, Any]) -> str:
    """What is wrong with the attributes the code relies on ("" when sound)."""
    shard_rows = attrs.get("shard_rows")
    if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows <= 0:
        return f"shard_rows is {shard_rows!r}"
    for key in ("identity", "teacher", "source", "view"):
        if key in attrs and not isinstance(attrs[key], dict):
            return f"{key} is {type(attrs[key]).__name__}, not a mapping"
    views = attrs.get("views_per_clip", 1)
    if not isinstance(views, int) or isinstance(views, bool) or views <= 0:
        return f"views_per_clip is {views!r}"
    return ""


class LatentStore:
    """Reader and writer of one store. Open with :meth:`open` or :func:`create_store`."""

    def __init__(self, path: Path, group: zarr.Group, arrays: dict[str, zarr.Array]) -> None:
        self.path = path
        self.group = group
        self.arrays = arrays  # opened once: each group[name] re-reads the array's metadata
        # open() checked that the SALT attributes are a mapping (zarr types them as any JSON value).
        self.attrs: dict[str, Any] = dict(cast("dict[str, Any]", group.attrs.get(ATTRS_KEY, {})))
        self.shard_rows = int(self.attrs["shard_rows"])
        # Recorded only for several views per clip (create_store): a one-view store has no view arrays either.
        self.views_per_clip = int(self.attrs.get("views_per_clip", 1))
        self.pixels_only = self.attrs.get("pixels_only") is True  # views without teacher latents
        self.data_arrays = tuple(name for name in DATA_ARRAYS if not (self.pixels_only and name in LATENT_ARRAYS)) + (
            VIEW_DATA_ARRAYS if self.views_per_clip > 1 else ()
        )

    # ---- opening -----------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> LatentStore:
        """Open an existing store; a missing path or a non-SALT group is a usage error."""
        path = Path(path)
        if not path.exists():
            raise SaltUsageError(f"store {path} does not exist")
        if not path.is_dir():
            raise SaltUsageError(f"store {path} is not a directory (a Zarr store is a folder)")
        try:
            local = zarr.storage.LocalStore(path, read_only=not writable)
            group = zarr.open_group(local, mode="r+" if writable else "r")
        except Exception as exc:  # zarr raises several types for "not a group"
            raise SaltUsageError(f"store {path} is not a Zarr v3 group ({type(exc).__name__}: {exc})") from None
        attrs = group.attrs.get(ATTRS_KEY)
        if not isinstance(attrs, dict) or attrs.get("format") != STORE_FORMAT:
            raise SaltUsageError(
                f"store {path} is a Zarr group but not a SALT latent cache (no '{ATTRS_KEY}' attributes)"
            )
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise SaltUsageError(
                f"store {path} has schema version {attrs.get('schema_version')}, this SALT reads {SCHEMA_VERSION}"
            )
        damaged = _damaged_attrs(attrs)
        if damaged:
            raise SaltUsageError(f"store {path} has damaged attributes: {damaged}")
        checksums = attrs.get("checksums")
        algorithm = checksums.get("algorithm") if isinstance(checksums, dict) else None
        if algorithm != CHECKSUM_ALGORITHM:  # blake2b before crc32c, and not recorded before that
            raise SaltUsageError(
                f"store {path} has row checksums of {algorithm or 'an unrecorded algorithm'}, "
                f"this SALT checks {CHECKSUM_ALGORITHM}: an older SALT built it; rebuild it "
                "(salt-cache build --out NEW_STORE)"
            )
        arrays: dict[str, zarr.Array] = {}
        missing = []
        # A writer stores every chunk, even one equal to the fill value: then a committed row always has
        # its shard file, and a missing file is damage, never "all zeros" (zarr decides this at open).
        names = ALL_ARRAYS + (VIEW_ARRAYS if attrs.get("views_per_clip", 1) > 1 else ())
        if attrs.get("pixels_only") is True:
            names = tuple(name for name in names if name not in LATENT_ARRAYS)
        with zarr.config.set({"array.write_empty_chunks": writable}):
            for name in names:
                try:
                    # A folder of that name holding a group would fail every read: zarr types it Array | Group.
                    arrays[name] = cast(zarr.Array, group[name])
                except KeyError:
                    missing.append(name)
                except Exception as exc:  # garbage in the array's zarr.json
                    raise SaltUsageError(
                        f"store {path}: metadata of array {name} unreadable ({type(exc).__name__})"
                    ) from None
        if missing:
            raise SaltUsageError(f"store {path} lacks arrays: {', '.join(missing)}")
        return cls(path, group, arrays)

    # ---- geometry of rows and shards ---------------------------------------------
    @property
    def rows(self) -> int:
        return int(self.arrays["status"].shape[0])

    @property
    def num_shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    @property
    def checksum_arrays(self) -> dict[str, str]:
        """The big arrays this store holds, each with the array of its per-row checksums."""
        return {name: sums for name, sums in CHECKSUM_ARRAYS.items() if name in self.arrays}

    def require_latents(self, what: str) -> None:
        """Refuse, in one line, a pixels-only store where teacher latents are needed."""
        if self.pixels_only:
            raise SaltUsageError(
                f"store {self.path} holds pixels only (no teacher latents), so {what}; build its "
                f"latents first: salt-cache build --from-store {self.path} --teacher FOLDER "
                "--out STORE"
            )

    @property
    def teacher_width(self) -> int:
        """The recorded teacher's width (:meth:`layout_problems` checks the latents array against it); 0 for a
        pixels-only store."""
        if self.pixels_only:
            return 0
        recorded = self.attrs.get("teacher", {}).get("width")
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
            return recorded
        return int(self.arrays["latents"].shape[2])  # a store created without a teacher record (tests, bench)

    def layout_problems(self) -> list[str]:
        """Where the recorded attributes and the arrays disagree: shapes (rows, geometry, teacher width)
        and the row grid of every per-row array's chunks and shards (``shard_rows``). Reading or
        writing through a wrong layout mixes rows up silently, so callers refuse such a store."""
        problems = []
        rows, width = self.rows, self.teacher_width
        recorded_geometry = self.attrs.get("geometry")
        if recorded_geometry is not None and recorded_geometry != geometry.as_dict():
            problems.append(f"recorded geometry {recorded_geometry} is not this SALT's {geometry.as_dict()}")
        expected = {
            "pixels": pixels_shape(rows),
            "crop_box": (rows, len(CROP_BOX_FIELDS)),
            **({} if self.pixels_only else {"latents": latents_shape(rows, width)}),
        }
        if rows % self.views_per_clip:
            problems.append(f"{rows} rows are not a whole number of clips of {self.views_per_clip} views")
        for name, array in self.arrays.items():
            shape = tuple(array.shape)
            if name in expected and shape != expected[name]:
                problems.append(
                    f"array {name} has shape {shape}, the recorded layout says {expected[name]}"
                    + (f" (teacher width {width})" if name == "latents" else "")
                )
            elif shape[:1] != (rows,):
                problems.append(f"array {name} has {shape[0] if shape else 0} rows, status has {rows}")
            metadata = array.metadata
            keys = metadata.chunk_key_encoding.to_dict() if isinstance(metadata, ArrayV3Metadata) else "zarr v2's"
            if keys != CHUNK_KEY_ENCODING:  # as shard_file() names files
                problems.append(f"array {name} has chunk keys {keys}, not {CHUNK_KEY_ENCODING}")
        for name in self.data_arrays + ("status",):
            grid = rows_per_file(self.arrays[name])
            if grid != self.shard_rows:
                problems.append(
                    f"array {name} is cut into {grid}-row shards, the recorded shard_rows is {self.shard_rows}"
                )
        return problems

    def check_layout(self) -> None:
        """Refuse (one line) a store whose recorded layout and arrays disagree (salt-cache verify lists all)."""
        problems = self.layout_problems()
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise SaltUsageError(f"store {self.path} is damaged: {problems[0]}{more}; run salt-cache verify on it")

    def checked(self) -> LatentStore:
        """This store once :meth:`check_layout` passed (for reading it)."""
        self.check_layout()
        return self

    def shard_file(self, name: str, shard: int) -> Path:
        """The file holding ``shard`` of array ``name`` (its chunk, for the unsharded ``clip_id`` and ``label``)."""
        return shard_path(self.path / name, shard, self.arrays[name].ndim)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)

    def array(self, name: str) -> zarr.Array:
        return self.arrays[name]

    # ---- reading ------------------------------------------------------------------
    def status(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Status of rows [start, stop); rows of a damaged status chunk read as STATUS_UNREADABLE."""
        stop = self.rows if stop is None else stop
        try:
            return np.asarray(self.arrays["status"][start:stop])
        except Exception:  # rare: find the damaged chunks shard by shard
            status = np.full(stop - start, STATUS_UNREADABLE, np.uint8)
            for _, first, last in self.iter_shards():
                lo, hi = max(first, start), min(last, stop)
                if lo >= hi:
                    continue
                try:
                    status[lo - start : hi - start] = self.arrays["status"][lo:hi]
                except Exception as exc:
                    log.warning("status of rows [%d, %d) unreadable: %s: %s", lo, hi, type(exc).__name__, exc)
            return status

    def first_views(self, rows: np.ndarray) -> np.ndarray:
        """Those of ``rows`` that are view 0 of their clip (all of them in a one-view store)."""
        return rows[rows % self.views_per_clip == 0]

    def clip_ids(self) -> np.ndarray:
        """Clip ids; an unreadable array gives "?" so a report can still name rows."""
        try:
            return np.asarray(self.arrays["clip_id"][:])
        except Exception as exc:
            log.warning("clip_id array unreadable: %s: %s", type(exc).__name__, exc)
            return np.full(self.rows, "?", dtype=object)

    @functools.cached_property
    def raw_rows(self) -> dict[str, RawRows]:
        """Readers straight from the shard files, for the big arrays whose layout is the one we write."""
        readers = {name: open_raw_rows(self.path / name) for name in FILE_WRITTEN_ARRAYS}
        return {name: reader for name, reader in readers.items() if reader is not None}

    def pending_shards(self, retry_failed: bool = False) -> list[int]:
        """Shards that still hold a pending (or unreadable) row: the work a resumed build must do.
        With ``retry_failed``, shards holding failed rows too (after the videos were fixed)."""
        status = self.status()
        done = status == RowStatus.COMMITTED
        if not retry_failed:
            done |= status == RowStatus.FAILED
        return [k for k in range(self.num_shards) if not done[slice(*self.shard_range(k))].all()]

    def counts(self) -> dict[str, int]:
        status = self.status()
        return status_counts(status)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    # ---- writing ------------------------------------------------------------------
    def write_shard(self, payload: ShardPayload) -> None:
        """Write one whole shard durably; the status chunk goes last (the commit)."""
        payload.check()
        start, stop = self.shard_range(payload.index)
        if len(payload.status) != stop - start:
            raise ValueError(f"shard {payload.index} holds rows [{start}, {stop}), payload has {len(payload.status)}")
        committed = payload.status == RowStatus.COMMITTED

        def sums(rows: np.ndarray) -> np.ndarray:
            pairs = zip(rows, committed, strict=True)
            return np.array([row_checksum(row) if ok else 0 for row, ok in pairs], np.uint64)

        pixels_sums = sums(payload.pixels)
        latents_sums = None if self.pixels_only else sums(payload.latents)
        values: dict[str, np.ndarray | None] = {
            "pixels": payload.pixels,
            "latents": payload.latents,
            "frame_index": payload.frame_index,
            "pixels_checksum": pixels_sums,
            "latents_checksum": latents_sums,
            "error": np.array(payload.error, dtype=str),
            "crop_box": payload.crop_box,
        }
        if (values["crop_box"] is None) != (self.views_per_clip == 1):
            raise ValueError(
                f"a store of {self.views_per_clip} views per clip needs crop boxes exactly when it has several views"
            )
        if not np.any(np.isin(self.status(start, stop), (RowStatus.COMMITTED, RowStatus.FAILED))):
            # Nothing here was ever committed: drop what a crashed writer left (Zarr merges a shard
            # write into the file already there, and a torn file would fail every resume).
            for name in self.data_arrays:
                self.shard_file(name, payload.index).unlink(missing_ok=True)
        for name in self.data_arrays:
            value = values[name]
            assert value is not None  # data_arrays names latents and crop_box only in stores that hold them
            writer = self._file_writers.get(name)
            if writer is not None:  # the big arrays: straight to the shard file (fsynced), in parallel threads
                writer.write(self.shard_file(name, payload.index), value)
            else:
                self.arrays[name][start:stop] = value
        self._fsync_shard(payload.index, self.data_arrays)
        self.arrays["status"][start:stop] = payload.status.astype(np.uint8)
        self._fsync_shard(payload.index, ("status",))

    @functools.cached_property
    def _file_writers(self) -> dict[str, ShardFileWriter]:
        writers = {name: open_shard_writer(self.path / name) for name in FILE_WRITTEN_ARRAYS}
        return {name: writer for name, writer in writers.items() if writer is not None}

    def _fsync_shard(self, shard: int, names: tuple[str, ...]) -> None:
        for name in names:
            path = self.shard_file(name, shard)
            if path.exists():  # an all-fill chunk may not be written at all
                fsync_path(path)
                fsync_path(path.parent)

    def update_attrs(self, **fields: Any) -> None:
        self.attrs.update(fields)
        self.group.attrs.update({ATTRS_KEY: self.attrs})

    def remove_partial_files(self) -> int:
        """Delete temporary files a killed writer left behind (never part of the store)."""
        leftovers = list(self.path.rglob("*.partial"))
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        return len(leftovers)

    def iter_shards(self) -> Iterator[tuple[int, int, int]]:
        for shard in range(self.num_shards):
            yield (shard, *self.shard_range(shard))


def create_store(
    path: str | Path,
    *,
    clip_ids: list[str],
    labels: list[int],
    teacher_width: int | None,
    shard_rows: int,
    pixels_zstd_level: int,
    attrs: dict[str, Any],
    views_per_clip: int = 1,
) -> LatentStore:
    """Create an empty store (every row pending) atomically: built aside, then renamed into place.

    ``clip_ids`` and ``labels`` are per row: with ``views_per_clip`` K >= 2, each clip's K times in a
    row (row ``clip * K + k``), and the store gets the view arrays and records K. ``teacher_width`` None: a
    pixels-only store (no latents arrays, attribute ``pixels_only``)."""
    path = Path(path)
    if path.exists():
        raise SaltUsageError(f"store {path} already exists")
    if not clip_ids:
        raise SaltUsageError("no clips to store")
    rows = len(clip_ids)
    if views_per_clip > 1 and rows % views_per_clip:
        raise ValueError(f"{rows} rows are not clips of {views_per_clip} views")
    with atomic_dir(path, unique=True) as staging:
        # "w-", not "w": "w" would delete and re-create the (locked) staging folder
        group = zarr.open_group(zarr.storage.LocalStore(staging), mode="w-", zarr_format=3)
        pixel_compressors = [zarr.codecs.ZstdCodec(level=pixels_zstd_level)] if pixels_zstd_level > 0 else None
        group.create_array(
            "pixels",
            shape=pixels_shape(rows),
            dtype="uint8",
            chunks=pixels_shape(1),
            shards=pixels_shape(shard_rows),
            compressors=pixel_compressors,
            fill_value=0,
            dimension_names=("row", "frame", "height", "width", "channel"),
        )
        if teacher_width is not None:
            # fp16 latents compress ~1.06x (docs/DESIGN.md): stored raw, no codec CPU cost.
            group.create_array(
                "latents",
                shape=latents_shape(rows, teacher_width),
                dtype="float16",
                chunks=latents_shape(1, teacher_width),
                shards=latents_shape(shard_rows, teacher_width),
                compressors=None,
                fill_value=0.0,
                dimension_names=("row", "token", "channel"),
            )
            group.create_array(
                "latents_checksum", shape=(rows,), dtype="uint64", fill_value=0, chunks=(shard_rows,), compressors=None
            )
        group.create_array(
            "frame_index",
            shape=(rows, geometry.NUM_FRAMES),
            dtype="int32",
            chunks=(shard_rows, geometry.NUM_FRAMES),
            fill_value=-1,
            compressors=None,
        )
        group.create_array(
            "status",
            shape=(rows,),
            dtype="uint8",
            fill_value=int(RowStatus.PENDING),
            chunks=(shard_rows,),
            compressors=None,
        )
        group.create_array(
            "pixels_checksum", shape=(rows,), dtype="uint64", fill_value=0, chunks=(shard_rows,), compressors=None
        )
        group.create_array("error", shape=(rows,), dtype=str, fill_value="", chunks=(shard_rows,))
        clip_id = group.create_array(
            "clip_id", shape=(rows,), dtype=str, fill_value="", chunks=(max(shard_rows, 4096),)
        )
        label = group.create_array(
            "label", shape=(rows,), dtype="int32", fill_value=-1, chunks=(max(shard_rows, 4096),), compressors=None
        )
        clip_id[:] = np.array(clip_ids, dtype=str)
        label[:] = np.asarray(labels, dtype=np.int32)
        view_attrs: dict[str, Any] = {}
        if views_per_clip > 1:
            view_index = group.create_array(
                "view_index",
                shape=(rows,),
                dtype="int32",
                fill_value=-1,
                chunks=(max(shard_rows, 4096),),
                compressors=None,
            )
            view_index[:] = np.arange(rows, dtype=np.int32) % views_per_clip
            group.create_array(
                "crop_box",
                shape=(rows, len(CROP_BOX_FIELDS)),
                dtype="int32",
                fill_value=-1,
                chunks=(shard_rows, len(CROP_BOX_FIELDS)),
                compressors=None,
                dimension_names=("row", "field"),
            )
            view_attrs = {"views_per_clip": views_per_clip, "crop_box_fields": list(CROP_BOX_FIELDS)}
        salt_attrs: dict[str, Any] = {
            "format": STORE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "shard_rows": shard_rows,
            "geometry": geometry.as_dict(),
            "latent_dtype": "float16",
            "checksums": {
                "algorithm": CHECKSUM_ALGORITHM,
                "arrays": {
                    name: sums
                    for name, sums in CHECKSUM_ARRAYS.items()
                    if teacher_width is not None or name not in LATENT_ARRAYS
                },
            },
            **({"pixels_only": True} if teacher_width is None else {}),
            "row_status": {s.name.lower(): int(s) for s in RowStatus},
            "source_rows": {
                "clip_id_sha256": clip_ids_sha256(list(clip_ids)),
                "label_sha256": labels_sha256(labels),
            },
            **view_attrs,
            **attrs,
        }
        group.attrs.update({ATTRS_KEY: salt_attrs})
    return LatentStore.open(path, writable=True)
