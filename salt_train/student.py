"""The student encoder: a timm VisionTransformer made into a video encoder.

timm gives the blocks and the final norm, so their state-dict keys stay timm's
(``blocks.0.attn.qkv.weight``, ``norm.weight``). We replace the 2D patch
embedding with a Conv3d tubelet embedding (2x16x16, still ``patch_embed.proj``)
inflated from the 2D weights, and the 196 spatial positions with 1568: the
spatial ones repeated over the 8 temporal slots plus a learned temporal
embedding. Class and register tokens are dropped: SALT regresses per-token
latents, and VideoMAE's ``last_hidden_state`` has none either.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from shared import geometry
from shared.errors import SaltUsageError, one_line


def _close_names(model_name: str) -> list[str]:
    """timm names resembling ``model_name``: a wildcard on its longest part, then difflib."""
    parts = sorted(model_name.replace("-", "_").split("_"), key=len, reverse=True)
    candidates = timm.list_models(f"*{parts[0]}*") if parts and len(parts[0]) >= 3 else []
    pool = candidates or timm.list_models()
    return difflib.get_close_matches(model_name, pool, n=3, cutoff=0.5)


def create_timm_vit(model_name: str, kwargs: dict | None = None) -> nn.Module:
    """``timm.create_model`` of a ViT, refusing unknown names and non-ViT models with one line."""
    if not timm.is_model(model_name):
        close = _close_names(model_name)
        hint = f"; close: {', '.join(close)}" if close else "; timm.list_models('vit_*') lists the ViTs"
        raise SaltUsageError(f"model.student: unknown timm model {model_name!r}{hint}")
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **(kwargs or {}))
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:  # RuntimeError: e.g. embed_dim=-5
        raise SaltUsageError(f"model.student_kwargs {kwargs or {}} do not fit {model_name} ({one_line(exc)})") from None
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    # timm's VisionTransformer class (and subclasses): EVA-style models have the same attributes
    # but need rotary positions passed to every block, which calling blocks alone would drop.
    is_vit = (
        isinstance(model, VisionTransformer)
        and isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList)
        and isinstance(getattr(model, "norm", None), nn.Module)
        and isinstance(getattr(model, "pos_embed", None), nn.Parameter)
        and isinstance(proj, nn.Conv2d)
        and proj.in_channels == 3
        and tuple(proj.kernel_size) == tuple(proj.stride) == (geometry.PATCH_SIZE,) * 2
    )
    if not is_vit:
        raise SaltUsageError(
            f"model.student: {model_name} is not a timm VisionTransformer with 16x16 patches "
            "(needs blocks, norm, a learned pos_embed and a Conv2d patch_embed.proj)"
        )
    return model


def load_2d_weights(model: nn.Module, path: str | Path) -> None:
    """A local 2D timm checkpoint into the freshly created 2D model.

    timm's loader reads safetensors without pickle, and anything else with
    ``torch.load(weights_only=True)``. The classifier head may be absent from
    the model (``num_classes=0``); every other weight must come from the file,
    so a checkpoint of another architecture is refused rather than half-loaded.
    """
    file = Path(path)
    if not file.is_file():
        raise SaltUsageError(f"model.pretrained: {path} is not a file (a local 2D timm checkpoint, .safetensors)")
    try:
        result = timm.models.load_checkpoint(model, str(file), strict=False, weights_only=True)
    except Exception as exc:  # corrupt file, shape mismatch, pickle refused: all bad input
        raise SaltUsageError(f"model.pretrained: cannot load {path} ({one_line(exc)})") from None
    missing = list(getattr(result, "missing_keys", []))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SaltUsageError(f"model.pretrained: {path} does not fit the student (missing {shown})")


TUBELET_FEATURES = 3 * geometry.TUBELET_SIZE * geometry.PATCH_SIZE**2  # 1536 values per tubelet


def tubelets(pixels: Tensor) -> Tensor:
    """Normalised ``[B, 3, 16, 224, 224]`` -> ``[B, 1568, 1536]``: one row per tubelet in token
    order, its values in the Conv3d weight's (channel, frame, row, column) order (fewer frames, fewer rows)."""
    b = pixels.shape[0]
    t, p = geometry.TUBELET_SIZE, geometry.PATCH_SIZE
    x = pixels.reshape(b, 3, -1, t, geometry.GRID_H, p, geometry.GRID_W, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, TUBELET_FEATURES)


