"""Pretrain-style teachers (final norm on every token) and `salt-cache convert-teacher`.

The original-layout checkpoint is written from a tiny transformers VideoMAE with random weights,
renamed by hand into the original release's key layout; its outputs are checked against that
model and against a plain-torch forward of the original layout written here from the original
code's definition (so the converter is not checked only against its own inverse).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEModel

from shared import geometry
from shared.errors import SaltUsageError
from shared.rows import read_row_range
from shared.store import LatentStore
from shared.teacher import load_teacher, load_teacher_model

from tests.conftest import call_cli

WIDTH, DEPTH, HEADS = 32, 2, 2


def tiny_pretrain_config() -> VideoMAEConfig:
    return VideoMAEConfig(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=64,
        use_mean_pooling=False,
        layer_norm_eps=1e-6,
        attn_implementation="sdpa",
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (norms and biases too, so a dropped or misplaced one shows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(
                torch.randn(param.shape, generator=generator) * (0.2 if param.ndim == 1 else 0.05)
                + (1.0 if param.ndim == 1 else 0.0)
            )
    return model.eval()


def original_layout(model: VideoMAEModel) -> dict[str, torch.Tensor]:
    """The tiny model's encoder under the original release's names, plus a decoder to be left out."""
    sd = model.state_dict()
    out = {
        "encoder.patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "encoder.patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "encoder.norm.weight": sd["layernorm.weight"],
        "encoder.norm.bias": sd["layernorm.bias"],
    }
    for i in range(DEPTH):
        ours, theirs = f"encoder.layer.{i}.", f"encoder.blocks.{i}."
        att = ours + "attention.attention."
        out[theirs + "attn.qkv.weight"] = torch.cat(
            [sd[att + "query.weight"], sd[att + "key.weight"], sd[att + "value.weight"]]
        )
        out[theirs + "attn.q_bias"] = sd[att + "query.bias"]
        out[theirs + "attn.v_bias"] = sd[att + "value.bias"]
        for original, name in (
            ("attn.proj", "attention.output.dense"),
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
            ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"),
        ):
            for kind in ("weight", "bias"):
                out[f"{theirs}{original}.{kind}"] = sd[f"{ours}{name}.{kind}"]
    generator = torch.Generator().manual_seed(9)
    for key, shape in (
        ("decoder.blocks.0.attn.qkv.weight", (48, 16)),
        ("decoder.norm.weight", (16,)),
        ("decoder.head.weight", (1536, 16)),
        ("encoder_to_decoder.weight", (16, WIDTH)),
        ("mask_token", (1, 1, 16)),
    ):
        out[key] = torch.randn(shape, generator=generator)
    return {k: v.clone() for k, v in out.items()}


def sinusoid_table(positions: int, width: int) -> torch.Tensor:
    """The original code's fixed position table: angle pos / 10000^(2*(j//2)/width), sin on even j, cos on odd."""
    angles = np.arange(positions)[:, None] / np.power(10000, 2 * (np.arange(width) // 2) / width)[None, :]
    angles[:, 0::2], angles[:, 1::2] = np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])
    return torch.tensor(angles, dtype=torch.float32)[None]


