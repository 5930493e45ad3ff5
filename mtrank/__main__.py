"""``python -m mtrank ...`` is the ``mtrank`` command."""

import sys

from mtrank.cli import main

sys.exit(main())
