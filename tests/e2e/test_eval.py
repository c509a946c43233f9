"""`salt-train eval` on real demo stores built by the tiny VideoMAE teacher.

The probes, the temporal transforms and the references are checked on real
stores; the bad inputs of the issue each give one line and exit 2.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from shared.store import LatentStore

from salt_cache.demo_data import write_demo_dataset
from salt_train.eval import temporal
from salt_train.eval.probes import ProbeSettings, attentive_probe, linear_probe, retrieval_top1
from salt_train.target_norm import LAYER_NORM
from tests.conftest import call_cli, call_train, fast_pipeline, train_pipeline

TEACHER = "builtin:tiny-videomae"


@dataclass
class EvalStores:
    root: Path
    train: Path
    val: Path
    run: Path  # a trained tiny student
    pipeline: Path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> EvalStores:
    """48 train and 48 validation demo clips (4 motion classes) built by the tiny teacher; a tiny student
    trained 40 steps on the train store."""
    root = tmp_path_factory.mktemp("eval-ssv2")
    write_demo_dataset(root, train=48, validation=48, test=6, seed=3, height=120, width=160)
    pipeline = fast_pipeline(root / "build.yaml", store__shard_rows=8, teacher__batch_size=8)
    train, val = root / "latents.zarr", root / "latents-val.zarr"
    for split, out in (("train", train), ("validation", val)):
        result = call_cli(
            "build", "--src", root, "--split", split, "--out", out, "--teacher", TEACHER, "--pipeline", pipeline
        )
        assert result.returncode == 0, result.stderr
    recipe = train_pipeline(
        root / "train.yaml",
        train__max_steps=40,
        train__batch_size=4,
        train__lr=2e-3,
        train__checkpoint_every=20,
        train__log_every=10,
        mask__kind="random",
        eval__train_rows=32,
        eval__val_rows=24,
        eval__temporal_rows=12,
        eval__batch_size=8,
        eval__probe_epochs=3,
        eval__probe_pool=2,  # 2x2 pooled tokens before the attentive probe, as the demo: 4x cheaper on a CPU
        eval__linear_iterations=50,
    )
    run = root / "runs" / "tiny"
    result = call_train("run", "--cache", train, "--pipeline", recipe, "--run-dir", run)
    assert result.returncode == 0, result.stderr
    return EvalStores(root, train, val, run, recipe)


def _labelled(store_path: Path) -> tuple[torch.Tensor, np.ndarray]:
    store = LatentStore.open(store_path)
    rows = np.flatnonzero(np.asarray(store.array("label")[:]) >= 0)
    latents = np.asarray(store.array("latents")[rows[0] : rows[-1] + 1])[rows - rows[0]]
    return LAYER_NORM.normalise(latents), np.asarray(store.array("label")[:], dtype=np.int64)[rows]


def test_attentive_probe_on_teacher_latents_beats_chance_and_shuffled_labels_do_not(stores: EvalStores) -> None:
    train_x, train_y = _labelled(stores.train)
    val_x, val_y = _labelled(stores.val)
    read = lambda x: lambda ids: x[torch.as_tensor(ids)]  # noqa: E731
    probe = lambda labels, epochs: attentive_probe(  # noqa: E731
        read(train_x),
        labels,
        read(val_x),
        val_y,
        train_x.shape[-1],
        4,
        ProbeSettings(epochs=epochs, lr=2e-2, weight_decay=0.01, batch_size=8, seed=0, device=torch.device("cpu")),
        heads=16,
    )  # the probe's capacity is under test here, not the head rule (16 heads of 4 channels)
    real = probe(train_y, 200)
    assert real.chance == 0.25
    assert real.top1 >= 0.6, real  # 4 motion classes, 12 per class in validation: chance is 25%
    shuffled = probe(np.random.default_rng(0).permutation(train_y), 200)
    assert shuffled.top1 <= 0.45, (shuffled, real)  # 12 per class: chance 25% +- 6%
    assert probe(train_y, 3) == probe(train_y, 3)  # same inputs and seed, same numbers


def test_linear_probe_is_deterministic_and_learns_a_separable_problem() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=90)
    features = torch.from_numpy(rng.normal(size=(90, 8)).astype(np.float32))
    features[:, 0] += torch.from_numpy(labels * 4.0).float()  # one informative feature
    settings = ProbeSettings(epochs=30, lr=1e-2, weight_decay=0.0, batch_size=16, seed=1, device=torch.device("cpu"))
    first = linear_probe(features[:60], labels[:60], features[60:], labels[60:], 3, settings)
    second = linear_probe(features[:60], labels[:60], features[60:], labels[60:], 3, settings)
    assert first == second
    assert first.top1 >= 0.9


def test_temporal_transforms() -> None:
    clip = np.random.default_rng(0).integers(0, 256, size=(2, 16, 4, 4, 3), dtype=np.uint8)
    rows = np.array([5, 9])
    frames = lambda order: clip[:, np.asarray(order)]  # noqa: E731
    # Tubelet k holds frames 2k and 2k+1; the probes move whole tubelets, so no tubelet gets a new frame pair.
    swapped = frames([2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13])
    stutter = frames([0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13])
    expected = {
        "original": clip,
        "reversed": clip[:, ::-1],
        "swapped": swapped,
        "stutter": stutter,
        "stride1": frames([j // 4 for j in range(16)]),
        "stride2": frames([j // 2 for j in range(16)]),
        "second_half": frames([8 + j // 2 for j in range(16)]),
    }
    assert set(expected) == set(temporal.VARIANTS)
    for name, want in expected.items():  # each variant is a frame gather, on numpy and on torch alike
        assert np.array_equal(temporal.Variant(name).apply(clip, rows), want), name
        assert np.array_equal(temporal.Variant(name).apply(torch.from_numpy(clip), rows).numpy(), want), name
    pairs = lambda v: {tuple(v[0, 2 * k : 2 * k + 2, 0, 0, 0]) for k in range(8)}  # noqa: E731
    for name in ("swapped", "stutter"):
        assert pairs(expected[name]) <= pairs(clip), name  # every tubelet is one of the clip's own
    assert {t.name for t in temporal.TASKS if t.sanity} == {"playback_stride"} and temporal.RETRIEVAL_SANITY


def _eval(stores: EvalStores, *args: str | Path) -> tuple[int, str, dict | None]:
    out = stores.root / f"eval-{len(list(stores.root.glob('eval-*')))}"
    result = call_train("eval", stores.run, "--val-cache", stores.val, "--out", out, *args)
    report = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else None
    return result.returncode, result.stdout + result.stderr, report


def test_eval_of_a_trained_run(stores: EvalStores) -> None:
    code, output, report = _eval(stores, "--teacher", TEACHER)
    assert code == 0, output
    heldout = report["heldout"]
    assert heldout["student"]["loss"] < heldout["random_init"]["loss"]  # training helped on held-out clips
    assert heldout["student"]["r2"] > heldout["random_init"]["r2"]
    # The mean-latent baseline (no input) is the floor: R^2 about 0 per channel, and the student is above it.
    baseline = heldout["mean_latent"]
    assert abs(baseline["r2"]) < 0.05 and max(abs(r) for r in baseline["r2_channels"]) < 0.2, baseline
    assert heldout["student"]["r2"] > baseline["r2"] and heldout["student"]["loss"] < baseline["loss"]
    for name in ("student", "random_init", "mean_latent"):
        low, high = heldout[name]["loss_interval"]
        assert low <= heldout[name]["loss"] <= high
    for task in ("arrow_of_time", "order", "continuity", "playback_stride", "clip_consistency"):
        assert report["temporal"][task]["sanity_check"] == (task in ("playback_stride", "clip_consistency"))
        for model in ("pixels", "random_init", "student", "teacher"):
            figure = report["temporal"][task][model]
            assert 0.0 <= figure["top1_interval"][0] <= figure["top1"] <= figure["top1_interval"][1] <= 1.0
            assert len(figure["top1_seeds"]) == (3 if task != "clip_consistency" else 1)
    assert report["summary"]["tasks"] == ["arrow_of_time", "order", "continuity"]
    classification = report["classification"]
    assert classification["classes"] == 4 and classification["val_rows"] == 24
    assert set(classification["attentive"]) == {"pixels", "random_init", "student", "teacher"}
    # The attentive probe takes each encoder's own head count (the teacher's from the store).
    assert classification["heads"] == {"pixels": 4, "random_init": 2, "student": 2, "teacher": 4}
    assert len(report["rows"]["train"]) == 32 and len(report["rows"]["val"]) == 24
    assert report["stores"]["val"]["identity"] == LatentStore.open(stores.val).attrs["identity"]
    assert (Path(report["subject"]["path"]) / "metrics.jsonl").is_file()
    png = next(stores.root.glob("eval-*/eval.png")).read_bytes()
    assert png.startswith(b"\x89PNG")
    assert "held-out R^2" in output and "random-init" in output and "pixels" in output and "[sanity]" in output

    # The same inputs and seed give the same numbers; without --teacher its temporal column is "not run".
    code, output, again = _eval(stores)
    assert code == 0, output
    assert again["heldout"] == report["heldout"] and again["classification"] == report["classification"]
    assert again["temporal"]["order"]["student"] == report["temporal"]["order"]["student"]
    assert "not_run" in again["temporal"]["order"]["teacher"]


def test_eval_of_an_export_and_of_a_store_without_labels(stores: EvalStores, tmp_path: Path) -> None:
    unlabelled = tmp_path / "latents-test.zarr"
    build = call_cli(
        "build",
        "--src",
        stores.root,
        "--split",
        "test",
        "--out",
        unlabelled,
        "--teacher",
        TEACHER,
        "--pipeline",
        stores.root / "build.yaml",
    )
    assert build.returncode == 0, build.stderr
    result = call_train(
        "eval",
        stores.run / "export",
        "--val-cache",
        unlabelled,
        "--train-cache",
        stores.train,
        "--train-rows",
        "8",
        "--val-rows",
        "6",
        "--set",
        "eval.batch_size=4",
        "--set",
        "eval.linear_iterations=20",
        "--out",
        tmp_path / "eval",
        "--profile",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["classification"] == {"skipped": "the validation store has no labels"}
    assert "not_run" in report["heldout"]["student"]  # an export has no predictor
    assert "skipped" in result.stdout
    # --profile: the same phases as the wall clock's, each with its busy share and top operators
    phases = report["profile"]["by_phase"]
    assert list(phases) == list(report["seconds_by_phase"])
    assert phases["features_train"]["top"] and 0 < phases["features_train"]["busy_fraction"] <= 1
    assert (tmp_path / "eval" / "profile.txt").read_text().startswith("where the evaluation's time goes")
    assert (tmp_path / "eval" / "profile-features_train.json.gz").stat().st_size > 0


def test_temporal_variants_run_batched_give_each_variant_s_own_features(stores: EvalStores, tmp_path: Path) -> None:
    """extract() stacks every transformed variant of a batch's temporal rows into full batches: the pooled
    features must be those of one forward per variant."""
    from shared.teacher import load_teacher

    from salt_train.eval.features import EncoderFeatures, ExtractionPlan, TeacherFeatures, extract, slot_pool
    from salt_train.student import VideoViT, create_timm_vit
    from tests.conftest import TINY_STUDENT

    store = LatentStore.open(stores.val)
    rows = np.arange(5)
    temporal_rows = np.array([True, False, True, True, False])
    torch.manual_seed(0)
    model = EncoderFeatures(
        "tiny", VideoViT(create_timm_vit("vit_tiny_patch16_224", TINY_STUDENT)), torch.device("cpu")
    )
    teacher = TeacherFeatures("teacher", load_teacher(TEACHER, device="cpu", dtype="float32"))
    plan = ExtractionPlan(rows, temporal_rows, temporal.VARIANTS, keep_tokens=True, seed=0)
    features, _ = extract(store, plan, {"tiny": model, "teacher": teacher}, 3, 1 << 30, tmp_path, "val")
    views = torch.from_numpy(np.asarray(store.array("pixels")[: len(rows)])[temporal_rows])
    for variant in temporal.VARIANTS:
        for name, source in (("tiny", model), ("teacher", teacher)):
            alone = slot_pool(source.tokens(temporal.Variant(variant).apply(views, rows[temporal_rows])))
            # the teacher's original view is read from the store (the build ran it on that view), not run again
            torch.testing.assert_close(features[name].slots[variant], alone, rtol=1e-4, atol=1e-4)
    assert features["teacher"].tokens is None  # its label probe reads the store's latents: no second bank


def test_few_frame_clips_and_encoders() -> None:
    from salt_train.eval.frames import frame_window, with_slots
    from salt_train.eval.pixels import pixel_tokens
    from salt_train.student import build_student

    # The T centre frames from a tubelet boundary: each input tubelet is one of the 16-frame clip's own.
    assert [frame_window(t).tolist() for t in (2, 4, 8)] == [[6, 7], [6, 7, 8, 9], list(range(4, 12))]
    assert [[task.name for task in temporal.tasks_at(t)] for t in (2, 4)] == [
        ["arrow_of_time"],
        ["arrow_of_time", "order", "continuity"],
    ]
    clip = np.random.default_rng(0).integers(0, 256, size=(1, 4, 224, 224, 3), dtype=np.uint8)
    assert np.array_equal(temporal.Variant("swapped").apply(clip, np.zeros(1)), clip[:, [2, 3, 0, 1]])
    assert np.array_equal(temporal.Variant("stutter").apply(clip, np.zeros(1)), clip[:, [0, 1, 0, 1]])
    # The pixel floor of T frames is the 16-frame one's tokens of those tubelets.
    views = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(1, 16, 224, 224, 3), dtype=np.uint8))
    assert torch.equal(pixel_tokens(views[:, 6:10]), pixel_tokens(views)[:, 3 * 196 : 5 * 196])
    encoder = build_student("vit_tiny_patch16_224", kwargs={"depth": 1}).eval()
    few = with_slots(encoder, 4)
    assert few.blocks is encoder.blocks and encoder.pos_embed.shape[1] == 1568 and few.pos_embed.shape[1] == 392
    assert few(torch.zeros(1, 3, 4, 224, 224)).shape == (1, 392, encoder.width)


def test_eval_of_an_imported_vjepa_encoder_with_few_frame_rows_and_latency(stores: EvalStores, tmp_path: Path) -> None:
    from tests.vjepa_checkpoint import vjepa_encoder_state, write_vjepa_checkpoint

    checkpoint = write_vjepa_checkpoint(tmp_path / "vitt16.pth.tar", vjepa_encoder_state(32, 1))
    result = call_train("import-encoder", checkpoint, tmp_path / "export", "--heads", "2")
    assert result.returncode == 0, result.stderr
    result = call_train(
        "eval",
        tmp_path / "export",
        "--val-cache",
        stores.val,
        "--train-cache",
        stores.train,
        "--pipeline",
        stores.pipeline,
        "--train-rows",
        "12",
        "--val-rows",
        "8",
        "--set",
        "eval.few_frames=[2,4]",
        "--set",
        "eval.latency_repeats=2",
        "--set",
        "eval.probe_seeds=2",
        "--set",
        "eval.temporal_rows=6",
        "--set",
        "eval.linear_iterations=10",
        "--set",
        "eval.probe_epochs=2",
        "--out",
        tmp_path / "eval",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    few = report["few_frames"]["frames"]
    assert set(few) == {"2", "4"} and few["2"]["frames"] == [6, 7] and few["4"]["frames"] == [6, 7, 8, 9]
    assert list(few["2"]["temporal"]) == ["arrow_of_time"] and few["2"]["undefined"] == ["order", "continuity"]
    assert list(few["4"]["temporal"]) == ["arrow_of_time", "order", "continuity"]
    for entry in few.values():
        for figures in (*entry["temporal"].values(), entry["classification"]["attentive"]):
            for column in ("pixels", "random_init", "student"):
                figure = figures[column]
                assert 0.0 <= figure["top1_interval"][0] <= figure["top1"] <= figure["top1_interval"][1] <= 1.0
                assert len(figure["top1_seeds"]) == 2
            assert "takes 16 frames" in figures["teacher"]["not_run"]
        assert entry["classification"]["heads"] == {"pixels": 4, "random_init": 2, "student": 2}
    latency = report["latency"]
    assert set(latency["frames"]) == {"2", "4", "8", "16"} and latency["repeats"] == 2
    for figure in latency["frames"].values():
        assert 0 < figure["min_ms"] <= figure["median_ms"] <= figure["max_ms"] < float("inf")
    assert "SSv2 attentive probe top-1, 2 frames (6-7)" in result.stdout and "order, 4 frames (6-9)" in result.stdout
    assert "encoder ms per clip at T=2/4/8/16" in result.stdout


def _damaged_run(stores: EvalStores, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(stores.run, run)
    return run


def test_bad_input_is_one_line_and_exit_2(stores: EvalStores, tmp_path: Path) -> None:
    def refused(*args: str | Path) -> str:
        result = call_train("eval", *args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    empty = tmp_path / "empty-run"
    empty.mkdir()
    shutil.copy(stores.run / "config.yaml", empty / "config.yaml")
    assert "neither an export/ nor a checkpoint" in refused(empty, "--val-cache", stores.val)
    assert "has only 48 committed rows" in refused(stores.run, "--val-cache", stores.val, "--val-rows", "1000")
    assert "--val-cache is required" in refused(stores.run)
    assert "does not exist" in refused(tmp_path / "nowhere", "--val-cache", stores.val)

    # A checkpoint of another architecture than the recipe says.
    other = _damaged_run(stores, tmp_path)
    recipe = yaml.safe_load((other / "config.yaml").read_text())
    recipe["model"]["student_kwargs"]["depth"] = 3
    (other / "config.yaml").write_text(yaml.safe_dump(recipe))
    assert "as the run's recipe says" in refused(other, "--val-cache", stores.val)

    # Validation stores made by another teacher and by another view recipe.
    other_teacher = tmp_path / "val-other-teacher.zarr"
    other_teacher_dir = tmp_path / "teacher-seed1"
    from tests.conftest import build_tiny_teacher

    build_tiny_teacher(seed=1).save_pretrained(other_teacher_dir)
    small = fast_pipeline(tmp_path / "small.yaml", store__shard_rows=8, teacher__batch_size=8, cache__limit=4)
    assert (
        call_cli(
            "build",
            "--src",
            stores.root,
            "--split",
            "validation",
            "--out",
            other_teacher,
            "--teacher",
            other_teacher_dir,
            "--pipeline",
            small,
        ).returncode
        == 0
    )
    assert "another teacher" in refused(stores.run, "--val-cache", other_teacher)
    other_view = tmp_path / "val-other-view.zarr"
    bilinear = fast_pipeline(
        tmp_path / "bilinear.yaml",
        store__shard_rows=8,
        teacher__batch_size=8,
        cache__limit=4,
        view__interpolation="bilinear",
    )
    assert (
        call_cli(
            "build",
            "--src",
            stores.root,
            "--split",
            "validation",
            "--out",
            other_view,
            "--teacher",
            TEACHER,
            "--pipeline",
            bilinear,
        ).returncode
        == 0
    )
    assert "another view recipe" in refused(stores.run, "--val-cache", other_view)
    assert "eval.* fields only" in refused(stores.run, "--val-cache", stores.val, "--set", "train.lr=1")


def test_eval_every_records_quick_evaluations_and_trains_the_same(stores: EvalStores, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from salt_train.checkpoint import latest_checkpoint

    runs = {}
    for name, extra in (
        ("plain", {}),
        ("with-eval", {"train__eval_every": 5, "eval__val_cache": str(stores.val), "eval__quick_rows": 8}),
    ):
        recipe = train_pipeline(
            tmp_path / f"{name}.yaml",
            train__max_steps=10,
            train__batch_size=4,
            train__checkpoint_every=100,
            train__log_every=5,
            mask__kind="random",
            eval__linear_iterations=20,
            eval__batch_size=4,
            **extra,
        )
        result = call_train("run", "--cache", stores.train, "--pipeline", recipe, "--run-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in runs["with-eval"] if "eval" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all(set(r["eval"]) >= {"heldout_loss", "heldout_r2"} for r in evals)
    assert not any("linear_top1" in r["eval"] for r in evals)  # 8 rows of 4 classes: under 10 a class, no probe
    losses = lambda records: [r["loss"] for r in records if "eval" not in r]  # noqa: E731
    assert losses(runs["with-eval"]) == losses(runs["plain"])  # evaluating does not change training
    weights = [load_file(latest_checkpoint(tmp_path / name) / "model.safetensors") for name in ("plain", "with-eval")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    recipe = train_pipeline(tmp_path / "no-val.yaml", train__eval_every=5)
    result = call_train("run", "--cache", stores.train, "--pipeline", recipe, "--run-dir", tmp_path / "no-val")
    assert result.returncode == 2 and "train.eval_every needs eval.val_cache" in result.stderr, result.stderr


# ---- the floor: what raw pixels pass -------------------------------------------------------------


def _pixel_slots(store_path: Path, orders: dict[str, Callable[[int], np.ndarray] | None]) -> tuple[np.ndarray, dict]:
    """Slot-pooled pixel features of every committed row under each frame order: ``order(row)`` gives the
    16 frame indices of that row, None takes the eval's own variant of that name."""
    from shared.rows import read_rows

    from salt_train.eval.features import slot_pool
    from salt_train.eval.pixels import pixel_tokens
    from salt_train.eval.rows import eval_candidates

    store = LatentStore.open(store_path)
    rows = eval_candidates(store)
    slots: dict[str, list[torch.Tensor]] = {name: [] for name in orders}
    for start in range(0, len(rows), 8):
        ids = rows[start : start + 8]
        (views,) = read_rows(store, ids, ("pixels",))
        for name, order in orders.items():
            varied = (
                temporal.Variant(name).apply(views, ids)
                if order is None
                else np.stack([view[order(int(row))] for view, row in zip(views, ids, strict=False)])
            )
            slots[name].append(slot_pool(pixel_tokens(torch.from_numpy(np.ascontiguousarray(varied)))))
    return rows, {name: torch.cat(parts) for name, parts in slots.items()}