def original_forward(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """The original pretraining encoder (no mask), from its definition: ``[B, 3, T, H, W]`` -> ``[B, N, D]``."""
    x = (
        F.conv3d(
            pixels,
            state["encoder.patch_embed.proj.weight"],
            state["encoder.patch_embed.proj.bias"],
            stride=(geometry.TUBELET_SIZE, geometry.PATCH_SIZE, geometry.PATCH_SIZE),
        )
        .flatten(2)
        .transpose(1, 2)
    )
    b, n, d = x.shape
    x = x + sinusoid_table(n, d)
    norm = lambda t, p: F.layer_norm(t, (d,), state[p + ".weight"], state[p + ".bias"], 1e-6)  # noqa: E731
    for i in range(DEPTH):
        p = f"encoder.blocks.{i}."
        bias = torch.cat([state[p + "attn.q_bias"], torch.zeros(d), state[p + "attn.v_bias"]])
        qkv = F.linear(norm(x, p + "norm1"), state[p + "attn.qkv.weight"], bias)
        q, k, v = qkv.reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        attention = ((q * (d // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear(
            (attention @ v).transpose(1, 2).reshape(b, n, d), state[p + "attn.proj.weight"], state[p + "attn.proj.bias"]
        )
        hidden = F.gelu(F.linear(norm(x, p + "norm2"), state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(hidden, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    return norm(x, "encoder.norm")


def normalised(views: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` -> VideoMAE's float ``[B, T, 3, H, W]`` (ImageNet statistics)."""
    mean = torch.tensor(geometry.PIXEL_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(geometry.PIXEL_STD).view(1, 1, 3, 1, 1)
    return (views.permute(0, 1, 4, 2, 3).float() / 255.0 - mean) / std


@pytest.fixture(scope="module")
def source_model() -> VideoMAEModel:
    return randomised(VideoMAEModel(tiny_pretrain_config()), seed=3)


@pytest.fixture(scope="module")
def original_pth(source_model: VideoMAEModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original release's file layout: weights under "model", beside the epoch and the run's args."""
    path = tmp_path_factory.mktemp("original") / "checkpoint.pth"
    torch.save(
        {
            "model": original_layout(source_model),
            "epoch": 1599,
            "args": argparse.Namespace(model="pretrain_videomae_tiny", lr=1.5e-4),
        },
        path,
    )
    return path


def views(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, geometry.NUM_FRAMES, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def test_converted_original_checkpoint_matches_the_original_model(source_model, original_pth, tmp_path) -> None:
    out = tmp_path / "teacher"
    result = call_cli("convert-teacher", original_pth, out, "--heads", HEADS)
    assert result.returncode == 0, result.stderr
    assert f"width {WIDTH}, {DEPTH} layers, {HEADS} heads" in result.stdout
    assert "5 decoder tensors" in result.stdout and "args, epoch" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["use_mean_pooling"] is False and config["layer_norm_eps"] == 1e-6

    converted = load_teacher_model(str(out))
    assert converted.layernorm is not None
    for key, value in source_model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    video = views(2, seed=0)
    pixels = normalised(video)
    with torch.no_grad():
        expected = source_model(pixel_values=pixels).last_hidden_state
        assert torch.equal(converted(pixel_values=pixels).last_hidden_state, expected)
        # The original layout's own forward, written from its definition, agrees too.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(original_pth, weights_only=True)["model"]
        from_definition = original_forward(state, pixels.permute(0, 2, 1, 3, 4))
    torch.testing.assert_close(from_definition, expected, rtol=1e-4, atol=1e-4)

    teacher = load_teacher(str(out), device="cpu")
    assert teacher.final_norm and teacher.identity()["final_norm"] is True and teacher.width == WIDTH
    assert torch.equal(teacher.encode(video), expected.to(torch.float16))


@pytest.mark.parametrize("wrapping", ["module", "bare", "legacy format"])
def test_other_wrappings_convert_too(wrapping, source_model, tmp_path) -> None:
    """DeepSpeed-style {"module": state}, a bare state dict and torch's pre-1.6 format give the same weights."""
    state = original_layout(source_model)
    path = tmp_path / "weights.pth"
    torch.save(
        {"module": state} if wrapping == "module" else state,
        path,
        _use_new_zipfile_serialization=wrapping != "legacy format",
    )
    result = call_cli("convert-teacher", path, tmp_path / "teacher", "--heads", HEADS)
    assert result.returncode == 0, result.stderr
    converted = load_teacher_model(str(tmp_path / "teacher"))
    for key, value in source_model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


class NotATensor:  # a class only pickle code could rebuild
    pass


@pytest.mark.parametrize(
    "case", ["missing key", "extra key", "pickle code", "not a checkpoint", "missing file", "no heads", "out exists"]
)
def test_bad_original_checkpoints_are_one_line(case, source_model, tmp_path) -> None:
    state = original_layout(source_model)
    path, out, heads = tmp_path / "bad.pth", tmp_path / "teacher", ["--heads", str(HEADS)]
    expect = {
        "missing key": "encoder.blocks.1.mlp.fc2.bias",
        "extra key": "encoder.blocks.0.gamma_1",
        "pickle code": "NotATensor",
        "not a checkpoint": "not a PyTorch checkpoint",
        "missing file": "does not exist",
        "no heads": "--heads",
        "out exists": "already exists",
    }[case]
    if case == "missing key":
        del state["encoder.blocks.1.mlp.fc2.bias"]
    elif case == "extra key":
        state["encoder.blocks.0.gamma_1"] = torch.ones(WIDTH)
    if case == "pickle code":
        torch.save({"model": state, "hook": NotATensor()}, path)
    elif case == "not a checkpoint":
        path.write_text("not a checkpoint\n")
    elif case != "missing file":
        torch.save({"model": state}, path)
    if case == "no heads":
        heads = []
    if case == "out exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    result = call_cli("convert-teacher", path, out, *heads)
    assert result.returncode == 2 and expect in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    if case == "out exists":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not (tmp_path / "teacher.partial").exists()


@pytest.fixture(scope="module")
def pretraining_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub-style VideoMAEForPreTraining folder (encoder norm stored as videomae.layernorm)."""
    path = tmp_path_factory.mktemp("pretraining-teacher")
    randomised(VideoMAEForPreTraining(tiny_pretrain_config()), seed=4).save_pretrained(path)
    return path


def test_pretrain_style_teacher_builds_a_store_of_normed_latents(
    pretraining_dir, demo_set, demo_pipeline, tmp_path
) -> None:
    store_path = tmp_path / "latents.zarr"
    result = call_cli(
        "build",
        "--src",
        demo_set,
        "--out",
        store_path,
        "--teacher",
        pretraining_dir,
        "--pipeline",
        demo_pipeline,
        "--limit",
        3,
    )
    assert result.returncode == 0, result.stderr
    store = LatentStore.open(store_path)
    assert store.attrs["teacher"]["final_norm"] is True and store.attrs["teacher"]["width"] == WIDTH
    assert store.attrs["identity"]["teacher_final_norm"] is True
    rows = read_row_range(store, 0, 3)
    assert (store.status(0, 3) == 1).all()

    # The reference, with transformers directly: the encoder's blocks, then its final norm.
    reference_model = VideoMAEForPreTraining.from_pretrained(pretraining_dir).eval()
    encoder = reference_model.videomae
    pixels = normalised(torch.from_numpy(rows["pixels"]))
    with torch.no_grad():
        raw = encoder.encoder(encoder.embeddings(pixels, None)).last_hidden_state
        normed = encoder.layernorm(raw)
    latents = torch.from_numpy(rows["latents"]).float()
    torch.testing.assert_close(latents, normed.half().float(), rtol=2e-3, atol=2e-3)
    assert (latents - raw).abs().mean() > 0.1  # the raw residual stream is not what was stored
    verified = call_cli("verify", store_path, "--deep", 2, "--device", "cpu")  # reloads the folder, re-runs it
    assert verified.returncode == 0 and "deep check" in verified.stdout, verified.stdout + verified.stderr

    # Another teacher kind into the same store is refused before anything is written.
    again = call_cli(
        "build",
        "--src",
        demo_set,
        "--out",
        store_path,
        "--teacher",
        "builtin:tiny-videomae",
        "--pipeline",
        demo_pipeline,
        "--limit",
        3,
    )
    assert again.returncode == 2 and "another teacher kind" in again.stderr, again.stderr
    assert (torch.from_numpy(read_row_range(LatentStore.open(store_path), 0, 3)["latents"]).float() == latents).all()


def test_a_final_norm_the_config_would_drop_is_refused(pretraining_dir, tmp_path) -> None:
    folder = tmp_path / "mislabelled"
    folder.mkdir()
    for item in pretraining_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "architectures": ["VideoMAEModel"], "use_mean_pooling": True})
    )
    with pytest.raises(
        SaltUsageError, match=r"final norm \(videomae\.layernorm\.(weight|bias)\).*use_mean_pooling: false"
    ):
        load_teacher_model(str(folder))


def test_raw_residual_teachers_are_unchanged(teacher_dir) -> None:
    """The default kind (mean pooling: the norm belongs to the classifier) gets no final norm."""
    teacher = load_teacher(str(teacher_dir), device="cpu")
    assert teacher.final_norm is False and teacher.identity()["final_norm"] is False
