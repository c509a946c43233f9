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


def write_json_atomic(path: Path, record: Any) -> None:
    """Write JSON aside, flush it, rename it over ``path``: readers see the old or the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    fsync_path(tmp)
    os.replace(tmp, path)
