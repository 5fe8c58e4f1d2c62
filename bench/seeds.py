"""Every method with several seeds (issue 13): its mean and an interval over seeds and cases.

Runs MMRAD (train, then evaluate), PaDiM and PatchCore (evaluate) once per
seed on the project's prepared MMR data (``data/prepared/mmr``, from ``dvc
repro``), through the same ``mmrad`` commands ``dvc repro`` runs, in a
temporary folder (nothing in the project is touched). Only ``seed`` changes:
it seeds MMRAD's initialisation and its training's simulation, and the
baselines' random ResNet trunks, PaDiM's channel draw and PatchCore's
projection; the data stays the committed one.

It prints each seed's detection AUROCs, the mean over seeds with a 95 %
interval that resamples seeds and cases (``uncertainty.over_seeds``, 1000
replicates), each seed's pixel AUROC, and MMRAD's fused score against each
baseline's detection, paired over the same case resamples.

    .venv/bin/python bench/seeds.py                        # seeds: params.yaml's, 1 and 2
    .venv/bin/python bench/seeds.py --seeds 7 8 --methods padim patchcore
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from mmrad_cli import PROJECT, run

from mmrad.evaluation.methods import main_score
from mmrad.evaluation.metrics import detection_auroc
from mmrad.evaluation.uncertainty import case_weights, over_seeds, paired_bootstrap_p, percentile_interval

METHODS = ("mmrad", "padim", "patchcore")
REPLICATES = 1000


def _evaluate(method: str, params: Path, work: Path) -> Path:
    out = work / method
    if method == "mmrad":
        run("--params", str(params), "train", "--out", str(work / "model"), "--checkpoints", str(work / "ck"))
        run("--params", str(params), "evaluate", "mmrad", "--model", str(work / "model" / "model.pt"),
            "--out", str(out), quiet_stderr=True)
    else:
        run("--params", str(params), "evaluate", method, "--out", str(out), quiet_stderr=True)
    return out


def _cell(point: float, replicates: np.ndarray) -> str:
    lo, hi = percentile_interval(replicates)
    return f"{point:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: params.yaml's seed, 1, 2)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the temporary folder
    base = yaml.safe_load((PROJECT / "params.yaml").read_text())
    seeds = args.seeds or [base["seed"], 1, 2]
    prepared = PROJECT / "data" / "prepared" / base["train"]["dataset"]
    if not (prepared / "manifest.parquet").is_file():
        sys.exit(f"{prepared}: no prepared data; run `dvc repro` first (this bench reuses its data)")
    scores: dict[str, list[pd.DataFrame]] = {m: [] for m in args.methods}
    pixel: dict[str, list[dict]] = {m: [] for m in args.methods}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmrad-seeds-") as tmp:
        for seed in seeds:
            work = Path(tmp) / str(seed)
            work.mkdir()
            params = work / "params.yaml"
            params.write_text(yaml.safe_dump({**base, "seed": seed}))
            for method in args.methods:
                out = _evaluate(method, params, work)
                scores[method].append(pd.read_csv(out / "scores.csv").set_index("case_id").sort_index())
                pixel[method].append(json.loads((out / "metrics.json").read_text())["localisation"])
    labels = scores[args.methods[0]][0]["label"].to_numpy()
    weights = case_weights(labels, REPLICATES, base["seed"])
    print(f"\n{len(labels)} test cases ({int(labels.sum())} anomalous), seeds {seeds}, {REPLICATES} replicates "
          f"(cases and seeds resampled); wall time {time.perf_counter() - start:.0f} s\n")
    print("| method | score | " + " | ".join(f"seed {s}" for s in seeds) + " | mean over seeds [95 % CI] |")
    print("|---|---|" + "---:|" * (len(seeds) + 1))
    fused, detection = {}, {}
    for method in args.methods:
        detection[method] = main_score(scores[method][0].columns.drop("label"))  # as report.md: fusion, else max
        for key in dict.fromkeys([detection[method], "fundus_only", "oct_only"]):
            runs = np.stack([df[key].to_numpy() for df in scores[method]])
            point, reps = over_seeds(runs, labels, weights, base["seed"])
            singles = [detection_auroc(r, labels) for r in runs]
            print(f"| {method} | {key} | " + " | ".join(f"{v:.3f}" for v in singles) + f" | {_cell(point, reps)} |")
            if key == detection[method]:
                fused[method] = (point, reps)
    print("\n| method | modality | pixel AUROC per seed | mean | AU-PRO per seed | mean |")
    print("|---|---|---|---:|---|---:|")
    for method in args.methods:
        for modality in ("fundus", "oct"):
            auc = [p[modality]["pixel_auroc"] for p in pixel[method]]
            pro = [p[modality]["aupro"] for p in pixel[method]]
            print(f"| {method} | {modality} | {', '.join(f'{v:.3f}' for v in auc)} | {np.mean(auc):.3f} "
                  f"| {', '.join(f'{v:.3f}' for v in pro)} | {np.mean(pro):.3f} |")
    if "mmrad" in fused:
        print("\n| MMRAD fusion vs | difference of the seed means [95 % CI] | p (paired bootstrap) |")
        print("|---|---:|---:|")
        for method in (m for m in args.methods if m != "mmrad"):
            diff = fused["mmrad"][1] - fused[method][1]
            print(f"| {method} {detection[method]} | {_cell(fused['mmrad'][0] - fused[method][0], diff)} "
                  f"| {paired_bootstrap_p(fused['mmrad'][1], fused[method][1]):.3f} |")


if __name__ == "__main__":
    main()
