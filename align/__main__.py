"""``python -m align ...`` = the ``align`` console script."""

import sys

from align.cli import main

sys.exit(main())
