"""What torchrun told this process through its environment (torch-free: read before any import of torch)."""

from __future__ import annotations

import os


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it; 1 outside torchrun (or when unreadable)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    """This process's global rank; 0 outside torchrun."""
    if env_world_size() <= 1:
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