def _pixels_top1(train: dict, val: dict, classes: tuple[str, ...], val_rows: np.ndarray) -> dict:
    from salt_train.eval.command import over_seeds
    from salt_train.eval.probes import stack_tasks

    scores = []
    for seed in (0, 1, 2):
        train_x, train_y = stack_tasks(train, classes)
        val_x, val_y = stack_tasks(val, classes)
        scores.append(
            linear_probe(
                train_x,
                train_y,
                val_x,
                val_y,
                len(classes),
                ProbeSettings(300, 0.0, 1e-3, 64, seed, torch.device("cpu")),
            )
        )
    return over_seeds(scores, np.tile(val_rows, len(classes)), 0)


@pytest.fixture(scope="module")
def pixel_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """96 train and 96 validation demo clips as pixels-only stores (no teacher: the floor needs no latents)."""
    root = tmp_path_factory.mktemp("pixel-floor")
    write_demo_dataset(root, train=96, validation=96, test=0, seed=11, height=120, width=160)
    pipeline = fast_pipeline(root / "build.yaml", store__shard_rows=8)
    stores = root / "pixels.zarr", root / "pixels-val.zarr"
    for split, out in zip(("train", "validation"), stores, strict=False):
        result = call_cli(
            "build", "--src", root, "--split", split, "--out", out, "--pixels-only", "--pipeline", pipeline
        )
        assert result.returncode == 0, result.stderr
    return stores


