"""`salt-cache build` under torchrun: real gloo ranks, real PyAV decode, a real VideoMAE, real Zarr stores.

Every test launches ``python -m torch.distributed.run`` (about 8 s of imports per launch), so the
2-rank build of the mixed set is shared by the tests that only read it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Build, CliResult, SsV2Set, call_cli, copy_store
from test_build import _open
from torchrun_job import OUR_FRAME, children, run_job, start_job, stop_job

from shared.store import RowStatus


def run_torchrun(nproc: int, *args: str | Path, timeout: float = 120) -> CliResult:
    """``torchrun --nproc-per-node=NPROC -m salt_cache build ARGS`` as a real job."""
    return run_job(nproc, "salt_cache", "build", *args, timeout=timeout)


def _start(nproc: int, *args: str | Path, **streams) -> subprocess.Popen:
    return start_job(nproc, "salt_cache", "build", *args, **streams)


def _build_args(build: Build, store: Path) -> list[str | Path]:
    return ["--src", build.src, "--out", store, "--teacher", build.teacher, "--pipeline", build.pipeline]


def _salt_attrs(store: Path) -> dict:
    """The store's ``salt`` attributes, less the build's wall-clock finishing time."""
    attrs = dict(_open(store).attrs["salt"])
    attrs["build"] = {k: v for k, v in attrs["build"].items() if k != "finished_at"}
    return attrs


def assert_same_store(store: Path, reference: Path) -> None:
    """Every array of the group equal (dtype, shape, values), and the attributes but for the finishing time."""
    got, want = _open(store), _open(reference)
    assert sorted(got.array_keys()) == sorted(want.array_keys())
    for name in want.array_keys():
        a, b = got[name][:], want[name][:]
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, a.shape, b.dtype, b.shape)
        assert np.array_equal(a, b), f"{name} differs from the single-process build"
    assert sorted(got.attrs.keys()) == sorted(want.attrs.keys())
    assert _salt_attrs(store) == _salt_attrs(reference)


def _no_traceback_from_us(output: str) -> None:
    frames = OUR_FRAME.findall(output)
    assert not frames, f"a traceback through our code:\n{output[-4000:]}"


def _files(store: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file()
    }


# ---- a 2-rank build of the mixed set ----------------------------------------------------


@pytest.fixture(scope="module")
def torchrun_build(reference_build: Build, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The mixed set built by 2 gloo ranks, with the reference build's teacher folder, recipe and source."""
    assert reference_build.result.returncode == 0, reference_build.result.stderr[-3000:]
    store = tmp_path_factory.mktemp("torchrun-mixed") / "latents.zarr"
    result = run_torchrun(2, *_build_args(reference_build, store))
    return Build(store, result, reference_build.teacher, reference_build.pipeline, reference_build.src)


def test_two_rank_build_equals_single_process_build(
    torchrun_build: Build, reference_build: Build, mixed_set: SsV2Set
) -> None:
    result = torchrun_build.result
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert_same_store(torchrun_build.store, reference_build.store)
    assert np.sum(_open(torchrun_build.store)["status"][:] == RowStatus.FAILED) == 3

    # Rank 0 alone prints the plan and the summary; rank 1 only warns (its shard holds the missing clip).
    assert result.stdout.count("== built ") == 1, result.stdout
    assert result.stderr.count("== salt-cache build") == 1
    assert "ranks          : 2 (torchrun)" in result.stderr
    assert "rank 0 of 2" in result.stderr and "rank 1 of 2" not in result.stderr  # the one progress bar
    assert re.search(r"WARNING \[rank 1\] salt_cache.build: clip 200007 failed", result.stderr), result.stderr
    assert "[rank 1]" not in "".join(line for line in result.stderr.splitlines(True) if "WARNING" not in line)
    assert ": error:" not in output and "Traceback" not in output

    check = call_cli("verify", torchrun_build.store)
    assert check.returncode == 0, check.stdout + check.stderr


