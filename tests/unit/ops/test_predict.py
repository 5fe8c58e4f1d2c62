"""`mmrad predict` and the served model: the same score as the evaluate stage, clear errors for bad input.

The served-model test starts a real `mlflow models serve` process on
127.0.0.1 and sends real HTTP requests.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmrad.cli import main
from mmrad.core.errors import DataError
from mmrad.data.prepare import load_for_model, read_manifest
from mmrad.ops.predict import find_cases, load_model, predict_files
from mmrad.ops.serving import check_model_input
from tests.servers import free_port


def _evaluate_scores(registered) -> dict[str, dict[str, float]]:
    """The evaluate stage's per-case scores (reports/mmrad/scores.csv)."""
    with open(registered.reports / "mmrad" / "scores.csv") as f:
        return {row["case_id"]: {k: float(v) for k, v in row.items() if k != "case_id"} for row in csv.DictReader(f)}


def _params_file(registered) -> Path:
    return registered.root / "params.yaml"


def test_a_folder_scores_as_the_evaluate_stage(registered_tiny, trained_tiny, prepared_mmr, tmp_path):
    model, params = load_model(str(trained_tiny[1]), _params_file(registered_tiny))
    cases = find_cases(prepared_mmr / "images" / "test")
    records = predict_files(model, params, cases, tmp_path / "out")
    expected = _evaluate_scores(registered_tiny)
    assert [r["case_id"] for r in records] == sorted(expected)
    for record in records:
        assert record["modalities"] == "fundus+oct"
        assert record["score"] == pytest.approx(expected[record["case_id"]]["fusion"], abs=1e-5)
        assert record["fundus_score"] == pytest.approx(expected[record["case_id"]]["fundus_only"], abs=1e-5)
        assert record["oct_score"] == pytest.approx(expected[record["case_id"]]["oct_only"], abs=1e-5)
    # the outputs: JSON and parquet agree, one overlay per case with both modalities' image + map
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == records
    frame = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert frame.case_id.tolist() == [r["case_id"] for r in records]
    assert np.allclose(frame.score, [r["score"] for r in records])
    overlays = sorted((tmp_path / "out" / "overlays").glob("*.png"))
    assert len(overlays) == len(records)
    width, height = Image.open(overlays[0]).size
    assert width > 2 * height  # four panels side by side


def test_raw_files_are_read_exactly_as_the_prepared_cache(prepared_mmr, tiny_params):
    frame = read_manifest(prepared_mmr)
    for row in frame[frame.split == "test"].head(6).itertuples():
        cached = np.asarray(Image.open(prepared_mmr / row.cache_image).convert("RGB"))
        assert np.array_equal(load_for_model(row.path, row.modality, tiny_params.prepare.resolution), cached), row.path


def test_cli_scores_one_modality_from_the_registry(registered_tiny, prepared_mmr, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_tiny.uri)
    case = sorted(_evaluate_scores(registered_tiny))[0]
    fundus = prepared_mmr / "images" / "test" / f"{case}_fundus.png"
    status = main(["--params", str(_params_file(registered_tiny)), "predict", "--model", "models:/mmrad@challenger",
                   "--fundus", str(fundus), "--case-id", case, "--out", str(tmp_path / "out")])
    assert status == 0
    (record,) = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert record["modalities"] == "fundus" and record["oct_score"] is None
    assert record["score"] == pytest.approx(_evaluate_scores(registered_tiny)[case]["fundus_only"], abs=1e-5)
    assert f"{case}\tfundus\tscore" in capsys.readouterr().out


