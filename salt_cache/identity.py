"""What a store was built from, and the refusal to mix another teacher, recipe or clip list into it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import av
import torch
import transformers
import zarr

from shared import geometry
from shared.config import PipelineConfig, dump_pipeline
from shared.errors import SaltUsageError
from shared.ssv2 import ClipRecord
from shared.store import LatentStore, clip_ids_sha256, create_store
from shared.video import MIN_DECODED_SHARE

from salt_cache.views import CROP_RATIO, CROP_SCALE


class BuildSource(Protocol):
    """Where a build's clips come from: the videos (shared.ssv2.SsV2Source) or a pixels store
    (salt_cache.fill.StoreSource)."""

    clips: list[ClipRecord]

    def describe(self) -> dict[str, object]: ...

    def to_attrs(self) -> dict[str, object]: ...


class BuildTeacher(Protocol):
    """What a build asks of its teacher: shared.teacher.Teacher, salt_cache.fill.NoTeacher (pixels only)
    or salt_cache.bench.HostPathTeacher (fixed latents)."""

    @property
    def name(self) -> str: ...

    @property
    def width(self) -> int: ...

    @property
    def weights_hash(self) -> str: ...

    @property
    def compute_dtype(self) -> str: ...

    @property
    def final_norm(self) -> bool: ...

    @property
    def device(self) -> torch.device: ...

    def identity(self) -> dict[str, object]: ...

    def encode(self, views: torch.Tensor) -> torch.Tensor: ...


def store_identity(teacher: BuildTeacher, config: PipelineConfig, source: BuildSource) -> dict[str, object]:
    """What must match for a build to add rows to an existing store. A pixels-only store has no teacher
    (``content: pixels``); a store built from a pixels store records that store's identity too."""
    if not teacher.weights_hash:  # salt_cache.fill.NoTeacher
        return {
            "content": "pixels",
            "view": view_attrs(config),
            "rows_sha256": clip_ids_sha256([clip.clip_id for clip in source.clips]),
        }
    identity: dict[str, object] = {
        "teacher_weights_hash": teacher.weights_hash,
        "teacher_compute_dtype": teacher.compute_dtype,
        "view": view_attrs(config),
        "rows_sha256": clip_ids_sha256([clip.clip_id for clip in source.clips]),
        "teacher_final_norm": teacher.final_norm,
    }
    identity.update(getattr(source, "identity", {}))  # salt_cache.fill.StoreSource: the pixels store's
    return identity


def view_attrs(config: PipelineConfig) -> dict[str, object]:
    """The view recipe; the rule of views k >= 1 only for a store of several views per clip."""
    attrs: dict[str, object] = {
        "sampling": config.view.sampling,
        "sampling_rule": "16 equal segments of [0, n), one frame each; offset 0.5 (center) "
        "or uniform from numpy default_rng(blake2b-64(clip_id)) (jitter); "
        "clips shorter than 16 frames take offset 0.5, so every frame appears and repeats pad",
        "resize": f"short side to {geometry.IMAGE_SIZE}, swscale {config.view.interpolation} (antialiased)",
        "crop": f"centre {geometry.IMAGE_SIZE}x{geometry.IMAGE_SIZE}",
        "mean": list(geometry.PIXEL_MEAN),
        "std": list(geometry.PIXEL_STD),
        "truncation_rule": f"fail when under {MIN_DECODED_SHARE:.0%} of the declared duration decodes",
    }
    if config.view.views_per_clip > 1:
        attrs.update(
            {
                "views_per_clip": config.view.views_per_clip,
                "view_rule": "row = clip * K + k; view 0 is the view above; views k >= 1: segment jitter from "
                "default_rng(blake2b-64(clip_id, k, 'time')) and a random resized crop from "
                "default_rng(blake2b-64(clip_id, k, 'crop')) (salt_cache/views.py), resized to "
                f"{geometry.IMAGE_SIZE}x{geometry.IMAGE_SIZE} with swscale {config.view.interpolation}",
                "crop_scale": list(CROP_SCALE),
                "crop_ratio": list(CROP_RATIO),
            }
        )
    return attrs


def _describe_mismatch(found: dict, wanted: dict) -> str:
    keys = [k for k in {**found, **wanted} if found.get(k) != wanted.get(k)]
    messages = {
        "teacher_weights_hash": "another teacher",
        "teacher_compute_dtype": "another teacher precision",
        "teacher_final_norm": "another teacher kind (final norm applied or not)",
        "view": "another view recipe",
        "rows_sha256": "another clip list (split, --limit or source)",
        "content": "pixels only (no teacher)",
        "pixels_from": "pixels from another store",
    }
    return ", ".join(messages.get(k, k) for k in keys)


def open_matching_store(out: Path, identity: dict[str, object], writable: bool) -> LatentStore:
    """Open an existing store, refusing one built from another teacher, recipe or clip list."""
    store = LatentStore.open(out, writable=writable)
    store.check_layout()  # writing by a wrong shard_rows would overwrite committed rows
    found = store.attrs.get("identity", {})
    if found != identity:
        raise SaltUsageError(
            f"store {out} was built with {_describe_mismatch(found, identity)} "
            f"(teacher {store.attrs.get('teacher', {}).get('name')}); refusing to mix. "
            "Pass a new --out, or delete the store to rebuild it"
        )
    return store


def open_or_create_store(out: Path, teacher: BuildTeacher, config: PipelineConfig, source: BuildSource) -> LatentStore:
    identity = store_identity(teacher, config, source)
    if out.exists():
        return open_matching_store(out, identity, writable=True)
    views = config.view.views_per_clip
    return create_store(
        out,
        clip_ids=[clip.clip_id for clip in source.clips for _ in range(views)],
        labels=[clip.label for clip in source.clips for _ in range(views)],
        views_per_clip=views,
        teacher_width=teacher.width or None,  # 0: a pixels-only store
        shard_rows=config.store.shard_rows,
        pixels_zstd_level=config.store.pixels_zstd_level,
        attrs={
            "identity": identity,
            **({"teacher": teacher.identity()} if teacher.width else {}),
            "view": view_attrs(config),
            "source": source.to_attrs(),
            "pipeline": dump_pipeline(config),
            "versions": {
                "torch": torch.__version__,
                "zarr": zarr.__version__,
                "av": av.__version__,
                "transformers": transformers.__version__,
            },
        },
    )
