"""torch.distributed for both stages: one process per GPU (or CPU rank) under ``torchrun``.

Outside torchrun (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``)
every method here is the trivial one of rank 0 of 1, so the single-process
paths run exactly as before. Under torchrun a job gets:

- the default process group: NCCL on GPUs for DDP's gradients, gloo on CPU;
- a gloo *control* group for small Python objects and per-step flags, so the
  ranks coordinate without waiting on a CUDA stream, with a long timeout (a
  build's ranks may finish far apart; a dead peer is noticed at once anyway,
  because its sockets close).

Bad input found on any rank becomes the same one-line error on every rank
(:meth:`Dist.agree`, :meth:`Dist.on_main`), printed once, by rank 0: no rank is
left waiting in a collective for a peer that has already exited.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from shared.errors import SaltUsageError, first_line
from shared.torchrun_env import env_world_size

T = TypeVar("T")
log = logging.getLogger(__name__)

# The control group's patience: a build's last barrier waits for its slowest rank.
CONTROL_TIMEOUT = timedelta(hours=12)


class PeerUsageError(SaltUsageError):
    """A usage error another rank (or rank 0 for all) found: every rank exits 2, only rank 0 prints it."""

    def __init__(self, message: str, quiet: bool) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass(frozen=True)
class Dist:
    """Rank, world size and the collectives the stages use (all trivial for one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    control: Any = None  # the gloo ProcessGroup for objects and flags

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's own GPU for a CUDA ``device`` (``cuda:LOCAL_RANK``, which DDP's ``device_ids`` needs)."""
        return torch.device("cuda", self.local_rank) if self.enabled and device.type == "cuda" else device

    # ---- collectives over the control group ---------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier(group=self.control)

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (picklable), in rank order."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, value, group=self.control)
        return gathered

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def any_of(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether any rank raised it: one small gloo all-reduce, no CUDA sync."""
        if not self.enabled:
            return tuple(bool(f) for f in flags)
        counts = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        torch_dist.all_reduce(counts, group=self.control)
        return tuple(bool(c) for c in counts.tolist())

    # ---- errors every rank agrees on -------------------------------------------------
    def agree(self, work: Callable[[], T]) -> T:
        """Run ``work`` on every rank; a usage error on any rank is raised on all of them."""
        try:
            result, error = work(), None
        except SaltUsageError as exc:
            result, error = None, str(exc)
        if not self.enabled:
            if error is not None:
                raise SaltUsageError(error)
            return result  # type: ignore[return-value]
        errors = self.all_gather(error)
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if failed:
            rank, message = failed[0]
            raise PeerUsageError(message if rank == 0 else f"rank {rank}: {message}", quiet=not self.is_main)
        return result  # type: ignore[return-value]

    def on_main(self, work: Callable[[], T]) -> T:
        """Run ``work`` on rank 0 only; every rank gets its result (picklable) or its usage error."""
        if not self.enabled:
            return work()
        payload: tuple[str, Any] | None = None
        if self.is_main:
            try:
                payload = ("ok", work())
            except SaltUsageError as exc:
                self.broadcast(("error", str(exc)))
                raise
        payload = self.broadcast(payload)
        assert payload is not None
        if payload[0] == "error":
            raise PeerUsageError(payload[1], quiet=True)
        return payload[1]


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU ranks."""
    return "nccl" if device.type == "cuda" else "gloo"


def warn_if_oversubscribed(dist: Dist, workers_per_rank: int, setting: str) -> None:
    """Say so (rank 0, once) when this node's ranks start more loader workers than it has cores
    (``setting``: the recipe key that sets them, build_loader's or train_loader's ``num_workers``)."""
    cores = os.cpu_count() or 1
    total = dist.local_world_size * (workers_per_rank + 1)  # each rank's main process too
    if dist.enabled and dist.is_main and total > cores:
        log.warning(
            "%d ranks on this node x (%d workers + 1) = %d processes for %d cores: %s "
            "counts workers per rank; about %d would fit",
            dist.local_world_size,
            workers_per_rank,
            total,
            cores,
            setting,
            max(0, cores // dist.local_world_size - 1),
        )


def rank_share(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s contiguous block of ``items``; blocks differ in length by at most one."""
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (1 if rank < extra else 0)])


def _environment() -> tuple[int, int, int, int]:
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    missing = [name for name in names[:3] + ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise SaltUsageError(
            f"WORLD_SIZE is set but {', '.join(missing)} not: launch with torchrun "
            "(e.g. torchrun --nproc-per-node=2 -m salt_train run ...)"
        )
    try:
        rank, world, local = (int(os.environ[name]) for name in names[:3])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError as exc:
        raise SaltUsageError(f"torchrun environment is not numeric ({exc})") from None
    return rank, world, local, local_world


@contextmanager
def distributed(backend: str) -> Iterator[Dist]:
    """The job's :class:`Dist`: a process group under torchrun (``backend`` nccl or gloo), none alone.

    Where there are GPUs, this process's is ``cuda:LOCAL_RANK`` (the current device, set before
    the group exists), so ``cuda`` means a different GPU in each rank of a node."""
    if env_world_size() <= 1:
        yield Dist()
        return
    rank, world, local, local_world = _environment()
    if backend == "nccl" and local >= torch.cuda.device_count():
        raise SaltUsageError(
            f"LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} GPU(s): "
            "--nproc-per-node must not exceed the GPUs of a node"
        )
    if local < torch.cuda.device_count():
        torch.cuda.set_device(local)
    try:
        torch_dist.init_process_group(backend=backend)
        # Its own group even on gloo: control messages never interleave with DDP's gradient buckets.
        control = torch_dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        raise SaltUsageError(f"could not join the torchrun job as rank {rank} of {world}: {first_line(exc)}") from None
    try:
        yield Dist(rank, world, local, local_world, control)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def is_lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank died or timed out. DDP's
    reducer raises gloo's and NCCL's transport errors as plain RuntimeErrors, named by backend."""
    if isinstance(exc, torch_dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("gloo" in text or "NCCL" in text)
