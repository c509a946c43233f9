"""What a run reports while it trains: the startup block, health lines, metrics.jsonl, quick evals.

Per step, :class:`HealthWindow` keeps the loss, gradient norm and skipped-step flag on the
device (no host sync); every ``train.log_every`` steps, and at the last one, :class:`Metrics`
reads them once, prints a health line and appends the record to ``metrics.jsonl`` (rank 0).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as torch_dist

from shared.config import PipelineConfig, TrainConfig
from shared.console import format_bytes, print_block, progress
from shared.distributed import Dist
from shared.store import LatentStore

from salt_train.data import StreamSpec, batch_bytes, shm_bound
from salt_train.masks import describe_masks
from salt_train.run_checks import SkippedSteps
from salt_train.run_folder import MetricsLog
from salt_train.snapshot import Snapshot
from salt_train.state import Position, TrainState
from salt_train.step import StepResult, resolve_compile_mode

if TYPE_CHECKING:
    from salt_train.model import SaltStudent
    from salt_train.pixel_teacher import PixelTeacher

log = logging.getLogger(__name__)


# The quick evaluation, handed in by the loop: the model -> its record (heldout_loss, heldout_r2, ...).
# A callable rather than the evaluation's class, so that training imports nothing of the eval wing here.
Evaluation = Callable[[torch.nn.Module], dict[str, Any]]


class HealthWindow:
    """Accumulates one log interval; values stay on the device until flushed (no sync per step)."""

    def __init__(self) -> None:
        self.unread = []
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.data_wait = 0.0
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.applied: list[torch.Tensor] = []
        self.clips = 0

    unread: list[tuple[int, torch.Tensor, torch.Tensor]]  # (step, rows, applied) not yet read on the host

    def add(self, result: Any, clips: int, step: int, rows: torch.Tensor) -> None:
        """One step's StepResult; ``rows`` (host) are named in the log if the step turns out skipped."""
        applied = (
            result.applied
            if result.applied is not None
            else torch.ones((), dtype=torch.bool, device=result.loss.device)
        )
        self.losses.append(result.loss)
        self.grad_norms.append(result.grad_norm)
        self.applied.append(applied)
        self.unread.append((step, rows, applied))
        self.clips += clips

    def skipped_steps(self, dist: Dist) -> list[tuple[int, list[int]]]:
        """The steps since the last call whose update was skipped, with every rank's rows (one host read)."""
        if not self.unread:
            return []
        flags = torch.stack([applied for _, _, applied in self.unread]).cpu().tolist()
        skipped = [(step, rows.tolist()) for (step, rows, _), ok in zip(self.unread, flags, strict=False) if not ok]
        self.unread = []
        if dist.enabled:  # every rank skipped the same steps (the flag comes from all-reduced gradients)
            skipped = [(step, sorted(sum(dist.all_gather(rows), []))) for step, rows in skipped]
        return skipped

    def flush(self, state: TrainState, lr: float, device: torch.device, dist: Dist) -> dict[str, Any]:
        """The interval's record; the loss is the mean over every rank's samples (all ranks call this)."""
        # Means over the applied steps: a skipped step's NaN would hide every other step's value.
        applied = torch.stack(self.applied) if self.applied else torch.zeros(0, dtype=torch.bool, device=device)
        kept = applied.sum().clamp_min(1)
        loss = (
            torch.where(applied, torch.stack(self.losses).float(), 0.0).sum() / kept
            if self.losses
            else torch.tensor(math.nan, device=device)
        )
        if dist.enabled:
            torch_dist.all_reduce(loss, op=torch_dist.ReduceOp.AVG)  # default group: NCCL on GPUs
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - self.started
        steps = max(1, len(self.losses))
        skipped = int(len(self.applied) - applied.sum()) if self.applied else 0
        record = {
            "step": state.step,
            "epoch": state.position.epoch,
            "loss": float(loss),
            "lr": lr,
            "grad_norm": (
                float(torch.where(applied, torch.stack(self.grad_norms).float(), 0.0).sum() / kept)
                if self.grad_norms
                else math.nan
            ),
            "clips_per_s": self.clips / elapsed if elapsed > 0 else 0.0,
            "data_wait_ms": 1000 * self.data_wait / steps,
            "step_ms": 1000 * (elapsed - self.data_wait) / steps,
            "loader_errors": state.loader_errors,
            "skipped_steps": skipped,
            "gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "time": time.time(),
        }
        self.reset()
        return record


def health_line(record: dict[str, Any]) -> str:
    gpu = f" gpu_mem {record['gpu_mem_gb']:.1f} GB" if record["gpu_mem_gb"] is not None else ""
    return (
        f"step {record['step']} loss {record['loss']:.4f} lr {record['lr']:.2e} "
        f"grad_norm {record['grad_norm']:.3f} "
        f"| {record['clips_per_s']:.1f} clips/s, data wait {record['data_wait_ms']:.1f} ms/step, "
        f"step {record['step_ms']:.1f} ms{gpu} | loader errors {record['loader_errors']}"
        + (f", {record['skipped_steps']} non-finite steps skipped" if record.get("skipped_steps") else "")
    )


