"""The code's own rules, as CI checks them: the layer contracts (import-linter) and the linter (ruff).

The contracts live in pyproject.toml ([tool.importlinter]); docs/architecture.md
draws them. Each check also runs on a deliberately broken copy, so a test that
passes means the rule was looked at, not that the tool found nothing to read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT

BIN = Path(sys.executable).parent


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(PROJECT / "mmrad", root / "mmrad", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_layer_contracts_hold():
    done = _lint_imports(PROJECT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


def test_an_upward_import_or_a_circle_breaks_the_contracts(tmp_path):
    root = _copy(tmp_path)
    metrics = root / "mmrad" / "evaluation" / "metrics.py"  # evaluation must not import from ops (a higher layer)
    metrics.write_text(metrics.read_text() + "\nfrom mmrad.ops import tracking  # noqa: E402,F401\n")
    done = _lint_imports(root)
    assert done.returncode == 1
    assert "Layers: cli > ops > evaluation" in done.stdout and "BROKEN" in done.stdout
    assert "mmrad.evaluation.metrics -> mmrad.ops.tracking" in done.stdout

    root = _copy(tmp_path / "circle")
    io = root / "mmrad" / "core" / "io.py"  # core.io <-> core.params: a circle inside one layer
    io.write_text(io.read_text() + "\nfrom mmrad.core import params  # noqa: E402,F401\n")
    params = root / "mmrad" / "core" / "params.py"
    params.write_text(params.read_text() + "\nfrom mmrad.core import io  # noqa: E402,F401\n")
    done = _lint_imports(root)
    assert done.returncode == 1 and "No import circles" in done.stdout


def test_ruff_is_clean():
    done = subprocess.run([str(BIN / "ruff"), "check", "."], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_refuses_a_function_level_import_of_our_own_modules(tmp_path):
    """Only the CLI imports its stages lazily (torch / MLflow take seconds); anywhere else it is a hidden circle."""
    root = _copy(tmp_path)
    report = root / "mmrad" / "evaluation" / "report.py"
    report.write_text(report.read_text() + "\n\ndef late():\n    from mmrad.core import io\n\n    return io\n")
    done = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "mmrad"], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and "PLC0415" in done.stdout and "report.py" in done.stdout
