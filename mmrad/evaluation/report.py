"""The markdown report: our numbers in the shape of the paper's tables, beside the paper's.

The paper's numbers are on the real, private MMR data with a pretrained SAM;
ours are on the data this run used (by default the synthetic phantoms, and a
randomly initialised encoder unless weights were configured). The report says
which, in its header, so nobody compares the two columns as like for like.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmrad.core.errors import DataError
from mmrad.core.io import atomic_write_text
from mmrad.core.params import Params
from mmrad.evaluation.methods import MAIN, METHODS

# Paper Tables 2, 5, 12, 13 (MMR). (pixel AUC, PRO) per modality, detection AUC.
PAPER_TABLE2 = {
    "PaDiM": {"fundus": (0.6720, 0.4639), "oct": (0.8042, 0.4417), "detection": 0.7196},
    "PatchCore": {"fundus": (0.6531, 0.4446), "oct": (0.7809, 0.4311), "detection": 0.7062},
    "MMRAD": {"fundus": (0.6997, 0.4303), "oct": (0.8295, 0.5339), "detection": 0.7664},
}
PAPER_TABLE5 = {"PatchCore": (0.7399, 0.6287, 0.7062), "PaDiM": (0.6756, 0.7065, 0.7196),
                "MMRAD": (0.7350, 0.7121, 0.7664)}  # fundus only, OCT only, both
PAPER_TABLE12 = {"max": 0.7338, "mean": 0.4597, "fusion": 0.7664}
PAPER_TABLE13 = {
    "fundus": {1: (0.7078, 0.2104), 2: (0.8575, 0.5786), 3: (0.6802, 0.2498), 4: (0.5580, 0.4801),
               5: (0.6603, 0.5171), 6: (0.5904, 0.2965), 7: (0.6545, 0.5533), 8: (0.7929, 0.6511),
               9: (0.6697, 0.5837)},
    "oct": {1: (0.8855, 0.3870), 2: (0.7574, 0.4279), 3: (0.8758, 0.5456), 4: (0.8910, 0.5378),
            5: (0.8539, 0.3789), 6: (0.8399, 0.3290), 7: (0.8651, 0.7227), 8: (0.6413, 0.4633)},
}
PAPER_TABLE11 = {"mmr_to_idrid": (0.7836, 0.2601), "idrid_to_idrid": (0.8375, 0.3544),
                 "mmr_to_resc": (0.7549, 0.3974), "resc_to_resc": (0.8171, 0.4371)}
TRANSFER_ROWS = {"idrid_to_idrid": ("IDRiD", "IDRiD", "fundus"), "mmr_to_idrid": ("IDRiD", "MMR", "fundus"),
                 "resc_to_resc": ("RESC", "RESC", "oct"), "mmr_to_resc": ("RESC", "MMR", "oct")}


def _f(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def _detection(result: dict) -> float | None:
    """The method's case score: MMRAD's fusion token, a baseline's max of both modalities."""
    detection = result.get("detection", {})
    return detection.get("fusion", detection.get("max"))


