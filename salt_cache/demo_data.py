"""Tiny synthetic dataset in the official Something-Something-v2 layout.

Lets the whole pipeline (decode, cache, train, probe) run end to end without
downloading SSv2. Layout under ``root``::

    20bn-something-something-v2/<id>.webm   VP9, yuv420p
    labels/labels.json                      {"Moving something up": "2", ...}
    labels/train.json, labels/validation.json
        [{"id", "label", "template", "placeholders"}, ...]
    labels/test.json                        [{"id"}, ...]  (unlabelled, as in SSv2)

Each class is one simple motion of a coloured shape, so a linear probe on good
features can separate them. Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np

from shared.filesystem import PARTIAL_SUFFIX, atomic_dir

TEMPLATES: tuple[str, ...] = (
    "Moving [something] from left to right",
    "Moving [something] from right to left",
    "Moving [something] up",
    "Moving [something] down",
)

# Bright, saturated colours: they always stand out from the dark background.
_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 220, 40),
    "magenta": (220, 50, 200),
    "cyan": (40, 210, 220),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
_SHAPES = ("square", "disc")
# Suffix -> (codec used when the default is left alone, codecs the container accepts).
_CONTAINERS = {
    ".webm": ("libvpx-vp9", {"libvpx-vp9", "libvpx", "libaom-av1"}),
    ".mp4": ("libx264", {"libx264", "libx265", "libvpx-vp9", "libaom-av1", "mpeg4"}),
}
# Speed over quality: the clips are synthetic and only need to survive decoding.
_CODEC_OPTIONS = {
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0", "row-mt": "1"},
    "libx264": {"preset": "ultrafast", "crf": "23"},
}
_VIDEO_DIR = "20bn-something-something-v2"
_FIRST_ID = 100001  # real SSv2 ids are plain integers too


def sample_object(rng: np.random.Generator) -> tuple[str, np.ndarray, str]:
    """Pick (colour name, jittered RGB, shape kind); the names feed the SSv2 placeholder."""
    name = list(_COLOURS)[rng.integers(len(_COLOURS))]
    rgb = np.clip(np.array(_COLOURS[name]) + rng.integers(-15, 16, size=3), 0, 255)
    return name, rgb.astype(np.uint8), _SHAPES[rng.integers(len(_SHAPES))]


def render_motion(
    template: str, num_frames: int, height: int, width: int, rng: np.random.Generator, obj: tuple[str, np.ndarray, str]
) -> np.ndarray:
    """``obj`` (from :func:`sample_object`) performing ``template``'s motion; uint8 RGB [T, H, W, 3]."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    _, rgb, shape = obj
    # Dark, slightly tinted background with static noise: plain enough to keep
    # the motion the only signal, noisy enough not to be a flat colour.
    base = rng.integers(30, 110) + rng.integers(-10, 11, size=3)
    noise = rng.normal(0.0, 6.0, size=(height, width, 3))
    background = np.clip(base + noise, 0, 255).astype(np.uint8)

    half = rng.uniform(0.08, 0.14) * min(height, width)  # half side / radius
    horizontal = "left" in template
    extent, across = (width, height) if horizontal else (height, width)
    # Travel from the first ~30% of the frame to the last ~30%, with random offsets.
    start = rng.uniform(half, 0.3 * extent)
    end = rng.uniform(0.7 * extent, extent - half)
    if template.endswith(("right to left", "up")):  # image y grows downwards
        start, end = extent - start, extent - end
    lateral = across / 2 + rng.uniform(-0.15, 0.15) * across
    path = np.linspace(start, end, num_frames)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t, pos in enumerate(path):
        cx, cy = (pos, lateral) if horizontal else (lateral, pos)
        if shape == "square":
            mask = (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= half**2
        frames[t] = background
        frames[t][mask] = rgb
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int = 12, codec: str = "libvpx-vp9") -> None:
    """Encode uint8 RGB frames [T, H, W, 3] to ``path`` as yuv420p.

    The container follows the suffix (.webm or .mp4). For .mp4 the default
    codec is replaced by libx264, the usual mp4 codec; pass another explicitly
    to override. H and W must be even, as yuv420p subsamples chroma by 2.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected non-empty uint8 [T, H, W, 3] frames, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even height and width, got {height}x{width}")
    suffix = path.suffix.lower()
    if suffix not in _CONTAINERS:
        raise ValueError(f"unsupported container {suffix!r}; use one of {sorted(_CONTAINERS)}")
    default, accepted = _CONTAINERS[suffix]
    if codec == "libvpx-vp9" and suffix == ".mp4":
        codec = default
    if codec not in accepted:
        raise ValueError(f"codec {codec!r} cannot go in a {suffix} container")

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps, options=_CODEC_OPTIONS.get(codec, {}))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush delayed packets


class DemoDataExists(FileExistsError):
    """The target already holds files the demo set would write (nothing was written)."""


def _conflicts(root: Path, files: list[Path]) -> list[Path]:
    """What under ``root`` the demo set would overwrite or mix with."""
    video_dir, label_dir = root / _VIDEO_DIR, root / "labels"
    found = [d for d in (video_dir, label_dir) if d.exists() and not d.is_dir()]
    if video_dir.is_dir() and any(video_dir.iterdir()):
        found.append(video_dir)  # never mix demo clips with someone's videos
    found += [f for f in files if f.exists() or f.is_symlink()]
    return found


def _move_files(staging: Path, root: Path) -> None:
    """Move every file of ``staging`` to the same place under the existing ``root``."""
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        dest = root / src.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # appeared while we were rendering
            raise DemoDataExists(f"{dest} appeared while writing; refusing to overwrite it")
        src.rename(dest)


def write_demo_dataset(
    root: Path,
    *,
    train: int = 96,
    validation: int = 64,
    test: int = 4,
    seed: int = 0,
    height: int = 240,
    width: int = 320,
    fps: int = 12,
) -> dict[str, int]:
    """Write a synthetic SSv2-layout dataset under ``root``; returns clips per split.

    Clips last 2-4 s. Classes are balanced within each split. Raises
    DemoDataExists (a FileExistsError) before writing anything when a file it
    would write is already there, or the video folder is not empty.

    Everything is written into a staging folder first and only put in place at
    the end: a hidden sibling renamed to ``root`` when ``root`` does not exist,
    else a hidden folder inside ``root`` whose files are then moved in. A run cut
    short leaves no half-written set behind (kill -9 may leave the hidden folder).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {"train": train, "validation": validation, "test": test}
    # Shuffled ids, as in SSv2 where the id says nothing about the split.
    all_ids = [str(i) for i in rng.permutation(sum(counts.values())) + _FIRST_ID]
    relative = [Path("labels") / f"{name}.json" for name in ("labels", *counts)]
    relative += [Path(_VIDEO_DIR) / f"{clip_id}.webm" for clip_id in all_ids]
    conflicts = _conflicts(root, [root / r for r in relative])
    if conflicts:
        more = f" and {len(conflicts) - 1} more paths already exist" if len(conflicts) > 1 else " already exists"
        raise DemoDataExists(f"{conflicts[0]}{more}; refusing to overwrite")

    # Ctrl-C included, a failure leaves nothing half-written behind.
    if root.exists():
        with tempfile.TemporaryDirectory(prefix=".salt-demo-data.", suffix=PARTIAL_SUFFIX, dir=root) as staging:
            _render_dataset(Path(staging), counts, iter(all_ids), rng, height, width, fps)
            _move_files(Path(staging), root)
    else:
        with atomic_dir(root, unique=True) as staging:
            _render_dataset(staging, counts, iter(all_ids), rng, height, width, fps)
    return counts