class Metrics:
    """The progress bar, the health lines, ``metrics.jsonl`` and the quick evaluations of one run.

    Every rank calls every method (the loss is averaged over the ranks); only rank 0 writes."""

    def __init__(
        self,
        run_dir: Path,
        train: TrainConfig,
        steps: int,
        state: TrainState,
        quick_eval: Evaluation | None,
        device: torch.device,
        dist: Dist,
        skipped: SkippedSteps[HealthWindow],
    ) -> None:
        """``skipped``: the run's skipped-step accounting, over the window whose flags it reads."""
        self.train, self.steps, self.quick_eval, self.device, self.dist = train, steps, quick_eval, device, dist
        self.file = MetricsLog(run_dir / "metrics.jsonl") if dist.is_main else None
        self.bar = progress(total=steps, description="train", unit="step", initial=state.step)
        self.skipped, self.window = skipped, skipped.window
        self.first_loss: float | None = None  # of the first and last health lines, for the summary
        self.last_loss: float | None = None

    def add(self, result: StepResult, step: int, rows: torch.Tensor) -> None:
        """Step ``step`` is done (``rows``: this rank's, named in the log if the step turns out skipped)."""
        self.window.add(result, result.clips * self.dist.world_size, step, rows)
        self.bar.update(1)

    def should_log(self, step: int) -> bool:
        return step % self.train.log_every == 0 or step == self.steps

    def log(self, state: TrainState, lr: float) -> None:
        """The interval's skipped steps accounted (past train.max_nonfinite_steps the run stops here), then
        its health line and metrics record."""
        self.skipped.account()
        record = self.window.flush(state, lr, self.device, self.dist)
        self.first_loss = record["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = record["loss"]
        if self.file is not None:
            self.file.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", clips_s=f"{record['clips_per_s']:.1f}")
        log.info(health_line(record))

    def should_evaluate(self, step: int) -> bool:
        every = self.train.eval_every
        return step % every == 0 if every else False

    def evaluate(self, model: torch.nn.Module, step: int) -> None:
        """Rank 0 runs the quick evaluation and records it in metrics.jsonl; the others wait."""
        if self.quick_eval is not None:
            record = self.quick_eval(model)
            if self.file is not None:
                self.file.write({"step": step, "eval": record, "time": time.time()})
            log.info(
                "eval at step %d: held-out loss %.4f, R^2 %.3f%s",
                step,
                record["heldout_loss"],
                record["heldout_r2"],
                f", linear probe top-1 {100 * record['linear_top1']:.1f}%" if "linear_top1" in record else "",
            )
        self.dist.barrier()

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def print_diagnostics(
    config: PipelineConfig,
    device: torch.device,
    run_dir: Path,
    snapshot: Snapshot,
    store: LatentStore,
    spec: StreamSpec,
    steps: int,
    model: SaltStudent | PixelTeacher,
    flops: dict[str, float],
    dist: Dist,
    task_lines: dict[str, str] | None = None,
) -> None:
    """Rank 0: the block of what this run is about to do, before the first step. ``task_lines``: the lines
    of a run that trains something other than the student (salt-train teacher) replace its student line."""
    if not dist.is_main:
        return
    counts = store.counts()
    parameters = sum(p.numel() for p in model.parameters())
    encoder_parameters = sum(p.numel() for p in model.encoder.parameters())
    loader = config.train_loader
    width = store.teacher_width if "latents" in spec.arrays else 0  # what each batch carries
    student = {
        "teacher": f"{store.attrs.get('teacher', {}).get('name', '?')} (width {store.teacher_width})",
        "student": f"{config.model.student} {dict(config.model.student_kwargs) or ''} mode {config.model.mode}, "
        f"{encoder_parameters / 1e6:.1f}M encoder + "
        f"{(parameters - encoder_parameters) / 1e6:.1f}M predictor/head params",
        "masks": describe_masks(config.mask.kind, config.mask.ratio),
    }
    print_block(
        "salt-train run" if not task_lines else "salt-train teacher",
        {
            "run folder": run_dir,
            "store": f"{snapshot.source} ({counts['committed']} committed, {counts['failed']} failed, "
            f"{counts['pending']} pending rows"
            + (f", {counts['other']} with an unknown status, not trained on" if counts["other"] else "")
            + ")",
            **(
                {
                    "views": f"{spec.views_per_clip} per clip: each epoch reads one view of each of its "
                    f"{spec.clips} clips"
                }
                if spec.views_per_clip > 1
                else {}
            ),
            "snapshot": (
                f"{snapshot.mode}: {snapshot.path} ({snapshot.files} files, {format_bytes(snapshot.bytes)}, "
                f"{snapshot.seconds:.2f} s)"
            )
            if snapshot.mode != "none"
            else f"NONE: reading the live store {snapshot.path} (a change to it is detected, not prevented)",
            **(task_lines or student),
            "device": f"{device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            + f", {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
            f"compile {resolve_compile_mode(config.model.compile_mode, device)}",
            "FLOPs/clip": ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops.items()),
            "schedule": f"{steps} steps ({spec.steps_per_epoch}/epoch x {config.train.epochs} epochs"
            f"{', capped by max_steps' if config.train.max_steps else ''}), batch {config.train.batch_size}, "
            f"lr {config.train.lr} -> {config.train.min_lr}, warmup {config.train.warmup_steps}",
            "loader": f"{loader.num_workers} workers x prefetch {loader.prefetch_factor}, "
            f"stall timeout {loader.stall_timeout_s:g} s, "
            f"{format_bytes(batch_bytes(spec.local_batch, width))}/batch, "
            f"shm bound {format_bytes(shm_bound(loader, spec.local_batch, width))}, "
            f"shuffle window {config.stream.shuffle_buffer} rows, "
            f"checksums {'on' if spec.verify_checksums else 'off'}",
            "start": f"epoch {spec.start.epoch}, batch {spec.start.index}"
            + (" (resumed)" if spec.start != Position() else ""),
            **(
                {
                    "ranks": f"{dist.world_size} (torchrun, {dist.local_world_size} on this node): DDP, "
                    f"{spec.local_batch} clips per rank per step, loader workers per rank"
                }
                if dist.enabled
                else {}
            ),
        },
    )
