"""Which stores and rows an evaluation reads, and the rule that validation rows are held out.

A validation store is refused (one line, exit 2) when it could silently score the
student on what it trained on: the same store, the same split of the same
source, or any clip id it shares with the train store; and when its latents or
views were made another way (teacher, precision, view recipe, geometry).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import SaltUsageError
from shared.rows import committed_rows
from shared.store import LatentStore


def _clip_ids(store: LatentStore) -> set[str]:
    return {str(c) for c in np.asarray(store.array("clip_id")[:]).tolist()}


def check_held_out(train: LatentStore, val: LatentStore) -> None:
    """Refuse a validation store that is not held out from the train store."""
    hint = "build the validation store from another split (salt-cache build --split validation --out ...)"
    if Path(train.path).resolve() == Path(val.path).resolve():
        raise SaltUsageError(f"validation store {val.path} is the train store: its rows are not held out; {hint}")
    t_source, v_source = train.attrs.get("source", {}), val.attrs.get("source", {})
    if (
        t_source.get("split")
        and t_source.get("split") == v_source.get("split")
        and t_source.get("root") == v_source.get("root")
    ):
        raise SaltUsageError(
            f"validation store {val.path} holds the same split ({v_source['split']}) of the same "
            f"source as the train store {train.path}: its rows are not held out; {hint}"
        )
    shared = _clip_ids(train) & _clip_ids(val)
    if shared:
        example = sorted(shared)[0]
        raise SaltUsageError(
            f"validation store {val.path} shares {len(shared)} clip(s) with the train store "
            f"{train.path} (e.g. clip {example}): its rows are not held out; {hint}"
        )


def check_compatible(train: LatentStore, val: LatentStore) -> None:
    """Refuse a validation store that is not held out, or was made by another teacher, view recipe or
    geometry than the train store."""
    check_held_out(train, val)
    found = []
    t_id, v_id = train.attrs.get("identity", {}), val.attrs.get("identity", {})
    if t_id.get("teacher_weights_hash") != v_id.get("teacher_weights_hash") or train.teacher_width != val.teacher_width:
        found.append(
            f"another teacher ({val.attrs.get('teacher', {}).get('name')} vs "
            f"{train.attrs.get('teacher', {}).get('name')})"
        )
    if t_id.get("teacher_compute_dtype") != v_id.get("teacher_compute_dtype"):
        found.append("another teacher precision")
    if _view_recipe(train) != _view_recipe(val):
        found.append("another view recipe")
    if train.attrs.get("geometry") != val.attrs.get("geometry"):
        found.append("another geometry")
    if found:
        raise SaltUsageError(
            f"validation store {val.path} was built with {', '.join(found)} than the train store "
            f"{train.path}: build it with the same teacher and recipe (salt-cache build --split "
            "validation --teacher ... --pipeline ...)"
        )


def _view_recipe(store: LatentStore) -> dict:
    """The view recipe without the sampling offset (a validation store may use centre sampling) and the
    extra views (a validation store has one view per clip, the train store's view 0)."""
    view = dict(store.attrs.get("view", {}))
    for key in ("sampling", "sampling_rule", "views_per_clip", "view_rule", "crop_scale", "crop_ratio"):
        view.pop(key, None)
    return view


def eval_candidates(store: LatentStore) -> np.ndarray:
    """The rows an evaluation may draw: committed ones, and of a store of several views per clip
    view 0 only (the centre view: one row per clip)."""
    return store.first_views(committed_rows(store))


def draw_eval_rows(store: LatentStore, count: int, seed: int, flag: str) -> tuple[np.ndarray, np.ndarray]:
    """``count`` of the :func:`eval_candidates`, a seeded choice: (sorted rows, their order of choice
    for subsets)."""
    committed = eval_candidates(store)
    if count > len(committed):
        what = "committed rows" if store.views_per_clip == 1 else "clips with a committed view 0"
        raise SaltUsageError(
            f"{flag} {count}: store {store.path} has only {len(committed)} {what} (ask for at most {len(committed)})"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, len(committed)]))
    chosen = rng.permutation(committed)[:count]
    rank = np.empty(count, dtype=np.int64)
    order = np.argsort(chosen)
    rank[order] = np.arange(count)
    return chosen[order], rank[order]  # rank[i]: when row i was chosen (first chosen: 0)


def store_labels(store: LatentStore, rows: np.ndarray) -> np.ndarray:
    return np.asarray(store.array("label")[:], dtype=np.int64)[rows]


def class_count(*stores: LatentStore) -> int:
    return int(max(int(np.max(s.array("label")[:], initial=-1)) for s in stores)) + 1


@dataclass
class RowSet:
    store: LatentStore
    rows: np.ndarray
    temporal: np.ndarray  # bool per row
    labels: np.ndarray  # per row, -1 unknown


def row_set(store: LatentStore, count: int, temporal_rows: int | None, seed: int, flag: str) -> RowSet:
    rows, rank = draw_eval_rows(store, count, seed, flag)
    temporal = rank < (temporal_rows if temporal_rows is not None else count)
    return RowSet(store, rows, temporal, store_labels(store, rows))
