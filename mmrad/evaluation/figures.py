"""Curve figures (PNG) from the evaluation's curve files: what the MLflow run shows beside the CSVs.

``dvc plots show`` draws the same curves interactively from the same CSVs
(dvc.yaml's top-level ``plots``); these static figures are for places without
Vega: the MLflow UI's artifact view, a report, an e-mail. One figure per
curve (pixel ROC and PRO per modality, detection ROC), every method that
wrote it in one colour each, the legend naming the method and its area, its
pointwise 95 % band (case bootstrap) shaded; and the training loss per step.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mmrad.evaluation.methods import METHODS  # noqa: E402

# (file stem, title, x label, y label, chance diagonal)
CURVES = (
    ("roc_fundus", "Pixel ROC, fundus", "false-positive rate (pixels)", "true-positive rate (pixels)", True),
    ("roc_oct", "Pixel ROC, OCT", "false-positive rate (pixels)", "true-positive rate (pixels)", True),
    ("pro_fundus", "PRO curve, fundus (FPR <= 0.3)", "false-positive rate (pixels)", "per-region overlap", False),
    ("pro_oct", "PRO curve, OCT (FPR <= 0.3)", "false-positive rate (pixels)", "per-region overlap", False),
    ("roc_detection", "Case detection ROC (each method's main score)", "false-positive rate (cases)",
     "true-positive rate (cases)", True),
)
LOSS_PARTS = {"loss": "total", "fundus": "fundus map", "oct": "OCT map", "score": "case score"}  # loss.tsv's columns
COLOURS = ("#1b6ca8", "#d9822b", "#2a9d4b", "#8e44ad", "#c0392b")  # one per method, in the registry's order


def read_curve(path: Path) -> dict:
    """One curve CSV: ``x``, ``y`` (its first two columns), ``band`` ((low, high) or None: the pointwise 95 %
    interval) and ``label`` (the ``curve`` column, or None)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {"x": [], "y": [], "band": None, "label": None}
    numeric = [k for k in rows[0] if k not in ("curve", "low", "high")]
    band = ([float(r["low"]) for r in rows], [float(r["high"]) for r in rows]) if "low" in rows[0] else None
    return {"x": [float(r[numeric[0]]) for r in rows], "y": [float(r[numeric[1]]) for r in rows], "band": band,
            "label": rows[0].get("curve")}


def _new(title: str, xlabel: str, ylabel: str) -> tuple[Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(6.0, 5.0), dpi=100)
    ax.set_title(title, fontsize=12)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(alpha=0.3)
    return fig, ax


def curve_figures(reports: str | Path) -> dict[str, Figure]:
    """{file name: figure} of every curve some method under ``reports/<method>/plots`` wrote."""
    reports = Path(reports)
    figures = {}
    for stem, title, xlabel, ylabel, diagonal in CURVES:
        found = [(m, reports / m / "plots" / f"{stem}.csv") for m in METHODS]
        found = [(m, p) for m, p in found if p.is_file()]
        if not found:
            continue
        fig, ax = _new(title, xlabel, ylabel)
        if diagonal:
            ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="chance")
        for name, path in found:
            curve = read_curve(path)
            colour = COLOURS[list(METHODS).index(name) % len(COLOURS)]
            if curve["band"] is not None:  # the pointwise 95 % interval over case resamples, under the curve
                ax.fill_between(curve["x"], *curve["band"], color=colour, alpha=0.15, linewidth=0, step="post")
            ax.plot(curve["x"], curve["y"], color=colour, linewidth=2, label=curve["label"] or METHODS[name].title)
        ax.set_xlim(0, 1 if diagonal else 0.3)  # the PRO curves stop at FPR 0.3 (the AU-PRO's range)
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower right", fontsize=10)
        fig.tight_layout()
        figures[f"{stem}.png"] = fig
    return figures


def loss_figure(loss_tsv: str | Path) -> Figure | None:
    """The training loss per step (total and its parts), or None without a loss file."""
    loss_tsv = Path(loss_tsv)
    if not loss_tsv.is_file():
        return None
    with loss_tsv.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        return None
    fig, ax = _new("Training loss", "training step", "loss")
    steps = [int(r["step"]) for r in rows]
    for key in (k for k in rows[0] if k != "step"):
        ax.plot(steps, [float(r[key]) for r in rows], linewidth=2 if key == "loss" else 1,
                label=LOSS_PARTS.get(key, key))
    ax.set_yscale("log")
    ax.legend(fontsize=10)
    fig.tight_layout()
    return fig
