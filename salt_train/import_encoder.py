"""`salt-train import-encoder`: a released video encoder -> the project's exported-encoder format.

So that `salt-train eval EXPORT` (any protocol) measures a published encoder exactly as it measures
our students, and a figure of ours can be calibrated against the published one. Two sources:

- **V-JEPA** (facebookresearch/jepa): the ``target_encoder`` entry of its ``.pth.tar`` (``--key``
  picks another), read with ``torch.load(weights_only=True)``. Keys may carry DDP's ``module.`` and
  the multi-mask wrapper's ``backbone.`` prefixes. Its ViT is already ours in all but name: a Conv3d
  2x16x16 tubelet embedding ``patch_embed.proj``, timm-named blocks (``norm1``, ``attn.qkv``,
  ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; LayerNorm eps 1e-6, exact GELU, no class
  token), a final ``norm``, and fixed 3D sin-cos positions ``pos_embed`` ``[1, 1568, D]`` (a
  non-trainable parameter, so in the file; where it is absent it is rebuilt as V-JEPA builds it,
  ``uniform_power`` as its released configs set it). They become our ``pos_embed`` with a zero
  ``temporal_embed``.
- **VideoMAE**: a transformers ``save_pretrained`` folder of a ``VideoMAEModel`` (or of a classifier
  or pretraining model: the head or the pixel decoder is left out), loaded as ``--teacher`` loads one.
  Query, key and value are joined into ``qkv`` (the key has no bias), its 1D sin-cos table becomes
  ``pos_embed``, and its LayerNorm epsilon (transformers' default 1e-12) is recorded in the export.
  Without a final norm (``use_mean_pooling: true``, the fine-tuned releases) the export has none either.

Every tensor of the source is used exactly once or the conversion is refused: a missing key, an
unexpected one, a tensor of another shape, a non-finite weight, a geometry other than 16 frames of
224 px in 2x16x16 tubelets are each one line and exit 2; nothing is written then.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from shared import geometry
from shared.errors import SaltUsageError, first_line
from shared.teacher import refuse_nonfinite_weights
from shared.torch_file import load_weights_only, tensors_only

from salt_train.export import TIMM_LAYER_NORM_EPS, export_encoder
from salt_train.student import VideoViT, create_timm_vit

VJEPA_KEY = "target_encoder"
VJEPA_PREFIXES = ("module.", "backbone.")  # DDP's, then V-JEPA's MultiMaskWrapper's
# Heads cannot be read off the tensors (qkv is [3D, D] for any head count): V-JEPA's sizes, by width.
VJEPA_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
# timm names of those sizes, for a readable config.json; the kwargs always spell the shape out.
TIMM_NAMES = {
    (192, 12): "vit_tiny_patch16_224",
    (384, 12): "vit_small_patch16_224",
    (768, 12): "vit_base_patch16_224",
    (1024, 24): "vit_large_patch16_224",
}
BLOCK_TENSORS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
# What a VideoMAE folder may hold beyond the encoder: a classifier's head, a pretraining model's decoder.
VIDEOMAE_LEFT_OUT = ("classifier.", "fc_norm.", "decoder.", "encoder_to_decoder.", "mask_token")


@dataclass
class Imported:
    """What was converted, for the command's summary."""

    layout: str  # "vjepa" or "videomae"
    architecture: str
    kwargs: dict
    tensors: int  # source tensors used
    positions: str  # where pos_embed came from
    left_out: list[str] = field(default_factory=list)
    layer_norm_eps: float = TIMM_LAYER_NORM_EPS


def import_encoder(
    source: Path, out: Path, *, key: str = VJEPA_KEY, heads: int | None = None, uniform_power: bool = True
) -> Imported:
    """Convert ``source`` (a V-JEPA ``.pth.tar`` or a VideoMAE folder) into a new export folder ``out``."""
    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SaltUsageError(f"{out} already exists and is not an empty folder; nothing written, choose another OUT")
    if source.is_dir():
        encoder, imported = _from_videomae(source)
    else:
        encoder, imported = _from_vjepa(source, key, heads, uniform_power)
    record = {"layout": imported.layout, "path": str(source.resolve()), "positions": imported.positions}
    try:
        export_encoder(
            encoder, imported.architecture, imported.kwargs, out, layer_norm_eps=imported.layer_norm_eps, source=record
        )
    except OSError as exc:
        raise SaltUsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    return imported


