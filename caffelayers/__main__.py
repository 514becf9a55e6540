"""``python -m caffelayers``: the ``caffelayers`` command without its console script."""

import sys

from .cli import main

sys.exit(main())
