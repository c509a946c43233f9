"""What a run checks between its steps, beside the loss, and the order of those checks around a checkpoint.

- :class:`SkippedSteps`: the steps whose update was skipped for a non-finite loss or gradient
  (salt_train/finite.py skips them on the device) are counted, logged with their rows, and past
  ``train.max_nonfinite_steps`` the run stops with a checkpoint of its (finite) weights;
- :func:`check_replicas`: under DDP the ranks' weights must stay equal; a rank that drifted is reported;
- :class:`LiveStoreWatch`: a run without a snapshot compares the live store with its manifest.

:class:`Checkpoints` writes a checkpoint with these in order: the skipped steps are accounted first
(the checkpoint records their count), the checks after it. :class:`~salt_train.metrics.Metrics`
accounts them before each health line.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from shared.distributed import Dist
from shared.store import LatentStore

from salt_train.checkpoint import Checkpointer, TrainingStopped
from salt_train.finite import nonfinite_latent_rows
from salt_train.snapshot import Snapshot, check_manifest
from salt_train.state import TrainState

log = logging.getLogger(__name__)


class PendingFlags(Protocol):
    """What SkippedSteps reads (metrics.HealthWindow; a protocol so that metrics may import this module)."""

    def skipped_steps(self, dist: Dist) -> list[tuple[int, list[int]]]: ...


Window = TypeVar("Window", bound=PendingFlags)


class SkippedSteps(Generic[Window]):
    """Accounts for the steps skipped since the last call, from ``window``'s pending flags, in ``state``."""

    def __init__(
        self,
        window: Window,
        state: TrainState,
        limit: int,
        store: LatentStore,
        checkpointer: Checkpointer,
        dist: Dist,
    ) -> None:
        self.window, self.state, self.limit, self.store = window, state, limit, store
        self.checkpointer, self.dist = checkpointer, dist

    def account(self) -> None:
        """Read the pending non-finite flags (one host read), log the skipped steps and their rows,
        and stop once there are more than ``limit`` (``train.max_nonfinite_steps``) of them."""
        state, skipped = self.state, self.window.skipped_steps(self.dist)
        for step, rows in skipped:
            state.nonfinite_steps += 1
            if self.dist.is_main:
                culprits = nonfinite_latent_rows(self.store, rows)
                log.warning(
                    "step %d skipped: non-finite loss or gradient, weights left as they were (rows %s%s)",
                    step,
                    rows,
                    f"; non-finite latents in rows {culprits}" if culprits else "",
                )
        if skipped and state.nonfinite_steps > self.limit:
            path = self.checkpointer.save()
            raise TrainingStopped(
                f"{state.nonfinite_steps} steps skipped for a non-finite loss or gradient, more than "
                f"train.max_nonfinite_steps={self.limit}: stopped at step {state.step} with "
                f"checkpoint {path.name if path else '(rank 0)'} (finite weights); the skipped steps and their rows "
                f"are in {self.checkpointer.run_dir / 'train.log'}; check the store with `salt-cache verify`"
            )


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
        log.warning(
            "THE LIVE STORE CHANGED since this run started (noticed at step %d; %d differences, first: %s): "
            "batches read after the change may hold other rows; take runs from a snapshot (--snapshot "
            "reflink or copy) to rule this out",
            step,
            len(differences),
            differences[0],
        )
    return bool(differences)


class LiveStoreWatch:
    """Rank 0 checks the live store (a run without a snapshot) until it first notices a change."""

    def __init__(self, snapshot: Snapshot, dist: Dist) -> None:
        self.snapshot, self.dist = snapshot, dist
        self.changed = False  # noticed once (then once is enough), reported in the summary

    def check(self, step: int) -> None:
        if self.dist.is_main and not self.changed:
            self.changed = warn_if_live_store_changed(self.snapshot, step)


class Checkpoints:
    """A run's checkpoints with the checks around them; every rank calls :meth:`save`."""

    def __init__(self, checkpointer: Checkpointer, skipped: SkippedSteps[Any], live_store: LiveStoreWatch) -> None:
        self.checkpointer, self.skipped, self.live_store = checkpointer, skipped, live_store

    def save(self, last_step: bool = False) -> Path | None:
        """Account the skipped steps (past the limit the run stops here, with a checkpoint), checkpoint the
        state (the path on rank 0, None on the others), then, between steps, compare the ranks' weights and
        check the live store; the last checkpoint leaves both to the run's summary."""
        self.skipped.account()
        path = self.checkpointer.save()
        if not last_step:
            checkpointer = self.checkpointer
            if checkpointer.dist.enabled:  # alone there is nothing to compare (the summary still records it)
                check_replicas(checkpointer.model, checkpointer.dist, checkpointer.state.step)
            self.live_store.check(checkpointer.state.step)
        return path
