"""`salt-train run` end to end on real stores built by `salt-cache build`: the loss falls, the run
folder records what ran, kill -9 then --resume ends with the same weights, bad input is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_STUDENT, call_train, copy_store, run_train, train_pipeline
from safetensors.torch import load_file

from shared.store import create_store


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["checkpoint"]
    return load_file(run_dir / "checkpoints" / latest / "model.safetensors")


@pytest.fixture(scope="module")
def trained(reference_build, tmp_path_factory) -> tuple[Path, object]:
    """One run on the mixed store (3 failed rows), two loader workers, 40 steps."""
    work = tmp_path_factory.mktemp("trained")
    pipeline = train_pipeline(
        work / "train.yaml",
        train__max_steps=40,
        train_loader__num_workers=2,
        train_loader__multiprocessing_context="forkserver",
    )
    run_dir = work / "run"
    result = call_train("run", "--cache", reference_build.store, "--pipeline", pipeline, "--run-dir", run_dir)
    return run_dir, result


def test_loss_falls_and_the_run_folder_records_the_run(trained, reference_build) -> None:
    run_dir, result = trained
    assert result.returncode == 0, result.stderr
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(4, 41, 4))
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], [r["loss"] for r in records]
    for key in ("lr", "grad_norm", "clips_per_s", "data_wait_ms", "step_ms"):
        assert all(r[key] is not None for r in records)
    run = json.loads((run_dir / "run.json").read_text())
    assert Path(run["cache"]) == reference_build.store.resolve()
    assert run["snapshot"]["mode"] == "none" and run["snapshot"]["manifest"]  # ext4: auto fell back, loudly
    assert run["store"]["counts"] == {"rows": 8, "committed": 5, "failed": 3, "pending": 0, "other": 0}
    assert run["versions"]["torch"] == torch.__version__ and "commit" in run["git"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["loader_errors"] == 0
    assert "live store" in (run_dir / "train.log").read_text()  # snapshot auto without reflink warns


def test_checkpoints_are_written_and_pruned(trained) -> None:
    run_dir, _ = trained
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-00000024", "step-00000032", "step-00000040"]  # the newest 3 of 8, 16, ..., 40
    state = json.loads((run_dir / "checkpoints" / "step-00000040" / "state.json").read_text())
    assert state["step"] == 40 and state["clips_seen"] == 80
    files = {p.name for p in (run_dir / "checkpoints" / "step-00000040").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "checksums.json"}


def test_export_loads_back_with_timm(trained) -> None:
    from salt_train.export import load_encoder

    run_dir, _ = trained
    encoder = load_encoder(run_dir / "export").eval()
    weights = final_weights(run_dir)
    trained_encoder = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, trained_encoder[key], rtol=0, atol=0)
    pixels = torch.randn(1, 3, 16, 224, 224)
    assert encoder(pixels).shape == (1, 1568, TINY_STUDENT["embed_dim"])


def start_run(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "salt_train", "run", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_then_resume_gives_the_uninterrupted_weights(demo_reference, tmp_path) -> None:
    pipeline = train_pipeline(
        tmp_path / "train.yaml", train__max_steps=30, train__checkpoint_every=4, train__batch_size=4
    )
    common = ("--cache", demo_reference.store, "--pipeline", pipeline)
    straight = tmp_path / "straight"
    done = run_train("run", *common, "--run-dir", straight)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    proc = start_run(*common, "--run-dir", killed)
    latest = killed / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists(), "the run finished before the kill: nothing was tested"

    resumed = run_train("run", "--cache", demo_reference.store, "--run-dir", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step-" in resumed.stderr
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the resumed run's metrics continue where the killed one's stopped
    steps = [r["step"] for r in metrics(killed)]
    assert steps[-1] == 30 and steps == sorted(steps)


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(demo_reference, tmp_path) -> None:
    pipeline = train_pipeline(tmp_path / "train.yaml", train__max_steps=400, train__checkpoint_every=1000)
    run_dir = tmp_path / "run"
    proc = start_run("--cache", demo_reference.store, "--pipeline", pipeline, "--run-dir", run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics_file.exists() and metrics_file.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr
    state = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert 0 < state["step"] < 400
    resumed = run_train(
        "run", "--cache", demo_reference.store, "--run-dir", run_dir, "--resume", "--max-steps", str(state["step"] + 4)
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == state["step"] + 4


def test_too_many_unreadable_batches_stop_the_run(demo_reference, tmp_path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "damaged.zarr")
    for shard_file in (p for p in (store / "pixels" / "c").rglob("*") if p.is_file()):
        data = bytearray(shard_file.read_bytes())
        data[100:4000] = bytes(3900)
        shard_file.write_bytes(bytes(data))
    pipeline = train_pipeline(tmp_path / "train.yaml", stream__max_errors=2)
    result = call_train("run", "--cache", store, "--pipeline", pipeline, "--run-dir", tmp_path / "run")
    assert result.returncode == 1
    assert "unreadable batches, more than stream.max_errors=2" in result.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("skipped") == 3 and "worker 0" in log  # each bad batch logged with rows, worker, reason


def assert_one_line_usage_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("salt-train: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ("mask.ratio=1.5", "mask.ratio"),
        ("mask.ratio=0", "mask.ratio"),
        ("model.student=vit_nonexistent_patch16", "vit_nonexistent_patch16"),
        ("train.batch_size=64", "larger than the 5 committed rows"),
        ("train.lr=-1", "train.lr"),
        ("train_loader.num_workerz=2", "unknown key"),
        ("loader.num_workers=2", "old name of build_loader and train_loader"),
    ],
)
def test_bad_settings_are_one_line(reference_build, tmp_path, setting, fragment) -> None:
    pipeline = train_pipeline(tmp_path / "train.yaml")
    run_dir = tmp_path / "run"
    result = call_train(
        "run", "--cache", reference_build.store, "--pipeline", pipeline, "--run-dir", run_dir, "--set", setting
    )
    assert_one_line_usage_error(result, fragment)
    assert not run_dir.exists()  # refused before anything was written


def test_missing_store_is_one_line(tmp_path) -> None:
    assert_one_line_usage_error(
        call_train("run", "--cache", tmp_path / "nope.zarr", "--pipeline", "demo"), "does not exist"
    )


def test_store_without_committed_rows_is_one_line(tmp_path) -> None:
    store = tmp_path / "empty.zarr"
    create_store(
        store, clip_ids=["1", "2"], labels=[0, 1], teacher_width=8, shard_rows=2, pixels_zstd_level=1, attrs={}
    )
    result = call_train("run", "--cache", store, "--pipeline", "demo")
    assert_one_line_usage_error(result, "no committed rows")


def test_resume_of_a_folder_that_is_not_a_run(reference_build, tmp_path) -> None:
    result = call_train("run", "--cache", reference_build.store, "--run-dir", tmp_path, "--resume")
    assert_one_line_usage_error(result, "not a run folder")


def test_a_run_folder_is_never_overwritten(trained, reference_build, tmp_path) -> None:
    run_dir, _ = trained
    result = call_train("run", "--cache", reference_build.store, "--pipeline", "demo", "--run-dir", run_dir)
    assert_one_line_usage_error(result, "already holds a run")


def test_set_values_parse_like_the_recipe() -> None:
    from shared.config import load_pipeline

    from salt_train.cli import parse_sets

    sets = parse_sets(
        ["model.compile_mode=off", "train.lr=1e-4", "stream.verify_checksums=true", "train.max_steps=null"]
    )
    assert sets["model.compile_mode"] == "off" and sets["stream.verify_checksums"] is True
    config = load_pipeline("ssv2", sets)
    assert config.model.compile_mode == "off" and config.train.lr == 1e-4 and config.train.max_steps is None
    assert_one_line_usage_error(call_train("run", "--cache", "x", "--set", "train.lr"), "expected KEY=VALUE")


def test_resume_with_another_cache_is_refused(trained, demo_reference) -> None:
    run_dir, _ = trained
    result = call_train("run", "--cache", demo_reference.store, "--run-dir", run_dir, "--resume")
    assert_one_line_usage_error(result, "resume it with its own --cache")


def test_resume_of_a_run_stopped_before_its_first_record(reference_build, tmp_path) -> None:
    pipeline = train_pipeline(tmp_path / "train.yaml", train__max_steps=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(pipeline.read_text())  # killed before run.json was written
    result = call_train("run", "--cache", reference_build.store, "--run-dir", run_dir, "--resume")
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


def test_a_change_to_the_live_store_is_reported_when_there_is_no_snapshot(demo_reference, tmp_path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "live.zarr")
    pipeline = train_pipeline(tmp_path / "train.yaml", train__max_steps=60, train__checkpoint_every=2)
    run_dir = tmp_path / "run"
    proc = start_run("--cache", store, "--pipeline", pipeline, "--run-dir", run_dir, "--snapshot", "none")
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    (store / "label" / "c" / "0").write_bytes(b"rebuilt")  # what a concurrent rebuild would do to a small array
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert json.loads((run_dir / "summary.json").read_text())["live_store_changed"] is True
    assert "THE LIVE STORE CHANGED" in (run_dir / "train.log").read_text()


def test_prune_deletes_by_rename_and_clears_crash_leftovers(tmp_path: Path) -> None:
    """Old checkpoints go by rename-then-delete, and the .partial folders a crash left (mid-save or
    mid-delete) are cleared by the next save; the newest `keep` stay whole."""
    from salt_train.checkpoint import complete_checkpoints, save_checkpoint
    from salt_train.state import Position, TrainState

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    leftover = tmp_path / "checkpoints" / "step-00000001.partial"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, model, optimizer, TrainState(step=step, position=Position()), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest.json", "step-00000003", "step-00000004"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000004", "step-00000003"]
