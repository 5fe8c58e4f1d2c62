"""Overlays a reader takes in without help: one labelled scale per modality, named lesions, the threshold, the note."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from mmrad.core.params import Params
from mmrad.data.splits import SplitData
from mmrad.evaluation import plots
from mmrad.evaluation.evaluate import research_note
from mmrad.evaluation.inference import Predictions, with_combined_scores
from tests.conftest import tiny_params_dict

NOTE = "Research use only: synthetic data, random (not pretrained) weights. Not for clinical use."


def _case_data(size: int = 24) -> tuple[SplitData, Predictions]:
    """Three anomalous cases (one with a lesion in the fundus only), two normal; map ranges that differ by case."""
    rng = np.random.default_rng(0)
    n = 5
    masks = {m: np.zeros((n, size, size), np.uint16) for m in ("fundus", "oct")}
    masks["fundus"][0, 4:9, 4:9] = 1 << 3  # Retinal haemorrhage
    masks["fundus"][0, 12:16, 12:16] = 1 << 4  # Cotton-wool spots
    masks["oct"][0, 10:12, 2:20] = 1 << 2  # Subretinal fluid
    masks["fundus"][1, 2:6, 2:6] = 1 << 0  # Retinal whitening; its OCT shows nothing
    masks["oct"][2, 5:8, 5:8] = 1 << 6  # Intraretinal fluid
    images = {m: rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8) for m in masks}
    maps = {m: (rng.random((n, size, size)) * np.arange(1, n + 1)[:, None, None] * (1 if m == "fundus" else 30))
            .astype(np.float32) for m in masks}
    scores = {f"{m}_only": maps[m].reshape(n, -1).max(1) for m in maps}
    scores["fusion"] = np.array([0.9, 0.7, 0.4, 0.2, 0.5])
    return (SplitData("mmr", [f"case{i}" for i in range(n)], np.array([1, 1, 1, 0, 0]), images, masks),
            with_combined_scores(Predictions(maps, scores)))


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """save_overlays' calls of plot_case, by case, without drawing."""
    calls = {}

    def record(path, title, **kwargs):
        calls[path.stem] = {"title": title, **kwargs}
        return path

    monkeypatch.setattr(plots, "plot_case", record)
    test, predictions = _case_data()
    plots.save_overlays(test, predictions, tmp_path, 8, plots.OverlayLabels("PaDiM", "anomaly score (x)", NOTE))
    return calls, test, predictions


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.texts] + [ax.get_title(loc="left") for ax in fig.axes] + \
        [ax.get_ylabel() for ax in fig.axes]


def test_every_case_of_a_modality_shares_one_scale(recorded):
    calls, test, predictions = recorded
    assert sorted(calls) == test.case_ids  # 3 anomalous + 2 normal
    for m in ("fundus", "oct"):
        tops = {c["vmax"][m] for c in calls.values()}
        lows = {c["vmin"][m] for c in calls.values()}
        assert len(tops) == len(lows) == 1
        assert tops.pop() == pytest.approx(float(np.percentile(predictions.maps[m], plots.SCALE_PERCENTILE)))
        assert lows.pop() == pytest.approx(float(np.median(predictions.maps[m])))
    assert calls["case0"]["vmax"]["oct"] > 10 * calls["case0"]["vmax"]["fundus"]  # per modality, not one for all
    assert all(c["map_label"] == "anomaly score (x)" and c["note"] == NOTE for c in calls.values())


def test_titles_name_the_symptoms_and_the_threshold(recorded):
    calls, _, _ = recorded
    assert calls["case0"]["lesions"] == {"fundus": ["Retinal haemorrhage", "Cotton-wool spots"],
                                         "oct": ["Subretinal fluid"]}
    assert calls["case1"]["lesions"]["oct"] == [] and not calls["case1"]["truths"]["oct"].any()
    title = calls["case0"]["title"]
    assert title.startswith("Case case0: annotated anomalous case")
    # the main score of a pair is the fusion token; 95 % specificity on 2 normals: their max, 0.5
    assert "PaDiM case score 0.9 (fusion-token probability): ABOVE the flag threshold 0.5" in title
    assert "95% specificity on the 2 normal test cases); higher than 2 of the 2" in title
    assert "not above the flag threshold 0.5" in calls["case2"]["title"]


