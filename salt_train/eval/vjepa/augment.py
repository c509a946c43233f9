"""The training augmentation of V-JEPA's frozen evaluation, one clip at a time, a pure function of its seed.

In V-JEPA's order (``evals/video_classification_frozen/utils.py``'s ``VideoTransform``):

1. RandAugment: timm's ``rand_augment_transform`` with V-JEPA's policy string (``rand-m7-n4-mstd0.5-inc1``:
   4 ops at magnitude 7 with noise 0.5), bicubic, translations up to 45% of 224 px. V-JEPA draws the ops
   once per clip and applies them to every frame; timm draws from Python's ``random`` and numpy's global
   generator, so each frame is transformed after setting both to the clip's seed (the same draw for every
   frame), and both generators are put back afterwards;
2. random resized crop (torchvision's rule, ``eval.vjepa.crop_scale_*`` and ``crop_ratio_*``: V-JEPA's 0.08-1.0
   and 0.75-4/3), one box for every frame, resized to 224 (bilinear); no flip (SSv2 has left/right classes);
3. ImageNet normalisation;
4. random erasing with probability ``erase_prob``: one box (area 2%-33%, aspect 0.3-3.3) for every frame,
   filled with per-pixel standard normal noise (V-JEPA's ``RandomErasing`` in ``pixel`` mode, cube).

Validation takes no augmentation: :func:`eval_views` resizes and crops the spatial views.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from shared import geometry
from shared.config import VjepaEvalConfig
from shared.errors import SaltUsageError
from shared.video import random_resized_crop

from salt_train.eval.vjepa.views import resize_short_side, spatial_views

ERASE_AREA = (0.02, 1 / 3)  # share of the frame
ERASE_ASPECT = (0.3, 1 / 0.3)
ERASE_TRIES = 100
TRANSLATE_SHARE = 0.45  # of the crop size: timm/SlowFast's translate_const for RandAugment


@dataclass(frozen=True)
class AugmentSettings:
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    randaugment: str | None
    erase_prob: float

    @classmethod
    def from_config(cls, config: VjepaEvalConfig) -> AugmentSettings:
        return cls(
            (config.crop_scale_min, config.crop_scale_max),
            (config.crop_ratio_min, config.crop_ratio_max),
            config.randaugment,
            config.erase_prob,
        )


def make_randaugment(policy: str) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment for ``policy`` as V-JEPA builds it; a bad policy string is one line."""
    from timm.data.auto_augment import rand_augment_transform

    hparams = {
        "translate_const": int(geometry.IMAGE_SIZE * TRANSLATE_SHARE),
        "interpolation": int(Image.Resampling.BICUBIC),
    }
    try:
        return rand_augment_transform(policy, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        raise SaltUsageError(
            f"eval.vjepa.randaugment {policy!r} is not a timm RandAugment policy (e.g. rand-m7-n4-mstd0.5-inc1): {exc}"
        ) from None


@contextmanager
def _global_generators_kept() -> Iterator[None]:
    """Leave Python's and numpy's global generators as they were (timm draws from both)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def same_draw_for_every_frame(
    transform: Callable[[Image.Image], Image.Image], frames: np.ndarray, seed: int
) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` through ``transform`` (PIL in, PIL out), the same random draw for each frame."""
    out = []
    with _global_generators_kept():
        for frame in frames:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            out.append(np.asarray(transform(Image.fromarray(frame)), dtype=np.uint8))
    return np.stack(out)


def _normalise(frames: Tensor) -> Tensor:
    """Float ``[T, 3, H, W]`` in [0, 255] -> ImageNet-normalised."""
    mean = torch.tensor(geometry.PIXEL_MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(geometry.PIXEL_STD).view(1, 3, 1, 1) * 255.0
    return (frames - mean) / std


def erase_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of the erased box, or None when 100 draws find none that fits."""
    area = height * width
    log_aspect = (math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]))
    for _ in range(ERASE_TRIES):
        target = rng.uniform(*ERASE_AREA) * area
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if w < width and h < height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


class TrainAugment:
    """uint8 frames ``[T, H, W, 3]`` of one clip and a seed -> normalised float ``[3, T, 224, 224]``."""

    def __init__(self, settings: AugmentSettings) -> None:
        self.settings = settings
        self.randaugment = make_randaugment(settings.randaugment) if settings.randaugment else None

    def __call__(self, frames: np.ndarray, seed: int) -> Tensor:
        ra_seed, crop_seed, erase_seed, noise_seed = np.random.SeedSequence(seed).generate_state(4, dtype=np.uint64)
        if self.randaugment is not None:
            frames = same_draw_for_every_frame(self.randaugment, frames, int(ra_seed))
        height, width = frames.shape[1:3]
        top, left, h, w = random_resized_crop(
            height, width, np.random.default_rng(int(crop_seed)), self.settings.crop_scale, self.settings.crop_ratio
        )
        box = torch.from_numpy(np.ascontiguousarray(frames[:, top : top + h, left : left + w])).permute(0, 3, 1, 2)
        size = geometry.IMAGE_SIZE
        clip = _normalise(F.interpolate(box.float(), size=(size, size), mode="bilinear", align_corners=False))
        rng = np.random.default_rng(int(erase_seed))
        if rng.random() < self.settings.erase_prob:
            found = erase_box(size, size, rng)
            if found is not None:
                y, x, eh, ew = found
                noise = torch.Generator().manual_seed(int(noise_seed) % 2**63)
                clip[:, :, y : y + eh, x : x + ew] = torch.randn(clip.shape[0], 3, eh, ew, generator=noise)
        return clip.permute(1, 0, 2, 3).contiguous()


def eval_views(frames: np.ndarray, views: int) -> Tensor:
    """uint8 frames ``[T, H, W, 3]`` of one clip -> normalised ``[views, 3, T, 224, 224]`` (no augmentation)."""
    resized = resize_short_side(torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float())
    crops = spatial_views(_normalise(resized), views)  # [views, T, 3, 224, 224]
    return crops.permute(0, 2, 1, 3, 4).contiguous()
