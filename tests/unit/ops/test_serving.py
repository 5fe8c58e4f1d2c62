"""The served model: the pyfunc scores through the shared inference path, and older registered versions still load."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mmrad.data.splits import load_split
from mmrad.evaluation.inference import infer
from mmrad.models.builder import load_finetuned
from mmrad.ops.tracking import use_tracking


@pytest.fixture
def store(registered_tiny, monkeypatch):
    """MLflow pointed at the tiny store (tracking and registry: an earlier test may have set another URI in-process)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_tiny.uri)
    assert use_tracking() == registered_tiny.uri
    return registered_tiny


def _pair(prepared: Path) -> dict[str, np.ndarray]:
    test = load_split(prepared)
    return {m: test.images[m][:3] for m in ("fundus", "oct")}


def test_the_pyfunc_answers_what_infer_answers(store, trained_tiny, prepared_mmr):
    served = mlflow.pyfunc.load_model(store.record["model_uri"]).predict(_pair(prepared_mmr))
    params, folder = trained_tiny
    direct = infer(load_finetuned(folder / "model.pt", params), _pair(prepared_mmr))
    assert set(served) == {"score", "fundus_map", "oct_map"}
    assert np.array_equal(served["score"], direct["score"])
    assert np.array_equal(served["fundus_map"], direct["fundus"]) and np.array_equal(served["oct_map"], direct["oct"])
    assert np.ptp(served["score"]) > 0 or len(served["score"]) == 1  # one score per case, not one broadcast value


def test_a_version_logged_before_the_subpackages_still_loads(store, prepared_mmr, tmp_path):
    """Versions registered before the restructure import ``mmrad.tracking.MMRADModel`` in their logged code file;
    with today's package already imported in this process, that name must still resolve (mmrad/tracking.py)."""
    local = Path(mlflow.artifacts.download_artifacts(store.record["model_uri"], dst_path=str(tmp_path / "dl")))
    old = tmp_path / "old-version"
    shutil.copytree(local, old)
    code = old / "mlflow_model.py"
    assert "from mmrad.ops.serving import MMRADModel" in code.read_text()
    code.write_text(code.read_text().replace("from mmrad.ops.serving import MMRADModel", "from mmrad.tracking import MMRADModel"))
    then = mlflow.pyfunc.load_model(str(old)).predict(_pair(prepared_mmr))
    now = mlflow.pyfunc.load_model(str(local)).predict(_pair(prepared_mmr))
    assert np.array_equal(then["score"], now["score"])
