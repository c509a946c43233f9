"""Batches from the loader to the device, the next one's copy overlapping the current step.

On CUDA, :class:`BatchFeed` copies batch ``n+1`` (pixels, latents, masks) on a side
stream while the step of batch ``n`` runs on the compute stream; the compute stream
waits for that copy's event only when it takes the batch. The host buffers come from
the loader's :class:`~salt_train.data.BufferRing`: pinned once here (``cudaHostRegister``
of each ring buffer the first time it arrives, so the copies are truly asynchronous and
nothing is copied a second time on the host), and handed back to their worker once the
copy that read them has finished. On CPU the batch is used where it lies and handed
back when the next one is taken.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from salt_train.workers import describe_workers, end_workers

log = logging.getLogger(__name__)

ON_DEVICE = ("pixels", "latents", "visible", "masked")  # visible/masked: a tuple, one tensor per mask group

Moved = torch.Tensor | tuple[torch.Tensor, ...]


def to_device(value: Moved, device: torch.device, non_blocking: bool = False) -> Moved:
    """A tensor, or a tuple (or list) of tensors as the mask groups come, on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    return tuple(part.to(device, non_blocking=non_blocking) for part in value)


def batch_to_device(batch: dict, device: torch.device, non_blocking: bool = False) -> dict:
    """``batch`` with its ``ON_DEVICE`` entries on ``device``; the rest (row ids, slot) left as they are."""
    return {
        name: to_device(value, device, non_blocking) if name in ON_DEVICE else value for name, value in batch.items()
    }


def _tensors(value: Moved) -> tuple[torch.Tensor, ...]:
    return (value,) if isinstance(value, torch.Tensor) else tuple(value)


class BatchFeed:
    """An iterator of batches whose tensors ``ON_DEVICE`` are on ``device``; ``close()`` when done."""

    def __init__(self, loader: DataLoader | Iterable[dict], device: torch.device) -> None:
        self.device = device
        self.ring = getattr(getattr(loader, "dataset", None), "ring", None)
        self.batches: Iterator[dict] = iter(loader)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.next: tuple[dict, dict, torch.cuda.Event | None] | None = None  # (host, on device, copied)
        self.held: tuple[dict, torch.cuda.Event | None] | None = None  # handed out, not yet handed back
        self.pinned: dict[int, torch.UntypedStorage] = {}  # data_ptr -> ring storage registered with CUDA
        self.unpinnable: set[int] = set()
        self.done = False

    def __iter__(self) -> BatchFeed:
        return self

    def __next__(self) -> dict:
        if self.next is None and not self.done:
            self.next = self._start(self._pull())
        if self.held is not None:  # the consumer has finished with it: its worker may refill the buffer
            host, copied = self.held
            if copied is not None:
                copied.synchronize()  # long done: it was the copy before the last step
            self._hand_back(host)
            self.held = None
        if self.next is None:
            raise StopIteration
        host, moved, copied = self.next
        self.next = None if self.done else self._start(self._pull())  # overlaps the step of ``moved``
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            for name in ON_DEVICE:
                for tensor in _tensors(moved.get(name, ())):
                    tensor.record_stream(current)  # allocated on the side stream, used on this one
        self.held = (host, copied)
        return moved

    def _pull(self) -> dict | None:
        try:
            return next(self.batches)
        except StopIteration:
            self.done = True
            return None

    def _start(self, host: dict | None) -> tuple[dict, dict, torch.cuda.Event | None] | None:
        """Begin moving ``host`` to the device (at once on CPU, where there is nothing to move)."""
        if host is None:
            return None
        if not self.cuda or "error" in host:
            return host, host, None
        self._pin(host)
        with torch.cuda.stream(self.stream):
            moved = batch_to_device(host, self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return host, moved, copied

    def _pin(self, host: dict) -> None:
        """Page-lock each ring buffer once (the ring reuses the same few storages all run)."""
        if self.ring is None:
            return  # the DataLoader pinned the batch (pin_memory), or the caller chose pageable memory
        for name in ("pixels", "latents"):
            if name not in host:  # a stream of pixels only (salt-train teacher)
                continue
            storage = host[name].untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.pinned or ptr in self.unpinnable:
                continue
            error = torch.cuda.cudart().cudaHostRegister(ptr, storage.nbytes(), 0)
            if int(error) != 0:
                log.warning(
                    "cannot pin a loader buffer (cudaHostRegister error %s): copies from pageable memory", error
                )
                self.unpinnable.add(ptr)
                continue
            self.pinned[ptr] = storage  # kept alive, so the worker's next send maps to the same pages

    def _hand_back(self, host: dict) -> None:
        slot = host.get("slot")
        if self.ring is not None and slot is not None:
            self.ring.release(int(slot[0]), int(slot[1]))

    def describe_workers(self) -> str:
        """What the loader's worker processes are doing (for a stalled wait's message)."""
        return describe_workers(self.batches)

    def close(self) -> None:
        """Wait for the copies in flight, unpin the ring buffers (before the workers unmap them), then end
        the workers, in bounded time whatever they are doing (salt_train/workers.py)."""
        if self.cuda:
            assert self.stream is not None  # made with self.cuda
            self.stream.synchronize()
            for ptr in self.pinned:
                torch.cuda.cudart().cudaHostUnregister(ptr)
        self.pinned.clear()
        self.next = self.held = None
        end_workers(self.batches)
