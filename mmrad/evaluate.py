"""Evaluation: anomaly maps and scores of a model on a prepared test split, turned into the paper's metrics.

One path for every method: MMRAD and the baselines each produce
``Predictions`` (a probability map per modality and image, scores per case),
and ``evaluate_predictions`` computes the same metrics from them:

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

``write_outputs`` saves metrics.json (for ``dvc metrics``), ROC / PRO curves as
CSV (for ``dvc plots``) and overlay PNGs of maps on images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from mmrad import metrics, symptoms  # noqa: E402
from mmrad.errors import DataError  # noqa: E402
from mmrad.io import atomic_dir  # noqa: E402
from mmrad.model import FUNDUS, MMRAD, OCT  # noqa: E402
from mmrad.prepare import read_manifest  # noqa: E402

log = logging.getLogger(__name__)

CURVE_POINTS = 200  # points kept per curve for plots (full curves have millions)


@dataclass
class SplitData:
    """A prepared test split, modality by modality, aligned by case."""

    dataset: str
    case_ids: list[str]
    labels: np.ndarray  # (N,) case level
    images: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (N, S, S, 3) uint8
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (N, S, S) uint16 bit masks


@dataclass
class Predictions:
    maps: dict[str, np.ndarray]  # modality -> (N, S, S) float32 anomaly probability
    scores: dict[str, np.ndarray]  # score name -> (N,) case scores
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (N, D) pooled, MMRAD only


def load_split(prepared: str | Path, split: str = "test") -> SplitData:
    """Images and bit masks of one split; paired datasets give both modalities per case."""
    prepared = Path(prepared)
    frame = read_manifest(prepared)
    frame = frame[frame.split == split]
    if frame.empty:
        raise DataError(prepared / "manifest.parquet", f"split '{split}' is empty")
    modalities = sorted(frame.modality.unique(), key=symptoms.MODALITIES.index)
    cases = sorted(frame.case_id.unique())
    by_key = frame.set_index(["case_id", "modality"])
    if len(by_key) != len(cases) * len(modalities):
        raise DataError(prepared / "manifest.parquet", "test cases must all have the same modalities")
    labels = frame.groupby("case_id").label.first().loc[cases].to_numpy(np.int64)
    test = SplitData(str(frame.dataset.iloc[0]), cases, labels)
    for modality in modalities:
        rows = [by_key.loc[(c, modality)] for c in cases]
        test.images[modality] = np.stack([np.asarray(Image.open(prepared / r.cache_image).convert("RGB"))
                                          for r in rows])
        size = test.images[modality].shape[1:3]
        test.masks[modality] = np.stack([
            np.zeros(size, np.uint16) if not isinstance(r.cache_mask, str)
            else np.asarray(Image.open(prepared / r.cache_mask), dtype=np.uint16) for r in rows])
    return test


@torch.inference_mode()
def predict_mmrad(model: MMRAD, test: SplitData, batch_size: int = 8) -> Predictions:
    """Paired maps and fusion score, plus single-modal scores (the map maximum), per case."""
    model.eval()
    device = next(model.parameters()).device
    modalities = list(test.images)
    maps = {m: [] for m in modalities}
    pooled: dict[str, list] = {m: [] for m in modalities}
    scores: dict[str, list] = {"fusion": [], **{f"{m}_only": [] for m in modalities}}
    for start in range(0, len(test.case_ids), batch_size):
        batch = {m: torch.from_numpy(test.images[m][start:start + batch_size]).permute(0, 3, 1, 2).float().to(device)
                 for m in modalities}
        out = model(**batch, pooled=True)
        for m in modalities:
            maps[m].append(torch.sigmoid(out[m]).float().cpu().numpy())
            pooled[m].append(out[f"{m}_pooled"].float().cpu().numpy())
            single = out if len(modalities) == 1 else model(**{m: batch[m]})
            scores[f"{m}_only"].append(torch.sigmoid(single["score"]).float().cpu().numpy())
        if len(modalities) == 2:
            scores["fusion"].append(torch.sigmoid(out["score"]).float().cpu().numpy())
    result = Predictions({m: np.concatenate(v) for m, v in maps.items()},
                         {k: np.concatenate(v) for k, v in scores.items() if v},
                         {m: np.concatenate(v) for m, v in pooled.items()})
    return with_combined_scores(result)


def with_combined_scores(predictions: Predictions) -> Predictions:
    """Add the max / mean of the per-modality image scores (Table 12; the baselines' detection score)."""
    singles = [v for k, v in predictions.scores.items() if k.endswith("_only")]
    if len(singles) == 2:
        predictions.scores["max"] = np.maximum(*singles)
        predictions.scores["mean"] = (singles[0] + singles[1]) / 2
    return predictions


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


def save_overlays(test: SplitData, predictions: Predictions, folder: Path, count: int = 8) -> list[Path]:
    """PNG per case: each modality's image, ground-truth outline and anomaly map, for a sample of cases."""
    anomalous = [i for i in range(len(test.labels)) if test.labels[i] == 1]
    normal = [i for i in range(len(test.labels)) if test.labels[i] == 0]
    chosen = anomalous[: max(1, count - 2)] + normal[:2]
    modalities = list(predictions.maps)
    # One colour scale per method and modality: baselines' maps are distances, not probabilities.
    top = {m: float(np.percentile(predictions.maps[m], 99.9)) or 1.0 for m in modalities}
    paths = []
    for i in chosen:
        main = predictions.scores.get("fusion", predictions.scores.get("max"))
        title = f"{test.case_ids[i]}: {'anomalous' if test.labels[i] else 'normal'} case"
        if main is not None:
            title += f", case score {main[i]:.2f}"
        paths.append(plot_case(
            folder / f"{test.case_ids[i]}.png", title,
            images={m: test.images[m][i] for m in modalities}, maps={m: predictions.maps[m][i] for m in modalities},
            vmax=top, scores={m: predictions.scores.get(f"{m}_only", [np.nan] * len(test.labels))[i]
                              for m in modalities},
            truths={m: test.masks[m][i] > 0 for m in modalities}))
    return paths


def plot_case(path: Path, title: str, images: dict, maps: dict, vmax: dict, scores: dict,
              truths: dict | None = None) -> Path:
    """One case as a PNG: per modality the image (with the truth outline when known) and its anomaly map."""
    modalities = list(maps)
    fig, axes = plt.subplots(1, 2 * len(modalities), figsize=(4.2 * len(modalities) * 2, 4.4), dpi=90)
    for j, m in enumerate(modalities):
        image, amap = images[m], maps[m]
        gt = truths[m] if truths is not None else None
        axes[2 * j].imshow(image)
        if gt is not None and gt.any():
            axes[2 * j].contour(gt.astype(float), levels=[0.5], colors=["#00e5ff"], linewidths=0.8)
        axes[2 * j].set_title(f"{m}: image, truth (cyan)" if truths is not None else f"{m}: image", fontsize=9)
        axes[2 * j + 1].imshow(image)
        shown = axes[2 * j + 1].imshow(amap, cmap="jet", alpha=0.45, vmin=0, vmax=vmax[m])
        if gt is not None and gt.any():
            axes[2 * j + 1].contour(gt.astype(float), levels=[0.5], colors=["white"], linewidths=0.6)
        axes[2 * j + 1].set_title(f"{m}: anomaly map (image score {scores[m]:.2f})", fontsize=9)
        fig.colorbar(shown, ax=axes[2 * j + 1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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


def run_mmrad(params, model_path: str | Path, prepared: str | Path, out: str | Path) -> dict:
    """The `evaluate` stage: the fine-tuned model on the prepared test split."""
    from mmrad.train import load_finetuned

    test = load_split(prepared)
    model = load_finetuned(model_path, params)
    predictions = predict_mmrad(model, test)
    result, curves = evaluate_predictions(test, predictions)
    result["method"] = "mmrad"
    write_outputs(out, result, curves, test, predictions)
    log.info("evaluate mmrad: localisation %s, detection %s", result["localisation"], result["detection"])
    return result


def run_baseline(params, method: str, prepared: str | Path, out: str | Path) -> dict:
    """A `baseline` stage: PaDiM or PatchCore fitted per modality on the healthy training images.

    Uses the same CNN family (and, when configured, the same weights file) as
    MMRAD's first LPT trunk; the case score is the max of both modalities'
    image scores, as the paper does for every comparison method.
    """
    from mmrad import baselines

    weights = params.weights.resnets[0] if params.weights.resnets else None
    weights = (weights.path, weights.format) if weights is not None else None
    train, test = load_split(prepared, "train"), load_split(prepared, "test")
    maps, scores = {}, {}
    for modality in test.images:
        if method == "padim":
            model = baselines.PaDiM(baselines.PaDiMConfig(cnn=params.model.cnn, seed=params.seed,
                                                          channels=params.baselines.padim_channels), weights=weights)
        elif method == "patchcore":
            model = baselines.PatchCore(baselines.PatchCoreConfig(
                cnn=params.model.cnn, seed=params.seed, coreset_ratio=params.baselines.patchcore_coreset_ratio),
                weights=weights)
        else:
            raise DataError(method, "unknown baseline", "known: padim, patchcore")
        model.fit(train.images[modality])
        maps[modality], scores[f"{modality}_only"] = model.score(test.images[modality])
    predictions = with_combined_scores(Predictions(maps, scores))
    result, curves = evaluate_predictions(test, predictions)
    result["method"] = method
    write_outputs(out, result, curves, test, predictions)
    log.info("evaluate %s: localisation %s, detection %s", method, result["localisation"], result["detection"])
    return result
