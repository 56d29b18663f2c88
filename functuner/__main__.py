"""``python -m functuner``: the same as the ``functuner`` console script."""

import sys

from .cli.main import main

sys.exit(main())
