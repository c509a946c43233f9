"""`salt-cache verify`: prove a store is whole, or name what is wrong with it.

Checks, in order: the schema (arrays, shapes, dtypes, attributes); every row,
shard by shard (committed rows: checksums recomputed, latents finite, frame
indices valid; failed rows: a reason; pending rows: a problem); and with
``--deep K`` the recorded teacher re-run on K rows' stored pixels.
"""

from __future__ import annotations

import logging
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from shared import geometry
from shared.console import progress
from shared.errors import SaltUsageError
from shared.rows import checksum_problem, read_row_range
from shared.store import STATUS_UNREADABLE, LatentStore, RowStatus, clip_ids_sha256, labels_sha256, status_counts

if TYPE_CHECKING:
    from shared.teacher import Teacher

log = logging.getLogger(__name__)

REQUIRED_ATTRS = (
    "schema_version",
    "geometry",
    "teacher",
    "latent_dtype",
    "view",
    "source",
    "checksums",
    "identity",
    "source_rows",
)
# Relative L2 error allowed between stored latents and a re-run: fp16 storage
# alone gives ~5e-4; a half-precision build re-checked in fp32 a few 1e-3.
DEEP_TOLERANCE = {"float32": 1e-2, "float16": 3e-2, "bfloat16": 6e-2}


@dataclass
class Problem:
    what: str
    row: int | None = None
    clip_id: str | None = None

    def line(self) -> str:
        where = f"row {self.row} (clip {self.clip_id}): " if self.row is not None else ""
        return where + self.what


@dataclass
class VerifyReport:
    store: str
    rows: int = 0
    committed: int = 0
    failed: int = 0
    pending: int = 0
    other: int = 0  # status values outside 0/1/2: a damaged commit record, never trained on
    problems: list[Problem] = field(default_factory=list)
    deep: list[dict] = field(default_factory=list)
    fix: str | None = None  # the command that rebuilds the rows named in problems (salt_cache/repair.py)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_schema(store: LatentStore, report: VerifyReport) -> bool:
    """Array shapes, dtypes and chunk/shard grids against the recorded layout (teacher width,
    geometry, shard_rows); False when rows cannot be read safely."""
    rows = store.rows
    expected = {
        "pixels": "uint8",
        "latents": "float16",
        "frame_index": "int32",
        "status": "uint8",
        "label": "int32",
        "pixels_checksum": "uint64",
        "latents_checksum": "uint64",
    }
    layout = store.layout_problems()
    report.problems.extend(Problem(problem) for problem in layout)
    sound = not layout
    for name, dtype in expected.items():
        if name not in store.arrays:  # a pixels-only store has no latents arrays
            continue
        array = store.array(name)
        if str(array.dtype) != dtype:
            report.problems.append(Problem(f"array {name} is {array.dtype}, expected {dtype}"))
            sound = False
    if tuple(store.array("frame_index").shape) != (rows, geometry.NUM_FRAMES):
        report.problems.append(Problem(f"array frame_index has shape {store.array('frame_index').shape}"))
        sound = False
    missing = [key for key in REQUIRED_ATTRS if key not in store.attrs and not (store.pixels_only and key == "teacher")]
    if missing:
        report.problems.append(Problem(f"attributes missing: {', '.join(missing)}"))
    recorded_dtype = store.attrs.get("latent_dtype")
    latents_dtype = str(store.array("latents").dtype) if "latents" in store.arrays else None
    if recorded_dtype is not None and latents_dtype is not None and str(recorded_dtype) != latents_dtype:
        report.problems.append(
            Problem(
                f"attribute latent_dtype says {recorded_dtype!r} but the latents array is "
                f"{store.array('latents').dtype}: the store's record disagrees with its data"
            )
        )
    if sound:
        check_source_rows(store, report)
        if store.views_per_clip > 1:
            check_view_index(store, report)
    return sound


def check_view_index(store: LatentStore, report: VerifyReport) -> None:
    """Row ``clip * K + k`` is view k: the view_index array written at creation must say so."""
    try:
        recorded = np.asarray(store.array("view_index")[:])
    except Exception as exc:
        report.problems.append(Problem(f"view_index unreadable ({type(exc).__name__}: {exc})"))
        return
    wrong = np.flatnonzero(recorded != np.arange(store.rows) % store.views_per_clip)
    if len(wrong):
        report.problems.append(
            Problem(f"view_index of {len(wrong)} rows (first: row {wrong[0]}) is not row % {store.views_per_clip}")
        )


