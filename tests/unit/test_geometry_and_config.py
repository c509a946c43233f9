"""Token geometry (contract) and the pipeline schema: recipes, overrides, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import token_position
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import geometry
from shared.config import PIPELINES_DIR, PipelineConfig, dump_pipeline, load_pipeline
from shared.errors import SaltUsageError
from shared.geometry import GRID_H, GRID_T, GRID_W, NUM_TOKENS, token_index

# ---------------------------------------------------------------- geometry


def test_geometry_constants() -> None:
    assert (geometry.NUM_FRAMES, geometry.IMAGE_SIZE, geometry.TUBELET_SIZE, geometry.PATCH_SIZE) == (16, 224, 2, 16)
    assert (GRID_T, GRID_H, GRID_W) == (8, 14, 14)
    assert geometry.TOKENS_PER_FRAME == 196
    assert NUM_TOKENS == 1568
    assert geometry.TEACHER_WIDTH_HUGE == 1280 and geometry.STUDENT_WIDTH_BASE == 768
    assert geometry.as_dict()["num_tokens"] == 1568
    assert geometry.as_dict()["grid"] == [8, 14, 14]


@settings(deadline=None)
@given(t=st.integers(0, GRID_T - 1), h=st.integers(0, GRID_H - 1), w=st.integers(0, GRID_W - 1))
def test_token_index_formula_and_round_trip(t: int, h: int, w: int) -> None:
    i = token_index(t, h, w)
    assert i == t * 196 + h * 14 + w
    assert 0 <= i < NUM_TOKENS
    assert token_position(i) == (t, h, w)


@settings(deadline=None)
@given(i=st.integers(0, NUM_TOKENS - 1))
def test_token_position_round_trip(i: int) -> None:
    assert token_index(*token_position(i)) == i


def test_token_index_is_a_bijection_in_raster_order() -> None:
    order = [token_index(t, h, w) for t in range(GRID_T) for h in range(GRID_H) for w in range(GRID_W)]
    assert order == list(range(NUM_TOKENS))


@pytest.mark.parametrize("bad", [(-1, 0, 0), (8, 0, 0), (0, 14, 0), (0, 0, 14), (0, -1, 0)])
def test_token_index_refuses_out_of_grid(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        token_index(*bad)


@pytest.mark.parametrize("bad", [-1, NUM_TOKENS, 10**6])
def test_token_position_refuses_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        token_position(bad)


# ---------------------------------------------------------------- recipes


def test_ssv2_recipe_has_seed_hyperparameters() -> None:
    cfg = load_pipeline(PIPELINES_DIR / "ssv2.yaml")
    assert cfg.name == "ssv2"
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.min_lr == pytest.approx(3e-5)
    assert 200 <= cfg.train.warmup_steps <= 500
    assert cfg.train.grad_clip == 1.0
    assert cfg.train.weight_decay == pytest.approx(0.05)
    assert cfg.mask.ratio == pytest.approx(0.75)
    assert cfg.train.batch_size == 32
    assert cfg.train.epochs == 10
    assert cfg.train.max_steps is None
    assert cfg.build_loader.num_workers == "auto"  # sized from the cores (salt_cache.loader.decode_workers)
    assert cfg.train_loader.num_workers == 8
    for loader in (cfg.build_loader, cfg.train_loader):
        assert loader.prefetch_factor == 2
        assert loader.pin_memory is True
        assert loader.multiprocessing_context == "forkserver"
    assert cfg.build_loader.persistent_workers is True
    assert cfg.model.student == "vit_base_patch16_224"
    assert cfg.model.predictor_width == 384 and cfg.model.predictor_depth == 12
    assert cfg.model.loss == "l1"  # V-JEPA's, chosen by the mse/l1 demo measurement (issue 18)


def test_defaults_match_ssv2_recipe() -> None:
    """The schema's defaults are the production recipe; the default pipeline is ssv2."""
    from_file = load_pipeline(PIPELINES_DIR / "ssv2.yaml")
    assert PipelineConfig() == from_file
    assert load_pipeline() == from_file
    assert load_pipeline("ssv2") == from_file


def test_demo_recipe_validates() -> None:
    cfg = load_pipeline("demo")
    assert cfg.name == "demo"
    assert cfg.teacher.name == "builtin:tiny-videomae"
    assert cfg.cache.device == "cpu" and cfg.train.device == "cpu"
    assert cfg.train.min_lr <= cfg.train.lr
    assert load_pipeline(PIPELINES_DIR / "demo.yaml") == cfg


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_pipeline("demo", {"train.max_steps": 7})
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_pipeline(cfg))
    assert load_pipeline(path) == cfg


