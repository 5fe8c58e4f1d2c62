"""`dvc plots show` of this project: offline, one plot per comparison, the legend naming method and area.

A temporary git + DVC repository holds the project's dvc.yaml, params.yaml, .dvc/config, the
templates of .dvc/plots, the page template (infra/plots/template.html, Vega inline) and the
committed curve files (reports/*/plots/*.csv, models/*/loss.tsv); `dvc plots show -o` renders
them, no pipeline run. A curve file written before the `curve` column existed gets the column
here, from its metrics.json, the way mmrad.evaluation.evaluate writes it. No node, no browser.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmrad.evaluation.methods import METHODS
from tests.conftest import PROJECT

# plot id (dvc.yaml) -> title, x label, y label, template
EXPECTED = {
    "pixel_roc_fundus": ("Pixel ROC, fundus", "false-positive rate (pixels)", "true-positive rate (pixels)", "curves"),
    "pixel_roc_oct": ("Pixel ROC, OCT", "false-positive rate (pixels)", "true-positive rate (pixels)", "curves"),
    "pro_fundus": ("PRO curve, fundus (FPR ≤ 0.3)", "false-positive rate (pixels)", "per-region overlap (PRO)", "curves"),
    "pro_oct": ("PRO curve, OCT (FPR ≤ 0.3)", "false-positive rate (pixels)", "per-region overlap (PRO)", "curves"),
    "detection_roc": ("Case-level detection ROC (each method's main score)", "false-positive rate (cases)",
                      "true-positive rate (cases)", "curves"),
    "transfer_roc_idrid": ("Transfer to IDRiD, pixel ROC (fundus)", "false-positive rate (pixels)",
                           "true-positive rate (pixels)", "transfer"),
    "transfer_roc_resc": ("Transfer to RESC, pixel ROC (OCT)", "false-positive rate (pixels)",
                          "true-positive rate (pixels)", "transfer"),
    "training_loss": ("Training loss", "training step", "loss", "loss"),
}
SPEC = re.compile(r'<div id = "(?P<id>[^"]+)">\s*<script type = "text/javascript">\s*var spec = (?P<spec>\{.*?\});\s*'
                  r"vegaEmbed\(", re.S)


def legend_label(csv_path: Path, metrics: dict) -> str:
    """What mmrad.evaluation.evaluate writes into `curve` for this file (method title · its area)."""
    title = METHODS[metrics.get("method", "mmrad")].title
    kind, modality = csv_path.stem.split("_", 1)
    if modality == "detection":
        main = "fusion" if "fusion" in metrics["detection"] else next(iter(metrics["detection"]))
        return f"{title} · AUC {metrics['detection'][main]:.3f} ({main.replace('_', ' ')})"
    key, name = ("pixel_auroc", "AUC") if kind == "roc" else ("aupro", "AU-PRO")
    return f"{title} · {name} {metrics['localisation'][modality][key]:.3f}"


def copy_curves(root: Path) -> list[Path]:
    """The committed curve files into ``root``; adds `curve` where the committed file predates it."""
    copied = []
    for source in sorted([*PROJECT.glob("reports/**/plots/*.csv"), *PROJECT.glob("models/*/loss.tsv")]):
        target = root / source.relative_to(PROJECT)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = source.read_text(encoding="utf-8")
        if source.suffix == ".csv" and "curve" not in text.splitlines()[0].split(","):
            metrics = json.loads((source.parent.parent / "metrics.json").read_text())
            label = legend_label(source, metrics)
            text = "".join(f"{line},{'curve' if i == 0 else label}\n" for i, line in enumerate(text.splitlines()))
        target.write_text(text, encoding="utf-8")
        copied.append(target)
    return copied


def make_repo(root: Path) -> tuple[dict, str]:
    """A git + DVC repository with the project's plot configuration and curve files: (env, dvc)."""
    root.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).parent / "dvc")
    for args in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(args, cwd=root, env=env, check=True, capture_output=True)
    for name in ("dvc.yaml", "params.yaml", ".dvc/config", "infra/plots/template.html"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT / name, root / name)
    shutil.copytree(PROJECT / ".dvc" / "plots", root / ".dvc" / "plots")
    copy_curves(root)
    return env, dvc


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[str, dict[str, dict]]:
    """(index.html, {plot id: its filled Vega-Lite spec}) of `dvc plots show -o`."""
    root = tmp_path_factory.mktemp("plots") / "repo"
    env, dvc = make_repo(root)
    out = root / "html"
    result = subprocess.run([dvc, "plots", "show", "-o", str(out)], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (out / "index.html").read_text(encoding="utf-8")
    return page, {m["id"]: json.loads(m["spec"]) for m in SPEC.finditer(page)}


def test_the_page_needs_no_network(rendered):
    page, _ = rendered
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)  # every script is inline
    assert "cdn" not in page.lower() and "jsdelivr" not in page.lower()
    for name, version in (("vega", "5."), ("vega-lite", "5."), ("vega-embed", "6.")):
        assert re.search(rf'<script data-package="{name}@{re.escape(version)}\d+\.\d+" data-sha256="[0-9a-f]{{64}}">', page)
    assert page.count("Redistribution and use in source and binary forms") == 3  # the three BSD-3 notices


