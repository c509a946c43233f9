"""Fault injection from outside, second campaign (issue 20): one writer per run folder, checkpoints that
prove themselves, an export that fails cleanly on a full disk, recipes read strictly, and the smaller
findings (a build with nothing committed, pickles and NaN weights at convert-teacher, an edited store
attribute). Real processes where the finding is about processes, real tmpfs for the full disk.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import torch
import yaml
from conftest import Build, call_cli, call_train, copy_store, run_cli, train_pipeline
from safetensors.torch import load_file
from test_faults import latest_weights, one_error_line, small_tmpfs, start, wait_for

# ---- 1. one writer per run folder ------------------------------------------------------------


def _wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    return [(proc.wait(timeout=timeout), proc.communicate()[1]) for proc in procs]


def _first_to_exit(procs: list[subprocess.Popen], timeout: float = 180) -> subprocess.Popen:
    deadline = time.monotonic() + timeout
    while all(proc.poll() is None for proc in procs):
        assert time.monotonic() < deadline, "neither process ended"
        time.sleep(0.05)
    return next(proc for proc in procs if proc.poll() is not None)


def _refused_naming(proc: subprocess.Popen, holder: subprocess.Popen) -> None:
    _, stderr = proc.communicate()
    assert proc.returncode == 2, stderr[-3000:]
    line = one_error_line(stderr)
    assert "is in use by another process" in line and f"PID {holder.pid}" in line, line


def test_one_writer_per_run_folder_and_a_kill_9_frees_it_at_once(demo_reference: Build, tmp_path: Path) -> None:
    """Two new runs on one folder: one trains, the other is refused naming it (never the
    config.yaml.partial race); kill -9 of the trainer; at once two --resume: again exactly one trains."""
    pipeline = train_pipeline(
        tmp_path / "train.yaml", train__max_steps=400, train__checkpoint_every=2, train__log_every=1
    )
    run_dir = tmp_path / "run"
    args = ("run", "--cache", demo_reference.store, "--run-dir", run_dir)
    fresh = [start("salt_train", *args, "--pipeline", pipeline, tmpdir=tmp_path / f"tmp-{i}") for i in range(2)]
    loser = _first_to_exit(fresh)
    winner = next(proc for proc in fresh if proc is not loser)
    _refused_naming(loser, winner)
    latest = run_dir / "checkpoints" / "latest.json"
    wait_for(latest, winner)
    winner.kill()  # kill -9
    winner.wait(timeout=30)
    step = json.loads(latest.read_text())["step"]

    resumes = [
        start("salt_train", *args, "--resume", "--max-steps", str(step + 4), tmpdir=tmp_path / f"tmp-r{i}")
        for i in range(2)
    ]
    loser = _first_to_exit(resumes)
    winner = next(proc for proc in resumes if proc is not loser)
    _refused_naming(loser, winner)
    ((code, stderr),) = _wait_all([winner])
    assert code == 0, stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == step + 4
    assert "Traceback" not in stderr


def test_the_lock_is_not_kept_by_a_forked_child(tmp_path: Path) -> None:
    """A child made by fork (a fork-context loader worker) does not keep the run folder locked after
    its parent dies."""
    script = f"""
import os, sys, time
from shared.filesystem import sole_writer
with sole_writer({str(tmp_path)!r}):
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    print("held", flush=True)
    time.sleep(60)
