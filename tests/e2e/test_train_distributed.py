"""`salt-train run` under torchrun: two real gloo ranks with DistributedDataParallel on a real store.

A 2-rank run must take the steps one process takes on the same global batches (each rank its
half of the sorted batch), keep its replicas identical, write the run folder from rank 0 only,
and leave checkpoints any number of ranks can resume. Each torchrun launch costs ~6 s of
imports, so the module shares one 2-rank run; the 1-process runs it is compared with run in
this process (no interpreter start).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import Build, CliResult, call_train, train_pipeline
from test_train import final_weights, metrics
from torchrun_job import OUR_FRAME, run_job

STEPS = 8
BATCH = 4  # global: 2 clips per rank
RESUME_AT = 4  # the 2-rank checkpoint the 1-process resume continues from
RUN_FILES = {
    "run.lock",
    "config.yaml",
    "run.json",
    "train.log",
    "metrics.jsonl",
    "rows.jsonl",
    "checkpoints",
    "export",
    "summary.json",
}


def torchrun_train(nproc: int, *args: str | Path, timeout: float = 180) -> CliResult:
    """``torchrun --standalone --nproc-per-node=NPROC -m salt_train run ARGS`` as a real job."""
    return run_job(nproc, "salt_train", "run", *args, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rows_by_step(run_dir: Path) -> dict[int, list[list[int]]]:
    return {r["step"]: r["rows"] for r in read_jsonl(run_dir / "rows.jsonl")}


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def assert_weights_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert torch.allclose(got[key], want[key], rtol=0, atol=atol), (
            f"{key}: max |diff| {(got[key] - want[key]).abs().max().item():.3g}"
        )


@dataclass
class Runs:
    store: Path
    pipeline: Path
    ranks2: Path  # the 2-rank run, STEPS steps
    ranks2_result: CliResult
    single: Path  # the same recipe in one process


@pytest.fixture(scope="module")
def runs(demo_reference: Build, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    work = tmp_path_factory.mktemp("train-ddp")
    pipeline = train_pipeline(
        work / "train.yaml",
        train__batch_size=BATCH,
        train__max_steps=STEPS,
        train__log_every=1,
        train__checkpoint_every=2,
        train__keep_checkpoints=STEPS,
        train__record_rows=True,
        stream__snapshot="none",
    )
    common = ("--cache", demo_reference.store, "--pipeline", pipeline)
    ranks2 = work / "ranks2"
    result = torchrun_train(2, *common, "--run-dir", ranks2)
    assert result.returncode == 0, result.stderr[-4000:]
    single = work / "single"
    alone = call_train("run", *common, "--run-dir", single)
    assert alone.returncode == 0, alone.stderr[-4000:]
    return Runs(demo_reference.store, pipeline, ranks2, result, single)


def test_each_rank_steps_on_its_half_of_the_one_process_batch(runs: Runs) -> None:
    from shared.rows import committed_rows
    from shared.store import LatentStore

    committed = set(committed_rows(LatentStore.open(runs.store)).tolist())
    per_epoch = len(committed) // BATCH
    assert per_epoch < STEPS  # the run crosses an epoch boundary
    distributed, single = rows_by_step(runs.ranks2), rows_by_step(runs.single)
    assert sorted(distributed) == sorted(single) == list(range(STEPS))
    for step in range(STEPS):
        rank0, rank1 = distributed[step]
        assert len(rank0) == len(rank1) == BATCH // 2, (step, rank0, rank1)
        assert not set(rank0) & set(rank1), f"step {step}: ranks shared rows {rank0} {rank1}"
        assert set(rank0) | set(rank1) <= committed
        (whole,) = single[step]
        assert rank0 + rank1 == sorted(whole), f"step {step}: not the two halves of the sorted global batch"
    lines = read_jsonl(runs.ranks2 / "rows.jsonl")
    assert [(r["epoch"], r["index"]) for r in lines] == [divmod(s, per_epoch) for s in range(STEPS)]


def test_loss_curve_and_weights_match_one_process(runs: Runs) -> None:
    distributed, single = losses(runs.ranks2), losses(runs.single)
    assert sorted(distributed) == sorted(single) == list(range(1, STEPS + 1))
    for step, loss in single.items():
        assert distributed[step] == pytest.approx(loss, rel=1e-4), step
    assert_weights_close(final_weights(runs.ranks2), final_weights(runs.single))
    summary = json.loads((runs.ranks2 / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["clips_seen"] == STEPS * BATCH  # both ranks' clips


def test_replicas_stay_identical(runs: Runs) -> None:
    from safetensors.torch import load_file

    from shared.store import LatentStore

    from salt_train.model import build_salt_student, mask_groups
    from salt_train.run_checks import replica_digest
    from salt_train.run_folder import read_run_config

    summary = json.loads((runs.ranks2 / "summary.json").read_text())
    assert summary["world_size"] == 2
    replicas = summary["replicas"]
    assert replicas["identical"] is True and len(replicas["digests"]) == 2
    assert replicas["digests"][0] == replicas["digests"][1]
    # ... and they are the digest of the weights rank 0 checkpointed at the end.
    recipe = read_run_config(runs.ranks2)
    model = build_salt_student(recipe.model, LatentStore.open(runs.store).teacher_width, mask_groups(recipe.mask))
    checkpoint = runs.ranks2 / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"
    model.load_state_dict(load_file(checkpoint))
    assert replica_digest(model) == replicas["digests"][0]
    alone = json.loads((runs.single / "summary.json").read_text())
    assert alone["world_size"] == 1 and alone["replicas"]["identical"] is True
    assert len(alone["replicas"]["digests"]) == 1


def test_only_rank_0_writes_and_prints(runs: Runs) -> None:
    assert {p.name for p in runs.ranks2.iterdir()} == RUN_FILES  # no per-rank files
    assert sorted(p.name for p in (runs.ranks2 / "checkpoints").iterdir()) == [
        "latest.json",
        *(f"step-{s:08d}" for s in range(2, STEPS + 1, 2)),
    ]
    assert len(metrics(runs.ranks2)) == STEPS  # one record per step, not one per rank
    run = json.loads((runs.ranks2 / "run.json").read_text())
    assert run["world_size"] == 2 and "resumes" not in run
    output = runs.ranks2_result.stdout + runs.ranks2_result.stderr
    assert output.count("== salt-train run") == 1, output[-4000:]
    assert output.count("== summary") == 1, output[-4000:]
    assert runs.ranks2_result.stdout.count("run folder:") == 1
    assert "ranks" in output and "DDP" in output  # the startup block says how it ran
    assert "INFO [rank 1]" not in output and "[rank 1]" not in runs.ranks2_result.stdout
    assert "INFO [rank 0]" in output  # rank 0's health lines
    assert not OUR_FRAME.search(output)


def stopped_after(run_dir: Path, dest: Path, step: int) -> Path:
    """A copy of ``run_dir`` as it was right after its step-``step`` checkpoint (a preempted job)."""
    shutil.copytree(run_dir, dest)
    for checkpoint in (dest / "checkpoints").glob("step-*"):
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)
    (dest / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": f"step-{step:08d}", "step": step}))
    for name, kept in (("rows.jsonl", lambda r: r["step"] < step), ("metrics.jsonl", lambda r: r["step"] <= step)):
        records = [r for r in read_jsonl(dest / name) if kept(r)]
        (dest / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (dest / "summary.json").unlink()
    shutil.rmtree(dest / "export")
    return dest


def test_a_2_rank_checkpoint_resumes_in_one_process(runs: Runs, tmp_path: Path) -> None:
    state = json.loads((runs.ranks2 / "checkpoints" / f"step-{RESUME_AT:08d}" / "state.json").read_text())
    assert state["step"] == RESUME_AT and state["clips_seen"] == RESUME_AT * BATCH
    run_dir = stopped_after(runs.ranks2, tmp_path / "resumed", RESUME_AT)
    result = call_train("run", "--cache", runs.store, "--run-dir", run_dir, "--resume", "--max-steps", str(STEPS))
    assert result.returncode == 0, result.stderr[-4000:]

    # the same global batches from step RESUME_AT on, now in one process
    resumed, single = read_jsonl(run_dir / "rows.jsonl"), read_jsonl(runs.single / "rows.jsonl")
    assert [r["step"] for r in resumed] == list(range(STEPS))
    assert [len(r["rows"]) for r in resumed] == [2] * RESUME_AT + [1] * (STEPS - RESUME_AT)
    assert [sorted(sum(r["rows"], [])) for r in resumed] == [sorted(r["rows"][0]) for r in single]
    assert [(r["epoch"], r["index"]) for r in resumed] == [(r["epoch"], r["index"]) for r in single]
    # the same schedule and steps: losses and final weights of the uninterrupted 1-process run
    got, want = losses(run_dir), losses(runs.single)
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step
    assert [r["lr"] for r in metrics(run_dir)] == [r["lr"] for r in metrics(runs.single)]
    assert_weights_close(final_weights(run_dir), final_weights(runs.single))

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 1 and summary["clips_seen"] == STEPS * BATCH
    run = json.loads((run_dir / "run.json").read_text())
    assert run["world_size"] == 2
    assert [r["world_size"] for r in run["resumes"]] == [1]


def test_bad_settings_under_torchrun_are_one_line(runs: Runs, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = torchrun_train(
        2, "--cache", runs.store, "--pipeline", runs.pipeline, "--run-dir", run_dir, "--set", "train.batch_size=3"
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert re.search(r"exitcode\s*:\s*2\b", output), output[-4000:]  # a rank exited with the usage code
    errors = [line for line in output.splitlines() if "salt-train" in line and "error:" in line]
    assert len(errors) == 1, output[-4000:]
    assert errors[0].startswith("salt-train [rank 0]: error:") and "not divisible" in errors[0], errors[0]
    assert "train.batch_size 3" in errors[0] and "2 ranks" in errors[0]
    assert output.count("not divisible") == 1, output[-4000:]
    assert not OUR_FRAME.search(output), output[-4000:]
    assert not run_dir.exists()  # refused before anything was written
