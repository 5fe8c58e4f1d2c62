"""The baseline scorers build the frozen CNN once for both modalities: the same maps and scores as one per modality."""

from __future__ import annotations

import numpy as np
import pytest

from mmrad.data.splits import load_split
from mmrad.evaluation import scorers
from mmrad.models import baselines


def _separate(params, prepared, make) -> dict:
    """The reference: a detector with its own trunk per modality (what the scorers did before)."""
    train, test = load_split(prepared, "train"), load_split(prepared, "test")
    out = {}
    for modality in test.images:
        maps, scores = make().fit(train.images[modality]).score(test.images[modality])
        out[modality], out[f"{modality}_only"] = maps, scores
    return out


@pytest.mark.parametrize("method", ["padim", "patchcore"])
def test_shared_trunk_gives_the_same_predictions(method, tiny_params, prepared_mmr):
    p = tiny_params
    if method == "padim":
        config = baselines.PaDiMConfig(cnn=p.model.cnn, channels=p.baselines.padim_channels, seed=p.seed)
        make = lambda: baselines.PaDiM(config, progress=False)  # noqa: E731
        scorer = scorers.score_padim
    else:
        config = baselines.PatchCoreConfig(cnn=p.model.cnn, coreset_ratio=p.baselines.patchcore_coreset_ratio,
                                           seed=p.seed)
        make = lambda: baselines.PatchCore(config, progress=False)  # noqa: E731
        scorer = scorers.score_patchcore
    expected = _separate(p, prepared_mmr, make)
    test, predictions = scorer(p, prepared_mmr)
    assert list(predictions.maps) == ["fundus", "oct"] == list(test.images)
    for modality in ("fundus", "oct"):
        np.testing.assert_array_equal(predictions.maps[modality], expected[modality])
        np.testing.assert_array_equal(predictions.scores[f"{modality}_only"], expected[f"{modality}_only"])
    np.testing.assert_array_equal(predictions.scores["max"], np.maximum(expected["fundus_only"], expected["oct_only"]))
