"""`salt-train run`: the training loop, read top to bottom.

setup (store, snapshot, stream, model, optimizer, checkpoint) -> one loop of
steps (masks, forward, masked loss, backward, clip, step) -> checkpoints,
health lines and metrics along the way -> final checkpoint, encoder export and
summary. Everything a resumed run needs is in the checkpoint; data order, masks
and learning rate are pure functions of the seed, epoch and step.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as torch_dist

from shared.config import PipelineConfig
from shared.console import format_bytes, print_block, progress
from shared.device import resolve_device
from shared.distributed import Dist, backend_for, distributed, is_lost_peer, warn_if_oversubscribed
from shared.durable import write_json_atomic
from shared.errors import SaltUsageError, one_line
from shared.latent_stats import DEFAULT_ROWS, SUMMARY_ROWS, LatentStats, compute_stats
from shared.store import LatentStore
from salt_train import checkpoint as ckpt
from salt_train import run_folder
from salt_train.data import Position, StreamSpec, batch_bytes, check_shm, check_stream, make_loader, shm_bound, stream_spec
from salt_train.export import export_encoder
from salt_train.feed import BatchFeed
from salt_train.finite import nonfinite_latent_rows, weights_finite
from salt_train.masks import describe_masks, mask_layout
from salt_train.model import student_flops_per_clip
from salt_train.quick_eval import QuickEval
from salt_train.snapshot import Snapshot, check_manifest, reading_snapshot, reuse_snapshot, take_snapshot
from salt_train.step import Stepper, resolve_compile_mode

log = logging.getLogger(__name__)

EXIT_STOPPED = 130  # interrupted by SIGINT, checkpoint written (SIGTERM: 143, the 128 + signal convention)


class TrainingStopped(Exception):
    """The run stopped early on purpose (too many loader errors or non-finite steps, a dead loader
    worker); a checkpoint of the last whole step was written, or the reason says why not."""


@dataclass
class RunRequest:
    """What the user asked for on the command line."""

    cache: Path
    config: PipelineConfig  # a new run's recipe; a resumed run continues with the one it recorded
    run_dir: Path | None = None
    resume: bool = False
    snapshot: str | None = None  # overrides config.stream.snapshot
    max_steps: int | None = None  # the one setting a resume may change


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


def next_position(position: Position, steps_per_epoch: int) -> Position:
    if position.index + 1 >= steps_per_epoch:
        return Position(position.epoch + 1, 0)
    return Position(position.epoch, position.index + 1)


class StopSignals:
    """SIGINT/SIGTERM finish the current step, write a checkpoint and exit: a preempted job loses nothing.

    Alone, a second signal stops at once. Under torchrun it does not: Ctrl-C reaches each rank
    twice (from the terminal and from torchrun), and torchrun itself kills ranks that outlive
    its shutdown timeout (30 s)."""

    def __init__(self, repeat_aborts: bool = True) -> None:
        self.received: int | None = None
        self.repeat_aborts = repeat_aborts
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
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
        log.warning("%s received: stopping after this step and writing a checkpoint%s", signal.Signals(signum).name,
                    " (again to stop at once)" if self.repeat_aborts else "")

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
    config, run_dir = request.config, request.run_dir
    if request.resume:
        if run_dir is None:
            run_dir = run_folder.find_latest_run(request.cache)
            if run_dir is None:
                raise SaltUsageError(f"--resume: no run of {request.cache} under {run_folder.DEFAULT_RUNS_DIR}/ (pass --run-dir)")
            log.info("resuming the latest run of this cache: %s", run_dir)
        config = run_folder.read_run_config(run_dir)
    if request.max_steps is not None:
        config.train.max_steps = request.max_steps
    return config, run_dir


def _run(request: RunRequest, config: PipelineConfig, run_dir: Path | None, device: torch.device,
         dist: Dist) -> RunReport:
    # ---- the store: refuse bad input before anything is written -----------------------
    dist.agree(lambda: check_quick_eval(config))
    dist.agree(lambda: recorded_target_stats(config, run_dir, request.resume))  # before anything is printed
    live = dist.agree(lambda: LatentStore.open(request.cache).checked())
    spec = stream_spec(live, config, Position(), dist.rank, dist.world_size)
    dist.agree(lambda: check_stream(spec, live.path))
    dist.agree(lambda: check_shm(config.train_loader, spec.local_batch, live.teacher_width,
                                 processes=dist.local_world_size))
    stepper = Stepper(config, live.teacher_width, device, total_steps(config, spec.steps_per_epoch), dist)
    warn_if_oversubscribed(dist, config.train_loader.num_workers, "train_loader.num_workers")

    # ---- run folder and snapshot: rank 0 makes them, every rank reads them --------------
    def make_run_dir() -> Path:
        path = run_dir or run_folder.new_run_dir(config)
        if not request.resume:
            run_folder.create_run_dir(path, config)
        return path

    run_dir = dist.on_main(make_run_dir)
    log_handler = run_folder.attach_log_file(run_dir / "train.log") if dist.is_main else None
    try:
        snapshot_record = dist.on_main(lambda: _snapshot_for(request, config, run_dir, live, device, dist).to_record())
        snapshot = dist.agree(lambda: _visible_snapshot(snapshot_record))
        with reading_snapshot(snapshot):  # `salt-train snapshots prune` leaves it alone meanwhile
            return _train(config, run_dir, snapshot, stepper, request.resume, dist)
    finally:
        if log_handler is not None:
            run_folder.detach_log_file(log_handler)


def _snapshot_for(request: RunRequest, config: PipelineConfig, run_dir: Path, live: LatentStore,
                  device: torch.device, dist: Dist) -> Snapshot:
    """Rank 0: the snapshot a resumed run recorded, or a new one, recorded in run.json (taken once per run)."""
    record = run_folder.read_run_record(run_dir) if request.resume and (run_dir / "run.json").exists() else None
    if record is not None and "snapshot" in record:
        if Path(record["cache"]).resolve() != live.path.resolve():
            raise SaltUsageError(f"{run_dir} trained on {record['cache']}, not {live.path}: "
                                 "resume it with its own --cache")
        snapshot = reuse_snapshot(record["snapshot"])
        run_folder.write_run_record(run_dir, world_size=dist.world_size)
        return snapshot
    # A new run, or one stopped before it recorded its snapshot.
    snapshot = take_snapshot(live.path, run_dir.name, request.snapshot or config.stream.snapshot)
    run_folder.write_run_record(
        run_dir, cache=str(live.path.resolve()), snapshot=snapshot.to_record(), device=str(device),
        world_size=dist.world_size,
        store={"identity": live.attrs.get("identity"), "teacher": live.attrs.get("teacher"),
               "counts": live.counts(), "rows_sha256": live.attrs.get("source_rows")},
    )
    return snapshot


def _visible_snapshot(record: dict) -> Snapshot:
    """Rank 0's snapshot as this rank sees it: on several nodes the store and the run folder
    must be on a filesystem every node mounts at the same path."""
    snapshot = Snapshot.from_record(record)
    if not snapshot.path.is_dir():
        raise SaltUsageError(f"the snapshot {snapshot.path} rank 0 made is not visible here: put the store and "
                             "the run folder on a filesystem every node mounts at the same path")
    return snapshot


def _train(config: PipelineConfig, run_dir: Path, snapshot: Snapshot, stepper: Stepper, resume: bool,
           dist: Dist) -> RunReport:
    model, optimizer, device = stepper.model, stepper.optimizer, stepper.device
    store = LatentStore.open(snapshot.path).checked()  # from here on, only the snapshot is read
    state = _resume_state(run_dir, model, optimizer, dist) if resume else ckpt.TrainState(step=0, position=Position())
    spec = stream_spec(store, config, state.position, dist.rank, dist.world_size)
    dist.agree(lambda: check_stream(spec, store.path))
    steps = stepper.total_steps = total_steps(config, spec.steps_per_epoch)
    train = config.train
    layout = mask_layout(config.mask.kind, config.mask.ratio)
    settings = config.train_loader
    loader = make_loader(spec, settings, pin_memory=settings.pin_memory and device.type == "cuda", ring=True)
    flops = student_flops_per_clip(config.model, store.teacher_width, layout)
    print_diagnostics(config, device, run_dir, snapshot, store, spec, steps, layout, model, flops, dist)
    stats = dist.on_main(lambda: target_statistics(config, run_dir, store, resume))
    standardisation = stats.standardisation() if config.model.target_norm == "channel" else None
    if standardisation is not None:
        stepper.set_target_standardisation(standardisation)

    main = dist.is_main  # only rank 0 writes metrics, row records and checkpoints
    metrics = run_folder.MetricsLog(run_dir / "metrics.jsonl") if main else None
    rows_log = run_folder.MetricsLog(run_dir / "rows.jsonl") if main and train.record_rows else None
    quick_eval = dist.agree(lambda: QuickEval(config, store, device, run_dir / "eval", standardisation)
                            if train.eval_every and dist.is_main else None)
    bar = progress(total=steps, description="train", unit="step", initial=state.step)
    window = HealthWindow()
    first_loss = last_loss = None
    interrupted = live_store_changed = False
    worker_died: str | None = None
    batches = BatchFeed(loader, device)  # the next batch's copy overlaps this step (CUDA)

    def account_skipped() -> None:
        """Read the pending non-finite flags (one host read), log the skipped steps and their rows,
        and stop once there are more than train.max_nonfinite_steps of them."""
        skipped = window.skipped_steps(dist)
        for step, rows in skipped:
            state.nonfinite_steps += 1
            if main:
                culprits = nonfinite_latent_rows(store, rows)
                log.warning("step %d skipped: non-finite loss or gradient, weights left as they were (rows %s%s)",
                            step, rows, f"; non-finite latents in rows {culprits}" if culprits else "")
        if skipped and state.nonfinite_steps > train.max_nonfinite_steps:
            path = checkpoint(account=False)
            raise TrainingStopped(
                f"{state.nonfinite_steps} steps skipped for a non-finite loss or gradient, more than "
                f"train.max_nonfinite_steps={train.max_nonfinite_steps}: stopped at step {state.step} with "
                f"checkpoint {path.name if path else '(rank 0)'} (finite weights); the skipped steps and their rows "
                f"are in {run_dir / 'train.log'}; check the store with `salt-cache verify`")

    def checkpoint(account: bool = True) -> Path | None:
        """Rank 0 writes it while the others wait (none exits, and is reported failed, meanwhile).
        Never from non-finite weights: the last finite checkpoint stays the newest."""
        if account:
            account_skipped()
        if main and not weights_finite(model):
            previous = ckpt.latest_checkpoint(run_dir)
            raise TrainingStopped(f"the weights are not finite at step {state.step}: no checkpoint written; "
                                  f"the last finite one is {previous.name if previous else 'none'}")
        path = ckpt.save_checkpoint(run_dir, model, optimizer, state, train.keep_checkpoints) if main else None
        dist.barrier()
        return path

    try:
        with StopSignals(repeat_aborts=not dist.enabled) as stop:
            try:
                while state.step < steps:
                    # ---- data: every rank agrees whether to stop, skip or step -------------------
                    waited = time.perf_counter()
                    batch, worker_died = next_batch(batches)
                    window.data_wait += time.perf_counter() - waited
                    unreadable = batch is not None and "error" in batch
                    stopping, skipping, exhausted = dist.any_of(stop.received is not None or bool(worker_died),
                                                                unreadable, batch is None)
                    if stopping:
                        interrupted = True
                        break
                    if exhausted:
                        break
                    position = Position(batch["epoch"], batch["index"])
                    following = next_position(position, spec.steps_per_epoch)
                    if skipping:
                        state.position = following
                        state.loader_errors += 1
                        log_skipped_batch(position, dist.all_gather(_loader_error(batch) if unreadable else None))
                        if state.loader_errors > config.stream.max_errors:
                            checkpoint()
                            raise TrainingStopped(
                                f"{state.loader_errors} unreadable batches, more than "
                                f"stream.max_errors={config.stream.max_errors}: "
                                f"stopped at step {state.step} with a checkpoint; check the store with `salt-cache verify --deep`"
                            )
                        continue
                    if train.record_rows:
                        rows = dist.all_gather(batch["rows"].tolist())
                        if rows_log is not None:
                            rows_log.write({"step": state.step, "epoch": position.epoch, "index": position.index,
                                            "rows": rows})

                    # ---- step: masks, forward, masked loss, backward, clip, AdamW ----------
                    result = stepper.step(batch, state.step)
                    state.step += 1
                    window.add(result, result.clips * dist.world_size, state.step, batch["rows"])
                    state.position = following
                    state.clips_seen += result.clips * dist.world_size
                    bar.update(1)

                    # ---- health, metrics, checkpoints --------------------------------------
                    if state.step % train.log_every == 0 or state.step == steps:
                        account_skipped()
                        record = window.flush(state, result.lr, device, dist)
                        first_loss = record["loss"] if first_loss is None else first_loss
                        last_loss = record["loss"]
                        if metrics is not None:
                            metrics.write(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{result.lr:.2e}",
                                        clips_s=f"{record['clips_per_s']:.1f}")
                        log.info(health_line(record))
                    if train.eval_every and state.step % train.eval_every == 0:
                        evaluate_now(quick_eval, model, state.step, metrics, dist)
                    if state.step % train.checkpoint_every == 0 and state.step < steps:
                        checkpoint()
                        if dist.enabled:  # alone there is nothing to compare (the summary still records it)
                            check_replicas(model, dist, state.step)
                        if main:
                            live_store_changed = live_store_changed or warn_if_live_store_changed(snapshot, state.step)
            except Exception as exc:
                if not is_lost_peer(exc):
                    raise
                # Weights and optimizer are those of state.step (a failed step never reached AdamW),
                # and torchrun's SIGTERM to this rank is held off by StopSignals while rank 0 saves.
                raise LostPeer(f"lost contact with another rank at step {state.step} ({type(exc).__name__}); "
                               + _save_alone(run_dir, model, optimizer, state, train.keep_checkpoints, main)) from None
    finally:
        bar.close()
        batches.close()
        del batches, loader  # stop the workers before writing the last files
        for log_file in (metrics, rows_log):
            if log_file is not None:
                log_file.close()
    final = checkpoint()
    if dist.enabled:  # a worker that died on one rank stopped them all: every rank reports it
        worker_died = next((reason for reason in dist.all_gather(worker_died) if reason), None)
    report = RunReport(run_dir, state.step, first_loss, last_loss, state.loader_errors, interrupted, stop_signal=stop.received)
    resume_hint = (f"continue with: {'torchrun ... -m salt_train' if dist.enabled else 'salt-train'} run --cache "
                   f"{snapshot.source} --run-dir {run_dir} --resume")
    if worker_died and stop.received is None:
        raise TrainingStopped(f"{worker_died}: stopped at step {state.step} of {steps} with checkpoint "
                              f"{final.name if final else '(rank 0)'}; {resume_hint}")
    if interrupted:
        if main:
            log.warning("stopped at step %d of %d; checkpoint %s; continue with: %s run --cache %s --run-dir %s "
                        "--resume (any number of ranks)", state.step, steps, final.name,
                        "torchrun ... -m salt_train" if dist.enabled else "salt-train", snapshot.source, run_dir)
        return report
    replicas = check_replicas(model, dist, state.step)
    if main:
        report.export = export_encoder(model.encoder, config.model.student, dict(config.model.student_kwargs),
                                       run_dir / "export")
        live_store_changed = live_store_changed or warn_if_live_store_changed(snapshot, state.step)
        summary = {"steps": state.step, "planned_steps": steps, "clips_seen": state.clips_seen,
                   "first_loss": first_loss, "last_loss": last_loss, "loader_errors": state.loader_errors,
                   "live_store_changed": live_store_changed if snapshot.mode == "none" else None,
                   "checkpoint": str(final), "export": str(report.export), "snapshot": str(snapshot.path),
                   "world_size": dist.world_size, "replicas": replicas}
        write_json_atomic(run_dir / "summary.json", summary)
        loss_line = (f"{first_loss:.4f} (first {train.log_every} steps) -> {last_loss:.4f} (last)"
                     if first_loss is not None and last_loss is not None else "not logged")
        print_block("summary", {"loss": loss_line, **summary, "run folder": str(run_dir)})
    dist.barrier()  # the others exit only once rank 0 has written everything
    return report


def target_statistics(config: PipelineConfig, run_dir: Path, store: LatentStore, resume: bool) -> LatentStats:
    """Rank 0: the target statistics block, and with ``model.target_norm: channel`` the statistics the
    targets are standardised with: measured on the snapshot at the run's first start and recorded in
    the run folder; a resume reads the recorded ones back, never recomputes them. With ``layer``, a
    small sample of rows, for the block only."""
    if config.model.target_norm == "layer":
        stats = compute_stats(store, rows=SUMMARY_ROWS, seed=config.train.seed)
        print_block("target statistics (model.target_norm: layer)", stats.summary())
        if stats.warns:
            log.warning(stats.warning())
        return stats
    stats = recorded_target_stats(config, run_dir, resume)
    source = f"read back from {run_dir / run_folder.TARGET_STATS}"
    if stats is None:
        stats = compute_stats(store, rows=DEFAULT_ROWS, seed=config.train.seed)
        run_folder.write_target_stats(run_dir, stats, store.path)
        source = f"measured on the snapshot, recorded in {run_dir / run_folder.TARGET_STATS}"
    print_block("target statistics (model.target_norm: channel)", {**stats.summary(), "statistics": source})
    if stats.warns:
        log.info("outlier channels %s are standardised per channel before the layer norm (model.target_norm: "
                 "channel)", stats.outlier_channels[:8])
    return stats


def recorded_target_stats(config: PipelineConfig, run_dir: Path | None, resume: bool) -> LatentStats | None:
    """The statistics a ``model.target_norm: channel`` run recorded; None before it recorded them.
    Refused: a resume whose checkpoints trained with statistics that are no longer there."""
    if config.model.target_norm != "channel" or run_dir is None:
        return None
    stats = run_folder.read_target_stats(run_dir)
    if stats is None and resume and ckpt.latest_checkpoint(run_dir) is not None:
        raise SaltUsageError(f"{run_dir} has checkpoints trained with model.target_norm: channel but no "
                             f"{run_folder.TARGET_STATS}: its targets cannot be normalised as before; restore the "
                             "file or start a new run")
    return stats


def check_quick_eval(config: PipelineConfig) -> None:
    if config.train.eval_every and not config.eval.val_cache:
        raise SaltUsageError("train.eval_every needs eval.val_cache: a validation store "
                             "(salt-cache build --split validation), e.g. --set eval.val_cache=PATH")


def evaluate_now(quick_eval: QuickEval | None, model: torch.nn.Module, step: int,
                 metrics: run_folder.MetricsLog | None, dist: Dist) -> None:
    """Rank 0 runs the quick evaluation and records it in metrics.jsonl; the others wait."""
    if quick_eval is not None:
        record = quick_eval(model)
        if metrics is not None:
            metrics.write({"step": step, "eval": record, "time": time.time()})
        log.info("eval at step %d: held-out loss %.4f, R^2 %.3f%s", step, record["heldout_loss"], record["heldout_r2"],
                 f", linear probe top-1 {100 * record['linear_top1']:.1f}%" if "linear_top1" in record else "")
    dist.barrier()


class LostPeer(Exception):
    """Another rank died mid-run; rank 0 wrote what it could."""


def _save_alone(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                state: ckpt.TrainState, keep: int, main: bool) -> str:
    """After a peer died: rank 0 checkpoints without the (now impossible) barrier."""
    if not main:
        return "rank 0 writes the checkpoint"
    path = ckpt.save_checkpoint(run_dir, model, optimizer, state, keep)
    return f"checkpoint {path.name} written; continue with --resume, with any number of ranks"


def _resume_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  dist: Dist) -> ckpt.TrainState:
    """Load the run's newest whole checkpoint (the ones rank 0 found, on every rank); none yet is step 0.
    A damaged newest checkpoint (truncated file, garbage state.json) is passed over, loudly."""
    candidates = dist.broadcast(ckpt.complete_checkpoints(run_dir))
    if not candidates:
        log.warning("no checkpoint in %s yet: starting this run from step 0", run_dir)
        return ckpt.TrainState(step=0, position=Position())
    damaged: list[str] = []
    for path in candidates:
        def attempt() -> ckpt.TrainState | str:
            try:
                return ckpt.load_checkpoint(path, model, optimizer)
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
        log.info("resumed from %s (step %d, epoch %d, batch %d)%s", path.name, state.step, state.position.epoch,
                 state.position.index, f", not from the {len(damaged)} damaged newer one(s)" if damaged else "")
        return state
    raise SaltUsageError(f"every checkpoint of {run_dir} is damaged (newest: {damaged[0]}); "
                         "start a new run or restore a checkpoint")


def next_batch(batches: Iterable[dict]) -> tuple[dict | None, str | None]:
    """The next batch, or ``(None, reason)`` when a loader worker died (OOM killer, a signal): the run
    then stops between two whole steps, with a checkpoint, like on Ctrl-C."""
    try:
        return next(batches, None), None  # type: ignore[call-overload]
    except (RuntimeError, ConnectionError, EOFError) as exc:
        # A worker killed while the main process fetches its batch's shared-memory handles shows up as a
        # reset connection before torch's own liveness check sees the worker gone (forkserver reaps late).
        text = one_line(str(exc), None)
        if isinstance(exc, RuntimeError) and "DataLoader worker" not in text:
            raise
        if not isinstance(exc, RuntimeError):
            text = f"lost the connection to it: {one_line(exc, None)}"
        return None, f"a loader worker died ({text[:160]})"


def _loader_error(batch: dict) -> dict[str, Any]:
    return {"rows": batch["rows"].tolist(), "worker": batch["worker"], "error": batch["error"]}


def log_skipped_batch(position: Position, errors: list[dict[str, Any] | None]) -> None:
    """One warning per rank whose slice of the global batch was unreadable (all ranks skip it)."""
    for rank, error in enumerate(errors):
        if error is not None:
            log.warning("loader: batch %d of epoch %d (rows %s, %sworker %s) skipped: %s", position.index,
                        position.epoch, error["rows"], f"rank {rank} " if len(errors) > 1 else "",
                        error["worker"], error["error"])


def replica_digest(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer: equal on every rank while DDP keeps them in step."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def check_replicas(model: torch.nn.Module, dist: Dist, step: int) -> dict[str, Any]:
    """Every rank's weights digest, gathered: a rank that drifted from the others is reported loudly."""
    if not dist.enabled:
        return {"identical": True, "digests": [replica_digest(model)]}
    digests = dist.all_gather(replica_digest(model))
    identical = len(set(digests)) == 1
    if not identical and dist.is_main:
        log.error("the ranks' weights differ at step %d (digests %s): the replicas drifted apart", step, digests)
    return {"identical": identical, "digests": digests}


