"""The shared training step: compiled with torch.compile it matches eager and never recompiles
after warm-up (fixed batch, fixed masked count)."""

from __future__ import annotations

import torch
import torch._dynamo

from conftest import TINY_STUDENT
from shared.config import load_pipeline
from shared.store import LatentStore
from salt_train.data import StoreStream, stream_spec
from salt_train.step import Stepper, resolve_compile_mode


def tiny_config(compile_mode: str):
    return load_pipeline("demo", {
        "model.student_kwargs": TINY_STUDENT, "model.predictor_width": 32, "model.predictor_depth": 1,
        "model.predictor_heads": 2, "model.compile_mode": compile_mode, "train.batch_size": 2,
        "loader.num_workers": 0,
    })


def test_compiled_step_matches_eager_and_does_not_recompile(demo_reference) -> None:
    store = LatentStore.open(demo_reference.store)
    batches = list(StoreStream(stream_spec(store, tiny_config("off"))))[:4]
    eager = Stepper(tiny_config("off"), store.teacher_width, torch.device("cpu"), total_steps=10)
    compiled = Stepper(tiny_config("default"), store.teacher_width, torch.device("cpu"), total_steps=10)
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
