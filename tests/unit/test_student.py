"""The student: video ViT encoder, predictor, masked loss, export (real timm models at tiny sizes, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import token_position
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from shared import geometry
from shared.config import ModelConfig
from shared.errors import SaltUsageError

from salt_train.export import export_encoder, load_encoder
from salt_train.loss import normalise_targets, regression_loss
from salt_train.model import build_salt_student, student_flops_per_clip
from salt_train.predictor import Predictor, sincos_positions_3d
from salt_train.student import VideoViT, build_student, gather_tokens, tubelets, view_tubelets

VIT = "vit_tiny_patch16_224"
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}
TEACHER_WIDTH = 64
N = geometry.NUM_TOKENS


def random_masks(batch: int, masked_count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked`` [B, M] and ``visible`` [B, N-M]: sorted, disjoint, covering all tokens (the mask module's format)."""
    order = torch.rand(batch, N, generator=torch.Generator().manual_seed(seed)).argsort(1)
    return order[:, :masked_count].sort(1).values, order[:, masked_count:].sort(1).values


def tiny_config(**fields) -> ModelConfig:
    return ModelConfig(
        student=VIT, student_kwargs=TINY, predictor_width=32, predictor_depth=1, predictor_heads=2, **fields
    )


def pixels(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        batch,
        3,
        geometry.NUM_FRAMES,
        geometry.IMAGE_SIZE,
        geometry.IMAGE_SIZE,
        generator=torch.Generator().manual_seed(seed),
    )


def save_2d_checkpoint(path, model_name: str = VIT, kwargs: dict = TINY, seed: int = 1, **create) -> torch.nn.Module:
    """A 2D timm model with non-default weights (positions and biases included), saved as .safetensors."""
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **kwargs, **create)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


def tubelet_slice(token: int) -> tuple[slice, slice, slice]:
    """The (frames, rows, columns) of the pixels that ``token`` embeds."""
    t, h, w = token_position(token)
    p, k = geometry.PATCH_SIZE, geometry.TUBELET_SIZE
    return slice(t * k, (t + 1) * k), slice(h * p, (h + 1) * p), slice(w * p, (w + 1) * p)


# --- shapes and structure -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["salt", "mask-token"])
def test_student_predicts_the_masked_tokens(mode: str) -> None:
    torch.manual_seed(0)
    student = build_salt_student(tiny_config(mode=mode), TEACHER_WIDTH)
    masked, visible = random_masks(2, 1176)
    out = student(pixels(), visible, masked)
    assert out.shape == (2, 1176, TEACHER_WIDTH) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_encoder_shapes_and_timm_keys() -> None:
    encoder = build_student(VIT, kwargs=TINY)
    assert isinstance(encoder, VideoViT) and encoder.width == 32
    conv = encoder.patch_embed.proj
    assert isinstance(conv, torch.nn.Conv3d)
    assert conv.kernel_size == (2, 16, 16) and conv.stride == (2, 16, 16)
    video = pixels(2)
    _, visible = random_masks(2, 1176)
    with torch.no_grad():
        assert encoder(video, token_ids=visible).shape == (2, 392, 32)
        full = encoder(video)
        assert full.shape == (2, N, 32)  # no class token in the output
        everything = torch.arange(N).expand(2, N)
        torch.testing.assert_close(encoder(video, token_ids=everything), full)
    keys = set(encoder.state_dict())
    assert {
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.bias",
        "norm.weight",
        "patch_embed.proj.weight",
        "pos_embed",
        "temporal_embed",
    } <= keys
    assert not any("cls_token" in key or "reg_token" in key or key.startswith("head") for key in keys)
    assert encoder.pos_embed.shape == (1, N, 32) and encoder.temporal_embed.shape == (1, 8, 1, 32)


def test_predictor_output_follows_the_order_of_masked() -> None:
    torch.manual_seed(0)
    predictor = Predictor(encoder_width=32, width=32, depth=1, heads=2, out_width=TEACHER_WIDTH).eval()
    masked, visible = random_masks(2, 1176)
    context = torch.randn(2, visible.shape[1], 32)
    shuffle = torch.randperm(1176)
    with torch.no_grad():
        straight = predictor(context, visible, masked)
        shuffled = predictor(context, visible, masked[:, shuffle])
    torch.testing.assert_close(shuffled, straight[:, shuffle], rtol=1e-5, atol=1e-5)


