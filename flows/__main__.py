"""``python -m flows <stage> [args]``: one pipeline stage as a Prefect flow run (see flows/__init__.py)."""

import sys

from flows.pipeline import main

sys.exit(main())
