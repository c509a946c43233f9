"""`salt-cache build --repair`: rebuild the committed shards `salt-cache verify` finds damaged.

A rerun of the build (or ``--retry-failed``) only looks at row status, so a committed shard whose
bytes were damaged afterwards (a flipped bit, a truncated or deleted file) stays damaged. With
``--repair`` the build first runs verify's row checks and redoes every shard holding a damaged
row, whole, as the first build wrote it: the same clips, teacher and recipe give the same rows.

The recipe is the store's own (the resolved one it recorded at creation) unless ``--pipeline`` is
given, so the command verify prints (``verify.repair_command``) needs only the source and the store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from shared.errors import SaltUsageError
from shared.store import LatentStore, RowStatus

from salt_cache.verify import VerifyReport, check_rows

log = logging.getLogger(__name__)

# The recipe sections a build reads; the training ones do not matter to it.
BUILD_SECTIONS = ("teacher", "view", "store", "build_loader", "cache")


def damaged_shards(store: LatentStore, threads: int = 4) -> list[int]:
    """Shards holding a committed or failed row that verify's row checks find damaged."""
    status = store.status()
    report = VerifyReport(store=str(store.path))
    check_rows(store, report, status, threads)
    settled = (RowStatus.COMMITTED, RowStatus.FAILED)  # pending rows are a plain rerun's work
    rows = [problem.row for problem in report.problems if problem.row is not None and status[problem.row] in settled]
    return sorted({int(row) // store.shard_rows for row in np.unique(rows)}) if rows else []


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def recorded_recipe(store_path: Path) -> dict[str, Any]:
    """The build settings the store recorded, as dotted overrides (``{}`` where there is no store)."""
    if not Path(store_path).is_dir():
        return {}
    text = LatentStore.open(store_path).attrs.get("pipeline")
    try:
        recipe = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError:
        recipe = None
    if not isinstance(recipe, dict):
        raise SaltUsageError(f"store {store_path} records no readable recipe: pass the --pipeline it was built with")
    return _flatten({section: recipe[section] for section in BUILD_SECTIONS if isinstance(recipe.get(section), dict)})
