"""SALT's stage 1: a video ViT teacher trained by masked pixel reconstruction (VideoMAE's objective).

The encoder is a transformers ``VideoMAEModel`` (built from ``teacher_train``), so the
trained teacher is saved with ``save_pretrained`` and loads in ``salt-cache build
--teacher FOLDER`` exactly as a hub VideoMAE does (shared/teacher.py). Under the
project's masks (salt_train/masks.py; multiblock: two groups), per group:

- the encoder sees only the context tubelets (embedded with its own Conv3d weights as a
  matmul, positions added, then its blocks and final norm: :meth:`PixelTeacher.encode`,
  the same function as ``VideoMAEModel.forward`` restricted to those tokens);
- a light decoder (the predictor of salt_train/predictor.py: one mask token per group,
  fixed 3D sin-cos positions, narrow blocks) predicts the 1536 values of every target tubelet;
- the loss is the MSE against the target tubelets' pixels normalised per patch, as VideoMAE's
  ``norm_pix_loss``: each colour channel of a 2x16x16 tubelet (512 values in [0, 1]) to zero
  mean and unit (unbiased) standard deviation, + ``teacher_train.norm_pix_eps`` (VideoMAE's 1e-6;
  ``teacher_train.norm_pix_loss: false``:
  the ImageNet-normalised pixels themselves, VideoMAE's other option).

The loss is the mean of the groups' losses, as the student's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import VideoMAEConfig, VideoMAEModel

from shared import geometry
from shared.config import TeacherTrainConfig
from shared.filesystem import atomic_dir
from shared.flops import vit_forward_flops
from shared.teacher import quiet_transformers

from salt_train.predictor import Predictor
from salt_train.student import TUBELET_FEATURES, gather_tokens, view_tubelets

# (width, depth, heads) of the ViT sizes, as VideoMAE's releases have them.
TEACHER_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
NORM_PIX_EPS = 1e-6  # VideoMAE's (teacher_train.norm_pix_eps)


def teacher_config(cfg: TeacherTrainConfig) -> VideoMAEConfig:
    """The encoder's VideoMAE config: the contract's geometry, the recipe's size, the final norm or not."""
    width, depth, heads = TEACHER_SIZES[cfg.size]
    width, depth, heads = cfg.width or width, cfg.depth or depth, cfg.heads or heads
    if width % heads:
        raise ValueError(f"teacher_train: width {width} is not divisible by its {heads} heads")
    config = VideoMAEConfig(
        image_size=geometry.IMAGE_SIZE,
        patch_size=geometry.PATCH_SIZE,
        num_channels=3,
        num_frames=geometry.NUM_FRAMES,
        tubelet_size=geometry.TUBELET_SIZE,
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=round(width * cfg.mlp_ratio),
        use_mean_pooling=not cfg.final_norm,  # false: the final norm on every token (pretrain-style)
    )
    config._attn_implementation = "sdpa"
    return config


def pixel_targets(
    uint8_tubelets: Tensor,
    norm_pix: bool = True,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    eps: float = NORM_PIX_EPS,
) -> Tensor:
    """uint8 ``[B, M, 1536]`` tubelets (channel, frame, row, column) -> float32, each channel of each
    tubelet normalised to zero mean and unit unbiased std (+ ``eps``) over its 512 values (VideoMAE's norm_pix_loss);
    ``norm_pix`` False: normalised with the per-value ImageNet ``mean`` and ``std`` instead."""
    if not norm_pix:
        assert mean is not None and std is not None  # the ImageNet statistics come with norm_pix False
        return geometry.normalise_pixels(uint8_tubelets, mean, std)
    batch, tokens = uint8_tubelets.shape[:2]
    x = uint8_tubelets.float().div(255.0).reshape(batch, tokens, 3, -1)
    mean = x.mean(dim=-1, keepdim=True)
    std = x.var(dim=-1, unbiased=True, keepdim=True).sqrt()
    return ((x - mean) / (std + eps)).reshape(batch, tokens, TUBELET_FEATURES)


