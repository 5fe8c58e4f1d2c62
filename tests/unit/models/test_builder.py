"""The model builder: the model file is checked against params.yaml when it is loaded."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmrad.core.errors import DataError
from mmrad.core.params import Params
from mmrad.models.builder import MODEL_FORMAT, load_finetuned, model_config
from tests.conftest import tiny_params_dict


def _params(**model) -> Params:
    raw = tiny_params_dict()
    raw["model"].update(model)
    return Params.model_validate(raw)


def test_the_file_stores_the_architecture_params_describe(trained_tiny):
    params, folder = trained_tiny
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    assert state["format"] == MODEL_FORMAT
    assert state["config"] == dataclasses.asdict(model_config(params))
    assert load_finetuned(folder / "model.pt", params).config == model_config(params)


@pytest.mark.parametrize("change, detail", [
    # same tensors, another model: only the check sees it
    ({"fusion_order": ["oct", "fundus"]}, "fusion_order: file ('fundus', 'oct'), params ('oct', 'fundus')"),
    ({"token_init": "normal"}, "token_init: file 'pretrained', params 'normal'"),
    ({"cnn": "resnet50"}, "cnn: file 'resnet18', params 'resnet50'"),
])
def test_a_file_of_another_architecture_is_refused_by_name(trained_tiny, change, detail):
    _, folder = trained_tiny
    with pytest.raises(DataError, match="trained with another architecture than params.yaml configures") as caught:
        load_finetuned(folder / "model.pt", _params(**change))
    assert caught.value.path == str(folder / "model.pt")
    assert caught.value.detail == detail


def test_a_file_without_a_config_is_refused(trained_tiny, tmp_path):
    params, folder = trained_tiny
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    del state["config"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(DataError, match="another architecture"):
        load_finetuned(tmp_path / "old.pt", params)


def test_a_file_from_before_the_ablation_variants_loads_as_the_model_it_is(trained_tiny, tmp_path):
    """Model files written before issue 15 lack its architecture keys: they are LPT with shared decoder and mask
    token, and load under params that say so; under another variant they are refused by name."""
    params, folder = trained_tiny
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    for key in ("tuning", "prompt_sharing", "vpt_tokens", "fourier_mask", "decoder_sharing", "mask_token_sharing"):
        del state["config"][key]
    torch.save(state, tmp_path / "old.pt")
    assert load_finetuned(tmp_path / "old.pt", params).config == model_config(params)
    with pytest.raises(DataError, match="tuning: file 'lpt', params 'vpt'"):
        load_finetuned(tmp_path / "old.pt", _params(tuning="vpt"))