def test_a_rendered_case_says_what_it_shows():
    test, predictions = _case_data()
    fig = plots.render_case(
        "Case case1", {m: test.images[m][1] for m in test.images}, {m: predictions.maps[m][1] for m in test.images},
        vmax={"fundus": 2.0, "oct": 60.0}, vmin={"fundus": 0.5, "oct": 1.0}, scores={"fundus": 0.8, "oct": 0.1},
        truths={m: test.masks[m][1] > 0 for m in test.masks},
        lesions={"fundus": ["Retinal whitening"], "oct": []}, map_label="anomaly probability", note=NOTE)
    texts = _texts(fig)
    assert "Fundus: anomalous: Retinal whitening (cyan outline)" in texts
    assert "OCT: no annotated lesion" in texts and "OCT B-scan\nno annotated lesion" in texts
    assert "Fundus photograph\ncyan outline: annotated lesion" in texts
    assert not any("cyan" in t for t in texts if t.startswith("OCT"))  # no outline is named where there is none
    assert NOTE in texts
    bars = [ax for ax in fig.axes if ax.get_ylabel()]
    assert [ax.get_ylabel() for ax in bars] == ["anomaly probability"] * 2
    maps = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "inferno_ramp"]
    assert [(im.norm.vmin, im.norm.vmax) for im in maps] == [(0.5, 2.0), (1.0, 60.0)]
    # the truth outline: the colour the titles name, on the image and on the map panel alike
    outlines = [c for ax in fig.axes for c in ax.collections if type(c).__name__ == "QuadContourSet"]
    assert len(outlines) == 2
    assert all(np.allclose(c.get_edgecolor()[0], to_rgba(plots.TRUTH_COLOUR)) for c in outlines)
    assert plots.TRUTH_NAME == "cyan"
    assert all(t.get_fontsize() >= 11 for t in fig.texts)
    assert all(ax.title.get_fontsize() >= 11 or not ax.get_title() for ax in fig.axes)


def test_low_values_are_transparent_and_the_map_perceptually_uniform():
    cmap = plots.overlay_cmap()
    alpha = cmap(np.linspace(0, 1, 11))[:, 3]
    assert alpha[0] == 0 and alpha[1] == 0 and alpha[-1] == pytest.approx(plots.MAX_ALPHA)
    assert np.all(np.diff(alpha) >= 0)
    assert np.allclose(cmap(0.7)[:3], plots.matplotlib.colormaps["inferno"](0.7)[:3], atol=1e-2)


def test_symptom_names_and_thresholds():
    bits = np.array([[0b1001, 0], [0, 0b1]], np.uint16)
    assert plots.symptom_names("mmr", "fundus", bits) == ["Retinal whitening", "Retinal haemorrhage"]
    assert plots.symptom_names("mmr", "oct", np.zeros((2, 2), np.uint16)) == []
    assert plots.symptom_names("predict", "fundus", bits) == ["class 1", "class 4"]
    normals = np.arange(1, 21, dtype=float)  # 20 normal cases: 19 of them at or below the threshold
    labels = np.r_[np.zeros(20), np.ones(3)]
    assert plots.operating_threshold(np.r_[normals, [5, 30, 40]], labels) == 19.0
    assert plots.operating_threshold(np.ones(3), np.ones(3)) is None
    assert plots.main_score({"oct_only": np.ones(2)}) == ("oct_only", "OCT image score, the map maximum")


def test_png_is_deterministic_small_and_without_metadata(tmp_path):
    test, predictions = _case_data(size=64)
    args = dict(images={m: test.images[m][0] for m in test.images}, maps={m: predictions.maps[m][0] for m in test.images},
                vmax={"fundus": 1.0, "oct": 30.0}, scores={"fundus": 0.5, "oct": 3.0},
                truths={m: test.masks[m][0] > 0 for m in test.masks}, note=NOTE)
    first = plots.plot_case(tmp_path / "a.png", "Case a", **args).read_bytes()
    assert plots.plot_case(tmp_path / "b.png", "Case a", **args).read_bytes() == first
    image = Image.open(io.BytesIO(first))
    assert image.mode == "RGB" and not image.info.keys() & {"Software", "Creation Time", "date:create"}
    assert image.size[0] > 2 * image.size[1] and len(first) < 400_000


def test_the_note_follows_the_data_and_the_weights(tiny_params):
    assert research_note(tiny_params, "mmrad", "mmr") == NOTE  # the default: synthetic data, no weight files
    real = {name: {"root": f"data/raw/real/{name}"} for name in ("mmr", "idrid", "resc")}
    sam = {"path": "weights/sam.pth", "format": "sam"}
    resnet = {"path": "weights/resnet50.pth", "format": "torchvision"}
    pretrained = Params.model_validate(tiny_params_dict(datasets=real, weights={"sam": sam, "resnets": [resnet] * 2}))
    assert research_note(pretrained, "mmrad", "mmr") == ""
    half = Params.model_validate(tiny_params_dict(datasets=real, weights={"sam": None, "resnets": [resnet]}))
    assert research_note(half, "mmrad", "MMR") == "Research use only: random (not pretrained) weights. Not for " \
                                                  "clinical use."
    assert research_note(half, "padim", "mmr") == ""  # a baseline uses the first ResNet only
    synthetic_real_weights = Params.model_validate(tiny_params_dict(weights={"sam": sam, "resnets": [resnet] * 2}))
    assert research_note(synthetic_real_weights, "patchcore", "idrid") == \
        "Research use only: synthetic data. Not for clinical use."
