"""A real Prefect server and a process worker on 127.0.0.1 run a deployment run of ``retrain``.

What the team does (prefect.yaml's header), in a temporary git + DVC repository
holding the tiny pipeline of test_dvc_pipeline (its ``_make_repo``):

* ``prefect server start`` on a free port, its sqlite database in a temporary
  PREFECT_HOME;
* ``prefect work-pool create mmrad-process --type process`` and
  ``prefect deploy --all`` with the project's own prefect.yaml;
* ``prefect deployment run retrain/retrain-weekly``, then
  ``prefect worker start --pool mmrad-process --run-once``, started outside the
  repository: the pull step of prefect.yaml moves the flow run into
  $MMRAD_PROJECT_DIR.

The flow run's ``dvc repro`` reports each stage it runs to the same server and
the register stage + promotion gate fill the repository's MLflow registry.

Cost: a full tiny repro takes about four minutes on a 2-core machine, so the
fixture first builds every stage up to the evaluations plainly
(MMRAD_ORCHESTRATION=off, two at a time, while the server starts and the
deployment is made); the deployment run's repro then has ``report`` and
``register`` left to run (both as ``stage`` flow runs on the server), then the
gate. About 3.5 minutes in all. The pipeline itself is tested by
test_dvc_pipeline.

Two faults of Prefect 3.8.8 on newer libraries, found by this test and fixed
by pins in pyproject.toml: with fastapi >= 0.151 ``prefect deploy`` exits 1
after creating the deployment (the server refuses the client's
``"limit": null``), and with SQLAlchemy 2.1 the scheduler service cannot insert
the cron runs (the weekly schedule never fires).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import PROJECT
from tests.system.test_dvc_pipeline import _make_repo, _mlflow, _run

pytestmark = pytest.mark.slow

POOL = "mmrad-process"
DEPLOYMENT = "retrain/retrain-weekly"
WORKER = "mmrad-test-worker"
PREBUILT = ["evaluate", "baseline", "transfer"]  # every stage but report and register (and what they need)
HERE = ["train", "evaluate", "baseline@padim", "transfer@mmr_to_idrid", "transfer@mmr_to_resc"]
THERE = ["train_single", "baseline@patchcore", "transfer@idrid_to_idrid", "transfer@resc_to_resc"]  # (a copy)
LEFT_FOR_THE_WORKER = {"report", "register"}
SERVER_START_TIMEOUT = 180  # a fresh database's migrations on a busy 2-core machine
WORKER_TIMEOUT = 900


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A subprocess in its own process group (stopped with everything it starts), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after a grace period; its descendants' groups go too.

    (The process worker starts each flow run in a session of its own, with dvc and the stages in it.)
    """
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    groups = {proc.pid}
    for child in family:
        try:
            groups.add(os.getpgid(child.pid))
        except ProcessLookupError:
            pass
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        _signal_groups(groups, sig)
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    _signal_groups(groups, signal.SIGKILL)  # whatever the leaders left behind
    psutil.wait_procs(family, timeout=10)


