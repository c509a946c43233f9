"""Several views per clip (``view.views_per_clip``): the draws, a real two-view store, the stream
over it, evaluation's rows, and the disk check before a build."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import VIEWS_LIMIT, Build, call_cli, copy_store, fast_pipeline
from hypothesis import given, settings
from hypothesis import strategies as st
from test_faults import small_tmpfs

from shared.config import load_pipeline
from shared.console import format_bytes
from shared.store import LatentStore, RowStatus

from salt_cache.disk_space import plan_space
from salt_cache.views import CROP_RATIO, CROP_SCALE, random_resized_crop, recipe_for_split, view_crop_box
from salt_train.data import StoreStream, epoch_views, stream_spec

ONE_VIEW_ARRAYS = (
    "pixels",
    "latents",
    "frame_index",
    "pixels_checksum",
    "latents_checksum",
    "status",
    "error",
    "clip_id",
    "label",
)


def _open(store: Path) -> zarr.Group:
    return zarr.open_group(str(store), mode="r")


# ---- the draws --------------------------------------------------------------------------


def _fallback_box(height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's box after 10 failed draws: the largest centred box within the ratio range."""
    ratio = min(max(width / height, CROP_RATIO[0]), CROP_RATIO[1])
    h, w = (height, round(height * ratio)) if width / height > ratio else (round(width / ratio), width)
    h, w = (h, w) if width / height != ratio else (height, width)
    return (height - h) // 2, (width - w) // 2, h, w


@settings(max_examples=300, deadline=None)
@given(height=st.integers(16, 2000), width=st.integers(16, 2000), seed=st.integers(0, 2**32))
def test_random_resized_crops_lie_inside_the_frame_within_v_jepa_ranges(height: int, width: int, seed: int) -> None:
    top, left, h, w = random_resized_crop(height, width, np.random.default_rng(seed))
    assert top >= 0 and left >= 0 and h > 0 and w > 0 and top + h <= height and left + w <= width
    # A drawn box is a real box of V-JEPA's scale and ratio rounded to whole pixels.
    area = height * width
    drawn = (
        (w - 0.5) / (h + 0.5) <= CROP_RATIO[1]
        and (w + 0.5) / (h - 0.5) >= CROP_RATIO[0]
        and (w + 0.5) * (h + 0.5) >= CROP_SCALE[0] * area
        and (w - 0.5) * (h - 0.5) <= CROP_SCALE[1] * area
    )
    assert drawn or (top, left, h, w) == _fallback_box(height, width), (top, left, h, w)


def test_view_boxes_are_a_pure_function_of_clip_and_view() -> None:
    assert view_crop_box(240, 427, "12345", 0) == (0, 93, 240, 240)  # the centre square the centre view keeps
    boxes = [view_crop_box(240, 427, "12345", k) for k in range(1, 6)]
    assert boxes == [view_crop_box(240, 427, "12345", k) for k in range(1, 6)]  # redrawn identically
    assert len(set(boxes)) == 5 and view_crop_box(240, 427, "12346", 1) != boxes[0]


def test_validation_and_test_stores_keep_one_view() -> None:
    config = load_pipeline("demo-k2")
    assert config.view.views_per_clip == 2 and recipe_for_split(config) == (config, None)
    for split in ("validation", "test"):
        config.cache.split = split
        kept, note = recipe_for_split(config)
        assert kept.view.views_per_clip == 1 and config.view.views_per_clip == 2
        assert split in note and "one centre view" in note


def test_the_k2_demo_recipe_is_the_demo_recipe_with_two_views() -> None:
    demo, k2 = load_pipeline("demo").model_dump(), load_pipeline("demo-k2").model_dump()
    assert k2["view"].pop("views_per_clip") == 2 and demo["view"].pop("views_per_clip") == 1
    assert k2.pop("name") == "demo-k2" and demo.pop("name") == "demo"
    assert k2 == demo


# ---- a real two-view store -------------------------------------------------------------


def test_two_views_are_distinct_crops_and_view_0_is_the_one_view_store(
    demo_views_reference: Build, demo_reference: Build
) -> None:
    assert demo_views_reference.result.returncode == 0, demo_views_reference.result.stderr[-3000:]
    assert "views          : 2 per clip: 20 rows = 10 clips x 2" in demo_views_reference.result.stderr
    store, one_view = _open(demo_views_reference.store), _open(demo_reference.store)
    rows = 2 * VIEWS_LIMIT
    assert store.attrs["salt"]["views_per_clip"] == 2 and "views_per_clip" not in one_view.attrs["salt"]
    np.testing.assert_array_equal(store["view_index"][:], np.arange(rows) % 2)
    assert np.all(store["status"][:] == RowStatus.COMMITTED)
    # View 0 of each clip is the one-view store's row, bit for bit (evaluation reads the same clips either way).
    for name in ONE_VIEW_ARRAYS:
        np.testing.assert_array_equal(store[name][0::2], one_view[name][:VIEWS_LIMIT], err_msg=name)
    np.testing.assert_array_equal(store["clip_id"][1::2], store["clip_id"][0::2])
    # View 1: its own crop (recorded) and pixels, and its own frame offsets.
    boxes, pixels, frames = store["crop_box"][:], store["pixels"][:], store["frame_index"][:]
    height, width = 120, 160  # the demo set's frames
    assert all(tuple(box) == (0, 20, 120, 120) for box in boxes[0::2])  # the centre square
    for clip in range(VIEWS_LIMIT):
        top, left, h, w = boxes[2 * clip + 1]
        assert (top, left, h, w) != tuple(boxes[2 * clip])
        assert top + h <= height and left + w <= width
        assert np.abs(pixels[2 * clip].astype(int) - pixels[2 * clip + 1].astype(int)).mean() > 1.0
    assert sum(not np.array_equal(frames[2 * c], frames[2 * c + 1]) for c in range(VIEWS_LIMIT)) >= VIEWS_LIMIT // 2


