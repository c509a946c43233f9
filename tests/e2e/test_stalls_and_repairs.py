"""A stuck loader never hangs a run, a killed snapshot is taken again as it was asked, a damaged shard is
repaired: real processes stopped and killed from outside (SIGSTOP, SIGTERM, kill -9 at exact points),
real stores, tiny students.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import FORKSERVER, REPO, Build, call_cli, call_train, copy_store, train_pipeline
from test_faults import (
    _alive,
    _flip,
    _shard_file,
    forkserver_pid,
    latest_weights,
    one_error_line,
    start,
    start_long_run,
    wait_for,
)
from xfs_mount import xfs_dir  # noqa: F401  (the fixture)

from salt_train.preflight import process_tree
from salt_train.workers import STOP_BOUND_S

STEPS = 40  # more than the stopped run can take: the SIGSTOP lands after its first step


@pytest.fixture(scope="module")
def straight(demo_reference: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every stopped-and-resumed run must end equal to."""
    work = tmp_path_factory.mktemp("straight")
    pipeline = train_pipeline(
        work / "train.yaml", train__max_steps=STEPS, train__checkpoint_every=1000, train__log_every=1, **FORKSERVER
    )
    result = call_train("run", "--cache", demo_reference.store, "--pipeline", pipeline, "--run-dir", work / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


def _stop_the_workers(proc: subprocess.Popen) -> tuple[list[int], list[int]]:
    """SIGSTOP both loader workers (as a read hung on NFS looks); returns them and the whole tree."""
    tree = process_tree(proc.pid)
    workers = process_tree(forkserver_pid(proc))[1:]
    assert len(workers) == 2, (tree, workers)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    return workers, tree


def _nothing_left(tree: list[int], tmpdir: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while any(map(_alive, tree[1:])) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in tree[1:] if _alive(pid)]
    for pid in left:  # not to the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the job left behind: {left}"
    assert list(tmpdir.glob("pymp-*")) == [], "multiprocessing temp folder left behind"


def _checkpoint_is_the_last_whole_step(run_dir: Path) -> int:
    step = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]  # log_every=1
    assert 0 < step < STEPS and step == logged, (step, logged)
    return step


