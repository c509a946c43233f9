"""A two-class SSv2-layout set whose label is a relation in time: a shape moves closer to, or away from, a static
one (on a random side, along the same paths reversed), so every local motion cue is equally likely in both
classes and no bag of tubelets (the eval's ``pixels`` column) can tell them apart.

    python -m benchmarks.demo_probes.relation_data OUT [--train 96 --validation 64]

Then the demo's steps on it (salt-cache build --pixels-only, salt-train teacher, ...), as in the Makefile.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from salt_cache.demo_data import _FIRST_ID, _VIDEO_DIR, sample_object, write_video

TEMPLATES = ("Moving [something] closer to [something]", "Moving [something] away from [something]")


def render(closer: bool, frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[frames, height, width, 3]``: shape A moves towards (or away from) the static shape B."""
    (_, rgb_a, shape_a), (_, rgb_b, shape_b) = sample_object(rng), sample_object(rng)
    while np.abs(rgb_a.astype(int) - rgb_b).sum() < 60:  # two shapes the eye can tell apart
        _, rgb_b, shape_b = sample_object(rng)
    base = rng.integers(30, 110) + rng.integers(-10, 11, size=3)
    background = np.clip(base + rng.normal(0, 6, size=(height, width, 3)), 0, 255).astype(np.uint8)
    half = rng.uniform(0.09, 0.14) * min(height, width)
    row = height / 2 + rng.uniform(-0.15, 0.15) * height
    side = rng.choice([-1, 1])  # B right (+1) or left (-1) of A's path
    b_x = width / 2 + side * rng.uniform(0.25, 0.38) * width
    near = b_x - side * (2 * half + rng.uniform(4, 12))  # A ends (closer) next to B
    far = float(np.clip(b_x - side * rng.uniform(0.55, 0.7) * width, half, width - half))
    path = np.linspace(far, near, frames) if closer else np.linspace(near, far, frames)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5

    def shape_mask(shape: str, x: float) -> np.ndarray:
        if shape == "square":
            return (np.abs(xx - x) <= half) & (np.abs(yy - row) <= half)
        return (xx - x) ** 2 + (yy - row) ** 2 <= half**2

    static = shape_mask(shape_b, b_x)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t, x in enumerate(path):
        frame = background.copy()
        frame[static] = rgb_b
        frame[shape_mask(shape_a, x)] = rgb_a
        out[t] = frame
    return out


def write(
    root: Path, counts: dict[str, int], seed: int = 0, height: int = 240, width: int = 320, fps: int = 12
) -> None:
    rng = np.random.default_rng(seed)
    (root / _VIDEO_DIR).mkdir(parents=True)
    (root / "labels").mkdir()
    names = {t: t.replace("[something]", "something") for t in TEMPLATES}
    (root / "labels/labels.json").write_text(json.dumps({names[t]: str(i) for i, t in enumerate(TEMPLATES)}))
    clip_id = _FIRST_ID
    for split, count in counts.items():
        rows = []
        for label in rng.permutation(np.arange(count) % 2):
            frames = int(rng.integers(2 * fps, 4 * fps + 1))
            write_video(root / _VIDEO_DIR / f"{clip_id}.webm", render(label == 0, frames, height, width, rng), fps=fps)
            text = TEMPLATES[label].replace("[something]", "a thing", 1).replace("[something]", "another thing")
            rows.append(
                {
                    "id": str(clip_id),
                    "label": text[0].lower() + text[1:],
                    "template": TEMPLATES[label],
                    "placeholders": ["a thing", "another thing"],
                }
            )
            clip_id += 1
        (root / f"labels/{split}.json").write_text(json.dumps(rows))
    (root / "labels/test.json").write_text("[]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--validation", type=int, default=64)
    args = parser.parse_args()
    write(args.out, {"train": args.train, "validation": args.validation})


if __name__ == "__main__":
    main()