def test_predictor_positions_are_fixed_distinct_and_not_checkpointed() -> None:
    table = sincos_positions_3d(32)
    assert table.shape == (1, N, 32)
    assert torch.unique(table[0], dim=0).shape[0] == N  # every token its own position
    predictor = Predictor(32, 32, 1, 2, TEACHER_WIDTH)
    assert "pos_embed" not in predictor.state_dict()  # rebuilt from the geometry, never saved
    assert sincos_positions_3d(30).shape == (1, N, 30)  # widths not divisible by 8 are padded


@pytest.mark.parametrize("mode", ["salt", "mask-token"])
def test_masked_pixels_cannot_leak_into_predictions(mode: str) -> None:
    # The student must not see what it predicts: pixels under masked tokens change nothing.
    torch.manual_seed(0)
    student = build_salt_student(tiny_config(mode=mode), TEACHER_WIDTH).eval()
    masked, visible = random_masks(1, 1176)
    video = pixels(1)
    changed = video.clone()
    for token in masked[0, :50].tolist():
        frames, rows, cols = tubelet_slice(token)
        changed[0, :, frames, rows, cols] = torch.randn(3, 2, 16, 16)
    seen = video.clone()
    frames, rows, cols = tubelet_slice(int(visible[0, 0]))
    seen[0, :, frames, rows, cols] += 1.0
    with torch.no_grad():
        reference = student(video, visible, masked)
        assert torch.equal(student(changed, visible, masked), reference)
        assert not torch.allclose(student(seen, visible, masked), reference)


# --- inflation from a 2D checkpoint -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_name, kwargs, create",
    [
        (VIT, TINY, {"num_classes": 10}),  # class token; the classifier head in the file is ignored
        ("vit_small_patch16_224", {**TINY, "reg_tokens": 4}, {}),  # class + register tokens dropped
        ("deit3_small_patch16_224", TINY, {}),  # no_embed_class: pos_embed has only the 196 patch positions
    ],
)
def test_static_video_embeds_like_the_2d_model(tmp_path, model_name: str, kwargs: dict, create: dict) -> None:
    path = tmp_path / "vit2d.safetensors"
    vit2d = save_2d_checkpoint(path, model_name, kwargs, **create)
    encoder = build_student(model_name, kwargs=kwargs, pretrained=str(path)).eval()
    frame = torch.randn(2, 3, 224, 224)
    video = frame.unsqueeze(2).expand(-1, -1, geometry.NUM_FRAMES, -1, -1)
    with torch.no_grad():
        tokens = encoder.patch_embed(video).reshape(2, geometry.GRID_T, geometry.TOKENS_PER_FRAME, 32)
        tokens2d = vit2d.patch_embed(frame)  # [B, 196, width]
    for slot in range(geometry.GRID_T):
        torch.testing.assert_close(tokens[:, slot], tokens2d, rtol=1e-5, atol=1e-5)
    spatial = vit2d.pos_embed.detach()[:, -geometry.TOKENS_PER_FRAME :]
    positions = encoder.pos_embed.detach().reshape(1, geometry.GRID_T, geometry.TOKENS_PER_FRAME, 32)
    for slot in range(geometry.GRID_T):
        assert torch.equal(positions[:, slot], spatial)
    assert torch.equal(encoder.temporal_embed, torch.zeros_like(encoder.temporal_embed))
    assert torch.equal(encoder.blocks[1].attn.qkv.weight, vit2d.blocks[1].attn.qkv.weight)
    assert torch.equal(encoder.norm.weight, vit2d.norm.weight)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path) -> None:
    shallow = tmp_path / "depth1.safetensors"
    save_2d_checkpoint(shallow, VIT, {**TINY, "depth": 1})
    with pytest.raises(SaltUsageError, match="does not fit") as missing:
        build_student(VIT, kwargs=TINY, pretrained=str(shallow))
    assert "blocks.1" in str(missing.value) and "\n" not in str(missing.value)
    narrow = tmp_path / "width16.safetensors"
    save_2d_checkpoint(narrow, VIT, {**TINY, "embed_dim": 16})
    with pytest.raises(SaltUsageError, match="cannot load") as mismatch:
        build_student(VIT, kwargs=TINY, pretrained=str(narrow))
    assert "\n" not in str(mismatch.value)


