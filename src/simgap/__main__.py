"""``python -m simgap``, as the ``simgap`` console script."""

import sys

from simgap.cli import main

sys.exit(main())