def test_pixels_cannot_pass_the_temporal_probes_but_solve_the_old_ones(pixel_stores: tuple[Path, Path]) -> None:
    """The encoder-free feature sits within 10 points of chance on every temporal probe that is not a
    sanity check, and solves the probes as they were before (so this test can fail)."""
    n = np.arange(16)

    def frame_shuffle(row: int) -> np.ndarray:  # the old single-frame shuffle
        rng = np.random.default_rng(np.random.SeedSequence([0, row, 7]))
        while np.array_equal(order := rng.permutation(16), n):
            pass
        return order

    orders: dict[str, Callable[[int], np.ndarray] | None] = {v: None for v in temporal.VARIANTS}
    orders |= {"static": lambda row: np.zeros(16, dtype=int), "frames_shuffled": frame_shuffle}
    train_rows, train = _pixel_slots(pixel_stores[0], orders)
    val_rows, val = _pixel_slots(pixel_stores[1], orders)
    for task in temporal.TASKS:
        figure = _pixels_top1(train, val, task.classes, val_rows)
        chance = 1 / len(task.classes)
        if task.sanity:
            assert figure["top1"] > chance + 0.2, (task.name, figure)  # labelled a sanity check for a reason
        else:
            assert abs(figure["top1"] - chance) <= 0.10, (task.name, figure)

    # Today's probes as they were: pixels pass them.
    assert _pixels_top1(train, val, ("original", "static"), val_rows)["top1"] >= 0.9
    assert _pixels_top1(train, val, ("original", "frames_shuffled"), val_rows)["top1"] >= 0.75
    first, second = temporal.RETRIEVAL_PAIR
    assert retrieval_top1(val[first], val[second]).top1 >= 0.5  # chance 1/96


