"""The run folder: what was run, on what, and what came out.

``runs/<pipeline>-<timestamp>/``
  ``run.lock``        held by the one process training the folder, its PID inside (:func:`writing`)
  ``config.yaml``     the resolved recipe (the one a ``--resume`` continues with)
  ``run.json``        command, cache, snapshot, store identity, versions, git commit, device
  ``metrics.jsonl``   one JSON record per health interval, plus the final summary
  ``train.log``       the run's log lines
  ``checkpoints/``    see checkpoint.py
  ``export/``         the trained encoder, loadable with timm (export.py)
  ``summary.json``    written when the run ends
  ``target_stats.json`` the per-channel statistics of ``model.target_norm: channel``, measured on the
                      snapshot at the run's first start; resumes and ``salt-train eval`` read them back
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.config import PipelineConfig, dump_pipeline, read_recipe_yaml
from shared.errors import SaltUsageError
from shared.filesystem import sole_writer, write_json_atomic, write_text_atomic
from shared.latent_stats import LatentStats

log = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = Path("runs")
REPO = Path(__file__).resolve().parent.parent
TARGET_STATS = "target_stats.json"


def new_run_dir(config: PipelineConfig, runs_dir: Path = DEFAULT_RUNS_DIR) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return runs_dir / f"{config.name}-{stamp}"


@contextmanager
def writing(path: Path, config: PipelineConfig | None) -> Iterator[None]:
    """Be the run folder's one writer for the ``with`` block (``shared.filesystem.sole_writer``: a second
    ``run`` or ``--resume`` of it is refused, naming this process). A new run (``config`` given) creates
    the folder and records its recipe once it holds the lock, so of two new runs on one folder the
    second is refused cleanly, whichever step it has reached."""
    if config is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SaltUsageError(f"cannot create run folder {path}: {exc.strerror or exc}") from None
    elif not path.is_dir():
        raise SaltUsageError(f"{path} is not a run folder: nothing to resume")
    with sole_writer(path):
        if config is not None:
            create_run_dir(path, config)
        yield


def create_run_dir(path: Path, config: PipelineConfig) -> None:
    """A fresh run folder's recipe; an existing run is never overwritten (continue it with --resume)."""
    if (path / "run.json").exists() or (path / "config.yaml").exists():
        raise SaltUsageError(
            f"run folder {path} already holds a run: continue it with --resume, or pick another --run-dir"
        )
    write_text_atomic(path / "config.yaml", dump_pipeline(config))  # a kill never leaves it empty


def read_run_config(path: Path) -> PipelineConfig:
    """The recipe a run was started with (``--resume`` continues with exactly this)."""
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise SaltUsageError(f"{path} is not a run folder (no config.yaml): nothing to resume")
    try:
        return PipelineConfig.model_validate(read_recipe_yaml(config_file.read_text(), str(config_file)))
    except SaltUsageError:
        raise
    except Exception as exc:
        raise SaltUsageError(f"{config_file} is unreadable ({type(exc).__name__})") from None


def rewrite_run_config(path: Path, config: PipelineConfig) -> None:
    """Replace a run's config.yaml (what a resume set, later resumes continue with)."""
    write_text_atomic(path / "config.yaml", dump_pipeline(config))


def find_latest_run(cache: Path, runs_dir: Path = DEFAULT_RUNS_DIR) -> Path | None:
    """The newest run under ``runs_dir`` that trained on ``cache`` (for ``--resume`` without ``--run-dir``)."""
    candidates = []
    for record_file in runs_dir.glob("*/run.json"):
        try:
            record = json.loads(record_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if Path(record.get("cache", "")).resolve() == cache.resolve():
            candidates.append((record.get("started", ""), record_file.parent))
    return max(candidates)[1] if candidates else None


def git_commit() -> dict[str, Any]:
    """The commit of the code that ran, and whether the tree had local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}
    if head.returncode != 0:
        return {"commit": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def versions() -> dict[str, str]:
    import numpy
    import timm
    import torch
    import zarr

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "timm": timm.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
    }


def write_run_record(path: Path, **fields: Any) -> dict[str, Any]:
    """``run.json``: the first start's record, with later resumes (and their ``fields``) appended."""
    record_file = path / "run.json"
    now = dt.datetime.now().isoformat(timespec="seconds")
    if record_file.exists():
        record = json.loads(record_file.read_text())
        record.setdefault("resumes", []).append({"at": now, "argv": sys.argv, **git_commit(), **fields})
    else:
        record = {"started": now, "argv": sys.argv, "git": git_commit(), "versions": versions(), **fields}
    write_json_atomic(record_file, record)
    return record


def read_run_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SaltUsageError(f"{path}/run.json is unreadable ({type(exc).__name__}): cannot resume this run") from None


def write_target_stats(path: Path, stats: LatentStats, store: Path) -> None:
    """Record the statistics the run's targets are standardised with (once, before the first step)."""
    write_json_atomic(path / TARGET_STATS, {"store": str(store), **stats.to_json()})


def read_target_stats(path: Path) -> LatentStats | None:
    """The run's recorded target statistics, or None when it recorded none."""
    record_file = path / TARGET_STATS
    if not record_file.exists():
        return None
    try:
        return LatentStats.from_json(json.loads(record_file.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise SaltUsageError(
            f"{record_file} is unreadable ({type(exc).__name__}): the run's targets cannot be "
            "normalised as it trained; restore the file"
        ) from None


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``, flushed per record (a kill loses nothing written)."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def attach_log_file(path: Path) -> logging.Handler:
    """Copy our packages' log lines into the run folder's ``train.log``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("salt_train", "shared"):
        logging.getLogger(name).addHandler(handler)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    for name in ("salt_train", "shared"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()
