"""The frozen VideoMAE teacher: load it, fingerprint it, and turn views into latents.

In `shared` because both stages run it: `salt-cache build` fills the store with its
latents, and `salt-train eval` runs it on transformed clips for the temporal probes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import PretrainedConfig, VideoMAEConfig, VideoMAEModel
from transformers.utils import logging as hf_logging

from shared import geometry
from shared.config import HUGE_RANDOM_TEACHER, TINY_TEACHER
from shared.device import resolve_device
from shared.errors import SaltUsageError, first_line

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Closest to fp32 of the two half types on VideoMAE (EXPERIMENTS.md): 10 mantissa bits vs 7.
CUDA_DEFAULT_DTYPE = "float16"


def tiny_teacher_config() -> VideoMAEConfig:
    """A VideoMAE with the contract's geometry (1568 tokens) but a 64-wide, 2-layer body."""
    return VideoMAEConfig(
        image_size=geometry.IMAGE_SIZE,
        patch_size=geometry.PATCH_SIZE,
        num_channels=3,
        num_frames=geometry.NUM_FRAMES,
        tubelet_size=geometry.TUBELET_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        use_mean_pooling=True,  # like the released checkpoints: no final layernorm on last_hidden_state
    )


def huge_teacher_config() -> VideoMAEConfig:
    """VideoMAE v1-Huge's shape (1280 wide, 32 layers): random weights, for benchmarks only."""
    config = tiny_teacher_config()
    config.update(
        {
            "hidden_size": geometry.TEACHER_WIDTH_HUGE,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "intermediate_size": 5120,
        }
    )
    return config


BUILTIN_CONFIGS = {TINY_TEACHER: tiny_teacher_config, HUGE_RANDOM_TEACHER: huge_teacher_config}


def build_builtin_teacher(name: str, seed: int = 0) -> VideoMAEModel:
    """A built-in teacher from its config with weights seeded by ``seed`` (no download)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = VideoMAEModel(BUILTIN_CONFIGS[name]())
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def weights_hash(model: torch.nn.Module) -> str:
    """A fingerprint of every tensor in the state dict (names, shapes, dtypes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an inf, or None."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def refuse_nonfinite_weights(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """A teacher with a NaN or inf weight turns every clip into NaN latents: refuse it before any work."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise SaltUsageError(
            f"{what} has a non-finite weight ({bad} holds NaN or inf): every latent it gives would "
            "be NaN; refusing it (a damaged download or a diverged training run?)"
        )


def _check_geometry(config: VideoMAEConfig, name: str) -> None:
    expected = {
        "image_size": geometry.IMAGE_SIZE,
        "patch_size": geometry.PATCH_SIZE,
        "num_frames": geometry.NUM_FRAMES,
        "tubelet_size": geometry.TUBELET_SIZE,
    }
    wrong = {k: getattr(config, k, None) for k, v in expected.items() if getattr(config, k, None) != v}
    if wrong:
        raise SaltUsageError(f"teacher {name} has geometry {wrong}; SALT needs {expected}")


def resolve_teacher_name(name: str) -> str:
    """Built-ins and hub ids as given; a local folder as an absolute path, so that the store
    records where it was wherever the build ran (``verify --deep`` reloads it from there)."""
    local = Path(name).expanduser()
    if name.startswith("builtin:") or not local.exists():
        return name
    return str(local.resolve())


