"""`salt-train eval` on real demo stores built by the tiny VideoMAE teacher.

The probes, the temporal transforms and the references are checked on real
stores; the bad inputs of the issue each give one line and exit 2.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from salt_cache.demo_data import write_demo_dataset
from shared.store import LatentStore
from salt_train.eval.features import normed_latents
from salt_train.eval.probes import ProbeSettings, attentive_probe, linear_probe
from salt_train.eval import temporal
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
        result = call_cli("build", "--src", root, "--split", split, "--out", out, "--teacher", TEACHER,
                          "--pipeline", pipeline)
        assert result.returncode == 0, result.stderr
    recipe = train_pipeline(root / "train.yaml", train__max_steps=40, train__batch_size=4, train__lr=2e-3,
                            train__checkpoint_every=20, train__log_every=10, mask__kind="random",
                            eval__train_rows=32, eval__val_rows=24, eval__temporal_rows=12, eval__batch_size=8,
                            eval__probe_epochs=3, eval__linear_iterations=50)
    run = root / "runs" / "tiny"
    result = call_train("run", "--cache", train, "--pipeline", recipe, "--run-dir", run)
    assert result.returncode == 0, result.stderr
    return EvalStores(root, train, val, run, recipe)


def _labelled(store_path: Path) -> tuple[torch.Tensor, np.ndarray]:
    store = LatentStore.open(store_path)
    rows = np.flatnonzero(np.asarray(store.array("label")[:]) >= 0)
    latents = np.asarray(store.array("latents")[rows[0]:rows[-1] + 1])[rows - rows[0]]
    return normed_latents(latents), np.asarray(store.array("label")[:], dtype=np.int64)[rows]


def test_attentive_probe_on_teacher_latents_beats_chance_and_shuffled_labels_do_not(stores: EvalStores) -> None:
    train_x, train_y = _labelled(stores.train)
    val_x, val_y = _labelled(stores.val)
    read = lambda x: (lambda ids: x[torch.as_tensor(ids)])  # noqa: E731
    probe = lambda labels, epochs: attentive_probe(  # noqa: E731
        read(train_x), labels, read(val_x), val_y, train_x.shape[-1], 4,
        ProbeSettings(epochs=epochs, lr=2e-2, weight_decay=0.01, batch_size=8, seed=0, device=torch.device("cpu")))
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
    assert np.array_equal(temporal.reverse(clip), clip[:, ::-1])
    static = temporal.static(clip)
    assert static.shape == clip.shape and all(np.array_equal(static[:, t], clip[:, 0]) for t in range(16))
    for stride in temporal.STRIDES:
        played = temporal.playback(clip, stride)
        assert played.shape == clip.shape  # 16 frames, always
        assert all(np.array_equal(played[:, j], clip[:, (j * stride) // 4]) for j in range(16))
    assert np.array_equal(temporal.playback(clip, 4), clip)
    assert np.array_equal(temporal.half(clip, second=False), temporal.playback(clip, 2))
    second = temporal.half(clip, second=True)
    assert all(np.array_equal(second[:, j], clip[:, 8 + j // 2]) for j in range(16))
    shuffled = temporal.shuffle(clip, rows, seed=0)
    for k, row in enumerate(rows):
        order = temporal.shuffle_order(0, int(row))
        assert sorted(order) == list(range(16)) and not np.array_equal(order, np.arange(16))
        assert np.array_equal(shuffled[k], clip[k][order])
    assert np.array_equal(temporal.shuffle(clip, rows, seed=0), shuffled)  # a pure function of (seed, row)
    assert not np.array_equal(temporal.shuffle_order(0, 5), temporal.shuffle_order(0, 9))
    # What evaluation runs: each variant as a frame gather, on numpy and on torch tensors alike.
    expected = {"original": clip, "reversed": temporal.reverse(clip), "static": static,
                "shuffled": shuffled, "stride1": temporal.playback(clip, 1), "stride2": temporal.playback(clip, 2),
                "second_half": second}
    assert set(expected) == set(temporal.VARIANTS)
    for name, want in expected.items():
        assert np.array_equal(temporal.Variant(name).apply(clip, rows, 0), want), name
        assert np.array_equal(temporal.Variant(name).apply(torch.from_numpy(clip), rows, 0).numpy(), want), name


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
    for task in ("arrow_of_time", "motion_static", "order", "playback_stride", "clip_consistency"):
        for model in ("random_init", "student", "teacher"):
            assert 0.0 <= report["temporal"][task][model]["top1"] <= 1.0
    classification = report["classification"]
    assert classification["classes"] == 4 and classification["val_rows"] == 24
    assert set(classification["attentive"]) == {"random_init", "student", "teacher"}
    assert len(report["rows"]["train"]) == 32 and len(report["rows"]["val"]) == 24
    assert report["stores"]["val"]["identity"] == LatentStore.open(stores.val).attrs["identity"]
    assert (Path(report["subject"]["path"]) / "metrics.jsonl").is_file()
    png = next(stores.root.glob("eval-*/eval.png")).read_bytes()
    assert png.startswith(b"\x89PNG")
    assert "held-out R^2" in output and "random-init" in output

    # The same inputs and seed give the same numbers; without --teacher its temporal column is "not run".
    code, output, again = _eval(stores)
    assert code == 0, output
    assert again["heldout"] == report["heldout"] and again["classification"] == report["classification"]
    assert again["temporal"]["order"]["student"] == report["temporal"]["order"]["student"]
    assert "not_run" in again["temporal"]["order"]["teacher"]


def test_eval_of_an_export_and_of_a_store_without_labels(stores: EvalStores, tmp_path: Path) -> None:
    unlabelled = tmp_path / "latents-test.zarr"
    build = call_cli("build", "--src", stores.root, "--split", "test", "--out", unlabelled, "--teacher", TEACHER,
                     "--pipeline", stores.root / "build.yaml")
    assert build.returncode == 0, build.stderr
    result = call_train("eval", stores.run / "export", "--val-cache", unlabelled, "--train-cache", stores.train,
                        "--train-rows", "8", "--val-rows", "6", "--set", "eval.batch_size=4",
                        "--set", "eval.linear_iterations=20", "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["classification"] == {"skipped": "the validation store has no labels"}
    assert "not_run" in report["heldout"]["student"]  # an export has no predictor
    assert "skipped" in result.stdout


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
    assert call_cli("build", "--src", stores.root, "--split", "validation", "--out", other_teacher,
                    "--teacher", other_teacher_dir, "--pipeline", small).returncode == 0
    assert "another teacher" in refused(stores.run, "--val-cache", other_teacher)
    other_view = tmp_path / "val-other-view.zarr"
    bilinear = fast_pipeline(tmp_path / "bilinear.yaml", store__shard_rows=8, teacher__batch_size=8, cache__limit=4,
                             view__interpolation="bilinear")
    assert call_cli("build", "--src", stores.root, "--split", "validation", "--out", other_view,
                    "--teacher", TEACHER, "--pipeline", bilinear).returncode == 0
    assert "another view recipe" in refused(stores.run, "--val-cache", other_view)
    assert "eval.* fields only" in refused(stores.run, "--val-cache", stores.val, "--set", "train.lr=1")


def test_eval_every_records_quick_evaluations_and_trains_the_same(stores: EvalStores, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from salt_train.checkpoint import latest_checkpoint

    runs = {}
    for name, extra in (("plain", {}), ("with-eval", {"train__eval_every": 5, "eval__val_cache": str(stores.val),
                                                     "eval__quick_rows": 8})):
        recipe = train_pipeline(tmp_path / f"{name}.yaml", train__max_steps=10, train__batch_size=4,
                                train__checkpoint_every=100, train__log_every=5, mask__kind="random",
                                eval__linear_iterations=20, eval__batch_size=4, **extra)
        result = call_train("run", "--cache", stores.train, "--pipeline", recipe, "--run-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in runs["with-eval"] if "eval" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all(set(r["eval"]) >= {"heldout_loss", "heldout_r2", "linear_top1"} for r in evals)
    losses = lambda records: [r["loss"] for r in records if "eval" not in r]  # noqa: E731
    assert losses(runs["with-eval"]) == losses(runs["plain"])  # evaluating does not change training
    weights = [load_file(latest_checkpoint(tmp_path / name) / "model.safetensors") for name in ("plain", "with-eval")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    recipe = train_pipeline(tmp_path / "no-val.yaml", train__eval_every=5)
    result = call_train("run", "--cache", stores.train, "--pipeline", recipe, "--run-dir", tmp_path / "no-val")
    assert result.returncode == 2 and "train.eval_every needs eval.val_cache" in result.stderr, result.stderr
