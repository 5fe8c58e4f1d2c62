"""MLflow tracking and the model registry, on a real sqlite MLflow store (registry included).

Nothing is mocked: runs, model versions, aliases and tags live in a real
tracking database in a temporary folder; the concurrency test runs two real
``mmrad registry promote`` processes at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from mmrad.core.errors import DataError
from mmrad.core.params import GateRule, Params
from mmrad.data.splits import load_split
from mmrad.evaluation import metrics
from mmrad.ops import registry
from mmrad.ops.tracking import CHALLENGER, CHAMPION, EVIDENCE, params_hash, use_tracking
from tests.conftest import PROJECT, tiny_params_dict
from tests.servers import mlflow_server

GATE = {"detection.fusion": GateRule(min_gain=0.01, max_regression=0.02),
        "fundus.pixel_auroc": GateRule(min_gain=0.01, max_regression=0.02)}


# --------------------------------------------------------------------------- the gate, as a pure function

@pytest.mark.parametrize("challenger, champion, passed, reason", [
    ({"detection.fusion": 0.80, "fundus.pixel_auroc": 0.90}, None, True, "no champion yet"),
    ({"detection.fusion": 0.82, "fundus.pixel_auroc": 0.89}, {"detection.fusion": 0.80, "fundus.pixel_auroc": 0.90},
     True, "improves ['detection.fusion']"),  # +0.02 gain, -0.01 within tolerance
    ({"detection.fusion": 0.85, "fundus.pixel_auroc": 0.87}, {"detection.fusion": 0.80, "fundus.pixel_auroc": 0.90},
     False, "regression beyond tolerance on ['fundus.pixel_auroc']"),  # -0.03 > 0.02
    ({"detection.fusion": 0.805, "fundus.pixel_auroc": 0.90}, {"detection.fusion": 0.80, "fundus.pixel_auroc": 0.90},
     False, "no gated metric improves"),  # +0.005 < min_gain
    ({"detection.fusion": 0.99}, {"detection.fusion": 0.80, "fundus.pixel_auroc": 0.90},
     False, "lacks gated metric(s) ['fundus.pixel_auroc']"),
])
def test_gate_rules(challenger, champion, passed, reason):
    from mmrad.evaluation.compare import Comparison

    significant = {m: Comparison(m, 0.0, 0.0, 0.0, 0.0, 0.0, 0.001, "DeLong") for m in GATE}  # p below 0.05 / 2
    ok, rows, why = registry.evaluate_gate(challenger, champion, GATE, significant, 0.05)
    assert ok is passed and reason in why
    assert [r.metric for r in rows] == list(GATE)


# --------------------------------------------------------------------------- per-case evidence

LABELS = np.r_[np.ones(80), np.zeros(80)].astype(int)
CASES = [f"case_{i:03d}" for i in range(LABELS.size)]


def _evidence(folder: Path, fusion: float, fundus: float, noise: int = 0) -> Path:
    """scores.csv + replicates.parquet of a model whose detection AUROC is about ``fusion``: binormal scores
    with separation sqrt(2) Phi^-1(AUROC) over noise drawn from ``noise`` (the same ``noise``: the same model
    up to its strength; another: a retrain with another seed), and pixel-AUROC replicates around ``fundus``."""
    from scipy.stats import norm

    from mmrad.evaluation.evaluate import write_replicates

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(noise)
    scores = LABELS * np.sqrt(2) * norm.ppf(fusion) + rng.normal(size=LABELS.size)
    (folder / "scores.csv").write_text("case_id,label,fusion\n" + "".join(
        f"{c},{y},{s:.8g}\n" for c, y, s in zip(CASES, LABELS, scores)))
    shared = np.random.default_rng(99).normal(0, 0.01, 500)  # the case resamples move every version alike
    write_replicates(folder / "replicates.parquet", {"fundus.pixel_auroc": fundus + shared + rng.normal(0, 0.004, 500)},
                     CASES, seed=1)
    return folder


def test_gate_needs_a_significant_gain_on_the_same_cases(tmp_path):
    from mmrad.evaluation.compare import load_evidence

    champion = {"mmrad": load_evidence(_evidence(tmp_path / "a" / "mmrad", 0.80, 0.90))}
    values = lambda f, p: {"detection.fusion": f, "fundus.pixel_auroc": p}  # noqa: E731
    # an identical retrain: the same scores, no gain, p = 1
    same = {"mmrad": load_evidence(_evidence(tmp_path / "b" / "mmrad", 0.80, 0.90))}
    tests = registry.paired_tests(same, champion, (values(0.8, 0.9), values(0.8, 0.9)), list(GATE))
    assert tests["detection.fusion"].p_value == 1.0 and tests["detection.fusion"].test == "DeLong"
    ok, rows, why = registry.evaluate_gate(values(0.8, 0.9), values(0.8, 0.9), GATE, tests, 0.05)
    assert not ok and "no gated metric improves" in why
    # the same gain of +0.015 on paper, from a retrain with another seed: not significant, so not promoted
    other = {"mmrad": load_evidence(_evidence(tmp_path / "c" / "mmrad", 0.815, 0.90, noise=7))}
    tests = registry.paired_tests(other, champion, (values(0.815, 0.9), values(0.8, 0.9)), list(GATE))
    ok, rows, why = registry.evaluate_gate(values(0.815, 0.9), values(0.8, 0.9), GATE, tests, 0.05)
    assert not ok and "may be noise" in why and rows[0].verdict == "gain, not significant"
    assert rows[0].alpha == 0.025  # Bonferroni over the two gated metrics
    # a clearly better model on the same cases promotes
    better = {"mmrad": load_evidence(_evidence(tmp_path / "d" / "mmrad", 0.95, 0.90))}
    tests = registry.paired_tests(better, champion, (values(0.95, 0.9), values(0.8, 0.9)), list(GATE))
    ok, rows, why = registry.evaluate_gate(values(0.95, 0.9), values(0.8, 0.9), GATE, tests, 0.05)
    assert ok and rows[0].verdict == "gain" and rows[0].p_value < 1e-4
    assert tests["fundus.pixel_auroc"].test == "paired bootstrap"
    # other test cases: no paired test, so no gain counts
    moved = {"mmrad": load_evidence(_evidence(tmp_path / "e" / "mmrad", 0.95, 0.90))}
    moved["mmrad"].case_ids = moved["mmrad"].case_ids[::-1]
    tests = registry.paired_tests(moved, champion, (values(0.95, 0.9), values(0.8, 0.9)), list(GATE))
    assert "different test cases" in tests["detection.fusion"]
    ok, rows, why = registry.evaluate_gate(values(0.95, 0.9), values(0.8, 0.9), GATE, tests, 0.05)
    assert not ok and rows[0].verdict == "gain, untested"


# --------------------------------------------------------------------------- a real store

def _open_store(uri: str, tmp_path: Path, monkeypatch):
    """Point everything at ``uri``; returns (params, params file, add_version, client)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    raw = tiny_params_dict()
    raw["tracking"] = {"experiment": "test", "model_name": "mmrad-test", "significance": 0.05,
                       "gate": {k: v.model_dump() for k, v in GATE.items()}}
    params = Params.model_validate(raw)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    client = MlflowClient(uri, uri)
    client.create_registered_model("mmrad-test")
    experiment = client.create_experiment("test")

    def add_version(fusion: float, fundus: float, noise: int = 0, evidence: bool = True) -> str:
        """A run with these metrics and per-case evidence made for them (``_evidence``), registered as a new
        version and made challenger (as the register stage does)."""
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "detection.fusion", fusion)
        client.log_metric(run.info.run_id, "fundus.pixel_auroc", fundus)
        if evidence:
            folder = _evidence(tmp_path / f"evidence-{run.info.run_id}" / "mmrad", fusion, fundus, noise)
            for file in folder.iterdir():
                client.log_artifact(run.info.run_id, str(file), f"{EVIDENCE}/mmrad")
        client.set_terminated(run.info.run_id)
        version = client.create_model_version("mmrad-test", f"runs:/{run.info.run_id}/model", run.info.run_id)
        client.set_registered_model_alias("mmrad-test", CHALLENGER, version.version)
        return str(version.version)

    return params, params_file, add_version, client


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store (registry included)."""
    return _open_store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path, monkeypatch)


def _champion(client) -> str:
    return str(client.get_model_version_by_alias("mmrad-test", CHAMPION).version)


def test_promote_follows_the_gate_and_rollback_restores(store):
    params, _, add_version, client = store
    v1 = add_version(0.80, 0.90)
    first = registry.promote(params, user="alice")
    assert first.promoted and _champion(client) == v1

    again = registry.promote(params)  # safe to run twice: nothing changes
    assert not again.promoted and "already champion" in again.reason and _champion(client) == v1

    v2 = add_version(0.70, 0.95)  # detection drops by 0.10: refused, champion untouched
    refused = registry.promote(params)
    assert not refused.promoted and not refused.passed and _champion(client) == v1
    assert "regression" in refused.table() and "FAIL" in refused.table()
    assert "mmrad.promoted_at" not in client.get_model_version("mmrad-test", v2).tags  # a failed gate writes nothing

    add_version(0.815, 0.90, noise=3)  # +0.015 from a retrain with another seed: within noise, refused
    noisy = registry.promote(params)
    assert not noisy.promoted and "may be noise" in noisy.reason and _champion(client) == v1

    v3 = add_version(0.90, 0.90)
    dry = registry.promote(params, dry_run=True)
    assert dry.passed and not dry.promoted and _champion(client) == v1
    table = dry.table()  # gain, interval and p-value per gated metric
    assert "95 % CI of delta" in table and "+0.1000" in table and "<0.001" in table
    promoted = registry.promote(params, user="bob")
    assert promoted.promoted and _champion(client) == v3
    tags = client.get_model_version("mmrad-test", v3).tags
    assert tags[registry.PREVIOUS] == v1 and tags["mmrad.promoted_by"] == "bob" and tags["mmrad.promotion"] == "gate"

    assert registry.rollback(params, user="carol") == (v3, v1)
    assert _champion(client) == v1
    assert client.get_model_version("mmrad-test", v3).tags["mmrad.rolled_back_by"] == "carol"
    with pytest.raises(DataError, match="replaced no earlier version"):
        registry.rollback(params)  # v1 was the first champion

    listing = registry.list_versions(params)
    assert listing.splitlines()[1].split()[0] == v3 and "champion" in listing and "challenger" in listing


def test_force_needs_a_reason_and_is_recorded(store):
    params, _, add_version, client = store
    v1 = add_version(0.80, 0.90)
    registry.promote(params)
    v2 = add_version(0.60, 0.60)
    with pytest.raises(DataError, match="needs a reason"):
        registry.promote(params, force=True)
    assert _champion(client) == v1
    forced = registry.promote(params, force=True, reason="hotfix for site B", user="dave")
    assert forced.promoted and _champion(client) == v2 and "FORCED" in forced.reason
    tags = client.get_model_version("mmrad-test", v2).tags
    assert tags["mmrad.force_reason"] == "hotfix for site B" and tags["mmrad.promotion"] == "forced"
    assert tags["mmrad.promoted_by"] == "dave" and tags["mmrad.promoted_at"]


def test_no_challenger_is_a_clear_error(store):
    params = store[0]
    with pytest.raises(DataError, match="no challenger to promote"):
        registry.promote(params)


def test_two_concurrent_promotions_leave_one_champion(store):
    params, params_file, add_version, client = store
    add_version(0.80, 0.90)
    registry.promote(params)
    v2 = add_version(0.95, 0.95)
    command = [sys.executable, "-m", "mmrad", "--params", str(params_file), "registry", "promote"]
    procs = [subprocess.Popen(command, cwd=PROJECT, env=os.environ.copy(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert _champion(client) == v2
    holders = [str(v.version) for v in client.search_model_versions("name='mmrad-test'")
               if CHAMPION in client.get_model_version("mmrad-test", v.version).aliases]
    assert holders == [v2]


def test_cli_promote_exit_status_and_table(store):
    params, params_file, add_version, client = store
    add_version(0.80, 0.90)
    registry.promote(params)
    add_version(0.50, 0.90)
    done = subprocess.run([sys.executable, "-m", "mmrad", "--params", str(params_file), "registry", "promote"],
                          cwd=PROJECT, capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 1  # a failed gate is a failure for scripts and CI
    assert "detection.fusion" in done.stdout and "regression" in done.stdout and "gate: FAIL" in done.stdout


# --------------------------------------------------------------------------- the register stage, end to end

def test_register_logs_lineage_metrics_and_a_loadable_model(registered_tiny, prepared_mmr, monkeypatch):
    params, uri, record, evaluation = (registered_tiny.params, registered_tiny.uri, registered_tiny.record,
                                       registered_tiny.evaluation)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    use_tracking()  # the store was filled by the session fixture, maybe before another test pointed MLflow elsewhere
    assert json.loads((registered_tiny.root / "registered.json").read_text()) == record
    client = MlflowClient(uri, uri)
    run = client.get_run(record["run_id"])
    assert run.data.params["train.steps"] == str(params.train.steps) and run.data.params["model.encoder"] == "vit_tiny"
    assert run.data.metrics["detection.fusion"] == evaluation["detection"]["fusion"]
    assert run.data.metrics["fundus.pixel_auroc"] == evaluation["localisation"]["fundus"]["pixel_auroc"]
    m = run.data.metrics
    assert m["fundus.pixel_auroc.ci_low"] <= m["fundus.pixel_auroc"] <= m["fundus.pixel_auroc.ci_high"]
    # the per-case evidence the gate's paired tests read
    assert {a.path for a in client.list_artifacts(record["run_id"], f"{EVIDENCE}/mmrad")} == {
        f"{EVIDENCE}/mmrad/scores.csv", f"{EVIDENCE}/mmrad/replicates.parquet"}
    history = client.get_metric_history(record["run_id"], "train.loss")
    assert [m.step for m in history] == list(range(1, params.train.steps + 1))
    tags = run.data.tags
    assert tags["mmrad.data.mmr"] == "abc123.dir" and tags["mmrad.params_hash"] == params_hash(params)
    assert tags["mmrad.weights.sam"] == "random init" and tags["mmrad.git_commit"].startswith("unknown")
    assert tags["prefect.flow_run_id"] == "a-flow-run"  # the link back to the orchestrator's run
    version = client.get_model_version_by_alias(params.tracking.model_name, CHALLENGER)
    assert str(version.version) == str(record["version"]) and version.tags["mmrad.params_hash"] == params_hash(params)
    # descriptions: the run's is the report's head (none here: no report stage), the version's its numbers
    assert tags["mlflow.note.content"].startswith("No report")
    assert f"Detection AUROC (fusion) {evaluation['detection']['fusion']:.4f} [" in version.description
    assert record["run_id"] in version.description
    # the curves as figures beside their CSVs, the overlays, the loss
    figures = {a.path for a in client.list_artifacts(record["run_id"], "figures")}
    assert {"figures/roc_fundus.png", "figures/pro_oct.png", "figures/roc_detection.png",
            "figures/loss.png"} <= figures
    local = Path(client.download_artifacts(record["run_id"], "figures/roc_fundus.png"))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and local.stat().st_size > 10_000
    assert {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(record["run_id"], "plots/mmrad")} >= {
        "roc_fundus.csv", "pro_oct.csv"}
    assert any(a.path.endswith(".png") for a in client.list_artifacts(record["run_id"], "overlays/mmrad"))
    # the prepared data as a dataset input, its DVC hash the digest
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "mmr (prepared)" and dataset.dataset.digest == "abc123.dir"
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"

    # the registered model loads with plain MLflow and gives the evaluate stage's numbers
    model = mlflow.pyfunc.load_model(f"models:/{params.tracking.model_name}@{CHALLENGER}")
    test = load_split(prepared_mmr)
    out = model.predict({m: test.images[m] for m in ("fundus", "oct")})
    assert set(out) == {"score", "fundus_map", "oct_map"}
    assert out["fundus_map"].shape == test.images["fundus"].shape[:3]
    assert round(metrics.detection_auroc(out["score"], test.labels), 4) == evaluation["detection"]["fusion"]
    signature = model.metadata.get_input_schema()
    assert signature.input_names() == ["fundus", "oct"]
    assert np.isfinite(out["score"]).all()


@pytest.mark.slow
def test_promotion_against_a_real_mlflow_server(tmp_path, monkeypatch):
    """The same loop through a real `mlflow server` process on 127.0.0.1 (REST store, not the database)."""
    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts") as server:
        params, _, add_version, client = _open_store(server.url, tmp_path, monkeypatch)
        v1 = add_version(0.80, 0.90)
        assert registry.promote(params, user="ops").promoted
        add_version(0.70, 0.90)
        assert not registry.promote(params).promoted  # refused by the gate
        v3 = add_version(0.95, 0.91)
        assert registry.promote(params).promoted
        assert str(client.get_model_version_by_alias("mmrad-test", CHAMPION).version) == v3
        assert registry.rollback(params) == (v3, v1)
        assert str(client.get_model_version_by_alias("mmrad-test", CHAMPION).version) == v1