def view_tubelets(views: Tensor) -> Tensor:
    """uint8 views ``[B, 16, 224, 224, 3]`` (the store's layout) -> uint8 ``[B, 1568, 1536]``,
    laid out as :func:`tubelets`: still uint8, so a gather moves a quarter of float32's bytes."""
    b = views.shape[0]
    t, p = geometry.TUBELET_SIZE, geometry.PATCH_SIZE
    x = views.reshape(b, -1, t, geometry.GRID_H, p, geometry.GRID_W, p, 3)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, -1, TUBELET_FEATURES)


class PatchEmbed3d(nn.Module):
    """Conv3d tubelet embedding: ``[B, 3, 16, 224, 224]`` -> ``[B, 1568, width]`` in token order.

    :meth:`embed_tubelets` applies the same weights as one matmul to any subset of the
    tubelets, so the encoder embeds only the visible quarter (the Conv3d would embed all 1568
    and throw three quarters away).
    """

    # Buffers (register_buffer below), declared for the type checker.
    tubelet_mean: Tensor
    tubelet_std: Tensor

    def __init__(self, width: int, bias: bool = True, norm: nn.Module | None = None) -> None:
        super().__init__()
        kernel = (geometry.TUBELET_SIZE, geometry.PATCH_SIZE, geometry.PATCH_SIZE)
        self.proj = nn.Conv3d(3, width, kernel_size=kernel, stride=kernel, bias=bias)
        self.norm = norm if norm is not None else nn.Identity()
        # ImageNet statistics per tubelet value (channel-major, as :func:`tubelets`), for uint8
        # input; buffers so they live on the model's device (no host copy per step), unsaved.
        per_channel = geometry.TUBELET_SIZE * geometry.PATCH_SIZE**2
        mean, std = geometry.pixel_statistics(torch.device("cpu"), (3,))
        self.register_buffer("tubelet_mean", mean.repeat_interleave(per_channel), persistent=False)
        self.register_buffer("tubelet_std", std.repeat_interleave(per_channel), persistent=False)

    @torch.no_grad()
    def inflate_from(self, proj2d: nn.Conv2d) -> None:
        """Copy the 2D weights into every tubelet frame, divided by the tubelet length:
        a static video then embeds exactly as the 2D model embeds one frame."""
        frames = geometry.TUBELET_SIZE
        self.proj.weight.copy_(proj2d.weight.unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames)
        if self.proj.bias is not None:
            assert proj2d.bias is not None  # built with a bias exactly when the 2D one has one
            self.proj.bias.copy_(proj2d.bias)

    def normalise(self, uint8_tubelets: Tensor) -> Tensor:
        """uint8 tubelet values -> ImageNet-normalised float32 (docs/DESIGN.md's pixel normalisation)."""
        return geometry.normalise_pixels(uint8_tubelets, self.tubelet_mean, self.tubelet_std)

    def embed_tubelets(self, tubelets: Tensor) -> Tensor:
        """Normalised ``[B, K, 1536]`` tubelets -> ``[B, K, width]``: the Conv3d as a matmul."""
        return self.norm(nn.functional.linear(tubelets, self.proj.weight.flatten(1), self.proj.bias))

    def forward(self, pixels: Tensor) -> Tensor:
        # [B, D, 8, 14, 14] flattened in (t, h, w) order: index t*196 + h*14 + w, the contract's.
        return self.norm(self.proj(pixels).flatten(2).transpose(1, 2))


