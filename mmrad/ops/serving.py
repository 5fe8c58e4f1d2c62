"""The fine-tuned MMRAD as an MLflow model: the pyfunc, its signature and input example, and its input rule.

``mlflow models serve`` and ``mlflow.pyfunc.load_model`` run ``mlflow_model.py``
beside this file (MLflow "models from code"), which serves ``MMRADModel``.
``check_model_input`` is the served model's input rule: a bad request is a
4xx with the reason, never a 500. Scoring goes through
``mmrad.evaluation.inference.infer``, the forward path evaluation and
``mmrad predict`` use.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from mmrad.core.params import Params
from mmrad.data import symptoms
from mmrad.data.splits import load_split
from mmrad.evaluation.inference import infer
from mmrad.models.builder import load_finetuned

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # what MLflow logs as the model's code
PACKAGE = Path(__file__).resolve().parents[1]  # the mmrad package, logged with the model (code_paths)


class MMRADModel(mlflow.pyfunc.PythonModel):
    """The fine-tuned MMRAD as an MLflow pyfunc model.

    Input: {"fundus": (B, S, S, 3) uint8, "oct": (B, S, S, 3) uint8}, S =
    model.image_size, images resized like the prepared cache. Output:
    {"score": (B,) case anomaly probability (the fusion token),
    "fundus_map" / "oct_map": (B, S, S) per-pixel anomaly probability}.
    """

    # The input is a dict of image arrays, described by the explicit tensor signature the model is logged with
    # (model_signature); MLflow's type-hint validation has no type for it, and without this flag it warns
    # "add type hints to predict" (with terminal colour codes) on every import of this module.
    _skip_type_hint_validation = True

    def load_context(self, context):
        raw = yaml.safe_load(Path(context.artifacts["params"]).read_text())
        weights = raw.get("weights") or {}
        # pretrained weight files travel with the model: point params at the logged copies
        if weights.get("sam"):
            weights["sam"]["path"] = context.artifacts["weights_sam"]
        for i, entry in enumerate(weights.get("resnets") or []):
            if entry:
                entry["path"] = context.artifacts[f"weights_resnet{i}"]
        self.params = Params.model_validate(raw)
        self.model = load_finetuned(context.artifacts["model"], self.params)

    def predict(self, context, model_input, params=None):
        try:  # a bad request is the client's error (HTTP 400 with the reason), never a server error
            given = check_model_input(dict(model_input), self.params.prepare.resolution)
        except ValueError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from exc
        out = infer(self.model, given)
        result = {"score": out["score"].astype(np.float32)}
        for m in given:
            result[f"{m}_map"] = out[m].astype(np.float32)
        return result


def check_model_input(inputs: dict, size: int, required: tuple[str, ...] = symptoms.MODALITIES) -> dict:
    """The served model's input rule; returns {modality: (B, S, S, 3) uint8} or raises ValueError with the reason."""
    unknown = sorted(set(inputs) - set(symptoms.MODALITIES))
    if unknown:
        raise ValueError(f"unknown input(s) {unknown}: the model takes 'fundus' and 'oct'")
    missing = [m for m in required if m not in inputs]
    if missing:
        raise ValueError(f"missing modality {missing}: this model scores a fundus + OCT pair and needs both")
    checked = {}
    for modality, value in inputs.items():
        array = np.asarray(value)
        if array.dtype.kind not in "ui" or array.ndim != 4 or array.shape[3] != 3:
            raise ValueError(f"{modality}: not an image batch: expected (N, {size}, {size}, 3) integer pixel values "
                             f"0-255, got shape {array.shape} dtype {array.dtype}")
        if array.shape[1:3] != (size, size):
            raise ValueError(f"{modality}: wrong size {array.shape[1]}x{array.shape[2]}: this model takes "
                             f"{size}x{size} (resize as `mmrad predict` does)")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"{modality}: pixel values must lie in 0-255, got {array.min()}..{array.max()}")
        checked[modality] = array.astype(np.uint8)
    batches = {m: a.shape[0] for m, a in checked.items()}
    if len(set(batches.values())) > 1:
        raise ValueError(f"fundus and OCT batches differ in length {batches}: send one image of each per case")
    return checked


def model_signature(size: int) -> ModelSignature:
    image = (-1, size, size, 3)
    inputs = Schema([TensorSpec(np.dtype(np.uint8), image, "fundus"), TensorSpec(np.dtype(np.uint8), image, "oct")])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1,), "score"),
                      TensorSpec(np.dtype(np.float32), (-1, size, size), "fundus_map"),
                      TensorSpec(np.dtype(np.float32), (-1, size, size), "oct_map")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(prepared: Path, size: int) -> dict[str, np.ndarray]:
    """One real test pair from the prepared cache (a blank pair when none is there)."""
    try:
        test = load_split(prepared)
        return {m: test.images[m][:1] for m in symptoms.MODALITIES}
    except Exception:  # an input example is documentation: never fail the run for it
        return {m: np.zeros((1, size, size, 3), np.uint8) for m in symptoms.MODALITIES}


def pip_requirements() -> list[str]:
    """The model's runtime requirements, pinned as installed (no slow inference by MLflow)."""
    names = ["torch", "torchvision", "segment-anything", "numpy", "pyyaml", "pydantic", "pillow", "scipy",
             "scikit-image", "scikit-learn", "pandas", "pyarrow", "mlflow"]
    return [f"{name}=={version(name)}" for name in names]
