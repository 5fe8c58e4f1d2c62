"""Tests of the synthetic OCT B-scan renderer (mmrad.synthetic.phantom.oct)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from mmrad.data.symptoms import MMR_OCT, OCT_KINDS, RESC_LESIONS
from mmrad.synthetic.phantom.eye import Eye
from mmrad.synthetic.phantom.oct import render_oct

MMR_SIZE = (434, 768)
RESC_SIZE = (512, 512)
RESC_ONLY = {"retinal_edema", "pigment_epithelial_detachment"}


def _target(kind: str) -> float:
    for table in (MMR_OCT, RESC_LESIONS):
        for s in table.values():
            if s.kind == kind:
                return s.target_fraction
    raise KeyError(kind)


def _style_size(kind: str) -> tuple[str, tuple[int, int]]:
    return ("cirrus", RESC_SIZE) if kind in RESC_ONLY else ("spectralis", MMR_SIZE)


def _retina_rows(retina: np.ndarray, col: int) -> int:
    """Retinal thickness (rows) in one column."""
    return int(retina[:, col].sum())


# ----------------------------------------------------------------- basics


@pytest.mark.parametrize("style,size", [("spectralis", MMR_SIZE), ("cirrus", RESC_SIZE)])
def test_shape_dtype_and_anatomy(style, size):
    r = render_oct(Eye.sample(1), size, style=style)
    assert r.image.shape == size and r.image.dtype == np.uint8
    assert r.lesions == {}
    retina = r.anatomy["retina"]
    assert retina.shape == size and retina.dtype == bool
    # The retina is a single band per column (ILM to RPE), present in every column.
    assert (retina.sum(axis=0) > 0).all()


@pytest.mark.parametrize("size", [(128, 128), (868, 1536)])
def test_extreme_sizes(size):
    r = render_oct(Eye.sample(2), size, lesions=("subretinal_fluid", "intraretinal_fluid", "prominent_mlm"))
    assert r.image.shape == size
    assert all(m.shape == size and m.any() for m in r.lesions.values())
    assert r.image.std() > 5  # not blank


def test_determinism_and_seed_dependence():
    eye = Eye.sample(11)
    a = render_oct(eye, MMR_SIZE, OCT_KINDS)
    b = render_oct(eye, MMR_SIZE, OCT_KINDS)
    assert a.image.tobytes() == b.image.tobytes()
    assert all(np.array_equal(a.lesions[k], b.lesions[k]) for k in OCT_KINDS)
    c = render_oct(Eye.sample(12), MMR_SIZE, OCT_KINDS)
    assert a.image.tobytes() != c.image.tobytes()


def test_unknown_kind_and_style():
    with pytest.raises(ValueError, match="drusen"):
        render_oct(Eye.sample(0), MMR_SIZE, ["drusen"])
    with pytest.raises(ValueError, match="topcon"):
        render_oct(Eye.sample(0), MMR_SIZE, style="topcon")


# ----------------------------------------------------------------- healthy anatomy


def test_vitreous_darker_than_rpe():
    r = render_oct(Eye.sample(3), MMR_SIZE)
    img, retina = r.image.astype(float), r.anatomy["retina"]
    top = int(np.argmax(retina.any(axis=1)))  # first row that touches the retina
    vitreous = img[: max(top - 5, 1)]
    # The RPE: the last few retinal rows of every column.
    bottom = retina.shape[0] - 1 - np.argmax(retina[::-1], axis=0)
    cols = np.arange(retina.shape[1])
    rpe = np.concatenate([img[bottom - d, cols] for d in range(1, 4)])
    assert vitreous.mean() < 15
    assert rpe.mean() > vitreous.mean() + 100


def test_foveal_pit_and_offset():
    eye = dataclasses.replace(Eye.sample(4), fovea_offset=(0.0, 0.0))
    W = MMR_SIZE[1]
    retina = render_oct(eye, MMR_SIZE).anatomy["retina"]
    centre, quarter = W // 2, W // 2 + W // 4
    assert _retina_rows(retina, centre) < 0.85 * _retina_rows(retina, quarter)
    thickness = retina.sum(axis=0).astype(float)
    # Thinnest point (smoothed) is near the fovea ...
    pit = int(np.argmin(np.convolve(thickness, np.ones(9) / 9, "same")[W // 4 : 3 * W // 4])) + W // 4
    assert abs(pit - centre) < 0.04 * W
    # ... and fovea_offset moves it.
    moved = dataclasses.replace(eye, fovea_offset=(0.1, 0.0))
    thickness2 = render_oct(moved, MMR_SIZE).anatomy["retina"].sum(axis=0).astype(float)
    pit2 = int(np.argmin(np.convolve(thickness2, np.ones(9) / 9, "same")[W // 4 : 3 * W // 4])) + W // 4
    assert abs(pit2 - (centre + 0.1 * W)) < 0.04 * W


def test_nasal_rnfl_side_follows_laterality():
    """The retina is thicker on the nasal side: +x for OD, -x for OS."""
    base = dataclasses.replace(Eye.sample(5), fovea_offset=(0.0, 0.0))
    W = MMR_SIZE[1]
    left, right = slice(int(0.1 * W), int(0.25 * W)), slice(int(0.75 * W), int(0.9 * W))
    for lat, sign in (("OD", 1), ("OS", -1)):
        t = render_oct(dataclasses.replace(base, laterality=lat), MMR_SIZE).anatomy["retina"].sum(axis=0)
        assert sign * (t[right].mean() - t[left].mean()) > 3


def test_styles_differ():
    eye = Eye.sample(6)
    spec = render_oct(eye, RESC_SIZE, style="spectralis").image.astype(float)
    cirr = render_oct(eye, RESC_SIZE, style="cirrus").image.astype(float)
    # Background (top rows, vitreous): near black for Spectralis, grey and noisy for Cirrus.
    assert spec[:40].mean() < 10 < cirr[:40].mean()
    assert cirr[:40].std() > 2 * spec[:40].std()


# ----------------------------------------------------------------- lesions


@pytest.mark.parametrize("kind", OCT_KINDS)
def test_lesion_mask_size_and_visibility(kind):
    style, size = _style_size(kind)
    fractions = []
    for seed in range(4):
        eye = Eye.sample(seed)
        healthy = render_oct(eye, size, style=style)
        sick = render_oct(eye, size, [kind], style=style)
        mask = sick.lesions[kind]
        assert mask.dtype == bool and mask.shape == size and mask.any()
        fractions.append(mask.mean())
        # Visibly different inside the mask.
        diff = np.abs(sick.image.astype(float) - healthy.image)[mask].mean()
        assert diff > 10, (kind, seed, diff)
    ratio = np.mean(fractions) / _target(kind)
    assert 0.2 < ratio < 5, (kind, ratio)


def test_pixels_far_from_lesions_unchanged():
    eye = Eye.sample(8)
    kinds = [k for k in OCT_KINDS if k not in RESC_ONLY]
    healthy = render_oct(eye, MMR_SIZE).image
    sick = render_oct(eye, MMR_SIZE, kinds)
    union = np.logical_or.reduce(list(sick.lesions.values()))
    changed = healthy != sick.image
    assert changed.any()
    # Lesions act on their own A-scans (lifting / shadowing stays in those columns),
    # so test 2-D distance: nothing changes more than 0.2 H away from a mask.
    far = distance_transform_edt(~union) > 0.2 * MMR_SIZE[0]
    assert far.mean() > 0.3
    assert not changed[far].any()


@pytest.mark.parametrize("kind", OCT_KINDS)
def test_columns_away_from_lesion_unchanged(kind):
    """Lesions act on their own A-scans: columns away from the mask are byte-identical."""
    style, size = _style_size(kind)
    eye = Eye.sample(10)
    healthy = render_oct(eye, size, style=style).image
    sick = render_oct(eye, size, [kind], style=style)
    lesion_cols = sick.lesions[kind].any(axis=0)
    far_cols = distance_transform_edt(~lesion_cols) > 0.03 * size[1]
    assert far_cols.mean() > 0.1
    assert np.array_equal(healthy[:, far_cols], sick.image[:, far_cols])


def test_healthy_anatomy_independent_of_lesions_rng():
    """A kind's lesion looks the same whichever other kinds are requested."""
    eye = Eye.sample(9)
    alone = render_oct(eye, MMR_SIZE, ["subretinal_fluid"]).lesions["subretinal_fluid"]
    together = render_oct(eye, MMR_SIZE, ["prominent_mlm", "subretinal_fluid"]).lesions["subretinal_fluid"]
    assert np.array_equal(alone, together)
