"""Durable writes: what a rename-into-place needs to survive a power cut."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (after a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write aside, flush, rename over ``path``: readers (and a kill -9) see the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    fsync_path(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, record: Any) -> None:
    write_text_atomic(path, json.dumps(record, indent=1, default=str))
