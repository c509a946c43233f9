"""`salt-cache build` end to end: real PyAV decode, a real VideoMAE, a real Zarr store."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import FAILING_KINDS, REPO, Build, SsV2Set, call_cli, copy_store, fast_pipeline

from shared import geometry
from shared.store import RowStatus

ARRAYS = (
    "pixels",
    "latents",
    "frame_index",
    "status",
    "error",
    "clip_id",
    "label",
    "pixels_checksum",
    "latents_checksum",
)


def _open(store: Path) -> zarr.Group:
    return zarr.open_group(str(store), mode="r")


def _summary(stdout: str) -> dict[str, str]:
    """``key : value`` lines of a print_block."""
    pairs = (line.split(" : ", 1) for line in stdout.splitlines() if " : " in line)
    return {key.strip(): value.strip() for key, value in pairs}


# ---- test 1: the mixed SSv2 set ------------------------------------------------------


def test_build_mixed_set_commits_good_rows_and_records_failures(reference_build: Build, mixed_set: SsV2Set) -> None:
    assert reference_build.result.returncode == 0, reference_build.result.stderr[-3000:]
    summary = _summary(reference_build.result.stdout)
    assert summary["rows"] == str(len(mixed_set.clips))
    assert summary["failed"] == "3"
    assert summary["pending"] == "0"

    group = _open(reference_build.store)
    status = group["status"][:]
    errors = [str(e) for e in group["error"][:]]
    failed_rows = {int(r) for r in np.flatnonzero(status == RowStatus.FAILED)}
    assert failed_rows == {mixed_set.row(kind) for kind in FAILING_KINDS}
    assert np.sum(status == RowStatus.COMMITTED) == len(mixed_set.clips) - 3
    assert not np.any(status == RowStatus.PENDING)
    assert "truncat" in errors[mixed_set.row("truncated")].lower()
    assert "zero-byte" in errors[mixed_set.row("zero-byte")].lower()
    assert "missing" in errors[mixed_set.row("missing")].lower()
    for row in np.flatnonzero(status == RowStatus.COMMITTED):
        assert errors[row] == ""
    # The build printed what it found at start (the failures go to the log, on the real stderr).
    assert "20bn-something-something-v2" in reference_build.result.stderr
    assert "videos missing : 1" in reference_build.result.stderr
    assert "workers=2" in reference_build.result.stderr and "context=forkserver" in reference_build.result.stderr


def test_build_then_verify_exits_zero(reference_build: Build, cli) -> None:
    result = cli("verify", reference_build.store)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    assert "Traceback" not in result.stderr


def test_build_stores_ids_and_labels_from_labels_json(reference_build: Build, mixed_set: SsV2Set) -> None:
    group = _open(reference_build.store)
    assert [str(c) for c in group["clip_id"][:]] == mixed_set.ids
    expected = [clip.label for clip in mixed_set.clips]
    assert -1 in expected and len(set(expected)) == 5  # an unknown template and every class
    np.testing.assert_array_equal(group["label"][:], np.array(expected, np.int32))
    attrs = group.attrs["salt"]
    assert attrs["source"]["label_map"].endswith("labels.json")
    assert attrs["source"]["split"] == "train"


def test_build_frame_index_monotone_and_short_clip_repeats(reference_build: Build, mixed_set: SsV2Set) -> None:
    group = _open(reference_build.store)
    status = group["status"][:]
    frame_index = group["frame_index"][:]
    for row, clip in enumerate(mixed_set.clips):
        if status[row] != RowStatus.COMMITTED:
            continue
        frames = frame_index[row]
        assert np.all(np.diff(frames) >= 0), (clip.clip_id, frames)
        assert frames.min() >= 0 and frames.max() < clip.frames, (clip.clip_id, frames)
        if clip.frames >= geometry.NUM_FRAMES:
            assert len(np.unique(frames)) >= geometry.NUM_FRAMES // 2  # (jitter may pick a frame twice)
    short = frame_index[mixed_set.row("short")]
    assert len(np.unique(short)) < geometry.NUM_FRAMES
    assert np.all((short >= 0) & (short < 8))
    # 16 equal segments of 8 frames: every frame exactly twice, whatever the jitter.
    np.testing.assert_array_equal(np.sort(short), np.repeat(np.arange(8), 2))


def test_build_pixels_are_the_decoded_view(reference_build: Build, mixed_set: SsV2Set) -> None:
    """Stored pixels and frame indices are exactly the view recipe's output (portrait and mp4 too)."""
    from salt_cache.video import decode_view

    group = _open(reference_build.store)
    status = group["status"][:]
    for row, clip in enumerate(mixed_set.clips):
        if status[row] != RowStatus.COMMITTED:
            assert not group["pixels"][row].any()  # failed rows hold zeros
            continue
        view, indices = decode_view(mixed_set.path(clip), clip.clip_id, "segment-jitter", "bicubic")
        np.testing.assert_array_equal(group["pixels"][row], view, err_msg=clip.clip_id)
        np.testing.assert_array_equal(group["frame_index"][row], indices, err_msg=clip.clip_id)
        assert group["pixels"][row].std() > 5  # a real picture, not a flat fill
    # The portrait clip (320 high, 240 wide) went in whole: short side to 224, centre crop.
    portrait = group["pixels"][mixed_set.row("portrait")]
    assert portrait.shape == (geometry.NUM_FRAMES, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE, 3)
    assert group["status"][mixed_set.row("portrait")] == RowStatus.COMMITTED