def render(results: dict[str, dict], context: dict, transfer: dict[str, dict] | None = None) -> str:
    """Markdown from {method key: metrics.json content} (and Table 11's transfer results)."""
    lines = ["# MMRAD evaluation report", "",
             f"Data: **{context.get('data', 'unknown')}**. Pretrained weights: **{context.get('weights', 'unknown')}**.",
             "\"paper\" columns are the published numbers on the real MMR dataset with a pretrained SAM; "
             "\"ours\" are this run's. They are not like for like unless the data and weights are.", ""]
    lines += ["## Table 2: localisation (pixel AUROC / AU-PRO) and detection (AUROC)", "",
              "| method | fundus AUC ours | fundus PRO ours | OCT AUC ours | OCT PRO ours | detection ours "
              "| fundus AUC / PRO paper | OCT AUC / PRO paper | detection paper |",
              "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for key, result in results.items():
        name = METHODS[key].title if key in METHODS else key
        loc = result.get("localisation", {})
        paper = PAPER_TABLE2.get(name, {})
        pf, po = paper.get("fundus"), paper.get("oct")
        lines.append(f"| {name} | {_f(loc.get('fundus', {}).get('pixel_auroc'))} | {_f(loc.get('fundus', {}).get('aupro'))} "
                     f"| {_f(loc.get('oct', {}).get('pixel_auroc'))} | {_f(loc.get('oct', {}).get('aupro'))} "
                     f"| {_f(_detection(result))} | {f'{pf[0]:.4f} / {pf[1]:.4f}' if pf else '–'} "
                     f"| {f'{po[0]:.4f} / {po[1]:.4f}' if po else '–'} | {_f(paper.get('detection'))} |")
    lines += ["", "## Table 5: detection AUROC, single modality vs both", "",
              "| method | fundus only | OCT only | both | paper: fundus / OCT / both |", "|---|---:|---:|---:|---|"]
    for key, result in results.items():
        name, d = METHODS[key].title if key in METHODS else key, result.get("detection", {})
        paper = PAPER_TABLE5.get(name)
        lines.append(f"| {name} | {_f(d.get('fundus_only'))} | {_f(d.get('oct_only'))} | {_f(_detection(result))} "
                     f"| {' / '.join(f'{v:.4f}' for v in paper) if paper else '–'} |")
    if MAIN in results:
        d = results[MAIN].get("detection", {})
        lines += ["", "## Table 12: MMRAD's fusion token vs other fusions (detection AUROC)", "",
                  "| setting | ours | paper |", "|---|---:|---:|",
                  f"| maximum of the two image scores | {_f(d.get('max'))} | {PAPER_TABLE12['max']:.4f} |",
                  f"| mean of the two image scores | {_f(d.get('mean'))} | {PAPER_TABLE12['mean']:.4f} |",
                  f"| fusion token, fundus then OCT | {_f(d.get('fusion'))} | {PAPER_TABLE12['fusion']:.4f} |"]
        best_single = max((d.get("fundus_only") or 0), (d.get("oct_only") or 0))
        if d.get("fusion") is not None and d["fusion"] < best_single:
            lines += ["", f"**Modality imbalance:** the fused score ({d['fusion']:.4f}) is below the best single "
                          f"modality ({best_single:.4f}): fusion is not using both modalities well."]
        retrieval = results[MAIN].get("retrieval")
        if retrieval:
            lines += ["", "## Diagnostic: cross-modal retrieval from pooled image embeddings (top-1 accuracy)", "",
                      "Each test case's fundus embedding retrieves among all cases' OCT embeddings (and back) by "
                      "cosine similarity; a hit when its own pair ranks first. MMRAD is not trained to align the "
                      "modalities, so this measures how much case identity its shared encoder carries across them.",
                      "", "| fundus → OCT | OCT → fundus | chance |", "|---:|---:|---:|",
                      f"| {_f(retrieval['fundus_to_oct_top1'])} | {_f(retrieval['oct_to_fundus_top1'])} "
                      f"| {_f(retrieval['chance'])} |"]
        lines += ["", "## Table 13: MMRAD per symptom (pixel AUROC / AU-PRO)", "",
                  "| modality | id | symptom | test images | ours AUC | ours PRO | paper AUC | paper PRO |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for modality, per in results[MAIN].get("per_symptom", {}).items():
            for class_id, row in per.items():
                paper = PAPER_TABLE13.get(modality, {}).get(int(class_id))
                lines.append(f"| {modality} | {class_id} | {row['name']} | {row['images']} | {_f(row['pixel_auroc'])} "
                             f"| {_f(row['aupro'])} | {_f(paper[0] if paper else None)} | {_f(paper[1] if paper else None)} |")
    if transfer:
        lines += ["", "## Table 11: transfer (MMRAD localisation, pixel AUROC / AU-PRO)", "",
                  "| test dataset | trained on | ours AUC | ours PRO | paper AUC | paper PRO |",
                  "|---|---|---:|---:|---:|---:|"]
        for key, (test_name, train_name, modality) in TRANSFER_ROWS.items():
            loc = transfer.get(key, {}).get("localisation", {}).get(modality, {})
            paper = PAPER_TABLE11[key]
            lines.append(f"| {test_name} | {train_name} | {_f(loc.get('pixel_auroc'))} | {_f(loc.get('aupro'))} "
                         f"| {paper[0]:.4f} | {paper[1]:.4f} |")
    lines += ["", "Overlays of the anomaly maps on the images: `reports/<method>/overlays/`. "
              "Curves: `dvc plots show`.", ""]
    return "\n".join(lines)


def write_report(params: Params, reports: str | Path, train_metrics: str | Path, out: str | Path) -> Path:
    """The `report` stage: every method's ``reports/<method>/metrics.json`` and the transfer results -> ``out``."""
    reports, out = Path(reports), Path(out)
    files = {name: reports / name / "metrics.json" for name in METHODS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(missing[0], "metrics file is missing (run the evaluate stages first)")
    results = {name: json.loads(path.read_text()) for name, path in files.items()}
    train_metrics = Path(train_metrics)
    trained = json.loads(train_metrics.read_text()) if train_metrics.is_file() else {}
    root = params.datasets[params.train.dataset].root
    context = {"data": f"{params.train.dataset} from {root}",
               "weights": "yes" if trained.get("pretrained") else "none (random initialisation)"}
    transfer = {key: json.loads(path.read_text()) for key in TRANSFER_ROWS
                if (path := reports / "transfer" / key / "metrics.json").is_file()}
    atomic_write_text(out, render(results, context, transfer))
    return out