def test_label_probes_on_shuffled_labels_sit_at_chance(stores: EvalStores) -> None:
    """Labels shuffled: every label probe, the pixels column included, has chance inside its interval."""
    from salt_train.eval.command import over_seeds
    from salt_train.eval.features import pool_tokens
    from salt_train.eval.pixels import HEADS, pixel_tokens

    rng = np.random.default_rng(5)
    features = {}
    for split, path in (("train", stores.train), ("val", stores.val)):
        latents, labels = _labelled(path)
        store = LatentStore.open(path)
        rows = np.flatnonzero(np.asarray(store.array("label")[:]) >= 0)
        from shared.rows import read_rows

        (views,) = read_rows(store, rows, ("pixels",))
        features[split] = {  # tokens pooled 2x2 as the demo's eval.probe_pool: 4x cheaper
            "teacher": pool_tokens(latents, 2),
            "pixels": pool_tokens(pixel_tokens(torch.from_numpy(views)), 2),
            "labels": rng.permutation(labels),
            "rows": rows,
        }
    train, val = features["train"], features["val"]
    for name, heads in (("teacher", 4), ("pixels", HEADS)):
        read = lambda x: lambda ids: x[torch.as_tensor(ids)]  # noqa: E731
        attentive, linear = [], []
        for seed in (0, 1, 2):
            settings = ProbeSettings(30, 2e-2, 0.01, 8, seed, torch.device("cpu"))
            attentive.append(
                attentive_probe(
                    read(train[name]),
                    train["labels"],
                    read(val[name]),
                    val["labels"],
                    train[name].shape[-1],
                    4,
                    settings,
                    heads,
                )
            )
            linear.append(
                linear_probe(
                    train[name].mean(1),
                    train["labels"],
                    val[name].mean(1),
                    val["labels"],
                    4,
                    ProbeSettings(100, 0.0, 1e-3, 64, seed, torch.device("cpu")),
                )
            )
        for probe, scores in (("attentive", attentive), ("linear", linear)):
            figure = over_seeds(scores, val["rows"], 0)
            low, high = figure["top1_interval"]
            assert low <= 0.25 <= high, (name, probe, figure)


