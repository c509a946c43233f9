"""The learning-rate schedule (salt_train.schedule) and AdamW parameter groups (salt_train.optim)."""

from __future__ import annotations

import logging
import math

import pytest
import timm
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from salt_train.optim import NO_DECAY_NAMES, build_optimizer, parameter_groups
from salt_train.schedule import lr_at, set_lr

FEW = settings(max_examples=50, deadline=None)


@st.composite
def schedules(draw: st.DrawFn) -> dict:
    lr = draw(st.floats(1e-6, 1.0))
    return {
        "lr": lr,
        "min_lr": draw(st.floats(0.0, 1.0)) * lr,
        "warmup_steps": draw(st.integers(0, 300)),
        "total_steps": draw(st.integers(1, 2000)),
    }


def curve(params: dict, extra: int = 50) -> list[float]:
    return [lr_at(step, **params) for step in range(params["total_steps"] + extra)]


@FEW
@given(params=schedules())
def test_schedule_stays_between_floor_and_peak(params: dict) -> None:
    for value in curve(params):
        assert params["min_lr"] <= value <= params["lr"]


@FEW
@given(params=schedules())
def test_warmup_is_linear_then_cosine_is_non_increasing(params: dict) -> None:
    lr, min_lr, warmup, total = params["lr"], params["min_lr"], params["warmup_steps"], params["total_steps"]
    values = curve(params)
    for step in range(min(warmup, total)):
        expected = max(min_lr, lr * (step + 1) / warmup)  # linear, lifted to the floor
        assert values[step] == pytest.approx(expected, rel=1e-12)
        if step:
            assert values[step] >= values[step - 1]
    after = values[warmup:total]
    assert all(b <= a for a, b in zip(after, after[1:], strict=False))


@FEW
@given(params=schedules())
def test_peak_at_warmup_end_and_floor_at_total(params: dict) -> None:
    lr, min_lr, warmup, total = params["lr"], params["min_lr"], params["warmup_steps"], params["total_steps"]
    assume(warmup < total)
    if warmup:
        assert lr_at(warmup - 1, **params) == pytest.approx(lr)
    assert lr_at(warmup, **params) == pytest.approx(lr)  # cosine starts at the peak
    for step in (total, total + 1, 10 * total + 7):
        assert lr_at(step, **params) == min_lr


def test_cosine_midpoint_and_seed_recipe() -> None:
    params = {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 300, "total_steps": 1300}
    assert lr_at(0, **params) == pytest.approx(3e-5)  # 3e-4 / 300 = 1e-6, lifted to the floor
    assert lr_at(149, **params) == pytest.approx(1.5e-4)
    assert lr_at(299, **params) == pytest.approx(3e-4)
    assert lr_at(800, **params) == pytest.approx(0.5 * (3e-4 + 3e-5))  # halfway through the cosine
    assert lr_at(1299, **params) == pytest.approx(3e-5, rel=1e-3)


def test_no_warmup_and_warmup_only() -> None:
    assert lr_at(0, lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=10) == 1.0
    assert lr_at(9, lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=10) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * 0.9))
    )
    # warmup_steps >= total_steps: the run is all warmup, never past the peak.
    values = [lr_at(step, lr=1.0, min_lr=0.0, warmup_steps=20, total_steps=10) for step in range(10)]
    assert values == pytest.approx([(step + 1) / 20 for step in range(10)])
    assert lr_at(9, lr=1.0, min_lr=0.0, warmup_steps=10, total_steps=10) == 1.0
    assert lr_at(10, lr=1.0, min_lr=0.25, warmup_steps=20, total_steps=10) == 0.25


def test_schedule_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        lr_at(-1, lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError):
        lr_at(0, lr=1.0, min_lr=2.0, warmup_steps=0, total_steps=10)


