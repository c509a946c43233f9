"""Frame sampling, crop geometry and real PyAV decoding of one clip view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.geometry import IMAGE_SIZE, NUM_FRAMES
from shared.video import ClipDecodeError

from salt_cache.demo_data import write_video
from salt_cache.video import (
    SAMPLING_RULES,
    center_crop_box,
    decode_view,
    resized_size,
    sample_frame_indices,
)

FAST = settings(deadline=None, max_examples=200)

clip_ids = st.one_of(
    st.integers(min_value=1, max_value=10**9).map(str),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=20),
)
rules = st.sampled_from(SAMPLING_RULES)
sizes = st.integers(min_value=1, max_value=4000)


# ---------------------------------------------------------------- frame sampling


@FAST
@given(n=st.integers(min_value=1, max_value=5000), clip_id=clip_ids, rule=rules)
def test_sampling_shape_range_monotone_deterministic(n: int, clip_id: str, rule: str) -> None:
    idx = sample_frame_indices(n, clip_id, rule)
    assert idx.shape == (NUM_FRAMES,)
    assert np.issubdtype(idx.dtype, np.integer)
    assert idx.min() >= 0 and idx.max() < n
    assert np.all(np.diff(idx) >= 0), idx
    again = sample_frame_indices(n, clip_id, rule)
    np.testing.assert_array_equal(idx, again)
    assert idx.dtype == again.dtype


@FAST
@given(n=st.integers(min_value=NUM_FRAMES, max_value=5000), clip_id=clip_ids)
def test_center_sampling_strictly_increasing_for_long_clips(n: int, clip_id: str) -> None:
    idx = sample_frame_indices(n, clip_id, "segment-center")
    assert np.all(np.diff(idx) > 0), idx


@FAST
@given(n=st.integers(min_value=1, max_value=NUM_FRAMES - 1), clip_id=clip_ids, rule=rules)
def test_short_clips_use_every_frame_and_pad_with_repeats(n: int, clip_id: str, rule: str) -> None:
    idx = sample_frame_indices(n, clip_id, rule)
    assert set(idx.tolist()) == set(range(n)), idx
    assert len(idx) == NUM_FRAMES  # so NUM_FRAMES - n slots are repeats
    assert idx[0] == 0 and idx[-1] == n - 1


@FAST
@given(n=st.integers(min_value=NUM_FRAMES, max_value=5000), clip_id=clip_ids)
def test_each_index_lies_in_its_segment(n: int, clip_id: str) -> None:
    for rule in SAMPLING_RULES:
        idx = sample_frame_indices(n, clip_id, rule)
        lo = np.floor(np.arange(NUM_FRAMES) * n / NUM_FRAMES)
        hi = np.ceil(np.arange(1, NUM_FRAMES + 1) * n / NUM_FRAMES)
        assert np.all(idx >= lo) and np.all(idx < hi), (rule, idx)


def test_jitter_depends_on_clip_id_and_center_does_not() -> None:
    jitter = {tuple(sample_frame_indices(300, str(i), "segment-jitter")) for i in range(20)}
    center = {tuple(sample_frame_indices(300, str(i), "segment-center")) for i in range(20)}
    assert len(jitter) > 10
    assert len(center) == 1


def test_sampling_refuses_bad_input() -> None:
    with pytest.raises(ValueError):
        sample_frame_indices(0, "1")
    with pytest.raises(ValueError):
        sample_frame_indices(10, "1", "uniform")


# ---------------------------------------------------------------- crop geometry


@FAST
@given(h=sizes, w=sizes)
def test_resized_size_keeps_short_side_and_aspect(h: int, w: int) -> None:
    new_h, new_w = resized_size(h, w)
    assert min(new_h, new_w) == IMAGE_SIZE
    assert max(new_h, new_w) >= IMAGE_SIZE
    # Orientation kept: landscape stays landscape, portrait stays portrait.
    if h > w:
        assert new_h >= new_w
    elif w > h:
        assert new_w >= new_h
    else:
        assert new_h == new_w == IMAGE_SIZE
    # The long side is the exact scaled value up to rounding.
    scale = IMAGE_SIZE / min(h, w)
    assert abs(new_h - h * scale) <= 0.5 + 1e-9
    assert abs(new_w - w * scale) <= 0.5 + 1e-9


@FAST
@given(h=sizes, w=sizes)
def test_center_crop_box_inside_and_centred(h: int, w: int) -> None:
    new_h, new_w = resized_size(h, w)
    top, left = center_crop_box(new_h, new_w)
    assert top >= 0 and top + IMAGE_SIZE <= new_h
    assert left >= 0 and left + IMAGE_SIZE <= new_w
    bottom, right = new_h - top - IMAGE_SIZE, new_w - left - IMAGE_SIZE
    assert abs(top - bottom) <= 1
    assert abs(left - right) <= 1


def test_center_crop_box_refuses_small_images() -> None:
    with pytest.raises(ValueError):
        center_crop_box(IMAGE_SIZE - 1, 400)
    with pytest.raises(ValueError):
        resized_size(0, 10)


# ---------------------------------------------------------------- real decoding


def _half_and_half(num_frames: int, height: int, width: int) -> np.ndarray:
    """Red on the first half of the long side, blue on the second half."""
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    if width >= height:
        frames[:, :, : width // 2] = (220, 30, 30)
        frames[:, :, width // 2 :] = (30, 30, 220)
    else:
        frames[:, : height // 2] = (220, 30, 30)
        frames[:, height // 2 :] = (30, 30, 220)
    # A per-frame brightness ramp in one corner makes frames distinguishable.
    for t in range(num_frames):
        frames[t, :8, :8] = 10 * t
    return frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    made = {}
    for suffix in (".webm", ".mp4"):
        for name, (h, w) in {"landscape": (240, 320), "portrait": (320, 240)}.items():
            path = root / f"{name}{suffix}"
            write_video(path, _half_and_half(24, h, w), fps=12)
            made[f"{name}{suffix}"] = path
    short = root / "short.webm"
    write_video(short, _half_and_half(5, 240, 320), fps=12)
    made["short.webm"] = short
    return made


@pytest.mark.parametrize("name", ["landscape.webm", "portrait.webm", "landscape.mp4", "portrait.mp4"])
def test_decode_view_shape_and_orientation(clips: dict[str, Path], name: str) -> None:
    view, idx = decode_view(clips[name], "100001")
    assert view.dtype == np.uint8 and view.shape == (NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert idx.shape == (NUM_FRAMES,) and np.all(np.diff(idx) >= 0)
    assert idx.min() >= 0 and idx.max() < 24
    # Short side 224, centre crop: the red/blue boundary lands in the middle of the
    # view along the long axis (not swapped with the short one).
    mean = view[:, 16:, 16:].astype(np.float32).mean(axis=0)  # skip the ramp corner
    if name.startswith("landscape"):
        first, second = mean[:, :80], mean[:, -80:]
    else:
        first, second = mean[:80, :], mean[-80:, :]
    assert first[..., 0].mean() > 150 and first[..., 2].mean() < 100
    assert second[..., 2].mean() > 150 and second[..., 0].mean() < 100


def test_decode_view_is_deterministic(clips: dict[str, Path]) -> None:
    for rule in SAMPLING_RULES:
        a, ia = decode_view(clips["landscape.webm"], "123456", rule)
        b, ib = decode_view(clips["landscape.webm"], "123456", rule)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ia, sample_frame_indices(24, "123456", rule))


def test_decode_short_clip_repeats_frames(clips: dict[str, Path]) -> None:
    view, idx = decode_view(clips["short.webm"], "7")
    assert view.shape == (NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert set(idx.tolist()) == set(range(5))
    assert np.all(np.diff(idx) >= 0)
    # Repeated indices give identical frames.
    for a in range(NUM_FRAMES):
        for b in range(a + 1, NUM_FRAMES):
            if idx[a] == idx[b]:
                np.testing.assert_array_equal(view[a], view[b])


@pytest.mark.parametrize("name", ["landscape.webm", "landscape.mp4"])
def test_truncated_file_fails(clips: dict[str, Path], tmp_path: Path, name: str) -> None:
    data = clips[name].read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ClipDecodeError, match="truncated"):
        decode_view(cut, "1")


def test_zero_byte_missing_and_not_a_video(tmp_path: Path) -> None:
    empty = tmp_path / "empty.webm"
    empty.touch()
    with pytest.raises(ClipDecodeError, match="zero-byte"):
        decode_view(empty, "1")
    with pytest.raises(ClipDecodeError, match="missing"):
        decode_view(tmp_path / "nowhere.webm", "1")
    text = tmp_path / "notes.webm"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(ClipDecodeError) as info:
        decode_view(text, "1")
    assert str(info.value).strip()
    assert "\n" not in str(info.value)
