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
from mmrad.core.outputs import atomic_write_text
from mmrad.core.params import Params
from mmrad.evaluation import compare, methods, uncertainty
from mmrad.evaluation.methods import BASELINES, MAIN, METHODS

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


def _main_score(result: dict) -> str:
    """The method's case score (mmrad.evaluation.methods.main_score)."""
    return methods.main_score(result.get("detection", {}))


def _detection(result: dict) -> float | None:
    return result.get("detection", {}).get(_main_score(result))


def _v(result: dict, *path: str) -> str:
    """A metric with its 95 % interval, ``0.9875 [0.981, 0.993]``; a degenerate case score is not a result."""
    node = result
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    if not isinstance(node, (int, float)):
        return "–"
    if path[0] == "detection" and path[-1] in result.get("degenerate", []):
        return f"degenerate (spread {result.get('score_spread', {}).get(path[-1], 0):.1e})"
    ci = result.get("ci95", {})
    for key in path:
        ci = ci.get(key, {}) if isinstance(ci, dict) else {}
    if isinstance(ci, dict) and "low" in ci:
        return f"{node:.4f} [{ci['low']:.3f}, {ci['high']:.3f}]"
    return f"{node:.4f}"


def render(results: dict[str, dict], context: dict, transfer: dict[str, dict] | None = None,
           comparisons: list | None = None) -> str:
    """Markdown from {method key: metrics.json content}, Table 11's transfer results and the paired
    comparisons (``mmrad.evaluation.compare.Comparison``, MMRAD first)."""
    lines = ["# MMRAD evaluation report", "",
             f"Data: **{context.get('data', 'unknown')}**. Pretrained weights: **{context.get('weights', 'unknown')}**.",
             "\"paper\" columns are the published numbers on the real MMR dataset with a pretrained SAM; "
             "\"ours\" are this run's. They are not like for like unless the data and weights are.", ""]
    if context.get("conditions"):
        lines += ["What this run is, in the paper's terms:", "", *[f"- {c}" for c in context["conditions"]], ""]
    first = next(iter(results.values()), {})
    u = first.get("uncertainty")
    if u:
        lines += [f"Every figure of ours is followed by its 95 % interval: {u['method']}, {u['replicates']} resamples "
                  f"of the {first.get('cases', '?')} test cases ({first.get('anomalous_cases', '?')} anomalous), "
                  f"seed {u['seed']}. Detection comparisons use DeLong's paired test, pixel metrics the paired "
                  "bootstrap (the same resamples for every method); a bootstrap p written "
                  f"`{uncertainty.format_p(0.0, uncertainty.bootstrap_p_floor(u['replicates']))}` is at the test's "
                  "floor, 2 / (resamples + 1): no resample crossed zero.", ""]
    lines += ["## Table 2: localisation (pixel AUROC / AU-PRO) and detection (AUROC)", "",
              "| method | fundus AUC ours | fundus PRO ours | OCT AUC ours | OCT PRO ours | detection ours "
              "| fundus AUC / PRO paper | OCT AUC / PRO paper | detection paper |",
              "|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for key, result in results.items():
        name = METHODS[key].title if key in METHODS else key
        paper = PAPER_TABLE2.get(name, {})
        pf, po = paper.get("fundus"), paper.get("oct")
        lines.append(f"| {name} | {_v(result, 'localisation', 'fundus', 'pixel_auroc')} "
                     f"| {_v(result, 'localisation', 'fundus', 'aupro')} "
                     f"| {_v(result, 'localisation', 'oct', 'pixel_auroc')} | {_v(result, 'localisation', 'oct', 'aupro')} "
                     f"| {_v(result, 'detection', _main_score(result))} | {f'{pf[0]:.4f} / {pf[1]:.4f}' if pf else '–'} "
                     f"| {f'{po[0]:.4f} / {po[1]:.4f}' if po else '–'} | {_f(paper.get('detection'))} |")
    lines += ["", "## Table 5: detection AUROC, single modality vs both", "",
              "| method | fundus only | OCT only | both | paper: fundus / OCT / both |", "|---|---:|---:|---:|---|"]
    for key, result in results.items():
        name = METHODS[key].title if key in METHODS else key
        paper = PAPER_TABLE5.get(name)
        lines.append(f"| {name} | {_v(result, 'detection', 'fundus_only')} | {_v(result, 'detection', 'oct_only')} "
                     f"| {_v(result, 'detection', _main_score(result))} "
                     f"| {' / '.join(f'{v:.4f}' for v in paper) if paper else '–'} |")
    if comparisons:
        lines += ["", "## Paired comparisons (same test cases)", "",
                  "Difference = first minus second, with its 95 % interval; p: two-sided, H0 no difference.", "",
                  "| metric | first | second | first | second | difference [95 % CI] | p | test |",
                  "|---|---|---|---:|---:|---:|---:|---|"]
        for label_a, label_b, c in comparisons:
            lines.append(f"| {c.metric.replace('|', ' vs ')} | {label_a} | {label_b} | {c.a:.4f} | {c.b:.4f} | {c.difference:+.4f} "
                         f"[{c.low:+.3f}, {c.high:+.3f}] | {uncertainty.format_p(c.p_value, c.p_floor)} | {c.test} |")
    if MAIN in results:
        r = results[MAIN]
        d = r.get("detection", {})
        lines += ["", "## Table 12: MMRAD's fusion token vs other fusions (detection AUROC)", "",
                  "| setting | ours | paper |", "|---|---:|---:|",
                  f"| maximum of the two image scores | {_v(r, 'detection', 'max')} | {PAPER_TABLE12['max']:.4f} |",
                  f"| mean of the two image scores | {_v(r, 'detection', 'mean')} | {PAPER_TABLE12['mean']:.4f} |",
                  f"| fusion token, fundus then OCT | {_v(r, 'detection', 'fusion')} | {PAPER_TABLE12['fusion']:.4f} |"]
        best_single = max((d.get("fundus_only") or 0), (d.get("oct_only") or 0))
        if "fusion" in r.get("degenerate", []):
            lines += ["", f"**Degenerate fusion score:** it spans a relative range of "
                          f"{r['score_spread']['fusion']:.1e} over the test cases, so its AUROC "
                          f"({d['fusion']:.4f}) reflects float noise, not the cases: the head uses neither modality."]
        elif d.get("fusion") is not None and d["fusion"] < best_single:
            lines += ["", f"**Modality imbalance:** the fused score ({d['fusion']:.4f}) is below the best single "
                          f"modality ({best_single:.4f}): fusion is not using both modalities well (whether the gap "
                          "is significant: the paired comparisons above)."]
        retrieval = r.get("retrieval")
        if retrieval:
            lines += ["", "## Diagnostic: cross-modal retrieval from pooled image embeddings (top-1 accuracy)", "",
                      "Each test case's fundus embedding retrieves among all cases' OCT embeddings (and back) by "
                      "cosine similarity; a hit when its own pair ranks first. MMRAD is not trained to align the "
                      "modalities, so this measures how much case identity its shared encoder carries across them.",
                      "", "| fundus → OCT | OCT → fundus | chance |", "|---:|---:|---:|",
                      f"| {_v(r, 'retrieval', 'fundus_to_oct_top1')} | {_v(r, 'retrieval', 'oct_to_fundus_top1')} "
                      f"| {_f(retrieval['chance'])} |"]
        lines += ["", "## Table 13: MMRAD per symptom (pixel AUROC / AU-PRO)", "",
                  "| modality | id | symptom | test images | ours AUC | ours PRO | paper AUC | paper PRO |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for modality, per in results[MAIN].get("per_symptom", {}).items():
            for class_id, row in per.items():
                paper = PAPER_TABLE13.get(modality, {}).get(int(class_id))
                cell = [_v(r, "per_symptom", modality, class_id, k) for k in ("pixel_auroc", "aupro")]
                lines.append(f"| {modality} | {class_id} | {row['name']} | {row['images']} | {cell[0]} "
                             f"| {cell[1]} | {_f(paper[0] if paper else None)} | {_f(paper[1] if paper else None)} |")
    if transfer:
        lines += ["", "## Table 11: transfer (MMRAD localisation, pixel AUROC / AU-PRO)", "",
                  "| test dataset | trained on | ours AUC | ours PRO | paper AUC | paper PRO |",
                  "|---|---|---:|---:|---:|---:|"]
        for key, (test_name, train_name, modality) in TRANSFER_ROWS.items():
            t = transfer.get(key, {})
            paper = PAPER_TABLE11[key]
            lines.append(f"| {test_name} | {train_name} | {_v(t, 'localisation', modality, 'pixel_auroc')} "
                         f"| {_v(t, 'localisation', modality, 'aupro')} | {paper[0]:.4f} | {paper[1]:.4f} |")
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
               "weights": "yes" if trained.get("pretrained") else "none (random initialisation)",
               "conditions": conditions(params, trained)}
    transfer = {key: json.loads(path.read_text()) for key in TRANSFER_ROWS
                if (path := reports / "transfer" / key / "metrics.json").is_file()}
    atomic_write_text(out, render(results, context, transfer, paired_comparisons(reports, results)))
    return out


def paired_comparisons(reports: Path, results: dict[str, dict]) -> list[tuple[str, str, compare.Comparison]]:
    """MMRAD's fusion against its own single-modality scores, and MMRAD against each baseline (same cases)."""
    evidence = {name: compare.load_evidence(reports / name) for name in results}
    main, rows = results[MAIN], []
    title = METHODS[MAIN].title
    if "fusion" in main.get("detection", {}):
        for other in ("fundus_only", "oct_only", "max"):
            if other in main["detection"]:
                rows.append((f"{title} fusion", f"{title} {other}", compare.compare(
                    evidence[MAIN], evidence[MAIN], f"detection.fusion|{other}", main["detection"]["fusion"],
                    main["detection"][other])))
    for name in BASELINES:
        other = results[name]
        own = _main_score(main)
        rows.append((title, METHODS[name].title, compare.compare(
            evidence[MAIN], evidence[name], f"detection.{own}|{_main_score(other)}", main["detection"][own],
            other["detection"][_main_score(other)])))
        for modality, values in main.get("localisation", {}).items():
            for metric in ("pixel_auroc", "aupro"):
                rows.append((title, METHODS[name].title, compare.compare(
                    evidence[MAIN], evidence[name], f"{modality}.{metric}", values[metric],
                    other["localisation"][modality][metric])))
    return rows


def conditions(params: Params, trained: dict) -> list[str]:
    """Which of the paper's conditions this run is (Table 7's CNN row, Table 4's transforms, ...) and every
    stand-in the random initialisation needs (docs/decisions.md)."""
    m, sim = params.model, params.simulation
    sam = params.weights.sam
    cnn_pretrained = any(w is not None for w in params.weights.resnets)
    lines = [
        f"encoder: SAM {m.encoder} at {m.image_size} px, " + (f"weights {sam.format}:{Path(sam.path).name}" if sam else
                                                              "randomly initialised and frozen (no SAM pre-training)"),
        "LPT CNNs: " + ("pretrained (Table 7: pretrained CNN)" if cnn_pretrained else
                        f"{m.cnn_count} x {m.cnn} without pre-training (Table 7's \"CNN without pre-training\" row)"),
        f"position embeddings: {'SAM checkpoint' if sam else m.position_init + ' (segment-anything leaves them zero)'}; "
        f"CNN stages: {m.cnn_norm} scaling; fusion head input: "
        + ("T_f and each map's max / top-1 % mean (not Eq. 5's T_f alone)" if m.fusion_input == "token_maps"
           else "T_f (Eq. 5)") + f", {m.fusion_norm} normalisation",
        f"simulation: transforms {sim.transforms} (Table 4), pi {sim.probability} per "
        f"{'pair' if sim.pairing == 'pair' else 'image'}", f"token init: {m.token_init} (Table 14)"
        + (" — from a random decoder, so no pre-trained knowledge" if not sam and m.token_init == "pretrained" else ""),
        f"fusion order: {' then '.join(m.fusion_order)} (Table 12); loss {params.train.loss} (Table 10); "
        f"{params.train.steps} steps of {params.train.batch_size} pairs",
        f"tuning: {m.tuning} (Table 8), prompt sharing {m.prompt_sharing} (Table 7); decoder {m.decoder_sharing}, "
        f"mask token {m.mask_token_sharing} (Table 9); trained on {' + '.join(params.train.modalities)} (Table 6)",
    ]
    lesions = params.synthetic.mmr.lesions
    if params.train.dataset == "mmr" and params.is_synthetic("mmr"):
        lines.append("synthetic lesions (the benchmark's difficulty, chosen from the baselines' numbers): "
                     + "; ".join(f"{k} contrast x{v.contrast:g}, size x{v.size:g}"
                                 for k, v in (("fundus", lesions.fundus), ("OCT", lesions.oct))))
    labels = trained.get("labels")
    if labels and "normal_pairs" in labels:
        lines.append("training labels: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in labels.items()))
    return lines
