"""Evaluation: predictions of a (tiny) trained model, the metrics files, curves, overlays and the report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmrad.core.params import Params
from mmrad.data.splits import SplitData, load_split
from mmrad.evaluation import metrics
from mmrad.evaluation.evaluate import evaluate_predictions, run_evaluation, write_outputs
from mmrad.evaluation.inference import Predictions, with_combined_scores
from mmrad.evaluation.report import render
from tests.conftest import tiny_params_dict


@pytest.fixture(scope="module")
def trained(trained_tiny):
    params, folder = trained_tiny
    return params, folder / "model.pt"


def test_load_split_aligns_modalities_by_case(prepared_mmr, tiny_params):
    test = load_split(prepared_mmr)
    p = tiny_params.synthetic.mmr
    assert len(test.case_ids) == p.test_normal + p.test_anomalous == test.labels.size
    assert test.labels.sum() == p.test_anomalous
    for modality in ("fundus", "oct"):
        assert test.images[modality].shape == (test.labels.size, 64, 64, 3)
        assert test.masks[modality].dtype == np.uint16
        assert not test.masks[modality][test.labels == 0].any()  # normal cases carry no lesion


def test_mmrad_evaluation_writes_metrics_curves_and_overlays(trained, prepared_mmr, tmp_path):
    params, model = trained
    result = run_evaluation(params, "mmrad", prepared_mmr, tmp_path / "mmrad", model)
    saved = json.loads((tmp_path / "mmrad" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for modality in ("fundus", "oct"):
        for key in ("pixel_auroc", "aupro"):
            assert 0.0 <= saved["localisation"][modality][key] <= 1.0
    assert set(saved["detection"]) == {"fusion", "fundus_only", "oct_only", "max", "mean"}
    retrieval = saved["retrieval"]
    assert retrieval["chance"] == round(1 / len(load_split(prepared_mmr).case_ids), 4)
    assert 0.0 <= retrieval["fundus_to_oct_top1"] <= 1.0 and 0.0 <= retrieval["oct_to_fundus_top1"] <= 1.0
    labels = {"roc_fundus": f"MMRAD · AUC {saved['localisation']['fundus']['pixel_auroc']:.3f}",
              "pro_oct": f"MMRAD · AU-PRO {saved['localisation']['oct']['aupro']:.3f}",
              "roc_detection": f"MMRAD · AUC {saved['detection']['fusion']:.3f} (fusion token)"}
    for name, label in labels.items():  # the legend of `dvc plots`: the method and its area, on every row
        lines = (tmp_path / "mmrad" / "plots" / f"{name}.csv").read_text(encoding="utf-8").splitlines()
        assert lines[0] in ("fpr,tpr,low,high,curve", "fpr,pro,low,high,curve") and len(lines) > 2
        assert {line.rsplit(",", 1)[1] for line in lines[1:]} == {label}
    pro = np.loadtxt(tmp_path / "mmrad" / "plots" / "pro_oct.csv", delimiter=",", skiprows=1, usecols=(0, 1, 2, 3))
    assert pro[:, 0].max() <= 0.3 and np.all(np.diff(pro[:, 0]) >= 0)
    # the pointwise 95 % band over the case resamples: ordered, rising with the FPR, around the curve
    assert np.all(pro[:, 2] <= pro[:, 3]) and np.all(np.diff(pro[:, 2]) >= -1e-9) and (pro[:, 3] - pro[:, 2]).max() > 0
    overlays = sorted((tmp_path / "mmrad" / "overlays").glob("*.png"))
    assert overlays and Image.open(overlays[0]).size[0] > 400
    # the fusion score of a model trained a few steps varies across cases (a constant score would be a bug)
    fusion = np.loadtxt(tmp_path / "mmrad" / "scores.csv", delimiter=",", skiprows=1, usecols=2)
    assert saved["score_spread"]["fusion"] > params.evaluation.degenerate_spread and "fusion" not in saved["degenerate"]
    assert np.unique(np.round(fusion, 6)).size == fusion.size
    table = pq.read_table(tmp_path / "mmrad" / "replicates.parquet")
    assert table.num_rows == params.evaluation.bootstrap and "detection.fusion" in table.column_names
    assert "fundus.pixel_auroc" in table.column_names
    # the same model and data give the same numbers (deterministic on the CPU)
    assert run_evaluation(params, "mmrad", prepared_mmr, tmp_path / "again", model) == result


def test_metrics_follow_from_the_predictions():
    """Hand-made predictions: a perfect fundus map, a useless OCT map, scores with known AUCs."""
    masks = np.zeros((4, 8, 8), np.uint16)
    masks[2, 1:3, 1:3] = 0b1  # symptom 1
    masks[3, 5:7, 5:7] = 0b10  # symptom 2
    gt = masks > 0
    test = SplitData("mmr", ["a", "b", "c", "d"], np.array([0, 0, 1, 1]),
                   images={"fundus": np.zeros((4, 8, 8, 3), np.uint8), "oct": np.zeros((4, 8, 8, 3), np.uint8)},
                   masks={"fundus": masks, "oct": masks})
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(4, 6))
    preds = with_combined_scores(Predictions(
        maps={"fundus": gt.astype(np.float32), "oct": rng.random((4, 8, 8)).astype(np.float32)},
        scores={"fusion": np.array([0.1, 0.2, 0.9, 0.8]), "fundus_only": np.array([0.1, 0.9, 0.2, 0.8]),
                "oct_only": np.array([0.5, 0.5, 0.5, 0.5])},
        # OCT embeddings: the fundus ones with cases c and d swapped -> 2 of 4 pairs retrieved
        embeddings={"fundus": embedding, "oct": 2 * embedding[[0, 1, 3, 2]] + 1}))
    settings = Params.model_validate(tiny_params_dict()).evaluation
    result, curves, replicates = evaluate_predictions(test, preds, settings, seed=5)
    assert result["localisation"]["fundus"] == {"pixel_auroc": 1.0, "aupro": 1.0}
    # every metric has its interval; a perfect map's interval is the point [1, 1]
    assert result["ci95"]["localisation"]["fundus"]["pixel_auroc"] == {"low": 1.0, "high": 1.0}
    oct_ci = result["ci95"]["localisation"]["oct"]["pixel_auroc"]
    assert oct_ci["low"] <= result["localisation"]["oct"]["pixel_auroc"] <= oct_ci["high"]
    assert set(result["ci95"]["detection"]) == set(result["detection"])
    assert set(result["ci95"]["per_symptom"]["fundus"]) == {"1", "2"}
    assert set(result["ci95"]["retrieval"]) == {"fundus_to_oct_top1", "oct_to_fundus_top1"}
    assert replicates["fundus.pixel_auroc"].shape == (settings.bootstrap,)
    assert result["uncertainty"]["replicates"] == settings.bootstrap
    # a constant score is flagged, not reported as a result
    assert result["degenerate"] == ["oct_only"] and result["score_spread"]["oct_only"] == 0.0
    assert result["localisation"]["oct"]["pixel_auroc"] == round(metrics.pixel_auroc(preds.maps["oct"], gt), 4)
    assert result["detection"]["fusion"] == 1.0 and result["detection"]["fundus_only"] == 0.5
    # max of the image scores: [0.5, 0.9 | 0.5, 0.8] -> pairs (0.5,0.5)=.5 (0.5,0.9)=0 (0.8,0.5)=1 (0.8,0.9)=0
    assert result["detection"]["max"] == 0.375
    assert set(result["per_symptom"]["fundus"]) == {"1", "2"}
    assert result["per_symptom"]["fundus"]["1"]["images"] == 1
    assert result["per_symptom"]["fundus"]["2"]["pixel_auroc"] == 1.0
    assert result["retrieval"] == {"fundus_to_oct_top1": 0.5, "oct_to_fundus_top1": 0.5, "chance": 0.25}


def test_curve_files_carry_the_legend_label(tmp_path):
    """plots/*.csv: the curve's columns as before (6 significant digits) and `curve`, the `dvc plots` legend."""
    masks = np.zeros((4, 8, 8), np.uint16)
    masks[2:, 2:5, 2:5] = 0b1
    images = np.zeros((4, 8, 8, 3), np.uint8)
    test = SplitData("mmr", ["a", "b", "c", "d"], np.array([0, 0, 1, 1]), images={"fundus": images, "oct": images},
                     masks={"fundus": masks, "oct": masks})
    rng = np.random.default_rng(1)
    preds = with_combined_scores(Predictions(
        maps={"fundus": (masks > 0).astype(np.float32), "oct": rng.random((4, 8, 8)).astype(np.float32)},
        scores={"fundus_only": np.array([0.1, 0.3, 0.2, 0.9]), "oct_only": np.array([0.4, 0.1, 0.3, 0.2])}))
    settings = Params.model_validate(tiny_params_dict()).evaluation
    result, curves, _ = evaluate_predictions(test, preds, settings, seed=0)
    result["method"] = "patchcore"
    write_outputs(tmp_path / "out", result, curves, test, preds, overlays=0)
    plots = tmp_path / "out" / "plots"
    assert sorted(p.name for p in plots.iterdir()) == [f"{n}.csv" for n in
                                                       ("pro_fundus", "pro_oct", "roc_detection", "roc_fundus", "roc_oct")]
    oct_auc = result["localisation"]["oct"]["pixel_auroc"]
    expected = {"roc_fundus": "PatchCore · AUC 1.000", "pro_fundus": "PatchCore · AU-PRO 1.000",
                "roc_oct": f"PatchCore · AUC {oct_auc:.3f}",
                "roc_detection": f"PatchCore · AUC {result['detection']['max']:.3f} (max of fundus and OCT)"}
    for name, label in expected.items():
        header, *rows = (plots / f"{name}.csv").read_text(encoding="utf-8").splitlines()
        assert header == ("fpr,pro,low,high,curve" if name.startswith("pro") else "fpr,tpr,low,high,curve")
        assert rows and all(row.rsplit(",", 1)[1] == label for row in rows)
    x, y = np.loadtxt(plots / "roc_oct.csv", delimiter=",", skiprows=1, usecols=(0, 1), unpack=True)
    fpr, tpr = (np.asarray(curves["roc_oct"][k], dtype=float) for k in ("fpr", "tpr"))
    np.testing.assert_allclose(x, fpr, rtol=1e-5)
    np.testing.assert_allclose(y, tpr, rtol=1e-5)
    first = (plots / "roc_detection.csv").read_text(encoding="utf-8").splitlines()[1]
    assert first.split(",")[:2] == [f"{v:.6g}" for v in (curves["roc_detection"]["fpr"][0], curves["roc_detection"]["tpr"][0])]
    # without a method (a direct caller), the label is the metric alone
    write_outputs(tmp_path / "bare", {k: v for k, v in result.items() if k != "method"}, curves, test, preds, overlays=0)
    assert (tmp_path / "bare" / "plots" / "roc_fundus.csv").read_text(encoding="utf-8").splitlines()[1].endswith(",AUC 1.000")


def test_baseline_goes_through_the_same_evaluation(prepared_mmr, tmp_path):
    params = Params.model_validate(tiny_params_dict())
    result = run_evaluation(params, "padim", prepared_mmr, tmp_path / "padim")
    assert result["method"] == "padim"
    assert set(result["detection"]) == {"fundus_only", "oct_only", "max", "mean"}
    roc = (tmp_path / "padim" / "plots" / "roc_fundus.csv").read_text(encoding="utf-8").splitlines()
    assert roc[0] == "fpr,tpr,low,high,curve"
    assert roc[1].endswith(f",PaDiM · AUC {result['localisation']['fundus']['pixel_auroc']:.3f}")
    detection = (tmp_path / "padim" / "plots" / "roc_detection.csv").read_text(encoding="utf-8").splitlines()
    assert detection[1].endswith(f",PaDiM · AUC {result['detection']['max']:.3f} (max of fundus and OCT)")  # the paper's rule


def test_report_has_the_papers_tables_and_flags_imbalance():
    result = {"localisation": {"fundus": {"pixel_auroc": 0.7, "aupro": 0.4}, "oct": {"pixel_auroc": 0.8, "aupro": 0.5}},
              "detection": {"fusion": 0.6, "fundus_only": 0.7, "oct_only": 0.65, "max": 0.7, "mean": 0.5},
              "retrieval": {"fundus_to_oct_top1": 0.125, "oct_to_fundus_top1": 0.0625, "chance": 0.0625},
              "per_symptom": {"fundus": {"2": {"name": "Cherry-red spot", "images": 3, "pixel_auroc": 0.9,
                                               "aupro": 0.6}}}}
    text = render({"mmrad": result, "padim": {**result, "detection": {"max": 0.55}}},
                  {"data": "synthetic", "weights": "none"})
    assert "## Table 2" in text and "## Table 5" in text and "## Table 12" in text and "## Table 13" in text
    assert "| MMRAD | 0.7000 | 0.4000 | 0.8000 | 0.5000 | 0.6000 | 0.6997 / 0.4303 | 0.8295 / 0.5339 | 0.7664 |" in text
    assert "| PaDiM |" in text and "0.5500" in text
    assert "| fundus | 2 | Cherry-red spot | 3 | 0.9000 | 0.6000 | 0.8575 | 0.5786 |" in text
    assert "Modality imbalance" in text  # fusion 0.6 < best single 0.7
    assert "| 0.1250 | 0.0625 | 0.0625 |" in text  # retrieval: fundus->OCT, OCT->fundus, chance


def test_report_table11_transfer_rows():
    loc = {"localisation": {"fundus": {"pixel_auroc": 0.81, "aupro": 0.3}, "oct": {"pixel_auroc": 0.7, "aupro": 0.2}}}
    text = render({}, {"data": "synthetic", "weights": "none"},
                  transfer={"mmr_to_idrid": loc, "resc_to_resc": loc})
    assert "## Table 11" in text
    assert "| IDRiD | MMR | 0.8100 | 0.3000 | 0.7836 | 0.2601 |" in text
    assert "| RESC | RESC | 0.7000 | 0.2000 | 0.8171 | 0.4371 |" in text
    assert "| IDRiD | IDRiD | – | – | 0.8375 | 0.3544 |" in text  # not run: shown as missing, not as zero


def test_single_modal_dataset_evaluates_without_fusion(trained, prepared_resc, tmp_path):
    """Transfer: the MMR-trained model on an OCT-only test set (Table 11's MMR -> RESC row)."""
    params, model = trained
    result = run_evaluation(params, "mmrad", prepared_resc, tmp_path / "mmr_to_resc", model)
    assert set(result["localisation"]) == {"oct"}
    assert set(result["detection"]) == {"oct_only"}  # normal and anomalous scans: a case-level AUC too
    assert set(result["per_symptom"]["oct"]) <= {"1", "2", "3"}  # RESC's own classes


def test_report_prints_intervals_comparisons_and_flags_a_degenerate_score():
    from mmrad.evaluation.compare import Comparison

    result = {"cases": 50, "anomalous_cases": 30,
              "localisation": {"fundus": {"pixel_auroc": 0.7, "aupro": 0.4}, "oct": {"pixel_auroc": 0.8, "aupro": 0.5}},
              "detection": {"fusion": 0.6325, "fundus_only": 0.93, "oct_only": 0.6, "max": 0.7, "mean": 0.5},
              "degenerate": ["fusion"], "score_spread": {"fusion": 1.2e-4},
              "ci95": {"localisation": {"fundus": {"pixel_auroc": {"low": 0.65, "high": 0.74}}},
                       "detection": {"fundus_only": {"low": 0.85, "high": 0.98}}},
              "uncertainty": {"method": "stratified case bootstrap, percentile interval", "replicates": 1000,
                              "seed": 7, "level": 0.95}}
    comparison = Comparison("fundus.pixel_auroc", 0.7, 0.65, 0.05, 0.01, 0.09, 0.012, "paired bootstrap", 2 / 1001)
    floored = Comparison("oct.aupro", 0.5, 0.3, 0.2, 0.15, 0.25, 2 / 1001, "paired bootstrap", 2 / 1001)
    text = render({"mmrad": result}, {"data": "synthetic", "weights": "none",
                                      "conditions": ["LPT CNNs: 2 x resnet50 without pre-training"]},
                  comparisons=[("MMRAD", "PaDiM", comparison), ("MMRAD", "PaDiM", floored)])
    # no resample crossed zero: the p is a bound, and the header says why
    assert "| oct.aupro | MMRAD | PaDiM | 0.5000 | 0.3000 | +0.2000 [+0.150, +0.250] | <= 0.002 | paired bootstrap |" in text
    assert "written `<= 0.002` is at the test's floor" in text
    assert "| MMRAD | 0.7000 [0.650, 0.740] | 0.4000 |" in text  # a value with its interval; none given: bare
    assert "0.9300 [0.850, 0.980]" in text
    assert "degenerate (spread 1.2e-04)" in text and "0.6325" not in text.split("## Table 12")[0]
    assert "**Degenerate fusion score:**" in text and "Modality imbalance" not in text
    assert "| fundus.pixel_auroc | MMRAD | PaDiM | 0.7000 | 0.6500 | +0.0500 [+0.010, +0.090] | 0.012 | paired bootstrap |" in text
    assert "- LPT CNNs: 2 x resnet50 without pre-training" in text and "1000 resamples of the 50 test cases" in text
