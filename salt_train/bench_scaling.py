"""`salt-train scaling`: loader and step throughput with 1..N torchrun processes, and the efficiency.

For each K it runs ``torchrun --standalone --nproc-per-node=K -m salt_train bench --json FILE``
with the same recipe, so the same *global* batch (strong scaling: what a DDP run on K GPUs
does), and ``threads`` intra-op threads per process (1 by default: one process per core stands
in for one process per GPU). Efficiency is ``rate(K) / (K x rate(1))``: 100% means K processes
do K times the work of one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from shared.errors import SaltUsageError

MEASURES = {
    "loader_clips_per_s": "loader",
    "step_memory_clips_per_s": "step, batch from memory",
    "step_loader_clips_per_s": "step, batch from loader",
}


def launch_bench(processes: int, threads: int, bench_args: list[str], scratch: Path) -> dict[str, float]:
    """One ``salt-train bench`` under torchrun with ``processes`` ranks; its numbers."""
    out = scratch / f"bench-{processes}.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "salt_train",
        "bench",
        *bench_args,
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"== {processes} process(es): {' '.join(command[1:])}", file=sys.stderr, flush=True)
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = [line for line in done.stderr.strip().splitlines() if "error" in line.lower()] or ["(no error line)"]
        raise SaltUsageError(f"the {processes}-process bench failed (exit {done.returncode}): {tail[0]}")
    return json.loads(out.read_text())


def run_scaling(processes: int, threads: int, bench_args: list[str]) -> list[dict[str, float]]:
    """The bench's numbers for 1, 2, ... ``processes`` ranks."""
    with tempfile.TemporaryDirectory(prefix="salt-scaling-") as scratch:
        return [launch_bench(k, threads, bench_args, Path(scratch)) for k in range(1, processes + 1)]


def scaling_table(results: list[dict[str, float]]) -> list[str]:
    """One line per measure and K: clips/s and the efficiency against one process."""
    base = results[0]
    lines = []
    for key, label in MEASURES.items():
        for result in results:
            k = int(result["processes"])
            efficiency = result[key] / (k * base[key]) if base[key] else float("nan")
            lines.append(
                f"{label:<24} {k} process(es): {result[key]:8.1f} clips/s  efficiency {100 * efficiency:5.1f}%"
            )
    return lines
