"""What ``salt-train run --resume`` may change in the recipe a run recorded, and what it may not.

A resumed run continues with its ``config.yaml``, so that it ends with the weights an uninterrupted
run would have. Settings that cannot change those weights may still be set on the resume
(``--set``, ``--device``): where the evaluation reads (a wrong ``eval.val_cache`` is fixed without
deleting the run), the loader's processes, how often it logs and checkpoints. What a resume set is
written back to ``config.yaml`` (later resumes continue with it) and listed in ``run.json``.
Anything else is refused with one line: changing it is a new run.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from shared.config import PipelineConfig, describe_validation_error
from shared.errors import SaltUsageError

# Whole sections, or single fields, a resume may set.
RESUMABLE = (
    "eval.",
    "train_loader.",
    "train.device",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.eval_every",
    "train.record_rows",
    "train.max_nonfinite_steps",
    "stream.max_errors",
)
SNAPSHOT_KEY = "stream.snapshot"  # --snapshot: a resume reads what the run read, so it may only repeat it


def resumable(key: str) -> bool:
    return any(key.startswith(allowed) if allowed.endswith(".") else key == allowed for allowed in RESUMABLE)


def resumed_config(recorded: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """``recorded`` with the resumable ``overrides`` (dotted keys) applied, each validated as the recipe's own."""
    config = recorded.model_copy(deep=True)
    for key, value in overrides.items():
        if key == SNAPSHOT_KEY:
            if value != config.stream.snapshot:
                raise SaltUsageError(
                    f"--snapshot {value}: this run was started with --snapshot "
                    f"{config.stream.snapshot}, and a resume reads what the run read; "
                    "drop --snapshot"
                )
            continue
        if not resumable(key):
            raise SaltUsageError(
                f"--set {key}: a resumed run continues with its recorded recipe, so that it ends "
                "as an uninterrupted one; a resume may set only eval.*, train_loader.*, "
                "train.device, train.checkpoint_every, train.keep_checkpoints, train.log_every, "
                "train.eval_every, train.record_rows, train.max_nonfinite_steps and "
                "stream.max_errors (start a new run to change the rest)"
            )
        *parents, leaf = key.split(".")
        node: Any = config
        try:
            for name in (*parents, leaf):
                if name not in type(node).model_fields:
                    raise SaltUsageError(f"--set {key}: unknown key")
                if name != leaf:
                    node = getattr(node, name)
            setattr(node, leaf, value)  # the sections validate assignments
        except ValidationError as err:
            raise SaltUsageError(describe_validation_error(err, f"--set {key}")) from None
    return config


def changed_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    """What a resume writes back to config.yaml: its overrides, all but ``--snapshot`` (which only repeats)."""
    return {key: value for key, value in overrides.items() if key != SNAPSHOT_KEY}
