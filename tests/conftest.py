"""Shared fixtures for the integration tests: real clips, real teachers, real stores.

Everything is built once per session at tiny sizes and shared; a test that
mutates a store copies it first (``copy_store``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from shared import geometry

from salt_cache.demo_data import TEMPLATES, render_motion, sample_object, write_demo_dataset, write_video

REPO = Path(__file__).resolve().parent.parent
DEMO_PIPELINE = REPO / "pipelines" / "demo.yaml"
VIDEO_DIR = "20bn-something-something-v2"
UNKNOWN_TEMPLATE = "Pretending to open [something] without actually opening it"
# labels.json maps templates to indices that differ from TEMPLATES order, so a
# test can tell "label from labels.json" from "label = position in TEMPLATES".
LABEL_INDEX = {TEMPLATES[0]: 3, TEMPLATES[1]: 0, TEMPLATES[2]: 2, TEMPLATES[3]: 1}


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, timeout: float = 300, module: str = "salt_cache") -> CliResult:
    """``python -m salt_cache ARGS`` (or another module) as a real process (exit codes, stderr, kill -9)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def call_cli(*args: str | Path, stage: str = "salt_cache") -> CliResult:
    """``salt_cache.cli.main(ARGS)`` (or ``salt_train``'s) in this process: no interpreter start."""
    import importlib

    main = importlib.import_module(f"{stage}.cli").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


def call_train(*args: str | Path) -> CliResult:
    return call_cli(*args, stage="salt_train")


def run_train(*args: str | Path, timeout: float = 300) -> CliResult:
    return run_cli(*args, timeout=timeout, module="salt_train")


# Training with two loader workers started by a forkserver (the default elsewhere is none): what the fault
# tests kill, stop and count.
FORKSERVER = {"train_loader__num_workers": 2, "train_loader__multiprocessing_context": "forkserver"}


def write_pipeline(path: Path, **overrides: Any) -> Path:
    """pipelines/demo.yaml with dotted overrides (``train_loader__num_workers=0`` style keys)."""
    recipe = yaml.safe_load(DEMO_PIPELINE.read_text())
    # The demo's few-frame rows triple a test evaluation's probes, and its latency is measured twice, not ten
    # times: tests that measure either ask for them.
    overrides = {"eval__few_frames": [], "eval__latency_repeats": 2, **overrides}
    for key, value in overrides.items():
        section, leaf = key.split("__")
        recipe[section][leaf] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def fast_pipeline(path: Path, **overrides: Any) -> Path:
    """The tests' default recipe: no loader workers, 3-row shards, teacher batches of 2."""
    settings = {
        "build_loader__num_workers": 0,
        "train_loader__num_workers": 0,
        "store__shard_rows": 3,
        "teacher__batch_size": 2,
        **overrides,
    }
    return write_pipeline(path, **settings)


def copy_store(store: Path, dest: Path) -> Path:
    shutil.copytree(store, dest)
    return dest


@dataclass
class ClipSpec:
    clip_id: str
    template: str
    kind: str  # "ok", "truncated", "zero-byte", "missing"
    frames: int = 0
    suffix: str = ".webm"
    size: tuple[int, int] = (240, 320)  # height, width

    @property
    def label(self) -> int:
        return LABEL_INDEX.get(self.template, -1)


@dataclass
class SsV2Set:
    root: Path
    clips: list[ClipSpec]

    @property
    def ids(self) -> list[str]:
        return [c.clip_id for c in self.clips]

    def row(self, kind_or_id: str) -> int:
        for i, clip in enumerate(self.clips):
            if kind_or_id in (clip.kind, clip.clip_id):
                return i
        raise KeyError(kind_or_id)

    def path(self, clip: ClipSpec) -> Path:
        return self.root / VIDEO_DIR / f"{clip.clip_id}{clip.suffix}"


