"""Bad input and killed runs under the SHIPPED defaults: 2 workers, the Prefect path `dvc repro` runs (a flow run
against the project's Prefect server, the process pool inside it), and the Dask path (`dask_address: local`).

Real parts: the `mmrad` and `python -m flows` commands in subprocesses (a real Prefect server, a local Dask
cluster of worker processes, a process pool), real files, `kill -9`. Each test checks the one-line message
(file + rule), the exit status, that nothing new is left beside the output, and that every file that existed
before is byte-identical afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import PROJECT, tiny_params_dict, tree_snapshot

pytestmark = pytest.mark.slow


def _setup(tmp_path, synthetic_root, **train):
    """A private copy of the tiny MMR and a params file with the shipped worker count (2)."""
    root = tmp_path / "MMR"
    shutil.copytree(synthetic_root / "MMR", root)
    raw = tiny_params_dict()
    raw["prepare"]["workers"] = 2
    raw["datasets"]["mmr"]["root"] = str(root)
    raw["train"].update(train)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    return root, params


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def _command(entry: str, params: Path, *argv: str) -> list[str]:
    module = {"mmrad": "mmrad", "flows": "flows"}[entry]
    return [sys.executable, "-m", module, "--params", str(params), *argv]


def _left_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _truncate_an_image(root: Path) -> tuple[Path, str]:
    victim = sorted((root / "train" / "normal").iterdir())[-1] / "fundus.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # truncated mid-stream
    return victim, "image is corrupt or truncated"


def _break_an_annotation(root: Path) -> tuple[Path, str]:
    victim = sorted((root / "test" / "anomaly").rglob("*.json"))[-1]
    data = json.loads(victim.read_text())
    data["imageHeight"] = None  # a type error: once a traceback, now a rule
    victim.write_text(json.dumps(data))
    return victim, "LabelMe imageHeight"


@pytest.mark.parametrize(("entry", "dask", "damage"), [("mmrad", None, _truncate_an_image),
                                                       ("flows", None, _truncate_an_image),
                                                       ("flows", "local", _break_an_annotation)])
def test_bad_input_gives_one_line_exit_2_and_keeps_the_earlier_output(tmp_path, synthetic_root, prefect_api, entry,
                                                                      dask, damage):
    root, params = _setup(tmp_path, synthetic_root)
    out = tmp_path / "prepared"
    env = _env(tmp_path, PREFECT_API_URL=prefect_api, **({"MMRAD_DASK_ADDRESS": dask} if dask else {}))
    first = subprocess.run(_command(entry, params, "prepare", "mmr", "--out", str(out)), cwd=PROJECT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before_out, (victim, rule) = tree_snapshot(out), damage(root)
    before_raw = tree_snapshot(root)

    done = subprocess.run(_command(entry, params, "prepare", "mmr", "--out", str(out)), cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    line = f"mmrad prepare: error: {victim}: {rule}"
    errors = [entry for entry in done.stderr.splitlines() if entry.startswith("mmrad prepare: error:")]
    assert len(errors) == 1 and errors[0].startswith(line), done.stderr[-3000:]
    assert "TypeError" not in done.stderr and "missing 1 required positional argument" not in done.stderr
    if entry == "flows":  # bad input is not retried, and the flow run ends Failed with the line's exit status
        assert "Retry" not in done.stderr
        assert f"Finished in state Failed('Flow run encountered an exception: DataError: {victim}: {rule}" in done.stderr
    assert tree_snapshot(out) == before_out and tree_snapshot(root) == before_raw
    assert _left_beside(out) == []


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> dict[psutil.Process, str]:
    """Wait until ``ready()`` holds, then kill -9 the command (not its workers); returns the child processes it
    had, with their command lines (read before the kill)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the command never reached the point to kill it at"
        time.sleep(0.01)
    workers = {child: _cmdline(child) for child in _children(process.pid)}
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    return workers


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # already gone (or a zombie its parent's death left for init to reap)
        return ""


