"""`python -m lorakit ...` (and `torchrun ... -m lorakit train ...`) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
