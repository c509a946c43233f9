"""Target statistics (issue 10, part 3): `salt-cache stats` finds outlier channels planted into a real
store built by the tiny teacher, and `model.target_norm: channel` trains on them with the statistics the
run recorded (resume and the held-out loss read them back)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call_cli, call_train, copy_store, train_pipeline
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.latent_stats import (
    LAYER_NORM_EPS,
    OUTLIER_MULTIPLE,
    TOP_CHANNELS,
    ChannelAccumulator,
    LatentStats,
    compute_stats,
    warning_share,
)
from shared.rows import read_row_range
from shared.store import LatentStore, RowStatus, ShardPayload, create_store

PLANTED = (5, 41)  # channels of the tiny teacher's 64 scaled up
SCALE = 50.0


def plant_outliers(store_path: Path, channels: tuple[int, ...], scale: float) -> None:
    """Scale ``channels`` of every committed row's latents and re-commit each shard through the store's
    own writer (new checksums, status last), as if the teacher had produced them."""
    store = LatentStore.open(store_path, writable=True)
    for shard, start, stop in store.iter_shards():
        rows = read_row_range(store, start, stop, ("pixels", "latents", "frame_index", "status", "error"))
        latents = rows["latents"].astype(np.float32)
        latents[..., list(channels)] *= scale
        store.write_shard(
            ShardPayload(
                shard,
                rows["pixels"],
                latents.astype(np.float16),
                rows["frame_index"],
                rows["status"],
                [str(e) for e in rows["error"]],
            )
        )


@pytest.fixture(scope="module")
def planted(demo_reference, tmp_path_factory) -> Path:
    store = copy_store(demo_reference.store, tmp_path_factory.mktemp("planted") / "latents.zarr")
    plant_outliers(store, PLANTED, SCALE)
    return store


def all_latents(store_path: Path) -> np.ndarray:
    store = LatentStore.open(store_path)
    committed = np.flatnonzero(store.status() == RowStatus.COMMITTED)
    return np.asarray(store.array("latents")[:])[committed].astype(np.float64)


def numpy_layer_norm(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.square(centred).mean(axis=-1, keepdims=True) + LAYER_NORM_EPS)


def test_stats_name_exactly_the_planted_channels_and_warn(planted) -> None:
    result = call_cli("stats", planted, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report["outlier_channels"]) == sorted(PLANTED)
    assert report["top_share"] > report["warning_share"] and report["warning"]
    text = call_cli("stats", planted)
    assert text.returncode == 0, text.stderr
    assert "WARNING:" in text.stdout
    assert any(f"measures channels {a}, {b};" in text.stdout for a, b in (PLANTED, PLANTED[::-1])), text.stdout
    assert "all 20 committed rows" in text.stdout


def test_unplanted_store_has_no_outliers_and_no_warning(demo_reference) -> None:
    result = call_cli("stats", demo_reference.store, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["outlier_channels"] == [] and report["warning"] is None
    assert report["top_share"] < report["warning_share"]
    assert "no outlier channels" in call_cli("stats", demo_reference.store).stdout


def test_figures_match_numpy_over_every_row(planted) -> None:
    stats = compute_stats(LatentStore.open(planted), rows=0)
    x = all_latents(planted).reshape(-1, stats.width)
    assert stats.rows_read == 20 and not stats.sampled and stats.tokens == len(x)
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.std, x.std(axis=0), rtol=1e-8)
    np.testing.assert_array_equal(stats.max_abs, np.abs(x).max(axis=0))
    energy = np.square(numpy_layer_norm(x)).mean(axis=0)
    np.testing.assert_allclose(stats.energy, energy, rtol=1e-10)
    share = energy / energy.sum()
    assert stats.top_share == pytest.approx(np.sort(share)[-TOP_CHANNELS:].sum())
    assert set(stats.outlier_channels) == set(np.flatnonzero(share > OUTLIER_MULTIPLE / stats.width))


def test_a_seeded_sample_is_reproducible_and_says_so(planted) -> None:
    store = LatentStore.open(planted)
    a, b = compute_stats(store, rows=6, seed=3), compute_stats(store, rows=6, seed=3)
    c = compute_stats(store, rows=6, seed=4)
    assert a.rows_read == 6 and a.sampled and "sample of 6 of 20 committed rows (seed 3)" in a.rows_line()
    np.testing.assert_array_equal(a.mean, b.mean)
    assert not np.array_equal(a.mean, c.mean)
    assert sorted(a.outlier_channels) == sorted(PLANTED)  # a few rows are enough to see them


def test_a_damaged_row_is_skipped_not_averaged(planted, tmp_path) -> None:
    store_path = copy_store(planted, tmp_path / "damaged.zarr")
    store = LatentStore.open(store_path)
    shard_file = store.shard_file("latents", 0)
    data = bytearray(shard_file.read_bytes())
    data[100:108] = b"\xff" * 8  # inside row 0's chunk (rows sit in order from offset 0): NaN fp16 bytes
    shard_file.write_bytes(bytes(data))
    stats = compute_stats(LatentStore.open(store_path), rows=0)
    assert stats.skipped_rows == [0] and stats.rows_read == 19
    assert np.isfinite(stats.mean).all() and "1 damaged or non-finite rows skipped" in stats.rows_line()


def test_json_round_trip_is_exact(planted) -> None:
    stats = compute_stats(LatentStore.open(planted), rows=5)
    back = LatentStats.from_json(json.loads(json.dumps(stats.to_json())))
    for key in ("mean", "std", "max_abs", "energy"):
        np.testing.assert_array_equal(getattr(back, key), getattr(stats, key))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(1, 59), max_size=4))
def test_accumulating_in_any_blocks_equals_one_pass(seed, cuts) -> None:
    """Rows arrive in blocks of any size: the figures do not depend on where the blocks are cut."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 16)) * rng.uniform(0.1, 20, size=16) + rng.normal(size=16)
    whole, parts = ChannelAccumulator(16), ChannelAccumulator(16)
    whole.add(x)
    for block in np.split(x, sorted(set(cuts))):
        if len(block):
            parts.add(block)
    for key, value in whole.finish().items():
        np.testing.assert_allclose(parts.finish()[key], value, rtol=1e-10, atol=1e-12)
    assert parts.tokens == 60


