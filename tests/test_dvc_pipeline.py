"""A real `dvc repro` of the data stages in a temporary git repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT, tiny_params_dict

pytestmark = pytest.mark.slow


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture
def repo(tmp_path):
    """A fresh git + DVC repository holding the project's pipeline with tiny params."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copytree(PROJECT / "mmrad", root / "mmrad", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(PROJECT / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = str(Path(sys.executable).parent / "dvc")
    _run(["git", "init", "-q"], root, env)
    _run([dvc, "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    return root, env, dvc


def test_repro_builds_the_data_stages_and_a_second_repro_does_nothing(repo):
    root, env, dvc = repo
    log = _run([dvc, "repro"], root, env)
    assert "Running stage 'generate'" in log
    for name in ("mmr", "idrid", "resc"):
        assert f"Running stage 'prepare@{name}'" in log
        assert (root / "data" / "prepared" / name / "manifest.parquet").is_file()
    assert "Running stage 'train'" in log and "RANDOM INIT" in log
    assert (root / "models" / "mmrad" / "model.pt").is_file()
    assert (root / "data" / "raw" / "synthetic" / "IDRiD" / "A. Segmentation").is_dir()

    status = _run([dvc, "status"], root, env)
    assert "Data and pipelines are up to date" in status

    stamp = (root / "data" / "prepared" / "mmr" / "manifest.parquet").stat().st_mtime_ns
    again = _run([dvc, "repro"], root, env)
    assert "Running stage" not in again
    assert (root / "data" / "prepared" / "mmr" / "manifest.parquet").stat().st_mtime_ns == stamp


def test_a_param_change_reruns_what_depends_on_it_and_no_more(repo):
    root, env, dvc = repo
    _run([dvc, "repro"], root, env)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["prepare"]["workers"] = 2  # prepare re-runs; its output is identical, so training does not
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    log = _run([dvc, "repro"], root, env)
    assert "Running stage 'generate'" not in log
    assert "Running stage 'prepare@mmr'" in log
    assert "Running stage 'train'" not in log
    raw["train"]["lr"] = 1e-3  # a training param re-runs training only
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    log = _run([dvc, "repro"], root, env)
    assert "Running stage 'train'" in log and "Running stage 'prepare@mmr'" not in log


def test_a_failing_stage_fails_repro_with_the_rule(repo):
    root, env, dvc = repo
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["datasets"]["mmr"]["root"] = "data/raw/real/MMR"  # not there
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([dvc, "repro", "prepare@mmr"], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "data/raw/real/MMR" in result.stdout + result.stderr
    assert not (root / "data" / "prepared" / "mmr").exists()