def warn_if_live_store_changed(snapshot: Snapshot, step: int) -> bool:
    """Without a snapshot, compare the live store with its manifest (O(files + rows), at checkpoints
    and at the end): a rebuild during the run is reported loudly, never silently trained on."""
    if snapshot.mode != "none" or not snapshot.manifest:
        return False
    differences = check_manifest(snapshot.source, snapshot.manifest)
    if differences:
        log.warning("THE LIVE STORE CHANGED since this run started (noticed at step %d; %d differences, first: %s): "
                    "batches read after the change may hold other rows; take runs from a snapshot (--snapshot "
                    "reflink or copy) to rule this out", step, len(differences), differences[0])
    return bool(differences)


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
        applied = result.applied if result.applied is not None else torch.ones((), dtype=torch.bool,
                                                                                device=result.loss.device)
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
        skipped = [(step, rows.tolist()) for (step, rows, _), ok in zip(self.unread, flags) if not ok]
        self.unread = []
        if dist.enabled:  # every rank skipped the same steps (the flag comes from all-reduced gradients)
            skipped = [(step, sorted(sum(dist.all_gather(rows), []))) for step, rows in skipped]
        return skipped

    def flush(self, state: ckpt.TrainState, lr: float, device: torch.device, dist: Dist) -> dict[str, Any]:
        """The interval's record; the loss is the mean over every rank's samples (all ranks call this)."""
        # Means over the applied steps: a skipped step's NaN would hide every other step's value.
        applied = torch.stack(self.applied) if self.applied else torch.zeros(0, dtype=torch.bool, device=device)
        kept = applied.sum().clamp_min(1)
        loss = (torch.where(applied, torch.stack(self.losses).float(), 0.0).sum() / kept if self.losses
                else torch.tensor(math.nan, device=device))
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
            "grad_norm": (float(torch.where(applied, torch.stack(self.grad_norms).float(), 0.0).sum() / kept)
                          if self.grad_norms else math.nan),
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
    return (f"step {record['step']} loss {record['loss']:.4f} lr {record['lr']:.2e} grad_norm {record['grad_norm']:.3f} "
            f"| {record['clips_per_s']:.1f} clips/s, data wait {record['data_wait_ms']:.1f} ms/step, "
            f"step {record['step_ms']:.1f} ms{gpu} | loader errors {record['loader_errors']}"
            + (f", {record['skipped_steps']} non-finite steps skipped" if record.get("skipped_steps") else ""))