def test_verify_checks_two_view_stores(demo_views_reference: Build, tmp_path: Path) -> None:
    """0 problems, the teacher re-run agrees on a crop view (--deep picks the first and last rows); a
    view_index that no longer says row % K is named."""
    check = call_cli("verify", demo_views_reference.store, "--deep", "2", "--device", "cpu")
    assert check.returncode == 0, check.stdout + check.stderr
    assert re.search(r"problems +: 0\n", check.stdout) and "deep check : 2 rows" in check.stdout
    store = copy_store(demo_views_reference.store, tmp_path / "latents.zarr")
    group = zarr.open_group(str(store), mode="r+")
    group["view_index"][3] = 0
    group["crop_box"][4] = [-1, -1, -1, -1]
    check = call_cli("verify", store)
    assert check.returncode == 1
    assert "view_index of 1 rows (first: row 3) is not row % 2" in check.stdout
    assert "row 4 (clip" in check.stdout and "crop box invalid" in check.stdout


def test_retry_failed_redoes_both_views_of_a_fixed_clip(demo_views_reference: Build, tmp_path: Path) -> None:
    src = shutil.copytree(demo_views_reference.src, tmp_path / "ssv2")
    first = str(_open(demo_views_reference.store)["clip_id"][0])
    video = src / "20bn-something-something-v2" / f"{first}.webm"
    hidden = video.rename(tmp_path / video.name)
    store = tmp_path / "latents.zarr"
    args = [
        "build",
        "--src",
        src,
        "--out",
        store,
        "--teacher",
        demo_views_reference.teacher,
        "--pipeline",
        demo_views_reference.pipeline,
        *demo_views_reference.extra["args"],
    ]
    assert call_cli(*args).returncode == 0
    assert _open(store)["status"][:2].tolist() == [RowStatus.FAILED] * 2  # both views of the missing clip
    hidden.rename(video)
    assert call_cli(*args, "--retry-failed").returncode == 0
    rebuilt, reference = _open(store), _open(demo_views_reference.store)
    for name in reference.array_keys():
        np.testing.assert_array_equal(rebuilt[name][:], reference[name][:], err_msg=name)


