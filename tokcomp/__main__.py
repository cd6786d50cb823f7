"""``python -m tokcomp``: the same command line as the ``tokcomp`` console script."""

import sys

from tokcomp.cli import main

sys.exit(main())
