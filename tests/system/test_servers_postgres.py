"""The model registry through a real `mlflow server` whose store is a real PostgreSQL server, both on 127.0.0.1.

The same register/promote loop as the sqlite server test of test_registry.py
(its helpers, imported), now against the team-stack setup: ``mlflow server
--backend-store-uri postgresql+psycopg2://...`` with proxied artifacts. The
tables are then read with psycopg2 directly, with the server down, to show
that PostgreSQL holds the state, and the server is started again on the same
database to show that the registry survives the restart. A second test runs
the real register stage (``log_and_register``: params, per-step loss,
metrics, the pyfunc model) of the tiny trained model through the same server,
promotes it, and loads the champion back through the artifact proxy.

Both tests share one database and one server (module fixture) and keep apart
by model and experiment names: "mmrad-test"/"test" and the tiny params' own.
PostgreSQL comes from ``scripts/ci-services.sh`` (see tests/servers.py):
without it these tests skip, or fail under CI=true.
"""

from __future__ import annotations

import mlflow
import psycopg2
import pytest
import yaml
from mlflow import MlflowClient

from mmrad.data.splits import load_split
from mmrad.evaluation.evaluate import run_evaluation
from mmrad.ops import registry
from mmrad.ops.tracking import CHALLENGER, CHAMPION, EVIDENCE, flatten, log_and_register
from tests.servers import libpq_dsn, mlflow_server, postgres_url  # noqa: F401 (a fixture)
from tests.unit.ops.test_registry import GATE, _champion, _open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(postgres_url, tmp_path_factory):  # noqa: F811
    """One `mlflow server` on the PostgreSQL database for the module (the restart test stops and starts it)."""
    with mlflow_server(postgres_url, tmp_path_factory.mktemp("server-artifacts")) as running:
        yield running


def _rows(url: str, query: str, *args) -> list[tuple]:
    """Rows straight from PostgreSQL (no MLflow in between)."""
    connection = psycopg2.connect(libpq_dsn(url))
    try:
        with connection.cursor() as cursor:
            cursor.execute(query, args)
            return cursor.fetchall()
    finally:
        connection.close()


