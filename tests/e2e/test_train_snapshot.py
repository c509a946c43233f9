"""Training reads its reflink snapshot, not the live store (real XFS mount, real `salt-cache build` store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from conftest import call_train, train_pipeline
from xfs_mount import xfs_dir  # noqa: F401  (the fixture)

from shared.config import load_pipeline
from shared.store import LatentStore

from salt_train.data import make_loader, stream_spec
from salt_train.snapshot import list_snapshots, prune_snapshots, reading_snapshot, take_snapshot


def rewrite_every_shard(store: Path) -> None:
    """What a rebuild does to the live store: every data file replaced with other bytes."""
    for name in ("pixels", "latents"):
        for shard_file in (p for p in (store / name / "c").rglob("*") if p.is_file()):
            data = bytearray(shard_file.read_bytes())
            data[64:] = bytes(len(data) - 64)
            shard_file.write_bytes(bytes(data))  # in place: the snapshot's shared extents get copied on write


def test_rewriting_the_live_store_mid_stream_changes_nothing_read(demo_reference, xfs_dir: Path) -> None:
    live = Path(shutil.copytree(demo_reference.store, xfs_dir / "stream" / "latents.zarr"))
    config = load_pipeline("demo", {"train.batch_size": 4, "train.epochs": 1, "train_loader.num_workers": 0})
    snapshot = take_snapshot(live, "stream-run", "reflink")
    assert snapshot.mode == "reflink" and snapshot.path != live
    reference = LatentStore.open(demo_reference.store)
    batches = iter(
        make_loader(stream_spec(LatentStore.open(snapshot.path), config), config.train_loader, pin_memory=False)
    )
    seen = [next(batches)]
    rewrite_every_shard(live)  # mid-epoch
    shard = next(p for p in (live / "latents" / "c").rglob("*") if p.is_file())
    assert shard.read_bytes() != (snapshot.path / shard.relative_to(live)).read_bytes()
    seen.extend(batches)
    assert len(seen) == 5
    for batch in seen:
        for k, row in enumerate(batch["rows"].tolist()):
            np.testing.assert_array_equal(batch["pixels"][k].numpy(), reference.arrays["pixels"][row])
            np.testing.assert_array_equal(batch["latents"][k].numpy(), reference.arrays["latents"][row])


def test_a_run_records_its_reflink_snapshot_and_resumes_from_it(demo_reference, xfs_dir: Path, tmp_path) -> None:
    live = Path(shutil.copytree(demo_reference.store, xfs_dir / "run" / "latents.zarr"))
    pipeline = train_pipeline(tmp_path / "train.yaml", train__max_steps=6, train__checkpoint_every=3)
    run_dir = tmp_path / "run"
    first = call_train(
        "run",
        "--cache",
        live,
        "--pipeline",
        pipeline,
        "--run-dir",
        run_dir,
        "--snapshot",
        "reflink",
        "--max-steps",
        "3",
    )
    assert first.returncode == 0, first.stderr
    record = json.loads((run_dir / "run.json").read_text())["snapshot"]
    assert record["mode"] == "reflink" and record["name"] == "run"
    assert [s["name"] for s in list_snapshots(live)] == ["run"]
    rewrite_every_shard(live)  # the live store changes between the stop and the resume
    resumed = call_train("run", "--cache", live, "--run-dir", run_dir, "--resume", "--max-steps", "6")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["snapshot"] == record["path"]
    assert call_train("snapshots", "list", "--cache", live).stdout.startswith("run  reflink")
    pruned = call_train("snapshots", "prune", "--cache", live, "--keep", "0")
    assert pruned.returncode == 0 and "removed 1 snapshot(s): run" in pruned.stdout


def test_prune_keeps_a_snapshot_a_run_is_reading(demo_reference, xfs_dir: Path) -> None:
    live = Path(shutil.copytree(demo_reference.store, xfs_dir / "busy" / "latents.zarr"))
    busy = take_snapshot(live, "busy", "reflink")
    take_snapshot(live, "idle", "reflink")
    with reading_snapshot(busy):
        assert prune_snapshots(live, keep=0) == ["idle"]
        assert busy.path.is_dir()
    assert prune_snapshots(live, keep=0) == ["busy"]
