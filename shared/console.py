"""Logging, startup diagnostics and progress bars shared by both stages."""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterable, Mapping

from tqdm import tqdm

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


OUR_LOGGERS = ("salt_cache", "salt_train", "shared")


def setup_logging(verbose: bool = False) -> None:
    """Log our packages to stderr, once per process. Libraries (transformers, huggingface_hub)
    keep their own handlers: a root handler would print each of their warnings twice."""
    level = logging.DEBUG if verbose else logging.INFO
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(level)


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    raise AssertionError("unreachable")


def print_block(title: str, items: Mapping[str, Any], stream=None) -> None:
    """A titled, aligned ``key: value`` block (startup diagnostics, summaries)."""
    stream = stream or sys.stderr
    width = max((len(k) for k in items), default=0)
    print(f"== {title}", file=stream)
    for key, value in items.items():
        print(f"  {key.ljust(width)} : {value}", file=stream)
    stream.flush()


def progress(total: int | None, description: str, unit: str = "clip", initial: int = 0,
             iterable: Iterable | None = None) -> tqdm:
    """A progress bar with rate and ETA; plain periodic lines when stderr is not a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=description,
        unit=unit,
        dynamic_ncols=True,
        smoothing=0.1,
        mininterval=0.5 if interactive else 10.0,
        file=sys.stderr,
    )