# ---- V-JEPA ------------------------------------------------------------------------------------------


def read_vjepa_state(path: Path, key: str = VJEPA_KEY) -> dict[str, Tensor]:
    """The encoder's tensors in ``path`` under ``key``, prefixes stripped (a bare state dict is taken as is)."""
    loaded = load_weights_only(path, "the V-JEPA .pth.tar file")
    if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
        state = tensors_only(loaded[key], path, f"entry {key!r}")
    elif isinstance(loaded, dict) and loaded and all(isinstance(v, Tensor) for v in loaded.values()):
        state = tensors_only(loaded, path)
    else:
        entries = ", ".join(sorted(map(str, loaded))) if isinstance(loaded, dict) else type(loaded).__name__
        raise SaltUsageError(
            f"{path} has no {key!r} entry (it holds {entries or 'nothing'}); "
            "V-JEPA's encoder is target_encoder (or pass --key)"
        )
    stripped: dict[str, Tensor] = {}
    for name, tensor in state.items():
        short = name
        for prefix in VJEPA_PREFIXES:
            short = short.removeprefix(prefix)
        if short in stripped:
            raise SaltUsageError(f"{path}: {name} and another key both name {short} once prefixes are stripped")
        stripped[short] = tensor
    return stripped


def vjepa_keys(depth: int, qkv_bias: bool) -> list[str]:
    """Every tensor of V-JEPA's encoder but ``pos_embed``, in its names (which are ours)."""
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        keys += [f"blocks.{i}.{name}" for name in BLOCK_TENSORS if qkv_bias or name != "attn.qkv.bias"]
    return keys + ["norm.weight", "norm.bias"]