class PixelTeacher(nn.Module):
    """The VideoMAE encoder and its pixel decoder; checkpoints hold both, the export the encoder only."""

    # Buffers (register_buffer below), declared for the type checker.
    positions: Tensor
    tubelet_mean: Tensor
    tubelet_std: Tensor

    def __init__(
        self, encoder: VideoMAEModel, decoder_width: int, decoder_depth: int, decoder_heads: int, groups: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = Predictor(
            encoder.config.hidden_size, decoder_width, decoder_depth, decoder_heads, TUBELET_FEATURES, groups
        )
        # VideoMAE's fixed sin-cos table is a plain tensor on the embeddings: a device buffer here (unsaved).
        self.register_buffer(
            "positions", encoder.embeddings.position_embeddings.detach().clone().float(), persistent=False
        )
        per_channel = geometry.TUBELET_SIZE * geometry.PATCH_SIZE**2
        mean, std = geometry.pixel_statistics(torch.device("cpu"), (3,))
        self.register_buffer("tubelet_mean", mean.repeat_interleave(per_channel), persistent=False)
        self.register_buffer("tubelet_std", std.repeat_interleave(per_channel), persistent=False)

    @property
    def width(self) -> int:
        return int(self.encoder.config.hidden_size)

    def encode(self, uint8_tubelets: Tensor, visible: Tensor) -> Tensor:
        """The encoder on the ``visible`` tubelets only: ``[B, V, width]``, token for token what
        ``VideoMAEModel(pixel_values).last_hidden_state`` gives at those ids when it sees every token
        (attention aside: here the context attends only to itself)."""
        projection = self.encoder.embeddings.patch_embeddings.projection  # Conv3d over one tubelet = a matmul
        seen = geometry.normalise_pixels(gather_tokens(uint8_tubelets, visible), self.tubelet_mean, self.tubelet_std)
        tokens = F.linear(seen, projection.weight.flatten(1), projection.bias)
        tokens = tokens + gather_tokens(self.positions.to(tokens.dtype).expand(tokens.shape[0], -1, -1), visible)
        hidden = self.encoder.encoder(tokens).last_hidden_state
        return self.encoder.layernorm(hidden) if self.encoder.layernorm is not None else hidden

    def forward(self, uint8_tubelets: Tensor, visible: Tensor, masked: Tensor, group: int = 0) -> Tensor:
        """Predicted ``[B, M, 1536]`` tubelet values (normalised per patch) at the ``masked`` ids."""
        return self.decoder(self.encode(uint8_tubelets, visible), visible, masked, group)


class PixelObjective(nn.Module):
    """The stage-1 step from what the loader delivers (uint8 views, no latents) to the loss, one module
    for ``torch.compile`` and DDP (its parameters are the teacher's)."""

    def __init__(self, teacher: PixelTeacher, norm_pix: bool = True, norm_pix_eps: float = NORM_PIX_EPS) -> None:
        super().__init__()
        self.teacher = teacher
        self.norm_pix = norm_pix
        self.norm_pix_eps = norm_pix_eps

    def forward(
        self, views: Tensor, latents: Tensor | None, visible: tuple[Tensor, ...], masked: tuple[Tensor, ...]
    ) -> Tensor:
        """uint8 ``[B, 16, 224, 224, 3]`` and, per mask group, context and target ids -> the mean of the
        groups' MSE against the per-patch normalised target pixels (``latents``: unused, None)."""
        tubelets = view_tubelets(views)
        losses = []
        for group, (group_visible, group_masked) in enumerate(zip(visible, masked, strict=True)):  # unrolled
            predicted = self.teacher(tubelets, group_visible, group_masked, group)
            targets = pixel_targets(
                gather_tokens(tubelets, group_masked),
                self.norm_pix,
                self.teacher.tubelet_mean,
                self.teacher.tubelet_std,
                self.norm_pix_eps,
            )
            losses.append(F.mse_loss(predicted.float(), targets))
        return torch.stack(losses).mean()


def build_pixel_teacher(cfg: TeacherTrainConfig, groups: int) -> PixelTeacher:
    """A freshly initialised teacher (VideoMAE's init for the encoder) with its decoder."""
    return PixelTeacher(
        VideoMAEModel(teacher_config(cfg)), cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads, groups
    )


def teacher_flops_per_clip(cfg: TeacherTrainConfig, layout: tuple[tuple[int, int], ...]) -> dict[str, float]:
    """Forward FLOPs per clip over the mask groups of ``layout`` (encoder on the context, decoder on context
    and targets) and ``train_step``: 3x their sum, as :func:`salt_train.model.student_flops_per_clip`."""
    config = teacher_config(cfg)
    width, depth = config.hidden_size, config.num_hidden_layers
    encoder = decoder = patch = 0.0
    for context, targets in layout:
        encoder += vit_forward_flops(context, width, depth, cfg.mlp_ratio)
        decoder += (
            vit_forward_flops(context + targets, cfg.decoder_width, cfg.decoder_depth)
            + 2 * context * width * cfg.decoder_width
            + 2 * targets * cfg.decoder_width * TUBELET_FEATURES
        )
        patch += 2 * context * TUBELET_FEATURES * width
    return {"encoder": encoder, "decoder": decoder, "patch_embed": patch, "train_step": 3 * (encoder + decoder + patch)}


def export_teacher(teacher: PixelTeacher, out_dir: Path) -> Path:
    """The encoder as a ``save_pretrained`` folder (config.json, model.safetensors), written aside and renamed:
    what ``salt-cache build --teacher OUT_DIR`` loads. An older export is moved aside until the new one is in."""
    with atomic_dir(Path(out_dir), replace="backup") as partial, quiet_transformers():
        teacher.encoder.save_pretrained(partial)
    return Path(out_dir)