def test_held_out_r2_is_per_channel_and_the_mean_latent_baseline_scores_zero() -> None:
    from salt_train.eval.heldout import RowSums, summarise

    rng = np.random.default_rng(0)
    rows, tokens, width = 12, 20, 6
    scale = torch.tensor([10.0, 1, 1, 1, 1, 0.1])  # one loud channel must not carry R^2
    targets = torch.from_numpy(rng.normal(size=(rows, tokens, width))).float() * scale
    mean = targets.mean((0, 1))
    sums = {k: RowSums.zeros(rows, 1, width) for k in ("mean", "loud")}
    good_on_loud = targets.clone()
    good_on_loud[..., 1:] = mean[1:]  # perfect on the loud channel, the mean elsewhere
    for r in range(rows):
        sums["mean"].add(slice(r, r + 1), 0, mean - targets[r : r + 1], targets[r : r + 1])
        sums["loud"].add(slice(r, r + 1), 0, good_on_loud[r : r + 1] - targets[r : r + 1], targets[r : r + 1])
    baseline = summarise(sums["mean"], "mse", 0)
    assert np.allclose(baseline["r2_channels"], 0.0, atol=1e-6) and abs(baseline["r2"]) < 1e-6
    loud = summarise(sums["loud"], "mse", 0)
    assert np.isclose(loud["r2"], 1 / width, atol=1e-6)  # pooled variance would have called this 0.97
    assert loud["r2_interval"][0] < loud["r2_interval"][1] <= loud["r2"] + 1e-9  # resampled rows move the means


