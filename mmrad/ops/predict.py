"""`mmrad predict`: the fine-tuned model on image files, as a clinic-side user runs it.

Input: a fundus image, an OCT B-scan, or both, or a folder of cases; each
image is decoded and resized exactly as the prepare stage builds its cache
(``mmrad.data.prepare.load_for_model``) and scored by the same
``mmrad.evaluation.inference.predict_mmrad`` the evaluate stage uses, so a case scores the same
here as in ``reports/mmrad/scores.csv`` (up to float rounding of a different
batch composition).

The model is either a training output (``models/mmrad`` or its ``model.pt``,
rebuilt with ``params.yaml``) or an MLflow model: ``models:/mmrad@champion``,
``runs:/<id>/model`` or a downloaded model folder (its own params travel with
it). Output, written atomically under ``--out``: ``scores.json`` and
``scores.parquet`` (one row per case) and ``overlays/<case>.png``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from tqdm import tqdm

from mmrad.core.errors import DataError
from mmrad.core.io import IMAGE_SUFFIXES
from mmrad.core.outputs import atomic_dir, check_output_folder
from mmrad.core.params import load_params
from mmrad.data import symptoms
from mmrad.data.prepare import load_for_model
from mmrad.data.splits import SplitData
from mmrad.evaluation.evaluate import research_note
from mmrad.evaluation.inference import predict_mmrad
from mmrad.evaluation.methods import MAIN
from mmrad.evaluation.plots import plot_case
from mmrad.models.builder import MODEL_FILE, load_finetuned
from mmrad.ops.tracking import use_tracking

log = logging.getLogger(__name__)


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


def load_model(ref: str, params_file: str | Path = "params.yaml"):
    """(model, params) from a training output or an MLflow model reference."""
    if ref.startswith(("models:/", "runs:/")) or (Path(ref) / "MLmodel").is_file():
        use_tracking()
        try:
            wrapped = mlflow.pyfunc.load_model(ref)
        except mlflow.exceptions.MlflowException as exc:
            raise DataError(ref, "no such MLflow model", f"{exc.message} (tracking: {mlflow.get_tracking_uri()})") from exc
        inner = wrapped.unwrap_python_model()
        return inner.model, inner.params
    path = Path(ref)
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise DataError(path, "model file is missing", "give a training output (models/mmrad) or models:/NAME@ALIAS")
    params = load_params(params_file)
    return load_finetuned(path, params), params


def predict_files(model, params, cases: list[Case], out: str | Path, batch_size: int = 8,
                  overlays: bool = True, inputs: list[str | Path] = ()) -> list[dict]:
    """Score ``cases``; write scores.json, scores.parquet and overlays/ under ``out`` (atomically).

    ``out`` must not overlap ``inputs`` (the folder or files given) nor any case's image file."""
    inputs = [*inputs, *(p for c in cases for p in c.paths.values())]
    check_output_folder(out, inputs)
    size = params.prepare.resolution
    note = research_note(params, MAIN, dataset="")  # random weights: every overlay says "research use only"
    # a batch holds cases with the same modalities (the model scores a pair or a single image)
    groups: dict[tuple[str, ...], list[Case]] = {}
    for case in sorted(cases, key=lambda c: c.case_id):
        groups.setdefault(case.modalities, []).append(case)
    chunks = [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    records = []
    with atomic_dir(out, inputs) as tmp, tqdm(total=len(cases), unit="case", desc="predict", file=sys.stderr,
                                      disable=len(cases) < 2) as progress:
        (tmp / "overlays").mkdir()
        for chunk in chunks:
            modalities = chunk[0].modalities
            batch = SplitData("predict", [c.case_id for c in chunk], np.full(len(chunk), -1))
            for modality in modalities:
                batch.images[modality] = np.stack([load_for_model(c.paths[modality], modality, size,
                                                                        params.prepare.max_image_pixels) for c in chunk])
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
                              vmax={m: 1.0 for m in modalities}, scores=singles, note=note)
                    record["overlay"] = f"overlays/{name}"
                records.append(record)
            progress.update(len(chunk))
        records.sort(key=lambda r: r["case_id"])
        (tmp / "scores.json").write_text(json.dumps(records, indent=2) + "\n")
        pd.DataFrame.from_records(records).to_parquet(tmp / "scores.parquet", index=False)
    return records