def _signal_groups(groups: set[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.is_file() else "(no log)"


def _wait_healthy(api: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited with {server.returncode}:\n{_tail(log)}"
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=5) as response:
                if response.status == 200 and json.loads(response.read()) is True:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT} s:\n{_tail(log)}")


def _deploy(prefect: str, root: Path, env: dict) -> str:
    """``prefect deploy --all`` in the repository: its prefect.yaml's deployments, on the server of ``env``."""
    result = subprocess.run([prefect, "deploy", "--all", "--no-prompt"], cwd=root, env=env,
                            capture_output=True, text=True, check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"prefect deploy failed:\n{out}"
    return out


@contextmanager
def _client(api: str):
    """A synchronous Prefect client of the test's server (nothing of this process's settings changes after)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


def _prebuild(root: Path, env: dict, dvc: str) -> None:
    """Every stage but report and register, plainly (MMRAD_ORCHESTRATION=off), two at a time.

    Most of a tiny stage is its imports, one core each: after the data stages, a copy of the
    repository sharing its DVC cache builds half of the rest at the same time, and the
    repository's own ``dvc repro`` then takes those from the shared run cache.
    """
    off = {**env, "MMRAD_ORCHESTRATION": "off"}
    _run([dvc, "repro", "prepare"], root, off)  # generate, prepare@*
    twin = root.parent / "project-twin"
    shutil.copytree(root, twin, symlinks=True)
    _run([dvc, "cache", "dir", "--local", str(root / ".dvc" / "cache")], twin, off)
    halves = [(root, HERE), (twin, THERE)]
    procs = [subprocess.Popen([dvc, "repro", *targets], cwd=cwd, env=off, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cwd, targets in halves]
    for proc, (cwd, targets) in zip(procs, halves):
        out, _ = proc.communicate()
        assert proc.returncode == 0, f"dvc repro {targets} in {cwd} failed:\n{out}"
    # the copy's stages come from the shared run cache; a stage DVC cannot restore from it (one with an
    # uncached output, such as the evaluations' scores.csv) simply runs here
    _run([dvc, "repro", *PREBUILT], root, off)
    shutil.rmtree(twin)


@pytest.fixture(scope="module")
def deployment_run(tmp_path_factory):
    """Server, deployment, worker; the deployment run done. Yields a dict of what the tests read."""
    tmp = tmp_path_factory.mktemp("prefect-worker")
    prefect = str(Path(sys.executable).parent / "prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_home, client_home, logs, worker_cwd = (tmp / name for name in ("server-home", "client-home", "logs",
                                                                          "worker-cwd"))
    for folder in (server_home, client_home, logs, worker_cwd):
        folder.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    server_env = {**base, "PREFECT_HOME": str(server_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{server_home / 'prefect.db'}"}
    server_log, worker_log = logs / "server.log", logs / "worker.log"
    started: list[subprocess.Popen] = []
    timings: dict[str, float] = {}
    background = ThreadPoolExecutor(max_workers=1)
    try:
        started.append(_start([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                              tmp, server_env, server_log))
        root, env, dvc = _make_repo(tmp / "project")
        shutil.copy(PROJECT / "prefect.yaml", root / "prefect.yaml")  # the team's deployment file, as it is
        _run(["git", "add", "prefect.yaml"], root, env)
        _run(["git", "commit", "-qm", "prefect.yaml"], root, env)

        # the deploying machine has no MMRAD_PROJECT_DIR (`prefect deploy` would bake its value into
        # the pull step); the worker's machine (the same one here) says where its checkout is
        client_env = {k: v for k, v in env.items() if k not in ("MMRAD_PROJECT_DIR", "MMRAD_ORCHESTRATION")}
        client_env.update({"PREFECT_HOME": str(client_home), "PREFECT_API_URL": api})
        worker_env = {**client_env, "MMRAD_PROJECT_DIR": str(root)}

        def serve_and_deploy() -> tuple[str, float]:
            t0 = time.monotonic()
            _wait_healthy(api, started[0], server_log)
            _run([prefect, "work-pool", "create", POOL, "--type", "process"], root, client_env)
            return _deploy(prefect, root, client_env), time.monotonic() - t0

        # the server starts and the deployment is made while the repository is built
        deploying = background.submit(serve_and_deploy)
        t0 = time.monotonic()
        _prebuild(root, env, dvc)
        timings["prebuild"] = time.monotonic() - t0
        deploy_log, timings["server + pool + deploy (during the prebuild)"] = deploying.result(
            timeout=SERVER_START_TIMEOUT + 120)

        t0 = time.monotonic()
        run_log = _run([prefect, "deployment", "run", DEPLOYMENT], root, client_env)
        found = re.search(r"UUID:\s*([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})", run_log)
        assert found, f"no flow run id in:\n{run_log}"
        flow_run_id = found.group(1)
        # the worker starts elsewhere: the flow run finds the project only through the pull step
        worker = _start([prefect, "worker", "start", "--pool", POOL, "--name", WORKER, "--type", "process",
                         "--run-once", "--limit", "1", "--install-policy", "never"],
                        worker_cwd, worker_env, worker_log)
        started.append(worker)
        try:
            worker.wait(timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not finish in {WORKER_TIMEOUT} s:\n{_tail(worker_log)}")
        timings["deployment run + worker"] = time.monotonic() - t0
        print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
        yield {"api": api, "root": root, "env": env, "dvc": dvc, "flow_run_id": flow_run_id,
               "worker_log": worker_log.read_text(errors="replace"), "worker_rc": worker.returncode,
               "deploy_log": deploy_log}
    finally:
        for proc in reversed(started):
            _stop(proc)
        background.shutdown(wait=True)  # (a deployment thread ends when its server is gone)


def _flow_runs(client, flow_name: str):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                 sort=FlowRunSort.START_TIME_ASC, limit=200, offset=0)


def test_the_worker_runs_the_deployment_run_to_completion(deployment_run):
    r = deployment_run
    assert r["worker_rc"] == 0, r["worker_log"]
    with _client(r["api"]) as client:
        run = client.read_flow_run(r["flow_run_id"])
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        workers = client.read_workers_for_work_pool(POOL, offset=0, limit=50)
    assert run.state_type.value == "COMPLETED", (run.state, r["worker_log"][-4000:])
    assert run.deployment_id == deployment.id
    # picked up and started by the test's worker, from the pool and queue of prefect.yaml
    assert run.work_pool_name == POOL and run.work_queue_name == "default"
    assert run.infrastructure_pid, "the process worker records the flow run's process"
    assert WORKER in {w.name for w in workers}
    assert r["flow_run_id"] in r["worker_log"]
    assert run.parameters == {"project": ".", "params_file": "params.yaml", "promote": True}


def test_the_deployment_is_the_one_of_prefect_yaml(deployment_run):
    with _client(deployment_run["api"]) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    spec = yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"][0]
    assert "successfully created" in deployment_run["deploy_log"]
    assert deployment.entrypoint == spec["entrypoint"] == "flows/pipeline.py:retrain"
    assert deployment.work_pool_name == POOL and deployment.work_queue_name == "default"
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == \
        [("0 3 * * 1", "UTC", True)]
    # the pull step keeps its placeholder: it is resolved in the flow run's process, on the worker's machine
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": "{{ $MMRAD_PROJECT_DIR }}"}}]


def test_the_server_schedules_the_weekly_runs(deployment_run):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with _client(deployment_run["api"]) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=50, offset=0)
    scheduled = [r for r in runs if r.auto_scheduled and r.state_type.value == "SCHEDULED"]
    assert scheduled, [(r.name, r.state_type, r.auto_scheduled) for r in runs]
    now = datetime.now(UTC)
    for run in scheduled:  # Mondays 03:00 UTC, from now on
        start = run.expected_start_time.astimezone(UTC)
        assert (start.weekday(), start.hour, start.minute) == (0, 3, 0) and start > now, start


def test_the_stages_ran_as_flow_runs_on_the_same_server(deployment_run):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        TaskRunFilter,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    r = deployment_run
    with _client(r["api"]) as client:
        run = client.read_flow_run(r["flow_run_id"])
        stages = _flow_runs(client, "stage")
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])),
            flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), limit=50, offset=0,
            sort=ArtifactSort.KEY_ASC)
        all_keys = {a.key for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(), flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(),
            limit=200, offset=0, sort=ArtifactSort.KEY_ASC)}
    # exactly what the prebuild left out of date, each a completed `stage` flow run during the retrain run
    assert {s.name for s in stages} == LEFT_FOR_THE_WORKER, [(s.name, s.state_type) for s in stages]
    for s in stages:
        assert s.state_type.value == "COMPLETED", s
        assert run.start_time <= s.start_time and s.end_time <= run.end_time, (s.name, s.start_time, run)
    promotion = next(a for a in artifacts if a.key == "mmrad-promotion")
    assert "gate: PASS" in promotion.data
    assert {"mmrad-report", "mmrad-registered"} <= all_keys


def test_the_registry_has_the_promoted_challenger_and_the_pipeline_is_up_to_date(deployment_run):
    r = deployment_run
    client = _mlflow(r["root"])
    champion = client.get_model_version_by_alias("mmrad", "champion")
    assert str(champion.version) == "1" and "challenger" in champion.aliases
    assert champion.tags["mmrad.promotion"] == "gate"
    metrics = client.get_run(champion.run_id).data.metrics
    assert "detection.fusion" in metrics and "transfer.mmr_to_resc.oct.pixel_auroc" in metrics
    assert json.loads((r["root"] / "models" / "registered.json").read_text())["version"] in (1, "1")
    assert "Data and pipelines are up to date" in _run([r["dvc"], "status"], r["root"], r["env"])
