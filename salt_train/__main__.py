"""`python -m salt_train` (and `torchrun -m salt_train`)."""

import sys

from salt_train.cli import main

sys.exit(main())
