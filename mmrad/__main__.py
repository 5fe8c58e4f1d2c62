"""``python -m mmrad``: the same command line as the ``mmrad`` entry point."""

import sys

from mmrad.cli import main

sys.exit(main())