def test_the_vendored_page_matches_its_lock():
    result = subprocess.run([sys.executable, str(PROJECT / "scripts" / "vendor-vega.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lock = json.loads((PROJECT / "infra" / "plots" / "vega.lock.json").read_text())
    assert [(n, e["version"].split(".")[0]) for n, e in lock.items()] == [("vega", "5"), ("vega-lite", "5"),
                                                                         ("vega-embed", "6")]
    assert all(e["integrity"].startswith("sha512-") for e in lock.values())


def test_the_check_catches_an_edited_page(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("vendor_vega", PROJECT / "scripts" / "vendor-vega.py")
    vendor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vendor)
    page = tmp_path / "template.html"
    text = vendor.PAGE.read_text(encoding="utf-8")
    page.write_text(text.replace('"use strict";', '"use strict"; ', 1), encoding="utf-8")  # one byte of Vega
    monkeypatch.setattr(vendor, "PAGE", page)
    assert [p for p in vendor.check() if "sha256 differs" in p]
    page.write_text(text.replace("<main>", '<main><script src="https://example.org/vega.js"></script>'), encoding="utf-8")
    assert [p for p in vendor.check() if "loads a script" in p]


def test_default_html_template_is_the_vendored_page():
    config = (PROJECT / ".dvc" / "config").read_text()
    (relative,) = re.findall(r"^\s*html_template\s*=\s*(\S+)\s*$", config, re.M)
    assert (PROJECT / ".dvc" / relative).resolve() == (PROJECT / "infra" / "plots" / "template.html").resolve()


def test_exactly_the_declared_plots(rendered):
    _, specs = rendered
    assert set(specs) == set(EXPECTED)  # no per-file plot of a curve against its row index
    for plot_id, (title, x_label, y_label, _) in EXPECTED.items():
        spec = specs[plot_id]
        assert spec["title"]["text"] == title
        encodings = [layer["encoding"] for layer in spec["layer"] if layer["mark"]["type"] == "line"]
        assert len(encodings) == 1
        assert (encodings[0]["x"]["title"], encodings[0]["y"]["title"]) == (x_label, y_label)


def test_declared_plots_match_dvc_yaml():
    """dvc.yaml: no stage declares plots (its curve folders are plain outs); top-level plots are EXPECTED."""
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    assert not [name for name, stage in pipeline["stages"].items() if "plots" in stage.get("do", stage)]
    declared = {next(iter(p)): next(iter(p.values())) for p in pipeline["plots"]}
    assert set(declared) == set(EXPECTED)
    for plot_id, (title, x_label, y_label, template) in EXPECTED.items():
        props = declared[plot_id]
        assert (props["title"], props["x_label"], props["y_label"], props["template"]) == (title, x_label, y_label,
                                                                                           template)
        assert (PROJECT / ".dvc" / "plots" / f"{template}.json").is_file()


def test_one_colour_per_curve_labelled_by_the_curve_column(rendered):
    page, specs = rendered
    plots = page[page.index("<main>"):]  # the plots, after the inlined libraries (Vega's code knows "smooth")
    assert "smooth" not in plots.lower() and "smooth" not in json.dumps(specs).lower()  # DVC's default slider
    for plot_id, spec in specs.items():
        (line,) = [layer for layer in spec["layer"] if layer["mark"]["type"] == "line"]
        assert line["encoding"]["color"]["field"] == "curve"
        assert "strokeDash" not in line["encoding"]
        assert not [p for p in [*spec.get("params", []), *line.get("params", [])] if "smooth" in json.dumps(p)]
        labels = {row["curve"] for row in spec["data"]["values"]} if plot_id != "training_loss" else set()
        if EXPECTED[plot_id][3] == "curves":  # one curve per method, each legend label naming it
            assert len(labels) == 3
            assert {label.split(" · ")[0] for label in labels} == {m.title for m in METHODS.values()}
            assert all(re.fullmatch(r".+ · (AUC|AU-PRO) [01]\.\d{3}( \(.+\))?", label) for label in labels)
    assert len({row["filename"] for row in specs["training_loss"]["data"]["values"]}) == 3


def test_roc_plots_draw_the_chance_line(rendered):
    _, specs = rendered
    for plot_id in ("pixel_roc_fundus", "pixel_roc_oct", "detection_roc", "transfer_roc_idrid"):
        rules = [layer for layer in specs[plot_id]["layer"] if layer["mark"]["type"] == "rule"]
        assert len(rules) == 1 and rules[0]["mark"]["strokeDash"]


def test_committed_curve_csvs_are_the_ones_drawn():
    """Every CSV a stage writes under plots/ is drawn by some top-level plot, except the transfer PRO and
    detection curves (Table 11 compares pixel ROC)."""
    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    drawn = {path for p in pipeline["plots"] for path in next(iter(p.values()))["y"]}
    written = {p.relative_to(PROJECT).as_posix() for p in PROJECT.glob("reports/**/plots/*.csv")}
    assert {p for p in written if not p.startswith("reports/transfer/")} <= drawn
    assert drawn - written <= {p for p in drawn if p.endswith("loss.tsv")}



def test_curves_carry_their_pointwise_95_percent_band(rendered):
    _, specs = rendered
    for plot_id, (_, _, _, template) in EXPECTED.items():
        if template not in ("curves", "transfer"):
            continue
        spec = specs[plot_id]
        (area,) = [layer for layer in spec["layer"] if layer["mark"]["type"] == "area"]
        assert area["encoding"]["y"]["field"] == "low" and area["encoding"]["y2"]["field"] == "high"
        assert area["encoding"]["color"]["field"] == "curve" and area["mark"]["opacity"] < 0.5
        rows = spec["data"]["values"]
        assert rows and all(float(r["low"]) <= float(r["high"]) for r in rows), plot_id  # the CSVs' band columns
