"""Curve figures for the MLflow run (mmrad.evaluation.figures): one colour per method, labelled, from the CSVs."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import pytest

from mmrad.evaluation.figures import curve_figures, loss_figure


def _curve(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_each_curve_is_one_figure_with_every_method_in_its_own_colour(tmp_path):
    _curve(tmp_path / "mmrad" / "plots" / "roc_fundus.csv", ["fpr", "tpr", "low", "high", "curve"],
           [(0, 0, 0, 0, "MMRAD · AUC 0.930"), (0.5, 0.9, 0.8, 0.95, "MMRAD · AUC 0.930"),
            (1, 1, 1, 1, "MMRAD · AUC 0.930")])
    _curve(tmp_path / "padim" / "plots" / "roc_fundus.csv", ["fpr", "tpr"], [(0, 0), (1, 1)])  # an older file
    _curve(tmp_path / "padim" / "plots" / "pro_oct.csv", ["fpr", "pro"], [(0, 0), (0.3, 0.7)])
    figures = curve_figures(tmp_path)
    assert set(figures) == {"roc_fundus.png", "pro_oct.png"}  # only what some method wrote
    ax = figures["roc_fundus.png"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["chance", "MMRAD · AUC 0.930", "PaDiM"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["MMRAD · AUC 0.930"].get_color() != lines["PaDiM"].get_color()
    assert list(lines["MMRAD · AUC 0.930"].get_ydata()) == [0, 0.9, 1]
    (band,) = ax.collections  # the band of the curve that has one (the older PaDiM file has none)
    assert band.get_facecolor()[0][:3] == pytest.approx(matplotlib.colors.to_rgb(lines["MMRAD · AUC 0.930"].get_color()))
    assert ax.get_xlabel() == "false-positive rate (pixels)" and ax.get_ylabel() == "true-positive rate (pixels)"
    pro = figures["pro_oct.png"].axes[0]
    assert pro.get_xlim() == (0, 0.3) and pro.get_ylabel() == "per-region overlap" and "chance" not in [
        t.get_text() for t in pro.get_legend().get_texts()]
    for figure in figures.values():
        plt.close(figure)


def test_the_loss_figure_names_the_parts_and_needs_a_loss_file(tmp_path):
    assert loss_figure(tmp_path / "loss.tsv") is None
    (tmp_path / "loss.tsv").write_text("step\tloss\tfundus\toct\tscore\n1\t2.0\t0.7\t0.6\t0.7\n2\t1.0\t0.5\t0.4\t0.1\n")
    figure = loss_figure(tmp_path / "loss.tsv")
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["total", "fundus map", "OCT map", "case score"]
    assert ax.get_xlabel() == "training step" and ax.get_yscale() == "log"
    plt.close(figure)
