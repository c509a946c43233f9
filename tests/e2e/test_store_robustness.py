"""Damaged stores, damaged teachers and concurrent writers: one clear line, nothing lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import zarr
from conftest import Build, call_cli, copy_store, run_cli
from transformers import BertConfig, BertModel

from shared.filesystem import build_lock


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_second_writer_is_refused_while_a_build_holds_the_lock(demo_reference: Build, tmp_path: Path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "latents.zarr")
    status = zarr.open_group(str(store), mode="r+")["status"]
    status[0:2] = 0  # one shard left to do, so the build must write
    with build_lock(store):
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
        assert result.returncode == 2
        assert "another build is writing" in result.stderr
    assert (
        call_cli(
            "build",
            "--src",
            demo_reference.src,
            "--out",
            store,
            "--teacher",
            demo_reference.teacher,
            "--pipeline",
            demo_reference.pipeline,
        ).returncode
        == 0
    )
    assert call_cli("verify", store).returncode == 0


def test_finished_store_is_only_read_by_a_rerun(demo_reference: Build, tmp_path: Path) -> None:
    """Nothing to do means no lock file and no write: a rerun works on read-only media."""
    store = copy_store(demo_reference.store, tmp_path / "latents.zarr")
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
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
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before
    assert not store.with_name(store.name + ".lock").exists()


def test_verify_notices_lost_clip_ids_and_labels(demo_reference: Build, tmp_path: Path) -> None:
    """clip_id and label have no per-row checksum: their digests catch a lost chunk."""
    for array, message in (("clip_id", "clip_id array differs"), ("label", "label array differs")):
        store = copy_store(demo_reference.store, tmp_path / f"{array}.zarr")
        (store / array / "c" / "0").unlink()  # reads back as fill values
        result = call_cli("verify", store)
        assert result.returncode == 1, result.stdout
        assert message in result.stdout


def test_deep_verify_skips_damaged_rows_and_names_them(demo_reference: Build, tmp_path: Path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "latents.zarr")
    shard = store / "pixels" / "c" / "1" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:1000])  # torn shard: rows 2 and 3 unreadable
    result = call_cli("verify", store, "--deep", "20", "--json")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert {p["row"] for p in report["problems"]} == {2, 3}
    assert report["deep"] and all(d["row"] not in (2, 3) for d in report["deep"])


def test_deep_verify_with_a_vanished_teacher_folder_is_one_line(
    demo_set: Path, demo_pipeline: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    teacher = shutil.copytree(teacher_dir, tmp_path / "teacher")
    store = tmp_path / "latents.zarr"
    build = call_cli(
        "build", "--src", demo_set, "--out", store, "--teacher", teacher, "--pipeline", demo_pipeline, "--limit", "4"
    )
    assert build.returncode == 0, build.stderr
    assert zarr.open_group(str(store), mode="r").attrs["salt"]["teacher"]["name"] == str(teacher.resolve())
    shutil.rmtree(teacher)
    line = _one_error_line(run_cli("verify", store, "--deep", "1"))
    assert "not available" in line and "does not exist" in line


def test_damaged_array_metadata_is_one_line(demo_reference: Build, tmp_path: Path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "latents.zarr")
    (store / "latents" / "zarr.json").write_text("garbage")
    for command in (
        ["verify", store],
        [
            "build",
            "--src",
            demo_reference.src,
            "--out",
            store,
            "--teacher",
            demo_reference.teacher,
            "--pipeline",
            demo_reference.pipeline,
        ],
    ):
        assert "metadata of array latents unreadable" in _one_error_line(run_cli(*command))


def test_damaged_store_attributes_are_one_line(demo_reference: Build, tmp_path: Path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "latents.zarr")
    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs["salt"])
    attrs["shard_rows"] = "abc"
    group.attrs["salt"] = attrs
    assert "damaged attributes" in _one_error_line(run_cli("verify", store))


def test_a_checkpoint_that_is_not_videomae_is_refused(demo_set: Path, demo_pipeline: Path, tmp_path: Path) -> None:
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(bert)
    line = _one_error_line(
        run_cli(
            "build", "--src", demo_set, "--out", tmp_path / "x.zarr", "--teacher", bert, "--pipeline", demo_pipeline
        )
    )
    assert "not a video ViT teacher" in line
    assert not (tmp_path / "x.zarr").exists()


def test_failures_reach_the_progress_postfix(reference_build: Build) -> None:
    """The bar's failed= count includes the last batch (it used to lag one batch behind)."""
    failed = int(np.sum(zarr.open_group(str(reference_build.store), mode="r")["status"][:] == 2))
    assert failed == 3
    assert f"failed={failed}" in reference_build.result.stderr


def test_retry_failed_redoes_rows_whose_videos_were_fixed(
    demo_set: Path, demo_pipeline: Path, demo_reference: Build, tmp_path: Path
) -> None:
    """A missing video fails its row; once it is back, --retry-failed rebuilds it (and only then)."""
    src = shutil.copytree(demo_set, tmp_path / "ssv2")
    first_train_clip = json.loads((src / "labels" / "train.json").read_text())[0]["id"]
    video = src / "20bn-something-something-v2" / f"{first_train_clip}.webm"
    hidden = video.rename(tmp_path / video.name)
    store = tmp_path / "latents.zarr"
    args = ["build", "--src", src, "--out", store, "--teacher", "builtin:tiny-videomae", "--pipeline", demo_pipeline]
    assert call_cli(*args).returncode == 0
    hidden.rename(video)
    assert call_cli(*args).returncode == 0  # a plain rerun keeps the recorded failure
    assert int(np.sum(zarr.open_group(str(store), mode="r")["status"][:] == 2)) == 1
    assert call_cli(*args, "--retry-failed").returncode == 0
    rebuilt, reference = zarr.open_group(str(store), mode="r"), zarr.open_group(str(demo_reference.store), mode="r")
    for name in ("status", "pixels", "latents", "frame_index", "error", "pixels_checksum", "latents_checksum"):
        assert np.array_equal(rebuilt[name][:], reference[name][:]), name
