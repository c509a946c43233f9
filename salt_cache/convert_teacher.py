"""`salt-cache convert-teacher`: an original-release VideoMAE checkpoint -> a ``save_pretrained`` folder.

The original VideoMAE code (the pretraining model) saves its encoder as ``encoder.patch_embed.proj``,
``encoder.blocks.N.{norm1, attn.qkv, attn.q_bias, attn.v_bias, attn.proj, norm2, mlp.fc1, mlp.fc2}``
and ``encoder.norm``, next to a pixel decoder (``decoder.*``, ``encoder_to_decoder``, ``mask_token``)
that a teacher does not use. This maps the encoder onto transformers' ``VideoMAEModel`` with
``use_mean_pooling: false`` (so ``encoder.norm`` becomes its final ``layernorm``, applied to every
token), checks every key, and saves it where ``--teacher DIR`` can load it.

The file is read with ``torch.load(weights_only=True)`` (``shared/torch_file.py``): no pickle code runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor
from transformers import VideoMAEConfig, VideoMAEModel

from shared import geometry
from shared.errors import SaltUsageError, first_line
from shared.filesystem import atomic_dir
from shared.teacher import quiet_transformers, refuse_nonfinite_weights
from shared.torch_file import load_weights_only, tensors_only

ENCODER = "encoder."
# The pretraining model's pixel decoder: left out on purpose, the teacher is the encoder alone.
DECODER_PREFIXES = ("decoder.", "encoder_to_decoder.", "mask_token")
WRAPPERS = ("model", "module")  # the original scripts save {"model": state, "optimizer": ..., "args": ...}
# Heads cannot be read off the tensors (qkv is [3D, D] for any head count): the released sizes.
KNOWN_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}
LAYER_NORM_EPS = 1e-6  # the original code's norm_layer=partial(nn.LayerNorm, eps=1e-6)


@dataclass
class Conversion:
    """What was converted, for the command's summary."""

    config: VideoMAEConfig
    converted: int
    ignored: list[str] = field(default_factory=list)
    other_entries: list[str] = field(default_factory=list)


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """The state dict in ``path`` (unwrapped from ``model``/``module``) and the other top-level entries."""
    loaded = load_weights_only(path, "the .pth file")
    if isinstance(loaded, dict) and not any(isinstance(v, Tensor) for v in loaded.values()):
        for wrapper in WRAPPERS:
            if isinstance(loaded.get(wrapper), dict):
                return tensors_only(loaded[wrapper], path), sorted(str(k) for k in loaded if k != wrapper)
    if isinstance(loaded, dict):
        return tensors_only(loaded, path), []
    raise SaltUsageError(f"{path} holds a {type(loaded).__name__}, not a state dict")


def original_encoder_keys(depth: int, qkv_bias: bool) -> list[str]:
    """Every encoder key the original pretraining model saves, in its own names."""
    keys = [f"{ENCODER}patch_embed.proj.weight", f"{ENCODER}patch_embed.proj.bias"]
    for i in range(depth):
        block = f"{ENCODER}blocks.{i}."
        keys += [
            block + name
            for name in (
                "norm1.weight",
                "norm1.bias",
                "attn.qkv.weight",
                *(("attn.q_bias", "attn.v_bias") if qkv_bias else ()),
                "attn.proj.weight",
                "attn.proj.bias",
                "norm2.weight",
                "norm2.bias",
                "mlp.fc1.weight",
                "mlp.fc1.bias",
                "mlp.fc2.weight",
                "mlp.fc2.bias",
            )
        ]
    return keys + [f"{ENCODER}norm.weight", f"{ENCODER}norm.bias"]


