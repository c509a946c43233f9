"""Pixels first, latents later: the teacherless build and the build that reads a pixels store.

SALT's stage 1 (``salt-train teacher``) needs the views but no latents, and its teacher
exists only afterwards. So:

- ``salt-cache build --src DIR --pixels-only`` decodes the clips into a pixels-only store
  (no latents arrays; :class:`NoTeacher` stands in for the teacher, so the build path is the
  usual one: plans, workers, shard writers, resume);
- ``salt-cache build --from-store PIXELS --teacher FOLDER --out STORE`` builds a new store whose
  rows are read from the pixels store instead of decoded (:class:`StoredViews`): the same rows,
  clip ids, labels, frame indices, crop boxes and view recipe, the latents of ``FOLDER``. It
  resumes like any build, and one pixels store can be filled by several teachers (a trained and a
  random-init one, side by side). Why a new store rather than latents added in place: docs/DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from shared import geometry
from shared.config import PipelineConfig
from shared.errors import SaltUsageError
from shared.rows import read_rows
from shared.ssv2 import ClipRecord
from shared.store import CROP_BOX_FIELDS, LatentStore, RowStatus, pixels_shape

from salt_cache.loader import BatchPlan

PIXELS_ONLY = "none (pixels only)"


class NoTeacher:
    """The teacher of a pixels-only build: no weights, latents of width 0 (nothing is stored for them)."""

    name = PIXELS_ONLY
    width = 0
    weights_hash = ""  # no weights (the build's plan prints its first 12 characters)
    compute_dtype = "none"
    final_norm = False
    device = torch.device("cpu")

    def identity(self) -> dict[str, object]:
        """Never recorded (a pixels-only store has no teacher attribute): the build's teacher protocol asks for it."""
        return {"name": self.name}

    def encode(self, views: torch.Tensor) -> torch.Tensor:
        return torch.zeros((views.shape[0], geometry.NUM_TOKENS, 0), dtype=torch.float16)


@dataclass
class StoreSource:
    """A pixels store as the source of a build: its clips (one record per clip), labels and recorded source."""

    store: LatentStore
    clips: list[ClipRecord]

    @property
    def root(self) -> Path:
        return self.store.path.parent

    @property
    def identity(self) -> dict[str, object]:
        """Part of the built store's identity: the pixels came from this store (its own identity)."""
        return {"pixels_from": self.store.attrs.get("identity", {})}

    def describe(self) -> dict[str, object]:
        counts = self.store.counts()
        return {
            "pixels from": f"{self.store.path} ({counts['committed']} committed, {counts['failed']} failed rows; "
            "read, not decoded again)",
            "clips": len(self.clips),
        }

    def to_attrs(self) -> dict[str, object]:
        return {**self.store.attrs.get("source", {}), "pixels_store": str(self.store.path.resolve())}


def open_pixels_source(path: Path, config: PipelineConfig) -> StoreSource:
    """The pixels store of ``--from-store``, refused in one line when it cannot give this build its rows:
    unfinished, or made with another view recipe than ``config``'s."""
    from salt_cache.identity import view_attrs

    store = LatentStore.open(path).checked()
    counts = store.counts()
    if counts["pending"] or counts["other"]:
        raise SaltUsageError(
            f"--from-store {path} is not finished ({counts['pending'] + counts['other']} of "
            f"{counts['rows']} rows pending or unreadable): finish its build first"
        )
    recorded, wanted = store.attrs.get("view"), view_attrs(config)
    if recorded != wanted:
        keys = sorted(k for k in {**(recorded or {}), **wanted} if (recorded or {}).get(k) != wanted.get(k))
        raise SaltUsageError(
            f"--from-store {path} holds views made with another view recipe than this build's "
            f"(differing: {', '.join(keys)}): pass the recipe its pixels were built with (--pipeline)"
        )
    views = store.views_per_clip
    ids, labels = store.clip_ids(), np.asarray(store.array("label")[:])
    clips = [ClipRecord(str(ids[row]), store.path, int(labels[row]), "") for row in range(0, store.rows, views)]
    return StoreSource(store, clips)


class StoredViews(Dataset):
    """Item k reads the rows of batch plan k from the pixels store: what :class:`salt_cache.loader.ViewBatches`
    gives from the videos (pixels zero-padded to the teacher batch, frame indices, crop boxes, errors),
    read back instead of decoded. A row that failed there fails here, with its reason."""

    def __init__(self, store_path: Path, plans: list[BatchPlan], batch_size: int) -> None:
        self.store_path = store_path
        self.plans = plans
        self.batch_size = batch_size
        self._store: LatentStore | None = None

    def __len__(self) -> int:
        return len(self.plans)

    def store(self) -> LatentStore:
        if self._store is None:  # opened lazily, in the worker process
            self._store = LatentStore.open(self.store_path)
        return self._store

    def __getitem__(self, k: int) -> dict:
        store = self.store()
        rows = np.asarray(self.plans[k].rows, dtype=np.int64)
        n = len(rows)
        pixels = np.zeros(pixels_shape(self.batch_size), dtype=np.uint8)  # rows past n: padding
        status = store.status()[rows]
        ok = status == RowStatus.COMMITTED
        names = ("frame_index", "error") + (("crop_box",) if store.views_per_clip > 1 else ())
        recorded = dict(zip(names, read_rows(store, rows, names), strict=False))
        errors = [
            f"failed in the pixels store {store.path}: {recorded['error'][i]}" if not ok[i] else "" for i in range(n)
        ]
        if ok.any():
            try:  # checked against the stored checksums: damaged pixels are never encoded
                pixels[:n][ok] = read_rows(store, rows[ok], ("pixels",), check=True)[0]
            except Exception as exc:
                errors = [error or f"unreadable in the pixels store: {exc}" for error in errors]
        frame_index = np.where(ok[:, None], recorded["frame_index"], -1).astype(np.int32)
        crop_box = (
            np.where(ok[:, None], recorded["crop_box"], -1).astype(np.int32)
            if "crop_box" in recorded
            else np.full((n, len(CROP_BOX_FIELDS)), -1, np.int32)
        )
        info = get_worker_info()
        return {
            "rows": rows,
            "pixels": torch.from_numpy(pixels),
            "frame_index": frame_index,
            "crop_box": crop_box,
            "errors": errors,
            "worker": info.id if info is not None else "main",
        }