# ---- held out means held out ---------------------------------------------------------------------


def test_a_validation_store_that_is_not_held_out_is_refused(stores: EvalStores, tmp_path: Path) -> None:
    def refused(val: Path) -> str:
        result = call_train("eval", stores.run, "--val-cache", val, "--out", tmp_path / "eval")
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    assert "is the train store" in refused(stores.train)
    small = fast_pipeline(tmp_path / "small.yaml", store__shard_rows=8, teacher__batch_size=8, cache__limit=4)
    same_split = tmp_path / "train-again.zarr"
    assert (
        call_cli(
            "build",
            "--src",
            stores.root,
            "--split",
            "train",
            "--out",
            same_split,
            "--teacher",
            TEACHER,
            "--pipeline",
            small,
        ).returncode
        == 0
    )
    assert "same split (train)" in refused(same_split)
    # The same clips under another root (a copied download) and called validation: shared clip ids.
    copy = tmp_path / "copy"
    shutil.copytree(stores.root / "20bn-something-something-v2", copy / "20bn-something-something-v2")
    (copy / "labels").mkdir()
    for name in ("labels.json", "train.json"):
        shutil.copy(stores.root / "labels" / name, copy / "labels" / name)
    shutil.copy(stores.root / "labels" / "train.json", copy / "labels" / "validation.json")
    shared = tmp_path / "shared-clips.zarr"
    assert (
        call_cli(
            "build", "--src", copy, "--split", "validation", "--out", shared, "--teacher", TEACHER, "--pipeline", small
        ).returncode
        == 0
    )
    assert "shares 4 clip(s) with the train store" in refused(shared)


