"""Launch ``python -m torch.distributed.run`` jobs from tests, and never leave their ranks behind.

torchrun puts each rank in a session of its own, so killing torchrun (or its process group) on a
timeout would orphan ranks blocked in a collective; :func:`stop_job` kills the whole tree.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, CliResult

# Any frame of a Python traceback that runs through our own packages (torchrun's report is not ours).
OUR_FRAME = re.compile(r'File "[^"]*/(salt_cache|salt_train|shared)/[^"]*\.py"')
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def torchrun_command(nproc: int, module: str, *args: str | Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *map(str, args),
    ]


def start_job(nproc: int, module: str, *args: str | Path, **streams) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(nproc, module, *args), cwd=REPO, env=ENV, **streams)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread or the process is gone
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ...: the ranks and their DataLoader workers."""
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def stop_job(proc: subprocess.Popen) -> str:
    """SIGKILL torchrun and every process under it; returns what they were doing, for a failure message."""
    pids = [proc.pid, *descendants(proc.pid)]
    tree = subprocess.run(
        ["ps", "-o", "pid,ppid,stat,etime,wchan:24,args", "-p", ",".join(map(str, pids))],
        capture_output=True,
        text=True,
    ).stdout
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def run_job(nproc: int, module: str, *args: str | Path, timeout: float = 180) -> CliResult:
    """``torchrun --standalone --nproc-per-node=NPROC -m MODULE ARGS`` to its end (or a clear failure)."""
    proc = start_job(nproc, module, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = stop_job(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"torchrun ran past {timeout} s; its processes:\n{tree}\nstdout:\n{stdout[-3000:]}\n"
            f"stderr:\n{stderr[-6000:]}"
        )
    return CliResult(proc.returncode, stdout, stderr)
