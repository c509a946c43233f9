"""`salt-train eval --protocol vjepa` (V-JEPA's frozen SSv2 evaluation) on CPU at tiny sizes.

Its pieces against hand-built references (the clips' frames, the 2x3 view layout, the cross-clip attention,
the view-averaged softmax, the augmentation's seed, the optimiser's schedule and groups, gradient
accumulation), one run through the CLI on the demo stores' source videos, and its bad inputs.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.config import VjepaEvalConfig
from shared.ssv2 import discover

from salt_train.eval.probes import AttentiveProbe
from salt_train.eval.vjepa.augment import AugmentSettings, TrainAugment, eval_views
from salt_train.eval.vjepa.data import VALIDATION, ProtocolClips, decode_clips, epoch_steps
from salt_train.eval.vjepa.optim import CosineSchedule, accumulate, decay_groups, make_optimizer, optimizer_step
from salt_train.eval.vjepa.probe import averaged_softmax, build_probe, top_k_correct, view_logits
from salt_train.eval.vjepa.views import (
    clip_frame_indices,
    encoder_batch,
    probe_inputs,
    resize_short_side,
    spatial_view_starts,
)
from tests.conftest import TINY_STUDENT, Build, call_cli, call_train, fast_pipeline

# ---- time and space --------------------------------------------------------------------------------------


def test_clips_are_16_frames_4_apart_in_their_own_part_of_a_long_video_and_overlap_in_a_short_one() -> None:
    rng = np.random.default_rng(0)
    long = clip_frame_indices(300, clips=2, frames=16, step=4, rng=rng)  # parts of 150 frames > a 64-frame window
    for clip, part in zip(long, ([0, 150], [150, 300]), strict=False):
        assert part[0] <= clip[0] and clip[-1] < part[1] and np.all(np.diff(clip) >= 4) and np.all(np.diff(clip) <= 5)
        assert clip[-1] - clip[0] in (63, 64)  # 16 frames over a 64-frame window, not the whole video
    assert not np.array_equal(long, clip_frame_indices(300, 2, 16, 4, np.random.default_rng(1)))  # seeded ends
    assert np.array_equal(clip_frame_indices(300, 2, 16, 4, None)[0], np.linspace(0, 64, 16).clip(0, 63).astype(int))
    # An SSv2-length video (45 frames): both clips are its first 44 frames about 4 apart, padded with the last one.
    short = clip_frame_indices(45, 2, 16, 4, rng)
    expected = np.concatenate([np.linspace(0, 44, 11), np.full(5, 44.0)]).clip(0, 43).astype(int)
    assert np.array_equal(short[0], expected) and np.array_equal(short[1], expected)
    # Longer than one window, shorter than two: overlapping clips shifted by what lies beyond one window.
    mid = clip_frame_indices(100, 2, 16, 4, rng)
    assert np.array_equal(mid[1] - mid[0], np.full(16, 36))


def test_validation_takes_2_clips_x_3_views_along_the_long_side_laid_out_per_view() -> None:
    # A clip whose pixel values say where they came from: frame t, column x, row y.
    t, h, w = 4, 120, 160
    frames = np.zeros((t, h, w, 3), dtype=np.uint8)
    frames[..., 0] = np.arange(t)[:, None, None] * 50
    frames[..., 1] = np.linspace(0, 255, w)[None, None, :].astype(np.uint8)
    views = eval_views(frames, 3)  # [views, 3, T, 224, 224]
    assert views.shape == (3, 3, t, 224, 224)
    resized = resize_short_side(torch.from_numpy(frames).permute(0, 3, 1, 2).float())  # [T, 3, 224, 299]
    assert resized.shape[-2:] == (224, 299) and spatial_view_starts(299, 3) == [0, 37, 74]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1) * 255
    for view, start in enumerate([0, 37, 74]):  # left, centre, right
        crop = (resized[..., start : start + 224].permute(1, 0, 2, 3) - mean) / std
        assert torch.allclose(views[view], crop, atol=1e-5)

    # The batch layout: [videos, clips, views, ...] through the encoder in (video, clip, view) order, then per
    # view the video's two clips side by side (clip 0's tokens first), against an index-by-index reference.
    videos, clips, n_views, tokens, width = 2, 2, 3, 5, 4
    pixels = torch.arange(videos * clips * n_views * 6, dtype=torch.float32).reshape(videos, clips, n_views, 1, 1, 2, 3)
    flat = encoder_batch(pixels)
    encode = lambda clip: clip.flatten()[:1] * torch.arange(1, tokens * width + 1).reshape(tokens, width)  # noqa: E731
    out = probe_inputs(torch.stack([encode(c) for c in flat]), videos, clips, n_views)
    assert out.shape == (n_views, videos, clips * tokens, width)
    for b in range(videos):
        for c in range(clips):
            for v in range(n_views):
                assert torch.equal(flat[(b * clips + c) * n_views + v], pixels[b, c, v])
                assert torch.equal(out[v, b, c * tokens : (c + 1) * tokens], encode(pixels[b, c, v]))


def test_the_probe_attends_across_both_clips_as_a_hand_built_cross_attention() -> None:
    width, heads, classes, per_clip = 8, 2, 5, 6
    probe = build_probe(width, classes, heads, seed=3).eval()
    torch.manual_seed(3)
    with torch.no_grad():  # weights of unit scale, so that every part moves the logits visibly
        for parameter in probe.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    clip0, clip1 = torch.randn(2, per_clip, width), torch.randn(2, per_clip, width)
    tokens = torch.cat([clip0, clip1], dim=1)  # [B, 2N, width]: what probe_inputs gives for one view
    # By hand: one query, softmax(q k^T / sqrt(d)) v per head over all 2N tokens, projection, residual, MLP, head.
    x = probe.norm_tokens(tokens)
    k, v = probe.kv(x).split(width, dim=-1)
    q = probe.q(probe.query)
    d = width // heads
    pooled = []
    for head in range(heads):
        part = slice(head * d, (head + 1) * d)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(d), dim=-1)
        assert weights.shape == (2, 1, 2 * per_clip)  # every token of both clips gets a weight
        pooled.append(weights @ v[..., part])
    y = probe.query + probe.proj(torch.cat(pooled, dim=-1))
    expected = probe.head((y + probe.mlp(probe.norm_mlp(y)))[:, 0])
    with torch.no_grad():
        got = view_logits(probe, tokens[None])[0]
        assert torch.allclose(got, expected, atol=1e-5)
        # Both clips count: changing clip 1 alone changes the logits; the clips' order does not (no clip position).
        assert (got - probe(torch.cat([clip0, torch.randn_like(clip1)], dim=1))).abs().max() > 1e-2
        assert torch.allclose(got, probe(torch.cat([clip1, clip0], dim=1)), atol=1e-5)
    assert probe.heads == heads


def test_validation_averages_the_softmax_over_the_views() -> None:
    logits = torch.tensor([[[10.0, 0.0, 0.0]], [[0.0, 4.0, 0.0]], [[0.0, 4.0, 0.0]]])  # 3 views, 1 video, 3 classes
    by_hand = sum(torch.softmax(logits[v], dim=-1) for v in range(3)) / 3
    averaged = averaged_softmax(logits)
    assert torch.allclose(averaged, by_hand) and torch.allclose(averaged.sum(1), torch.ones(1))
    # Probabilities are averaged, not logits: two views for class 1 outvote one extreme view for class 0,
    # which the mean logit would follow.
    assert averaged.argmax(1).item() == 1 and logits.mean(0).argmax(1).item() == 0
    assert top_k_correct(averaged, torch.tensor([1]), 1).item()
    assert not top_k_correct(averaged, torch.tensor([0]), 1).item() and top_k_correct(averaged, torch.tensor([0]), 2)


# ---- augmentation ----------------------------------------------------------------------------------------


def test_the_augmentation_is_a_function_of_its_seed_and_the_same_for_every_frame(demo_set: Path) -> None:
    settings = VjepaEvalConfig(frames_per_clip=4)
    clip = discover(demo_set, "train").clips[0]
    frames = decode_clips(clip, settings, np.random.default_rng(0))[0]  # [4, 120, 160, 3], a real decoded clip
    augment = TrainAugment(AugmentSettings.from_config(settings))
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    first = augment(frames, 11)
    assert first.shape == (3, 4, 224, 224)
    assert torch.equal(first, augment(frames, 11))
    assert not torch.equal(first, augment(frames, 12))
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    # The global generators are kept.
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state, strict=True))
    # One RandAugment draw and one crop for the whole clip: identical frames stay identical (no erasing here).
    still = np.repeat(frames[:1], 4, axis=0)
    plain = TrainAugment(AugmentSettings((0.08, 1.0), (0.75, 4 / 3), "rand-m7-n4-mstd0.5-inc1", 0.0))
    for seed in range(3):
        out = plain(still, seed)
        assert all(torch.equal(out[:, 0], out[:, i]) for i in range(1, 4))
    # Erasing: one box for every frame, filled with noise (not the clip's pixels).
    erased = TrainAugment(AugmentSettings((1.0, 1.0), (4 / 3, 4 / 3), None, 1.0))(still, 5)
    unerased = TrainAugment(AugmentSettings((1.0, 1.0), (4 / 3, 4 / 3), None, 0.0))(still, 5)
    changed = (erased != unerased).any(dim=0)  # [T, 224, 224]
    assert changed.any() and all(torch.equal(changed[0], changed[i]) for i in range(1, 4))
    # Validation items are the same whatever the epoch order; training items change with the epoch.
    data = ProtocolClips([clip], settings)
    assert torch.equal(data[(VALIDATION, 0)]["pixels"], data[(VALIDATION, 0)]["pixels"])
    assert data[(VALIDATION, 0)]["pixels"].shape == (2, 3, 3, 4, 224, 224)
    assert not torch.equal(data[(0, 0)]["pixels"], data[(1, 0)]["pixels"])


# ---- optimisation ----------------------------------------------------------------------------------------


def test_the_optimiser_decays_weights_only_on_a_cosine_without_warmup() -> None:
    probe = AttentiveProbe(8, 5, 2)
    decayed, kept = decay_groups(probe)
    names = {id(p): n for n, p in probe.named_parameters()}
    assert {names[id(p)] for p in decayed} == {
        "query",
        "q.weight",
        "kv.weight",
        "proj.weight",
        "mlp.0.weight",
        "mlp.2.weight",
        "head.weight",
    }
    assert {names[id(p)] for p in kept} == {
        "norm_tokens.weight",
        "norm_tokens.bias",
        "q.bias",
        "kv.bias",
        "proj.bias",
        "norm_mlp.weight",
        "norm_mlp.bias",
        "mlp.0.bias",
        "mlp.2.bias",
        "head.bias",
    }
    schedule = CosineSchedule(total=100, lr=1e-3, final_lr=0.0, weight_decay=0.01, final_weight_decay=1e-6)
    lrs = [schedule.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 100)))  # no warmup: starts at the top
    assert lrs[49] == pytest.approx(5e-4) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert schedule.weight_decay_at(0) == pytest.approx(0.01, rel=1e-3)
    assert schedule.weight_decay_at(99) == pytest.approx(1e-6)
    optimizer = make_optimizer(probe, 0.01)
    schedule.apply(optimizer, 49)
    decay_group, keep_group = optimizer.param_groups
    assert decay_group["lr"] == keep_group["lr"] == pytest.approx(5e-4)
    assert decay_group["weight_decay"] == pytest.approx((0.01 + 1e-6) / 2) and keep_group["weight_decay"] == 0.0


def test_gradient_accumulation_equals_the_large_batch() -> None:
    torch.manual_seed(0)
    inputs, labels = torch.randn(8, 6, 8), torch.randint(0, 5, (8,))
    keep = torch.ones(8)
    keep[3] = 0.0  # a video that failed to decode adds nothing
    logits_of = lambda model, x: view_logits(model, x[None])[0]  # noqa: E731
    schedule = CosineSchedule(total=4, lr=1e-2, final_lr=0.0, weight_decay=0.01, final_weight_decay=1e-6)

    def trained(micro: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        probe = build_probe(8, 5, 2, seed=1)
        optimizer = make_optimizer(probe, 0.01)
        for start in range(0, 8, micro):
            part = slice(start, start + micro)
            accumulate(probe, logits_of, inputs[part], labels[part], keep[part], 8, 1, start + micro == 8)
        grads = [p.grad.clone() for p in probe.parameters()]
        optimizer_step(probe, optimizer, schedule, 0, grad_clip=1.0)
        return grads, [p.detach().clone() for p in probe.parameters()]

    whole_grads, whole_weights = trained(8)
    for micro in (1, 2, 4):
        grads, weights = trained(micro)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, whole_grads, strict=False)), micro
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights, whole_weights, strict=False)), micro
    # The large batch's gradient is that of the mean loss over the global batch (the failed video counts 0).
    probe = build_probe(8, 5, 2, seed=1)
    (F.cross_entropy(logits_of(probe, inputs), labels, reduction="none") * keep).mean().backward()
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(probe.parameters(), whole_grads, strict=False))
    # Steps are the same for any rank count: each rank's share of every global batch, equal micro-batch counts.
    settings = VjepaEvalConfig(batch_size=8, micro_batch_size=2)
    one = epoch_steps(20, settings, 0, 0, 1)
    two = [epoch_steps(20, settings, 0, r, 2) for r in range(2)]
    assert len(one) == 2 and all(len(s.micro_batches) == 4 for s in one)
    for step, (a, b) in enumerate(zip(*two, strict=False)):
        assert len(a.micro_batches) == len(b.micro_batches) == 2
        assert sorted(np.concatenate(a.micro_batches + b.micro_batches)) == sorted(
            np.concatenate(one[step].micro_batches)
        )


# ---- the command -----------------------------------------------------------------------------------------

TINY_SETTINGS = {
    "epochs": 1,
    "batch_size": 4,
    "micro_batch_size": 2,
    "frames_per_clip": 4,
    "train_clips": 8,
    "val_clips": 4,
    "num_workers": 0,
}
TINY_RUN = tuple(arg for key, value in TINY_SETTINGS.items() for arg in ("--set", f"eval.vjepa.{key}={value}")) + (
    "--device",
    "cpu",
)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny encoder in the export format (random weights: the protocol, not the encoder, is under test)."""
    from salt_train.export import export_encoder
    from salt_train.student import build_student

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = build_student("vit_tiny_patch16_224", kwargs=TINY_STUDENT)
    return export_encoder(encoder, "vit_tiny_patch16_224", TINY_STUDENT, tmp_path_factory.mktemp("vjepa") / "export")