def test_folder_layout_with_one_subfolder_per_case(tmp_path, prepared_mmr):
    source = prepared_mmr / "images" / "test"
    first = sorted(source.glob("*_fundus.png"))[0]
    (tmp_path / "eye1").mkdir()
    (tmp_path / "eye1" / "fundus.png").write_bytes(first.read_bytes())
    (tmp_path / "eye1" / "oct.png").write_bytes(first.with_name(first.name.replace("_fundus", "_oct")).read_bytes())
    (tmp_path / "eye2").mkdir()
    (tmp_path / "eye2" / "oct.png").write_bytes(first.with_name(first.name.replace("_fundus", "_oct")).read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    cases = find_cases(tmp_path)
    assert [(c.case_id, c.modalities) for c in cases] == [("eye1", ("fundus", "oct")), ("eye2", ("oct",))]


# --------------------------------------------------------------------------- bad input: the file and the rule

def _predict_error(argv: list[str], out: Path, capsys) -> str:
    assert main(argv + ["--out", str(out)]) == 2
    assert not out.exists(), "no partial output"
    return capsys.readouterr().err


def test_a_non_image_names_the_file_and_leaves_nothing(registered_tiny, trained_tiny, tmp_path, capsys):
    bad = tmp_path / "cases" / "x_fundus.png"
    bad.parent.mkdir()
    bad.write_text("this is not a PNG")
    err = _predict_error(["--params", str(_params_file(registered_tiny)), "predict", "--model", str(trained_tiny[1]),
                          "--folder", str(bad.parent)], tmp_path / "out", capsys)
    assert str(bad) in err and "corrupt" in err


@pytest.mark.parametrize("layout, rule", [
    ("missing", "folder of cases is missing"),
    ("empty", "no case images found"),
    ("twice", "has two fundus images"),
])
def test_bad_folders(layout, rule, tmp_path, prepared_mmr):
    folder = tmp_path / "cases"
    image = sorted((prepared_mmr / "images" / "test").glob("*_fundus.png"))[0].read_bytes()
    if layout != "missing":
        folder.mkdir()
    if layout == "twice":
        (folder / "a_fundus.png").write_bytes(image)
        (folder / "a_fundus.jpg").write_bytes(image)
    with pytest.raises(DataError, match=rule) as error:
        find_cases(folder)
    assert str(folder) in str(error.value)


def test_bad_model_references(registered_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_tiny.uri)
    params = ["--params", str(_params_file(registered_tiny)), "predict"]
    image = ["--fundus", str(next((registered_tiny.root / "data" / "prepared" / "mmr" / "images" / "test").glob("*.png")))]
    err = _predict_error(params + ["--model", str(tmp_path / "nope"), *image], tmp_path / "out", capsys)
    assert str(tmp_path / "nope") in err and "model file is missing" in err
    err = _predict_error(params + ["--model", "models:/mmrad@nosuchalias", *image], tmp_path / "out", capsys)
    assert "models:/mmrad@nosuchalias" in err and "no such MLflow model" in err
    err = _predict_error(params + ["--model", str(tmp_path)], tmp_path / "out", capsys)
    assert "nothing to score" in err


@pytest.mark.parametrize("inputs, rule", [
    ({"fundus": np.zeros((1, 64, 64, 3), np.uint8)}, "missing modality ['oct']"),
    ({"fundus": np.zeros((1, 64, 64, 3), np.uint8), "oct": np.zeros((1, 32, 32, 3), np.uint8)}, "oct: wrong size 32x32"),
    ({"fundus": np.zeros((1, 64, 64), np.uint8), "oct": np.zeros((1, 64, 64, 3), np.uint8)}, "fundus: not an image"),
    ({"fundus": np.full((1, 64, 64, 3), "x"), "oct": np.zeros((1, 64, 64, 3), np.uint8)}, "fundus: not an image"),
    ({"fundus": np.full((1, 64, 64, 3), 300), "oct": np.zeros((1, 64, 64, 3), np.uint8)}, "must lie in 0-255"),
    ({"fundus": np.zeros((2, 64, 64, 3), np.uint8), "oct": np.zeros((1, 64, 64, 3), np.uint8)}, "batches differ"),
    ({"fundus": np.zeros((1, 64, 64, 3), np.uint8), "oct": np.zeros((1, 64, 64, 3), np.uint8),
      "angio": np.zeros(1)}, "unknown input(s) ['angio']"),
])
def test_the_served_models_input_rule(inputs, rule):
    with pytest.raises(ValueError) as error:
        check_model_input(inputs, 64)
    assert rule in str(error.value)


def test_the_input_rule_accepts_a_pair():
    pair = {m: np.zeros((2, 64, 64, 3), np.int64) for m in ("fundus", "oct")}
    assert {m: a.dtype for m, a in check_model_input(pair, 64).items()} == {"fundus": np.uint8, "oct": np.uint8}


# --------------------------------------------------------------------------- the REST endpoint, for real

def _post(url: str, body, content_type: str = "application/json") -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        try:
            return error.code, json.loads(text)
        except json.JSONDecodeError:
            return error.code, text


@pytest.fixture(scope="module")
def served(registered_tiny, tmp_path_factory):
    """`mlflow models serve -m models:/mmrad@challenger` on 127.0.0.1 (the project's venv, no new env)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered_tiny.uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mmrad@challenger",
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                  env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.slow
def test_the_served_model_scores_as_the_evaluate_stage(served, registered_tiny, prepared_mmr):
    expected = _evaluate_scores(registered_tiny)
    cases = sorted(expected)[:3]
    size = registered_tiny.params.prepare.resolution
    pair = {m: np.stack([load_for_model(prepared_mmr / "images" / "test" / f"{c}_{m}.png", m, size) for c in cases])
            for m in ("fundus", "oct")}
    status, body = _post(served, {"inputs": {m: a.tolist() for m, a in pair.items()}})
    assert status == 200, body
    result = body["predictions"]
    assert result["score"] == pytest.approx([expected[c]["fusion"] for c in cases], abs=1e-5)
    assert np.asarray(result["fundus_map"]).shape == (3, size, size)
    assert np.asarray(result["oct_map"]).min() >= 0 and np.asarray(result["oct_map"]).max() <= 1


@pytest.mark.slow
def test_bad_requests_get_a_4xx_with_the_reason(served, registered_tiny):
    size = registered_tiny.params.prepare.resolution
    image = np.zeros((1, size, size, 3), np.uint8).tolist()
    cases = [
        ({"inputs": {"fundus": image}}, 400, "missing inputs ['oct']"),
        ({"inputs": {"fundus": np.zeros((1, size // 2, size // 2, 3), np.uint8).tolist(), "oct": image}},
         400, "does not match expected shape"),
        ({"inputs": {"fundus": "a photo of an eye", "oct": image}}, 400, "Invalid input"),
        ({"inputs": {"fundus": np.full((1, size, size, 3), 300).tolist(), "oct": image}}, 400, "out of bounds for uint8"),
        ({"inputs": {"fundus": np.zeros((2, size, size, 3), np.uint8).tolist(), "oct": image}}, 400, "batches differ"),
        (b"definitely not json", 400, "valid JSON"),
    ]
    for body, code, reason in cases:
        status, answer = _post(served, body)
        assert status == code, (reason, answer)
        assert reason in answer["message"], answer["message"][-500:]
    status, answer = _post(served, b"\x89PNG\r\n", content_type="image/png")
    assert status == 415 and "content types" in answer
