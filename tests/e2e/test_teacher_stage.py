"""SALT's stage 1 end to end on real stores: a pixels-only store, `salt-train teacher` trains a tiny VideoMAE
on it by pixel reconstruction, its export is a teacher `salt-cache build --teacher` loads and `verify --deep`
re-runs; latents filled from the pixels store (no second decode) equal a decoding build; kill -9 and resume
give the same teacher and the same store; bad input is one line and exit 2."""

from __future__ import annotations

import json
import os
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
from conftest import REPO, Build, call_cli, call_train, run_train, write_pipeline
from safetensors.torch import load_file

from shared.store import LatentStore, RowStatus

# A teacher small enough for many CPU steps a second.
TINY_TEACHER_TRAIN = {
    "teacher_train__size": "tiny",
    "teacher_train__width": 32,
    "teacher_train__depth": 1,
    "teacher_train__heads": 2,
    "teacher_train__decoder_width": 32,
    "teacher_train__decoder_depth": 1,
    "teacher_train__decoder_heads": 2,
    "teacher_train__batch_size": 2,
    "teacher_train__lr": 3e-3,
    "teacher_train__min_lr": 3e-4,
    "teacher_train__warmup_steps": 2,
    "teacher_train__max_steps": 8,
}


def teacher_pipeline(path: Path, **overrides: object) -> Path:
    """The kill test's store recipe (2-row shards, teacher batches of 1) with a tiny stage-1 teacher."""
    settings = {
        "build_loader__num_workers": 0,
        "train_loader__num_workers": 0,
        "store__shard_rows": 2,
        "teacher__batch_size": 1,
        "train__checkpoint_every": 4,
        "train__log_every": 2,
        "stream__shuffle_buffer": 4,
        **TINY_TEACHER_TRAIN,
        **overrides,
    }
    return write_pipeline(path, **settings)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def pixels_store(demo_set: Path, demo_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo set's views without latents: 20 rows in 10 shards (the kill test's recipe)."""
    store = tmp_path_factory.mktemp("pixels") / "pixels.zarr"
    result = call_cli("build", "--src", demo_set, "--out", store, "--pixels-only", "--pipeline", demo_pipeline)
    assert result.returncode == 0, result.stderr[-3000:]
    return store


@pytest.fixture(scope="module")
def stage1_run(pixels_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher trained for 8 steps on the pixels store."""
    work = tmp_path_factory.mktemp("stage1")
    run_dir = work / "run"
    result = call_train(
        "teacher", "--cache", pixels_store, "--pipeline", teacher_pipeline(work / "p.yaml"), "--run-dir", run_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_a_pixels_only_store_holds_views_without_latents(pixels_store: Path, demo_reference: Build) -> None:
    store = LatentStore.open(pixels_store)
    assert store.pixels_only and store.teacher_width == 0 and "latents" not in store.arrays
    assert not (pixels_store / "latents").exists() and "teacher" not in store.attrs
    reference = zarr.open_group(str(demo_reference.store), mode="r")
    group = zarr.open_group(str(pixels_store), mode="r")
    for name in ("pixels", "frame_index", "status", "clip_id", "label", "pixels_checksum"):
        assert np.array_equal(group[name][:], reference[name][:]), name  # the same views as a full build
    assert call_cli("verify", pixels_store).returncode == 0
    deep = call_cli("verify", pixels_store, "--deep", "1")
    assert deep.returncode == 2 and "pixels only" in one_error_line(deep.stderr)


def test_the_teacher_encoder_is_videomae_on_the_context_tokens() -> None:
    """What stage 1 trains is what a store built with the export computes: encode() on every token equals
    VideoMAEModel's own forward; the targets are VideoMAE's per-patch normalised pixels."""
    from shared import geometry
    from shared.config import TeacherTrainConfig

    from salt_train.pixel_teacher import build_pixel_teacher, pixel_targets
    from salt_train.student import view_tubelets

    torch.manual_seed(0)
    teacher = build_pixel_teacher(
        TeacherTrainConfig(size="tiny", width=32, depth=1, heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2),
        groups=2,
    ).eval()
    views = torch.randint(0, 256, (2, 16, 224, 224, 3), dtype=torch.uint8)
    mean, std = geometry.pixel_statistics(torch.device("cpu"), (1, 1, 3, 1, 1))
    pixel_values = geometry.normalise_pixels(views.permute(0, 1, 4, 2, 3), mean, std)
    with torch.no_grad():
        ours = teacher.encode(view_tubelets(views), torch.arange(geometry.NUM_TOKENS).expand(2, -1))
        theirs = teacher.encoder(pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    targets = pixel_targets(view_tubelets(views)[:, :5]).reshape(2, 5, 3, -1)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(2, 5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.std(-1), torch.ones(2, 5, 3), atol=1e-4, rtol=0)
    plain = pixel_targets(view_tubelets(views), False, teacher.tubelet_mean, teacher.tubelet_std)  # norm_pix_loss off
    torch.testing.assert_close(plain, view_tubelets(pixel_values.permute(0, 1, 3, 4, 2).contiguous()))
    # teacher_train.norm_pix_eps: a flat tubelet with codec-like noise (std ~3/255) is amplified to unit std by
    # VideoMAE's 1e-6, kept near zero by 0.05; a tubelet with an edge (std ~0.5) is nearly unchanged by either
    flat = (torch.full((1, 1, 1536), 100.0) + torch.randn(1, 1, 1536) * 3).round().clamp(0, 255).to(torch.uint8)
    edge = torch.zeros(1, 1, 1536, dtype=torch.uint8)
    edge[..., ::2] = 255
    assert pixel_targets(flat).std() > 0.9 and pixel_targets(flat, eps=0.05).std() < 0.3
    torch.testing.assert_close(pixel_targets(edge, eps=0.05), pixel_targets(edge), rtol=0.1, atol=0.0)


def test_the_trained_teacher_builds_a_store_that_verify_deep_matches(
    stage1_run: Path, pixels_store: Path, demo_set: Path, tmp_path: Path
) -> None:
    export = stage1_run / "export"
    assert {p.name for p in export.iterdir()} == {"config.json", "model.safetensors"}
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "videomae" and config["use_mean_pooling"] is False  # final norm kept
    assert json.loads((stage1_run / "run.json").read_text())["task"] == "teacher"
    records = [json.loads(line) for line in (stage1_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8] and all(np.isfinite(r["loss"]) for r in records)

    pipeline = teacher_pipeline(tmp_path / "p.yaml")
    direct = tmp_path / "direct.zarr"  # decoding the videos, through salt-cache build --teacher FOLDER
    built = call_cli("build", "--src", demo_set, "--out", direct, "--teacher", export, "--pipeline", pipeline)
    assert built.returncode == 0, built.stderr[-3000:]
    teacher = LatentStore.open(direct).attrs["teacher"]
    assert teacher["name"] == str(export.resolve()) and teacher["width"] == 32 and teacher["final_norm"] is True
    deep = call_cli("verify", direct, "--deep", "3", "--json")
    assert deep.returncode == 0, deep.stdout[-2000:]
    assert [d["relative_l2"] for d in json.loads(deep.stdout)["deep"]] == [0.0, 0.0, 0.0]

    filled = tmp_path / "filled.zarr"  # the same latents from the pixels store, no second decode
    result = call_cli(
        "build", "--from-store", pixels_store, "--out", filled, "--teacher", export, "--pipeline", pipeline
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = zarr.open_group(str(direct), mode="r"), zarr.open_group(str(filled), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        assert np.array_equal(a[name][:], b[name][:]), name
    attrs = LatentStore.open(filled).attrs
    assert attrs["teacher"] == teacher and attrs["source"]["pixels_store"] == str(pixels_store.resolve())
    assert attrs["identity"]["pixels_from"] == LatentStore.open(pixels_store).attrs["identity"]
    assert call_cli("verify", filled, "--deep", "2").returncode == 0


def _start(module: str, *args: object, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)], cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"ended (rc {proc.returncode}) before {what}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["checkpoint"]
    return load_file(run_dir / "checkpoints" / latest / "model.safetensors")


def test_stage1_killed_then_resumed_gives_the_uninterrupted_teacher(pixels_store: Path, tmp_path: Path) -> None:
    pipeline = teacher_pipeline(tmp_path / "p.yaml", teacher_train__max_steps=16, train__checkpoint_every=2)
    common = ("--cache", pixels_store, "--pipeline", pipeline)
    straight = tmp_path / "straight"
    done = run_train("teacher", *common, "--run-dir", straight)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = _start("salt_train", "teacher", *common, "--run-dir", killed, log=tmp_path / "killed.log")
    _kill_when(proc, (killed / "checkpoints" / "latest.json").exists, "a checkpoint")
    assert not (killed / "summary.json").exists(), "the run finished before the kill: nothing was tested"

    resumed = run_train("teacher", "--cache", pixels_store, "--run-dir", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-" in resumed.stderr
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys() and any(key.startswith("decoder.") for key in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    from shared.teacher import load_teacher_model

    exported = load_teacher_model(str(killed / "export")).state_dict()  # the teacher folder holds those weights
    for key, value in exported.items():
        assert torch.equal(value, b[f"encoder.{key}"]), key
    wrong = call_train("run", "--cache", pixels_store, "--run-dir", killed, "--resume")
    assert wrong.returncode == 2 and "is a teacher run" in one_error_line(wrong.stderr)


def _committed_shards(store: Path) -> int:
    try:
        return len([n for n in os.listdir(store / "status" / "c") if not n.endswith(".partial")])
    except FileNotFoundError:
        return 0


def test_a_fill_killed_midway_resumes_to_the_uninterrupted_store(
    pixels_store: Path, demo_reference: Build, tmp_path: Path
) -> None:
    """Latents filled from the pixels store with the built-in tiny teacher, killed a third of the way: the
    resumed store's arrays equal an uninterrupted build's (demo_reference decoded the same clips)."""
    store = tmp_path / "filled.zarr"
    args = [
        "build",
        "--from-store",
        pixels_store,
        "--out",
        store,
        "--teacher",
        demo_reference.teacher,
        "--pipeline",
        demo_reference.pipeline,
    ]
    proc = _start("salt_cache", *args, log=tmp_path / "fill.log")
    _kill_when(proc, lambda: _committed_shards(store) >= 3, "3 committed shards")
    status = zarr.open_group(str(store), mode="r")["status"][:]
    assert np.any(status == RowStatus.PENDING), "the fill finished before the kill: nothing was interrupted"

    resumed = call_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(demo_reference.store), mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        assert np.array_equal(a[name][:], b[name][:]), f"{name} differs from the uninterrupted build"
    assert call_cli("verify", store).returncode == 0


def test_bad_input_is_one_line_and_exit_2(
    pixels_store: Path, stage1_run: Path, demo_reference: Build, tmp_path: Path
) -> None:
    pipeline = teacher_pipeline(tmp_path / "p.yaml")
    # Stage 1 on a store with no pixels.
    no_pixels = tmp_path / "no-pixels.zarr"
    shutil.copytree(pixels_store, no_pixels)
    shutil.rmtree(no_pixels / "pixels")
    result = call_train("teacher", "--cache", no_pixels, "--pipeline", pipeline, "--run-dir", tmp_path / "r1")
    assert result.returncode == 2 and "pixels" in one_error_line(result.stderr)
    assert not (tmp_path / "r1").exists()
    # The student on a store without latents.
    result = call_train("run", "--cache", pixels_store, "--pipeline", pipeline, "--run-dir", tmp_path / "r2")
    assert result.returncode == 2 and "pixels only" in one_error_line(result.stderr)
    # Teacher folders that are not a video ViT: a student export, a folder of checkpoints, an image ViT.
    student_export = tmp_path / "student-export"
    student_export.mkdir()
    (student_export / "config.json").write_text(json.dumps({"format": "salt-video-vit", "architecture": "vit"}))
    from transformers import ViTConfig, ViTModel

    image_vit = tmp_path / "image-vit"
    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(image_vit)
    for folder, words in (
        (student_export, "student export"),
        (stage1_run / "checkpoints", "no config.json"),
        (image_vit, "not a video ViT teacher"),
    ):
        out = tmp_path / f"{folder.name}.zarr"
        result = call_cli(
            "build", "--from-store", pixels_store, "--out", out, "--teacher", folder, "--pipeline", pipeline
        )
        assert result.returncode == 2 and words in one_error_line(result.stderr), result.stderr
        assert not out.exists()
    # Latents filled from a pixels store made with another view recipe.
    other_view = write_pipeline(tmp_path / "bilinear.yaml", store__shard_rows=2, view__interpolation="bilinear")
    out = tmp_path / "other-view.zarr"
    result = call_cli(
        "build",
        "--from-store",
        pixels_store,
        "--out",
        out,
        "--teacher",
        demo_reference.teacher,
        "--pipeline",
        other_view,
    )
    assert result.returncode == 2 and "another view recipe" in one_error_line(result.stderr)
    assert not out.exists()
