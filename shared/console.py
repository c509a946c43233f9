"""Logging, startup diagnostics and progress bars shared by both stages."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from tqdm import tqdm

from shared.torchrun_env import env_rank, env_world_size

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


OUR_LOGGERS = ("salt_cache", "salt_train", "shared")


def is_console_rank() -> bool:
    """Under torchrun only rank 0 prints blocks, bars and info lines; the others warn and fail only."""
    return env_rank() == 0


def rank_tag() -> str:
    """`` [rank N]`` under torchrun, for lines a command prints itself; empty alone."""
    return f" [rank {env_rank()}]" if env_world_size() > 1 else ""


def setup_logging(verbose: bool = False) -> None:
    """Log our packages to stderr, once per process. Libraries (transformers, huggingface_hub)
    keep their own handlers: a root handler would print each of their warnings twice.
    Under torchrun, lines say their rank, and ranks other than 0 log warnings and errors only."""
    level = logging.DEBUG if verbose else logging.INFO
    log_format = LOG_FORMAT
    if env_world_size() > 1:
        log_format = LOG_FORMAT.replace("%(levelname)s", f"%(levelname)s [rank {env_rank()}]")
        level = level if is_console_rank() else logging.WARNING
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(log_format, datefmt="%H:%M:%S"))
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
    """A titled, aligned ``key: value`` block (startup diagnostics, summaries); rank 0's only."""
    if not is_console_rank():
        return
    stream = stream or sys.stderr
    width = max((len(k) for k in items), default=0)
    print(f"== {title}", file=stream)
    for key, value in items.items():
        print(f"  {key.ljust(width)} : {value}", file=stream)
    stream.flush()


def progress(
    total: int | None, description: str, unit: str = "clip", initial: int = 0, iterable: Iterable | None = None
) -> tqdm:
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
        disable=not is_console_rank(),
    )