def vjepa_positions(width: int, uniform_power: bool) -> Tensor:
    """V-JEPA's fixed 3D sin-cos positions ``[1568, width]`` in token order ``t*196 + h*14 + w``: the
    time, row and column codes side by side (``uniform_power``: a third of the width each, rounded up to
    an even size and the end cut off; otherwise half for time and a quarter each for row and column)."""
    sizes = (2 * math.ceil(width / 6),) * 3 if uniform_power else (width // 2, width // 4, width // 4)
    if any(size % 2 for size in sizes):
        raise SaltUsageError(f"width {width} has no 3D sin-cos layout (each axis needs an even share)")
    grid = torch.meshgrid(
        torch.arange(geometry.GRID_T), torch.arange(geometry.GRID_H), torch.arange(geometry.GRID_W), indexing="ij"
    )
    codes = [_sincos(size, axis.reshape(-1).double()) for size, axis in zip(sizes, grid, strict=False)]
    return torch.cat(codes, dim=1)[:, :width].float()


def _sincos(size: int, positions: Tensor) -> Tensor:
    """``[len(positions), size]``: sines then cosines of the positions at ``size / 2`` geometric frequencies."""
    frequencies = 1.0 / 10000 ** (torch.arange(size // 2, dtype=torch.float64) / (size / 2))
    angles = positions[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _from_vjepa(path: Path, key: str, heads: int | None, uniform_power: bool) -> tuple[VideoViT, Imported]:
    state = read_vjepa_state(path, key)
    proj = state.get("patch_embed.proj.weight")
    if proj is None:
        raise SaltUsageError(f"{path} lacks patch_embed.proj.weight: not V-JEPA's encoder layout")
    kernel = (3, geometry.TUBELET_SIZE, geometry.PATCH_SIZE, geometry.PATCH_SIZE)
    if proj.ndim != 5 or tuple(proj.shape[1:]) != kernel:
        raise SaltUsageError(
            f"{path}: patch_embed.proj.weight has shape {tuple(proj.shape)}, not a Conv3d of "
            f"{geometry.TUBELET_SIZE}x{geometry.PATCH_SIZE}x{geometry.PATCH_SIZE} RGB tubelets "
            "(SALT's geometry)"
        )
    width = int(proj.shape[0])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise SaltUsageError(f"{path} holds no blocks.N tensors: not V-JEPA's encoder layout")
    depth = max(blocks) + 1
    expected = vjepa_keys(depth, qkv_bias="blocks.0.attn.qkv.bias" in state)
    _check_keys(path, state, expected + ["pos_embed"], optional={"pos_embed"})
    fc1 = state["blocks.0.mlp.fc1.weight"]
    heads = _heads(heads or VJEPA_HEADS.get(width), width, "a V-JEPA size")
    architecture, kwargs = timm_shape(
        width, depth, heads, int(fc1.shape[0]), "blocks.0.attn.qkv.bias" in state, final_norm=True
    )
    encoder = VideoViT(create_timm_vit(architecture, kwargs))
    if "pos_embed" in state:
        positions, how = state["pos_embed"], "pos_embed from the checkpoint"
    else:
        positions = vjepa_positions(width, uniform_power)[None]
        how = f"V-JEPA's 3D sin-cos, rebuilt (uniform_power {str(uniform_power).lower()}; none in the checkpoint)"
    if tuple(positions.shape) != (1, geometry.NUM_TOKENS, width):
        raise SaltUsageError(
            f"{path}: pos_embed has shape {tuple(positions.shape)}, expected "
            f"{(1, geometry.NUM_TOKENS, width)} (16 frames of 224 px; other resolutions, e.g. "
            "ViT-H 384, are not SALT's geometry)"
        )
    ours = {name: state[name] for name in expected}
    ours["pos_embed"] = positions
    _load(path, encoder, ours, what=f"V-JEPA ViT of width {width}")
    return encoder, Imported("vjepa", architecture, kwargs, len(expected) + ("pos_embed" in state), how)


# ---- VideoMAE ------------------------------------------------------------------------------------------


def stored_keys(folder: Path) -> list[str]:
    """The tensor names a ``save_pretrained`` folder holds (without loading the tensors)."""
    single, index, legacy = (
        folder / "model.safetensors",
        folder / "model.safetensors.index.json",
        folder / "pytorch_model.bin",
    )
    try:
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as handle:
                return list(handle.keys())
        if index.is_file():
            return list(json.loads(index.read_text())["weight_map"])
        if legacy.is_file():
            return list(tensors_only(load_weights_only(legacy), legacy))
    except SaltUsageError:
        raise
    except Exception as exc:  # a damaged file: the loader below would say the same
        raise SaltUsageError(f"{folder}: cannot list its weights ({type(exc).__name__}: {first_line(exc)})") from None
    raise SaltUsageError(f"{folder} holds no model.safetensors (or pytorch_model.bin): not a save_pretrained folder")


def _from_videomae(folder: Path) -> tuple[VideoViT, Imported]:
    if not (folder / "config.json").is_file():
        raise SaltUsageError(
            f"{folder} has no config.json: pass a V-JEPA .pth.tar file or a VideoMAE save_pretrained folder"
        )
    from shared.teacher import load_teacher_model

    model = load_teacher_model(str(folder))  # the --teacher loader: geometry, missing keys and shapes checked
    config = model.config
    expected_geometry = (geometry.IMAGE_SIZE, geometry.PATCH_SIZE, geometry.NUM_FRAMES, geometry.TUBELET_SIZE)
    if (config.image_size, config.patch_size, config.num_frames, config.tubelet_size) != expected_geometry:
        raise SaltUsageError(
            f"{folder}: a VideoMAE of {config.num_frames} frames of {config.image_size} px in "
            f"{config.tubelet_size}x{config.patch_size}x{config.patch_size} tubelets, not SALT's "
            f"geometry {expected_geometry}"
        )
    if config.hidden_act != "gelu":
        raise SaltUsageError(f"{folder}: hidden_act {config.hidden_act!r}; timm's blocks compute exact GELU only")
    state = model.state_dict()
    known = {_current_name(k.removeprefix("videomae.")) for k in stored_keys(folder)}
    left_out = sorted(k for k in known - set(state) if k.startswith(VIDEOMAE_LEFT_OUT))
    extra = sorted(known - set(state) - set(left_out))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise SaltUsageError(f"{folder} has an unexpected key {extra[0]}{more}: not a VideoMAE encoder")
    refuse_nonfinite_weights(state.items(), str(folder))
    width, depth = int(config.hidden_size), int(config.num_hidden_layers)
    final_norm = model.layernorm is not None
    qv_bias = "encoder.layer.0.attention.attention.query.bias" in state
    heads = _heads(int(config.num_attention_heads), width, "its config")
    architecture, kwargs = timm_shape(width, depth, heads, int(config.intermediate_size), qv_bias, final_norm)
    encoder = VideoViT(create_timm_vit(architecture, kwargs))
    used: set[str] = set()

    def take(name: str) -> Tensor:
        used.add(name)
        return state[name]

    ours = {
        "patch_embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("embeddings.patch_embeddings.projection.bias"),
        "pos_embed": model.embeddings.position_embeddings.detach().float().reshape(1, -1, width),
    }
    if final_norm:
        ours |= {"norm.weight": take("layernorm.weight"), "norm.bias": take("layernorm.bias")}
    for i in range(depth):
        layer, block = f"encoder.layer.{i}.", f"blocks.{i}."
        attention = layer + "attention.attention."
        ours[block + "attn.qkv.weight"] = torch.cat(
            [take(attention + f"{part}.weight") for part in ("query", "key", "value")]
        )
        if qv_bias:
            query_bias = take(attention + "query.bias")
            ours[block + "attn.qkv.bias"] = torch.cat(
                [query_bias, torch.zeros_like(query_bias), take(attention + "value.bias")]
            )
        for theirs, mine in (
            ("attention.output.dense", "attn.proj"),
            ("layernorm_before", "norm1"),
            ("layernorm_after", "norm2"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
        ):
            ours[block + mine + ".weight"] = take(layer + theirs + ".weight")
            ours[block + mine + ".bias"] = take(layer + theirs + ".bias")
    unused = sorted(set(state) - used)
    if unused:  # a VideoMAE variant this mapping does not know (e.g. a newer transformers' extra tensor)
        raise SaltUsageError(f"{folder}: {unused[0]} has no place in a timm ViT; not converted")
    _load(folder, encoder, ours, what=f"VideoMAE of width {width}")
    return encoder, Imported(
        "videomae",
        architecture,
        kwargs,
        len(used),
        "VideoMAE's 1D sin-cos table",
        left_out,
        float(config.layer_norm_eps),
    )


def _current_name(key: str) -> str:
    """Older transformers save the query and value biases as ``q_bias`` / ``v_bias``; version 5 loads
    them as ``query.bias`` / ``value.bias``."""
    return re.sub(r"\.(q|v)_bias$", lambda m: {"q": ".query.bias", "v": ".value.bias"}[m.group(1)], key)


# ---- both ----------------------------------------------------------------------------------------


def timm_shape(width: int, depth: int, heads: int, hidden: int, qkv_bias: bool, final_norm: bool) -> tuple[str, dict]:
    """The timm architecture name and kwargs of a ViT of this shape (16 px patches)."""
    ratio = hidden / width
    if int(width * ratio) != hidden:  # timm's Mlp takes int(width * mlp_ratio): no float rounding below it
        ratio = (hidden + 0.5) / width
    kwargs = {
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": ratio,
        "qkv_bias": qkv_bias,
        "patch_size": geometry.PATCH_SIZE,
        "img_size": geometry.IMAGE_SIZE,
    }
    if not final_norm:
        kwargs["final_norm"] = False
    return TIMM_NAMES.get((width, depth), "vit_base_patch16_224"), kwargs


def _heads(heads: int | None, width: int, known: str) -> int:
    if heads is None:
        raise SaltUsageError(f"width {width} is not {known}; pass --heads")
    if width % heads:
        raise SaltUsageError(f"--heads {heads} does not divide the width {width}")
    return heads


def _check_keys(path: Path, state: dict[str, Tensor], expected: list[str], optional: set[str]) -> None:
    missing = [k for k in expected if k not in state and k not in optional]
    if missing:
        more = f" and {len(missing) - 1} more keys" if len(missing) > 1 else ""
        raise SaltUsageError(f"{path} lacks {missing[0]}{more}")
    extra = sorted(set(state) - set(expected))
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise SaltUsageError(f"{path} has an unexpected key {extra[0]}{more}: not V-JEPA's encoder layout")
    refuse_nonfinite_weights(state.items(), str(path))


def _load(path: Path, encoder: VideoViT, ours: dict[str, Tensor], what: str) -> None:
    """Every tensor into its place, each shape checked first (one line naming the first that differs)."""
    target = encoder.state_dict()
    target_keys = set(target) - {"temporal_embed"}  # zero: the source's positions already hold the time slots
    assert set(ours) == target_keys, sorted(set(ours) ^ target_keys)  # the mappings above name every tensor
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise SaltUsageError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(target[name].shape)} for a {what}"
            )
    with torch.no_grad():
        encoder.temporal_embed.zero_()
    encoder.load_state_dict({**ours, "temporal_embed": encoder.temporal_embed.detach()}, strict=True)