def test_pixel_tokens_follow_the_token_grid() -> None:
    """Token t*196 + h*14 + w describes frames 2t, 2t+1 at rows 16h.. and columns 16w.. and nothing else."""
    from salt_train.eval.pixels import WIDTH, pixel_tokens

    views = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(2, 16, 224, 224, 3), dtype=np.uint8))
    tokens = pixel_tokens(views)
    assert tokens.shape == (2, 1568, WIDTH) and WIDTH == 36
    t, h, w = 5, 3, 11
    patch = views[1, 2 * t : 2 * t + 2, 16 * h : 16 * h + 16, 16 * w : 16 * w + 16].float() / 255  # [2, 16, 16, 3]
    looks = patch.view(2, 2, 8, 2, 8, 3).mean((2, 4))  # [frame, 2, 2, rgb]
    moves = (patch[1] - patch[0]).abs().view(2, 8, 2, 8, 3).mean((1, 3))  # [2, 2, rgb]
    token = tokens[1, t * 196 + h * 14 + w]
    assert torch.allclose(token[:24], looks.permute(0, 3, 1, 2).reshape(-1), atol=1e-6)
    assert torch.allclose(token[24:], moves.permute(2, 0, 1).reshape(-1), atol=1e-6)


# ---- where eval writes -------------------------------------------------------------------------------

