"""`python -m salt_cache` (and `torchrun -m salt_cache`)."""

import sys

from salt_cache.cli import main

sys.exit(main())
