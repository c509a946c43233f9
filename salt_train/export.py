"""Export of the trained encoder, loadable back with timm.

``<out>/model.safetensors`` holds the encoder's state dict under timm's key
names (``blocks.0.attn.qkv.weight``, ``norm.weight``; ``patch_embed.proj.weight``
as a Conv3d; ``pos_embed`` ``[1, 1568, width]`` and ``temporal_embed``);
``<out>/config.json`` names the timm architecture and its arguments.
:func:`load_encoder` rebuilds it with ``timm.create_model``, applies the same
video conversion and loads the weights with timm's own ``load_checkpoint``
(safetensors: no pickle), strictly. ``num_frames=T`` (any even T from 2 to 16)
keeps the positions of the first T/2 temporal slots, for callers that have only
a few recent frames (a robot policy).

Version 2 adds two optional fields, for encoders imported from other code
(``salt-train import-encoder``): ``layer_norm_eps`` (every LayerNorm's epsilon,
where it is not timm's 1e-6: transformers' VideoMAE uses 1e-12) and ``source``
(what it was converted from). An export without an epsilon of its own is written
as version 1 (``source`` is information only).
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from shared import geometry
from shared.errors import SaltUsageError, one_line
from shared.filesystem import atomic_dir

from salt_train.student import VideoViT, create_timm_vit

EXPORT_FORMAT = "salt-video-vit"
EXPORT_VERSION = 2
TIMM_LAYER_NORM_EPS = 1e-6
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def export_encoder(
    encoder: VideoViT,
    model_name: str,
    kwargs: dict,
    out_dir: Path,
    *,
    layer_norm_eps: float | None = None,
    source: dict | None = None,
) -> Path:
    """Write the encoder to ``out_dir``, atomically: built in a sibling folder, then renamed into place.
    An older export is moved aside, not deleted, until the new one is in place. ``layer_norm_eps`` and
    ``source``: see the module's docstring."""
    out_dir = Path(out_dir)
    # safetensors refuses shared or non-contiguous storage: own, contiguous CPU copies.
    state = {key: value.detach().to("cpu").contiguous().clone() for key, value in encoder.state_dict().items()}
    config = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "architecture": model_name,
        "kwargs": dict(kwargs),
        "num_frames": geometry.NUM_FRAMES,
        "tubelet_size": geometry.TUBELET_SIZE,
        "num_tokens": geometry.NUM_TOKENS,
        "width": encoder.width,
        "pixel_mean": list(geometry.PIXEL_MEAN),
        "pixel_std": list(geometry.PIXEL_STD),
    }
    if layer_norm_eps is not None and layer_norm_eps != TIMM_LAYER_NORM_EPS:
        config["layer_norm_eps"] = float(layer_norm_eps)
    if source is not None:
        config["source"] = dict(source)
    if "layer_norm_eps" in config:
        config["format_version"] = 2  # a version-1 reader would silently use timm's epsilon
    with atomic_dir(out_dir, replace="backup") as partial:
        save_file(state, str(partial / WEIGHTS), metadata={"format": EXPORT_FORMAT})
        (partial / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return out_dir


def read_export_config(export_dir: Path) -> dict:
    """The export's ``config.json``, checked; any problem is one :class:`SaltUsageError` line."""
    path = Path(export_dir) / CONFIG
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
            raise ValueError(f"format is not {EXPORT_FORMAT}")
        if not isinstance(config.get("format_version"), int) or config["format_version"] > EXPORT_VERSION:
            raise ValueError(f"format_version {config.get('format_version')!r} is not supported (<= {EXPORT_VERSION})")
        if not isinstance(config.get("architecture"), str) or not isinstance(config.get("kwargs", {}), dict):
            raise ValueError("architecture must be a timm name and kwargs a mapping")
        if config.get("num_tokens") != geometry.NUM_TOKENS:
            raise ValueError(f"num_tokens {config.get('num_tokens')!r}, expected {geometry.NUM_TOKENS}")
        eps = config.get("layer_norm_eps", TIMM_LAYER_NORM_EPS)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ValueError(f"layer_norm_eps {eps!r} is not a small positive number")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SaltUsageError(f"{export_dir} is not a SALT encoder export ({one_line(exc)})") from None
    return config


def check_num_frames(num_frames: int) -> None:
    """An even number of frames from 2 to 16: whole tubelets, no more slots than were trained."""
    valid = (
        isinstance(num_frames, int)
        and not isinstance(num_frames, bool)
        and geometry.TUBELET_SIZE <= num_frames <= geometry.NUM_FRAMES
        and num_frames % geometry.TUBELET_SIZE == 0
    )
    if not valid:
        raise ValueError(
            f"num_frames must be an even number of frames from {geometry.TUBELET_SIZE} to "
            f"{geometry.NUM_FRAMES} (tubelets of {geometry.TUBELET_SIZE}), not {num_frames!r}"
        )


@torch.no_grad()
def keep_first_slots(encoder: VideoViT, num_frames: int) -> VideoViT:
    """Cut the positions to the first ``num_frames / 2`` temporal slots: a ``T``-frame clip is then
    positioned as the first ``T`` frames of a 16-frame one (token ``t*196 + h*14 + w``, ``t < T/2``)."""
    slots = num_frames // geometry.TUBELET_SIZE
    encoder.pos_embed = nn.Parameter(encoder.pos_embed[:, : slots * geometry.TOKENS_PER_FRAME].clone())
    encoder.temporal_embed = nn.Parameter(encoder.temporal_embed[:, :slots].clone())
    return encoder


def load_encoder(export_dir: str | Path, num_frames: int = geometry.NUM_FRAMES) -> VideoViT:
    """The exported encoder, rebuilt through ``timm.create_model`` and ``timm.models.load_checkpoint``.

    ``num_frames=T`` (every even T from 2 to 16, else ValueError): the encoder takes ``[B, 3, T, 224, 224]``
    normalised pixels (or uint8 ``[B, T, 224, 224, 3]`` views through ``forward_views``) and gives
    ``[B, T/2 * 196, width]`` tokens; T=16, the default, is the encoder as trained.
    """
    check_num_frames(num_frames)
    export_dir = Path(export_dir)
    config = read_export_config(export_dir)
    encoder = VideoViT(create_timm_vit(config["architecture"], config.get("kwargs", {})))
    weights = export_dir / WEIGHTS
    if not weights.is_file():
        raise SaltUsageError(f"{export_dir} is not a SALT encoder export ({WEIGHTS} missing)")
    try:
        timm.models.load_checkpoint(encoder, str(weights), strict=True)
    except Exception as exc:  # truncated file, wrong keys or shapes
        raise SaltUsageError(f"{weights} does not load into {config['architecture']} ({one_line(exc)})") from None
    if "layer_norm_eps" in config:
        for module in encoder.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(config["layer_norm_eps"])
    return encoder if num_frames == geometry.NUM_FRAMES else keep_first_slots(encoder, num_frames)
