"""Overlay figures: a case's images with the truth outline and the anomaly map, per modality."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window (servers and CI have no display)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mmrad.data.splits import SplitData  # noqa: E402
from mmrad.evaluation.inference import Predictions  # noqa: E402


def save_overlays(test: SplitData, predictions: Predictions, folder: Path, count: int) -> list[Path]:
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
