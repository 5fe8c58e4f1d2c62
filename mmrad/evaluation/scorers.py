"""How each method of the registry (``mmrad.evaluation.methods``) turns a prepared test split into predictions.

Every scorer has the signature ``(params, prepared, model_path) -> (test split, Predictions)``:

* ``score_mmrad``: the fine-tuned model file (rebuilt with params.yaml) on the test split;
* ``score_padim`` / ``score_patchcore``: the baseline fitted per modality on the
  healthy training images, with the same CNN family (and, when configured, the
  same weights file) as MMRAD's first LPT trunk; the case score is the max of
  both modalities' image scores, as the paper does for every comparison method.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mmrad.core.errors import DataError
from mmrad.core.params import Params
from mmrad.data.splits import SplitData, load_split
from mmrad.evaluation.inference import Predictions, predict_mmrad, with_combined_scores
from mmrad.models import baselines
from mmrad.models.builder import load_finetuned


def score_mmrad(params: Params, prepared: str | Path, model_path: str | Path | None) -> tuple[SplitData, Predictions]:
    if model_path is None:
        raise DataError("--model", "MMRAD is scored from a trained model file", "give --model models/mmrad/model.pt")
    test = load_split(prepared)
    return test, predict_mmrad(load_finetuned(model_path, params), test)


def _first_resnet(params: Params) -> tuple[str, str] | None:
    weights = params.weights.resnets[0] if params.weights.resnets else None
    return (weights.path, weights.format) if weights is not None else None


def _fit_per_modality(prepared: str | Path, detector: Callable[..., object], params: Params,
                      ) -> tuple[SplitData, Predictions]:
    """One detector per modality, fitted on that modality's training images; ``detector(trunk=...)`` builds
    one around the frozen CNN, which is built (or loaded) once and shared: it is frozen and the same for both."""
    train, test = load_split(prepared, "train"), load_split(prepared, "test")
    trunk = baselines.build_trunk(params.model.cnn, params.seed, weights=_first_resnet(params))
    maps, scores = {}, {}
    for modality in test.images:
        model = detector(trunk=trunk).fit(train.images[modality])
        maps[modality], scores[f"{modality}_only"] = model.score(test.images[modality])
    return test, with_combined_scores(Predictions(maps, scores))


def score_padim(params: Params, prepared: str | Path, model_path=None) -> tuple[SplitData, Predictions]:
    config = baselines.PaDiMConfig(cnn=params.model.cnn, channels=params.baselines.padim_channels, seed=params.seed)
    return _fit_per_modality(prepared, lambda trunk: baselines.PaDiM(config, trunk=trunk), params)


def score_patchcore(params: Params, prepared: str | Path, model_path=None) -> tuple[SplitData, Predictions]:
    config = baselines.PatchCoreConfig(cnn=params.model.cnn, coreset_ratio=params.baselines.patchcore_coreset_ratio,
                                       seed=params.seed)
    return _fit_per_modality(prepared, lambda trunk: baselines.PatchCore(config, trunk=trunk), params)