def test_build_ends_with_the_statistics_block(demo_reference) -> None:
    out = demo_reference.result.stdout
    assert "== target statistics" in out and "a seeded sample of" not in out  # 20 rows < 64: all of them
    assert "all 20 committed rows" in out and "outlier channels : none" in out


def test_warning_threshold_is_a_multiple_of_the_even_share_capped_for_narrow_teachers() -> None:
    assert warning_share(1280) == pytest.approx(OUTLIER_MULTIPLE * TOP_CHANNELS / 1280)
    assert warning_share(64) == 0.5


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda tmp: tmp / "nope.zarr", "does not exist"),
        (lambda tmp: tmp, "not a Zarr v3 group"),
        (
            lambda tmp: (
                create_store(
                    tmp / "empty.zarr",
                    clip_ids=["1", "2"],
                    labels=[0, 1],
                    teacher_width=8,
                    shard_rows=2,
                    pixels_zstd_level=1,
                    attrs={},
                ).path
            ),
            "no committed rows",
        ),
    ],
)
def test_bad_store_is_one_line(make, fragment, tmp_path) -> None:
    result = call_cli("stats", make(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("salt-cache: error:") and fragment in lines[0], result.stderr


def test_channel_standardisation_matches_numpy(planted) -> None:
    """The objective's transform: (x - mean) / std per channel with the run's statistics, then the per-token
    layer norm; the standardised latents have unit per-channel scale before that norm."""
    from shared.config import ModelConfig

    from salt_train.loss import SaltObjective
    from salt_train.model import build_salt_student
    from salt_train.target_norm import TargetNorm, normalise_targets

    stats = compute_stats(LatentStore.open(planted), rows=0)
    mean, std = stats.standardisation()
    x = all_latents(planted)
    standardised = (x - mean) / std
    flat = standardised.reshape(-1, stats.width)
    np.testing.assert_allclose(flat.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(flat.std(axis=0), 1, rtol=1e-9)

    model = ModelConfig(
        student="vit_tiny_patch16_224",
        student_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2},
        predictor_width=32,
        predictor_depth=1,
        predictor_heads=2,
        target_norm="channel",
    )
    objective = SaltObjective(build_salt_student(model, stats.width), "mse", TargetNorm.from_stats(stats))
    latents16 = torch.from_numpy(x[:2].astype(np.float16))
    ours = normalise_targets(latents16, objective.target_mean, objective.target_std)
    reference = numpy_layer_norm((latents16.double().numpy() - mean) / std)
    np.testing.assert_allclose(ours.numpy(), reference, atol=2e-4)
    plain = normalise_targets(latents16)  # layer: today's targets, dominated by the planted channels
    assert plain[..., list(PLANTED)].square().mean() > 10 * ours[..., list(PLANTED)].square().mean()
    layer_only = SaltObjective(objective.student, "mse")  # model.target_norm: layer: no statistics at all
    assert layer_only.target_mean is None and layer_only.target_std is None


@pytest.fixture(scope="module")
def channel_run(planted, tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("channel-run")
    pipeline = train_pipeline(
        work / "train.yaml", model__target_norm="channel", train__max_steps=16, train__checkpoint_every=8
    )
    run_dir = work / "run"
    result = call_train("run", "--cache", planted, "--pipeline", pipeline, "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr
    assert "== target statistics (model.target_norm: channel)" in result.stderr
    assert "measured on the snapshot, recorded in" in result.stderr
    return run_dir, pipeline


def test_target_norm_channel_trains_on_the_planted_store(channel_run, planted) -> None:
    run_dir, _ = channel_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert np.isfinite(losses).all() and len(losses) == 4
    assert losses[-1] < losses[0], losses
    recorded = json.loads((run_dir / "target_stats.json").read_text())
    assert sorted(recorded["outlier_channels"]) == sorted(PLANTED) and recorded["rows_read"] == 20


def test_resume_and_eval_use_the_recorded_statistics(channel_run, planted, tmp_path) -> None:
    from salt_train import run_folder
    from salt_train.eval.command import EvalRequest, load_subject, subject_config, subject_target_norm
    from salt_train.eval.heldout import heldout_figures
    from salt_train.target_norm import LAYER_NORM, recorded_stats, training_target_norm

    run_dir, _ = channel_run
    resumed_dir = tmp_path / "run"
    shutil.copytree(run_dir, resumed_dir)
    # Doctor the record: a resume must use these values, not statistics measured again.
    record = json.loads((resumed_dir / "target_stats.json").read_text())
    record["mean"] = [v + 1.0 for v in record["mean"]]
    (resumed_dir / "target_stats.json").write_text(json.dumps(record))
    store = LatentStore.open(planted)
    config = run_folder.read_run_config(resumed_dir)
    recorded = recorded_stats(config.model.target_norm, resumed_dir, resume=True)
    used = training_target_norm(config.model.target_norm, config.train.seed, resumed_dir, store, recorded)
    np.testing.assert_array_equal(used.mean.numpy(), np.asarray(record["mean"], dtype=np.float32))

    result = call_train("run", "--cache", planted, "--run-dir", resumed_dir, "--resume", "--max-steps", "20")
    assert result.returncode == 0, result.stderr
    assert "read back from" in result.stderr  # the block; the log lines go to the test's own stderr
    steps = [json.loads(line)["step"] for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16, 20]  # continued from the step-16 checkpoint
    assert json.loads((resumed_dir / "target_stats.json").read_text()) == record  # never rewritten

    # The held-out loss applies the run's transform: the doctored mean changes it.
    request = EvalRequest(target=resumed_dir, val_cache=planted)
    subject = load_subject(request, subject_config(request), store.teacher_width)
    target_norm = subject_target_norm(subject)
    np.testing.assert_array_equal(target_norm.mean.numpy(), np.asarray(record["mean"], dtype=np.float32))
    rows = np.arange(4)
    device = torch.device("cpu")
    students = {"student": subject.student}
    mask, loss = subject.config.mask, subject.config.model.loss
    with_record = heldout_figures(store, rows, mask, loss, device, 4, 0, students, target_norm, None)["student"]
    layer_only = heldout_figures(store, rows, mask, loss, device, 4, 0, students, LAYER_NORM, None)["student"]
    assert np.isfinite(with_record["loss"]) and with_record["loss"] != layer_only["loss"]

    (resumed_dir / "target_stats.json").unlink()  # checkpoints but no record: refused, one line
    result = call_train("run", "--cache", planted, "--run-dir", resumed_dir, "--resume", "--max-steps", "24")
    assert result.returncode == 2 and "no target_stats.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
