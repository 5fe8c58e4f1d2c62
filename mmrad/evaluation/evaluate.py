"""Evaluation: anomaly maps and scores of a model on a prepared test split, turned into the paper's metrics.

One path for every method of the registry (``mmrad.evaluation.methods``): its
scorer (``mmrad.evaluation.scorers``) produces ``Predictions`` (a probability map
per modality and image, scores per case), and ``evaluate_predictions`` computes
the same metrics from them:

* localisation per modality (Table 2): pixel AUROC and AU-PRO (FPR <= 0.3)
  over all test images of that modality;
* detection (Tables 2, 5, 12): case-level ROC AUC of each score: MMRAD's
  fusion token, fundus-only and OCT-only (each the max of a single-modal
  map, Fig. 5), and the max / mean of the two modalities' image scores;
* per symptom (Table 13): a symptom's pixels against the anomaly-free pixels,
  the other symptoms' pixels left out;
* cross-modal retrieval (a diagnostic, MMRAD only): fundus-to-OCT and
  OCT-to-fundus top-1 accuracy of the paired test cases from the model's pooled
  image embeddings, beside chance (1 / N).

``write_outputs`` saves metrics.json (for ``dvc metrics``), per-case scores.csv,
ROC / PRO curves as CSV (for ``dvc plots``) and overlay PNGs of maps on images
(``mmrad.evaluation.plots``); ``run_evaluation`` is the evaluate / baseline /
transfer stage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from mmrad.core.io import atomic_dir
from mmrad.core.params import Params
from mmrad.data import symptoms
from mmrad.data.splits import SplitData
from mmrad.data.symptoms import FUNDUS, OCT
from mmrad.evaluation import methods, metrics, scorers
from mmrad.evaluation.inference import Predictions
from mmrad.evaluation.plots import save_overlays

log = logging.getLogger(__name__)

CURVE_POINTS = 200  # points kept per curve for plots (full curves have millions)


def _downsample(x: np.ndarray, y: np.ndarray, n: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= n:
        return x, y
    grid = np.linspace(x[0], x[-1], n)
    return grid, np.interp(grid, x, y)


def evaluate_predictions(test: SplitData, predictions: Predictions) -> tuple[dict, dict]:
    """(metrics, curves) of one method on one test set."""
    result: dict = {"dataset": test.dataset, "cases": int(len(test.labels)),
                    "anomalous_cases": int(test.labels.sum()), "localisation": {}, "detection": {},
                    "per_symptom": {}}
    curves: dict[str, dict] = {}
    for modality, maps in predictions.maps.items():
        bits = test.masks[modality]
        gt = bits > 0
        loc = {"pixel_auroc": metrics.pixel_auroc(maps, gt), "aupro": metrics.aupro(maps, gt)}
        result["localisation"][modality] = {k: round(v, 4) for k, v in loc.items()}
        fpr, tpr, _ = roc_curve(gt.ravel(), maps.ravel(), drop_intermediate=True)
        curves[f"roc_{modality}"] = dict(zip(("fpr", "tpr"), _downsample(fpr, tpr)))
        pro_fpr, pro = metrics.pro_curve(maps, gt)
        keep = pro_fpr <= 0.3
        curves[f"pro_{modality}"] = dict(zip(("fpr", "pro"), _downsample(pro_fpr[keep], pro[keep])))
        result["per_symptom"][modality] = _per_symptom(test.dataset, modality, maps, bits)
    if len(np.unique(test.labels)) == 2:
        for name, scores in predictions.scores.items():
            result["detection"][name] = round(metrics.detection_auroc(scores, test.labels), 4)
        main = "fusion" if "fusion" in predictions.scores else next(iter(predictions.scores))
        fpr, tpr = metrics.roc_curve_points(predictions.scores[main], test.labels)
        curves["roc_detection"] = {"fpr": fpr, "tpr": tpr}
    if len(predictions.embeddings) == 2 and len(test.case_ids) >= 2:
        fundus, oct_ = predictions.embeddings[FUNDUS], predictions.embeddings[OCT]
        result["retrieval"] = {"fundus_to_oct_top1": round(metrics.retrieval_top1(fundus, oct_), 4),
                               "oct_to_fundus_top1": round(metrics.retrieval_top1(oct_, fundus), 4),
                               "chance": round(1 / len(test.case_ids), 4)}
    return result, curves


def _per_symptom(dataset: str, modality: str, maps: np.ndarray, bits: np.ndarray) -> dict:
    """Table 13: each symptom against the anomaly-free pixels, other symptoms ignored."""
    out = {}
    for class_id, symptom in symptoms.table(dataset, modality).items():
        own = (bits & np.uint16(1 << (class_id - 1))) > 0
        if not own.any():
            continue
        ignore = (bits > 0) & ~own
        out[str(class_id)] = {"name": symptom.name, "images": int(own.any(axis=(1, 2)).sum()),
                              "pixel_auroc": round(metrics.pixel_auroc(maps, own, ignore=ignore), 4),
                              "aupro": round(metrics.aupro(maps, own, ignore=ignore), 4)}
    return out


def write_outputs(out: str | Path, result: dict, curves: dict, test: SplitData, predictions: Predictions,
                  overlays: int = 8) -> None:
    """metrics.json, scores.csv (per case), plots/*.csv and overlays/*.png under ``out``, atomically."""
    with atomic_dir(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "plots").mkdir()
        for name, columns in curves.items():
            keys = list(columns)
            rows = zip(*(np.asarray(columns[k], dtype=float) for k in keys))
            lines = [",".join(keys)] + [",".join(f"{v:.6g}" for v in row) for row in rows]
            (tmp / "plots" / f"{name}.csv").write_text("\n".join(lines) + "\n")
        keys = list(predictions.scores)
        lines = [",".join(["case_id", "label", *keys])] + [
            ",".join([case, str(int(test.labels[i])), *(f"{predictions.scores[k][i]:.8g}" for k in keys)])
            for i, case in enumerate(test.case_ids)]
        (tmp / "scores.csv").write_text("\n".join(lines) + "\n")
        (tmp / "overlays").mkdir()
        save_overlays(test, predictions, tmp / "overlays", overlays)


def run_evaluation(params: Params, method: str, prepared: str | Path, out: str | Path,
                   model_path: str | Path | None = None) -> dict:
    """The `evaluate`, `baseline` and `transfer` stages: one method of the registry on a prepared test split."""
    spec = methods.get(method)
    test, predictions = getattr(scorers, spec.scorer)(params, prepared, model_path)
    result, curves = evaluate_predictions(test, predictions)
    result["method"] = method
    write_outputs(out, result, curves, test, predictions)
    log.info("evaluate %s: localisation %s, detection %s", method, result["localisation"], result["detection"])
    return result
