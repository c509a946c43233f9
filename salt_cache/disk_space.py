"""The disk a build will need, checked before it starts.

The projection is an upper bound: rows x bytes per row with the pixels counted
uncompressed (zstd level 1 stores SSv2 pixels 1.3-3x smaller, but how much depends
on the video, and a bound that can be too small is no bound), the fp16 latents
as they are stored (raw), every small per-row array, and each shard's small files
rounded up to whole 4 KiB blocks. A build refuses to start when the filesystem
under the store has less free space than the rows still to write need; ``--force``
starts it anyway (a disk that fills up stops it with one line, and the committed
shards resume).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from shared import geometry
from shared.console import format_bytes
from shared.errors import SaltUsageError
from shared.store import CROP_BOX_FIELDS, DATA_ARRAYS, VIEW_DATA_ARRAYS

BLOCK = 4096  # a small shard file still takes a whole block
ERROR_BYTES = 256  # a failed row's recorded reason, at most about this long
# Array and group metadata (zarr.json files) and the shards' index tables, with room to spare.
METADATA_BYTES = 1 << 20


def row_bytes(teacher_width: int, views_per_clip: int) -> int:
    """Bytes one row can take on disk, pixels uncompressed."""
    pixels = geometry.NUM_FRAMES * geometry.IMAGE_SIZE**2 * 3
    latents = geometry.NUM_TOKENS * teacher_width * 2
    # frame_index, two checksums, status, label, error, the pixels' and latents' shard index entries
    # (16 bytes each); view_index and crop_box with several views.
    small = geometry.NUM_FRAMES * 4 + 2 * 8 + 1 + 4 + ERROR_BYTES + 2 * 16
    if views_per_clip > 1:
        small += 4 + 4 * len(CROP_BOX_FIELDS)
    return pixels + latents + small


def shard_overhead(views_per_clip: int) -> int:
    """Per shard: a block for each of its files (a small file takes a whole one; a big one ends in a part one)."""
    files = len(DATA_ARRAYS) + 1 + (len(VIEW_DATA_ARRAYS) if views_per_clip > 1 else 0)  # + status
    return files * BLOCK


@dataclass(frozen=True)
class SpacePlan:
    rows: int  # the whole store
    rows_to_write: int  # rows of the shards still to do
    shards_to_write: int
    per_row: int
    views_per_clip: int
    free: int
    where: Path  # the existing folder whose filesystem was measured
    pixels_zstd_level: int

    @property
    def needed(self) -> int:
        """What the rows still to write can take (a new store: the whole store)."""
        return (
            self.rows_to_write * self.per_row
            + self.shards_to_write * shard_overhead(self.views_per_clip)
            + METADATA_BYTES
        )

    @property
    def basis(self) -> str:
        if self.pixels_zstd_level == 0:
            return "pixels stored uncompressed"
        return (
            f"an upper bound: pixels counted uncompressed, zstd level {self.pixels_zstd_level} "
            "usually stores them 1.3-3x smaller"
        )

    def describe(self) -> str:
        return (
            f"{self.rows} rows x {format_bytes(self.per_row)} = {format_bytes(self.rows * self.per_row)} "
            f"({self.basis}); this run writes {self.rows_to_write} rows, up to {format_bytes(self.needed)}, "
            f"with {format_bytes(self.free)} free under {self.where}"
        )


def free_bytes(path: Path) -> tuple[int, Path]:
    """Free bytes of the filesystem that ``path`` is (or will be created) on, and the folder measured."""
    for folder in (path, *path.parents):
        if os.path.isdir(folder):
            return shutil.disk_usage(folder).free, folder
    return shutil.disk_usage(".").free, Path(".")


def plan_space(
    out: Path,
    rows: int,
    rows_to_write: int,
    shards_to_write: int,
    teacher_width: int,
    views_per_clip: int,
    pixels_zstd_level: int,
) -> SpacePlan:
    free, where = free_bytes(out)
    return SpacePlan(
        rows,
        rows_to_write,
        shards_to_write,
        row_bytes(teacher_width, views_per_clip),
        views_per_clip,
        free,
        where,
        pixels_zstd_level,
    )


def check_space(plan: SpacePlan, force: bool) -> None:
    """Refuse (one line) a build the filesystem cannot hold, unless ``force``."""
    if force or plan.needed <= plan.free:
        return
    raise SaltUsageError(
        f"the build would write up to {format_bytes(plan.needed)} ({plan.rows_to_write} rows x "
        f"{format_bytes(plan.per_row)}, {plan.basis}) but {plan.where} has only {format_bytes(plan.free)} free; "
        "free some space, choose another --out, or pass --force to start anyway"
    )