def test_protocol_vjepa_through_the_cli_writes_eval_json_with_its_settings(
    tiny_export: Path, demo_reference: Build, demo_val_reference: Build, tmp_path: Path
) -> None:
    out = tmp_path / "eval-vjepa"
    result = call_train(
        "eval",
        tiny_export,
        "--protocol",
        "vjepa",
        "--train-cache",
        demo_reference.store,
        "--val-cache",
        demo_val_reference.store,
        "--out",
        out,
        *TINY_RUN,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["protocol"] == "vjepa"
    settings = report["settings"]
    assert settings == {**VjepaEvalConfig().model_dump(mode="json"), **TINY_SETTINGS}
    assert report["splits"]["train"]["clips"] == 8 and report["splits"]["val"]["clips"] == 4
    assert report["splits"]["train"]["split"] == "train" and report["splits"]["val"]["split"] == "validation"
    assert report["schedule"]["steps"] == 2 and report["schedule"]["micro_batches_per_rank_step"] == 2
    assert report["probe"]["tokens"] == 2 * 2 * 196 and report["probe"]["heads"] == TINY_STUDENT["num_heads"]
    score = report["classification"]["attentive"]
    assert score["rows"] == 4 and 0.0 <= score["top1"] <= 1.0 and score["chance"] == 0.25
    assert report["epochs"][0]["decode_failures"] == 0 and np.isfinite(report["epochs"][0]["loss"])
    assert "top-1" in result.stderr and "probe training" in result.stderr


def test_protocol_vjepa_refuses_moved_or_missing_videos_and_stores_without_labels(
    tiny_export: Path, demo_set: Path, demo_reference: Build, tmp_path: Path
) -> None:
    def refused(val_store: Path) -> str:
        result = call_train(
            "eval",
            tiny_export,
            "--protocol",
            "vjepa",
            "--train-cache",
            demo_reference.store,
            "--val-cache",
            val_store,
            "--out",
            tmp_path / "out",
            *TINY_RUN,
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    source = shutil.copytree(demo_set, tmp_path / "ssv2")
    pipeline = fast_pipeline(tmp_path / "build.yaml")
    store = tmp_path / "val.zarr"
    assert (
        call_cli(
            "build", "--src", source, "--split", "validation", "--out", store, "--pixels-only", "--pipeline", pipeline
        ).returncode
        == 0
    )
    source.rename(tmp_path / "ssv2-moved")
    assert "gone or moved" in refused(store)
    (tmp_path / "ssv2-moved").rename(source)
    for video in (source / "20bn-something-something-v2").iterdir():
        video.unlink()
    assert "no .webm or .mp4 videos" in refused(store)

    unlabelled = shutil.copytree(demo_set, tmp_path / "ssv2-no-labels")
    (unlabelled / "labels" / "labels.json").unlink()
    store = tmp_path / "val-no-labels.zarr"
    assert (
        call_cli(
            "build",
            "--src",
            unlabelled,
            "--split",
            "validation",
            "--out",
            store,
            "--pixels-only",
            "--pipeline",
            pipeline,
        ).returncode
        == 0
    )
    assert "without labels" in refused(store)