class VideoViT(nn.Module):
    """A timm ViT turned into a video encoder over the 1568-token grid.

    ``pos_embed`` holds all 1568 positions (initialised from the 196 spatial
    ones, repeated over the 8 temporal slots, then free to diverge);
    ``temporal_embed`` ``[1, 8, 1, width]`` starts at zero and adds one vector
    per slot, so the pretrained spatial layout is intact at step 0.
    """

    # ``vit``: a timm ViT of any class (their attributes differ by class, so typed Any).
    def __init__(self, vit: Any, grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.width = int(vit.embed_dim)
        proj2d: nn.Conv2d = vit.patch_embed.proj
        self.patch_embed = PatchEmbed3d(
            self.width, bias=proj2d.bias is not None, norm=_module_or_identity(vit.patch_embed, "norm")
        )
        self.patch_embed.inflate_from(proj2d)
        self.pos_embed = nn.Parameter(self._spatial_positions(vit).repeat(1, geometry.GRID_T, 1))
        self.temporal_embed = nn.Parameter(torch.zeros(1, geometry.GRID_T, 1, self.width))
        # Kept from timm (same keys); dropout and the pre-norm of CLIP-style ViTs are Identity elsewhere.
        self.pos_drop = _module_or_identity(vit, "pos_drop")
        self.norm_pre = _module_or_identity(vit, "norm_pre")
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.grad_checkpointing = grad_checkpointing

    @staticmethod
    def _spatial_positions(vit: Any) -> Tensor:
        """timm's 196 patch positions, without those of class/register tokens."""
        pos = vit.pos_embed.detach()
        prefix = int(getattr(vit, "num_prefix_tokens", 0))
        if pos.shape[1] == prefix + geometry.TOKENS_PER_FRAME:
            return pos[:, prefix:].clone()
        if pos.shape[1] == geometry.TOKENS_PER_FRAME:  # no_embed_class ViTs (DeiT III): prefix tokens unpositioned
            return pos.clone()
        raise SaltUsageError(
            f"model.student: {pos.shape[1]} positions, expected {geometry.TOKENS_PER_FRAME} patches "
            f"(a 224 px ViT with 16 px patches; set student_kwargs img_size: 224)"
        )

    def positions(self) -> Tensor:
        """``[1, 1568, width]``: inflated spatial positions plus the temporal embedding of each slot
        (fewer rows for an export loaded for fewer frames: ``load_encoder(num_frames=T)``)."""
        temporal = self.temporal_embed.expand(-1, -1, geometry.TOKENS_PER_FRAME, -1).flatten(1, 2)
        return self.pos_embed + temporal

    def embed(self, pixels: Tensor) -> Tensor:
        """Patch tokens plus positions: ``[B, 1568, width]``."""
        return self.patch_embed(pixels) + self.positions()

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Blocks and final norm over ``[B, K, width]`` positioned tokens."""
        tokens = self.norm_pre(self.pos_drop(tokens))
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            # Recompute activations in backward: memory for compute, same gradients.
            tokens = checkpoint(block, tokens, use_reentrant=False) if checkpointed else block(tokens)
        return self.norm(tokens)

    def embed_at(self, tubelets: Tensor, token_ids: Tensor) -> Tensor:
        """Normalised tubelets ``[B, K, 1536]`` of the tokens ``token_ids`` ``[B, K]``, embedded
        and positioned: equal to :meth:`embed` followed by a gather, without embedding the rest."""
        positions = self.positions().expand(tubelets.shape[0], -1, -1)
        return self.patch_embed.embed_tubelets(tubelets) + gather_tokens(positions, token_ids)

    def forward(self, pixels: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """``[B, 3, 16, 224, 224]`` -> ``[B, K, width]`` at ``token_ids`` ``[B, K]`` (all 1568 when None)."""
        if token_ids is None:
            return self.encode_tokens(self.embed(pixels))
        return self.encode_tokens(self.embed_at(gather_tokens(tubelets(pixels), token_ids), token_ids))

    def forward_views(self, views: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """The same from uint8 views ``[B, 16, 224, 224, 3]`` (the store's pixels), normalised here."""
        patches = view_tubelets(views)
        if token_ids is None:
            return self.encode_tokens(
                self.patch_embed.embed_tubelets(self.patch_embed.normalise(patches)) + self.positions()
            )
        visible = self.patch_embed.normalise(gather_tokens(patches, token_ids))
        return self.encode_tokens(self.embed_at(visible, token_ids))


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """``x[b, ids[b]]``: ``[B, N, D]`` and ``[B, K]`` -> ``[B, K, D]``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _module_or_identity(model: nn.Module, name: str) -> nn.Module:
    module = getattr(model, name, None)
    return module if isinstance(module, nn.Module) else nn.Identity()


def build_student(
    model_name: str, *, kwargs: dict | None = None, pretrained: str | None = None, grad_checkpointing: bool = False
) -> VideoViT:
    """The video encoder of timm's ``model_name``, optionally inflated from a local 2D checkpoint."""
    vit = create_timm_vit(model_name, kwargs)
    if pretrained:
        load_2d_weights(vit, pretrained)
    return VideoViT(vit, grad_checkpointing)