# The mixed set of the build tests: official layout, webm (VP9) and mp4 (h264),
# a short clip, a portrait clip, three broken rows and an unknown template.
MIXED_CLIPS = [
    ClipSpec("200001", TEMPLATES[0], "ok", 24, ".webm"),
    ClipSpec("200002", TEMPLATES[1], "ok", 24, ".mp4"),
    ClipSpec("200003", TEMPLATES[2], "short", 8, ".webm"),
    ClipSpec("200004", TEMPLATES[3], "portrait", 20, ".mp4", size=(320, 240)),
    ClipSpec("200005", TEMPLATES[0], "truncated", 36, ".webm"),
    ClipSpec("200006", TEMPLATES[1], "zero-byte", 0, ".webm"),
    ClipSpec("200007", TEMPLATES[2], "missing", 0, ".webm"),
    ClipSpec("200008", UNKNOWN_TEMPLATE, "unknown-template", 24, ".webm"),
]
FAILING_KINDS = ("truncated", "zero-byte", "missing")


def render_motion_clip(template: str, num_frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random shape performing ``template``'s motion; uint8 RGB [T, H, W, 3]."""
    return render_motion(template, num_frames, height, width, rng, sample_object(rng))


def write_mixed_set(root: Path) -> SsV2Set:
    rng = np.random.default_rng(7)
    video_dir = root / VIDEO_DIR
    video_dir.mkdir(parents=True)
    rows = []
    for clip in MIXED_CLIPS:
        path = video_dir / f"{clip.clip_id}{clip.suffix}"
        motion = clip.template if clip.template in TEMPLATES else TEMPLATES[0]
        if clip.kind == "zero-byte":
            path.write_bytes(b"")
        elif clip.kind != "missing":
            write_video(path, render_motion_clip(motion, clip.frames, *clip.size, rng), fps=12)
            if clip.kind == "truncated":
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
        placeholder = "something"
        rows.append(
            {
                "id": clip.clip_id,
                "label": clip.template.replace("[something]", placeholder).lower(),
                "template": clip.template,
                "placeholders": [placeholder],
            }
        )
    labels = root / "labels"
    labels.mkdir()
    (labels / "train.json").write_text(json.dumps(rows))
    (labels / "labels.json").write_text(
        json.dumps({t.replace("[", "").replace("]", ""): str(i) for t, i in LABEL_INDEX.items()})
    )
    return SsV2Set(root, list(MIXED_CLIPS))


@dataclass
class Build:
    """One finished build: where its store is and what the command said."""

    store: Path
    result: CliResult
    teacher: str
    pipeline: Path
    src: Path
    extra: dict = field(default_factory=dict)


def build_tiny_teacher(seed: int = 0):
    """builtin:tiny-videomae's architecture with weights seeded by ``seed`` (0: the built-in's own)."""
    from shared.config import TINY_TEACHER
    from shared.teacher import build_builtin_teacher

    return build_builtin_teacher(TINY_TEACHER, seed)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded tiny VideoMAE saved with save_pretrained (loaded back with from_pretrained)."""
    path = tmp_path_factory.mktemp("teacher-seed0")
    build_tiny_teacher(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def other_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, other weights (seed 1): a different teacher."""
    path = tmp_path_factory.mktemp("teacher-seed1")
    build_tiny_teacher(seed=1).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def mixed_set(tmp_path_factory: pytest.TempPathFactory) -> SsV2Set:
    return write_mixed_set(tmp_path_factory.mktemp("ssv2-mixed"))


@pytest.fixture(scope="session")
def reference_build(mixed_set: SsV2Set, teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The mixed set built once, uninterrupted, through two forkserver DataLoader workers."""
    work = tmp_path_factory.mktemp("reference")
    pipeline = fast_pipeline(
        work / "pipeline.yaml", build_loader__num_workers=2, build_loader__multiprocessing_context="forkserver"
    )
    store = work / "latents.zarr"
    result = call_cli(
        "build", "--src", mixed_set.root, "--out", store, "--teacher", teacher_dir, "--pipeline", pipeline
    )
    return Build(store, result, str(teacher_dir), pipeline, mixed_set.root)


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain demo-data set, 20 train and 6 validation clips: the kill -9 test's source."""
    root = tmp_path_factory.mktemp("ssv2-demo")
    write_demo_dataset(root, train=20, validation=6, test=0, seed=5, height=120, width=160)
    return root


@pytest.fixture(scope="session")
def demo_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two-row shards, one clip per teacher batch: many commits, so a kill lands mid-build."""
    return fast_pipeline(
        tmp_path_factory.mktemp("demo-pipeline") / "pipeline.yaml", store__shard_rows=2, teacher__batch_size=1
    )


@pytest.fixture(scope="session")
def demo_reference(demo_set: Path, demo_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The demo set built uninterrupted by the builtin tiny teacher, in this process."""
    store = tmp_path_factory.mktemp("demo-reference") / "latents.zarr"
    result = call_cli(
        "build", "--src", demo_set, "--out", store, "--teacher", "builtin:tiny-videomae", "--pipeline", demo_pipeline
    )
    return Build(store, result, "builtin:tiny-videomae", demo_pipeline, demo_set)


@pytest.fixture(scope="session")
def demo_val_reference(demo_set: Path, demo_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The demo set's validation split built by the builtin tiny teacher: a held-out store for the
    demo_reference and demo_views_reference train stores."""
    store = tmp_path_factory.mktemp("demo-val-reference") / "latents.zarr"
    args = ["--split", "validation"]
    result = call_cli(
        "build",
        "--src",
        demo_set,
        "--out",
        store,
        "--teacher",
        "builtin:tiny-videomae",
        "--pipeline",
        demo_pipeline,
        *args,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Build(store, result, "builtin:tiny-videomae", demo_pipeline, demo_set, {"args": args})


@pytest.fixture(scope="session")
def demo_views_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kill test's recipe with two views per clip."""
    return fast_pipeline(
        tmp_path_factory.mktemp("demo-views-pipeline") / "pipeline.yaml",
        store__shard_rows=2,
        teacher__batch_size=1,
        view__views_per_clip=2,
    )


VIEWS_LIMIT = 10  # clips of the demo set in the two-view store: 20 rows, 10 shards


@pytest.fixture(scope="session")
def demo_views_reference(demo_set: Path, demo_views_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The first 10 clips of the demo set, two views each, built uninterrupted in this process."""
    store = tmp_path_factory.mktemp("demo-views-reference") / "latents.zarr"
    args = ["--limit", str(VIEWS_LIMIT)]
    result = call_cli(
        "build",
        "--src",
        demo_set,
        "--out",
        store,
        "--teacher",
        "builtin:tiny-videomae",
        "--pipeline",
        demo_views_pipeline,
        *args,
    )
    return Build(store, result, "builtin:tiny-videomae", demo_views_pipeline, demo_set, {"args": args})


# A student small enough for many CPU steps a second: 2 blocks of width 32.
TINY_STUDENT = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def train_pipeline(path: Path, **overrides: Any) -> Path:
    """The tests' training recipe: tiny student and predictor, batch 2, no workers, frequent logs."""
    settings = {
        "build_loader__num_workers": 0,
        "train_loader__num_workers": 0,
        "model__student_kwargs": TINY_STUDENT,
        "model__predictor_width": 32,
        "model__predictor_depth": 1,
        "model__predictor_heads": 2,
        "train__batch_size": 2,
        "train__lr": 3e-3,
        "train__min_lr": 3e-4,
        "train__warmup_steps": 4,
        "train__max_steps": 24,
        "train__epochs": 100,
        "train__checkpoint_every": 8,
        "train__log_every": 4,
        "stream__shuffle_buffer": 4,
        **overrides,
    }
    return write_pipeline(path, **settings)


@pytest.fixture(scope="session")
def cli() -> Callable[..., CliResult]:
    """Run ``python -m salt_cache`` as a subprocess."""
    return run_cli


def token_position(index: int) -> tuple[int, int, int]:
    """Inverse of :func:`shared.geometry.token_index`: ``(t, h, w)`` of a flat token index (the tests' own; the
    package needs none)."""
    if not 0 <= index < geometry.NUM_TOKENS:
        raise ValueError(f"token index {index} outside [0, {geometry.NUM_TOKENS})")
    t, rest = divmod(index, geometry.TOKENS_PER_FRAME)
    h, w = divmod(rest, geometry.GRID_W)
    return t, h, w
