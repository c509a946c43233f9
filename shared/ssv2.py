"""Find and read a Something-Something-v2 download (official and flat layouts).

Official: ``ROOT/20bn-something-something-v2/<id>.webm`` and
``ROOT/labels/{labels,train,validation,test}.json``. Also accepted: split files
in ``ROOT/`` or ``ROOT/annotations/`` (plain or ``something-something-v2-``
prefixed names) and videos in ``ROOT/videos/`` or ``ROOT/`` as .webm or .mp4.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import SaltUsageError

log = logging.getLogger(__name__)

VIDEO_DIR_NAMES = ("20bn-something-something-v2", "videos", ".")
LABEL_DIR_NAMES = ("labels", "annotations", ".")
VIDEO_SUFFIXES = (".webm", ".mp4")
# Ids become file names: allow only plain tokens, so "../../x" can never leave the video folder.
CLIP_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ClipRecord:
    clip_id: str
    path: Path  # where the video is, or where it would be when missing
    label: int  # class index from labels.json, -1 when unknown
    template: str


@dataclass
class SsV2Source:
    root: Path
    split: str
    split_file: Path
    labels_file: Path | None
    video_dir: Path
    clips: list[ClipRecord]
    refused_ids: list[str] = field(default_factory=list)

    @property
    def missing_videos(self) -> int:
        return sum(1 for clip in self.clips if not clip.path.exists())

    def describe(self) -> dict[str, object]:
        """Startup diagnostics: what was found where."""
        return {
            "source root": self.root,
            "split": self.split,
            "split file": self.split_file,
            "label map": self.labels_file or "none (labels stored as -1)",
            "video folder": self.video_dir,
            "clips": len(self.clips),
            "videos missing": self.missing_videos,
            "ids refused": len(self.refused_ids),
        }

    def to_attrs(self) -> dict[str, object]:
        """What a store records about its source."""
        return {
            "root": str(self.root),
            "split": self.split,
            "split_file": str(self.split_file),
            "label_map": str(self.labels_file) if self.labels_file else None,
            "label_map_sha256": _sha256(self.labels_file) if self.labels_file else None,
            "video_dir": str(self.video_dir),
            "clips": len(self.clips),
            "refused_ids": self.refused_ids[:100],
        }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _find_file(root: Path, stem: str) -> Path | None:
    for folder in LABEL_DIR_NAMES:
        for name in (f"{stem}.json", f"something-something-v2-{stem}.json"):
            candidate = root / folder / name
            if candidate.is_file():
                return candidate
    return None


def _video_index(folder: Path) -> dict[str, Path]:
    """Map clip id -> video file for every .webm/.mp4 directly in ``folder`` (.webm wins)."""
    found: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if suffix in VIDEO_SUFFIXES and (stem not in found or suffix == ".webm"):
                found[stem] = Path(entry.path)
    return found


def _find_video_dir(root: Path) -> tuple[Path, dict[str, Path]]:
    for name in VIDEO_DIR_NAMES:
        folder = (root / name) if name != "." else root
        if folder.is_dir():
            index = _video_index(folder)
            if index:
                return folder, index
    raise SaltUsageError(f"no .webm or .mp4 videos under {root} (looked in {', '.join(VIDEO_DIR_NAMES)})")


def _read_json_list(path: Path) -> list:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SaltUsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(rows, list):
        raise SaltUsageError(f"{path} must hold a JSON list of clips")
    return rows


def _read_label_map(path: Path) -> dict[str, int]:
    try:
        raw = json.loads(path.read_text())
        return {str(template): int(index) for template, index in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise SaltUsageError(f"cannot read label map {path}: {exc}") from None


def template_key(template: str) -> str:
    """labels.json keys are templates without the placeholder brackets."""
    return template.replace("[", "").replace("]", "")


def discover(root: str | Path, split: str = "train", limit: int | None = None) -> SsV2Source:
    """Index one split of an SSv2 download; bad ids are refused and listed, not fatal."""
    root = Path(root)
    if not root.exists():
        raise SaltUsageError(f"--src {root} does not exist")
    if not root.is_dir():
        raise SaltUsageError(f"--src {root} is a file; it must be the SSv2 folder")
    split_file = _find_file(root, split)
    if split_file is None:
        raise SaltUsageError(f"no {split}.json under {root} (looked in {', '.join(LABEL_DIR_NAMES)})")
    labels_file = _find_file(root, "labels")
    label_map = _read_label_map(labels_file) if labels_file else {}
    video_dir, videos = _find_video_dir(root)

    clips: list[ClipRecord] = []
    refused: list[str] = []
    seen: set[str] = set()
    for row in _read_json_list(split_file):
        raw_id = row.get("id", "") if isinstance(row, dict) else row
        clip_id = str(raw_id)
        # Only strings and integers are ids: null, true or 1.5 would pass the pattern as text.
        plain = isinstance(raw_id, str) or (isinstance(raw_id, int) and not isinstance(raw_id, bool))
        if not plain or not CLIP_ID_PATTERN.match(clip_id) or clip_id in seen:
            refused.append(clip_id)
            continue
        seen.add(clip_id)
        template = str(row.get("template", "")) if isinstance(row, dict) else ""
        label = label_map.get(template_key(template), -1) if template else -1
        path = videos.get(clip_id, video_dir / f"{clip_id}.webm")
        clips.append(ClipRecord(clip_id, path, label, template))
        if limit is not None and len(clips) >= limit:
            break
    if refused:
        log.warning("refused %d clip ids that are not plain tokens or repeat (first: %r)", len(refused), refused[0])
    if not clips:
        raise SaltUsageError(f"{split_file} lists no usable clips")
    return SsV2Source(root, split, split_file, labels_file, video_dir, clips, refused)
