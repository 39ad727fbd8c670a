"""``python -m coord.cli``: the `coord` command."""

import sys

from coord.cli import main

sys.exit(main())
