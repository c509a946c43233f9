"""Stage 1 of the pipeline: `salt-cache` decodes clips, runs the frozen teacher and writes the latent-cache store.

The public surface (``__all__``; modules, imported on use so that a command starts fast):

- ``cli``: the ``salt-cache`` command (``build``, ``verify``, ``stats``, ``demo-data``, ``convert-teacher``, ``bench``);
- ``build``: a store built from a source (or filled from a pixels-only store by ``fill``), resumable shard by shard;
- ``verify``: proof that a store is whole (checksums; ``--deep`` re-runs the teacher on rows);
- ``demo_data``: the tiny synthetic SSv2-layout set the demo and the tests use.

Nothing here imports ``salt_train``; what both stages need lives in ``shared``.
"""

__all__ = ["build", "cli", "demo_data", "fill", "verify"]
