"""The colour fundus phantom: shapes, determinism, anatomy, and every lesion kind's mask."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mmrad.data import symptoms
from mmrad.synthetic.phantom.eye import Eye
from mmrad.synthetic.phantom.fundus import render_fundus

SIZE = (160, 166)  # small but big enough for every lesion kind to show
SEEDS = (3, 11, 42)


def _target(kind: str) -> float:
    for table in (symptoms.MMR_FUNDUS, symptoms.IDRID_LESIONS):  # MMR's figure first
        for s in table.values():
            if s.kind == kind:
                return s.target_fraction
    raise KeyError(kind)


@pytest.fixture(scope="module")
def healthy():
    return {seed: render_fundus(Eye.sample(seed), SIZE) for seed in SEEDS}


@pytest.fixture(scope="module")
def with_lesions():
    """Each kind rendered alone on each seed's eye."""
    return {(seed, kind): render_fundus(Eye.sample(seed), SIZE, [kind])
            for seed in SEEDS for kind in symptoms.FUNDUS_KINDS}


def test_shape_dtype_and_anatomy_masks(healthy):
    r = healthy[SEEDS[0]]
    assert r.image.shape == (*SIZE, 3) and r.image.dtype == np.uint8
    assert r.lesions == {}
    for name in ("fov", "optic_disc"):
        assert r.anatomy[name].shape == SIZE and r.anatomy[name].dtype == bool
    # The disc is inside the FOV and about 0.1 of the FOV diameter across.
    fov, disc = r.anatomy["fov"], r.anatomy["optic_disc"]
    assert not (disc & ~fov).any()
    fov_diameter = 2 * np.sqrt(fov.sum() / np.pi)
    disc_diameter = 2 * np.sqrt(disc.sum() / np.pi)
    assert 0.07 < disc_diameter / fov_diameter < 0.15


def test_deterministic_and_seed_dependent():
    eye = Eye.sample(5)
    a = render_fundus(eye, SIZE, ["haemorrhage", "embolus"])
    b = render_fundus(eye, SIZE, ["embolus", "haemorrhage"])  # request order does not matter
    assert a.image.tobytes() == b.image.tobytes()
    for kind in a.lesions:
        assert np.array_equal(a.lesions[kind], b.lesions[kind])
    c = render_fundus(Eye.sample(6), SIZE)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 3


def test_outside_fov_dark_disc_bright(healthy):
    for r in healthy.values():
        img = r.image.astype(float)
        fov = r.anatomy["fov"]
        outside = ~ndimage.binary_dilation(fov, iterations=2)
        assert img[outside].mean() < 8
        assert img[fov].mean() > 50
        lum = img.mean(2)
        assert lum[r.anatomy["optic_disc"]].mean() > lum[fov].mean() + 30
        # A fundus is red-dominated: R > G > B inside the FOV.
        mean = img[fov].mean(0)
        assert mean[0] > mean[1] > mean[2]


def test_laterality_puts_disc_nasally():
    for seed in range(12):
        eye = Eye.sample(seed)
        r = render_fundus(eye, SIZE)
        disc_x = np.nonzero(r.anatomy["optic_disc"])[1].mean()
        if eye.laterality == "OD":
            assert disc_x > SIZE[1] * 0.6
        else:
            assert disc_x < SIZE[1] * 0.4


def test_healthy_anatomy_unchanged_far_from_lesions(healthy):
    eye = Eye.sample(SEEDS[1])
    r = render_fundus(eye, SIZE, symptoms.FUNDUS_KINDS)
    near = np.zeros(SIZE, bool)
    for mask in r.lesions.values():
        near |= mask
    near = ndimage.binary_dilation(near, iterations=12)
    far = ~near
    assert far.mean() > 0.2  # the test means something
    diff = np.abs(r.image.astype(int) - healthy[SEEDS[1]].image.astype(int)).max(2)
    assert (diff[far] == 0).mean() > 0.99
    assert diff[far].max() <= 40