def _resumes_to_the_straight_weights(run_dir: Path, store: Path, straight: Path) -> None:
    resumed = call_train("run", "--cache", store, "--run-dir", run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = latest_weights(straight), latest_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after the resume"


# ---- 1. loader workers stopped: SIGTERM still stops in bounded time, and the stall bound stops alone ------


def test_sigterm_with_the_workers_stopped_exits_in_bound_and_resumes_identical(
    demo_reference: Build, straight: Path, tmp_path: Path
) -> None:
    pipeline = train_pipeline(
        tmp_path / "train.yaml", train__max_steps=STEPS, train__checkpoint_every=1000, train__log_every=1, **FORKSERVER
    )
    run_dir = tmp_path / "run"
    proc = start(
        "salt_train",
        "run",
        "--cache",
        demo_reference.store,
        "--pipeline",
        pipeline,
        "--run-dir",
        run_dir,
        tmpdir=tmp_path / "tmp",
    )
    wait_for(run_dir / "metrics.jsonl", proc)
    _, tree = _stop_the_workers(proc)
    time.sleep(3)  # the main process has taken what was prefetched and waits on the stopped workers
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_BOUND_S)
    finally:
        if proc.poll() is None:
            for pid in tree:
                os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - sent
    stderr = proc.stderr.read()
    print(f"SIGTERM with both workers stopped: exit {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "--resume" in stderr
    _nothing_left(tree, tmp_path / "tmp")
    _checkpoint_is_the_last_whole_step(run_dir)
    _resumes_to_the_straight_weights(run_dir, demo_reference.store, straight)


def test_a_stalled_loader_stops_with_one_line_and_a_checkpoint(
    demo_reference: Build, straight: Path, tmp_path: Path
) -> None:
    bound = 15
    pipeline = train_pipeline(
        tmp_path / "train.yaml",
        train__max_steps=STEPS,
        train__checkpoint_every=1000,
        train__log_every=1,
        train_loader__stall_timeout_s=bound,
        **FORKSERVER,
    )
    run_dir = tmp_path / "run"
    proc = start(
        "salt_train",
        "run",
        "--cache",
        demo_reference.store,
        "--pipeline",
        pipeline,
        "--run-dir",
        run_dir,
        tmpdir=tmp_path / "tmp",
    )
    wait_for(run_dir / "metrics.jsonl", proc)
    _, tree = _stop_the_workers(proc)
    stopped = time.monotonic()
    try:
        proc.wait(timeout=bound + STOP_BOUND_S)
    finally:
        if proc.poll() is None:
            for pid in tree:
                os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - stopped
    stderr = proc.stderr.read()
    print(f"stalled loader: exit {proc.returncode} {took:.1f} s after the SIGSTOP (bound {bound} s)")
    assert proc.returncode == 1, stderr[-3000:]
    line = one_error_line(stderr)
    assert "no batch from the loader in" in line and "train_loader.stall_timeout_s=15" in line, line
    assert "(stopped)" in line and "with checkpoint step-" in line and "--resume" in line, line
    assert "stall timeout 15 s" in stderr  # the start block shows the bound
    _nothing_left(tree, tmp_path / "tmp")
    _checkpoint_is_the_last_whole_step(run_dir)
    _resumes_to_the_straight_weights(run_dir, demo_reference.store, straight)


# ---- 2. kill -9 at four points of a copy snapshot, then --resume ----------------------------------------

# (audit event, needle, occurrence): the process kills itself just before it
KILL_POINTS = {
    "mid-copy": ("shutil.copyfile", "latents.zarr", 5),  # a few files copied into <name>.partial
    "copied, not yet renamed": ("os.rename", ".snapshots/", 1),  # the whole copy, still under .partial
    "renamed, not yet recorded": ("open", "run.json.partial", 1),  # finished, but run.json does not know it
    "recorded, before any step": ("open", "metrics.jsonl", 1),
}


def _kill_at(event: str, needle: str, count: int, *args: str | Path) -> subprocess.CompletedProcess:
    """``salt-train ARGS`` killed by SIGKILL just before its ``count``-th audit event ``event`` on ``needle``."""
    return subprocess.run(
        [sys.executable, REPO / "tests" / "kill_at.py", event, needle, str(count), "salt_train", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )


@pytest.fixture(scope="module")
def copy_runs(demo_reference: Build, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A live store of its own (the snapshots go beside it), a recipe, and the uninterrupted copy-mode run."""
    work = tmp_path_factory.mktemp("copy-snapshots")
    live = copy_store(demo_reference.store, work / "live" / "latents.zarr")
    pipeline = train_pipeline(work / "train.yaml", train__max_steps=6, train__checkpoint_every=3)
    result = call_train(
        "run", "--cache", live, "--pipeline", pipeline, "--run-dir", work / "straight", "--snapshot", "copy"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return live, pipeline, work / "straight"


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_during_a_copy_snapshot_then_resume(
    point: str, copy_runs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    live, pipeline, straight = copy_runs
    run_dir = tmp_path / f"killed-{point.split()[0].strip(',')}"
    killed = _kill_at(
        *KILL_POINTS[point], "run", "--cache", live, "--pipeline", pipeline, "--run-dir", run_dir, "--snapshot", "copy"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["stream"]["snapshot"] == "copy"  # as given

    resumed = call_train("run", "--cache", live, "--run-dir", run_dir, "--resume")  # no --snapshot repeated
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "NO SNAPSHOT" not in resumed.stderr
    record = json.loads((run_dir / "run.json").read_text())["snapshot"]
    assert record["mode"] == "copy" and record["name"] == run_dir.name
    root = live.with_name(live.name + ".snapshots")
    assert [p.name for p in root.iterdir() if p.name.startswith(run_dir.name)] == [run_dir.name], "leftovers"
    assert Path(record["path"]).is_dir() and not list(root.glob("*.partial"))
    a, b = latest_weights(straight), latest_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), f"{point}: weights differ from the uninterrupted run"


def test_kill_9_before_a_reflink_snapshot_is_recorded_then_resume(
    demo_reference: Build, xfs_dir: Path, tmp_path: Path
) -> None:
    """On a real XFS (reflink=1): a run killed between finishing its clone and recording it resumes on that
    clone, in reflink mode, with nothing else left beside the store."""
    live = copy_store(demo_reference.store, xfs_dir / "reflink-kill" / "latents.zarr")
    pipeline = train_pipeline(tmp_path / "train.yaml", train__max_steps=4, train__checkpoint_every=2)
    run_dir = tmp_path / "run"
    killed = _kill_at(
        "open",
        "run.json.partial",
        1,
        "run",
        "--cache",
        live,
        "--pipeline",
        pipeline,
        "--run-dir",
        run_dir,
        "--snapshot",
        "reflink",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    root = live.with_name(live.name + ".snapshots")
    assert [p.name for p in root.iterdir()] == ["run"]  # finished, unrecorded
    resumed = call_train("run", "--cache", live, "--run-dir", run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())["snapshot"]
    assert record["mode"] == "reflink" and Path(record["path"]).parent == root / "run"
    assert sorted(p.name for p in root.iterdir()) == ["run"]
    assert not [p for p in root.iterdir() if p.name.startswith(".reflink-probe")]


def test_a_resume_refuses_another_snapshot_mode(copy_runs: tuple[Path, Path, Path]) -> None:
    live, _, straight = copy_runs
    result = call_train("run", "--cache", live, "--run-dir", straight, "--resume", "--snapshot", "none")
    assert result.returncode == 2 and "started with --snapshot copy" in one_error_line(result.stderr)


# ---- 3. a flipped byte in a committed shard: verify names the fix, the fix restores the rows -------------


def test_verify_names_the_repair_and_the_repair_restores_the_rows(demo_reference: Build, tmp_path: Path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "damaged.zarr")
    _flip(_shard_file(store, "latents", 3), 5000)
    rerun = call_cli(
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
    assert rerun.returncode == 0 and "0 to do" in rerun.stderr  # a plain rerun looks at status only
    check = call_cli("verify", store)
    assert check.returncode == 1 and "latents checksum mismatch" in check.stdout, check.stdout
    fixes = [line.split("fix: ", 1)[1] for line in check.stdout.splitlines() if line.strip().startswith("fix: ")]
    assert len(fixes) == 1 and "--repair" in fixes[0], check.stdout
    command = shlex.split(fixes[0])
    assert command[0] == "salt-cache"
    repaired = call_cli(*command[1:])  # exactly what verify printed: the store's own recipe and teacher
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    assert "1 damaged shard(s) rebuilt" in repaired.stderr
    assert call_cli("verify", store).returncode == 0
    reference, rebuilt = zarr.open_group(str(demo_reference.store), mode="r"), zarr.open_group(str(store), mode="r")
    for name in ("pixels", "latents", "status", "frame_index", "pixels_checksum", "latents_checksum", "error"):
        assert np.array_equal(rebuilt[name][:], reference[name][:]), name


# ---- 4. the smaller items ----------------------------------------------------------------------------------


def test_the_resume_hint_quotes_paths_with_spaces_and_works_as_printed(demo_reference: Build, tmp_path: Path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "my stores" / "latents.zarr")
    pipeline = train_pipeline(
        tmp_path / "train.yaml",
        train__max_steps=400,
        train__checkpoint_every=1000,
        train__log_every=1,
        stream__snapshot="none",
    )
    run_dir = tmp_path / "my runs" / "run one"
    proc = start(
        "salt_train", "run", "--cache", store, "--pipeline", pipeline, "--run-dir", run_dir, tmpdir=tmp_path / "tmp"
    )
    wait_for(run_dir / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    hint = stderr.split("continue with: ", 1)[1].split(" (any number of ranks)", 1)[0]
    command = shlex.split(hint)
    assert command[:2] == ["salt-train", "run"] and str(run_dir) in command and str(store) in command, hint
    step = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    resumed = call_train(*command[1:], "--max-steps", str(step + 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_a_resume_takes_a_set_that_fixes_a_wrong_val_cache(
    demo_reference: Build, demo_val_reference: Build, tmp_path: Path
) -> None:
    pipeline = train_pipeline(tmp_path / "train.yaml", train__max_steps=4, train__eval_every=2, eval__quick_rows=4)
    run_dir = tmp_path / "run"
    wrong = call_train(
        "run",
        "--cache",
        demo_reference.store,
        "--pipeline",
        pipeline,
        "--run-dir",
        run_dir,
        "--set",
        f"eval.val_cache={tmp_path / 'no-such-store.zarr'}",
    )
    assert wrong.returncode == 2 and "no-such-store" in one_error_line(wrong.stderr)
    refused = call_train(
        "run", "--cache", demo_reference.store, "--run-dir", run_dir, "--resume", "--set", "train.lr=1e-2"
    )
    assert refused.returncode == 2 and "a resume may set only eval.*" in one_error_line(refused.stderr)
    fixed = call_train(
        "run",
        "--cache",
        demo_reference.store,
        "--run-dir",
        run_dir,
        "--resume",
        "--set",
        f"eval.val_cache={demo_val_reference.store}",
    )
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["val_cache"] == str(demo_val_reference.store)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [2, 4]
    again = call_train("run", "--cache", demo_reference.store, "--run-dir", run_dir, "--resume", "--max-steps", "6")
    assert again.returncode == 0, again.stderr[-3000:]  # later resumes continue with the fixed recipe


def test_kill_9_of_the_forkserver_is_one_line_without_a_traceback(demo_reference: Build, tmp_path: Path) -> None:
    proc, _ = start_long_run(demo_reference.store, tmp_path)
    tree = process_tree(proc.pid)
    os.kill(forkserver_pid(proc), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    assert "a loader worker died" in one_error_line(stderr)  # and no traceback at all (one_error_line)
    assert "Exception ignored" not in stderr
    _nothing_left(tree, tmp_path / "tmp")
    shutil.rmtree(tmp_path / "tmp")