# ---- the stream: one view of each clip per epoch ------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    clips=st.integers(1, 40),
    views=st.integers(2, 4),
    seed=st.integers(0, 2**40),
    epoch=st.integers(0, 50),
    data=st.data(),
)
def test_epoch_views_reads_one_committed_view_of_each_clip(
    clips: int, views: int, seed: int, epoch: int, data: st.DataObject
) -> None:
    committed = np.array(data.draw(st.lists(st.booleans(), min_size=clips * views, max_size=clips * views)))
    rows = np.flatnonzero(committed).astype(np.int64)
    chosen = epoch_views(rows, views, seed, epoch)
    assert set(chosen.tolist()) <= set(rows.tolist())
    assert sorted((chosen // views).tolist()) == sorted(set((rows // views).tolist()))  # every clip, once
    np.testing.assert_array_equal(chosen, epoch_views(rows.copy(), views, seed, epoch))  # a pure function
    every = np.arange(clips * views, dtype=np.int64)  # all committed: K epochs in a row read every view once
    cycle = np.concatenate([epoch_views(every, views, seed, epoch + e) for e in range(views)])
    np.testing.assert_array_equal(np.sort(cycle), every)


def test_the_stream_passes_over_the_clips_once_per_epoch(demo_views_reference: Build) -> None:
    store = LatentStore.open(demo_views_reference.store)
    config = load_pipeline("demo")
    config.train.batch_size, config.train.epochs, config.stream.shuffle_buffer = 4, 4, 4
    spec = stream_spec(store, config)
    assert (spec.views_per_clip, spec.clips, spec.steps_per_epoch) == (2, VIEWS_LIMIT, VIEWS_LIMIT // 4)
    by_epoch: dict[int, list[int]] = {}
    for epoch, _, rows in StoreStream(spec).positions():
        by_epoch.setdefault(epoch, []).extend(rows.tolist())
    for epoch, rows in by_epoch.items():
        assert len(rows) == spec.steps_per_epoch * 4 and len({row // 2 for row in rows}) == len(rows), (epoch, rows)
        assert set(rows) <= set(epoch_views(spec.rows, 2, config.train.seed, epoch).tolist())
    # Two ranks: the same global batches, each rank its half.
    ranks = [list(StoreStream(stream_spec(store, config, rank=r, world_size=2)).positions()) for r in (0, 1)]
    single = list(StoreStream(spec).positions())
    for (_, _, rows), (_, _, first), (_, _, second) in zip(single, *ranks, strict=False):
        np.testing.assert_array_equal(rows, np.concatenate([first, second]))


def test_evaluation_reads_view_0_of_each_clip(demo_views_reference: Build, demo_val_reference: Build) -> None:
    from shared.errors import SaltUsageError

    from salt_train.eval.rows import check_compatible, draw_eval_rows

    store = LatentStore.open(demo_views_reference.store)
    check_compatible(store, LatentStore.open(demo_val_reference.store))  # a one-view validation store fits it
    rows, _ = draw_eval_rows(store, VIEWS_LIMIT, 0, "--train-rows")
    np.testing.assert_array_equal(rows, np.arange(0, 2 * VIEWS_LIMIT, 2))
    with pytest.raises(SaltUsageError, match="only 10 clips with a committed view 0"):
        draw_eval_rows(store, VIEWS_LIMIT + 1, 0, "--train-rows")


# ---- the disk a build needs ---------------------------------------------------------------


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_build_the_disk_cannot_hold_is_refused_before_writing(
    demo_set: Path, demo_views_pipeline: Path, tmp_path: Path
) -> None:
    """A real 4 MB tmpfs: 2 clips x 2 views can take up to 11.6 MB, pixels counted raw. Refused, nothing
    written; --force starts it, and the demo's zstd-compressed pixels happen to fit."""
    with small_tmpfs(tmp_path / "small", "4m") as small:
        out = small / "latents.zarr"
        args = (
            "build",
            "--src",
            demo_set,
            "--out",
            out,
            "--teacher",
            "builtin:tiny-videomae",
            "--pipeline",
            demo_views_pipeline,
            "--limit",
            "2",
        )
        result = call_cli(*args)
        assert result.returncode == 2
        line = _one_line(result.stderr)
        plan = plan_space(out, 4, 4, 2, 64, 2, 1)  # the tiny teacher is 64 wide
        assert plan.free == 4 << 20 and plan.needed > plan.free
        assert f"would write up to {format_bytes(plan.needed)} (4 rows x {format_bytes(plan.per_row)}" in line, line
        assert f"has only {format_bytes(plan.free)} free" in line and "--force" in line, line
        assert list(small.iterdir()) == []  # nothing written, not even the lock file
        forced = call_cli(*args, "--force")
        assert forced.returncode == 0, forced.stderr[-3000:]
        assert call_cli("verify", out).returncode == 0


def test_the_projection_bounds_an_uncompressed_store(demo_set: Path, tmp_path: Path) -> None:
    """With pixels stored raw the projection is exact but for metadata: the blocks the store takes stay below it."""
    pipeline = fast_pipeline(tmp_path / "raw.yaml", store__pixels_zstd_level=0, view__views_per_clip=2)
    store = tmp_path / "latents.zarr"
    result = call_cli(
        "build",
        "--src",
        demo_set,
        "--out",
        store,
        "--teacher",
        "builtin:tiny-videomae",
        "--pipeline",
        pipeline,
        "--limit",
        "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(pixels stored uncompressed)" in result.stderr
    opened = LatentStore.open(store)
    plan = plan_space(store, opened.rows, opened.rows, opened.num_shards, opened.teacher_width, 2, 0)
    taken = sum(p.stat().st_blocks * 512 for p in store.rglob("*") if p.is_file())
    assert opened.rows == 6 and 0.9 * plan.needed < taken <= plan.needed, (taken, plan.needed)


def test_quick_eval_sizes_its_rows_by_the_clips_it_can_draw(
    demo_views_reference: Build, demo_val_reference: Build, tmp_path: Path
) -> None:
    """A two-view train store of 10 clips has 20 committed rows but only 10 view-0 rows to evaluate on:
    the quick eval takes as many as both stores hold (the validation store's 6 clips), all view 0, instead of
    asking for 20 and refusing the run's start."""
    import torch

    from shared.config import PipelineConfig

    from salt_train.eval.quick import QuickEval

    config = PipelineConfig.model_validate({"eval": {"val_cache": str(demo_val_reference.store), "quick_rows": 64}})
    quick = QuickEval(
        config.eval,
        config.mask,
        config.model.loss,
        LatentStore.open(demo_views_reference.store),
        torch.device("cpu"),
        tmp_path / "spill",
    )
    assert len(quick.train_rows) == len(quick.val_rows) == 6  # every clip of the validation store
    assert set(quick.train_rows) <= set(range(0, 2 * VIEWS_LIMIT, 2))  # view 0 rows only
