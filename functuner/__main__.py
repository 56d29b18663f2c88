"""``python -m functuner``: the same as the ``functuner`` console script."""

import sys

from .cli import main

sys.exit(main())
