"""The prepare stage as a Prefect flow whose per-image work is task mapping on a Dask task runner.

Real parts: `python -m flows prepare` in a subprocess (a real Prefect server,
a local Dask cluster of worker processes for `dask_address: local`), and for
the "real cluster" case a separately started Dask scheduler + worker that the
flow joins by address. Without an address (the default) the flow runs the
library's process pool: no Dask at all.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from mmrad.data.prepare import read_manifest
from tests.conftest import PROJECT, tiny_params_dict, tree_snapshot

pytestmark = pytest.mark.slow


def _prepare_flow(tmp_path, synthetic_root, api: str, workers: int, **env) -> tuple[subprocess.CompletedProcess, object]:
    raw = tiny_params_dict()
    raw["prepare"]["workers"] = workers
    raw["datasets"]["mmr"]["root"] = str(synthetic_root / "MMR")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "prepared"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    environment.update(PREFECT_HOME=str(tmp_path / ".prefect"), PREFECT_API_URL=api, **env)
    done = subprocess.run([sys.executable, "-m", "flows", "--params", str(params), "prepare", "mmr", "--out", str(out)],
                          cwd=PROJECT, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


def _workers_used(log: str) -> set[str]:
    return set(re.findall(r"images on Dask worker (tcp://[0-9.:]+)", log))


def test_two_dask_workers_write_what_the_library_writes(tmp_path, synthetic_root, prepared_mmr, prefect_api):
    done, out = _prepare_flow(tmp_path, synthetic_root, prefect_api, workers=2, MMRAD_DASK_ADDRESS="local")
    # the same bytes as the plain library call (conftest's prepared_mmr: one process, no Prefect)
    assert tree_snapshot(out) == tree_snapshot(prepared_mmr)
    images = len(read_manifest(out))
    chunks = re.findall(r"Task run 'prepare-images-\w+' - Finished in state Completed", done.stderr)
    assert len(chunks) == math.ceil(images / math.ceil(images / (2 * 4))), done.stderr[-2000:]  # 4 per worker
    assert 1 <= len(_workers_used(done.stderr)) <= 2


def test_a_running_dask_scheduler_is_used_by_address(tmp_path, synthetic_root, prepared_mmr, prefect_api):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        done, out = _prepare_flow(tmp_path, synthetic_root, prefect_api, workers=2,
                                  MMRAD_DASK_ADDRESS=cluster.scheduler_address)
        # the scheduler we started ran the mapped tasks (its workers' logs go to the flow run, not our stderr)
        computed = {str(entry[0]) for entry in cluster.scheduler.transition_log if entry[2] == "memory"}
    assert not _workers_used(done.stderr), "no local cluster of the flow's own"
    mapped = [key for key in computed if key.startswith("prepare_images-")]
    images = len(read_manifest(out))
    assert len(mapped) == math.ceil(images / math.ceil(images / (2 * 4))), sorted(computed)[:5]
    assert tree_snapshot(out) == tree_snapshot(prepared_mmr)


def test_without_an_address_the_flow_runs_the_process_pool(tmp_path, synthetic_root, prepared_mmr, prefect_api):
    """The default: on one machine the pool is faster than a local Dask cluster (docs/benchmarks.md)."""
    done, out = _prepare_flow(tmp_path, synthetic_root, prefect_api, workers=2)
    assert "prepare-images" not in done.stderr and "Dask" not in done.stderr
    assert "Flow run 'prepare mmr' - Finished in state Completed" in done.stderr
    assert tree_snapshot(out) == tree_snapshot(prepared_mmr)
