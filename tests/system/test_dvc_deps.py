"""dvc.yaml's code deps cannot miss an import, and its method lists are the registry's.

For each stage, the test follows the code the stage runs: its command is
``python -m flows <mmrad subcommand> ...``; the CLI's ``_cmd_<subcommand>``
imports the library modules it runs (the only function-level imports of the
package, see mmrad/cli.py); grimp (import-linter's import graph) gives every
module those import, transitively. Each such module's file must lie under one
of the stage's deps, or DVC would call the stage's results current after a
change to code it runs.

Left out on purpose: ``mmrad/cli.py`` (it parses arguments; every argument a
stage uses is in its dvc.yaml command, and the method names it offers come from
the registry that the evaluation stages depend on anyway) and ``mmrad/__init__.py`` (a docstring
and the version). ``flows/`` wraps a stage and cannot change its outputs
(dvc.yaml's header).
"""

from __future__ import annotations

import ast
import copy
import shlex
from pathlib import Path

import grimp
import pytest
import yaml

from mmrad.evaluation.methods import BASELINES, METHODS
from tests.conftest import PROJECT

NOT_DEPS = {"mmrad/cli.py", "mmrad/__init__.py"}


def expand(dvc: dict) -> dict[str, dict]:
    """{stage name: {"cmd", "deps"}} with foreach stages expanded as DVC does (``${key}``, ``${item...}``)."""
    stages = {}
    for name, stage in dvc["stages"].items():
        if "foreach" not in stage:
            stages[name] = {"cmd": stage["cmd"], "deps": stage.get("deps", [])}
            continue
        items = stage["foreach"]
        if isinstance(items, str):  # `${datasets}`: a section of params.yaml
            items = yaml.safe_load((PROJECT / "params.yaml").read_text())[items.strip("${}")]
        pairs = items.items() if isinstance(items, dict) else ((item, item) for item in items)
        for key, item in pairs:
            def fill(text: str) -> str:
                text = text.replace("${key}", str(key))
                if isinstance(item, dict):
                    for field, value in item.items():
                        text = text.replace(f"${{item.{field}}}", str(value))
                return text.replace("${item}", str(item))
            stages[f"{name}@{key}"] = {"cmd": fill(stage["do"]["cmd"]), "deps": [fill(d) for d in stage["do"].get("deps", [])]}
    return stages


def entry_modules(subcommand: str) -> set[str]:
    """The mmrad modules the CLI's ``_cmd_<subcommand>`` imports, and params.yaml's reader that every command
    calls (imported at the CLI's top; its other top-level imports feed the argument parser)."""
    tree = ast.parse((PROJECT / "mmrad" / "cli.py").read_text())
    wanted = f"_cmd_{subcommand.replace('-', '_')}"
    scopes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == wanted]
    assert scopes, f"no {wanted} in mmrad/cli.py"
    modules: set[str] = {"mmrad.core.params"}
    for node in (inner for scope in scopes for inner in ast.walk(scope)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmrad"):
            modules.add(node.module)
            modules.update(f"{node.module}.{a.name}" for a in node.names)  # `from mmrad.ops import registry`
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names if a.name.startswith("mmrad"))
    return modules


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("mmrad")


def module_file(module: str) -> str:
    path = Path(*module.split("."))
    return (path / "__init__.py").as_posix() if (PROJECT / path).is_dir() else f"{path.as_posix()}.py"


def code_of(graph, subcommand: str) -> set[str]:
    """Files of every module a stage's command runs (its entry modules and all they import, with their packages)."""
    modules = {m for m in entry_modules(subcommand) if m in graph.modules}
    for module in list(modules):
        modules |= graph.find_upstream_modules(module)
    packages = {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
    return {module_file(m) for m in modules | packages} - NOT_DEPS


def missing_deps(dvc: dict, graph) -> dict[str, list[str]]:
    """{stage: [files it runs that no dep covers]}."""
    missing = {}
    for name, stage in expand(dvc).items():
        argv = shlex.split(stage["cmd"])
        assert argv[:3] == ["python", "-m", "flows"], f"{name}: every stage runs `python -m flows <mmrad command>`"
        covered = [d.rstrip("/") for d in stage["deps"]]
        files = sorted(f for f in code_of(graph, argv[3])
                       if not any(f == d or f.startswith(f"{d}/") for d in covered))
        if files:
            missing[name] = files
    return missing


def test_every_stage_depends_on_all_the_code_it_runs(graph):
    dvc = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    assert missing_deps(dvc, graph) == {}
    # and the check sees what it must: training runs the model, the simulation and the prepared-data readers
    assert {"mmrad/models/mmrad.py", "mmrad/training/anomaly_simulation.py", "mmrad/data/splits.py"} <= code_of(graph, "train")
    assert {"mmrad/models/baselines.py", "mmrad/models/builder.py", "mmrad/evaluation/scorers.py"} <= code_of(graph, "evaluate")
    assert "mmrad/synthetic/phantom/fundus.py" not in code_of(graph, "train")  # the pipeline reads the phantom's files only


def test_a_removed_dep_is_caught(graph):
    """The demonstration the architecture issue asks for: drop one dep, the check names the stage and the files."""
    dvc = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    broken = copy.deepcopy(dvc)
    broken["stages"]["baseline"]["do"]["deps"].remove("mmrad/models")
    missing = missing_deps(broken, graph)
    assert set(missing) == {f"baseline@{m}" for m in BASELINES}
    assert "mmrad/models/baselines.py" in missing["baseline@padim"]
    assert "mmrad/models/weights.py" in missing["baseline@padim"]
    broken = copy.deepcopy(dvc)
    broken["stages"]["train"]["deps"].remove("mmrad/training")
    assert "mmrad/training/anomaly_simulation.py" in missing_deps(broken, graph)["train"]


def test_baseline_stages_are_the_registry_of_methods():
    dvc = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    foreach = dvc["stages"]["baseline"]["foreach"]
    assert foreach == {name: METHODS[name].parameter for name in BASELINES}
    assert set(dvc["stages"]["report"]["deps"]) >= {f"reports/{name}/metrics.json" for name in METHODS}
