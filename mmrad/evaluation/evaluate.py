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
import pyarrow as pa
import pyarrow.parquet as pq

from mmrad.core.outputs import atomic_dir, check_output_folder
from mmrad.core.params import Evaluation, Params
from mmrad.data import symptoms
from mmrad.data.splits import SplitData
from mmrad.data.symptoms import FUNDUS, OCT
from mmrad.evaluation import compare, methods, metrics, scorers, uncertainty
from mmrad.evaluation.inference import Predictions
from mmrad.evaluation.plots import OverlayLabels, save_overlays

log = logging.getLogger(__name__)

SCORE_WORDS = {"fusion": "fusion token", "max": "max of fundus and OCT"}  # a case score in a legend
CURVE_POINTS = 200  # points kept per curve for plots (full curves have millions)
REPLICATES = compare.REPLICATES


def _downsample(x: np.ndarray, y: np.ndarray, n: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= n:
        return x, y
    grid = np.linspace(x[0], x[-1], n)
    return grid, np.interp(grid, x, y)


def spread(scores: np.ndarray) -> float:
    """Range of a case score across the test set relative to its magnitude (0 for a constant score)."""
    s = np.asarray(scores, dtype=np.float64)
    scale = max(float(np.abs(s).max()), 1e-12)
    return float((s.max() - s.min()) / scale)


class _Intervals:
    """Collects each metric's bootstrap replicates (same case resamples for every metric and method) and its
    95 % interval; ``flat`` names them as MLflow does (``fundus.pixel_auroc``, ``detection.fusion``)."""

    def __init__(self, labels: np.ndarray, settings: Evaluation, seed: int):
        self.settings = settings
        self.weights = uncertainty.case_weights(labels, settings.bootstrap, seed) if settings.bootstrap else None
        self.tree: dict = {}
        self.flat: dict[str, np.ndarray] = {}

    def put(self, path: tuple[str, ...], name: str, replicates: np.ndarray, shift: float = 0.0) -> None:
        low, high = uncertainty.percentile_interval(replicates, shift)
        node = self.tree
        for key in path:
            node = node.setdefault(key, {})
        node[name] = {"low": round(low, 4), "high": round(high, 4)}
        self.flat[".".join((*path[1:], name)) if path[0] == "localisation" else ".".join((*path, name))] = \
            np.asarray(replicates, dtype=np.float64) + shift

    def pixel(self, path: tuple[str, ...], hist, positives: np.ndarray, exact: dict[str, float]) -> list[np.ndarray]:
        """Put the pixel metrics' intervals; return the resamples' histograms (for the curves' bands)."""
        rows = uncertainty.resampled_histograms(hist, positives, self.weights)
        for name, values in uncertainty.pixel_metrics(*rows).items():  # row 0: all cases; shift to the exact one
            self.put(path, name, values[1:], exact[name] - values[0])
        return [r[1:] for r in rows]


def evaluate_predictions(test: SplitData, predictions: Predictions, settings: Evaluation, seed: int,
                         ) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """(metrics, curves, bootstrap replicates by flat metric name) of one method on one test set."""
    result: dict = {"dataset": test.dataset, "cases": int(len(test.labels)),
                    "anomalous_cases": int(test.labels.sum()), "localisation": {}, "detection": {},
                    "per_symptom": {}}
    curves: dict[str, dict] = {}
    ci = _Intervals(test.labels, settings, seed)
    for modality, maps in predictions.maps.items():
        bits = test.masks[modality]
        gt = bits > 0
        ranked = metrics.RankedPixels(maps)  # the one sort of this modality's scores: every metric below uses it
        whole = ranked.against(gt)
        loc = {"pixel_auroc": whole.auroc(), "aupro": whole.aupro()}
        result["localisation"][modality] = {k: round(v, 4) for k, v in loc.items()}
        # "curve": the legend label's metric part, metrics.json's value (write_outputs puts the method's title first)
        rounded = result["localisation"][modality]
        roc = dict(zip(("fpr", "tpr"), _downsample(*whole.roc_curve())))  # sklearn's roc_curve points, thinned
        pro_fpr, pro = whole.pro_curve()
        keep = pro_fpr <= 0.3
        pro = dict(zip(("fpr", "pro"), _downsample(pro_fpr[keep], pro[keep])))
        hist = uncertainty.PixelHistograms(maps, ~gt, settings.bins) if ci.weights is not None else None
        if hist is not None:
            resampled = ci.pixel(("localisation", modality), hist, gt, loc)
            bands = uncertainty.pixel_curve_bands(*resampled, roc["fpr"], pro["fpr"])
            roc["low"], roc["high"] = bands["roc"]  # the pointwise 95 % band over the case resamples
            pro["low"], pro["high"] = bands["pro"]
        curves[f"roc_{modality}"] = {**roc, "curve": f"AUC {rounded['pixel_auroc']:.3f}"}
        curves[f"pro_{modality}"] = {**pro, "curve": f"AU-PRO {rounded['aupro']:.3f}"}
        result["per_symptom"][modality] = _per_symptom(test.dataset, modality, ranked, bits, hist, ci)
    if len(np.unique(test.labels)) == 2:
        degenerate = []
        for name, scores in predictions.scores.items():
            auc = metrics.detection_auroc(scores, test.labels)
            result["detection"][name] = round(auc, 4)
            if spread(scores) < settings.degenerate_spread:
                degenerate.append(name)
            if ci.weights is not None:
                ci.put(("detection",), name, uncertainty.detection_replicates(scores, test.labels, ci.weights))
        result["score_spread"] = {name: float(f"{spread(s):.4g}") for name, s in predictions.scores.items()}
        result["degenerate"] = degenerate
        main = methods.main_score(predictions.scores)
        fpr, tpr = metrics.roc_curve_points(predictions.scores[main], test.labels)
        roc = {"fpr": fpr, "tpr": tpr}
        if ci.weights is not None:
            roc["low"], roc["high"] = uncertainty.detection_roc_band(predictions.scores[main], test.labels,
                                                                     ci.weights, fpr)
        curves["roc_detection"] = {**roc, "curve": f"AUC {result['detection'][main]:.3f} ({SCORE_WORDS.get(main, main)})"}
    if len(predictions.embeddings) == 2 and len(test.case_ids) >= 2:
        fundus, oct_ = predictions.embeddings[FUNDUS], predictions.embeddings[OCT]
        n = len(test.case_ids)
        result["retrieval"] = {"fundus_to_oct_top1": round(metrics.retrieval_top1(fundus, oct_), 4),
                               "oct_to_fundus_top1": round(metrics.retrieval_top1(oct_, fundus), 4),
                               "chance": round(1 / n, 4)}
        for key in ("fundus_to_oct_top1", "oct_to_fundus_top1"):  # a proportion of n queries: Wilson
            low, high = uncertainty.wilson(result["retrieval"][key] * n, n)
            ci.tree.setdefault("retrieval", {})[key] = {"low": round(low, 4), "high": round(high, 4)}
    if ci.weights is not None:
        result["ci95"] = ci.tree
        result["uncertainty"] = {"method": "stratified case bootstrap, percentile interval", "level": uncertainty.LEVEL,
                                 "replicates": settings.bootstrap, "seed": seed, "bins": settings.bins}
    return result, curves, ci.flat


def _per_symptom(dataset: str, modality: str, ranked: metrics.RankedPixels, bits: np.ndarray, hist,
                 ci: _Intervals) -> dict:
    """Table 13: each symptom against the anomaly-free pixels, other symptoms ignored (no new sort: ``ranked``)."""
    out = {}
    for class_id, symptom in symptoms.table(dataset, modality).items():
        own = (bits & np.uint16(1 << (class_id - 1))) > 0
        if not own.any():
            continue
        ignore = (bits > 0) & ~own
        symptom_only = ranked.against(own, ignore=ignore)
        exact = {"pixel_auroc": symptom_only.auroc(), "aupro": symptom_only.aupro()}
        out[str(class_id)] = {"name": symptom.name, "images": int(own.any(axis=(1, 2)).sum()),
                              **{k: round(v, 4) for k, v in exact.items()}}
        if hist is not None:  # the anomaly-free pixels are the same for every symptom: the histograms' own
            ci.pixel(("per_symptom", modality, str(class_id)), hist, own, exact)
    return out


def write_replicates(path: Path, replicates: dict[str, np.ndarray], case_ids: list[str], seed: int) -> None:
    """The bootstrap replicates as parquet: one column per metric, one row per resample; the metadata names the
    cases and the seed, so a paired comparison can check that two files resampled the same cases."""
    table = pa.table({name: pa.array(values, pa.float64()) for name, values in replicates.items()})
    table = table.replace_schema_metadata({"cases": compare.cases_digest(case_ids), "seed": str(seed)})
    pq.write_table(table, path)


def write_outputs(out: str | Path, result: dict, curves: dict, test: SplitData, predictions: Predictions,
                  replicates: dict[str, np.ndarray] | None = None, seed: int = 0, overlays: int = 8,
                  inputs: list[str | Path] = (), note: str = "") -> None:
    """metrics.json, scores.csv (per case), replicates.parquet, plots/*.csv and overlays/*.png under ``out``,
    atomically (never over ``inputs``, mmrad.core.outputs); ``note`` is printed on every overlay
    (``research_note``)."""
    with atomic_dir(out, inputs) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        if replicates:
            write_replicates(tmp / REPLICATES, replicates, test.case_ids, seed)
        (tmp / "plots").mkdir()
        title = methods.METHODS[result["method"]].title if result.get("method") in methods.METHODS else None
        for name, columns in curves.items():
            keys = [k for k in columns if k != "curve"]
            # the last column, `curve`, is the legend label of `dvc plots` ("MMRAD · AUC 0.931"), on every row
            label = " · ".join(part for part in (title, columns.get("curve")) if part) or name
            if "," in label or '"' in label:
                raise ValueError(f"curve label {label!r} would break the CSV")
            rows = zip(*(np.asarray(columns[k], dtype=float) for k in keys))
            lines = [",".join([*keys, "curve"])] + [",".join([*(f"{v:.6g}" for v in row), label]) for row in rows]
            (tmp / "plots" / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        keys = list(predictions.scores)
        lines = [",".join(["case_id", "label", *keys])] + [
            ",".join([case, str(int(test.labels[i])), *(f"{predictions.scores[k][i]:.8g}" for k in keys)])
            for i, case in enumerate(test.case_ids)]
        (tmp / "scores.csv").write_text("\n".join(lines) + "\n")
        (tmp / "overlays").mkdir()
        spec = methods.METHODS.get(result.get("method", methods.MAIN), methods.METHODS[methods.MAIN])
        save_overlays(test, predictions, tmp / "overlays", overlays, OverlayLabels(spec.title, spec.map_label, note))


def research_note(params: Params, method: str, dataset: str) -> str:
    """The warning every overlay of this run carries: "research use only" when the evaluated data set is the
    synthetic one (its root under a `synthetic` folder, params.yaml `datasets`) or the method's frozen networks
    are randomly initialised (no SAM / ResNet weights files: all of MMRAD's; a baseline's first ResNet); empty
    for real data with pretrained weights."""
    reasons = ["synthetic data"] if params.is_synthetic(dataset) else []
    resnets = list(params.weights.resnets)
    if methods.get(method).trained:
        random = params.weights.sam is None or len(resnets) < params.model.cnn_count or None in resnets
    else:
        random = not resnets or resnets[0] is None
    if random:
        reasons.append("random (not pretrained) weights")
    return f"Research use only: {', '.join(reasons)}. Not for clinical use." if reasons else ""


def run_evaluation(params: Params, method: str, prepared: str | Path, out: str | Path,
                   model_path: str | Path | None = None) -> dict:
    """The `evaluate`, `baseline` and `transfer` stages: one method of the registry on a prepared test split."""
    spec = methods.get(method)
    inputs = [prepared, *([model_path] if model_path else [])]
    check_output_folder(out, inputs)  # before the work, not after it
    test, predictions = getattr(scorers, spec.scorer)(params, prepared, model_path)
    result, curves, replicates = evaluate_predictions(test, predictions, params.evaluation, params.seed)
    result["method"] = method
    write_outputs(out, result, curves, test, predictions, replicates, params.seed, inputs=inputs,
                  note=research_note(params, method, test.dataset))
    log.info("evaluate %s: localisation %s, detection %s", method, result["localisation"], result["detection"])
    return result
