"""The pipeline schema: one pydantic model per component, loaded from YAML.

A recipe in ``pipelines/*.yaml`` fills these models; CLI flags override single
fields afterwards (``override``). Recipes are read strictly, each problem refused
with one readable line naming the field (:class:`SaltUsageError`, exit 2): an
unknown key, a key given twice in one mapping, an empty file, and a value out of
its field's range. Every number has a range: floats are finite, counts are at
most :data:`MAX_COUNT` (what every library the numbers reach takes), seeds lie in
``0 .. 2**32 - 1`` (:data:`MAX_SEED`), and most fields have tighter bounds below.
The defaults are the production recipe (``pipelines/ssv2.yaml``).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import SaltUsageError, first_line

PIPELINES_DIR = Path(__file__).resolve().parent.parent / "pipelines"
DEFAULT_PIPELINE = "ssv2"

DEFAULT_TEACHER = "MCG-NJU/videomae-huge-finetuned-kinetics"
TINY_TEACHER = "builtin:tiny-videomae"
HUGE_RANDOM_TEACHER = "builtin:videomae-huge-random"  # real size, random weights: benchmarks only

# The value sets that more than one module checks, spelt once; elsewhere read them with
# ``typing.get_args`` (e.g. ``get_args(MaskKind)``) rather than copying the strings.
DeviceName = Literal["auto", "cpu", "cuda"]
TeacherCompileMode = Literal["auto", "off", "default", "max-autotune"]
TeacherAttention = Literal["auto", "cudnn", "flash", "efficient", "math"]  # the teacher's SDPA kernel
SamplingRule = Literal["segment-jitter", "segment-center"]
Interpolation = Literal["bicubic", "bilinear", "area"]
SnapshotMode = Literal["auto", "reflink", "copy", "none"]
MaskKind = Literal["multiblock", "random", "tube"]
ModelMode = Literal["salt", "mask-token"]
LossKind = Literal["mse", "l1"]
AttentionKernel = Literal["auto", "flash", "cudnn", "efficient", "math"]


# The largest count (steps, rows, sizes) a recipe may give: an int32 everywhere. For a field without a
# tighter bound of its own (one `le` per field: pydantic keeps only the last of two).
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**32 - 1  # seeds: 0 .. 2**32 - 1, numpy's and torch's common range
Count = Annotated[int, Field(le=MAX_COUNT)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Section(BaseModel):
    # Unknown keys are typos in a recipe: refuse them rather than ignore them. No float is inf or nan.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TeacherConfig(_Section):
    name: str = Field(DEFAULT_TEACHER, description="hub id, local save_pretrained dir, or builtin:tiny-videomae")
    # auto: float32 on CPU, float16 autocast on CUDA (closest to fp32, see EXPERIMENTS.md).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: Count = Field(16, gt=0, description="clips per teacher forward (any size: batches span shards)")
    # auto: torch.compile's default mode on CUDA, off on CPU (shared/teacher.py).
    compile_mode: TeacherCompileMode = "auto"
    # auto: PyTorch picks per call; cudnn, flash, efficient: that kernel only (CUDA); math: the reference.
    attention: TeacherAttention = "auto"


class ViewConfig(_Section):
    """How a clip becomes the 16x224x224 view (geometry itself is fixed by contract)."""

    sampling: SamplingRule = "segment-jitter"
    interpolation: Interpolation = "bicubic"
    # 1: one view per clip, today's (centre crop). K >= 2: K rows per clip, view 0 that same centre view,
    # views 1..K-1 random resized crops with their own frame offsets (salt_cache/views.py).
    # Validation and test stores always keep the one centre view.
    views_per_clip: int = Field(1, gt=0, le=64, description="views cached per clip (store rows = clips x K)")


class StoreConfig(_Section):
    shard_rows: int = Field(16, gt=0, le=4096, description="rows per shard file")
    pixels_zstd_level: int = Field(1, ge=0, le=22, description="0 stores pixels uncompressed")
    writers: int = Field(4, gt=0, le=64, description="threads committing shards during a build")


class _LoaderSettings(_Section):
    """The DataLoader knobs both stages have (each stage has its own section: their workers do different work)."""

    num_workers: int = Field(
        8, ge=0, le=1024, description="worker processes (per rank under torchrun); 0 = in the main one"
    )
    prefetch_factor: int = Field(2, gt=0, le=1024, description="batches each worker prepares ahead")
    pin_memory: bool = Field(True, description="page-locked batches for faster host-to-GPU copies (CUDA only)")
    multiprocessing_context: Literal["forkserver", "spawn", "fork"] = "forkserver"


class BuildLoaderConfig(_LoaderSettings):
    """`salt-cache build`'s workers: each decodes whole teacher batches of clips with PyAV."""

    # auto: salt_cache.loader.decode_workers (the cores this process may use, less two for the main thread
    # and the shard writers, shared by the node's ranks). A fixed 8 left half of a 16-core GPU box idle.
    # A wider type than _LoaderSettings' int on purpose (nothing reads num_workers through the base class).
    num_workers: Annotated[int, Field(ge=0, le=1024)] | Literal["auto"] = Field(  # type: ignore[assignment]
        "auto", description="decode processes per rank; 0 = in the main one; auto = the usable cores less 2"
    )

    persistent_workers: bool = True
    decode_threads: int = Field(
        1, ge=0, le=1024, description="FFmpeg threads per decoding process; 0 = FFmpeg's choice"
    )


