"""Run ``python -m MODULE ARGS...`` and kill it with SIGKILL at an exact point, from its own audit hook.

    python tests/kill_at.py EVENT NEEDLE N MODULE ARGS...

The process kills itself (a real ``kill -9``: no cleanup runs) just before the N-th audit event
(PEP 578) named EVENT with an argument containing NEEDLE happens: ``shutil.copyfile`` (a file
being copied), ``os.rename`` (also ``os.replace``: a staged file or folder renamed into place),
``open`` (a file being opened). So a test can stop a process between two given writes, which a
kill timed from outside only hits by chance. The code under test carries no hook of its own.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def main() -> None:
    event, needle, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seen = 0

    def hook(name: str, args: tuple) -> None:
        nonlocal seen
        if name == event and any(needle in str(arg) for arg in args):
            seen += 1
            if seen == count:
                os.kill(os.getpid(), signal.SIGKILL)

    module = sys.argv[4]
    sys.argv = [module, *sys.argv[5:]]
    sys.addaudithook(hook)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
