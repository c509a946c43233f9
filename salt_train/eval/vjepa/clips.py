"""Which videos the protocol reads: the splits the two stores were built from, in their source download.

A store records its source (``source.root``, ``split``, the label map and its sha256). The protocol reads
the whole split from there (V-JEPA trains on all 168,913 SSv2 training videos and scores all 24,777
validation videos), or a seeded subset (``eval.vjepa.train_clips``, ``val_clips``). Refused in one line
(exit 2): a source that is gone or moved, a split whose videos are all missing, a split without labels
(SSv2's test split, or a download without labels.json), a label map changed since the store was built,
and a validation split that is not held out. Videos missing from a split otherwise are left out, counted
and recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import SaltUsageError
from shared.ssv2 import ClipRecord, discover
from shared.store import LatentStore

log = logging.getLogger(__name__)


@dataclass
class SplitClips:
    """One split's labelled videos that exist, and what was left out."""

    store: Path
    root: Path
    split: str
    clips: list[ClipRecord]
    classes: int
    missing: int  # listed videos whose file is gone
    unlabelled: int  # listed videos with no class

    def record(self) -> dict:
        return {
            "store": str(self.store),
            "root": str(self.root),
            "split": self.split,
            "clips": len(self.clips),
            "missing_videos": self.missing,
            "unlabelled": self.unlabelled,
            "classes": self.classes,
        }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_clips(store: LatentStore, limit: int | None, seed: int, flag: str) -> SplitClips:
    """The labelled, present videos of the split ``store`` was built from (a seeded ``limit`` of them)."""
    source = store.attrs.get("source", {})
    root, split = source.get("root"), source.get("split")
    if not root or not split:
        raise SaltUsageError(
            f"store {store.path} records no source folder and split: --protocol vjepa reads the "
            "videos it was built from"
        )
    root_path = Path(root)
    if not root_path.is_dir():
        raise SaltUsageError(
            f"the source videos of store {store.path} are gone or moved: {root} is not a folder "
            "(--protocol vjepa decodes them again; put the download back there)"
        )
    if not source.get("label_map"):
        raise SaltUsageError(
            f"store {store.path} was built without labels (no labels.json under {root}): the "
            "protocol trains and scores a classifier on them"
        )
    try:
        found = discover(root_path, split)
    except SaltUsageError as exc:  # its words name --src, a flag of salt-cache build
        raise SaltUsageError(
            f"the source of store {store.path} cannot be read again: {str(exc).replace('--src ', '')}"
        ) from None
    if found.labels_file is None:
        raise SaltUsageError(f"the source {root} of store {store.path} no longer has its labels.json")
    recorded_sha = source.get("label_map_sha256")
    if recorded_sha and _sha256(found.labels_file) != recorded_sha:
        raise SaltUsageError(
            f"{found.labels_file} changed since store {store.path} was built (sha256 differs): "
            "its class indices may not be the store's"
        )
    labelled = [clip for clip in found.clips if clip.label >= 0]
    present = [clip for clip in labelled if clip.path.is_file()]
    if not labelled:
        raise SaltUsageError(
            f"the {split} split of {root} (store {store.path}) has no labelled videos "
            "(SSv2's test split has none): the protocol needs labels"
        )
    if not present:
        raise SaltUsageError(
            f"none of the {len(labelled)} {split} videos of store {store.path} is in "
            f"{found.video_dir}: the source videos are missing or moved"
        )
    missing = len(labelled) - len(present)
    if missing:
        log.warning(
            "%d of the %d labelled %s videos are missing from %s: left out",
            missing,
            len(labelled),
            split,
            found.video_dir,
        )
    if limit is not None:
        if limit > len(present):
            raise SaltUsageError(f"{flag} {limit}: the {split} split has only {len(present)} labelled videos")
        rng = np.random.default_rng(np.random.SeedSequence([seed, len(present), 19]))
        present = [present[i] for i in np.sort(rng.permutation(len(present))[:limit])]
    label_map = _label_count(found.labels_file)
    return SplitClips(store.path, root_path, split, present, label_map, missing, len(found.clips) - len(labelled))


def _label_count(labels_file: Path) -> int:
    return max(int(index) for index in json.loads(labels_file.read_text()).values()) + 1


def check_held_out(train: SplitClips, val: SplitClips) -> None:
    """The validation split must be another split, sharing no video with the train split."""
    if train.root.resolve() == val.root.resolve() and train.split == val.split:
        raise SaltUsageError(
            f"the validation store {val.store} holds the same split ({val.split}) of the same "
            f"source as the train store {train.store}: its videos are not held out"
        )
    shared = {c.clip_id for c in train.clips} & {c.clip_id for c in val.clips}
    if shared:
        raise SaltUsageError(
            f"the validation split shares {len(shared)} video(s) with the train split "
            f"(e.g. {sorted(shared)[0]}): its videos are not held out"
        )
    if train.classes != val.classes:
        raise SaltUsageError(
            f"the train split has {train.classes} classes and the validation split "
            f"{val.classes}: build both stores from one download"
        )