def _render_dataset(
    root: Path, counts: dict[str, int], ids: Iterator[str], rng: np.random.Generator, height: int, width: int, fps: int
) -> None:
    video_dir = root / _VIDEO_DIR
    video_dir.mkdir(parents=True)
    label_dir = root / "labels"
    label_dir.mkdir()
    names = {t: t.replace("[something]", "something") for t in TEMPLATES}
    (label_dir / "labels.json").write_text(json.dumps({names[t]: str(i) for i, t in enumerate(TEMPLATES)}, indent=2))

    for split, n in counts.items():
        rows: list[dict[str, str | list[str]]] = []
        for class_idx in rng.permutation(np.arange(n) % len(TEMPLATES)):
            clip_id, template = next(ids), TEMPLATES[class_idx]
            obj = sample_object(rng)
            num_frames = int(rng.integers(2 * fps, 4 * fps + 1))
            frames = render_motion(template, num_frames, height, width, rng, obj)
            write_video(video_dir / f"{clip_id}.webm", frames, fps=fps)
            if split == "test":  # SSv2 ships test ids without labels
                rows.append({"id": clip_id})
                continue
            placeholder = f"a {obj[0]} {obj[2]}"
            label = template.replace("[something]", placeholder)
            rows.append(
                {
                    "id": clip_id,
                    "label": label[0].lower() + label[1:],
                    "template": template,
                    "placeholders": [placeholder],
                }
            )
        (label_dir / f"{split}.json").write_text(json.dumps(rows, indent=2))
