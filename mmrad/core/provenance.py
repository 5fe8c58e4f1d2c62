"""Where a run's code came from: the git commit of the project and whether its code was edited.

One place for what the MLflow run's lineage tags (mmrad.ops.tracking) and the
Prefect flow runs' tags (flows.pipeline) say about the code. Outside a git
repository (an unpacked release, a container without .git) both answer None
rather than fail: provenance is information, never a reason to stop a stage.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

# What DVC writes during a repro: changes there do not make the code "dirty".
GENERATED_PATHS = ("dvc.lock", "reports", "models")


def git(project: str | Path, *args: str) -> str | None:
    """``git <args>`` in ``project``: its output, or None where git or the repository is missing."""
    try:
        done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def code_state(project: str | Path) -> tuple[str | None, bool | None]:
    """(commit, dirty): HEAD and whether tracked files other than the pipeline's outputs differ from it."""
    commit = git(project, "rev-parse", "HEAD")
    changed = git(project, "status", "--porcelain", "--untracked-files=no", "--", ".",
                  *[f":(exclude){p}" for p in GENERATED_PATHS])
    return commit, None if changed is None else bool(changed)


# Tags an orchestrator hands the run it starts (JSON object): flows/ puts its Prefect flow run's id and
# address here, so the MLflow run of the register stage links back to the flow run that made it.
RUN_TAGS_ENV = "MMRAD_RUN_TAGS"


def orchestrator_tags() -> dict[str, str]:
    """The tags in ``MMRAD_RUN_TAGS`` (none when unset; a malformed value is ignored: links, not lineage)."""
    try:
        found = json.loads(os.environ.get(RUN_TAGS_ENV) or "{}")
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}
