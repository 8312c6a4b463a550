"""``python -m fetalscan``: the same as the ``fetalscan`` command."""

import sys

from fetalscan.cli import main

sys.exit(main())
