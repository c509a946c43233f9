"""The stage-1 loss of a predictor that knows only each clip's background: every pixel predicted as the clip's
median colour (ImageNet-normalised pixels, the targets of ``teacher_train.norm_pix_loss: false``).

    python -m benchmarks.demo_probes.background_floor PIXELS_STORE [--rows 16]
"""

from __future__ import annotations

import argparse

import numpy as np

from shared.rows import read_rows
from shared.store import LatentStore

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args()
    (pixels,) = read_rows(LatentStore.open(args.store), np.arange(args.rows), ("pixels",))
    x = (pixels.astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    background = np.median(x.reshape(len(x), -1, 3), axis=1)[:, None, None, None, :]
    per_clip = ((x - background) ** 2).mean(axis=(1, 2, 3, 4))
    print(
        f"MSE of each clip's median colour: {per_clip.mean():.3f} ({per_clip.min():.3f}-{per_clip.max():.3f} by clip)"
    )


if __name__ == "__main__":
    main()