def load_teacher_model(name: str) -> VideoMAEModel:
    """A hub id, a local ``save_pretrained`` folder, or a built-in (``builtin:tiny-videomae``)."""
    if name in BUILTIN_CONFIGS:
        return build_builtin_teacher(name)
    if name.startswith("builtin:"):
        raise SaltUsageError(f"unknown built-in teacher {name}; built-ins are {', '.join(BUILTIN_CONFIGS)}")
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise SaltUsageError(f"--teacher {name} is a file; pass a save_pretrained folder or a hub id")
    if not local.exists() and (local.is_absolute() or name.startswith((".", "~"))):
        raise SaltUsageError(f"teacher folder {name} does not exist")
    # Quiet while loading: the per-tensor progress bar and the load report (a classification
    # checkpoint's unused head) would otherwise sit on stderr on every run.
    with quiet_transformers():
        return _load_pretrained(name, local)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars or load reports on stderr inside the block."""
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_pretrained(name: str, local: Path) -> VideoMAEModel:
    try:
        if local.is_dir() and not (local / "config.json").is_file():
            raise SaltUsageError(
                f"teacher folder {name} has no config.json: not a save_pretrained video ViT "
                "(salt-train teacher's RUN/export is one)"
            )
        config = PretrainedConfig.get_config_dict(str(local) if local.is_dir() else name)[0]
        if config.get("format") == "salt-video-vit":  # salt_train/export.py's
            raise SaltUsageError(
                f"teacher {name} is a SALT student export (salt-train run's export/), not a "
                "teacher: pass a salt-train teacher run's export/ or a VideoMAE folder"
            )
        if config.get("model_type") != "videomae":
            raise SaltUsageError(
                f"teacher {name} is a {config.get('model_type')!r} model, not a video ViT teacher "
                "(VideoMAE, e.g. salt-train teacher's RUN/export)"
            )
        # A pretraining checkpoint keeps its encoder's final norm (as ``videomae.layernorm``, which
        # VideoMAEModel loads as ``layernorm``): build the model with it, so that it must load.
        overrides: dict[str, Any] = {"use_mean_pooling": False} if is_pretrain_style(config) else {}
        loaded = VideoMAEModel.from_pretrained(
            str(local) if local.is_dir() else name,
            output_loading_info=True,
            attn_implementation="sdpa",
            dtype=torch.float32,
            **overrides,
        )
        # output_loading_info=True returns (model, info); transformers' stubs know only the model.
        model, info = cast("tuple[VideoMAEModel, dict[str, list[str]]]", loaded)
    except SaltUsageError:
        raise
    except Exception as exc:  # transformers raises many types for a bad or absent checkpoint
        first = first_line(exc)
        if "connect" in first.lower():
            first += (
                " Offline: download it once where there is a network (huggingface-cli download "
                f"{name} --local-dir DIR) and pass --teacher DIR; HF_HUB_OFFLINE=1 skips the retries"
            )
        raise SaltUsageError(f"cannot load teacher {name}: {first}") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise SaltUsageError(
            f"teacher {name} lacks {len(missing)} VideoMAE weights (first: {missing[0]}); they would be random"
        )
    # A classifier's head and fc_norm, or a decoder, are left out on purpose; the encoder's norm is not.
    unexpected = sorted(info.get("unexpected_keys", ()))
    dropped_norm = [k for k in unexpected if k.removeprefix("videomae.").startswith("layernorm.")]
    if dropped_norm:
        raise SaltUsageError(
            f"teacher {name} has a final norm ({dropped_norm[0]}) but its config says "
            "use_mean_pooling: true, so it would be dropped; "
            "set use_mean_pooling: false in its config.json"
        )
    return model


def is_pretrain_style(config: dict) -> bool:
    """A self-supervised VideoMAE (no classifier): its per-token output passes its encoder's final norm."""
    return config.get("use_mean_pooling") is False or "VideoMAEForPreTraining" in (config.get("architectures") or [])


