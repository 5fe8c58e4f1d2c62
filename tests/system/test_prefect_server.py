"""The project's Prefect server (flows/server.py): started by the first stage, found by the next, stopped.

Real parts: `python -m flows generate` stage processes in a temporary project folder (its own dvc.yaml and
params.yaml, so PREFECT_HOME defaults to its .prefect/), a real `prefect server start` in the background,
and Prefect's client reading the flow runs back from it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import PROJECT, tiny_params_dict

pytestmark = pytest.mark.slow

STARTED = "started this project's Prefect server at"


def _project(tmp_path: Path, **env) -> tuple[Path, dict]:
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MMRAD_"))}
    environment.update(PYTHONPATH=str(PROJECT), HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                       **env)
    return root, environment


def _flows(root: Path, env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *argv], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def _state(root: Path) -> dict:
    return json.loads((root / ".prefect" / "mmrad-server.json").read_text())


def _server_processes(supervisor: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(supervisor)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _flow_runs(root: Path, env: dict, url: str) -> list[str]:
    script = ("from prefect.client.orchestration import get_client\n"
              "with get_client(sync_client=True) as c:\n"
              "    print('RUNS', sorted(r.name for r in c.read_flow_runs()))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env={**env, "PREFECT_API_URL": url},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return eval(next(line for line in done.stdout.splitlines() if line.startswith("RUNS "))[5:])  # noqa: S307


def test_the_first_stage_starts_the_server_the_second_finds_it_and_stop_ends_it(tmp_path):
    root, env = _project(tmp_path)
    first = _flows(root, env, "generate", "--out", "first")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count(STARTED) == 1 and "python -m flows server stop" in first.stderr
    state = _state(root)
    assert (root / ".prefect" / "prefect.db").is_file()  # the history lives in the project
    assert not (tmp_path / "home" / ".prefect").exists()  # not in the user's home

    # Prefect's debug log names the flow-run heartbeat thread when there is one
    second = _flows(root, {**env, "PREFECT_LOGGING_LEVEL": "DEBUG"}, "generate", "--out", "second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert STARTED not in second.stderr and _state(root)["pid"] == state["pid"]  # found, not started again
    # no heartbeats against the project server: it runs no services to read them (flows.pipeline.engine_settings)
    assert "Beginning flow run" in second.stderr and "heartbeat" not in second.stderr
    assert (root / "first" / "MMR").is_dir() and (root / "second" / "MMR").is_dir()
    # both stages are flow runs of the one server (browsable in its UI afterwards)
    assert _flow_runs(root, env, state["url"]).count("generate") == 2

    status = _flows(root, env, "server", "status")
    assert status.returncode == 0 and state["url"].removesuffix("/api") in status.stdout and "answers" in status.stdout
    processes = _server_processes(state["pid"])
    assert len(processes) >= 2  # the supervisor and the Prefect server under it
    stopped = _flows(root, env, "server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    psutil.wait_procs(processes, timeout=30)
    assert not [p for p in processes if p.is_running()]
    assert not (root / ".prefect" / "mmrad-server.json").exists()
    assert _flows(root, env, "server", "status").returncode == 1


def test_a_stage_still_runs_with_the_temporary_api_when_the_server_cannot_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        root, env = _project(tmp_path, MMRAD_PREFECT_SERVER_PORT=str(taken.getsockname()[1]))
        done = _flows(root, env, "generate", "--out", "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "could not start this project's Prefect server" in done.stderr
    assert "mmrad-server.log" in done.stderr and "temporary API" in done.stderr
    assert STARTED not in done.stderr and (root / "out" / "MMR").is_dir()
    assert not (root / ".prefect" / "mmrad-server.json").exists()
    assert not [p for p in psutil.process_iter(["cmdline", "cwd"])
                if "_supervise" in (p.info["cmdline"] or []) and p.info["cwd"] == str(root)]  # nothing left running


def test_an_idle_server_stops_by_itself_and_no_server_is_started_when_one_is_configured(tmp_path, prefect_api):
    root, env = _project(tmp_path, MMRAD_PREFECT_SERVER_IDLE="3")
    started = _flows(root, env, "server", "start")
    assert started.returncode == 0 and STARTED in started.stderr and "stops after 3 idle seconds" in started.stderr
    processes = _server_processes(_state(root)["pid"])
    psutil.wait_procs(processes, timeout=60)
    assert not [p for p in processes if p.is_running()]
    assert not (root / ".prefect" / "mmrad-server.json").exists()

    # a configured API (a team server; here the tests' shared one) is used as it is: nothing is started
    done = _flows(root, {**env, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "DEBUG"}, "generate", "--out",
                  "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert STARTED not in done.stderr and not (root / ".prefect" / "mmrad-server.json").exists()
    assert "Started flow run heartbeat context" in done.stderr  # Prefect's defaults, heartbeats included
    # and MMRAD_PREFECT_SERVER=off keeps Prefect's temporary API per stage
    done = _flows(root, {**env, "MMRAD_PREFECT_SERVER": "off"}, "generate", "--out", "out2")
    assert done.returncode == 0 and STARTED not in done.stderr and not (root / ".prefect" / "mmrad-server.json").exists()


def test_a_stage_run_is_named_after_its_dvc_stage_tagged_and_holds_the_library_log(tmp_path, prefect_api):
    root, env = _project(tmp_path)
    for command in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *command], cwd=root, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    # what DVC sets for a stage's command (DVC_STAGE: the stage's address in dvc.yaml)
    env = {**env, "PREFECT_API_URL": prefect_api, "DVC_STAGE": "generate@tagged", "DVC_ROOT": str(root)}
    done = _flows(root, env, "generate", "--out", "out")
    assert done.returncode == 0, done.stderr[-3000:]
    script = ("import json\n"
              "from prefect.client.orchestration import get_client\n"
              "from prefect.client.schemas.filters import FlowRunFilter, LogFilter\n"
              "with get_client(sync_client=True) as c:\n"
              "    runs = [r for r in c.read_flow_runs() if r.name == 'generate@tagged']\n"
              "    logs = c.read_logs(LogFilter(flow_run_id={'any_': [runs[0].id]}))\n"
              "    print('RUNS', json.dumps({'count': len(runs), 'tags': sorted(runs[0].tags),\n"
              "                              'logs': [entry.message for entry in logs]}))\n")
    read = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    found = json.loads(next(line for line in read.stdout.splitlines() if line.startswith("RUNS "))[5:])
    assert found["count"] == 1
    assert found["tags"] == sorted(["mmrad", "project:project", f"commit:{commit[:12]}"])
    # the library's own log lines (logger mmrad.*) are in the flow run's log, not only on the terminal
    assert any(message.startswith("generated {") for message in found["logs"]), found["logs"]
