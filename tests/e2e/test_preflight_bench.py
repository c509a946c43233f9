"""`salt-train preflight` and `salt-train bench` on a real store: pass lines, a clear failure, figures."""

from __future__ import annotations

import json
import re

from conftest import call_train, copy_store, train_pipeline


def test_preflight_passes_on_a_sound_store(demo_reference, tmp_path) -> None:
    pipeline = train_pipeline(
        tmp_path / "p.yaml", train_loader__num_workers=2, train_loader__multiprocessing_context="forkserver"
    )
    result = call_train("preflight", "--cache", demo_reference.store, "--pipeline", pipeline, "--batches", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("PASS  single batch: pixels (2, 3, 16, 224, 224)") for line in lines), result.stdout
    assert any(
        line.startswith("PASS  single batch") and "latents (2, 1568, 64) torch.float16" in line for line in lines
    )
    assert any(line.startswith("PASS  worker stress (2 workers, prefetch 2): 20 batches") for line in lines)
    assert any(line.startswith("PASS  /dev/shm use") and "flat" in line for line in lines), result.stdout
    assert lines[-1] == "preflight: all checks passed"


def test_preflight_fails_clearly_on_damaged_shards(demo_reference, tmp_path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "damaged.zarr")
    for shard_file in (p for p in (store / "latents" / "c").rglob("*") if p.is_file()):
        data = bytearray(shard_file.read_bytes())
        data[5000] ^= 0xFF  # raw latents: only the row checksums can tell
        shard_file.write_bytes(bytes(data))
    pipeline = train_pipeline(tmp_path / "p.yaml", stream__verify_checksums=True)
    result = call_train("preflight", "--cache", store, "--pipeline", pipeline, "--batches", "5")
    assert result.returncode == 1
    assert re.search(
        r"^FAIL  single batch: rows \[.*\] unreadable: ValueError: row \d+: latents checksum mismatch",
        result.stdout,
        re.M,
    ), result.stdout
    assert result.stdout.splitlines()[-1] == "preflight: some checks FAILED"


def test_bench_prints_figures(demo_reference, tmp_path) -> None:
    pipeline = train_pipeline(tmp_path / "p.yaml")
    result = call_train(
        "bench",
        "--cache",
        demo_reference.store,
        "--pipeline",
        pipeline,
        "--batches",
        "3",
        "--profile",
        tmp_path / "trace",
    )
    assert result.returncode == 0, result.stderr
    for label in (
        "raw read (page cache)",
        "loader",
        "step, batch from memory",
        "step, batch from loader",
        "FLOPs per clip",
        "achieved",
        "profile",
    ):
        assert re.search(rf"^\s+{re.escape(label)}\s+: \S", result.stdout, re.M), (label, result.stdout)
    assert re.search(r"raw read \(page cache\)\s+: \d+ MB/s = \d+ clips/s", result.stdout)
    assert re.search(r"step, batch from memory\s+: [\d.]+ clips/s", result.stdout)
    assert re.search(r"achieved\s+: [\d.]+ TFLOP/s from memory, [\d.]+ from the loader", result.stdout)
    trace = json.loads(next((tmp_path / "trace").glob("*.json")).read_text())
    assert any("step 3" in str(event.get("name")) for event in trace["traceEvents"])  # four steps recorded


def test_peak_table_matches_device_names() -> None:
    from shared.flops import peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989.0)
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert peak_bf16_tflops("NVIDIA H200") == ("H200", 989.0)
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert peak_bf16_tflops("NVIDIA L40S") == ("L40S", 362.0) and peak_bf16_tflops("NVIDIA L4") == ("L4", 121.0)
    assert peak_bf16_tflops("Some Future GPU") is None


def test_bad_input_is_one_line(reference_build, tmp_path) -> None:
    for args in (
        ("preflight", "--cache", tmp_path / "missing.zarr"),
        ("bench", "--cache", tmp_path / "missing.zarr"),
        ("preflight", "--cache", reference_build.store, "--pipeline", "demo", "--set", "train.batch_size=6"),
        ("snapshots", "prune", "--cache", reference_build.store, "--name", "nope"),
        ("snapshots", "list", "--cache", tmp_path / "missing.zarr"),
    ):
        result = call_train(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("salt-train: error:"), (
            args,
            result.stderr,
        )


def test_scaling_prints_loader_and_step_efficiency_for_1_and_2_processes(demo_reference, tmp_path) -> None:
    """Two real torchrun jobs (1 and 2 gloo ranks) of `salt-train bench`, compared on one global batch."""
    pipeline = train_pipeline(tmp_path / "p.yaml", train__batch_size=4)
    result = call_train("scaling", "--cache", demo_reference.store, "--pipeline", pipeline, "--batches", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same global batch 4, 1 thread(s) per process" in result.stdout
    for label in ("loader", "step, batch from memory", "step, batch from loader"):
        for processes in (1, 2):
            match = re.search(
                rf"^\s+{re.escape(label)}\s+{processes} process\(es\):\s+([\d.]+) clips/s"
                rf"\s+efficiency\s+([\d.]+)%$",
                result.stdout,
                re.M,
            )
            assert match, (label, processes, result.stdout)
            assert float(match.group(1)) > 0
            if processes == 1:
                assert match.group(2) == "100.0"