@dataclass
class Teacher:
    """A frozen teacher on a device; ``encode`` maps uint8 views to fp16 latents.

    Kept on the device once, not rebuilt per batch: the ImageNet statistics and VideoMAE's
    sin-cos position table (transformers keeps it as a plain CPU tensor and copies it from
    pageable memory on every forward: a sync, and no CUDA graphs). On CUDA the half-precision
    weights (Linear and Conv3d; LayerNorm stays float32, as autocast computes it) are converted
    once, at the first half-precision encode, and the forward is compiled (``compile_mode``).
    """

    model: VideoMAEModel
    name: str
    device: torch.device
    compute_dtype: str
    weights_hash: str
    compile_mode: str = "off"
    attention: str = "auto"  # the SDPA kernel (shared.config.TeacherAttention)

    def __post_init__(self) -> None:
        self.mean, self.std = geometry.pixel_statistics(self.device, (1, 1, 3, 1, 1))
        embeddings = self.model.embeddings
        embeddings.position_embeddings = embeddings.position_embeddings.to(self.device)
        self.weights_dtype = torch.float32
        self.forward = self.model if self.compile_mode == "off" else torch.compile(self.model, mode=self.compile_mode)

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def final_norm(self) -> bool:
        """Whether the latents pass the encoder's final norm (pretrain-style teachers) or are the raw
        residual stream (the Kinetics-finetuned checkpoints, whose norm sits in the classifier)."""
        return self.model.layernorm is not None

    def identity(self) -> dict[str, object]:
        config = self.model.config
        return {
            "name": self.name,
            "weights_hash": self.weights_hash,
            "width": self.width,
            "compute_dtype": self.compute_dtype,
            "model_type": config.model_type,
            "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads,
            "final_norm": self.final_norm,
        }

    def _convert_weights(self, dtype: torch.dtype) -> None:
        """Matmul weights in ``dtype`` once, instead of autocast casting them on every forward
        (the same values: autocast rounds them the same way). Irreversible: fp32 comes first."""
        if dtype == self.weights_dtype:
            return
        if self.weights_dtype != torch.float32 or self.device.type != "cuda":
            raise RuntimeError(f"teacher weights are {self.weights_dtype}: cannot run in {dtype}")
        for module in self.model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
                module.to(dtype)
        self.weights_dtype = dtype

    @torch.inference_mode()
    def encode(self, views: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """uint8 ``[B, 16, 224, 224, 3]`` -> float16 ``[B, 1568, D]`` last_hidden_state (after the
        encoder's final norm for a pretrain-style teacher: see :attr:`final_norm`).

        ``reference``: the loaded fp32 weights under autocast, not compiled, weights left as they
        are (``salt-cache bench`` compares precisions this way, before any converting encode).
        """
        pixels = views.to(self.device, non_blocking=True)
        # VideoMAE takes (B, T, C, H, W) floats normalised with ImageNet statistics.
        pixels = geometry.normalise_pixels(pixels.permute(0, 1, 4, 2, 3), self.mean, self.std)
        dtype = DTYPES[self.compute_dtype]
        if reference and self.weights_dtype != torch.float32:
            raise RuntimeError(f"teacher weights already converted to {self.weights_dtype}: no fp32 reference")
        if dtype != torch.float32 and self.device.type == "cuda" and not reference:
            self._convert_weights(dtype)
        forward = self.model if reference else self.forward
        with (
            torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32),
            attention_kernel(self.attention),
        ):
            latents = forward(pixel_values=pixels).last_hidden_state
        if latents.shape[1] != geometry.NUM_TOKENS:
            raise SaltUsageError(f"teacher {self.name} gave {latents.shape[1]} tokens, not {geometry.NUM_TOKENS}")
        return latents.to(torch.float16)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if device.type == "cpu":
        if dtype not in ("auto", "float32"):
            log.warning("teacher dtype %s ignored on CPU: half-precision matmuls are slow there; using float32", dtype)
        return "float32"
    return CUDA_DEFAULT_DTYPE if dtype == "auto" else dtype


def resolve_teacher_compile(mode: str, device: torch.device) -> str:
    """auto: inductor's default mode on CUDA (one shape: the teacher batch is constant), off on CPU."""
    if mode == "auto":
        return "default" if device.type == "cuda" else "off"
    return mode


# The kernels behind teacher.attention's names (torch.nn.attention.SDPBackend members).
SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def attention_kernel(choice: str) -> contextlib.AbstractContextManager[None]:
    """Scaled dot-product attention restricted to ``choice``'s kernel (auto: PyTorch's own choice). Compiled
    forwards take the kernel chosen while they are traced: the same context every call."""
    if choice == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[choice]))


def load_teacher(
    name: str, device: str = "auto", dtype: str = "auto", compile_mode: str = "auto", attention: str = "auto"
) -> Teacher:
    """Load, freeze and fingerprint the teacher, ready for ``encode``."""
    torch_device = resolve_device(device)
    if attention not in ("auto", "math") and torch_device.type != "cuda":
        raise SaltUsageError(f"teacher.attention {attention} is a CUDA kernel; on {torch_device} use auto or math")
    name = resolve_teacher_name(name)
    model = load_teacher_model(name)
    _check_geometry(model.config, name)
    refuse_nonfinite_weights(model.state_dict().items(), f"teacher {name}")
    model.requires_grad_(False).eval()
    fingerprint = weights_hash(model)
    model.to(torch_device)  # type: ignore[arg-type]  # transformers' decorated .to() loses its self type
    return Teacher(
        model,
        name,
        torch_device,
        resolve_dtype(dtype, torch_device),
        fingerprint,
        resolve_teacher_compile(compile_mode, torch_device),
        attention,
    )