def test_dotted_overrides_apply_and_none_is_ignored() -> None:
    base = load_pipeline("ssv2")
    cfg = load_pipeline(
        "ssv2",
        {
            "teacher.batch_size": 4,
            "train.max_steps": 100,
            "cache.limit": 10,
            "train_loader.num_workers": 0,
            "view.sampling": "segment-center",
            "train.lr": None,
            "cache.split": None,
        },
    )
    assert cfg.teacher.batch_size == 4
    assert cfg.train.max_steps == 100
    assert cfg.cache.limit == 10
    assert cfg.train_loader.num_workers == 0 and cfg.build_loader.num_workers == base.build_loader.num_workers
    assert cfg.view.sampling == "segment-center"
    assert cfg.train.lr == base.train.lr
    assert cfg.cache.split == base.cache.split
    assert load_pipeline("ssv2", {"train.lr": None}) == base


def test_an_old_recipe_with_one_loader_section_is_refused_in_one_line(tmp_path: Path) -> None:
    recipe = yaml.safe_load((PIPELINES_DIR / "demo.yaml").read_text())
    recipe["loader"] = recipe.pop("build_loader")
    del recipe["train_loader"]
    msg = _usage_error(_write(tmp_path, recipe))
    assert "loader is the old name" in msg and "rename it" in msg and "train_loader.num_workers" in msg
    msg = _usage_error("demo", {"loader.num_workers": 4})  # beside the new sections too
    assert "loader is the old name" in msg


# ---------------------------------------------------------------- refusals


def _usage_error(pipeline: str | Path, overrides: dict | None = None) -> str:
    with pytest.raises(SaltUsageError) as info:
        load_pipeline(pipeline, overrides)
    message = str(info.value)
    assert message.strip() and "\n" not in message, message
    return message


def _write(tmp_path: Path, data: object, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_refused(tmp_path: Path) -> None:
    msg = _usage_error(_write(tmp_path, {"train": {"lr": 1e-3, "learning_rate": 1e-3}}))
    assert "train.learning_rate" in msg and "unknown key" in msg
    msg = _usage_error(_write(tmp_path, {"trainer": {"lr": 1e-3}}))
    assert "trainer" in msg
    msg = _usage_error("ssv2", {"train.lrr": 1e-3})
    assert "train.lrr" in msg and "command line" in msg


def test_negative_batch_size_refused(tmp_path: Path) -> None:
    msg = _usage_error(_write(tmp_path, {"train": {"batch_size": -4}}))
    assert "train.batch_size" in msg
    msg = _usage_error("ssv2", {"teacher.batch_size": 0})
    assert "teacher.batch_size" in msg


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval_refused(tmp_path: Path, ratio: float) -> None:
    msg = _usage_error(_write(tmp_path, {"mask": {"ratio": ratio}}))
    assert "mask.ratio" in msg


def test_min_lr_above_lr_refused(tmp_path: Path) -> None:
    msg = _usage_error(_write(tmp_path, {"train": {"lr": 1e-4, "min_lr": 1e-3}}))
    assert "min_lr" in msg
    msg = _usage_error("ssv2", {"train.min_lr": 1.0})
    assert "min_lr" in msg


def test_bad_literal_refused(tmp_path: Path) -> None:
    msg = _usage_error(_write(tmp_path, {"view": {"sampling": "random"}}))
    assert "view.sampling" in msg


def test_yaml_list_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, [{"train": {"lr": 1e-3}}])
    msg = _usage_error(path)
    assert str(path) in msg and "mapping" in msg


def test_section_that_is_not_a_mapping_refused(tmp_path: Path) -> None:
    msg = _usage_error(_write(tmp_path, {"train": 5}))
    assert "train" in msg
    msg = _usage_error(_write(tmp_path, {"train": 5}), {"train.lr": 1e-3})
    assert "train" in msg


def test_invalid_yaml_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1e-3\n  batch_size: 4\n")
    msg = _usage_error(path)
    assert str(path) in msg


def test_an_empty_recipe_is_refused_not_read_as_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing but a comment\n")
    assert "is empty" in _usage_error(path)


def test_missing_file_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    msg = _usage_error(missing)
    assert "nope.yaml" in msg and "not found" in msg
    msg = _usage_error(tmp_path)  # a folder, not a file
    assert str(tmp_path) in msg