def infer_config(state: dict[str, Tensor], heads: int | None, original: Path) -> VideoMAEConfig:
    """Width, depth, MLP size, tubelet and patch from the tensors; heads from ``heads`` or the released sizes."""
    proj = state.get(f"{ENCODER}patch_embed.proj.weight")
    fc1 = state.get(f"{ENCODER}blocks.0.mlp.fc1.weight")
    for key, tensor in ((f"{ENCODER}patch_embed.proj.weight", proj), (f"{ENCODER}blocks.0.mlp.fc1.weight", fc1)):
        if tensor is None:
            finetuned = "patch_embed.proj.weight" in state  # the classification layout: no encoder. prefix
            hint = " (a fine-tuned checkpoint? this converts the pretraining layout, encoder.*)" if finetuned else ""
            raise SaltUsageError(f"{original} lacks {key}{hint}")
    assert proj is not None and fc1 is not None  # refused above
    if proj.ndim != 5 or fc1.ndim != 2:
        raise SaltUsageError(
            f"{original}: {ENCODER}patch_embed.proj.weight has shape {tuple(proj.shape)}, not a Conv3d tubelet weight"
        )
    width, channels, tubelet, patch, _ = proj.shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(ENCODER)}blocks\.(\d+)\.", k)))
    heads = heads or KNOWN_HEADS.get(width)
    if heads is None:
        raise SaltUsageError(f"width {width} is not a released VideoMAE size; pass --heads")
    if width % heads:
        raise SaltUsageError(f"--heads {heads} does not divide the width {width}")
    return VideoMAEConfig(
        image_size=geometry.IMAGE_SIZE,
        patch_size=int(patch),
        num_channels=int(channels),
        num_frames=geometry.NUM_FRAMES,
        tubelet_size=int(tubelet),
        hidden_size=int(width),
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=int(fc1.shape[0]),
        hidden_act="gelu",
        layer_norm_eps=LAYER_NORM_EPS,
        # transformers 5 calls it qv_bias and still takes qkv_bias; 4.x (allowed by pyproject) knows only qkv_bias.
        qkv_bias=f"{ENCODER}blocks.0.attn.q_bias" in state,  # type: ignore[call-arg]
        use_mean_pooling=False,  # keeps the final norm, applied to every token
    )


def to_transformers(state: dict[str, Tensor], depth: int, model_keys: set[str]) -> dict[str, Tensor]:
    """Original encoder names -> VideoMAEModel's (qkv split into query, key, value; the key has no bias)."""
    src = lambda name: state[ENCODER + name]  # noqa: E731
    out = {
        "embeddings.patch_embeddings.projection.weight": src("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": src("patch_embed.proj.bias"),
        "layernorm.weight": src("norm.weight"),
        "layernorm.bias": src("norm.bias"),
    }
    for i in range(depth):
        block, layer = f"blocks.{i}.", f"encoder.layer.{i}."
        attention = layer + "attention.attention."
        query, key, value = src(block + "attn.qkv.weight").chunk(3, dim=0)  # rows ordered q, k, v as in the original
        out |= {attention + "query.weight": query, attention + "key.weight": key, attention + "value.weight": value}
        if ENCODER + block + "attn.q_bias" in state:
            # transformers 5 holds them as query.bias / value.bias; older releases as q_bias / v_bias.
            q_name, v_name = (
                ("query.bias", "value.bias") if attention + "query.bias" in model_keys else ("q_bias", "v_bias")
            )
            out[attention + q_name] = src(block + "attn.q_bias")
            out[attention + v_name] = src(block + "attn.v_bias")
        for original, ours in (
            ("attn.proj", "attention.output.dense"),
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
            ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"),
        ):
            out[layer + ours + ".weight"] = src(block + original + ".weight")
            out[layer + ours + ".bias"] = src(block + original + ".bias")
    return out


def convert_teacher(original: Path, out: Path, heads: int | None = None) -> Conversion:
    """Convert ``original`` into a new ``save_pretrained`` folder ``out`` (written whole or not at all)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SaltUsageError(f"{out} already exists and is not an empty folder; nothing written, choose another OUT")
    state, other_entries = read_checkpoint(original)
    config = infer_config(state, heads, original)
    expected = original_encoder_keys(config.num_hidden_layers, f"{ENCODER}blocks.0.attn.q_bias" in state)
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" and {len(missing) - 1} more keys" if len(missing) > 1 else ""
        raise SaltUsageError(f"{original} lacks {missing[0]}{more}")
    refuse_nonfinite_weights(((k, state[k]) for k in expected), str(original))  # the decoder is left out anyway
    ignored = sorted(k for k in state if k.startswith(DECODER_PREFIXES))
    known = set(expected) | set(ignored)
    extra = sorted(k for k in state if k not in known)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise SaltUsageError(
            f"{original} has an unexpected key {extra[0]}{more}: not the original VideoMAE encoder layout"
        )

    model = VideoMAEModel(config)
    try:
        model.load_state_dict(to_transformers(state, config.num_hidden_layers, set(model.state_dict())), strict=True)
    except RuntimeError as exc:  # a tensor of the wrong shape (e.g. a qkv that is not [3D, D])
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), first_line(exc))
        raise SaltUsageError(f"{original} does not fit a VideoMAE of width {config.hidden_size}: {detail}") from None

    try:
        with atomic_dir(out) as partial, quiet_transformers():  # an empty `out` (checked above) is replaced
            model.save_pretrained(partial)
    except OSError as exc:
        raise SaltUsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    return Conversion(config, converted=len(expected), ignored=ignored, other_entries=other_entries)