"""
    import sys

    from conftest import REPO

    from shared.errors import SaltUsageError
    from shared.filesystem import sole_writer

    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert parent.stdout.readline().strip() == "held"
        with pytest.raises(SaltUsageError, match=f"PID {parent.pid}"), sole_writer(tmp_path):
            pass
        parent.kill()
        parent.wait()
        with sole_writer(tmp_path):  # the forked child still runs, and holds nothing
            pass
    finally:
        import os
        import signal

        os.killpg(parent.pid, signal.SIGKILL)


# ---- 3. a damaged checkpoint is passed over ------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(demo_reference: Build, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 steps uninterrupted, checkpoints at 4 and 8."""
    work = tmp_path_factory.mktemp("straight-run")
    pipeline = train_pipeline(work / "train.yaml", train__max_steps=8, train__checkpoint_every=4)
    result = call_train("run", "--cache", demo_reference.store, "--pipeline", pipeline, "--run-dir", work / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


def _flip_byte(path: Path, at: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01  # one bit: safetensors' structure stays valid, as a disk error leaves it
    path.write_bytes(bytes(data))


NEWEST = "checkpoints/step-00000008"


@pytest.mark.parametrize(
    "name, at",
    [
        ("model.safetensors", 0.9),
        ("optimizer.safetensors", 0.5),
        ("rng.safetensors", 0.95),
        ("state.json", 0.3),
        ("checksums.json", 0.6),
    ],
)
def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_and_ends_identical(
    name: str, at: float, straight_run: Path, demo_reference: Build, tmp_path: Path
) -> None:
    run_dir = shutil.copytree(straight_run, tmp_path / "run")
    _flip_byte(run_dir / NEWEST / name, at)
    result = call_train("run", "--cache", demo_reference.store, "--run-dir", run_dir, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    fallbacks = [line for line in log.splitlines() if "falling back to the checkpoint before it" in line]
    assert len(fallbacks) == 1 and "step-00000008 is unreadable" in fallbacks[0], log[-3000:]
    assert "resumed from step-00000004" in log
    a, b = latest_weights(straight_run), latest_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "the fallback's final weights differ from the straight run's"


def _rewrite_state(checkpoint: Path, edit) -> None:
    """Edit state.json and record its new checksum, as a checkpoint written wrongly (not damaged) would be."""
    state = json.loads((checkpoint / "state.json").read_text())
    edit(state)
    (checkpoint / "state.json").write_text(json.dumps(state))
    if (checkpoint / "checksums.json").exists():  # (checkpoints before issue 20 had none)
        from salt_train.checkpoint import file_checksum

        manifest = json.loads((checkpoint / "checksums.json").read_text())
        manifest["files"]["state.json"] = file_checksum(checkpoint / "state.json")
        (checkpoint / "checksums.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda s: s.update(step=99), "says step 99 in folder step-00000008"),
        (lambda s: s["position"].update(index=100000), "position.index 100000 is past the stream's"),
        (lambda s: s["position"].update(epoch=10**6), "position.epoch 1000000 is past the stream's"),
    ],
)
def test_a_state_json_at_odds_with_its_folder_or_the_stream_is_passed_over(
    edit, reason: str, straight_run: Path, demo_reference: Build, tmp_path: Path
) -> None:
    run_dir = shutil.copytree(straight_run, tmp_path / "run")
    _rewrite_state(run_dir / NEWEST, edit)
    result = call_train("run", "--cache", demo_reference.store, "--run-dir", run_dir, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert reason in log and "resumed from step-00000004" in log, log[-3000:]


def test_latest_checkpoint_passes_over_a_damaged_one_with_one_line(
    straight_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What salt-train eval reads: the newest checkpoint that proves itself."""
    from salt_train.checkpoint import latest_checkpoint

    run_dir = shutil.copytree(straight_run, tmp_path / "run")
    assert latest_checkpoint(run_dir) == run_dir / NEWEST
    _flip_byte(run_dir / NEWEST / "model.safetensors", 0.7)
    with caplog.at_level(logging.WARNING, logger="salt_train"):
        assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-00000004"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "model.safetensors is damaged" in warnings[0], warnings


def test_eval_of_a_named_damaged_checkpoint_is_refused_in_one_line(
    straight_run: Path, demo_val_reference: Build, tmp_path: Path
) -> None:
    run_dir = shutil.copytree(straight_run, tmp_path / "run")
    _flip_byte(run_dir / NEWEST / "model.safetensors", 0.9)
    result = call_train(
        "eval",
        run_dir,
        "--checkpoint",
        "step-00000008",
        "--val-cache",
        demo_val_reference.store,
        "--out",
        tmp_path / "eval",
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "step-00000008 is unreadable" in line and "model.safetensors" in line, line


# ---- 4. a full disk at the export ------------------------------------------------------------------


def _bytes_on_disk(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def test_a_full_disk_at_the_export_is_one_line_and_resume_exports(demo_reference: Build, tmp_path: Path) -> None:
    """A tmpfs that takes the run's checkpoint but not its export too (sized from the same run on a
    roomy disk): one line, exit 2, the checkpoint intact; once there is room, --resume exports."""
    pipeline = train_pipeline(
        tmp_path / "train.yaml", train__max_steps=2, train__checkpoint_every=2, train__keep_checkpoints=1
    )
    roomy = tmp_path / "roomy"
    assert (
        call_train("run", "--cache", demo_reference.store, "--pipeline", pipeline, "--run-dir", roomy).returncode == 0
    )
    export = _bytes_on_disk(roomy / "export")
    size = (_bytes_on_disk(roomy) - export // 2) // 4096 * 4096
    with small_tmpfs(tmp_path / "small", f"{size // 1024}k") as small:
        run_dir = small / "run"
        result = run_cli(
            "run", "--cache", demo_reference.store, "--pipeline", pipeline, "--run-dir", run_dir, module="salt_train"
        )
        assert result.returncode == 2, result.stderr[-3000:]
        line = one_error_line(result.stderr)
        assert "cannot write the export" in line and "No space left on device" in line, line
        assert "step-00000002 is intact" in line and "--resume" in line
        assert not (run_dir / "export").exists() and not list(run_dir.glob("*.partial"))
        assert load_file(run_dir / "checkpoints" / "step-00000002" / "model.safetensors")
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)  # space freed
        resumed = call_train("run", "--cache", demo_reference.store, "--run-dir", run_dir, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        from salt_train.export import load_encoder

        encoder = load_encoder(run_dir / "export")
        weights = latest_weights(run_dir)
        assert all(torch.equal(value, weights[f"encoder.{key}"]) for key, value in encoder.state_dict().items())


# ---- 5. recipes read strictly ------------------------------------------------------------------------


def _set_in_train(key: str, value: str):
    """Set ``train.<key>`` in the recipe's text (replacing the line, or adding it)."""

    def change(text: str) -> str:
        line = re.compile(rf"^  {key}: .*$", re.M)
        return (
            line.sub(f"  {key}: {value}", text, 1)
            if line.search(text)
            else text.replace("\ntrain:\n", f"\ntrain:\n  {key}: {value}\n", 1)
        )

    return change


RECIPE_FAULTS = {
    "train given twice": (lambda text: text + "train:\n  lr: 1.0e-3\n", "train is given twice"),
    "empty file": (lambda text: "# only a comment\n", "is empty"),
    "seed past 2**64": (
        _set_in_train("seed", "99999999999999999999"),
        "train.seed: Input should be less than or equal to 4294967295",
    ),
    "seed -1": (_set_in_train("seed", "-1"), "train.seed: Input should be greater than or equal to 0"),
    "lr inf": (_set_in_train("lr", ".inf"), "train.lr: Input should be a finite number"),
}


@pytest.mark.parametrize("case", list(RECIPE_FAULTS))
def test_a_loose_recipe_is_refused_in_one_line_naming_the_field(
    case: str, demo_reference: Build, tmp_path: Path
) -> None:
    change, expected = RECIPE_FAULTS[case]
    recipe = train_pipeline(tmp_path / "recipe.yaml", train__max_steps=2)
    recipe.write_text(change(recipe.read_text()))
    run_dir = tmp_path / "run"
    result = call_train("run", "--cache", demo_reference.store, "--pipeline", recipe, "--run-dir", run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in one_error_line(result.stderr)
    assert not run_dir.exists()


def _numeric_fields() -> list[tuple[str, Any]]:
    """Every int and float field of every recipe section, as (dotted name, pydantic field)."""
    from pydantic import BaseModel

    from shared.config import PipelineConfig

    found = []

    def visit(model: Any, prefix: str) -> None:
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                visit(field.annotation, f"{prefix}{name}.")  # a nested section (eval.vjepa)
                continue
            if get_origin(field.annotation) is list:
                continue  # a list of numbers has a validator of its own (eval.few_frames)
            kinds = set(get_args(field.annotation)) or {field.annotation}
            if kinds & {int, float} and bool not in kinds:
                found.append((f"{prefix}{name}", field))

    for section, section_field in PipelineConfig.model_fields.items():
        model = section_field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            visit(model, f"{section}.")
    return found


def _outside(field: Any) -> list[Any]:
    """Values just past each of a field's bounds, plus inf and nan for a float."""
    values: list[Any] = []
    for bound in field.metadata:
        for attribute, step in (("gt", 0), ("ge", -1), ("lt", 0), ("le", 1)):
            limit = getattr(bound, attribute, None)
            if limit is not None:
                values.append(limit + step)
    floats = float in (set(get_args(field.annotation)) or {field.annotation})
    return values + ([float("inf"), float("nan")] if floats else [])


def test_every_numeric_recipe_field_has_bounds_and_refuses_values_past_them() -> None:
    from shared.config import load_pipeline
    from shared.errors import SaltUsageError

    fields = _numeric_fields()
    assert len(fields) > 30
    for dotted, field in fields:
        lower = [b for b in field.metadata if getattr(b, "gt", None) is not None or getattr(b, "ge", None) is not None]
        assert lower, f"{dotted} has no lower bound"
        if float not in (set(get_args(field.annotation)) or {field.annotation}):  # floats: finite is the bound
            assert [b for b in field.metadata if getattr(b, "le", None) is not None], f"{dotted} has no upper bound"
        for value in _outside(field):
            with pytest.raises(SaltUsageError) as info:
                load_pipeline("demo", {dotted: value})
            message = str(info.value)
            assert f"{dotted} (from the command line)" in message and "\n" not in message, (dotted, value, message)


def test_a_duplicate_key_inside_a_section_is_named_with_its_lines(tmp_path: Path) -> None:
    from shared.config import load_pipeline
    from shared.errors import SaltUsageError

    path = tmp_path / "dup.yaml"
    path.write_text("name: x\ntrain:\n  lr: 1.0e-3\n  batch_size: 4\n  lr: 2.0e-3\n")
    with pytest.raises(SaltUsageError, match=r"train\.lr is given twice \(lines 3 and 5\)"):
        load_pipeline(path)


# ---- 6. smaller findings -----------------------------------------------------------------------------


class RunsCode:
    """What a hostile pickle does: calls a function when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["torch.save with code", "plain pickle"])
def test_convert_teacher_refuses_a_pickle_in_its_own_words(kind: str, tmp_path: Path) -> None:
    marker, path = tmp_path / "ran", tmp_path / "teacher.pth"
    payload = {"model": {"encoder.norm.weight": torch.ones(4)}, "hook": RunsCode(marker)}
    if kind == "plain pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path)
    result = run_cli("convert-teacher", path, tmp_path / "out")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no torch warning either
    line = one_error_line(result.stderr, "salt-cache")
    assert "refusing: nothing in it ran" in line and "weights_only" not in line, line
    assert not marker.exists() and not (tmp_path / "out").exists()


def _tiny_original_state(width: int = 32) -> dict[str, torch.Tensor]:
    """An original-release encoder layout at width 32, one block."""
    from salt_cache.convert_teacher import original_encoder_keys

    shapes = {
        "patch_embed.proj.weight": (width, 3, 2, 16, 16),
        "attn.qkv.weight": (3 * width, width),
        "attn.proj.weight": (width, width),
        "mlp.fc1.weight": (4 * width, width),
        "mlp.fc1.bias": (4 * width,),
        "mlp.fc2.weight": (width, 4 * width),
    }
    generator = torch.Generator().manual_seed(0)
    return {
        key: torch.randn(
            next((s for suffix, s in shapes.items() if key.endswith(suffix)), (width,)), generator=generator
        )
        * 0.02
        for key in original_encoder_keys(1, qkv_bias=True)
    }


def test_a_nan_teacher_weight_is_refused_at_convert_and_at_build(demo_set: Path, tmp_path: Path) -> None:
    state = _tiny_original_state()
    state["encoder.blocks.0.mlp.fc1.weight"][3, 5] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pth")
    result = call_cli("convert-teacher", tmp_path / "nan.pth", tmp_path / "converted", "--heads", "2")
    assert result.returncode == 2 and not (tmp_path / "converted").exists()
    assert "non-finite weight (encoder.blocks.0.mlp.fc1.weight" in one_error_line(result.stderr, "salt-cache")

    from conftest import build_tiny_teacher

    teacher = build_tiny_teacher(seed=0)
    with torch.no_grad():
        teacher.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    teacher.save_pretrained(tmp_path / "nan-teacher")
    store = tmp_path / "latents.zarr"
    pipeline = train_pipeline(tmp_path / "p.yaml")
    built = call_cli(
        "build",
        "--src",
        demo_set,
        "--out",
        store,
        "--teacher",
        tmp_path / "nan-teacher",
        "--pipeline",
        pipeline,
        "--limit",
        "2",
    )
    assert built.returncode == 2 and not store.exists()
    assert "non-finite weight (encoder.layer.0.output.dense.weight" in one_error_line(built.stderr, "salt-cache")


def test_verify_catches_a_latent_dtype_attribute_that_disagrees_with_the_array(
    demo_reference: Build, tmp_path: Path
) -> None:
    store = copy_store(demo_reference.store, tmp_path / "edited.zarr")
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["salt"]["latent_dtype"] = "float32"
    (store / "zarr.json").write_text(json.dumps(meta))
    result = call_cli("verify", store)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "latent_dtype says 'float32' but the latents array is float16" in result.stdout


def test_the_recipes_shipped_still_load() -> None:
    from shared.config import PIPELINES_DIR, load_pipeline

    for recipe in PIPELINES_DIR.glob("*.yaml"):
        assert yaml.safe_load(recipe.read_text()) and load_pipeline(recipe)
