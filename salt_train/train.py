"""`salt-train run`: the training loop, read top to bottom.

setup (store, snapshot, stream, model, optimizer, checkpoint) -> one loop of
steps (masks, forward, masked loss, backward, clip, step) -> checkpoints,
health lines and metrics along the way -> final checkpoint, encoder export and
summary. Everything a resumed run needs is in the checkpoint; data order, masks
and learning rate are pure functions of the seed, epoch and step.

The loop (:func:`_loop`) delegates: :class:`~salt_train.batches.AgreedBatches` yields
the batches every rank steps on, :class:`~salt_train.step.Stepper` takes the step,
:class:`~salt_train.metrics.Metrics` reports and :class:`~salt_train.run_checks.Checkpoints`
writes checkpoints, with the checks around them. This module keeps the setup, the signals and a lost
peer's last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import signal
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from shared.config import PipelineConfig
from shared.console import print_block
from shared.device import resolve_device
from shared.distributed import Dist, backend_for, distributed, is_lost_peer, warn_if_oversubscribed
from shared.errors import SaltUsageError, first_line
from shared.filesystem import write_json_atomic
from shared.latent_stats import LatentStats
from shared.store import LatentStore

from salt_train import checkpoint as ckpt
from salt_train import run_folder
from salt_train.batches import AgreedBatches
from salt_train.checkpoint import Checkpointer, TrainingStopped
from salt_train.data import check_shm, check_stream, make_loader, stream_spec
from salt_train.eval.quick import QuickEval
from salt_train.feed import BatchFeed
from salt_train.metrics import HealthWindow, Metrics, print_diagnostics
from salt_train.model import SaltStudent
from salt_train.resume import changed_settings, resumed_config
from salt_train.run_checks import Checkpoints, LiveStoreWatch, SkippedSteps, check_replicas
from salt_train.snapshot import Snapshot, reading_snapshot, reuse_snapshot, take_snapshot
from salt_train.state import Position, TrainState
from salt_train.step import Stepper
from salt_train.target_norm import LAYER_NORM, recorded_stats, training_target_norm
from salt_train.task import STUDENT, TASKS, Task
from salt_train.workers import interrupt_wait

if TYPE_CHECKING:
    from salt_train.pixel_teacher import PixelTeacher

log = logging.getLogger(__name__)

EXIT_STOPPED = 130  # interrupted by SIGINT, checkpoint written (SIGTERM: 143, the 128 + signal convention)


@dataclass
class RunRequest:
    """What the user asked for on the command line."""

    cache: Path
    config: PipelineConfig  # a new run's recipe; a resumed run continues with the one it recorded
    run_dir: Path | None = None
    resume: bool = False
    max_steps: int | None = None  # the one setting a resume may change beyond resume.py's list
    task: Task = STUDENT  # salt-train run; TEACHER: salt-train teacher (SALT's stage 1)
    # --set (and --device, --snapshot) as given: a resume applies those resume.py allows to its recorded recipe
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass
class RunReport:
    run_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    loader_errors: int
    interrupted: bool = False
    export: Path | None = None
    stop_signal: int | None = None  # the signal that stopped the run (the exit code is 128 + it)


def total_steps(config: PipelineConfig, steps_per_epoch: int) -> int:
    planned = config.train.epochs * steps_per_epoch
    return min(planned, config.train.max_steps) if config.train.max_steps else planned


class StopSignals:
    """SIGINT/SIGTERM finish the current step, write a checkpoint and exit: a preempted job loses nothing.
    Within ``workers.STOP_BOUND_S`` (30 s) whatever the loader workers do: a wait for a batch ends at
    the signal, and workers stuck in a read are ended after the checkpoint.

    Alone, a second signal stops at once. Under torchrun it does not: Ctrl-C reaches each rank
    twice (from the terminal and from torchrun), and torchrun itself kills ranks that outlive
    its shutdown timeout (30 s)."""

    def __init__(self, repeat_aborts: bool = True) -> None:
        self.received: int | None = None
        self.repeat_aborts = repeat_aborts
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (tests calling in-process from a thread)
                pass
        try:
            # torch's SIGCHLD handler raises a dead worker's error wherever the main process is, mid-step or
            # mid-checkpoint; without it the error comes out of next(loader), between two whole steps.
            self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        except ValueError:
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second Ctrl-C: stop now
            if self.repeat_aborts:
                raise KeyboardInterrupt
            return
        self.received = signum
        log.warning(
            "%s received: stopping after this step and writing a checkpoint%s",
            signal.Signals(signum).name,
            " (again to stop at once)" if self.repeat_aborts else "",
        )
        interrupt_wait()  # waiting for a batch (a worker stuck in a read, say): stop waiting now

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_training(request: RunRequest) -> RunReport:
    """Train (or resume) one run; under torchrun, one rank of a DistributedDataParallel job."""
    config, run_dir = _run_config(request)
    device = resolve_device(config.train.device, "train.device")
    with distributed(backend_for(device)) as dist:
        return _run(request, config, run_dir, dist.device(device), dist)


def _run_config(request: RunRequest) -> tuple[PipelineConfig, Path | None]:
    """The recipe and run folder: a resumed run continues with the config it recorded."""
    config, run_dir = request.task.run_config(request.config), request.run_dir
    if request.resume:
        if run_dir is None:
            run_dir = run_folder.find_latest_run(request.cache)
            if run_dir is None:
                raise SaltUsageError(
                    f"--resume: no run of {request.cache} under {run_folder.DEFAULT_RUNS_DIR}/ (pass --run-dir)"
                )
            log.info("resuming the latest run of this cache: %s", run_dir)
        check_run_task(run_dir, request.task)
        config = resumed_config(run_folder.read_run_config(run_dir), request.overrides)
    if request.max_steps is not None:
        config.train.max_steps = request.max_steps
    return config, run_dir


def _run(
    request: RunRequest, config: PipelineConfig, run_dir: Path | None, device: torch.device, dist: Dist
) -> RunReport:
    # ---- the store and the model: refuse bad input before anything is written ----------
    dist.agree(lambda: check_quick_eval(config))
    # read once, before anything is printed: a resume that lost them is refused here
    recorded = dist.agree(lambda: recorded_stats(config.model.target_norm, run_dir, request.resume))
    task = request.task
    live = dist.agree(lambda: LatentStore.open(request.cache).checked())
    dist.agree(lambda: task.check_store(live))
    live_spec = stream_spec(live, config, Position(), dist.rank, dist.world_size)  # for these checks only
    dist.agree(lambda: check_stream(live_spec, live.path))
    dist.agree(
        lambda: check_shm(
            config.train_loader, live_spec.local_batch, task.latent_width(live), processes=dist.local_world_size
        )
    )
    student = dist.agree(lambda: task.build_model(config, task.latent_width(live)))  # stepped once the snapshot
    # gives the step total; "student" is the model this run trains (the teacher, for salt-train teacher)
    warn_if_oversubscribed(dist, config.train_loader.num_workers, "train_loader.num_workers")

    # ---- run folder and snapshot: rank 0 makes them, every rank reads them --------------
    writer = ExitStack()  # rank 0 is the run folder's one writer until the run ends (run_folder.writing)

    def make_run_dir() -> Path:
        path = run_dir or run_folder.new_run_dir(config)
        writer.enter_context(run_folder.writing(path, None if request.resume else config))
        return path

    with writer:
        run_dir = dist.on_main(make_run_dir)
        log_handler = run_folder.attach_log_file(run_dir / "train.log") if dist.is_main else None
        try:
            snapshot_record = dist.on_main(
                lambda: _snapshot_for(request, config, run_dir, live, device, dist).to_record()
            )
            snapshot = dist.agree(lambda: _visible_snapshot(snapshot_record))
            with reading_snapshot(snapshot):  # `salt-train snapshots prune` leaves it alone meanwhile
                return _train(config, run_dir, snapshot, student, request.resume, device, dist, task, recorded)
        finally:
            if log_handler is not None:
                run_folder.detach_log_file(log_handler)


def _snapshot_for(
    request: RunRequest, config: PipelineConfig, run_dir: Path, live: LatentStore, device: torch.device, dist: Dist
) -> Snapshot:
    """Rank 0: the snapshot a resumed run recorded, or a new one, recorded in run.json (taken once per run).

    A run stopped before it recorded its snapshot takes it again in the mode its config.yaml recorded
    (``--snapshot`` as given, never silently another): a copy it left half-made is removed first, and
    one it finished is used (snapshot.py)."""
    record = run_folder.read_run_record(run_dir) if request.resume and (run_dir / "run.json").exists() else None
    resumed_with = changed_settings(request.overrides) if request.resume else {}
    if resumed_with:  # what this resume changed is what later resumes continue with
        run_folder.rewrite_run_config(run_dir, config)
    if record is not None and "snapshot" in record:
        if Path(record["cache"]).resolve() != live.path.resolve():
            raise SaltUsageError(
                f"{run_dir} trained on {record['cache']}, not {live.path}: resume it with its own --cache"
            )
        snapshot = reuse_snapshot(record["snapshot"])
        run_folder.write_run_record(
            run_dir, world_size=dist.world_size, **({"set": resumed_with} if resumed_with else {})
        )
        return snapshot
    # A new run, or one stopped before it recorded its snapshot.
    snapshot = take_snapshot(live.path, run_dir.name, config.stream.snapshot, owner=run_dir)
    run_folder.write_run_record(
        run_dir,
        cache=str(live.path.resolve()),
        snapshot=snapshot.to_record(),
        device=str(device),
        world_size=dist.world_size,
        task=request.task.name,
        store={
            "identity": live.attrs.get("identity"),
            "teacher": live.attrs.get("teacher"),
            "counts": live.counts(),
            "rows_sha256": live.attrs.get("source_rows"),
        },
    )
    return snapshot


def _visible_snapshot(record: dict) -> Snapshot:
    """Rank 0's snapshot as this rank sees it: on several nodes the store and the run folder
    must be on a filesystem every node mounts at the same path."""
    snapshot = Snapshot.from_record(record)
    if not snapshot.path.is_dir():
        raise SaltUsageError(
            f"the snapshot {snapshot.path} rank 0 made is not visible here: put the store and "
            "the run folder on a filesystem every node mounts at the same path"
        )
    return snapshot


def _train(
    config: PipelineConfig,
    run_dir: Path,
    snapshot: Snapshot,
    student: SaltStudent | PixelTeacher,
    resume: bool,
    device: torch.device,
    dist: Dist,
    task: Task = STUDENT,
    recorded: LatentStats | None = None,
) -> RunReport:
    """Set up on the snapshot, step on every batch the ranks agree on, then the last checkpoint and summary."""
    store = LatentStore.open(snapshot.path).checked()  # from here on, only the snapshot is read
    # starts where a resume says, below
    spec = stream_spec(store, config, Position(), dist.rank, dist.world_size, arrays=task.arrays)
    dist.agree(lambda: check_stream(spec, store.path))
    steps = total_steps(config, spec.steps_per_epoch)
    width = task.latent_width(store)
    # The target statistics block comes first: the objective is built with the run's normalisation.
    target_norm = (
        dist.on_main(
            lambda: training_target_norm(config.model.target_norm, config.train.seed, run_dir, store, recorded)
        )
        if task == STUDENT
        else LAYER_NORM
    )
    stepper = Stepper(
        student,
        config.train,
        config.model,
        device,
        steps,
        dist,
        objective=task.objective(student, config),
        target_norm=target_norm,
    )
    model = stepper.model
    state = (
        _resume_state(run_dir, model, stepper.optimizer, (spec.epochs, spec.steps_per_epoch), dist)
        if resume
        else TrainState(0, Position())
    )
    spec = dataclasses.replace(spec, start=state.position)
    settings = config.train_loader
    loader = make_loader(spec, settings, pin_memory=settings.pin_memory and device.type == "cuda", ring=True)
    flops = task.flops(config, width)
    print_diagnostics(
        config, device, run_dir, snapshot, store, spec, steps, model, flops, dist, task.describe(config, model)
    )
    quick_eval = dist.agree(
        lambda: (
            QuickEval(config.eval, config.mask, config.model.loss, store, device, run_dir / "eval", target_norm)
            if config.train.eval_every and dist.is_main
            else None
        )
    )
    checkpointer = Checkpointer(run_dir, model, stepper.optimizer, state, config.train.keep_checkpoints, dist)
    skipped = SkippedSteps(HealthWindow(), state, config.train.max_nonfinite_steps, store, checkpointer, dist)
    checkpoints = Checkpoints(checkpointer, skipped, LiveStoreWatch(snapshot, dist))
    metrics = Metrics(run_dir, config.train, steps, state, quick_eval, device, dist, skipped)  # only rank 0 writes
    stop = StopSignals(repeat_aborts=not dist.enabled)  # entered after the feed starts the workers (SIGCHLD)
    batches = AgreedBatches(
        BatchFeed(loader, device),
        steps,
        spec.steps_per_epoch,
        checkpoints,
        lambda: stop.received is not None,
        metrics.window,
        run_dir,
        dist,
        stall_timeout_s=config.train_loader.stall_timeout_s,
        max_errors=config.stream.max_errors,
        record_rows=config.train.record_rows,
    )
    del loader  # the feed keeps the workers' iterator: closing it stops them
    with stop:  # to the end: a second SIGTERM while the last checkpoint is written must not kill it half-way
        try:
            _loop(stepper, batches, metrics, checkpoints, steps, config.train.checkpoint_every, dist)
            # The last whole step's checkpoint first: ending workers stuck in a read may take a while.
            final = checkpoints.save(last_step=True)
        finally:
            batches.close()  # ends the workers within seconds, whatever they are doing (workers.py)
            metrics.close()
        return _finish(config, steps, batches, metrics, checkpoints, final, stop.received, task)


def _loop(
    stepper: Stepper,
    batches: AgreedBatches,
    metrics: Metrics,
    checkpoints: Checkpoints,
    steps: int,
    checkpoint_every: int,
    dist: Dist,
) -> None:
    """One optimizer step per agreed batch; health lines, quick evals and checkpoints along the way."""
    state = checkpoints.checkpointer.state
    try:
        for batch, following in batches:
            result = stepper.step(batch, state.step)  # masks, forward, masked loss, backward, clip, AdamW
            state.step += 1
            metrics.add(result, state.step, batch["rows"])
            state.position = following
            state.clips_seen += result.clips * dist.world_size

            if metrics.should_log(state.step):
                metrics.log(state, result.lr)  # stops the run past train.max_nonfinite_steps
            if metrics.should_evaluate(state.step):
                metrics.evaluate(stepper.model, state.step)
            if state.step % checkpoint_every == 0 and state.step < steps:
                checkpoints.save()
    except Exception as exc:
        if not is_lost_peer(exc):
            raise
        # Weights and optimizer are those of state.step (a failed step never reached AdamW),
        # and torchrun's SIGTERM to this rank is held off by StopSignals while rank 0 saves.
        raise LostPeer(
            f"lost contact with another rank at step {state.step} ({type(exc).__name__}); "
            + checkpoints.checkpointer.save_alone()
        ) from None


def _finish(
    config: PipelineConfig,
    steps: int,
    batches: AgreedBatches,
    metrics: Metrics,
    checkpoints: Checkpoints,
    final: Path | None,
    stop_signal: int | None,
    task: Task = STUDENT,
) -> RunReport:
    """After the last checkpoint (``final``): a stopped run says how to continue, a finished one exports and
    sums up."""
    checkpointer, live_store = checkpoints.checkpointer, checkpoints.live_store
    run_dir, snapshot, state, dist = checkpointer.run_dir, live_store.snapshot, checkpointer.state, checkpointer.dist
    main, train = dist.is_main, config.train
    loader_failure = batches.loader_failure
    if dist.enabled:  # a worker that died (or hung) on one rank stopped them all: every rank reports it
        loader_failure = next((reason for reason in dist.all_gather(loader_failure) if reason), None)
    first_loss, last_loss = metrics.first_loss, metrics.last_loss
    report = RunReport(
        run_dir, state.step, first_loss, last_loss, state.loader_errors, batches.interrupted, stop_signal=stop_signal
    )
    resume_hint = (
        f"continue with: {'torchrun ... -m salt_train' if dist.enabled else 'salt-train'} {task.command} "
        f"--cache {shlex.quote(str(snapshot.source))} --run-dir {shlex.quote(str(run_dir))} --resume"
    )
    if loader_failure and stop_signal is None:
        raise TrainingStopped(
            f"{loader_failure}: stopped at step {state.step} of {steps} with checkpoint "
            f"{final.name if final else '(rank 0)'}; {resume_hint}"
        )
    if batches.interrupted:
        if main:
            assert final is not None  # Checkpointer.save gives rank 0 its path
            log.warning(
                "stopped at step %d of %d; checkpoint %s; %s (any number of ranks)",
                state.step,
                steps,
                final.name,
                resume_hint,
            )
        return report
    replicas = check_replicas(checkpointer.model, dist, state.step)
    if main:
        assert final is not None  # Checkpointer.save gives rank 0 its path
        report.export = _export(checkpointer, config, final, resume_hint, task)
        live_store.check(state.step)
        summary = {
            "steps": state.step,
            "planned_steps": steps,
            "clips_seen": state.clips_seen,
            "first_loss": first_loss,
            "last_loss": last_loss,
            "loader_errors": state.loader_errors,
            "live_store_changed": live_store.changed if snapshot.mode == "none" else None,
            "checkpoint": str(final),
            "export": str(report.export),
            "snapshot": str(snapshot.path),
            "world_size": dist.world_size,
            "replicas": replicas,
        }
        write_json_atomic(run_dir / "summary.json", summary)
        loss_line = (
            f"{first_loss:.4f} (first {train.log_every} steps) -> {last_loss:.4f} (last)"
            if first_loss is not None and last_loss is not None
            else "not logged"
        )
        print_block("summary", {"loss": loss_line, **summary, "run folder": str(run_dir)})
    dist.barrier()  # the others exit only once rank 0 has written everything
    return report


def _export(checkpointer: Checkpointer, config: PipelineConfig, final: Path, resume_hint: str, task: Task) -> Path:
    """Rank 0: the encoder export, written whole or not at all (an older one stays); a disk that cannot
    take it is one line: the last checkpoint is intact and a resume writes the export again."""
    out = checkpointer.run_dir / "export"
    try:
        return task.export(checkpointer.model, config, out)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise SaltUsageError(
            f"cannot write the export {out}: {reason}; checkpoint {final.name} is intact: free "
            f"space, then {resume_hint} (it writes the export again)"
        ) from None


def check_run_task(run_dir: Path, task: Task) -> None:
    """Refuse to resume a teacher run with ``salt-train run`` or a student run with ``salt-train teacher``."""
    if not (run_dir / "run.json").exists():
        return  # stopped before it recorded anything: the checkpoints (none) cannot disagree
    recorded = run_folder.read_run_record(run_dir).get("task", "student")  # runs before stage 1 were students
    if recorded != task.name:
        raise SaltUsageError(
            f"{run_dir} is a {recorded} run: resume it with salt-train "
            f"{Task(recorded).command if recorded in TASKS else '...'} --resume"
        )


def check_quick_eval(config: PipelineConfig) -> None:
    if config.train.eval_every and not config.eval.val_cache:
        raise SaltUsageError(
            "train.eval_every needs eval.val_cache: a validation store "
            "(salt-cache build --split validation), e.g. --set eval.val_cache=PATH"
        )


class LostPeer(Exception):
    """Another rank died mid-run; rank 0 wrote what it could."""


def _resume_state(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream: tuple[int, int], dist: Dist
) -> TrainState:
    """Load the run's newest whole checkpoint (the ones rank 0 found, on every rank); none yet is step 0.
    A damaged newest checkpoint (a file whose checksum differs, a state.json that disagrees with its
    folder or with ``stream``, the snapshot's epochs and batches per epoch) is passed over, loudly."""
    candidates = dist.broadcast(ckpt.complete_checkpoints(run_dir))
    if not candidates:
        log.warning("no checkpoint in %s yet: starting this run from step 0", run_dir)
        return TrainState(step=0, position=Position())
    damaged: list[str] = []
    for path in candidates:

        def attempt(path: Path = path) -> TrainState | str:
            try:
                return ckpt.load_checkpoint(path, model, optimizer, stream)
            except ckpt.CheckpointUnreadable as exc:  # damaged: try the one before (a misfit model still raises)
                return str(exc)

        state = dist.agree(attempt)
        (unreadable,) = dist.any_of(isinstance(state, str))
        if unreadable:
            damaged.append(state if isinstance(state, str) else f"checkpoint {path} is unreadable on another rank")
            if dist.is_main:
                log.warning("%s; falling back to the checkpoint before it", damaged[-1])
            continue
        assert not isinstance(state, str)
        log.info(
            "resumed from %s (step %d, epoch %d, batch %d)%s",
            path.name,
            state.step,
            state.position.epoch,
            state.position.index,
            f", not from the {len(damaged)} damaged newer one(s)" if damaged else "",
        )
        return state
    raise SaltUsageError(
        f"every checkpoint of {run_dir} is damaged (newest: {damaged[0]}); start a new run or restore a checkpoint"
    )
