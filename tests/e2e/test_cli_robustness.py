"""Inputs an exploratory tester tried: nothing a user has is lost, bad input is one line and exit 2."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import VIDEO_DIR, call_cli, run_cli
from test_cli_errors import assert_usage_error

from salt_cache.demo_data import write_demo_dataset

TINY = ("--train", "1", "--validation", "0", "--test", "0")


@pytest.fixture(scope="module")
def corrupt_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five small demo clips, one cut in half and one not a video at all."""
    root = tmp_path_factory.mktemp("ssv2-corrupt")
    write_demo_dataset(root, train=5, validation=0, test=0, seed=1, height=120, width=160)
    videos = sorted((root / VIDEO_DIR).iterdir())
    data = videos[0].read_bytes()
    videos[0].write_bytes(data[: len(data) // 2])
    videos[1].write_bytes(b"not a video" * 10)
    return root


# demo-data


def test_demo_data_refuses_to_touch_existing_labels(tmp_path: Path) -> None:
    labels = tmp_path / "labels" / "train.json"
    labels.parent.mkdir()
    labels.write_text('[{"id": "mine"}]')
    assert_usage_error(run_cli("demo-data", "--out", tmp_path, *TINY), "train.json", "exist")
    assert labels.read_text() == '[{"id": "mine"}]'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["labels", "train.json"]  # nothing written


def test_demo_data_under_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "hostname"
    a_file.write_text("box\n")
    assert_usage_error(run_cli("demo-data", "--out", a_file / "x", *TINY), str(a_file), "is a file")
    assert a_file.read_text() == "box\n"


def test_demo_data_negative_seed() -> None:
    assert_usage_error(run_cli("demo-data", "--out", "never-written", "--seed", "-1", *TINY), "--seed")


def test_demo_data_os_error_is_one_line() -> None:
    """/proc refuses new folders (a real OS error; root ignores permission bits elsewhere)."""
    result = call_cli("demo-data", "--out", "/proc/salt-demo-data", *TINY)
    assert_usage_error(result, "cannot write demo data to")


def test_demo_data_fills_an_empty_folder(tmp_path: Path) -> None:
    result = call_cli("demo-data", "--out", tmp_path, *TINY)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [VIDEO_DIR, "labels"]


# bench


def test_bench_skips_a_corrupt_clip(corrupt_set: Path) -> None:
    result = call_cli(
        "bench", "--src", corrupt_set, "--clips", "5", "--workers", "0", "--batch-size", "1", "--device", "cpu"
    )
    assert result.returncode == 0, result.stderr
    figures = dict(line.split(" : ", 1) for line in result.stdout.splitlines() if " : " in line)
    figures = {k.strip(): v.strip() for k, v in figures.items()}
    assert figures["clips"] == "3"
    assert figures["clips skipped (undecodable)"] == "2"
    assert "bytes per clip on disk" in figures
    assert re.fullmatch(r"[\d.]+ clips/s", figures["TEACHER-ONLY"])
    assert re.fullmatch(r"[\d.]+ clips/s", figures["DECODE-ONLY (DataLoader, 0 workers, batch 1, steady state)"])
    end_to_end = figures["END-TO-END build (D=64, 4 writers, steady state)"]
    assert re.fullmatch(r"[\d.]+ clips/s = \d+% of the slower of decode-only and teacher-only", end_to_end)


def test_bench_host_path_builds_at_the_production_width_without_a_teacher(corrupt_set: Path) -> None:
    result = call_cli(
        "bench", "--src", corrupt_set, "--clips", "5", "--workers", "0", "--batch-size", "1", "--host-path"
    )
    assert result.returncode == 0, result.stderr
    assert "TEACHER-ONLY" in result.stdout and "n/a (--host-path" in result.stdout
    assert re.search(r"END-TO-END build \(D=1280, 4 writers, steady state\)\s+: [\d.]+ clips/s", result.stdout)


def test_bench_loader_rate_with_too_few_clips(corrupt_set: Path, tmp_path: Path) -> None:
    from shared.ssv2 import discover

    from salt_cache.bench import bench_config, time_loader_decode

    clips = discover(corrupt_set, "train").clips[:2]
    timing = time_loader_decode(clips, bench_config(batch_size=1, workers=2, writers=1), tmp_path)
    assert timing.steady is None and timing.whole_pass > 0


def test_bench_nothing_decodable(corrupt_set: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(corrupt_set, tmp_path / "broken"))
    for video in (broken / VIDEO_DIR).iterdir():
        video.write_bytes(b"junk")
    assert_usage_error(run_cli("bench", "--src", broken, "--workers", "0"), "could be decoded")


@pytest.mark.parametrize("command", ["bench", "verify", "build"])
def test_unknown_device(command: str, tmp_path: Path) -> None:
    args = {
        "bench": ("bench", "--src", tmp_path),
        "verify": ("verify", tmp_path / "s.zarr"),
        "build": ("build", "--src", tmp_path),
    }[command]
    assert_usage_error(run_cli(*args, "--device", "tpu"), "--device", "tpu")


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_bench_out_must_be_a_folder(kind: str, corrupt_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "scratch"
    if kind == "file":
        out.write_text("")
    assert_usage_error(call_cli("bench", "--src", corrupt_set, "--out", out), str(out))


# build


def test_build_out_under_a_file(corrupt_set: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "hostname"
    a_file.write_text("box\n")
    assert_usage_error(run_cli("build", "--src", corrupt_set, "--out", a_file / "x.zarr"), f"{a_file} is a file")
    assert a_file.read_text() == "box\n"


def test_build_os_error_without_a_store_has_no_resume_hint(corrupt_set: Path) -> None:
    """/proc refuses the store folder: nothing was written, so nothing to resume."""
    line = assert_usage_error(
        call_cli(
            "build",
            "--src",
            corrupt_set,
            "--out",
            "/proc/salt-test.zarr",
            "--teacher",
            "builtin:tiny-videomae",
            "--device",
            "cpu",
            "--force",
        ),  # past the disk check (/proc has 0 B free) to the OS error
        "cannot write store",
    )
    assert "resume" not in line


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A real 1 MB tmpfs: a disk that fills up mid-build."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_build_disk_full_is_one_line_with_resume_hint(corrupt_set: Path, tiny_tmpfs: Path, tmp_path: Path) -> None:
    """Uncompressed pixels (2.4 MB a row) fill the 1 MB disk at the first shard, after the store exists."""
    pipeline = tmp_path / "raw-pixels.yaml"
    pipeline.write_text("store: {pixels_zstd_level: 0}\nbuild_loader: {num_workers: 0}\n")
    result = call_cli(
        "build",
        "--src",
        corrupt_set,
        "--out",
        tiny_tmpfs / "s.zarr",
        "--teacher",
        "builtin:tiny-videomae",
        "--device",
        "cpu",
        "--pipeline",
        pipeline,
        "--batch-size",
        "1",
        "--force",
    )  # past the refusal of a store larger than the disk: a disk filling up mid-build
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the start-up diagnostics and the bar
    assert "No space left on device" in last and "rerun the same command to resume" in last


# --help


def test_every_option_has_help() -> None:
    import typer

    from salt_cache.cli import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{name} {param.opts} has no help"
    build = group.commands["build"]
    for param in build.params:
        if param.name in ("batch_size", "workers", "device", "split"):
            assert "from the pipeline" in param.help, param.help
    for name in ("build", "verify", "bench"):
        result = call_cli(name, "--help")
        assert result.returncode == 0
        assert "auto|cpu|cuda" in result.stdout, result.stdout