def test_default_out_is_src_latents_zarr_and_clip_list_is_part_of_identity(
    mixed_set: SsV2Set, teacher_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "ssv2"
    shutil.copytree(mixed_set.root, src)
    pipeline = fast_pipeline(tmp_path / "pipeline.yaml")
    result = call_cli("build", "--src", src, "--teacher", teacher_dir, "--pipeline", pipeline, "--limit", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    store = src / "latents.zarr"
    group = _open(store)
    assert [str(c) for c in group["clip_id"][:]] == mixed_set.ids[:2]
    assert np.all(group["status"][:] == RowStatus.COMMITTED)
    assert call_cli("verify", store).returncode == 0
    # The store knows its clip list: another --limit may not add rows to it.
    again = call_cli("build", "--src", src, "--teacher", teacher_dir, "--pipeline", pipeline, "--limit", "3")
    assert again.returncode == 2
    assert "another clip list" in again.stderr


# ---- test 2: latents are the teacher's output on the stored pixels ---------------------


def test_latents_equal_teacher_on_stored_pixels(reference_build: Build, mixed_set: SsV2Set, teacher_dir: Path) -> None:
    from transformers import VideoMAEModel

    from shared.teacher import load_teacher

    group = _open(reference_build.store)
    committed = np.flatnonzero(group["status"][:] == RowStatus.COMMITTED)
    pixels = group["pixels"].get_orthogonal_selection((committed,))
    stored = group["latents"].get_orthogonal_selection((committed,))
    assert stored.dtype == np.float16 and np.isfinite(stored).all()

    teacher = load_teacher(str(teacher_dir), device="cpu")
    again = teacher.encode(torch.from_numpy(pixels)).numpy()
    assert again.dtype == np.float16
    scale = float(np.abs(stored.astype(np.float32)).max())
    np.testing.assert_allclose(again.astype(np.float32), stored.astype(np.float32), rtol=1e-3, atol=1e-3 * scale)
    assert np.mean(again == stored) > 0.99  # fp32 on CPU: the fp16 casts agree almost everywhere

    # Independently of Teacher.encode: transformers' VideoMAE on the contract's normalisation.
    model = VideoMAEModel.from_pretrained(str(teacher_dir)).eval()
    x = torch.from_numpy(pixels).permute(0, 1, 4, 2, 3).float() / 255.0
    mean = torch.tensor(geometry.PIXEL_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(geometry.PIXEL_STD).view(1, 1, 3, 1, 1)
    with torch.no_grad():
        reference = model(pixel_values=(x - mean) / std).last_hidden_state.numpy()
    assert reference.shape == (len(committed), geometry.NUM_TOKENS, 64)
    np.testing.assert_allclose(stored.astype(np.float32), reference, rtol=1e-3, atol=1e-3 * scale)


# ---- test 5: the store reads with plain zarr and follows the contract --------------------


def test_store_opens_with_plain_zarr_and_matches_contract(reference_build: Build, mixed_set: SsV2Set) -> None:
    group = zarr.open_group(str(reference_build.store), mode="r")
    rows = len(mixed_set.clips)
    expected = {
        "pixels": ("uint8", (rows, 16, 224, 224, 3)),
        "latents": ("float16", (rows, 1568, 64)),
        "label": ("int32", (rows,)),
        "frame_index": ("int32", (rows, 16)),
        "status": ("uint8", (rows,)),
    }
    for name, (dtype, shape) in expected.items():
        array = group[name]
        assert str(array.dtype) == dtype, name
        assert array.shape == shape, name
    assert group["clip_id"].shape == (rows,)
    assert group["clip_id"].dtype.kind in "TUO" or str(group["clip_id"].dtype) in ("int64", "StringDType()")
    assert group.metadata.zarr_format == 3
    # Rows are cheap random reads: one chunk per row for the big arrays.
    assert group["pixels"].chunks == (1, 16, 224, 224, 3)
    assert group["latents"].chunks == (1, 1568, 64)

    attrs = group.attrs["salt"]
    assert attrs["geometry"]["num_tokens"] == 1568
    assert attrs["latent_dtype"] == "float16"
    assert attrs["teacher"]["name"] == reference_build.teacher
    assert attrs["teacher"]["width"] == 64
    assert len(attrs["teacher"]["weights_hash"]) >= 16
    assert attrs["view"]["mean"] == list(geometry.PIXEL_MEAN)
    assert attrs["view"]["std"] == list(geometry.PIXEL_STD)
    assert attrs["checksums"]["arrays"] == {"pixels": "pixels_checksum", "latents": "latents_checksum"}
    assert attrs["build"]["complete"] is True


# ---- rerun of a finished build -------------------------------------------------------


def test_rerun_of_finished_build_changes_nothing(reference_build: Build, tmp_path: Path) -> None:
    store = copy_store(reference_build.store, tmp_path / "latents.zarr")
    before = {name: _open(store)[name][:] for name in ARRAYS}
    result = call_cli(
        "build",
        "--src",
        reference_build.src,
        "--out",
        store,
        "--teacher",
        reference_build.teacher,
        "--pipeline",
        reference_build.pipeline,
        "--workers",
        "0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 to do" in result.stderr
    after = _open(store)
    for name in ARRAYS:
        np.testing.assert_array_equal(after[name][:], before[name], err_msg=name)


# ---- test 3: kill -9 mid-build, then resume --------------------------------------------


def _committed_shards(store: Path) -> int:
    """Status chunks on disk: one per shard, written only when the shard commits."""
    try:
        return len([n for n in os.listdir(store / "status" / "c") if not n.endswith(".partial")])
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("views", [1, 2])
def test_kill9_mid_build_then_resume_equals_uninterrupted(
    views: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """One view per clip, and two (view.views_per_clip: 2, rows = clips x views): the same."""
    reference_build: Build = request.getfixturevalue("demo_reference" if views == 1 else "demo_views_reference")
    assert reference_build.result.returncode == 0, reference_build.result.stderr[-3000:]
    reference = _open(reference_build.store)
    num_shards = -(-reference["status"].shape[0] // reference["status"].chunks[0])
    assert num_shards >= 8

    store = tmp_path / "latents.zarr"
    args = [
        "build",
        "--src",
        reference_build.src,
        "--out",
        store,
        "--teacher",
        reference_build.teacher,
        "--pipeline",
        reference_build.pipeline,
        *reference_build.extra.get("args", []),
    ]
    log = (tmp_path / "build.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "salt_cache", *map(str, args)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while _committed_shards(store) < num_shards // 3:  # a third done: kill mid-way
            assert proc.poll() is None, f"build ended (rc {proc.returncode}) before the kill"
            assert time.monotonic() < deadline, "too few shards committed in 120 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    killed = _open(store)["status"][:]
    assert np.any(killed == RowStatus.PENDING), "the build finished before the kill: nothing was interrupted"
    assert np.sum(killed != RowStatus.PENDING) >= 2 * (num_shards // 3), killed

    # Resume in this process, through two DataLoader workers this time: the same rows result.
    result = call_cli(*args, "--workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(store.rglob("*.partial")) == []

    resumed = _open(store)
    assert np.all(resumed["status"][:] == RowStatus.COMMITTED)
    assert sorted(resumed.array_keys()) == sorted(reference.array_keys())
    for name in reference.array_keys():  # with two views, view_index and crop_box too
        a, b = resumed[name][:], reference[name][:]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b), f"{name} differs from the uninterrupted build"

    check = call_cli("verify", store)
    assert check.returncode == 0, check.stdout + check.stderr


def _lose_commit_record_after_torn_write(store: Path) -> str:
    (store / "status" / "c" / "1").unlink()  # as if killed between the data and the status write
    (store / "latents" / "c" / "1" / "0" / "0").write_bytes(b"garbage from a torn write")
    return "pending: never committed"


def _garble_commit_record(store: Path) -> str:
    (store / "status" / "c" / "2").write_bytes(b"not a status chunk")  # wrong length: unreadable
    return "commit record is damaged"


@pytest.mark.parametrize("damage", [_lose_commit_record_after_torn_write, _garble_commit_record])
def test_resume_redoes_only_the_shard_without_a_sound_commit_record(
    damage, demo_reference: Build, tmp_path: Path
) -> None:
    """A lost or garbled status chunk reads as 'not committed': verify names it, and a rebuild
    redoes that one shard and gives the uninterrupted build's arrays."""
    store = copy_store(demo_reference.store, tmp_path / "latents.zarr")
    expected_problem = damage(store)
    check = call_cli("verify", store)
    assert check.returncode == 1
    assert expected_problem in check.stdout
    result = call_cli(
        "build",
        "--src",
        demo_reference.src,
        "--out",
        store,
        "--teacher",
        demo_reference.teacher,
        "--pipeline",
        demo_reference.pipeline,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"shards\s+: \d+ of 2 rows, 1 to do", result.stderr), result.stderr
    reference, resumed = _open(demo_reference.store), _open(store)
    for name in ARRAYS:
        assert np.array_equal(resumed[name][:], reference[name][:]), name
    assert call_cli("verify", store).returncode == 0


def test_teacher_batches_span_shards_and_pad_failed_rows_without_changing_the_store(
    reference_build: Build, tmp_path: Path
) -> None:
    """Teacher batches of 5 rows over 3-row shards (so batches span shards, and failed clips are
    zero-padded rows of a constant-shape batch), committed by one writer thread: the same store
    as the reference's batches of 2 and four writers."""
    from shared.config import load_pipeline
    from shared.ssv2 import discover
    from shared.store import LatentStore

    from salt_cache.loader import ViewBatches, plan_batches

    pipeline = fast_pipeline(tmp_path / "pipeline.yaml", teacher__batch_size=5, store__writers=1)
    store = tmp_path / "latents.zarr"
    result = call_cli(
        "build",
        "--src",
        reference_build.src,
        "--out",
        store,
        "--teacher",
        reference_build.teacher,
        "--pipeline",
        pipeline,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference, built = _open(reference_build.store), _open(store)
    for name in ARRAYS:
        np.testing.assert_array_equal(built[name][:], reference[name][:], err_msg=name)

    plans = plan_batches(LatentStore.open(store), [0, 2], 4)  # rows 0-2 and 6-7
    assert [plan.rows for plan in plans] == [(0, 1, 2, 6), (7,)]
    source = discover(reference_build.src, "train", None)
    batches = ViewBatches(source.clips, plans, load_pipeline("demo").view, 1, batch_size=4)
    assert all(batches[k]["pixels"].shape[0] == 4 for k in range(len(plans)))  # one shape, padded


def test_finite_rows_reads_the_fp16_exponent_bits_as_isfinite_does() -> None:
    """The build's host finiteness check (no float conversion) agrees with np.isfinite on every edge:
    the largest finite values, subnormals, signed zeros, infinities and NaNs of either sign."""
    from salt_cache.writer import finite_rows

    edges = np.array([65504, -65504, 6e-8, -6e-8, 0.0, -0.0, np.inf, -np.inf, np.nan], np.float16)
    edges = np.concatenate([edges, -edges[-1:]])  # a NaN with the sign bit set
    rows = np.zeros((len(edges), 3, 5), np.float16)
    rows[:, 1, 2] = edges  # one edge value in an otherwise finite row
    np.testing.assert_array_equal(finite_rows(rows), np.isfinite(rows.reshape(len(rows), -1)).all(axis=1))
    assert finite_rows(rows).tolist() == [True] * 6 + [False] * 4


def test_decode_workers_auto_leaves_two_cores_and_shares_them_between_ranks() -> None:
    from shared.config import BuildLoaderConfig

    from salt_cache.loader import decode_workers

    cores = len(os.sched_getaffinity(0))
    auto = BuildLoaderConfig()
    assert auto.num_workers == "auto" and decode_workers(auto) == max(1, cores - 2)
    assert decode_workers(auto, ranks_on_node=cores) == 1  # never none: a decoder per rank at least
    assert decode_workers(BuildLoaderConfig(num_workers=0), ranks_on_node=4) == 0  # an explicit count is kept