# --- the loss ---------------------------------------------------------------------------------------------------


def masked_loss(
    predictions: torch.Tensor, latents: torch.Tensor, masked: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """The loss of full-grid predictions ``[B, 1568, D]``, as SaltObjective takes it of the predictor's
    ``[B, M, D]``: only the tokens at ``masked`` count."""
    targets = normalise_targets(gather_tokens(latents, masked))
    return regression_loss(gather_tokens(predictions, masked), targets, kind)


@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_masked_loss_counts_only_masked_tokens(kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randn(2, N, 16, generator=generator)
    latents = torch.randn(2, N, 16, generator=generator) * 3 + 1
    masked, visible = random_masks(2, 1176)
    reference = masked_loss(predictions, latents, masked, kind)
    assert reference.dtype == torch.float32 and reference > 0

    at_visible = torch.zeros(2, N, 1, dtype=torch.bool).scatter_(1, visible.unsqueeze(-1), True)
    noise = torch.randn(2, N, 16, generator=generator) * 10
    assert torch.equal(
        masked_loss(torch.where(at_visible, noise, predictions), torch.where(at_visible, noise, latents), masked, kind),
        reference,
    )

    one = int(masked[1, 7])
    moved = predictions.clone()
    moved[1, one] += 1.0
    assert masked_loss(moved, latents, masked, kind) != reference
    retarget = latents.clone()
    retarget[1, one] = torch.randn(16, generator=generator)
    assert masked_loss(predictions, retarget, masked, kind) != reference


@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_targets_are_per_token_layer_normed(kind: str) -> None:
    latents = (torch.randn(2, N, 64) * 5 + 3).half()  # the store's fp16, off-centre, wide scale
    targets = normalise_targets(latents)
    assert targets.dtype == torch.float32
    torch.testing.assert_close(targets.mean(-1), torch.zeros(2, N), rtol=0, atol=1e-5)
    torch.testing.assert_close(targets.var(-1, unbiased=False), torch.ones(2, N), rtol=0, atol=1e-3)
    masked, _ = random_masks(2, 1176)
    assert masked_loss(targets, latents, masked, kind) == 0  # predicting the normalised latents exactly
    assert masked_loss(latents.float(), latents, masked, kind) > 0.5  # raw latents are not the target
    # the same whatever the scale and offset of a token's latent
    assert masked_loss(targets, latents.float() * 7 - 2, masked, kind) < 1e-5


def test_regression_loss_refuses_misaligned_shapes_and_the_recipe_unknown_kinds() -> None:
    from pydantic import ValidationError

    from shared.config import ModelConfig

    with pytest.raises(ValueError, match="shape"):
        regression_loss(torch.zeros(2, 5, 8), torch.zeros(2, 1, 8), "mse")
    with pytest.raises(ValidationError, match="huber"):  # the loss kind is checked once, at the recipe
        ModelConfig(loss="huber")
    predicted, target = torch.full((1, 2, 2), 3.0, dtype=torch.bfloat16), torch.ones(1, 2, 2)
    assert regression_loss(predicted, target, "mse").item() == 4.0
    assert regression_loss(predicted, target, "l1").item() == 2.0


# --- gradients --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["salt", "mask-token"])
def test_backward_reaches_every_parameter(mode: str) -> None:
    torch.manual_seed(0)
    student = build_salt_student(tiny_config(mode=mode), TEACHER_WIDTH).train()
    masked, visible = random_masks(2, 1176)
    latents = torch.randn(2, N, TEACHER_WIDTH)
    loss = regression_loss(
        student(pixels(), visible, masked), normalise_targets(latents[torch.arange(2)[:, None], masked]), "mse"
    )
    loss.backward()
    without = [name for name, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []
    assert student.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    head = student.predictor.head if mode == "salt" else student.head
    assert head.weight.grad.abs().sum() > 0


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    masked, visible = random_masks(2, 1176)
    video, latents = pixels(), torch.randn(2, 1176, TEACHER_WIDTH)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        student = build_salt_student(tiny_config(grad_checkpointing=checkpointing), TEACHER_WIDTH).train()
        assert student.encoder.grad_checkpointing is checkpointing
        regression_loss(student(video, visible, masked), normalise_targets(latents), "l1").backward()
        grads.append({name: p.grad.clone() for name, p in student.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


# --- export -----------------------------------------------------------------------------------------------------


def test_export_round_trip_through_timm(tmp_path) -> None:
    torch.manual_seed(0)
    encoder = build_student(VIT, kwargs=TINY)
    with torch.no_grad():  # trained-looking weights: nothing at its initial value
        for param in encoder.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("an older export")  # replaced as a whole
    assert export_encoder(encoder, VIT, TINY, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no partial folder left
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == VIT and config["kwargs"] == TINY and config["width"] == 32
    assert config["format"] == "salt-video-vit" and config["num_tokens"] == N and config["tubelet_size"] == 2

    loaded = load_encoder(out)
    assert isinstance(loaded, VideoViT)
    assert "blocks.0.attn.qkv.weight" in loaded.state_dict() and "norm.weight" in loaded.state_dict()
    assert loaded.state_dict().keys() == encoder.state_dict().keys()
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    video = pixels(1)
    _, visible = random_masks(1, 1176)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(video), encoder.eval()(video))
        assert torch.equal(loaded(video, token_ids=visible), encoder(video, token_ids=visible))


def test_broken_exports_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(SaltUsageError, match="not a SALT encoder export"):
        load_encoder(tmp_path / "missing")
    out = export_encoder(build_student(VIT, kwargs=TINY), VIT, TINY, tmp_path / "export")
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated
    with pytest.raises(SaltUsageError, match="does not load") as truncated:
        load_encoder(out)
    assert "\n" not in str(truncated.value)
    (out / "config.json").write_text("{not json")
    with pytest.raises(SaltUsageError, match="not a SALT encoder export"):
        load_encoder(out)
    other = export_encoder(build_student(VIT, kwargs=TINY), VIT, {**TINY, "depth": 3}, tmp_path / "lies")
    with pytest.raises(SaltUsageError, match="does not load"):  # weights of 2 blocks, config says 3
        load_encoder(other)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[VideoViT, object]:
    """A tiny encoder with trained-looking weights (temporal embedding included) and its export."""
    torch.manual_seed(2)
    encoder = build_student(VIT, kwargs=TINY)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return encoder.eval(), export_encoder(encoder, VIT, TINY, tmp_path_factory.mktemp("few-frames") / "export")


@pytest.mark.parametrize("frames", range(2, geometry.NUM_FRAMES + 1, 2))
def test_export_loads_for_any_even_number_of_frames(frames, exported) -> None:
    """T frames give T/2*196 tokens: the 16-frame encoder restricted to its first T/2 temporal slots."""
    encoder, out = exported
    loaded = load_encoder(out, num_frames=frames).eval()
    tokens = frames // geometry.TUBELET_SIZE * geometry.TOKENS_PER_FRAME
    video = pixels(2, seed=frames)
    views = torch.randint(
        0,
        256,
        (1, frames, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE, 3),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(frames),
    )
    with torch.no_grad():
        few = loaded(video[:, :, :frames])
        assert few.shape == (2, tokens, encoder.width)
        # The trained encoder on a full clip, kept to the tokens of its first T frames before the blocks.
        restricted = encoder.encode_tokens(encoder.embed(video)[:, :tokens])
        if frames == geometry.NUM_FRAMES:
            assert torch.equal(few, encoder(video))  # exactly today's output
            assert loaded.state_dict().keys() == encoder.state_dict().keys()
        torch.testing.assert_close(few, restricted, rtol=1e-5, atol=1e-5)
        from_views = loaded.forward_views(views)  # uint8 frames, as a robot's camera gives them
        expected = loaded(
            ((views.permute(0, 4, 1, 2, 3).float() / 255) - torch.tensor(geometry.PIXEL_MEAN).view(1, 3, 1, 1, 1))
            / torch.tensor(geometry.PIXEL_STD).view(1, 3, 1, 1, 1)
        )
        torch.testing.assert_close(from_views, expected, rtol=1e-4, atol=1e-4)


@given(
    frames=st.one_of(
        st.integers(-40, 40).filter(lambda t: t % 2 or not 2 <= t <= 16), st.just(16.0), st.just(True), st.just("8")
    )
)
@settings(max_examples=30, deadline=None)
def test_export_refuses_frames_it_cannot_position(frames, tmp_path_factory) -> None:
    with pytest.raises(ValueError, match="even number of frames from 2 to 16"):
        load_encoder(tmp_path_factory.getbasetemp() / "never-read", num_frames=frames)


# --- bad input --------------------------------------------------------------------------------------------------


def test_unknown_timm_model_is_named() -> None:
    with pytest.raises(SaltUsageError, match="vit_tinny_patch16_224") as err:
        build_student("vit_tinny_patch16_224")
    assert "vit_tiny_patch16_224" in str(err.value).split("close:")[1]  # a suggestion
    assert "\n" not in str(err.value)


def test_non_vit_models_and_bad_kwargs_are_refused() -> None:
    with pytest.raises(SaltUsageError, match="resnet18 is not a timm VisionTransformer"):
        build_student("resnet18")
    with pytest.raises(SaltUsageError, match="positions"):  # 384 px: 576 positions, not the 14x14 grid
        build_student("vit_base_patch16_384", kwargs=TINY)
    with pytest.raises(SaltUsageError, match="student_kwargs"):
        build_student(VIT, kwargs={"depht": 2})


def test_missing_pretrained_file_is_refused(tmp_path) -> None:
    with pytest.raises(SaltUsageError, match="nope.safetensors"):
        build_student(VIT, kwargs=TINY, pretrained=str(tmp_path / "nope.safetensors"))
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(b"\x00" * 64)
    with pytest.raises(SaltUsageError, match="cannot load"):
        build_student(VIT, kwargs=TINY, pretrained=str(garbled))


# --- FLOPs ------------------------------------------------------------------------------------------------------


def test_flops_match_the_design_budget() -> None:
    flops = student_flops_per_clip(ModelConfig(), teacher_width=1280, layout=((392, 1176),))  # ViT-B, 384/12/12
    assert flops["encoder"] == pytest.approx(72e9, rel=0.1)  # ViT-B on 392 visible tokens
    assert flops["predictor"] == pytest.approx(113e9, rel=0.1)  # predictor on 1568 tokens
    assert flops["train_step"] == pytest.approx(555e9, rel=0.1)
    assert flops["train_step"] == pytest.approx(3 * (flops["encoder"] + flops["predictor"] + flops["patch_embed"]))
    mask_token = student_flops_per_clip(ModelConfig(mode="mask-token"), 1280, ((392, 1176),))
    assert mask_token["encoder"] == pytest.approx(4 * flops["encoder"], rel=0.35)  # 1568 tokens, attention grows
    assert mask_token["encoder"] > 4 * flops["encoder"]


def test_flops_in_a_fresh_process_before_any_model_is_built() -> None:
    """The first use of the cached pixel statistics may come from the shapes-only (meta device) model
    that counts FLOPs: a fresh interpreter, no model built before, must still count them."""
    script = (
        "import json; from shared.config import ModelConfig; "
        "from salt_train.model import student_flops_per_clip; "
        "print(json.dumps(student_flops_per_clip(ModelConfig(), 1280, ((392, 1176),))))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    in_process = student_flops_per_clip(ModelConfig(), 1280, ((392, 1176),))
    assert json.loads(done.stdout.strip().splitlines()[-1]) == pytest.approx(in_process)


def test_flops_of_the_two_multiblock_groups() -> None:
    """Multiblock runs the encoder and the predictor once per group: 392 + 96 context tokens,
    392 + 784 and 96 + 1120 predictor tokens, about a third more than one 0.75 random group."""
    from salt_train.masks import mask_layout

    layout = mask_layout("multiblock", 0.75)
    flops = student_flops_per_clip(ModelConfig(), 1280, layout)
    single = student_flops_per_clip(ModelConfig(), 1280, ((392, 1176),))
    parts = [student_flops_per_clip(ModelConfig(), 1280, (group,)) for group in layout]
    for key in flops:
        assert flops[key] == pytest.approx(sum(part[key] for part in parts))
    assert flops["train_step"] == pytest.approx(740e9, rel=0.02)
    assert 1.2 < flops["train_step"] / single["train_step"] < 1.45


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), keep=st.integers(1, geometry.NUM_TOKENS))
def test_embedding_only_the_visible_tubelets_equals_the_conv3d_then_the_gather(seed: int, keep: int) -> None:
    """The Conv3d as a matmul on gathered tubelets, from normalised float pixels and from uint8
    views: the full Conv3d followed by the gather, at any subset of token ids."""
    from salt_train.student import gather_tokens

    generator = torch.Generator().manual_seed(seed)
    encoder = build_student(VIT, kwargs=TINY)
    views = torch.randint(
        0,
        256,
        (2, geometry.NUM_FRAMES, geometry.IMAGE_SIZE, geometry.IMAGE_SIZE, 3),
        generator=generator,
        dtype=torch.uint8,
    )
    mean = torch.tensor(geometry.PIXEL_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(geometry.PIXEL_STD).view(1, 3, 1, 1, 1)
    pixels = (views.permute(0, 4, 1, 2, 3).float() / 255 - mean) / std
    ids = torch.stack([torch.randperm(geometry.NUM_TOKENS, generator=generator)[:keep].sort().values for _ in range(2)])
    with torch.no_grad():
        full = gather_tokens(encoder.embed(pixels), ids)
        torch.testing.assert_close(
            encoder.embed_at(gather_tokens(tubelets(pixels), ids), ids), full, rtol=1e-4, atol=1e-5
        )
        from_views = encoder.patch_embed.normalise(gather_tokens(view_tubelets(views), ids))
        torch.testing.assert_close(encoder.embed_at(from_views, ids), full, rtol=1e-4, atol=1e-5)
        # and the encoder's features, through the blocks: forward, forward_views
        torch.testing.assert_close(encoder(pixels, ids), encoder.encode_tokens(full), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(encoder.forward_views(views, ids), encoder(pixels, ids), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(encoder.forward_views(views), encoder(pixels), rtol=1e-4, atol=1e-5)


def test_predictor_has_one_mask_token_per_mask_group() -> None:
    # V-JEPA's predictor learns a mask token per mask group: multiblock's short- and long-range targets
    # start from different tokens, so the same context and target ids predict differently per group.
    from shared.config import MaskConfig

    from salt_train.model import mask_groups

    assert mask_groups(MaskConfig(kind="multiblock")) == 2 and mask_groups(MaskConfig(kind="random")) == 1
    torch.manual_seed(0)
    student = build_salt_student(tiny_config(), TEACHER_WIDTH, groups=2).eval()
    assert student.predictor.mask_tokens.shape == (2, 1, 32)
    assert "predictor.mask_token" not in student.state_dict()
    masked, visible = random_masks(1, 1176)
    video = pixels(1)
    with torch.no_grad():
        first, second = (student(video, visible, masked, group=g) for g in (0, 1))
        assert not torch.allclose(first, second)
        student.predictor.mask_tokens[1] = student.predictor.mask_tokens[0]  # same token: same predictions
        torch.testing.assert_close(student(video, visible, masked, group=1), first)


def test_weights_of_the_one_token_predictor_are_refused_in_one_line() -> None:
    from shared.errors import SaltUsageError

    student = build_salt_student(tiny_config(), TEACHER_WIDTH, groups=2)
    old = dict(student.state_dict())
    old["predictor.mask_token"] = old.pop("predictor.mask_tokens")[:1]
    with pytest.raises(SaltUsageError, match=r"one predictor mask token \(predictor.mask_token\)") as refused:
        student.load_state_dict(old)
    assert "\n" not in str(refused.value)
