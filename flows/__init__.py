"""Prefect flows: thin wrappers that run the mmrad pipeline stages as flow runs.

``python -m flows <stage> [args]`` takes exactly the arguments of
``mmrad <stage>`` (the same parser, the same library functions) and runs the
stage as a Prefect flow run named after it; dvc.yaml calls every stage this
way, so one ``dvc repro`` shows up in DVC and in Prefect. ``flows.pipeline``
holds the flows and the scheduled ``retrain`` flow; prefect.yaml deploys it.

Embedded default: with no PREFECT_API_URL set, the first stage starts the
project's own Prefect server in the background and the later ones reuse it
(flows/server.py; ``python -m flows server status|stop``), its history in the
project's ``.prefect/``. MMRAD_PREFECT_SERVER=off gives each stage Prefect's
temporary API instead; MMRAD_ORCHESTRATION=off runs the stage without Prefect
(the benchmark's "off" side, or a machine without an API).
"""

import os
import tomllib
from pathlib import Path


def _user_profile_sets_api() -> bool:
    """The user's own Prefect profile points at a server (a team server, Prefect Cloud): keep their home."""
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", "~/.prefect/profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return bool(profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"))


# The run history lives beside the project (README): PREFECT_HOME is the project's .prefect/ (git-ignored)
# when run from a checkout (dvc.yaml and params.yaml here), unless the user set PREFECT_HOME or configured an
# API in their own Prefect profile.
if ("PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ
        and Path("dvc.yaml").is_file() and Path("params.yaml").is_file() and not _user_profile_sets_api()):
    os.environ["PREFECT_HOME"] = str(Path.cwd() / ".prefect")

# Before Prefect reads its settings: the library's own log records go to the
# flow run's log; a machine without internet does not try to send telemetry;
# and the temporary API gets time to create its database on a fresh machine
# (Prefect's default 20 s is too short for the first migration on a busy 2-core box).
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mmrad")
# the library's log lines outside a flow run (a test, `mmrad` itself in this process) stay local, without a warning
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
