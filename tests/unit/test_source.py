"""SSv2 source discovery: official and flat layouts, labels, refused ids, bad roots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.errors import SaltUsageError
from shared.ssv2 import discover, template_key

from salt_cache.demo_data import TEMPLATES, write_demo_dataset

LABELS = {template_key(t): str(i) for i, t in enumerate(TEMPLATES)}
SPLITS = {"train": 4, "validation": 2, "test": 1}


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ssv2-official")
    write_demo_dataset(root, seed=1, height=32, width=48, fps=8, **SPLITS)
    return root


def _rows(ids: list[str], templates: list[str | None] | None = None) -> list[dict]:
    rows = []
    for n, clip_id in enumerate(ids):
        template = (templates or [TEMPLATES[n % len(TEMPLATES)]] * len(ids))[n]
        row: dict = {"id": clip_id}
        if template is not None:
            row.update(label=template.lower(), template=template, placeholders=["something"])
        rows.append(row)
    return rows


def _touch_videos(folder: Path, ids: list[str], suffix: str) -> None:
    """discover() only indexes file names; decoding is tested in test_video.py."""
    folder.mkdir(parents=True, exist_ok=True)
    for clip_id in ids:
        (folder / f"{clip_id}{suffix}").write_bytes(b"\x1aE\xdf\xa3")


def _assert_paths_inside(source) -> None:
    for clip in source.clips:
        assert clip.path.parent == source.video_dir
        assert clip.path.resolve().parent == source.video_dir.resolve()
        assert clip.path.name.startswith(clip.clip_id + ".")


def _usage_error(*args, **kwargs) -> str:
    with pytest.raises(SaltUsageError) as info:
        discover(*args, **kwargs)
    message = str(info.value)
    assert message.strip() and "\n" not in message, message
    return message


# ---------------------------------------------------------------- official layout


def test_official_layout(official: Path) -> None:
    train_rows = json.loads((official / "labels" / "train.json").read_text())
    source = discover(official, "train")
    assert source.split_file == official / "labels" / "train.json"
    assert source.labels_file == official / "labels" / "labels.json"
    assert source.video_dir == official / "20bn-something-something-v2"
    assert [c.clip_id for c in source.clips] == [r["id"] for r in train_rows]
    assert source.refused_ids == []
    assert source.missing_videos == 0
    for clip, row in zip(source.clips, train_rows, strict=False):
        assert clip.path == source.video_dir / f"{row['id']}.webm" and clip.path.is_file()
        assert clip.template == row["template"]
        assert clip.label == TEMPLATES.index(row["template"])
    _assert_paths_inside(source)
    described = source.describe()
    assert described["clips"] == SPLITS["train"] and described["videos missing"] == 0
    attrs = source.to_attrs()
    assert attrs["split"] == "train" and attrs["clips"] == SPLITS["train"]
    assert attrs["label_map_sha256"] and len(attrs["label_map_sha256"]) == 64
    json.dumps(attrs)  # store attributes must be JSON


def test_official_validation_and_test_splits(official: Path) -> None:
    validation = discover(official, "validation")
    assert len(validation.clips) == SPLITS["validation"]
    assert all(0 <= c.label < len(TEMPLATES) for c in validation.clips)
    test = discover(official, "test")
    assert len(test.clips) == SPLITS["test"]
    assert all(c.label == -1 for c in test.clips)
    ids = {c.clip_id for c in discover(official, "train").clips}
    assert ids.isdisjoint(c.clip_id for c in validation.clips)


def test_limit(official: Path) -> None:
    full = discover(official, "train")
    for limit in (1, 3):
        limited = discover(official, "train", limit=limit)
        assert [c.clip_id for c in limited.clips] == [c.clip_id for c in full.clips[:limit]]
    assert len(discover(official, "train", limit=100).clips) == SPLITS["train"]


# ---------------------------------------------------------------- flat layouts


def test_flat_root_jsons_videos_folder_mp4(tmp_path: Path) -> None:
    ids = ["11", "12", "13"]
    (tmp_path / "train.json").write_text(json.dumps(_rows(ids)))
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    _touch_videos(tmp_path / "videos", ids, ".mp4")
    source = discover(tmp_path)
    assert source.split_file == tmp_path / "train.json"
    assert source.labels_file == tmp_path / "labels.json"
    assert source.video_dir == tmp_path / "videos"
    assert [c.path.name for c in source.clips] == ["11.mp4", "12.mp4", "13.mp4"]
    assert [c.label for c in source.clips] == [0, 1, 2]
    assert source.missing_videos == 0
    _assert_paths_inside(source)


def test_flat_annotations_folder_videos_in_root(tmp_path: Path) -> None:
    ids = ["21", "22"]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "validation.json").write_text(json.dumps(_rows(ids)))
    (tmp_path / "annotations" / "labels.json").write_text(json.dumps(LABELS))
    _touch_videos(tmp_path, ids, ".webm")
    source = discover(tmp_path, "validation")
    assert source.split_file == tmp_path / "annotations" / "validation.json"
    assert source.video_dir == tmp_path
    assert [c.path for c in source.clips] == [tmp_path / "21.webm", tmp_path / "22.webm"]
    assert [c.label for c in source.clips] == [0, 1]
    _assert_paths_inside(source)


def test_prefixed_split_names(tmp_path: Path) -> None:
    ids = ["31", "32"]
    (tmp_path / "something-something-v2-train.json").write_text(json.dumps(_rows(ids)))
    (tmp_path / "something-something-v2-labels.json").write_text(json.dumps(LABELS))
    _touch_videos(tmp_path / "videos", ids, ".webm")
    source = discover(tmp_path)
    assert source.split_file.name == "something-something-v2-train.json"
    assert source.labels_file is not None and source.labels_file.name == "something-something-v2-labels.json"
    assert [c.label for c in source.clips] == [0, 1]


def test_webm_preferred_and_missing_video_stays_inside(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(json.dumps(_rows(["41", "42", "43"])))
    _touch_videos(tmp_path / "videos", ["41"], ".mp4")
    _touch_videos(tmp_path / "videos", ["41", "42"], ".webm")
    source = discover(tmp_path)
    assert [c.path.name for c in source.clips] == ["41.webm", "42.webm", "43.webm"]
    assert source.missing_videos == 1
    _assert_paths_inside(source)


def test_labels_without_map_are_unknown(tmp_path: Path) -> None:
    """No labels.json: every label is -1; unknown templates are -1 too."""
    (tmp_path / "train.json").write_text(json.dumps(_rows(["51"])))
    _touch_videos(tmp_path, ["51"], ".webm")
    assert discover(tmp_path).clips[0].label == -1
    assert discover(tmp_path).labels_file is None
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    (tmp_path / "train.json").write_text(json.dumps(_rows(["51", "52"], ["Moving [something] up", "Juggling [x]"])))
    assert [c.label for c in discover(tmp_path).clips] == [2, -1]


def test_template_key_strips_brackets() -> None:
    assert template_key("Putting [something] next to [something]") == "Putting something next to something"
    assert template_key("Moving [something] up") in LABELS


# ---------------------------------------------------------------- refused ids


def test_unsafe_and_duplicate_ids_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "ssv2"
    root.mkdir()
    # A real video outside the video folder that a traversal id would reach.
    (tmp_path / "x.webm").write_bytes(b"outside")
    bad = ["../../x", "../x", "a/b", "", "/etc/passwd", "x.webm", "..", "a b", "6" * 65]
    ids = ["61", *bad, "61", "62"]
    (root / "train.json").write_text(json.dumps(_rows(ids)))
    _touch_videos(root / "videos", ["61", "62"], ".webm")
    source = discover(root)
    assert [c.clip_id for c in source.clips] == ["61", "62"]
    assert source.refused_ids == [*bad, "61"]
    _assert_paths_inside(source)
    assert all(".." not in c.path.parts for c in source.clips)
    assert source.to_attrs()["refused_ids"] == [*bad, "61"]


def test_rows_without_id_and_integer_ids(tmp_path: Path) -> None:
    rows = [{"label": "x"}, {"id": 71}, "72", {"id": None}, {"id": True}, {"id": 1.5}, None, ["73"]]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    _touch_videos(tmp_path, ["71", "72", "None", "True"], ".mp4")
    source = discover(tmp_path)
    assert [c.clip_id for c in source.clips] == ["71", "72"]
    assert source.refused_ids == ["", "None", "True", "1.5", "None", "['73']"]


def test_only_refused_ids_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(json.dumps(_rows(["../a", "b/c"])))
    _touch_videos(tmp_path, ["1"], ".webm")
    assert "no usable clips" in _usage_error(tmp_path)


# ---------------------------------------------------------------- bad roots


def test_missing_root(tmp_path: Path) -> None:
    msg = _usage_error(tmp_path / "nowhere")
    assert "nowhere" in msg and "does not exist" in msg


def test_root_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text("[]")
    assert "is a file" in _usage_error(path)


def test_no_split_file(tmp_path: Path) -> None:
    _touch_videos(tmp_path / "videos", ["1"], ".webm")
    assert "train.json" in _usage_error(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps(_rows(["1"])))
    assert "validation.json" in _usage_error(tmp_path, "validation")


def test_no_videos(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "train.json").write_text(json.dumps(_rows(["1"])))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "1.avi").write_bytes(b"")
    assert "no .webm or .mp4" in _usage_error(tmp_path)


def test_split_file_not_a_list_or_not_json(tmp_path: Path) -> None:
    _touch_videos(tmp_path, ["1"], ".webm")
    (tmp_path / "train.json").write_text(json.dumps({"id": "1"}))
    assert "list" in _usage_error(tmp_path)
    (tmp_path / "train.json").write_text("[{")
    assert "train.json" in _usage_error(tmp_path)


def test_bad_label_map(tmp_path: Path) -> None:
    _touch_videos(tmp_path, ["1"], ".webm")
    (tmp_path / "train.json").write_text(json.dumps(_rows(["1"])))
    (tmp_path / "labels.json").write_text(json.dumps(["not", "a", "map"]))
    assert "labels.json" in _usage_error(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"Moving something up": "two"}))
    assert "labels.json" in _usage_error(tmp_path)
