"""Where an evaluation writes: checked before any feature is computed, scratch of its own, one line on failure.

Two evaluations of one run never share scratch: each spills its tokens into a
fresh hidden folder under the output folder, removed on success, failure or
Ctrl-C. A folder that cannot be written, or a disk without room for the spilled
tokens, is refused before the work starts; a disk that fills up anyway ends in
one line (exit 2) with the scratch removed.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.console import format_bytes
from shared.errors import SaltUsageError, one_line

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


def prepare_output(out_dir: Path, spill_bytes: int) -> None:
    """Refuse an output folder that cannot be written, or whose disk cannot take ``spill_bytes`` of tokens."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise SaltUsageError(
            f"eval cannot write to {out_dir} ({one_line(exc)}): pass --out a writable folder"
        ) from None
    free = shutil.disk_usage(out_dir).free
    if spill_bytes > free:
        raise SaltUsageError(
            f"eval needs {format_bytes(spill_bytes)} free under {out_dir} for the tokens beyond "
            f"eval.feature_memory_gb, and {format_bytes(free)} is free: free space, pass --out "
            "elsewhere, or raise eval.feature_memory_gb"
        )


@contextmanager
def scratch(out_dir: Path) -> Iterator[Path]:
    """A fresh scratch folder under ``out_dir``, removed however the block ends; disk errors become one line."""
    path = Path(tempfile.mkdtemp(prefix=".features-", dir=out_dir))
    try:
        yield path
    except OSError as exc:
        if exc.errno in DISK_ERRORS:
            raise SaltUsageError(
                f"eval could not write under {out_dir} ({one_line(exc)}); its scratch was removed, nothing was kept"
            ) from None
        raise
    finally:
        shutil.rmtree(path, ignore_errors=True)
