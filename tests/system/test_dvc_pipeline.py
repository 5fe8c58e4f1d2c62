"""The whole pipeline (tiny params) in a temporary git + DVC repository, with the real parts.

The module's fixture runs the Prefect ``retrain`` flow (Prefect's temporary
local API, its database in the repository; the plain ``dvc repro`` runs after
it start and reuse the repository's own Prefect server, flows/server.py): it runs a real ``dvc repro``
whose every stage is a Prefect flow run, the register stage logs to a real
sqlite MLflow store in the repository and registers the model, and the gate
makes that first challenger the champion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import PROJECT, tiny_params_dict

pytestmark = pytest.mark.slow

STARTED = "started this project's Prefect server at"


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _make_repo(root: Path) -> tuple[Path, dict, str]:
    """A fresh git + DVC repository holding the project's pipeline with tiny params."""
    root.mkdir()
    for package in ("mmrad", "flows"):
        shutil.copytree(PROJECT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(PROJECT / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "PREFECT_HOME": str(root / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    dvc = str(Path(sys.executable).parent / "dvc")
    _run(["git", "init", "-q"], root, env)
    _run([dvc, "init", "-q"], root, env)
    # dvc.yaml's plots use the project's templates (.dvc/plots) and offline page (infra/plots, .dvc/config)
    shutil.copytree(PROJECT / ".dvc" / "plots", root / ".dvc" / "plots")
    shutil.copytree(PROJECT / "infra" / "plots", root / "infra" / "plots")
    shutil.copy(PROJECT / ".dvc" / "config", root / ".dvc" / "config")
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    return root, env, dvc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny pipeline, run once for the module by the retrain flow: (root, env, dvc, log)."""
    root, env, dvc = _make_repo(tmp_path_factory.mktemp("dvc") / "project")
    # a DVC remote (a folder standing in for the team's object store): the retrain flow pushes to it
    _run([dvc, "remote", "add", "-q", "-d", "team", str(root.parent / "remote")], root, env)
    _run(["git", "commit", "-qam", "DVC remote"], root, env)
    script = "import json; from flows.pipeline import retrain; print('RESULT', json.dumps(retrain('.')))"
    yield root, env, dvc, _run([sys.executable, "-c", script], root, env)
    # a plain `dvc repro` / `dvc exp run` below started the repository's own Prefect server: stop it
    _run([sys.executable, "-m", "flows", "server", "stop"], root, env)


def _prefect_runs(root: Path, env: dict) -> dict:
    """Flow runs and artifact keys recorded in the repository's Prefect database."""
    script = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter, LogFilter, TaskRunFilter
from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort
with get_client(sync_client=True) as c:  # (this client version needs every filter spelled out)
    flow_runs = c.read_flow_runs(limit=200, offset=0, sort=FlowRunSort.START_TIME_ASC)
    runs = {r.name: r.state_type.value for r in flow_runs}
    detail = {r.name: {"id": str(r.id), "tags": sorted(r.tags), "parent": str(r.parent_task_run_id or "")}
              for r in flow_runs}
    train = next(r for r in flow_runs if r.name == "train")
    progress = [entry.message for entry in c.read_logs(LogFilter(flow_run_id={"any_": [train.id]}))
                if entry.message.startswith("step ")]
    parents = {}
    for r in flow_runs:
        if r.parent_task_run_id:
            task = c.read_task_run(r.parent_task_run_id)
            parents[str(r.parent_task_run_id)] = {"name": task.name, "flow_run": str(task.flow_run_id)}
    artifacts = c.read_artifacts(artifact_filter=ArtifactFilter(), flow_run_filter=FlowRunFilter(),
                                 task_run_filter=TaskRunFilter(), limit=200, offset=0, sort=ArtifactSort.KEY_ASC)
    keys = sorted({a.key for a in artifacts if a.key})
print('RUNS', json.dumps({"runs": runs, "artifacts": keys, "detail": detail, "parents": parents,
                          "train_progress": progress}))
"""
    out = _run([sys.executable, "-c", script], root, env)
    return json.loads(next(line for line in out.splitlines() if line.startswith("RUNS "))[5:])


def test_repro_builds_every_stage_and_a_second_repro_does_nothing(built):
    root, env, dvc, log = built
    assert "Running stage 'generate'" in log
    for name in ("mmr", "idrid", "resc"):
        assert f"Running stage 'prepare@{name}'" in log
        assert (root / "data" / "prepared" / name / "manifest.parquet").is_file()
    assert (root / "data" / "raw" / "synthetic" / "IDRiD" / "A. Segmentation").is_dir()
    assert "Running stage 'train'" in log and "RANDOM INIT" in log
    assert (root / "models" / "mmrad" / "model.pt").is_file()
    for path in ("reports/mmrad/metrics.json", "reports/padim/metrics.json", "reports/patchcore/metrics.json",
                 "reports/transfer/mmr_to_resc/metrics.json", "reports/report.md"):
        assert (root / path).is_file(), path
    assert "## Table 11" in (root / "reports" / "report.md").read_text()

    # every stage was a Prefect flow run named after its DVC stage, inside the retrain flow run, with its artifacts
    recorded = _prefect_runs(root, env)
    stages = set(yaml.safe_load((root / "dvc.lock").read_text())["stages"])  # prepare@mmr, transfer@mmr_to_idrid ...
    assert {"generate", "prepare@mmr", "train", "baseline@padim", "transfer@mmr_to_idrid", "register"} <= stages
    assert stages <= set(recorded["runs"]), recorded
    assert set(recorded["runs"].values()) == {"COMPLETED"}
    (retrain_run,) = set(recorded["runs"]) - stages
    commit = _run(["git", "rev-parse", "HEAD"], root, env).strip()
    for name in stages:  # one parent per repro: the retrain flow's dvc-repro task run; tagged project and commit
        run = recorded["detail"][name]
        parent = recorded["parents"][run["parent"]]
        assert parent["name"].startswith("dvc-repro") and parent["flow_run"] == recorded["detail"][retrain_run]["id"]
        assert {"mmrad", "project:project", f"commit:{commit[:12]}"} <= set(run["tags"]), run
    assert {"mmrad-report", "mmrad-registered", "mmrad-promotion"} <= set(recorded["artifacts"])
    # training's progress reached its flow run's log (the terminal's bar does not): about every tenth of the steps
    steps = yaml.safe_load((root / "params.yaml").read_text())["train"]["steps"]
    assert steps < 10 and [m.split(" (")[0] for m in recorded["train_progress"]] == [
        f"step {k}/{steps}" for k in range(1, steps + 1)]  # (under 10 steps: a line per step)
    # MLflow: one tracked run, registered as version 1; the gate made it champion (there was none)
    result = json.loads(next(line for line in log.splitlines() if line.startswith("RESULT "))[7:])
    assert result["promoted"] and result["challenger"] == "1"
    client = _mlflow(root)
    champion = client.get_model_version_by_alias("mmrad", "champion")
    assert str(champion.version) == "1" and "challenger" in champion.aliases
    run = client.get_run(champion.run_id)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    prepared = next(o["md5"] for o in lock["stages"]["prepare@mmr"]["outs"] if o["path"] == "data/prepared/mmr")
    assert run.data.tags["mmrad.data.mmr"] == prepared and run.data.tags["mmrad.git_dirty"] == "false"
    assert run.data.tags["mmrad.git_commit"] == _run(["git", "rev-parse", "HEAD"], root, env).strip()
    assert "detection.fusion" in run.data.metrics and "transfer.mmr_to_idrid.fundus.pixel_auroc" in run.data.metrics
    # the MLflow run and the flow runs name each other
    assert run.data.tags["prefect.flow_run_id"] == recorded["detail"]["register"]["id"]
    assert run.data.tags["prefect.parent_flow_run_id"] == recorded["detail"][retrain_run]["id"]
    top = client.list_artifacts(run.info.run_id)  # every method's curves and overlays, the curves as figures
    paths = {a.path for a in top} | {b.path for a in top if a.is_dir for b in client.list_artifacts(run.info.run_id, a.path)}
    assert {"plots/padim", "overlays/patchcore", "plots/transfer.mmr_to_idrid", "figures/roc_oct.png",
            "figures/loss.png"} <= paths, paths

    assert "Data and pipelines are up to date" in _run([dvc, "status"], root, env)
    assert "are in sync" in _run([dvc, "status", "--cloud"], root, env)  # the flow pushed everything
    shown = _run([dvc, "metrics", "show"], root, env)
    assert "localisation.fundus.aupro" in shown and "final_loss" in shown
    _run([dvc, "plots", "show", "-o", str(root / "plots_html")], root, env)
    page = (root / "plots_html" / "index.html").read_text(encoding="utf-8")
    assert "<script src=" not in page and "MMRAD \\u00b7 AUC" in page  # offline; legends from the `curve` column

    stamp = (root / "data" / "prepared" / "mmr" / "manifest.parquet").stat().st_mtime_ns
    again = _run([dvc, "repro"], root, env)
    assert "Running stage" not in again
    assert (root / "data" / "prepared" / "mmr" / "manifest.parquet").stat().st_mtime_ns == stamp


def _mlflow(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}", f"sqlite:///{root / 'mlflow.db'}")


def _challenger(root: Path):
    return _mlflow(root).get_model_version_by_alias("mmrad", "challenger")


def test_a_dvc_experiment_is_tracked_and_registered(built):
    root, env, dvc, _ = built
    before = int(_challenger(root).version)
    log = _run([dvc, "exp", "run", "-S", "baselines.padim_channels=40"], root, env)
    assert "Running stage 'baseline@padim'" in log and "Running stage 'register'" in log
    # no API configured: the first stage started the repository's own Prefect server, the later ones found it
    assert log.count(STARTED) == 1 and (root / ".prefect" / "mmrad-server.json").is_file()
    assert "Running stage 'train'" not in log
    version = _challenger(root)
    assert int(version.version) == before + 1
    run = _mlflow(root).get_run(version.run_id)
    assert run.data.params["baselines.padim_channels"] == "40" and "padim.fundus.pixel_auroc" in run.data.metrics
    assert "40" in _run([dvc, "exp", "show", "--csv"], root, env)  # (csv: the table truncates to the terminal)


def test_a_param_change_reruns_what_depends_on_it_and_no_more(built):
    root, env, dvc, _ = built
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["prepare"]["workers"] = 2  # prepare re-runs; its output is identical, so nothing after it does
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    log = _run([dvc, "repro"], root, env)
    assert "Running stage 'generate'" not in log
    assert "Running stage 'prepare@mmr'" in log and STARTED not in log  # the server of the run above
    assert "Running stage 'train'" not in log and "Running stage 'evaluate'" not in log
    raw["baselines"]["padim_channels"] = 50  # only PaDiM and the report depend on it
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    before = int(_challenger(root).version)
    log = _run([dvc, "repro"], root, env)
    assert "Running stage 'baseline@padim'" in log and "Running stage 'report'" in log
    assert "Running stage 'baseline@patchcore'" not in log and "Running stage 'train'" not in log
    assert "Running stage 'register'" in log  # new numbers in the report: a new tracked run and version
    version = _challenger(root)
    assert int(version.version) == before + 1
    assert _mlflow(root).get_run(version.run_id).data.tags["mmrad.git_dirty"] == "true"  # params.yaml edited


def test_a_failing_stage_fails_repro_with_the_rule(tmp_path):
    root, env, dvc = _make_repo(tmp_path / "project")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["datasets"]["mmr"]["root"] = "data/raw/real/MMR"  # not there
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    try:
        result = subprocess.run([dvc, "repro", "prepare@mmr"], cwd=root, env=env, capture_output=True, text=True)
    finally:
        _run([sys.executable, "-m", "flows", "server", "stop"], root, env)
    assert result.returncode != 0
    assert "data/raw/real/MMR" in result.stdout + result.stderr
    assert not (root / "data" / "prepared" / "mmr").exists()
