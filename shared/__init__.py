"""What both stages import: the contracts between ``salt_cache`` (writes stores) and ``salt_train`` (reads them).

The public surface (``__all__``; modules, imported on use so that a command starts fast):

- ``geometry``: the clip and token contract (16 x 224 x 224, tubelets 2 x 16 x 16, 1568 tokens);
- ``config``: the recipe schema (``load_pipeline``, one section per component);
- ``store``: ``LatentStore`` (open, read, verify a store) and ``create_store``; ``rows``: reading row ranges;
- ``teacher``: the frozen VideoMAE teacher; ``ssv2``: finding and reading an SSv2 download; ``video``: decoding;
- ``errors`` and ``cli``: one-line errors and exit code 2; ``distributed``: torchrun ranks.

The rest (``shard_format``, ``shard_reader``, ``shard_writer``, ``filesystem``, ``parent_death``, ...) serve these.
"""

__all__ = ["cli", "config", "distributed", "errors", "geometry", "rows", "ssv2", "store", "teacher", "video"]
