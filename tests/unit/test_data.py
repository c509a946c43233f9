"""The streaming loader on real stores: committed rows only, deterministic order, exact resume
positions, the same global batches whatever the workers and ranks, bounded /dev/shm, bad batches reported."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAILING_KINDS, copy_store

from shared.config import load_pipeline
from shared.errors import SaltUsageError
from shared.rows import committed_rows, row_runs
from shared.store import LatentStore

from salt_train.data import (
    Position,
    StoreStream,
    StreamSpec,
    check_shm,
    check_stream,
    epoch_order,
    make_loader,
    stream_spec,
    to_model_inputs,
)


def spec_for(store: Path, batch: int = 2, epochs: int = 3, **fields) -> StreamSpec:
    config = load_pipeline("demo", {"train.batch_size": batch, "train.epochs": epochs, "stream.shuffle_buffer": 4})
    return replace(stream_spec(LatentStore.open(store), config), **fields)


def sequence(spec: StreamSpec, workers: int = 0) -> list[tuple[int, int, list[int]]]:
    config = load_pipeline("demo", {"train_loader.num_workers": workers})
    batches = make_loader(spec, config.train_loader, pin_memory=False)
    return [(b["epoch"], b["index"], b["rows"].tolist()) for b in batches]


def test_failed_rows_never_stream(reference_build, mixed_set) -> None:
    store = LatentStore.open(reference_build.store)
    failed = {mixed_set.row(kind) for kind in FAILING_KINDS}
    rows = committed_rows(store)
    assert failed.isdisjoint(rows.tolist()) and len(rows) == store.rows - len(failed)
    seen = [row for _, _, batch in sequence(spec_for(reference_build.store)) for row in batch]
    assert seen and failed.isdisjoint(seen)


def test_batches_hold_the_stored_rows(reference_build) -> None:
    store = LatentStore.open(reference_build.store)
    settings = load_pipeline("demo").train_loader
    batch = next(iter(make_loader(spec_for(reference_build.store), settings, pin_memory=False)))
    rows = batch["rows"].numpy()
    assert batch["pixels"].dtype == torch.uint8 and batch["latents"].dtype == torch.float16
    for k, row in enumerate(rows):
        np.testing.assert_array_equal(batch["pixels"][k].numpy(), store.arrays["pixels"][row])
        np.testing.assert_array_equal(batch["latents"][k].numpy(), store.arrays["latents"][row])
    pixels, latents = to_model_inputs(batch, torch.device("cpu"))
    assert pixels.shape == (len(rows), 3, 16, 224, 224) and latents.shape == (len(rows), 1568, store.teacher_width)
    # normalised with the ImageNet statistics: pixel value 0 maps to -mean/std
    assert pixels.min() >= -0.485 / 0.229 - 1e-5 and pixels.max() <= (1 - 0.406) / 0.225 + 1e-5


def test_every_epoch_is_a_permutation_and_epochs_differ(demo_reference) -> None:
    rows = committed_rows(LatentStore.open(demo_reference.store))
    orders = [epoch_order(rows, 2, seed=0, epoch=e, window=4) for e in range(3)]
    for order in orders:
        assert sorted(order.tolist()) == rows.tolist()
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[0], epoch_order(rows, 2, seed=0, epoch=0, window=4))
    assert not np.array_equal(orders[0], epoch_order(rows, 2, seed=1, epoch=0, window=4))


def test_same_batches_whatever_the_workers(demo_reference) -> None:
    spec = spec_for(demo_reference.store, batch=4, epochs=2)
    single = sequence(spec, workers=0)
    assert len(single) == 2 * spec.steps_per_epoch
    assert sequence(spec, workers=2) == single


def test_resume_position_continues_the_sequence_exactly(demo_reference) -> None:
    spec = spec_for(demo_reference.store, batch=4, epochs=2)
    full = sequence(spec)
    start = Position(epoch=1, index=2)
    resumed = sequence(replace(spec, start=start))
    assert resumed == full[spec.steps_per_epoch + 2 :]
    assert replace(spec, start=start).remaining_batches == len(resumed)


def test_ranks_split_each_global_batch(demo_reference) -> None:
    spec = spec_for(demo_reference.store, batch=4, epochs=1)
    whole = sequence(spec)
    halves = [sequence(replace(spec, rank=r, world_size=2)) for r in range(2)]
    for (e, i, rows), first, second in zip(whole, *halves, strict=False):
        assert first[:2] == second[:2] == (e, i)
        assert set(first[2]).isdisjoint(second[2])
        assert sorted(first[2] + second[2]) == rows


def test_row_runs_group_contiguous_rows() -> None:
    assert row_runs(np.array([1, 2, 3, 7, 9, 10])) == [(1, 4), (7, 8), (9, 11)]
    assert row_runs(np.array([5])) == [(5, 6)]


def test_refuses_streams_that_cannot_yield(reference_build, tmp_path) -> None:
    spec = spec_for(reference_build.store)
    with pytest.raises(SaltUsageError, match="larger than the 5 committed rows"):
        check_stream(replace(spec, batch_size=6), reference_build.store)
    with pytest.raises(SaltUsageError, match="no committed rows"):
        check_stream(replace(spec, rows=np.array([], dtype=np.int64)), reference_build.store)
    with pytest.raises(SaltUsageError, match="not divisible"):
        check_stream(replace(spec, batch_size=3, world_size=2), reference_build.store)


def test_refuses_a_loader_that_would_exhaust_shm() -> None:
    loader = load_pipeline("ssv2").train_loader  # 8 workers, prefetch 2
    with pytest.raises(SaltUsageError, match="shm-size"):
        check_shm(loader, local_batch=4096, teacher_width=1280)  # ~8 workers x 3 x 27 GB
    check_shm(loader.model_copy(update={"num_workers": 0}), local_batch=4096, teacher_width=1280)


def test_damaged_shard_becomes_an_error_item(demo_reference, tmp_path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "damaged.zarr")
    shard_file = max((p for p in (store / "pixels" / "c").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(shard_file.read_bytes())
    data[100:4000] = bytes(3900)  # zero the start of a zstd frame: undecodable
    shard_file.write_bytes(bytes(data))
    spec = spec_for(store, batch=4, epochs=1, verify_checksums=True)
    items = list(
        make_loader(spec, load_pipeline("demo", {"train_loader.num_workers": 2}).train_loader, pin_memory=False)
    )
    errors = [item for item in items if "error" in item]
    assert len(items) == spec.steps_per_epoch
    assert errors and all(item["worker"] in (0, 1) and item["error"] for item in errors)
    assert len(errors) < len(items)  # the other batches still stream


def test_checksums_catch_silent_corruption(demo_reference, tmp_path) -> None:
    store = copy_store(demo_reference.store, tmp_path / "flipped.zarr")
    latents_file = sorted(p for p in (store / "latents" / "c").rglob("*") if p.is_file())[0]
    data = bytearray(latents_file.read_bytes())
    data[1000] ^= 0x40  # raw fp16 latents: zarr cannot notice, the row checksum can
    latents_file.write_bytes(bytes(data))
    spec = spec_for(store, batch=20, epochs=1, verify_checksums=True)
    stream = StoreStream(spec)
    epoch, index, rows = next(stream.positions())
    item = stream.read_batch(epoch, index, rows, worker=0)
    assert "latents checksum mismatch" in item["error"]
    unchecked = StoreStream(replace(spec, verify_checksums=False)).read_batch(epoch, index, rows, worker=0)
    assert "error" not in unchecked


def test_a_worker_reads_each_checksum_chunk_once_and_still_checks_every_row(demo_reference, tmp_path) -> None:
    """Checksum arrays are read once per chunk and kept: with their files gone after the first epoch,
    the next epochs stream the same rows, checked against the held checksums (a flipped byte still caught)."""
    store = copy_store(demo_reference.store, tmp_path / "held.zarr")
    spec = spec_for(store, batch=4, epochs=2, verify_checksums=True)
    stream = StoreStream(spec)
    positions = list(stream.positions())
    first_epoch = [p for p in positions if p[0] == 0]
    assert all("error" not in stream.read_batch(*p, worker=0) for p in first_epoch)
    for name in ("pixels_checksum", "latents_checksum"):
        for chunk in (store / name / "c").rglob("*"):
            chunk.unlink() if chunk.is_file() else None
    second_epoch = [p for p in positions if p[0] == 1]
    assert second_epoch and all("error" not in stream.read_batch(*p, worker=0) for p in second_epoch)
    assert "error" in StoreStream(spec).read_batch(*second_epoch[0], worker=0)  # a fresh worker reads them
    shard_rows = np.array([r for r in spec.rows if r // spec.shard_rows == 0])  # all held by the stream now
    latents_file = sorted(p for p in (store / "latents" / "c").rglob("*") if p.is_file())[0]  # shard 0
    data = bytearray(latents_file.read_bytes())
    data[1000] ^= 0x40
    latents_file.write_bytes(bytes(data))
    assert "latents checksum mismatch" in stream.read_batch(1, 0, shard_rows, worker=0).get("error", "")


def test_the_buffer_ring_delivers_the_stored_rows_with_their_masks_in_reused_buffers(demo_reference) -> None:
    """Workers read into a fixed ring of shared-memory buffers, handed back by the feed; every batch
    still holds its stored rows, and its masks are the step's (the same with 0 or 2 workers)."""
    from salt_train.feed import BatchFeed
    from salt_train.masks import make_masks

    store = LatentStore.open(demo_reference.store)
    spec = spec_for(demo_reference.store, batch=4, epochs=3)
    overrides = {"train_loader.num_workers": 2, "train_loader.prefetch_factor": 1}
    loader_config = load_pipeline("demo", overrides).train_loader
    loader = make_loader(spec, loader_config, pin_memory=False, ring=True)
    feed = BatchFeed(loader, torch.device("cpu"))
    buffers, steps, seen = set(), 0, []
    for step, batch in enumerate(feed):
        seen.append(tuple(m.clone() for m in batch["masked"]))
        rows = batch["rows"].numpy()
        np.testing.assert_array_equal(batch["pixels"].numpy(), store.arrays["pixels"].oindex[rows])
        np.testing.assert_array_equal(batch["latents"].numpy(), store.arrays["latents"].oindex[rows])
        masks = make_masks(spec.mask_kind, spec.mask_ratio, spec.batch_size, spec.seed, step)
        assert all(map(torch.equal, batch["masked"], masks.masked))
        assert all(map(torch.equal, batch["visible"], masks.visible))
        buffers.add(batch["pixels"].untyped_storage().data_ptr())
        steps += 1
    feed.close()
    assert steps == 3 * spec.steps_per_epoch > 2 * 3  # more batches than the two rings' slots ...
    assert len(buffers) <= 2 * 3  # ... all read into the same few buffers
    in_process = [
        b["masked"]
        for b in make_loader(
            spec, load_pipeline("demo").train_loader.model_copy(update={"num_workers": 0}), pin_memory=False
        )
    ]
    assert len(in_process) == steps and all(all(map(torch.equal, a, b)) for a, b in zip(in_process, seen, strict=False))


def test_ranks_get_their_slice_of_the_global_batch_masks(demo_reference) -> None:
    spec = spec_for(demo_reference.store, batch=4, epochs=1)
    whole = next(iter(StoreStream(spec)))
    halves = [next(iter(StoreStream(replace(spec, rank=r, world_size=2)))) for r in range(2)]
    for name in ("masked", "visible"):
        for group, expected in enumerate(whole[name]):
            assert torch.equal(torch.cat([h[name][group] for h in halves]), expected)