def print_diagnostics(config: PipelineConfig, device: torch.device, run_dir: Path, snapshot: Snapshot,
                      store: LatentStore, spec: StreamSpec, steps: int, layout: tuple[tuple[int, int], ...],
                      model: torch.nn.Module, flops: dict[str, float], dist: Dist) -> None:
    if not dist.is_main:
        return
    counts = store.counts()
    parameters = sum(p.numel() for p in model.parameters())
    encoder_parameters = sum(p.numel() for p in model.encoder.parameters())
    loader = config.train_loader
    print_block("salt-train run", {
        "run folder": run_dir,
        "store": f"{snapshot.source} ({counts['committed']} committed, {counts['failed']} failed, "
                 f"{counts['pending']} pending rows"
                 + (f", {counts['other']} with an unknown status, not trained on" if counts["other"] else "") + ")",
        **({"views": f"{spec.views_per_clip} per clip: each epoch reads one view of each of its {spec.clips} clips"}
           if spec.views_per_clip > 1 else {}),
        "snapshot": f"{snapshot.mode}: {snapshot.path} ({snapshot.files} files, {format_bytes(snapshot.bytes)}, "
                    f"{snapshot.seconds:.2f} s)",
        "teacher": f"{store.attrs.get('teacher', {}).get('name', '?')} (width {store.teacher_width})",
        "device": f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
                  + f", {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
                  f"compile {resolve_compile_mode(config.model.compile_mode, device)}",
        "student": f"{config.model.student} {dict(config.model.student_kwargs) or ''} mode {config.model.mode}, "
                   f"{encoder_parameters / 1e6:.1f}M encoder + "
                   f"{(parameters - encoder_parameters) / 1e6:.1f}M predictor/head params",
        "masks": describe_masks(config.mask.kind, config.mask.ratio),
        "FLOPs/clip": ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops.items()),
        "schedule": f"{steps} steps ({spec.steps_per_epoch}/epoch x {config.train.epochs} epochs"
                    f"{', capped by max_steps' if config.train.max_steps else ''}), batch {config.train.batch_size}, "
                    f"lr {config.train.lr} -> {config.train.min_lr}, warmup {config.train.warmup_steps}",
        "loader": f"{loader.num_workers} workers x prefetch {loader.prefetch_factor}, "
                  f"{format_bytes(batch_bytes(spec.local_batch, store.teacher_width))}/batch, "
                  f"shm bound {format_bytes(shm_bound(loader, spec.local_batch, store.teacher_width))}, "
                  f"shuffle window {config.stream.shuffle_buffer} rows, checksums {'on' if spec.verify_checksums else 'off'}",
        "start": f"epoch {spec.start.epoch}, batch {spec.start.index}" + (" (resumed)" if spec.start != Position() else ""),
        **({"ranks": f"{dist.world_size} (torchrun, {dist.local_world_size} on this node): DDP, "
                     f"{spec.local_batch} clips per rank per step, loader workers per rank"} if dist.enabled else {}),
    })
