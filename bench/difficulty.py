"""Choose the benchmark's lesion difficulty from the baselines' numbers only (issue 13).

For each setting of ``synthetic.mmr.lesions`` (fundus / OCT lesion contrast and
size), this renders the MMR phantom with the default test-set size, prepares
it and evaluates PaDiM and PatchCore on it, through the same ``mmrad`` commands
``dvc repro`` runs, in a temporary folder (nothing in the project is touched).
It prints each baseline's pixel AUROC and single-modality detection AUROC with
their 95 % intervals. MMRAD is not run: the setting is chosen before MMRAD is
compared (docs/decisions.md, "The benchmark's lesion difficulty").

    .venv/bin/python bench/difficulty.py --setting 1,1,1,1 --setting 0.5,1,1,2
    .venv/bin/python bench/difficulty.py --setting 0.2,0.5,0.9,2.5 --seeds 20241123 1 2
    (each setting: fundus contrast, fundus size, OCT contrast, OCT size)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mmrad_cli import PROJECT, run

METHODS = ("padim", "patchcore")


def _params(base: dict, setting: tuple[float, float, float, float], root: Path) -> dict:
    raw = json.loads(json.dumps(base))
    fc, fs, oc, os_ = setting
    raw["synthetic"]["mmr"]["lesions"] = {"fundus": {"contrast": fc, "size": fs}, "oct": {"contrast": oc, "size": os_}}
    # only MMR is evaluated: the transfer datasets at their smallest
    raw["synthetic"]["idrid"].update(seg_train=1, seg_test=1, grading_train=1, grading_test=1)
    raw["synthetic"]["resc"].update(train_good=1, val_good=1, val_ungood=1, test_good=1, test_ungood=1)
    raw["datasets"]["mmr"]["root"] = str(root / "raw" / "MMR")
    return raw


def _row(name: str, setting, metrics: dict) -> str:
    loc, det, ci = metrics["localisation"], metrics["detection"], metrics["ci95"]

    def cell(value, interval):
        return f"{value:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"

    cells = [cell(loc[m]["pixel_auroc"], ci["localisation"][m]["pixel_auroc"]) for m in ("fundus", "oct")]
    cells += [cell(det[k], ci["detection"][k]) for k in ("fundus_only", "oct_only", "max")]
    return "| " + " | ".join([", ".join(f"{v:g}" for v in setting), name, *cells]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", required=True,
                        help="fundus contrast, fundus size, OCT contrast, OCT size (e.g. 0.5,1,1,2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="the baselines' seeds (their random trunks, PaDiM's channel draw, PatchCore's projection); "
                             "the data is rendered with params.yaml's seed either way (default: params.yaml's)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the temporary folder
    base = yaml.safe_load((PROJECT / "params.yaml").read_text())
    mmr = base["synthetic"]["mmr"]
    print(f"MMR test set: {mmr['test_normal']} normal + {mmr['test_anomalous']} anomalous pairs, "
          f"{mmr['train_normal']} healthy training pairs; seed {base['seed']}")
    print("| fundus c, s, OCT c, s | method | fundus pixel AUROC | OCT pixel AUROC | fundus-only detection "
          "| OCT-only detection | max detection |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for text in args.setting:
        setting = tuple(float(v) for v in text.split(","))
        if len(setting) != 4:
            parser.error(f"--setting {text}: four numbers, comma-separated")
        with tempfile.TemporaryDirectory(prefix="mmrad-difficulty-") as tmp:
            root = Path(tmp)
            params = root / "params.yaml"
            params.write_text(yaml.safe_dump(_params(base, setting, root)))
            start = time.perf_counter()
            run("--params", str(params), "generate", "--out", str(root / "raw"))
            run("--params", str(params), "prepare", "mmr", "--out", str(root / "prepared"))
            for seed in args.seeds or [base["seed"]]:
                seeded = root / f"params-{seed}.yaml"
                seeded.write_text(yaml.safe_dump({**_params(base, setting, root), "seed": seed}))
                for method in METHODS:
                    out = root / f"{method}-{seed}"
                    run("--params", str(seeded), "evaluate", method, "--prepared", str(root / "prepared"),
                        "--out", str(out), quiet_stderr=True)  # no progress bars
                    name = method if args.seeds is None else f"{method} (seed {seed})"
                    print(_row(name, setting, json.loads((out / "metrics.json").read_text())), flush=True)
            print(f"<!-- setting {text}: {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
