"""Export of the trained encoder, loadable back with timm.

``export/model.safetensors`` holds the encoder's state dict under timm's key
names (``blocks.0.attn.qkv.weight``, ``norm.weight``, ``patch_embed.proj.weight``
as a Conv3d); ``export/config.json`` names the timm architecture and its
arguments. :func:`load_encoder` rebuilds it with ``timm.create_model``, applies
the same tubelet adapter and loads the weights with timm's own
``load_checkpoint`` (safetensors: no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from shared import geometry
from shared.errors import SaltUsageError
from salt_train.student import VideoViT, create_timm_vit

EXPORT_FORMAT = "salt-video-vit"
EXPORT_VERSION = 1


def export_encoder(encoder: VideoViT, model_name: str, kwargs: dict, out_dir: Path) -> Path:
    """Write the encoder to ``out_dir`` atomically (aside, then renamed over any older export)."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    save_file(state, partial / "model.safetensors", metadata={"format": EXPORT_FORMAT})
    (partial / "config.json").write_text(json.dumps({
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "architecture": model_name, "kwargs": kwargs,
        "num_frames": geometry.NUM_FRAMES, "tubelet_size": geometry.TUBELET_SIZE, "num_tokens": geometry.NUM_TOKENS,
        "width": encoder.width, "pixel_mean": geometry.PIXEL_MEAN, "pixel_std": geometry.PIXEL_STD,
    }, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return out_dir


def load_encoder(export_dir: str | Path) -> VideoViT:
    """The exported encoder, rebuilt through ``timm.create_model`` and ``timm.models.load_checkpoint``."""
    export_dir = Path(export_dir)
    try:
        config = json.loads((export_dir / "config.json").read_text())
        if config.get("format") != EXPORT_FORMAT:
            raise ValueError(f"format is {config.get('format')!r}, not {EXPORT_FORMAT}")
        architecture, kwargs = config["architecture"], config.get("kwargs", {})
    except (OSError, ValueError, KeyError) as exc:
        raise SaltUsageError(f"{export_dir} is not a SALT encoder export ({type(exc).__name__}: {exc})") from None
    encoder = VideoViT(create_timm_vit(architecture, kwargs))
    weights = export_dir / "model.safetensors"
    try:
        timm.models.load_checkpoint(encoder, str(weights), strict=True)
    except Exception as exc:
        raise SaltUsageError(f"{weights} does not load ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    return encoder
