"""Real PyAV encode/decode checks for the synthetic SSv2 demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import render_motion_clip

from salt_cache.demo_data import TEMPLATES, DemoDataExists, write_demo_dataset, write_video

SPLITS = {"train": 4, "validation": 2, "test": 1}


def _decode(path: Path) -> tuple[str, list[np.ndarray]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return stream.codec_context.name, frames


def _centroid(frame: np.ndarray) -> np.ndarray:
    """(x, y) centre of the shape: the pixels far from the frame's median colour."""
    diff = np.abs(frame.astype(np.int32) - np.median(frame, axis=(0, 1))).sum(-1)
    ys, xs = np.nonzero(diff > 100)
    assert len(xs) > 0, "shape not found"
    return np.array([xs.mean(), ys.mean()])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ssv2")
    assert write_demo_dataset(root, seed=3, **SPLITS) == SPLITS
    return root


def _rows(root: Path, split: str) -> list[dict]:
    return json.loads((root / "labels" / f"{split}.json").read_text())


def test_layout_and_json(dataset: Path) -> None:
    labels = json.loads((dataset / "labels" / "labels.json").read_text())
    assert labels == {t.replace("[something]", "something"): str(i) for i, t in enumerate(TEMPLATES)}

    ids = []
    for split, n in SPLITS.items():
        rows = _rows(dataset, split)
        assert len(rows) == n
        ids += [r["id"] for r in rows]
        for row in rows:
            assert row["id"].isdigit()
            assert (dataset / "20bn-something-something-v2" / f"{row['id']}.webm").is_file()
            if split == "test":
                assert set(row) == {"id"}
                continue
            assert set(row) == {"id", "label", "template", "placeholders"}
            assert row["template"] in TEMPLATES
            filled = row["template"].replace("[something]", row["placeholders"][0])
            assert row["label"] == filled[0].lower() + filled[1:]
    assert len(set(ids)) == len(ids)
    # 4 train clips, 4 classes, balanced -> every class once.
    assert sorted(r["template"] for r in _rows(dataset, "train")) == sorted(TEMPLATES)
    assert len(list((dataset / "20bn-something-something-v2").iterdir())) == sum(SPLITS.values())


def test_webm_is_vp9_240p(dataset: Path) -> None:
    clip = dataset / "20bn-something-something-v2" / f"{_rows(dataset, 'train')[0]['id']}.webm"
    codec, frames = _decode(clip)
    assert codec == "vp9"
    assert frames[0].shape == (240, 320, 3)
    assert 24 <= len(frames) <= 48  # 2-4 s at 12 fps


@pytest.mark.parametrize(
    ("template", "axis", "sign"),
    [(TEMPLATES[0], 0, 1), (TEMPLATES[1], 0, -1), (TEMPLATES[2], 1, -1), (TEMPLATES[3], 1, 1)],
)
def test_decoded_motion_matches_template(dataset: Path, template: str, axis: int, sign: int) -> None:
    row = next(r for r in _rows(dataset, "train") if r["template"] == template)
    _, frames = _decode(dataset / "20bn-something-something-v2" / f"{row['id']}.webm")
    shift = _centroid(frames[-1]) - _centroid(frames[0])
    assert sign * shift[axis] > 50  # moved a good part of the frame
    assert abs(shift[1 - axis]) < 5  # and only along the template's axis


def test_same_seed_is_deterministic(dataset: Path, tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, seed=3, **SPLITS)
    for name in ("labels.json", *(f"{s}.json" for s in SPLITS)):
        assert (tmp_path / "labels" / name).read_text() == (dataset / "labels" / name).read_text()
    clip = f"{_rows(dataset, 'train')[0]['id']}.webm"
    _, a = _decode(dataset / "20bn-something-something-v2" / clip)
    _, b = _decode(tmp_path / "20bn-something-something-v2" / clip)
    np.testing.assert_array_equal(a[0], b[0])


def test_refuses_existing_videos(dataset: Path) -> None:
    with pytest.raises(FileExistsError):
        write_demo_dataset(dataset, **SPLITS)


def test_mp4_h264_portrait_roundtrip(tmp_path: Path) -> None:
    frames = render_motion_clip(TEMPLATES[2], 8, 320, 240, np.random.default_rng(0))
    assert frames.shape == (8, 320, 240, 3) and frames.dtype == np.uint8
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=12, codec="libx264")
    codec, decoded = _decode(path)
    assert codec == "h264"
    assert len(decoded) == 8
    assert decoded[0].shape == (320, 240, 3)


def test_write_video_rejects_odd_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.webm", np.zeros((2, 31, 32, 3), np.uint8))


def test_refuses_existing_labels_and_writes_nothing(tmp_path: Path) -> None:
    mine = tmp_path / "labels" / "validation.json"
    mine.parent.mkdir()
    mine.write_text("[]  # mine")
    with pytest.raises(DemoDataExists, match="validation.json"):
        write_demo_dataset(tmp_path, train=1, validation=0, test=0)
    assert mine.read_text() == "[]  # mine"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "labels",
        "labels/validation.json",
    ]


@pytest.mark.parametrize("target_exists", [False, True])
def test_cut_short_leaves_nothing_and_rerun_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target_exists: bool
) -> None:
    root = tmp_path / "demo"
    if target_exists:
        root.mkdir()
    calls = []

    def interrupted(path: Path, *args, **kwargs) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_video(path, *args, **kwargs)

    monkeypatch.setattr("salt_cache.demo_data.write_video", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(root, train=3, validation=0, test=0, height=64, width=64)
    assert root.exists() == target_exists
    assert not any(root.iterdir()) if target_exists else True
    assert sorted(p.name for p in tmp_path.iterdir()) == (["demo"] if target_exists else [])
    monkeypatch.undo()
    assert write_demo_dataset(root, train=3, validation=0, test=0, height=64, width=64)["train"] == 3
    assert len(list((root / "20bn-something-something-v2").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging folder left
