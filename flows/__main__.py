"""``python -m flows <stage> [args]``: one pipeline stage as a Prefect flow run (see flows/__init__.py).

Arguments and params.yaml are checked first, before Prefect is imported
(seconds): a bad parameter file is reported at once, as ``mmrad`` does. Then
the stage finds (or starts) the project's Prefect server (flows/server.py).
``python -m flows server status|start|stop`` manages that server.
"""

import os
import sys

if sys.argv[1:2] == ["server"]:
    from flows.server import main as server_main

    sys.exit(server_main(sys.argv[2:]))

from mmrad.cli import check_arguments  # noqa: E402

status = check_arguments(sys.argv[1:])
if status is not None:
    sys.exit(status)

if os.environ.get("MMRAD_ORCHESTRATION", "on").lower() not in ("off", "0", "false", "no") and sys.argv[1:2] not in (
        [], ["-h"], ["--help"]):
    from flows.server import for_stage

    for_stage()  # before Prefect is imported: it reads PREFECT_API_URL from the environment

from flows.pipeline import main  # noqa: E402 (after the fast checks on purpose)

sys.exit(main())
