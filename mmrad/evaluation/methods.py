"""The registry of methods: every method the pipeline evaluates, by name, in one place.

The CLI's choices, the evaluation (which scorer runs), the report's tables,
the MLflow metric prefixes and dvc.yaml's ``baseline`` stages all read this
table (tests/system/test_dvc_deps.py checks dvc.yaml against it).

It is plain data on purpose, so the CLI can list the methods without
importing torch: ``scorer`` names the function in
``mmrad.evaluation.scorers`` that fits (when needed) and scores the method.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmrad.core.errors import DataError


@dataclass(frozen=True)
class Method:
    name: str  # CLI argument, reports/<name>/, MLflow metric prefix
    title: str  # as the paper's tables name it
    scorer: str  # function of mmrad.evaluation.scorers: (params, prepared, model_path) -> (split, predictions)
    trained: bool  # True: scores a fine-tuned model file (--model); False: fitted on the healthy training split
    parameter: str | None = None  # its own params.yaml key: a change re-runs this method's stage only
    map_label: str = "anomaly probability"  # what its anomaly map's number is (the overlays' colour bar)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("mmrad", "MMRAD", "score_mmrad", trained=True),
    Method("padim", "PaDiM", "score_padim", trained=False, parameter="baselines.padim_channels",
           map_label="anomaly score (Mahalanobis feature distance)"),
    Method("patchcore", "PatchCore", "score_patchcore", trained=False, parameter="baselines.patchcore_coreset_ratio",
           map_label="anomaly score (nearest-patch feature distance)"),
)}
MAIN = "mmrad"  # the method this project trains, registers and serves
BASELINES = tuple(name for name, m in METHODS.items() if not m.trained)


def main_score(scores) -> str:
    """A method's case score among the names of its ``scores``: MMRAD's fusion token; a baseline's max of both
    modalities (the paper's rule); with one modality, its only score."""
    names = list(scores)
    return next((name for name in ("fusion", "max") if name in names), names[0] if names else "max")


def get(name: str) -> Method:
    if name not in METHODS:
        raise DataError(name, "unknown method", f"known: {', '.join(METHODS)}")
    return METHODS[name]
