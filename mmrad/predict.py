"""`mmrad predict`: the fine-tuned model on image files, as a clinic-side user runs it.

Input: a fundus image, an OCT B-scan, or both, or a folder of cases; each
image is decoded and resized exactly as the prepare stage builds its cache
(``prepare.READ_MODE``, ``prepare.resize_for_model``) and scored by the same
``evaluate.predict_mmrad`` the evaluate stage uses, so a case scores the same
here as in ``reports/mmrad/scores.csv`` (up to float rounding of a different
batch composition).

The model is either a training output (``models/mmrad`` or its ``model.pt``,
rebuilt with ``params.yaml``) or an MLflow model: ``models:/mmrad@champion``,
``runs:/<id>/model`` or a downloaded model folder (its own params travel with
it). Output, written atomically under ``--out``: ``scores.json`` and
``scores.parquet`` (one row per case) and ``overlays/<case>.png``.

``check_model_input`` is the input rule of the served model (REST): the
pyfunc calls it so a bad request is a 4xx with the reason, never a 500.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mmrad import symptoms
from mmrad.errors import DataError

log = logging.getLogger("mmrad.predict")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass
class Case:
    case_id: str
    paths: dict[str, Path]  # modality -> image file

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in symptoms.MODALITIES if m in self.paths)


def find_cases(folder: str | Path) -> list[Case]:
    """The cases of a folder, in either layout (searched recursively):

    * ``<case>_fundus.<ext>`` / ``<case>_oct.<ext>`` files side by side (the
      prepared cache's own naming, ``data/prepared/mmr/images/test``), or
    * one sub-folder per case holding ``fundus.<ext>`` and / or ``oct.<ext>``.
    A case may have one modality or both.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "folder of cases is missing")
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        where = path.parent.relative_to(folder)
        for modality in symptoms.MODALITIES:
            if path.stem == modality and path.parent != folder:
                case = where.as_posix()
            elif path.stem.endswith(f"_{modality}"):
                case = (where / path.stem[: -len(modality) - 1]).as_posix()
            else:
                continue
            if modality in found.setdefault(case, {}):
                raise DataError(path, f"case '{case}' has two {modality} images", f"also {found[case][modality]}")
            found[case][modality] = path
    if not found:
        raise DataError(folder, "no case images found",
                        "expected <case>_fundus.<ext> / <case>_oct.<ext> files or <case>/fundus.<ext>, <case>/oct.<ext>")
    return [Case(case, paths) for case, paths in sorted(found.items())]


def load_image(path: str | Path, modality: str, resolution: int) -> np.ndarray:
    """(S, S, 3) uint8 as the model sees it: decoded and resized like the prepared cache."""
    from mmrad.io import read_image
    from mmrad.prepare import READ_MODE, resize_for_model

    return np.asarray(resize_for_model(read_image(path, mode=READ_MODE[modality]), resolution).convert("RGB"))


def load_model(ref: str, params_file: str | Path = "params.yaml"):
    """(model, params) from a training output or an MLflow model reference."""
    if ref.startswith(("models:/", "runs:/")) or (Path(ref) / "MLmodel").is_file():
        import mlflow

        from mmrad.tracking import use_tracking

        use_tracking()
        try:
            wrapped = mlflow.pyfunc.load_model(ref)
        except mlflow.exceptions.MlflowException as exc:
            raise DataError(ref, "no such MLflow model", f"{exc.message} (tracking: {mlflow.get_tracking_uri()})") from exc
        inner = wrapped.unwrap_python_model()
        return inner.model, inner.params
    from mmrad.params import load_params
    from mmrad.train import load_finetuned

    path = Path(ref)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        raise DataError(path, "model file is missing", "give a training output (models/mmrad) or models:/NAME@ALIAS")
    params = load_params(params_file)
    return load_finetuned(path, params), params


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


def predict_files(model, params, cases: list[Case], out: str | Path, batch_size: int = 8,
                  overlays: bool = True) -> list[dict]:
    """Score ``cases``; write scores.json, scores.parquet and overlays/ under ``out`` (atomically)."""
    import pandas as pd

    from mmrad.evaluate import SplitData, plot_case, predict_mmrad
    from mmrad.io import atomic_dir

    size = params.prepare.resolution
    # a batch holds cases with the same modalities (the model scores a pair or a single image)
    groups: dict[tuple[str, ...], list[Case]] = {}
    for case in sorted(cases, key=lambda c: c.case_id):
        groups.setdefault(case.modalities, []).append(case)
    chunks = [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    records = []
    with atomic_dir(out) as tmp, tqdm(total=len(cases), unit="case", desc="predict", file=sys.stderr,
                                      disable=len(cases) < 2) as progress:
        (tmp / "overlays").mkdir()
        for chunk in chunks:
            modalities = chunk[0].modalities
            batch = SplitData("predict", [c.case_id for c in chunk], np.full(len(chunk), -1))
            for modality in modalities:
                batch.images[modality] = np.stack([load_image(c.paths[modality], modality, size) for c in chunk])
            result = predict_mmrad(model, batch, batch_size=len(chunk))
            for i, case in enumerate(chunk):
                singles = {m: float(result.scores[f"{m}_only"][i]) for m in modalities}
                score = float(result.scores["fusion"][i]) if len(modalities) == 2 else singles[modalities[0]]
                record = {"case_id": case.case_id, "modalities": "+".join(modalities), "score": score,
                          **{f"{m}_score": singles.get(m) for m in symptoms.MODALITIES},
                          **{f"{m}_path": str(case.paths[m]) if m in case.paths else None
                             for m in symptoms.MODALITIES}}
                if overlays:
                    name = case.case_id.replace("/", "__") + ".png"
                    plot_case(tmp / "overlays" / name, f"{case.case_id}: case score {score:.2f}",
                              images={m: batch.images[m][i] for m in modalities},
                              maps={m: result.maps[m][i] for m in modalities},
                              vmax={m: 1.0 for m in modalities}, scores=singles)
                    record["overlay"] = f"overlays/{name}"
                records.append(record)
            progress.update(len(chunk))
        records.sort(key=lambda r: r["case_id"])
        (tmp / "scores.json").write_text(json.dumps(records, indent=2) + "\n")
        pd.DataFrame.from_records(records).to_parquet(tmp / "scores.parquet", index=False)
    return records