def _no_orphans(workers: list[psutil.Process], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, [w.pid for w in workers if w.is_running()]
        time.sleep(0.1)


def test_kill_9_of_prepare_leaves_no_orphan_and_the_rerun_equals_a_clean_run(tmp_path, synthetic_root):
    root, params = _setup(tmp_path, synthetic_root)
    for case in sorted((root / "train" / "normal").iterdir()):  # more work: a window wide enough to kill in
        for copy in range(12):
            shutil.copytree(case, case.with_name(f"{case.name}_copy{copy:02d}"))
    out, clean = tmp_path / "prepared", tmp_path / "clean"
    env = _env(tmp_path)
    first = subprocess.run(_command("mmrad", params, "prepare", "mmr", "--out", str(clean)), cwd=PROJECT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]

    def half_written() -> bool:  # the pool's 2 workers are writing the cache into the temporary folder
        return len(_children(process.pid)) >= 2 and any(
            len(list(t.rglob("*.png"))) >= 6 for t in tmp_path.glob(".prepared.tmp-*"))

    process = subprocess.Popen(_command("mmrad", params, "prepare", "mmr", "--out", str(out)), cwd=PROJECT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = list(_kill_when(process, half_written))
    assert len(workers) >= 2  # the shipped default: a pool of 2
    _no_orphans(workers)
    assert not out.exists() and _left_beside(out)  # the killed run's temporary folder is still there ...

    rerun = subprocess.run(_command("mmrad", params, "prepare", "mmr", "--out", str(out)), cwd=PROJECT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _left_beside(out) == []  # ... until the next run of the stage removes it
    assert tree_snapshot(out) == tree_snapshot(clean)


def test_kill_9_of_the_dask_prepare_flow_leaves_no_dask_worker(tmp_path, synthetic_root, prefect_api):
    """The Dask workers of the local cluster end with the flow's process (flows/dask_preload.py)."""
    root, params = _setup(tmp_path, synthetic_root)
    out = tmp_path / "prepared"

    def mapping() -> bool:  # the Dask workers are writing the cache into the temporary folder
        return any(any(t.rglob("*.png")) for t in tmp_path.glob(".prepared.tmp-*"))

    process = subprocess.Popen(_command("flows", params, "prepare", "mmr", "--out", str(out)), cwd=PROJECT,
                               env=_env(tmp_path, PREFECT_API_URL=prefect_api, MMRAD_DASK_ADDRESS="local"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children = _kill_when(process, mapping)
    workers = [child for child, line in children.items() if "multiprocessing.spawn" in line]
    assert len(workers) >= 2, list(children.values())  # prepare.workers: 2
    assert not [line for line in children.values() if "uvicorn" in line]  # the project's server is not a child
    _no_orphans(workers)
    assert not out.exists()


def test_kill_9_of_train_then_a_rerun_gives_the_clean_runs_model(tmp_path, synthetic_root, prepared_mmr):
    _, params = _setup(tmp_path, synthetic_root, steps=12, checkpoint_every=1)
    env = _env(tmp_path, MMRAD_ORCHESTRATION="off")
    clean_out, out, checkpoints = tmp_path / "clean", tmp_path / "model", tmp_path / "ckpt"
    argv = ["train", "--prepared", str(prepared_mmr), "--checkpoints"]
    clean = subprocess.run(_command("mmrad", params, *argv, str(tmp_path / "ckpt-clean"), "--out", str(clean_out)),
                           cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]

    process = subprocess.Popen(_command("mmrad", params, *argv, str(checkpoints), "--out", str(out)), cwd=PROJECT,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(process, lambda: (checkpoints / "checkpoint.pt").is_file())  # a few steps in, mid-run
    assert not out.exists()
    rerun = subprocess.run(_command("mmrad", params, *argv, str(checkpoints), "--out", str(out), "--resume"),
                           cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert tree_snapshot(out)["model.pt"] == tree_snapshot(clean_out)["model.pt"]  # exact resume: the same bytes
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint.pt"] and _left_beside(out) == []


def test_an_unreachable_tracking_server_fails_fast_with_one_line_and_no_retries(tmp_path, trained_tiny,
                                                                                registered_tiny, prefect_api):
    import socket

    with socket.socket() as probe:  # a local port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    _, model_dir = trained_tiny
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    started = time.perf_counter()
    done = subprocess.run(_command("flows", params, "register", "--model-dir", str(model_dir), "--reports",
                                   str(registered_tiny.reports), "--out", str(tmp_path / "registered.json")),
                          cwd=tmp_path, env={**_env(tmp_path, MLFLOW_TRACKING_URI=uri, PREFECT_API_URL=prefect_api),
                               "PYTHONPATH": str(PROJECT)},
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [e for e in done.stderr.splitlines() if e.startswith("mmrad register: error:")]
    assert errors and errors[0].startswith(f"mmrad register: error: {uri}: the MLflow tracking server is unreachable")
    assert "Retry" not in done.stderr  # the task's retries do not multiply the wait
    assert seconds < 120, seconds  # (whole command incl. Prefect's start; before: 252 s and three tracebacks)
    assert not (tmp_path / "registered.json").exists()
