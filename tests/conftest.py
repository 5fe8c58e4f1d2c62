"""Shared fixtures: tiny parameters and one generated synthetic dataset per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mmrad.core.params import Params

PROJECT = Path(__file__).resolve().parents[1]


def tiny_params_dict(**overrides) -> dict:
    """params.yaml with a dataset small enough for unit tests (a few seconds to generate)."""
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["synthetic"].update(
        workers=1,
        mmr=dict(train_normal=3, test_normal=2, test_anomalous=4, fundus_size=[160, 166],
                 oct_size=[128, 224], one_modality_fraction=0.25,
                 lesions=dict(fundus=dict(contrast=1.0, size=1.0), oct=dict(contrast=1.0, size=1.0))),
        idrid=dict(seg_train=2, seg_test=2, grading_train=4, grading_test=3, healthy_fraction=0.75,
                   size=[128, 192]),
        resc=dict(train_good=3, val_good=1, val_ungood=1, test_good=2, test_ungood=2, size=[128, 128]),
    )
    raw["prepare"].update(resolution=64, workers=1)
    raw["model"].update(image_size=64, cnn="resnet18")  # the same code, small enough for unit tests
    raw["train"].update(steps=6, batch_size=2, checkpoint_every=3, threads=0)
    raw["evaluation"].update(bootstrap=200, bins=256)
    for key, value in overrides.items():
        raw[key] = value
    return raw


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return Params.model_validate(tiny_params_dict())


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory, tiny_params) -> Path:
    """A generated synthetic dataset (MMR/, IDRiD/, RESC/); read-only for tests."""
    from mmrad.synthetic.generate import generate

    root = tmp_path_factory.mktemp("synthetic") / "raw"
    generate(tiny_params, root, progress=False)
    return root


def _prepared(name, folder, synthetic_root, tmp_path_factory, tiny_params) -> Path:
    from mmrad.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / name
    prepare_dataset(name, synthetic_root / folder, out, tiny_params.prepare.resolution, progress=False)
    return out


@pytest.fixture(scope="session")
def prepared_mmr(synthetic_root, tmp_path_factory, tiny_params) -> Path:
    """The tiny synthetic MMR, prepared at the tiny resolution."""
    return _prepared("mmr", "MMR", synthetic_root, tmp_path_factory, tiny_params)


@pytest.fixture(scope="session")
def prepared_resc(synthetic_root, tmp_path_factory, tiny_params) -> Path:
    """The tiny synthetic RESC (OCT only), prepared at the tiny resolution."""
    return _prepared("resc", "RESC", synthetic_root, tmp_path_factory, tiny_params)


@pytest.fixture(scope="session")
def trained_tiny(prepared_mmr, tmp_path_factory, tiny_params) -> tuple[Params, Path]:
    """(params, model folder) of a tiny MMRAD trained for a few steps on the tiny MMR."""
    from mmrad.training.train import train

    root = tmp_path_factory.mktemp("model")
    out = root / "model"  # the checkpoint beside the model folder: an output never holds an input
    train(tiny_params, prepared_mmr, out, root / "ckpt", progress=False)
    return tiny_params, out


@pytest.fixture(scope="session")
def registered_tiny(trained_tiny, prepared_mmr, tmp_path_factory) -> SimpleNamespace:
    """The tiny model evaluated (reports/mmrad) and registered as `challenger` in a sqlite MLflow store.

    Fields: params, root, uri (the store), record (registered.json), evaluation (metrics), reports.
    Tests that read the store set MLFLOW_TRACKING_URI=uri themselves (monkeypatch).
    """
    from mmrad.evaluation.evaluate import run_evaluation
    from mmrad.ops.tracking import log_and_register

    params, model_dir = trained_tiny
    root = tmp_path_factory.mktemp("registered")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    reports = root / "reports"
    evaluation = run_evaluation(params, "mmrad", prepared_mmr, reports / "mmrad", model_dir / "model.pt")
    (root / "data" / "prepared").mkdir(parents=True)
    os.symlink(prepared_mmr, root / "data" / "prepared" / "mmr")
    (root / "dvc.lock").write_text(yaml.safe_dump(
        {"schema": "2.0", "stages": {"prepare@mmr": {"outs": [{"path": "data/prepared/mmr", "md5": "abc123.dir"}]}}}))
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MMRAD_RUN_TAGS", '{"prefect.flow_run_id": "a-flow-run"}')  # what flows/ hands the stage
        record = log_and_register(params, project=root, model_dir=model_dir, reports=reports,
                                  out=root / "registered.json", params_file=params_file)
    return SimpleNamespace(params=params, root=root, uri=uri, record=record, evaluation=evaluation, reports=reports)


@pytest.fixture
def dataset_copy(synthetic_root, tmp_path):
    """A private, mutable copy of one generated dataset folder: dataset_copy("MMR")."""

    def copy(folder: str) -> Path:
        target = tmp_path / folder
        shutil.copytree(synthetic_root / folder, target)
        return target

    return copy


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (to prove nothing changed)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """A real project Prefect server (flows/server.py), shared by the tests that run flows.

    It is what every stage after the first of a ``dvc repro`` uses; tests/system/test_prefect_server.py tests
    the start, the reuse, the fallback and the stops themselves."""
    from flows import server

    where = tmp_path_factory.mktemp("prefect-home")
    url = server.start(where, announce=False)
    assert url, (where / server.LOG).read_text()[-3000:]
    yield url
    server.stop(where, quiet=True)


@pytest.fixture(scope="session", autouse=True)
def no_prefect_server_left_behind(tmp_path_factory):
    """A test that starts a project Prefect server (flows/server.py) stops it: any left running is stopped here
    and named as an error."""
    import psutil

    yield
    base = str(tmp_path_factory.getbasetemp())
    left = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if "_supervise" in (process.info["cmdline"] or []) and (process.info["cwd"] or "").startswith(base):
            left.append(process.info["cwd"])
            process.terminate()
    assert not left, f"project Prefect servers left running by tests in {left}"
