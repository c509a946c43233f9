"""Stage 2 of the pipeline: `salt-train` trains a student against the cached teacher latents, and evaluates it.

The public surface (``__all__``; modules, imported on use so that a command starts fast):

- ``cli``: the ``salt-train`` command (``run``, ``teacher``, ``eval``, ``import-encoder``, ``preflight``, ...);
- ``train``: the training loop (``salt-train run``; ``salt-train teacher`` runs the same loop on ``pixel_teacher``);
- ``model``: the student (``build_salt_student``: a timm ViT encoder and the predictor); ``export``: ``load_encoder``;
- ``eval``: ``salt-train eval``, the evaluation wing (its own ``__init__`` lists its modules).

Nothing here imports ``salt_cache``; what both stages need lives in ``shared``.
"""

__all__ = ["cli", "eval", "export", "model", "pixel_teacher", "train"]