class TrainLoaderConfig(_LoaderSettings):
    """`salt-train`'s workers: each reads store rows and draws the batch's masks (salt_train/data.py).
    One iterator spans the whole run, so there is no persistent_workers to set."""

    # A read that never returns (a hung NFS mount or NVMe) must not hang the run: past this, it stops with a
    # checkpoint of the last whole step (salt_train/workers.py). Worker start and the first batch count too.
    stall_timeout_s: float = Field(
        300.0,
        gt=0,
        description="seconds without a batch from the workers before the run stops (exit 1, checkpoint written)",
    )


class CacheConfig(_Section):
    """`salt-cache build` settings."""

    split: Literal["train", "validation", "test"] = "train"
    limit: Count | None = Field(None, gt=0, description="first N clips of the split only")
    device: DeviceName = "auto"


class ScheduleConfig(_Section):
    """The optimisation schedule, one piece for both stages: ``train``'s (the student) and ``teacher_train``'s
    (salt-train teacher, whose schedule replaces ``train``'s for its run)."""

    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup_steps: Count = Field(300, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: Count = Field(32, gt=0)
    epochs: Count = Field(10, gt=0)
    max_steps: Count | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _floor_below_peak(self) -> ScheduleConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class TrainConfig(ScheduleConfig):
    """Optimisation schedule (docs/DESIGN.md seed hyperparameters) and the run's seed, device, checkpoints and logs."""

    grad_clip: float = Field(1.0, gt=0)
    seed: Seed = Field(0, description=f"0 to {MAX_SEED}: data order, masks and initialisation")
    device: DeviceName = "auto"
    checkpoint_every: Count = Field(500, gt=0, description="steps between checkpoints (one is also written at the end)")
    keep_checkpoints: Count = Field(3, gt=0, description="newest checkpoints kept in the run folder")
    log_every: Count = Field(20, gt=0, description="steps between health lines and metrics records")
    record_rows: bool = Field(False, description="write rows.jsonl: every step's row ids, per rank (data provenance)")
    eval_every: Count | None = Field(
        None,
        gt=0,
        description="steps between quick evaluations (held-out loss and "
        "linear probe on eval.quick_rows of eval.val_cache) written to metrics.jsonl",
    )
    max_nonfinite_steps: Count = Field(
        10, ge=0, description="steps skipped for a non-finite loss or gradient before the run stops"
    )


class StreamConfig(_Section):
    """How `salt-train` reads the store: snapshot, shuffling and tolerance of bad rows."""

    # auto: reflink where the filesystem clones, else read the live store (warned, manifest recorded).
    snapshot: SnapshotMode = "auto"
    # Row ids in the shuffle window. Ids only: the loader holds no row data for it, so a
    # large window costs no memory, only read locality (rows come from ~window/shard_rows shards).
    shuffle_buffer: Count = Field(4096, gt=0)
    verify_checksums: bool = Field(
        True,
        description="check each row's crc32c checksum on read (~1 ms per 4 MB "
        "row): a damaged row is skipped, never trained on",
    )
    max_errors: Count = Field(20, ge=0, description="unreadable batches tolerated before the run stops")


class MaskConfig(_Section):
    kind: MaskKind = "multiblock"
    ratio: float = Field(
        0.75,
        gt=0,
        lt=1,
        description="share of tokens masked by random and tube; multiblock's "
        "counts come from its blocks (salt_train/masks.py)",
    )


def _heads_divide(section: BaseModel, width: str, heads: str) -> None:
    """Attention needs whole heads: ``width`` a multiple of ``heads`` (both fields of ``section``)."""
    if getattr(section, width) % getattr(section, heads):
        raise ValueError(f"{width} {getattr(section, width)} is not divisible by {heads} {getattr(section, heads)}")


class ModelConfig(_Section):
    """The student and its predictor."""

    student: str = "vit_base_patch16_224"
    # Extra timm.create_model arguments, e.g. {depth: 2, embed_dim: 64, num_heads: 2} for tests.
    student_kwargs: dict[str, int | float | bool | str] = Field(default_factory=dict)
    # A local 2D timm checkpoint (.safetensors) whose patch embedding is inflated to the tubelet.
    pretrained: str | None = None
    mode: ModelMode = "salt"
    predictor_width: Count = Field(384, gt=0)
    predictor_depth: Count = Field(12, gt=0)
    predictor_heads: Count = Field(12, gt=0)
    loss: LossKind = "l1"  # V-JEPA's; kept by measurement (EXPERIMENTS.md, issue 18: mse no better beyond the interval)
    # auto: max-autotune on CUDA, off on CPU (inductor's CPU kernels gain little and compile for minutes).
    compile_mode: Literal["auto", "off", "default", "reduce-overhead", "max-autotune"] = "auto"
    grad_checkpointing: bool = False
    # Attention kernel (salt_train/attention.py): auto prefers cuDNN attention on Hopper.
    attention: AttentionKernel = "auto"
    # What the targets are: the teacher latents layer-normed per token (layer), or first standardised
    # per channel with the store's statistics, recorded in the run folder (channel: tames outlier
    # channels that would dominate the per-token norm; `salt-cache stats` says whether a store has them).
    target_norm: Literal["layer", "channel"] = "layer"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        _heads_divide(self, "predictor_width", "predictor_heads")
        return self


TeacherSize = Literal["tiny", "small", "base", "large", "huge"]


class TeacherTrainConfig(ScheduleConfig):
    """`salt-train teacher` (SALT's stage 1): a VideoMAE-shaped ViT trained by masked pixel reconstruction.

    The encoder is a transformers ``VideoMAEModel`` of ``size`` (ViT-Ti/S/B/L/H widths and depths; ``width``,
    ``depth`` and ``heads`` override the preset), so its export loads as ``salt-cache build --teacher FOLDER``.
    The schedule fields replace ``train``'s for a teacher run (seed, device, checkpoints and logs stay
    ``train``'s); masks are ``mask``'s."""

    size: TeacherSize = "large"
    width: Count | None = Field(None, gt=0, description="hidden size, overriding the preset's")
    depth: Count | None = Field(None, gt=0, description="encoder blocks, overriding the preset's")
    heads: Count | None = Field(None, gt=0, description="attention heads, overriding the preset's")
    mlp_ratio: float = Field(4.0, gt=0)
    final_norm: bool = Field(
        True,
        description="apply the encoder's final LayerNorm to every token (VideoMAE "
        "pretraining's; saved as use_mean_pooling: false) or leave the raw residual stream",
    )
    norm_pix_loss: bool = Field(
        True,
        description="targets: each tubelet's pixels normalised per patch and channel "
        "(VideoMAE's default), or the ImageNet-normalised pixels (VideoMAE's option; near-flat "
        "synthetic clips, whose per-patch std is mostly codec noise, learn more from these)",
    )
    norm_pix_eps: float = Field(
        1e-6,
        gt=0,
        le=1,
        description="added to each tubelet channel's std (pixels in [0, 1]) before dividing, with norm_pix_loss "
        "(VideoMAE's 1e-6); larger (e.g. 0.05) keeps near-flat tubelets, whose std is codec noise, near zero",
    )
    decoder_width: Count = Field(384, gt=0, description="the light pixel decoder (VideoMAE's: 384 wide, 4 blocks)")
    decoder_depth: Count = Field(4, gt=0)
    decoder_heads: Count = Field(6, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> TeacherTrainConfig:
        _heads_divide(self, "decoder_width", "decoder_heads")
        return self


class VjepaEvalConfig(_Section):
    """`salt-train eval --protocol vjepa`: V-JEPA's frozen SSv2 evaluation (configs/evals/vitl16_ssv2_16x2x3.yaml
    in facebookresearch/jepa), clips decoded from the stores' recorded source videos every epoch."""

    frames_per_clip: int = Field(16, ge=2, le=16, description="frames of each clip (even: whole tubelets)")
    frame_step: int = Field(4, ge=1, le=64, description="source frames between a clip's frames")
    clips: int = Field(2, ge=1, le=8, description="clips (temporal segments) per video; the probe attends across them")
    spatial_views: int = Field(3, ge=1, le=8, description="validation crops along the long side, softmax averaged")
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(256, ge=1, le=65_536, description="global batch (all ranks, all accumulated micro-batches)")
    micro_batch_size: int = Field(
        16, ge=1, le=4096, description="videos per encoder forward on one rank; gradients accumulate to batch_size"
    )
    lr: float = Field(1e-3, gt=0, description="cosine from lr to final_lr over every step, no warmup")
    final_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay of weights; biases and 1-D tensors take none")
    final_weight_decay: float = Field(1e-6, ge=0, description="cosine from weight_decay to this (V-JEPA's default)")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip, as V-JEPA's probe training")
    crop_scale_min: float = Field(0.08, gt=0, le=1, description="random resized crop: least share of the area")
    crop_scale_max: float = Field(1.0, gt=0, le=1)
    crop_ratio_min: float = Field(0.75, gt=0, le=10, description="random resized crop: aspect ratio w/h range")
    crop_ratio_max: float = Field(4 / 3, gt=0, le=10)
    randaugment: str | None = Field(
        "rand-m7-n4-mstd0.5-inc1",
        description="timm RandAugment policy, the same draw for every frame of a clip (V-JEPA's); null: none",
    )
    erase_prob: float = Field(0.25, ge=0, le=1, description="random erasing (one box per clip, per-pixel noise)")
    train_clips: Count | None = Field(None, gt=0, description="a seeded subset of the train split; null: all of it")
    val_clips: Count | None = Field(None, gt=0, description="a seeded subset of the validation split; null: all")
    num_workers: int = Field(8, ge=0, le=1024, description="decoding processes per rank")
    seed: Seed = Field(0, description="clip subsets, clip positions, augmentation, probe initialisation, order")

    @model_validator(mode="after")
    def _ranges(self) -> VjepaEvalConfig:
        if self.frames_per_clip % 2:
            raise ValueError(
                f"eval.vjepa.frames_per_clip {self.frames_per_clip} is odd: the encoder takes whole "
                "tubelets of 2 frames"
            )
        if self.crop_scale_min > self.crop_scale_max or self.crop_ratio_min > self.crop_ratio_max:
            raise ValueError("eval.vjepa: crop_scale_min/crop_ratio_min must not exceed their max")
        return self


class EvalConfig(_Section):
    """`salt-train eval`: which rows the probes see, and how the probes train (V-JEPA's attentive probe recipe)."""

    train_rows: Count = Field(2000, gt=0, description="train-store rows the probes learn on (seeded choice)")
    val_rows: Count = Field(1000, gt=0, description="validation-store rows the probes are scored on (seeded choice)")
    temporal_rows: Count | None = Field(
        None,
        gt=0,
        description="of those, rows that also get the 6 temporal variants (each a full encoder forward); null: all",
    )
    seed: Seed = Field(
        0, description="0 to 2**32 - 1: row choice, held-out masks, probe initialisation and batch order"
    )
    batch_size: Count = Field(32, gt=0, description="clips per encoder forward while extracting features")
    probe_epochs: Count = Field(20, gt=0, description="attentive probe epochs")
    probe_lr: float = Field(1e-3, gt=0)
    probe_weight_decay: float = Field(0.01, ge=0)
    probe_batch_size: Count = Field(64, gt=0)
    probe_pool: Literal[1, 2, 7] = Field(
        1,
        description="spatial mean pooling of the tokens before the attentive "
        "probe: 1 is V-JEPA's (all 1568 tokens); 2 costs 4x less (CPU demos)",
    )
    probe_seeds: int = Field(
        3,
        gt=0,
        le=10,
        description="every probe is trained with seeds eval.seed, +1, ...: "
        "the table shows their mean (rows and masks stay those of eval.seed)",
    )
    linear_iterations: Count = Field(
        300,
        gt=0,
        description="L-BFGS iterations of the linear and temporal probes "
        "(logistic regression on standardised features)",
    )
    linear_l2: float = Field(1e-3, ge=0, description="their L2 penalty on the weights")
    feature_memory_gb: float = Field(
        16.0,
        gt=0,
        description="tokens of one model held in memory up to this; beyond it they go to a Zarr array under eval/",
    )
    val_cache: str | None = Field(None, description="validation store for `salt-train eval` and train.eval_every")
    quick_rows: Count = Field(64, gt=0, description="validation rows of the quick evaluation during training")
    vjepa: VjepaEvalConfig = VjepaEvalConfig()
    few_frames: list[int] = Field(
        default_factory=list,
        description="input frame counts (even, 2 to 14) of the "
        "few-frame rows: the SSv2 attentive probe and the temporal probes on T frames of "
        "each clip (salt_train/eval/frames.py); []: none (each T costs about T/16 of the "
        "16-frame extraction)",
    )
    latency_repeats: int = Field(
        10,
        ge=0,
        le=1000,
        description="timed forwards of one clip per frame count "
        "(2, 4, 8, 16) for the encoder's latency, after 2 warm-up ones; 0: not measured",
    )

    @model_validator(mode="after")
    def _check_few_frames(self) -> EvalConfig:
        bad = [t for t in self.few_frames if not (2 <= t < 16 and t % 2 == 0)]
        if bad:
            raise ValueError(
                f"few_frames: {bad[0]} is not an even frame count from 2 to 14 (whole tubelets of 2, "
                "fewer than the 16 of the main rows)"
            )
        if len(set(self.few_frames)) != len(self.few_frames):
            raise ValueError(f"few_frames: {self.few_frames} names a frame count twice")
        return self


class PipelineConfig(_Section):
    name: str = DEFAULT_PIPELINE
    teacher: TeacherConfig = TeacherConfig()
    view: ViewConfig = ViewConfig()
    store: StoreConfig = StoreConfig()
    build_loader: BuildLoaderConfig = BuildLoaderConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    train_loader: TrainLoaderConfig = TrainLoaderConfig()
    stream: StreamConfig = StreamConfig()
    mask: MaskConfig = MaskConfig()
    model: ModelConfig = ModelConfig()
    eval: EvalConfig = EvalConfig()
    teacher_train: TeacherTrainConfig = TeacherTrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _refuse_shared_loader(cls, data: Any) -> Any:
        if isinstance(data, dict) and "loader" in data:
            raise ValueError(
                "loader is the old name of build_loader and train_loader (salt-cache build's and "
                "salt-train's loader settings): rename it to those (e.g. train_loader.num_workers)"
            )
        return data


def describe_validation_error(err: ValidationError, source: str, from_flags: AbstractSet[str] = frozenset()) -> str:
    """All of a pydantic error's problems on one line: ``source: a.b: msg; c: msg``."""
    parts = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if not problem["loc"] and problem["type"] == "value_error":  # a whole-recipe check: its own words
            parts.append(str(problem["ctx"]["error"]))
            continue
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        if where in from_flags:
            where += " (from the command line)"
        parts.append(f"{where}: {message}")
    return f"{source}: " + "; ".join(parts)


def resolve_pipeline_path(pipeline: str | Path | None) -> Path | None:
    """A recipe file, or a bare name from ``pipelines/`` (``demo`` -> ``pipelines/demo.yaml``)."""
    if pipeline is None:
        default = PIPELINES_DIR / f"{DEFAULT_PIPELINE}.yaml"
        return default if default.is_file() else None
    path = Path(pipeline)
    if path.is_file():
        return path
    named = PIPELINES_DIR / f"{pipeline}.yaml"
    if named.is_file():
        return named
    if path.exists():
        raise SaltUsageError(f"pipeline {path} is not a file")
    raise SaltUsageError(f"pipeline {pipeline} not found (a YAML file, or a name in {PIPELINES_DIR})")


def read_recipe_yaml(text: str, source: str) -> dict[str, Any]:
    """A recipe's YAML as a mapping of sections, read strictly: a key twice in one mapping (PyYAML would
    keep the last silently, a whole section replaced), an empty file (it would mean the production
    defaults without a word) and a top level that is no mapping are refused in one line."""
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
        if document is not None:
            _refuse_duplicate_keys(document, source)
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SaltUsageError(f"{source}: cannot read YAML ({first_line(exc)})") from None
    if loaded is None:
        raise SaltUsageError(
            f"{source} is empty: a recipe sets its sections (see pipelines/demo.yaml); "
            f"for the production recipe pass --pipeline {DEFAULT_PIPELINE}"
        )
    if not isinstance(loaded, dict):
        raise SaltUsageError(f"{source}: top level must be a mapping of sections")
    return loaded


def _refuse_duplicate_keys(node: yaml.Node, source: str, where: str = "") -> None:
    """Walk the composed document; a mapping key given twice is named with its dotted path and lines."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            path = f"{where}.{key}" if where else str(key)
            if key is not None and key != "<<":  # a merge key is YAML's own way to combine mappings
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise SaltUsageError(
                        f"{source}: {path} is given twice (lines {seen[key]} and {line}); "
                        "the second would silently replace the first: keep one"
                    )
                seen[key] = line
            _refuse_duplicate_keys(value_node, source, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, source, f"{where}[{index}]")


def load_pipeline(pipeline: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a recipe and apply dotted overrides such as ``{"teacher.batch_size": 4}``.

    ``None`` values in ``overrides`` mean "flag not given" and are ignored.
    """
    path = resolve_pipeline_path(pipeline)
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        source = f"pipeline {path}"
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SaltUsageError(f"{source}: cannot read YAML ({first_line(exc)})") from None
        raw = read_recipe_yaml(text, source)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    for dotted, value in given.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise SaltUsageError(f"{source}: {key} must be a mapping")
            node = child
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise SaltUsageError(describe_validation_error(err, source, set(given))) from None


def dump_pipeline(config: PipelineConfig) -> str:
    """The resolved recipe as YAML, for run folders and store attributes."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