class WithTemporalEmbed(torch.nn.Module):
    """A video-style adapter: a 3D patch projection and a learned temporal embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.temporal_embed = torch.nn.Parameter(torch.zeros(1, 8, 1, 8))  # ndim 4: only the name exempts it
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


class Student(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, num_classes=0)
        self.adapter = WithTemporalEmbed()
        self.head = torch.nn.Linear(192, 16)
        self.tied = self.head  # the same module twice: its parameters must still count once


def group_names(model: torch.nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    by_id = {id(param): name for name, param in model.named_parameters()}
    return {group["name"]: {by_id[id(param)] for param in group["params"]} for group in groups}


def test_parameter_groups_split_decay_from_norms_biases_and_embeddings() -> None:
    model = Student()
    groups = parameter_groups(model, weight_decay=0.05)
    assert [group["name"] for group in groups] == ["decay", "no_decay"]
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    names = group_names(model, groups)
    decay, no_decay = names["decay"], names["no_decay"]

    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert sum(len(group["params"]) for group in groups) == len(trainable)  # exactly once each
    assert not any(name.startswith("adapter.frozen") for name in decay | no_decay)

    for name in (
        "vit.pos_embed",
        "vit.cls_token",
        "adapter.temporal_embed",
        "vit.norm.weight",
        "vit.norm.bias",
        "vit.blocks.0.norm1.weight",
        "vit.blocks.0.attn.qkv.bias",
        "vit.patch_embed.proj.bias",
        "head.bias",
    ):
        assert name in no_decay, name
    for name in (
        "vit.blocks.0.attn.qkv.weight",
        "vit.blocks.0.attn.proj.weight",
        "vit.blocks.0.mlp.fc1.weight",
        "vit.blocks.0.mlp.fc2.weight",
        "vit.patch_embed.proj.weight",
        "adapter.proj.weight",
        "head.weight",
    ):
        assert name in decay, name
    for name in decay:
        assert not any(key in name for key in NO_DECAY_NAMES)
        assert model.get_parameter(name).ndim > 1


def test_parameter_groups_log_their_sizes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="salt_train.optim"):
        parameter_groups(torch.nn.Linear(3, 2), weight_decay=0.1)
    assert "1 decay (6 values), 1 no_decay (2 values)" in caplog.text


def test_empty_groups_are_dropped_and_no_parameters_refused() -> None:
    only_norm = torch.nn.LayerNorm(4)
    assert [group["name"] for group in parameter_groups(only_norm, 0.05)] == ["no_decay"]
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    assert parameter_groups(frozen, 0.05) == []
    with pytest.raises(ValueError):
        build_optimizer(frozen, lr=1e-3, weight_decay=0.05, device=torch.device("cpu"))


def test_build_optimizer_steps_on_cpu_with_scheduled_lr() -> None:
    torch.manual_seed(0)
    model = Student()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, device=torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    assert optimizer.defaults["fused"]  # fused on the CPU too: it takes the device-side skip flag

    set_lr(optimizer, 5e-4)
    assert [group["lr"] for group in optimizer.param_groups] == [5e-4, 5e-4]

    frozen_before = model.adapter.frozen.weight.clone()
    decayed_before = model.head.weight.detach().clone()
    pixels = torch.randn(2, 3, 224, 224)
    features = model.vit(pixels)
    loss = model.head(features).pow(2).mean() + model.adapter.temporal_embed.sum() * 0
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert not torch.equal(model.head.weight, decayed_before)
    assert torch.equal(model.adapter.frozen.weight, frozen_before)
    assert all(torch.isfinite(param).all() for param in model.parameters())


def test_weight_decay_only_touches_the_decay_group() -> None:
    # With zero gradients AdamW's update is pure decay: decay-group weights shrink, the rest stay put.
    model = Student()
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.5, device=torch.device("cpu"))
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    head, pos = model.head.weight.detach().clone(), model.vit.pos_embed.detach().clone()
    optimizer.step()
    assert torch.allclose(model.head.weight, head * (1 - 0.1 * 0.5))
    assert torch.equal(model.vit.pos_embed, pos)