def check_source_rows(store: LatentStore, report: VerifyReport) -> None:
    """clip_id and label have no per-row checksums: compare them with the digests taken at creation."""
    recorded = store.attrs.get("source_rows", {})
    try:
        ids = [str(i) for i in np.asarray(store.array("clip_id")[:])]
        labels = np.asarray(store.array("label")[:])
    except Exception as exc:
        report.problems.append(Problem(f"clip_id or label unreadable ({type(exc).__name__}: {exc})"))
        return
    if clip_ids_sha256(ids) != recorded.get("clip_id_sha256"):
        report.problems.append(Problem("clip_id array differs from the ids the store was created with"))
    if labels_sha256(labels) != recorded.get("label_sha256"):
        report.problems.append(Problem("label array differs from the labels the store was created with"))


def _read_shard(
    store: LatentStore, start: int, stop: int, names: tuple[str, ...]
) -> tuple[dict[str, np.ndarray] | None, str]:
    try:
        return read_row_range(store, start, stop, names), ""
    except Exception as exc:  # a damaged shard file: fall back to reading row by row
        return None, f"{type(exc).__name__}: {exc}"


def _status_problem(status: int) -> str | None:
    """Problems the status alone shows (the row's data does not matter then)."""
    if status == STATUS_UNREADABLE:
        return "status unreadable (the shard's commit record is damaged)"
    if status == RowStatus.PENDING:
        return "pending: never committed (rerun the build to finish it)"
    if status not in (RowStatus.COMMITTED, RowStatus.FAILED):
        return f"unknown status {status}"
    return None


def _check_row(store: LatentStore, status: int, data: dict[str, np.ndarray], i: int) -> str | None:
    """The first problem of a committed or failed row, or None."""
    if status == RowStatus.FAILED:
        return None if str(data["error"][i]).strip() else "failed without a recorded reason"
    for name, checksums in store.checksum_arrays.items():
        problem = checksum_problem(name, data[name][i], data[checksums][i])
        if problem:
            return problem
    if "latents" in data and not np.isfinite(data["latents"][i]).all():
        return "latents hold NaN or inf"
    frames = data["frame_index"][i]
    if frames.min() < 0 or np.any(np.diff(frames) < 0):
        return f"frame indices invalid: {frames.tolist()}"
    if "crop_box" in data:
        top, left, height, width = (int(v) for v in data["crop_box"][i])
        if top < 0 or left < 0 or height <= 0 or width <= 0:
            return f"crop box invalid: {[top, left, height, width]}"
    return None


def _missing_files(store: LatentStore, start: int) -> str | None:
    """A shard holding committed rows always has its data files: a missing one is named as such
    (reading the rows would only say they are unreadable)."""
    shard = start // store.shard_rows
    gone = [name for name in store.checksum_arrays if not store.shard_file(name, shard).is_file()]
    return f"{' and '.join(gone)} shard file missing ({store.shard_file(gone[0], shard)})" if gone else None


def check_shard(store: LatentStore, start: int, stop: int, status: np.ndarray, ids: np.ndarray) -> list[Problem]:
    """The problems of rows [start, stop): one read of the shard, row by row only if it is damaged."""
    names = store.data_arrays  # the arrays a committed row is checked on
    data, _ = _read_shard(store, start, stop, names)
    missing = _missing_files(store, start) if np.any(status[start:stop] == RowStatus.COMMITTED) else None
    problems = []
    for row in range(start, stop):
        problem = _status_problem(status[row])
        if problem is None and missing and status[row] == RowStatus.COMMITTED:
            problem = missing
        if problem is None and data is None:  # damaged shard: find which rows still read
            needed = ("error",) if status[row] == RowStatus.FAILED else names  # a failed row: its reason only
            row_data, row_error = _read_shard(store, row, row + 1, needed)
            problem = f"unreadable ({row_error})" if row_data is None else _check_row(store, status[row], row_data, 0)
        elif problem is None and data is not None:  # (data is None was the branch above)
            problem = _check_row(store, status[row], data, row - start)
        if problem:
            problems.append(Problem(problem, row, str(ids[row])))
    return problems


