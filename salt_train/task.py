"""What a run of the training loop trains: SALT's student (``salt-train run``) or its stage-1 teacher
(``salt-train teacher``).

The loop (salt_train/train.py: snapshot, loader with masks in workers, bf16 and compile on CUDA,
checkpoints and exact resume, health lines, metrics.jsonl, torchrun) is the same for both; a
:class:`Task` says what differs: the arrays the stream reads, the model and its loss, its FLOPs,
the lines of the start block, and what the run exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from shared.config import PipelineConfig, ScheduleConfig
from shared.errors import SaltUsageError
from shared.store import LatentStore

from salt_train.masks import describe_masks, mask_layout
from salt_train.model import SaltStudent, mask_groups, student_flops_per_clip

if TYPE_CHECKING:
    from salt_train.pixel_teacher import PixelTeacher

TASKS = ("student", "teacher")


@dataclass(frozen=True)
class Task:
    """SALT's stage 2 (``student``: regress the teacher latents) or stage 1 (``teacher``: reconstruct pixels)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r} (one of {', '.join(TASKS)})")

    @property
    def command(self) -> str:
        return "run" if self.name == "student" else "teacher"

    @property
    def arrays(self) -> tuple[str, ...]:
        """What each batch reads from the store."""
        return ("pixels", "latents") if self.name == "student" else ("pixels",)

    def run_config(self, config: PipelineConfig) -> PipelineConfig:
        """The recipe a new run of this task records: a teacher run takes ``teacher_train``'s schedule as its
        ``train`` schedule, and has no quick evaluation (it has no latents to evaluate against)."""
        if self.name == "student":
            return config
        schedule = config.teacher_train.model_dump(include=set(ScheduleConfig.model_fields))
        config = config.model_copy(deep=True)
        config.train = config.train.model_copy(update={**schedule, "eval_every": None})
        return config

    def check_store(self, store: LatentStore) -> None:
        """Refuse, in one line, a store this task cannot train on."""
        if self.name == "student":
            store.require_latents("salt-train run has no targets (train a teacher on it with salt-train teacher)")

    def latent_width(self, store: LatentStore) -> int:
        """The latents each batch carries (0: none)."""
        return store.teacher_width if self.name == "student" else 0

    def build_model(self, config: PipelineConfig, latent_width: int) -> SaltStudent | PixelTeacher:
        """The model at its seeded initialisation (``train.seed``)."""
        import torch

        from salt_train.pixel_teacher import build_pixel_teacher
        from salt_train.step import seeded_student

        if self.name == "student":
            return seeded_student(config, latent_width)
        torch.manual_seed(config.train.seed)
        try:
            return build_pixel_teacher(config.teacher_train, mask_groups(config.mask))
        except ValueError as exc:
            raise SaltUsageError(str(exc)) from None

    def objective(self, model: SaltStudent | PixelTeacher, config: PipelineConfig) -> nn.Module | None:
        """The loss module over ``model``; None: the Stepper's default (SALT's, over the student)."""
        from salt_train.pixel_teacher import PixelObjective, PixelTeacher

        if self.name == "student":
            return None
        assert isinstance(model, PixelTeacher)  # what build_model gave this task
        return PixelObjective(model, config.teacher_train.norm_pix_loss, config.teacher_train.norm_pix_eps)

    def flops(self, config: PipelineConfig, latent_width: int) -> dict[str, float]:
        from salt_train.pixel_teacher import teacher_flops_per_clip

        layout = mask_layout(config.mask.kind, config.mask.ratio)
        if self.name == "student":
            return student_flops_per_clip(config.model, latent_width, layout)
        return teacher_flops_per_clip(config.teacher_train, layout)

    def describe(self, config: PipelineConfig, model: nn.Module) -> dict[str, str]:
        """Lines of the start block that differ from the student's (none for the student)."""
        from salt_train.pixel_teacher import PixelTeacher

        if self.name == "student":
            return {}
        assert isinstance(model, PixelTeacher)  # what build_model gave this task
        encoder = sum(p.numel() for p in model.encoder.parameters())
        decoder = sum(p.numel() for p in model.decoder.parameters())
        shape = config.teacher_train
        vit = model.encoder.config
        return {
            "teacher": f"VideoMAE {shape.size} (width {vit.hidden_size}, {vit.num_hidden_layers} blocks, "
            f"{vit.num_attention_heads} heads, final norm {'on' if shape.final_norm else 'off'}), "
            f"{encoder / 1e6:.1f}M encoder + {decoder / 1e6:.1f}M decoder params",
            "objective": "pixel reconstruction of the target tubelets, "
            + (
                f"normalised per patch (VideoMAE's norm_pix_loss, eps {shape.norm_pix_eps:g})"
                if shape.norm_pix_loss
                else "ImageNet-normalised pixels (norm_pix_loss: false)"
            )
            + f", MSE; {describe_masks(config.mask.kind, config.mask.ratio)}",
        }

    def export(self, model: nn.Module, config: PipelineConfig, out_dir: Path) -> Path:
        """What a finished run leaves for the next stage: the student's encoder (timm), or the teacher's
        ``save_pretrained`` folder (``salt-cache build --teacher OUT_DIR``)."""
        from salt_train.export import export_encoder
        from salt_train.pixel_teacher import PixelTeacher, export_teacher

        if self.name == "student":
            assert isinstance(model, SaltStudent)  # what build_model gave this task
            return export_encoder(model.encoder, config.model.student, dict(config.model.student_kwargs), out_dir)
        assert isinstance(model, PixelTeacher)
        return export_teacher(model, out_dir)


STUDENT = Task("student")
TEACHER = Task("teacher")
