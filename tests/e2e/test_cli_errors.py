"""Bad input of any kind: exit 2, one line on stderr, no traceback (the real program, in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from conftest import Build, CliResult, SsV2Set, copy_store, fast_pipeline, run_cli


def assert_usage_error(result: CliResult, *needles: str) -> str:
    """Exit 2, no traceback, exactly one stderr line starting ``salt-cache: error:``; returns it."""
    assert result.returncode == 2, f"rc {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("salt-cache: error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), (needle, line)
    return line


def test_build_without_src() -> None:
    assert_usage_error(run_cli("build"), "--src")


def test_build_src_is_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "clips.txt"
    a_file.write_text("not a folder")
    assert_usage_error(run_cli("build", "--src", a_file), str(a_file), "file")


def test_build_src_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert_usage_error(run_cli("build", "--src", missing), str(missing), "not exist")
    assert not missing.exists()


def test_build_unknown_pipeline_key(mixed_set: SsV2Set, tmp_path: Path) -> None:
    pipeline = tmp_path / "typo.yaml"
    pipeline.write_text("teacher: {batchsize: 3}\n")
    line = assert_usage_error(
        run_cli("build", "--src", mixed_set.root, "--out", tmp_path / "s.zarr", "--pipeline", pipeline),
        "teacher.batchsize",
        "unknown key",
    )
    assert str(pipeline) in line
    assert not (tmp_path / "s.zarr").exists()


def test_build_negative_batch_size(mixed_set: SsV2Set, tmp_path: Path) -> None:
    assert_usage_error(
        run_cli("build", "--src", mixed_set.root, "--out", tmp_path / "s.zarr", "--batch-size", "-3"),
        "batch_size",
        "command line",
    )
    assert not (tmp_path / "s.zarr").exists()


def test_build_into_store_of_another_teacher(demo_reference: Build, other_teacher_dir: Path, tmp_path: Path) -> None:
    assert demo_reference.teacher == "builtin:tiny-videomae"
    store = copy_store(demo_reference.store, tmp_path / "latents.zarr")
    before = zarr.open_group(str(store), mode="r")["latents"][:]
    result = run_cli(
        "build",
        "--src",
        demo_reference.src,
        "--out",
        store,
        "--teacher",
        other_teacher_dir,
        "--pipeline",
        demo_reference.pipeline,
    )
    line = assert_usage_error(result, "another teacher", str(store))
    assert "clip list" not in line  # same clips, same view: only the teacher differs
    after = zarr.open_group(str(store), mode="r")["latents"][:]
    assert (before == after).all()


def test_verify_missing_store(tmp_path: Path) -> None:
    missing = tmp_path / "absent.zarr"
    assert_usage_error(run_cli("verify", missing), str(missing), "does not exist")


def test_build_teacher_is_a_file(mixed_set: SsV2Set, tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    assert_usage_error(
        run_cli(
            "build",
            "--src",
            mixed_set.root,
            "--out",
            tmp_path / "s.zarr",
            "--teacher",
            weights,
            "--pipeline",
            fast_pipeline(tmp_path / "p.yaml"),
        ),
        str(weights),
        "file",
    )
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("verify", "--deep", "-1"),
        ("build", "--src"),
        ("frobnicate",),
    ],
)
def test_cli_usage_errors_are_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    assert_usage_error(run_cli(*args))


def test_verify_a_plain_folder_is_not_a_store(tmp_path: Path) -> None:
    assert_usage_error(run_cli("verify", tmp_path), str(tmp_path))


def test_verify_a_foreign_zarr_group(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("x", shape=(2,), dtype="uint8")
    assert_usage_error(run_cli("verify", foreign), "not a SALT")


def test_build_out_is_a_file(mixed_set: SsV2Set, tmp_path: Path) -> None:
    a_file = tmp_path / "store.zarr"
    a_file.write_text("")
    assert_usage_error(
        run_cli("build", "--src", mixed_set.root, "--out", a_file, "--pipeline", fast_pipeline(tmp_path / "p.yaml")),
        str(a_file),
    )


def test_build_split_without_json(mixed_set: SsV2Set, tmp_path: Path) -> None:
    assert_usage_error(
        run_cli("build", "--src", mixed_set.root, "--out", tmp_path / "s.zarr", "--split", "validation"),
        "validation.json",
    )


def test_build_missing_pipeline_file(mixed_set: SsV2Set, tmp_path: Path) -> None:
    assert_usage_error(run_cli("build", "--src", mixed_set.root, "--pipeline", tmp_path / "absent.yaml"), "absent.yaml")


def test_console_script_usage_error(tmp_path: Path) -> None:
    """The installed ``salt-cache`` entry point behaves like ``python -m salt_cache``."""
    script = Path(sys.executable).with_name("salt-cache")
    if not script.exists():
        pytest.skip("salt-cache console script not installed next to this interpreter")
    proc = subprocess.run(
        [str(script), "verify", str(tmp_path / "absent.zarr")], capture_output=True, text=True, timeout=120
    )
    assert_usage_error(CliResult(proc.returncode, proc.stdout, proc.stderr), "does not exist")