def check_rows(store: LatentStore, report: VerifyReport, status: np.ndarray, threads: int = 1) -> None:
    """Every row, shards checked on ``threads`` threads (decompression and hashing release the GIL);
    results come back in shard order, so the report does not depend on the thread count."""
    ids = store.clip_ids()
    bar = progress(store.rows, "verify", unit="row")
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        checks = pool.map(lambda shard: check_shard(store, shard[1], shard[2], status, ids), store.iter_shards())
        for (_, start, stop), problems in zip(store.iter_shards(), checks, strict=False):
            report.problems.extend(problems)
            bar.update(stop - start)
    bar.close()


def load_recorded_teacher(store: LatentStore, device: str) -> Teacher:
    """The teacher the store names, loaded before the long row scan so a missing one fails fast."""
    from shared.teacher import load_teacher  # only deep checks need torch models

    store.require_latents("--deep has no teacher latents to re-check")
    name = store.attrs.get("teacher", {}).get("name", "")
    try:
        return load_teacher(name, device=device, compile_mode="off")  # a few rows: compiling would cost more
    except SaltUsageError as err:
        raise SaltUsageError(f"--deep needs the store's teacher, which is not available: {err}") from None


def deep_check(store: LatentStore, teacher: Teacher, k: int, report: VerifyReport, status: np.ndarray) -> None:
    """Re-run the recorded teacher on ``k`` committed rows that passed the row checks and compare
    with the stored latents (a damaged row is already named; re-running it proves nothing)."""
    recorded = store.attrs.get("teacher", {})
    if teacher.weights_hash != recorded.get("weights_hash"):
        report.problems.append(
            Problem(
                f"teacher {teacher.name} now has weights {teacher.weights_hash[:12]}, the store recorded "
                f"{str(recorded.get('weights_hash'))[:12]}: cannot deep-check"
            )
        )
        return
    damaged = {problem.row for problem in report.problems}
    committed = np.array([row for row in np.flatnonzero(status == RowStatus.COMMITTED) if row not in damaged])
    if len(committed) == 0 or k <= 0:
        return
    chosen = committed[np.linspace(0, len(committed) - 1, min(k, len(committed))).round().astype(int)]
    ids = store.clip_ids()
    tolerance = DEEP_TOLERANCE.get(str(recorded.get("compute_dtype")), 6e-2)
    for row in np.unique(chosen):
        data = read_row_range(store, int(row), int(row) + 1)
        again = teacher.encode(torch.from_numpy(data["pixels"])).float().cpu()
        stored = torch.from_numpy(data["latents"]).float()
        relative = float((again - stored).norm() / stored.norm().clamp_min(1e-12))
        max_abs = float((again - stored).abs().max())
        report.deep.append({"row": int(row), "clip_id": str(ids[row]), "relative_l2": relative, "max_abs": max_abs})
        if not relative <= tolerance:
            report.problems.append(
                Problem(
                    f"teacher re-run differs: relative L2 {relative:.2e} > {tolerance:.0e}", int(row), str(ids[row])
                )
            )


def repair_command(store: LatentStore) -> str:
    """The command that rebuilds the shards of the damaged or pending rows of ``store`` (salt_cache/repair.py)."""
    source = store.attrs.get("source", {}).get("root", "SRC")
    return f"salt-cache build --src {shlex.quote(str(source))} --out {shlex.quote(str(store.path))} --repair"


def verify_store(path: str, deep: int = 0, device: str = "auto", threads: int = 4) -> VerifyReport:
    store = LatentStore.open(path)
    teacher = load_recorded_teacher(store, device) if deep > 0 else None
    status = store.status()
    counts = status_counts(status)
    report = VerifyReport(
        store=str(path),
        rows=counts["rows"],
        committed=counts["committed"],
        failed=counts["failed"],
        pending=counts["pending"],
        other=counts["other"],
    )
    if check_schema(store, report):
        check_rows(store, report, status, threads)
        if any(problem.row is not None for problem in report.problems):
            report.fix = repair_command(store)  # damaged, pending or unreadable rows: their shards rebuilt whole
        if teacher is not None:  # loaded exactly when deep > 0
            deep_check(store, teacher, deep, report, status)
    return report
