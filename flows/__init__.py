"""Prefect flows: thin wrappers that run the mmrad pipeline stages as flow runs.

``python -m flows <stage> [args]`` takes exactly the arguments of
``mmrad <stage>`` (the same parser, the same library functions) and runs the
stage as a Prefect flow run named after it; dvc.yaml calls every stage this
way, so one ``dvc repro`` shows up in DVC and in Prefect. ``flows.pipeline``
holds the flows and the scheduled ``retrain`` flow; prefect.yaml deploys it.

Embedded default: with no PREFECT_API_URL set, Prefect starts its temporary
local API for the run (no server to install). MMRAD_ORCHESTRATION=off runs
the stage without Prefect (the benchmark's "off" side, or a machine without
an API).
"""

import os

# Before Prefect reads its settings: the library's own log records go to the
# flow run's log; a machine without internet does not try to send telemetry;
# and the temporary API gets time to create its database on a fresh machine
# (Prefect's default 20 s is too short for the first migration on a busy 2-core box).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mmrad")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
