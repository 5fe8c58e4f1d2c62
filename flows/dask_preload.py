"""Imported by every Dask worker as it starts (``preload``): the prepare stage's code and Prefect's task engine.

So the first mapped task on a worker does not pay for these imports.
"""

import prefect.client.orchestration  # noqa: F401
import prefect.task_engine  # noqa: F401

import flows.pipeline  # noqa: F401
import mmrad.data.prepare  # noqa: F401
