"""`salt-train`: the training stage. Not built yet: it lands with the training issue.

The console script exists so the distribution's entry points are stable; every
command says plainly that training is not available in this release.
"""

from __future__ import annotations

import sys

from shared.cli import make_app, run_app
from shared.errors import SaltUsageError

app = make_app("Train the SALT student on a latent-cache store (not available yet in this release).")


@app.callback()
def _group() -> None:
    """Keep `salt-train run` a subcommand while it is the only one."""


@app.command()
def run() -> int:
    """Train the student (not available yet)."""
    raise SaltUsageError("salt-train is not available yet: this release builds and verifies the cache (salt-cache)")


def main(argv: list[str] | None = None) -> int:
    return run_app(app, "salt-train", argv)


if __name__ == "__main__":
    sys.exit(main())