def test_two_rank_build_of_two_views_per_clip_equals_single_process_build(
    demo_views_reference: Build, tmp_path: Path
) -> None:
    """Views are drawn from (clip id, view) alone, so ranks redraw exactly the single process's crops."""
    assert demo_views_reference.result.returncode == 0, demo_views_reference.result.stderr[-3000:]
    store = tmp_path / "latents.zarr"
    result = run_torchrun(2, *_build_args(demo_views_reference, store), *demo_views_reference.extra["args"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert_same_store(store, demo_views_reference.store)
    assert call_cli("verify", store).returncode == 0


def test_rerun_of_finished_store_under_torchrun_changes_nothing(torchrun_build: Build, tmp_path: Path) -> None:
    assert torchrun_build.result.returncode == 0, torchrun_build.result.stderr[-3000:]
    store = copy_store(torchrun_build.store, tmp_path / "latents.zarr")
    before = _files(store)
    result = run_torchrun(2, *_build_args(torchrun_build, store))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "0 to do" in result.stderr
    assert result.stdout.count("== built ") == 1
    assert _files(store) == before  # not a byte rewritten, the finishing time included
    assert not (tmp_path / "latents.zarr.lock").exists()  # a finished store is only read
    _no_traceback_from_us(result.stdout + result.stderr)


def test_missing_teacher_folder_is_one_error_line_from_rank_0(
    mixed_set: SsV2Set, reference_build: Build, tmp_path: Path
) -> None:
    store = tmp_path / "latents.zarr"
    result = run_torchrun(
        2,
        "--src",
        mixed_set.root,
        "--out",
        store,
        "--teacher",
        tmp_path / "no-such-teacher",
        "--pipeline",
        reference_build.pipeline,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in output.splitlines() if ": error:" in line]
    assert errors == [f"salt-cache [rank 0]: error: teacher folder {tmp_path / 'no-such-teacher'} does not exist"], (
        output[-4000:]
    )
    assert "salt-cache [rank 1]" not in output
    # torchrun's own report says each rank exited 2 (a usage error), not that one crashed.
    assert len(re.findall(r"exitcode\s*: 2\b", output)) >= 1, output[-4000:]
    _no_traceback_from_us(output)
    assert not store.exists()


# ---- kill one rank mid-build, then resume with more ranks ----------------------------------

RANK1_SHARDS = range(5, 10)  # 10 shards of 2 rows over 2 ranks: rank 1 builds shards 5..9


def _committed(store: Path, shards: range) -> list[int]:
    return [s for s in shards if (store / "status" / "c" / str(s)).is_file()]


def _child_with_rank(parent: int, rank: int) -> int | None:
    """The child of ``parent`` whose environment says ``RANK=rank`` (a torchrun worker)."""
    for pid in children(parent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def _kill_rank1_after_its_first_commit(proc: subprocess.Popen, store: Path) -> list[int]:
    """SIGSTOP rank 1 as soon as one of its shards is committed (so it cannot run on), then SIGKILL it."""
    deadline = time.monotonic() + 90
    rank1 = None
    while rank1 is None or not _committed(store, RANK1_SHARDS):
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before rank 1 committed a shard"
        assert time.monotonic() < deadline, "rank 1 committed no shard in 90 s"
        rank1 = rank1 or _child_with_rank(proc.pid, 1)
        time.sleep(0.002)
    os.kill(rank1, signal.SIGSTOP)
    done = _committed(store, RANK1_SHARDS)
    os.kill(rank1, signal.SIGKILL)
    return done


def test_kill_one_rank_then_resume_with_three_ranks_equals_uninterrupted(
    demo_set: Path, demo_pipeline: Path, demo_reference: Build, tmp_path: Path
) -> None:
    assert demo_reference.result.returncode == 0, demo_reference.result.stderr[-3000:]
    reference = _open(demo_reference.store)["status"]
    assert -(-reference.shape[0] // reference.chunks[0]) == len(RANK1_SHARDS) * 2  # 10 shards

    store = tmp_path / "latents.zarr"
    log_path = tmp_path / "build.log"
    with log_path.open("w") as log:
        proc = _start(2, *_build_args(demo_reference, store), stdout=log, stderr=subprocess.STDOUT)
        try:
            rank1_done = _kill_rank1_after_its_first_commit(proc, store)
            returncode = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                stop_job(proc)
                proc.wait()
    output = log_path.read_text()
    assert len(rank1_done) < len(RANK1_SHARDS), (
        f"rank 1 had committed all its shards {rank1_done} before the kill: nothing was interrupted"
    )
    assert returncode != 0, output[-4000:]

    # The surviving rank 0 says, on one line, what happened and what to do.
    survivor = [line for line in output.splitlines() if line.startswith("salt-cache [rank 0]:")]
    assert len(survivor) == 1, output[-4000:]
    assert "stopped by SIGTERM" in survivor[0] or "lost contact with another rank" in survivor[0], survivor
    assert "rerun the same command to resume (with any number of ranks)" in survivor[0], survivor
    assert "salt_cache/build.py" not in output, output[-4000:]
    _no_traceback_from_us(output)
    # torchrun's report names the killed rank, and rank 0 exited by itself (143 or 1), not by a signal.
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9 ", output), output[-4000:]
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: (143|1) ", output), output[-4000:]

    killed = _open(store)["status"][:]
    pending = int(np.sum(killed == RowStatus.PENDING))
    assert pending > 0, "no row is pending after the kill: nothing was interrupted"
    # The demo clips all decode: a stop must leave rows pending (redone by a rerun), never failed.
    stop_errors = {row: str(_open(store)["error"][row]) for row in np.flatnonzero(killed == RowStatus.FAILED)}
    assert not stop_errors, f"the SIGTERM was recorded as clip failures (a rerun will not redo them): {stop_errors}"
    for shard in rank1_done:  # what rank 1 committed before it died stays committed
        assert np.all(killed[2 * shard : 2 * shard + 2] == RowStatus.COMMITTED), (shard, killed)

    # Resume with three ranks: each builds a share of what is pending, and the result is the uninterrupted build.
    result = run_torchrun(3, *_build_args(demo_reference, store))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"{pending} to do)" in result.stderr, result.stderr
    assert "ranks          : 3 (torchrun)" in result.stderr
    assert result.stdout.count("== built ") == 1
    _no_traceback_from_us(result.stdout + result.stderr)
    assert list(store.rglob("*.partial")) == []
    assert np.all(_open(store)["status"][:] == RowStatus.COMMITTED)
    assert_same_store(store, demo_reference.store)

    check = call_cli("verify", store)
    assert check.returncode == 0, check.stdout + check.stderr
