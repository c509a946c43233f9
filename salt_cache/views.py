"""Several views per clip (``view.views_per_clip: K``): what view k of a clip is.

A store of K views holds K rows per clip, row ``clip * K + k``. View 0 is the
one-view store's view (segment sampling seeded by the clip id, short-side resize,
centre crop), bit for bit, so a K-view store's view-0 rows equal a one-view
store's rows and evaluation reads the same clips either way. Views 1..K-1 each
draw, from generators seeded by ``(clip id, k)`` only:

- time: the segment-jitter rule (16 equal segments, one frame at a uniform offset
  in each) with their own offsets, whatever ``view.sampling`` says (a view exists
  to differ); clips shorter than 16 frames take the segment centres, as always;
- space: a random resized crop as V-JEPA's video transforms draw it (torchvision's
  ``RandomResizedCrop.get_params``: area scale 0.3 to 1.0, aspect ratio w/h 0.75 to
  1.35 drawn log-uniformly, 10 tries then a centred fallback), the same box for all
  16 frames, resized to 224x224.

A pure function of ``(clip id, k)``, so a resumed, retried or multi-rank build redraws
the same views. The box is recorded per row (``crop_box``: top, left, height, width
in source-frame pixels) and the frames in ``frame_index``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from shared.config import PipelineConfig
from shared.video import random_resized_crop as shared_random_resized_crop

CROP_SCALE = (0.3, 1.0)  # V-JEPA: share of the frame's area
CROP_RATIO = (0.75, 1.35)  # V-JEPA: width / height


def view_seed(clip_id: str, k: int, what: str) -> int:
    """A stable 64-bit seed for view ``k``'s ``what`` ("time" or "crop") of a clip."""
    key = f"{clip_id}\x00view {k}\x00{what}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def random_resized_crop(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) inside a ``height`` x ``width`` frame, torchvision's rule
    with V-JEPA's pretraining scale and ratio (shared/video.py draws it)."""
    return shared_random_resized_crop(height, width, rng, CROP_SCALE, CROP_RATIO)


def view_crop_box(height: int, width: int, clip_id: str, k: int) -> tuple[int, int, int, int]:
    """View ``k``'s box in the source frame: view 0 the centre square (what short-side resize and
    centre crop keep), the others a random resized crop seeded by ``(clip id, k)``."""
    if k == 0:
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side
    return random_resized_crop(height, width, np.random.default_rng(view_seed(clip_id, k, "crop")))


def recipe_for_split(config: PipelineConfig) -> tuple[PipelineConfig, str | None]:
    """The recipe a build of ``config.cache.split`` uses, and a note when it changed it: a validation or
    test store keeps one centre view per clip (probes and held-out losses score the view the teacher
    is compared on), whatever ``views_per_clip`` the recipe asks for."""
    if config.cache.split == "train" or config.view.views_per_clip == 1:
        return config, None
    asked = config.view.views_per_clip
    config = config.model_copy(deep=True)
    config.view.views_per_clip = 1
    return config, (
        f"a {config.cache.split} store keeps one centre view per clip: view.views_per_clip {asked} ignored for it"
    )
