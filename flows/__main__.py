"""``python -m flows <stage> [args]``: one pipeline stage as a Prefect flow run (see flows/__init__.py).

Arguments and params.yaml are checked first, before Prefect is imported
(seconds): a bad parameter file is reported at once, as ``mmrad`` does.
"""

import sys

from mmrad.cli import check_arguments

status = check_arguments(sys.argv[1:])
if status is not None:
    sys.exit(status)

from flows.pipeline import main  # noqa: E402 (after the fast checks on purpose)

sys.exit(main())