@pytest.mark.parametrize("kind", symptoms.FUNDUS_KINDS)
def test_every_kind_has_a_sized_visible_mask(kind, healthy, with_lesions):
    fractions, diffs = [], []
    for seed in SEEDS:
        r = with_lesions[seed, kind]
        assert set(r.lesions) == {kind}
        mask = r.lesions[kind]
        assert mask.shape == SIZE and mask.dtype == bool and mask.any()
        assert not (mask & ~r.anatomy["fov"]).any()
        fractions.append(mask.mean())
        diff = np.abs(r.image.astype(int) - healthy[seed].image.astype(int)).mean(2)
        diffs.append(diff[mask].mean())
    ratio = np.mean(fractions) / max(_target(kind), 0.00015)
    assert 0.2 < ratio < 5, (kind, ratio)
    # Vessel-calibre lesions change only the vessels inside their mask (a crossing's
    # neighbourhood, a dilated stretch of artery), and vessels are 1-2 px wide at this size.
    threshold = {"av_crossing": 1.0, "vessel_segmental_change": 1.5}.get(kind, 4.0)
    assert np.mean(diffs) > threshold, (kind, diffs)


def test_lesion_colours_have_their_own_character(healthy, with_lesions):
    """Red lesions darken the red-dominated fundus; pale ones brighten it."""
    def mean_change(kind):
        out = []
        for seed in SEEDS:
            mask = with_lesions[seed, kind].lesions[kind]
            delta = with_lesions[seed, kind].image.astype(float) - healthy[seed].image.astype(float)
            out.append(delta[mask].mean(0))
        return np.mean(out, 0)

    for kind in ("haemorrhage", "microaneurysm"):
        assert mean_change(kind).sum() < -15, kind
    for kind in ("retinal_whitening", "cotton_wool_spot", "hard_exudate", "embolus"):
        assert mean_change(kind).sum() > 30, kind
    assert mean_change("hard_exudate")[2] < mean_change("cotton_wool_spot")[2]  # yellow, not white


def test_foveal_avascular_zone_stays_clear():
    eye = Eye.sample(8)
    r = render_fundus(eye, (514, 532))
    # The fovea is the darkest smooth spot near the centre; no vessel edge inside ~0.2 disc diameters:
    # compare the local variation of the green channel there with the image's vessel contrast.
    g = r.image[..., 1].astype(float)
    smooth = ndimage.uniform_filter(g, 15)
    h, w = g.shape
    centre = smooth[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    fy, fx = np.unravel_index(np.argmin(centre), centre.shape)
    fy, fx = fy + h // 4, fx + w // 4
    patch = g[fy - 6: fy + 7, fx - 6: fx + 7]
    assert patch.std() < 6


def test_unknown_kind_and_style_raise():
    eye = Eye.sample(0)
    with pytest.raises(ValueError, match="drusen"):
        render_fundus(eye, SIZE, ["drusen"])
    with pytest.raises(ValueError, match="topcon"):
        render_fundus(eye, SIZE, style="topcon")


def test_small_and_idrid_sizes():
    eye = Eye.sample(2)
    small = render_fundus(eye, (128, 128), symptoms.FUNDUS_KINDS)
    assert small.image.shape == (128, 128, 3)
    assert all(m.any() for m in small.lesions.values())
    idrid = render_fundus(eye, (712, 1072), ["hard_exudate", "microaneurysm"], style="idrid")
    assert idrid.image.shape == (712, 1072, 3)
    fov = idrid.anatomy["fov"]
    # Kowa framing: the circular FOV is cut at the top and bottom, black at the left and right.
    assert fov[0].any() and fov[-1].any()
    assert not fov[:, 0].any() and not fov[:, -1].any()
    visucam = render_fundus(eye, (514, 532))
    assert not visucam.anatomy["fov"][0].any()
    # The Kowa colour balance is warmer (less blue relative to red) than the VISUCAM's.
    ratio = lambda r: r.image[r.anatomy["fov"]][:, 2].mean() / r.image[r.anatomy["fov"]][:, 0].mean()  # noqa: E731
    assert ratio(idrid) < ratio(visucam)


def test_render_time_reasonable():
    """Loose guard (CI machines vary): a default-size render with every lesion well under a second."""
    import time

    eye = Eye.sample(9)
    start = time.perf_counter()
    render_fundus(eye, (514, 532), symptoms.FUNDUS_KINDS)
    assert time.perf_counter() - start < 1.5
