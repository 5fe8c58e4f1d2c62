"""Imported by every Dask worker as it starts (``preload``): the prepare stage's code and Prefect's task engine.

So the first mapped task on a worker does not pay for these imports. The
worker also ends when the process that started the local cluster dies, even
by ``kill -9`` (mmrad.core.processes.die_with_parent).
"""

import os

import prefect.client.orchestration  # noqa: F401
import prefect.task_engine  # noqa: F401

import flows.pipeline  # noqa: F401
import mmrad.data.prepare  # noqa: F401
from mmrad.core.processes import die_with_parent


def dask_setup(worker) -> None:
    """Dask's preload hook (only the local cluster preloads this): the worker dies with the flow's process,
    where its nanny lives."""
    die_with_parent(os.getppid())