def _aliases(url: str, name: str) -> dict[str, int]:
    return dict(_rows(url, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", name))


def test_registry_on_a_postgres_backed_server_survives_a_restart(server, postgres_url, tmp_path,  # noqa: F811
                                                                 monkeypatch):
    params, _, add_version, client = _open_store(server.url, tmp_path, monkeypatch)
    v1 = add_version(0.80, 0.90)
    assert registry.promote(params, user="ops").promoted and _champion(client) == v1
    v2 = add_version(0.70, 0.90)
    refused = registry.promote(params)  # detection drops by 0.10: refused by the gate
    assert not refused.promoted and not refused.passed and _champion(client) == v1
    v3 = add_version(0.95, 0.91)
    assert registry.promote(params, user="ops").promoted and _champion(client) == v3

    # params, metrics and an artifact of the champion's run, read back through the server
    runs = {v: client.get_model_version("mmrad-test", v).run_id for v in (v1, v2, v3)}
    run_id = runs[v3]
    client.log_param(run_id, "train.lr", "0.0003")
    (tmp_path / "note.txt").write_text("champion notes\n")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    run = client.get_run(run_id)
    assert run.data.params == {"train.lr": "0.0003"}
    assert run.data.metrics == {"detection.fusion": 0.95, "fundus.pixel_auroc": 0.91}
    assert [a.path for a in client.list_artifacts(run_id)] == [EVIDENCE, "note.txt"]  # evidence: the gate's per-case files
    assert [p.read_text() for p in server.artifacts.rglob("note.txt")] == ["champion notes\n"]  # proxied to disk
    version, aliases = registry.list_versions(params).splitlines()[1].split()[:2]
    assert version == v3 and set(aliases.split(",")) == {CHAMPION, CHALLENGER}

    # the state is in PostgreSQL: read the tables directly, with the server down
    server.stop()
    assert ("mmrad-test",) in _rows(postgres_url, "SELECT name FROM registered_models")
    assert _rows(postgres_url, "SELECT version, run_id FROM model_versions WHERE name = %s ORDER BY version",
                 "mmrad-test") == [(int(v), runs[v]) for v in (v1, v2, v3)]
    assert _rows(postgres_url, "SELECT count(*) FROM runs WHERE run_uuid = ANY(%s) AND status = 'FINISHED'",
                 list(runs.values())) == [(3,)]
    assert _aliases(postgres_url, "mmrad-test") == {CHAMPION: int(v3), CHALLENGER: int(v3)}
    tags = dict(_rows(postgres_url, "SELECT key, value FROM model_version_tags WHERE name = %s AND version = %s",
                      "mmrad-test", int(v3)))
    assert tags[registry.PREVIOUS] == v1 and tags["mmrad.promoted_by"] == "ops" and tags["mmrad.promotion"] == "gate"
    assert dict(_rows(postgres_url, "SELECT key, value FROM latest_metrics WHERE run_uuid = %s", run_id)) == \
        {"detection.fusion": 0.95, "fundus.pixel_auroc": 0.91}
    assert _rows(postgres_url, "SELECT key, value FROM params WHERE run_uuid = %s", run_id) == [("train.lr", "0.0003")]

    # a restarted server on the same database (same port) serves the same registry, and writes to it
    server.start()
    assert _champion(client) == v3
    assert client.get_run(run_id).data.params == {"train.lr": "0.0003"}
    assert open(client.download_artifacts(run_id, "note.txt", str(tmp_path))).read() == "champion notes\n"
    assert registry.rollback(params, user="ops") == (v3, v1)
    assert _champion(client) == v1
    assert _aliases(postgres_url, "mmrad-test") == {CHAMPION: int(v1), CHALLENGER: int(v3)}


def test_register_stage_through_a_postgres_backed_server(server, trained_tiny, prepared_mmr, postgres_url,  # noqa: F811
                                                         tmp_path, monkeypatch):
    params, model_dir = trained_tiny
    params = params.model_copy(update={"tracking": params.tracking.model_copy(update={"gate": GATE})})
    name = params.tracking.model_name
    reports = tmp_path / "reports"
    evaluation = run_evaluation(params, "mmrad", prepared_mmr, reports / "mmrad", model_dir / "model.pt")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)

    record = log_and_register(params, project=tmp_path, model_dir=model_dir, reports=reports,
                              out=tmp_path / "registered.json", params_file=params_file)
    assert record["tracking_uri"] == server.url
    client = MlflowClient(server.url, server.url)
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == str(record["version"])
    decision = registry.promote(params, user="ops")  # the first challenger becomes champion
    assert decision.promoted and "no champion yet" in decision.reason
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == str(record["version"])

    run = client.get_run(record["run_id"])
    assert run.data.params["train.steps"] == str(params.train.steps)
    assert run.data.params["model.encoder"] == params.model.encoder
    assert run.data.metrics["detection.fusion"] == evaluation["detection"]["fusion"]
    assert [m.step for m in client.get_metric_history(record["run_id"], "train.loss")] == \
        list(range(1, params.train.steps + 1))
    assert list(server.artifacts.rglob("MLmodel")) and list(server.artifacts.rglob("model.pt"))  # proxied to disk

    # the champion loads back through the server's artifact proxy and scores the test split
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    test = load_split(prepared_mmr)
    assert model.predict({m: test.images[m] for m in ("fundus", "oct")})["score"].shape == (len(test.labels),)

    # and PostgreSQL holds it
    assert _rows(postgres_url, "SELECT version, run_id FROM model_versions WHERE name = %s",
                 name) == [(record["version"], record["run_id"])]
    assert _aliases(postgres_url, name) == {CHAMPION: record["version"], CHALLENGER: record["version"]}
    stored = dict(_rows(postgres_url, "SELECT key, value FROM params WHERE run_uuid = %s", record["run_id"]))
    assert set(stored) == set(flatten(params.model_dump(mode="json")))
    assert stored["train.steps"] == str(params.train.steps)
    assert _rows(postgres_url, "SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = %s",
                 record["run_id"], "detection.fusion") == [(evaluation["detection"]["fusion"],)]
