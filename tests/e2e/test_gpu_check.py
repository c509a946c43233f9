"""`make gpu-check` in its DRY setting (benchmarks/gpu_check.py --dry): every step runs on CPU at tiny sizes
as its own process, and the JSON holds every figure with its unit; a step past its deadline is ended with its
whole process group and recorded, and the next step runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, call_cli

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
MAIN_STEPS = (
    "device",
    "demo_data",
    "eval_store_train",
    "eval_store_val",
    "build_bench",
    "step_random",
    "step_multiblock",
    "eval_run",
    "eval",
)
CUDA_ONLY_STEPS = (
    "step_multiblock_max_autotune",
    "teacher_batch32",
    "teacher_cudnn",
    "teacher_max_autotune",
    "step_random_max_autotune",
)
# The figures each step must give (more may be there); on CPU some are None (no GPU peak), never absent.
EXPECTED = {
    "device": ("matmul_bf16_tflop_per_s", "peak_bf16_tflop_per_s", "matmul_peak_fraction"),
    "build_bench": (
        "teacher_only_clips_per_s",
        "end_to_end_clips_per_s",
        "decode_only_clips_per_s",
        "main_thread_host_ms_per_clip",
        "teacher_achieved_tflop_per_s",
    ),
    "step_random": (
        "step_memory_clips_per_s",
        "step_loader_clips_per_s",
        "loader_clips_per_s",
        "step_memory_peak_fraction",
        "step_loader_peak_fraction",
        "train_step_gflop_per_clip",
    ),
    "step_multiblock": (
        "step_memory_clips_per_s",
        "step_loader_clips_per_s",
        "profile_busy_fraction",
        "profile_window_ms_per_step",
    ),
    "eval": (
        "wall_s",
        "setup_s",
        "features_train_s",
        "features_val_s",
        "heldout_s",
        "temporal_probes_s",
        "classification_probes_s",
    ),
}
MEASURED_ON_CPU = (
    "matmul_bf16_tflop_per_s",
    "teacher_only_clips_per_s",
    "step_memory_clips_per_s",
    "step_loader_clips_per_s",
    "profile_busy_fraction",
    "wall_s",
)


def value_unit_pairs(node, path="") -> list[tuple[str, dict]]:
    """Every {"value", "unit"} pair in the record, with where it is."""
    found = []
    if isinstance(node, dict):
        if "value" in node:
            return [(path, node)]
        for key, child in node.items():
            found += value_unit_pairs(child, f"{path}.{key}")
    elif isinstance(node, list):
        for k, child in enumerate(node):
            found += value_unit_pairs(child, f"{path}[{k}]")
    return found


def test_dry_gpu_check_writes_every_figure_with_its_unit(tmp_path) -> None:
    out = tmp_path / "gpu-check"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", "--out", str(out)], capture_output=True, text=True, timeout=400, cwd=REPO
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((out / "gpu-check.json").read_text())
    assert record["format"] == "salt-gpu-check" and record["dry"] is True
    steps = record["steps"]
    assert list(steps) == [*MAIN_STEPS, *CUDA_ONLY_STEPS]
    for name in MAIN_STEPS:
        assert steps[name]["status"] == "ok", (name, steps[name]["reason"], (out / steps[name]["log"]).read_text())
        assert steps[name]["wall"]["value"] > 0 and steps[name]["wall"]["unit"] == "s"
    for name in CUDA_ONLY_STEPS:
        assert steps[name]["status"] == "skipped" and "CUDA" in steps[name]["reason"]
    for name, figures in EXPECTED.items():
        missing = set(figures) - set(steps[name]["figures"])
        assert not missing, (name, missing)
    for where, pair in value_unit_pairs(record):
        assert set(pair) == {"value", "unit"} and isinstance(pair["unit"], str) and pair["unit"], where
        assert pair["value"] is None or isinstance(pair["value"], (int, float)), where
    for name, figures in EXPECTED.items():
        for figure in set(figures) & set(MEASURED_ON_CPU):
            assert steps[name]["figures"][figure]["value"] > 0, (name, figure)
    assert 0 < steps["step_multiblock"]["figures"]["profile_busy_fraction"]["value"] <= 1
    top = steps["step_multiblock"]["tables"]["top_kernels"]
    assert top and all(row["name"] and row["ms_per_step"]["unit"] == "ms/step" for row in top)
    assert steps["eval"]["figures"]["wall_s"]["value"] >= steps["eval"]["figures"]["features_val_s"]["value"]
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in steps) and "top_kernels" in summary
    assert not (out / "work").exists()  # the scratch stores are gone


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_step_past_its_deadline_ends_with_its_process_group(tmp_path) -> None:
    gpu_check = load_gpu_check()
    pid_file = tmp_path / "grandchild.pid"
    command = ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    started = time.perf_counter()
    status, reason = gpu_check.run_command(command, tmp_path / "step.log", timeout_s=1)
    assert status == "timeout" and "limit of 1 s" in reason
    assert time.perf_counter() - started < 15
    grandchild = int(pid_file.read_text())
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    status, reason = gpu_check.run_command(["sh", "-c", "echo broken >&2; exit 3"], tmp_path / "bad.log", 10)
    assert status == "failed" and reason == "exit 3: broken"


def test_an_out_folder_it_did_not_write_is_refused(tmp_path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "did not write" in done.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep" and not (tmp_path / "gpu-check.json").exists()


def test_teacher_attention_kernel_is_a_choice_refused_off_cuda(tmp_path) -> None:
    """teacher.attention (item 5: cuDNN attention as a choice): math gives auto's latents on CPU; a CUDA kernel
    on CPU is one line and exit 2, from the recipe's loader and from the bench's flag."""
    import pytest
    import torch

    from shared.config import TINY_TEACHER, load_pipeline
    from shared.errors import SaltUsageError
    from shared.teacher import load_teacher

    assert load_pipeline("demo", {"teacher.attention": "cudnn"}).teacher.attention == "cudnn"
    views = torch.randint(0, 256, (1, 16, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    auto = load_teacher(TINY_TEACHER, device="cpu").encode(views).float()
    math = load_teacher(TINY_TEACHER, device="cpu", attention="math").encode(views).float()
    assert torch.allclose(auto, math, rtol=1e-2, atol=1e-2) and not torch.equal(auto, torch.zeros_like(auto))
    with pytest.raises(SaltUsageError, match="cudnn is a CUDA kernel"):
        load_teacher(TINY_TEACHER, device="cpu", attention="cudnn")
    result = call_cli("bench", "--src", tmp_path, "--device", "cpu", "--teacher-attention", "flash")
    assert result.returncode == 2 and "--teacher-attention flash is a CUDA kernel" in result.stderr
    assert result.stderr.strip().count("\n") == 0