TINY_EVAL = (
    "--val-rows",
    "8",
    "--set",
    "eval.temporal_rows=2",
    "--set",
    "eval.probe_epochs=2",
    "--set",
    "eval.probe_seeds=1",
    "--set",
    "eval.linear_iterations=20",
    "--set",
    "eval.batch_size=4",
    "--set",
    "eval.feature_memory_gb=0.000001",
)  # every token bank spills to disk


def _table(stdout: str) -> list[str]:
    """The printed table's figure lines (not the header line, which names the output folder)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("figure"))
    return [line for line in lines[start:] if not line.startswith("==")]


def _figures(stdout: str) -> list[str]:
    """The table without its latency row: a timing, which two evaluations at once change."""
    return [line for line in _table(stdout) if not line.startswith("encoder ms per clip")]


def test_two_evaluations_of_one_run_at_once_give_the_figures_each_gives_alone(stores: EvalStores) -> None:
    """They spill tokens into the same run's eval/ folder: each has a scratch folder of its own."""
    from tests.conftest import REPO

    def launch(train_rows: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "salt_train",
                "eval",
                str(stores.run),
                "--val-cache",
                str(stores.val),
                "--train-rows",
                train_rows,
                *TINY_EVAL,
            ],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    together = [launch("8"), launch("12")]
    outputs = [p.communicate(timeout=600) for p in together]
    assert all(p.returncode == 0 for p in together), [o[1][-2000:] for o in outputs]
    for (stdout, _), train_rows in zip(outputs, ("8", "12"), strict=False):
        alone = call_train(
            "eval",
            stores.run,
            "--val-cache",
            stores.val,
            "--train-rows",
            train_rows,
            *TINY_EVAL,
            "--out",
            stores.root / f"alone-{train_rows}",
        )
        assert alone.returncode == 0, alone.stderr
        assert _figures(stdout) == _figures(alone.stdout)
    assert not list((stores.run / "eval").glob(".features-*"))  # no scratch left behind


def test_an_output_folder_that_cannot_take_the_evaluation_is_one_line(stores: EvalStores, tmp_path: Path) -> None:
    from tests.e2e.test_faults import small_tmpfs

    def refused(out: Path) -> str:
        result = call_train(
            "eval", stores.run, "--val-cache", stores.val, "--train-rows", "16", *TINY_EVAL, "--out", out
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    with small_tmpfs(tmp_path / "full", "256k") as small:  # the spilled tokens need about 1.6 MB
        assert "free under" in refused(small / "eval")
        assert not any(small.rglob("*.zarr"))
    with small_tmpfs(tmp_path / "ro", "1m") as read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
        assert "cannot write to" in refused(read_only / "eval")


def test_a_disk_that_fills_during_the_evaluation_is_one_line_and_keeps_no_scratch(tmp_path: Path) -> None:
    from shared.errors import SaltUsageError

    from salt_train.eval.output import scratch
    from tests.e2e.test_faults import small_tmpfs

    with small_tmpfs(tmp_path / "small", "64k") as small:
        with pytest.raises(SaltUsageError, match="could not write under"), scratch(small) as spill:
            (spill / "tokens.bin").write_bytes(b"\0" * 1_000_000)
        assert list(small.iterdir()) == []


def test_the_interval_widens_when_one_probe_seed_fails() -> None:
    """Three seeds right on 80% of 64 rows, or two such seeds and one at chance: the same rows, so a
    rows-only interval of the mean would look as tight as ever; resampling the seeds too shows the failure."""
    from salt_train.eval.stats import seeded_score

    rng = np.random.default_rng(0)
    good = (rng.random((3, 64)) < 0.8).astype(np.float64)
    failed = good.copy()
    failed[2] = rng.random(64) < 0.25
    rows = np.arange(64)
    steady, unstable = (seeded_score(c, None, rows, 0.25, 0) for c in (good, failed))
    steady_width = steady.top1_interval[1] - steady.top1_interval[0]
    unstable_width = unstable.top1_interval[1] - unstable.top1_interval[0]
    assert unstable_width > 1.5 * steady_width, (steady, unstable)
    assert unstable.top1_interval[0] < min(unstable.top1_seeds) + 0.05  # the failed seed's level is in reach
    one = seeded_score(good[:1], None, rows, 0.25, 0)  # one seed: rows only
    assert one.top1_interval[0] < one.top1 < one.top1_interval[1]
