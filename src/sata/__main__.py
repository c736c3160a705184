"""``python -m sata``: the ``sata`` command line (:mod:`sata.cli`)."""

import sys

from .cli import main

sys.exit(main())
