"""predict_mmrad's one embedding per image gives the same bytes as separate forward passes (pair, each image alone)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mmrad.core.params import Params
from mmrad.data.splits import SplitData
from mmrad.evaluation.inference import infer, paired_and_single, predict_mmrad, with_combined_scores
from mmrad.models.builder import model_config
from mmrad.models.mmrad import MMRAD
from tests.conftest import tiny_params_dict

CONFIG = model_config(Params.model_validate(tiny_params_dict()))  # vit_tiny at 64 px, resnet18 trunks


def _model(fusion_order) -> MMRAD:
    torch.manual_seed(0)
    model = MMRAD(replace(CONFIG, fusion_order=tuple(fusion_order))).eval()
    with torch.no_grad():  # a trained-looking model: the prompts (zero at init) and the fusion statistics matter
        model.lpt.lift.weight.normal_(std=0.05)
        model.fusion_norm.running_mean.normal_(std=0.1)
        model.fusion_norm.updates.fill_(1)
    return model


def _split(n: int = 5, modalities=("fundus", "oct")) -> SplitData:
    rng = np.random.default_rng(7)
    data = SplitData("mmr", [f"c{i}" for i in range(n)], np.arange(n) % 2)
    for m in modalities:
        data.images[m] = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    return data


def _three_passes(model: MMRAD, data: SplitData, batch_size: int) -> dict[str, np.ndarray]:
    """The reference: the pair through MMRAD.forward, then each image alone through it (the old predict_mmrad)."""
    parts: dict[str, list] = {}
    for start in range(0, len(data.case_ids), batch_size):
        batch = {m: v[start:start + batch_size] for m, v in data.images.items()}
        out = infer(model, batch, pooled=True)
        for m in batch:
            out[f"{m}_only"] = infer(model, {m: batch[m]})["score"]
        for key, value in out.items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.mark.parametrize("order", [("fundus", "oct"), ("oct", "fundus")])
def test_predict_mmrad_equals_a_forward_pass_per_pair_and_per_image(order):
    model, data = _model(order), _split()
    expected = _three_passes(model, data, batch_size=2)  # 2 + 2 + 1: a partial last batch
    got = predict_mmrad(model, data, batch_size=2)
    for m in ("fundus", "oct"):
        np.testing.assert_array_equal(got.maps[m], expected[m])
        np.testing.assert_array_equal(got.embeddings[m], expected[f"{m}_pooled"])
        np.testing.assert_array_equal(got.scores[f"{m}_only"], expected[f"{m}_only"])
    np.testing.assert_array_equal(got.scores["fusion"], expected["score"])
    assert list(got.scores) == ["fusion", "fundus_only", "oct_only", "max", "mean"]  # scores.csv's columns
    np.testing.assert_array_equal(got.scores["max"], np.maximum(expected["fundus_only"], expected["oct_only"]))
    # the second modality alone is NOT its paired map's maximum (T_f carried the first one over):
    second = order[1]
    alone = infer(model, {second: data.images[second][:2]})
    assert not np.array_equal(alone[second], expected[second][:2])


def test_paired_and_single_is_the_forward_pass_of_one_batch():
    model, data = _model(("fundus", "oct")), _split(3)
    out = paired_and_single(model, data.images)
    ref = infer(model, data.images, pooled=True)
    for key, value in ref.items():
        np.testing.assert_array_equal(out[key], value)
    with pytest.raises(ValueError, match="both modalities"):
        paired_and_single(model, {"oct": data.images["oct"]})


def test_single_modal_split_is_one_forward_pass():
    model, data = _model(("fundus", "oct")), _split(3, modalities=("oct",))
    got = predict_mmrad(model, data, batch_size=2)
    expected = _three_passes(model, data, batch_size=2)
    np.testing.assert_array_equal(got.maps["oct"], expected["oct"])
    np.testing.assert_array_equal(got.scores["oct_only"], expected["score"])
    assert list(got.scores) == ["oct_only"]
    assert with_combined_scores(got).scores.keys() == got.scores.keys()
