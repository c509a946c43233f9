"""The shared training step: compiled with torch.compile it matches eager and never recompiles
after warm-up (fixed batch, fixed masked count)."""

from __future__ import annotations

import torch
import torch._dynamo
from conftest import TINY_STUDENT

from shared.config import load_pipeline
from shared.store import LatentStore

from salt_train.data import StoreStream, stream_spec
from salt_train.step import Stepper, resolve_compile_mode, seeded_student


def tiny_config(compile_mode: str):
    return load_pipeline(
        "demo",
        {
            "model.student_kwargs": TINY_STUDENT,
            "model.predictor_width": 32,
            "model.predictor_depth": 1,
            "model.predictor_heads": 2,
            "model.compile_mode": compile_mode,
            "train.batch_size": 2,
            "train_loader.num_workers": 0,
        },
    )


def tiny_stepper(config, teacher_width: int) -> Stepper:
    return Stepper(
        seeded_student(config, teacher_width), config.train, config.model, torch.device("cpu"), total_steps=10
    )


def test_compiled_step_matches_eager_and_does_not_recompile(demo_reference) -> None:
    store = LatentStore.open(demo_reference.store)
    batches = list(StoreStream(stream_spec(store, tiny_config("off"))))[:4]
    eager = tiny_stepper(tiny_config("off"), store.teacher_width)
    compiled = tiny_stepper(tiny_config("default"), store.teacher_width)
    torch._dynamo.reset()
    losses = []
    for step, batch in enumerate(batches):
        if step == 1:  # warm-up done: any further compilation would be a recompile
            torch._dynamo.config.error_on_recompile = True
        try:
            losses.append((eager.step(batch, step).loss, compiled.step(batch, step).loss))
        finally:
            torch._dynamo.config.error_on_recompile = False
    for eager_loss, compiled_loss in losses:
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=1e-4)


def test_compile_auto_is_max_autotune_on_cuda_and_off_on_cpu() -> None:
    assert resolve_compile_mode("auto", torch.device("cuda")) == "max-autotune"
    assert resolve_compile_mode("auto", torch.device("cpu")) == "off"
    assert resolve_compile_mode("default", torch.device("cpu")) == "default"


def test_the_step_from_uint8_views_to_the_loss_traces_to_one_graph(demo_reference) -> None:
    store = LatentStore.open(demo_reference.store)
    config = tiny_config("default")
    batch = next(iter(StoreStream(stream_spec(store, config))))
    stepper = tiny_stepper(config, store.teacher_width)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(stepper.objective)(*stepper.inputs(batch))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_the_objective_equals_the_student_on_normalised_pixels_and_the_loss(demo_reference) -> None:
    """uint8 views normalised inside the graph, targets gathered and layer-normed inside it:
    the same loss as the student on to_model_inputs' pixels and the loss functions outside."""
    from salt_train.data import to_model_inputs
    from salt_train.loss import normalise_targets, regression_loss
    from salt_train.student import gather_tokens

    store = LatentStore.open(demo_reference.store)
    for mode in ("salt", "mask-token"):
        config = tiny_config("off")
        config.model.mode = mode
        batch = next(iter(StoreStream(stream_spec(store, config))))
        stepper = tiny_stepper(config, store.teacher_width)
        views, latents, visible, masked = stepper.inputs(batch)
        pixels, _ = to_model_inputs(batch, torch.device("cpu"))
        with torch.no_grad():
            assert len(visible) == len(masked) == 2  # the default multiblock: short- and long-range groups
            expected = torch.stack(
                [
                    regression_loss(
                        stepper.model(pixels, v, m, group=g),
                        normalise_targets(gather_tokens(latents, m)),
                        config.model.loss,
                    )
                    for g, (v, m) in enumerate(zip(visible, masked, strict=False))
                ]
            ).mean()
            torch.testing.assert_close(
                stepper.objective(views, latents, visible, masked), expected, rtol=1e-5, atol=1e-6
            )


def test_attention_choices_resolve_on_cpu() -> None:
    from torch.nn.attention import SDPBackend

    from salt_train.attention import attention_backends, attention_context

    cpu = torch.device("cpu")
    assert attention_backends("auto", cpu) is None
    assert attention_backends("math", cpu) == [SDPBackend.MATH]
    assert attention_backends("flash", cpu) == [SDPBackend.FLASH_ATTENTION]
    assert attention_backends("cudnn", cpu) is None  # CUDA-only: torch's default, with a warning
    q = torch.randn(1, 2, 8, 16)
    reference = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    for choice in ("math", "flash", "auto"):
        with attention_context(attention_backends(choice, cpu)):
            torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, q, q), reference)
