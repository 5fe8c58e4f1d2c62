"""The benchmark's lesion difficulty (``synthetic.mmr.lesions``): contrast and size of the phantom's lesions."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import tiny_params_dict

from mmrad.core.errors import DataError
from mmrad.core.params import LesionDifficulty, Params, load_params
from mmrad.synthetic.generate import _render_mmr
from mmrad.synthetic.phantom.eye import Eye
from mmrad.synthetic.phantom.fundus import render_fundus
from mmrad.synthetic.phantom.oct import render_oct

CASES = [(render_fundus, (160, 166), ["retinal_whitening", "haemorrhage"], "visucam"),
         (render_oct, (128, 224), ["subretinal_fluid", "retinal_edema"], "spectralis")]


@pytest.mark.parametrize("render, size, kinds, style", CASES)
def test_default_difficulty_is_the_phantom_as_it_is(render, size, kinds, style):
    eye = Eye.sample(7)
    plain = render(eye, size, kinds, style=style)
    same = _render_mmr(render, eye, size, kinds, style, LesionDifficulty(contrast=1.0, size=1.0))
    assert np.array_equal(plain.image, same.image)
    assert all(np.array_equal(plain.lesions[k], same.lesions[k]) for k in kinds)


@pytest.mark.parametrize("render, size, kinds, style", CASES)
def test_contrast_scales_the_lesions_change_only(render, size, kinds, style):
    eye = Eye.sample(7)
    healthy = render(eye, size, (), style=style).image.astype(float)
    full = _render_mmr(render, eye, size, kinds, style, LesionDifficulty(contrast=1.0, size=1.0))
    half = _render_mmr(render, eye, size, kinds, style, LesionDifficulty(contrast=0.5, size=1.0))
    change_full = full.image.astype(float) - healthy
    change_half = half.image.astype(float) - healthy
    assert np.abs(change_full).sum() > 0
    # half the change, to the rounding of uint8; untouched pixels stay the healthy eye's
    assert np.abs(change_half - 0.5 * change_full).max() <= 0.5 + 1e-9
    assert not change_half[change_full == 0].any()
    assert all(np.array_equal(full.lesions[k], half.lesions[k]) for k in kinds)  # the masks stay the lesions'


@pytest.mark.parametrize("render, size, kinds, style", CASES)
def test_size_scales_the_lesion_area(render, size, kinds, style):
    eye = Eye.sample(7)
    areas = {}
    for scale in (1.0, 3.0):
        rendered = _render_mmr(render, eye, size, kinds, style, LesionDifficulty(contrast=1.0, size=scale))
        areas[scale] = sum(int(m.sum()) for m in rendered.lesions.values())
    assert areas[3.0] > 1.8 * areas[1.0]


@pytest.mark.parametrize("value, rule", [(0.0, "greater than 0"), (5.0, "less than or equal to 4"),
                                         ("strong", "valid number")])
def test_bad_difficulty_names_params_and_key(tmp_path, value, rule):
    raw = tiny_params_dict()
    raw["synthetic"]["mmr"]["lesions"]["oct"]["contrast"] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError) as info:
        load_params(path)
    message = str(info.value)
    assert "params.yaml" in message and "synthetic.mmr.lesions.oct.contrast" in message and rule in message
    assert Params.model_validate(tiny_params_dict()).synthetic.mmr.lesions.oct.contrast == 1.0
