"""Benchmark: the prepare stage's per-image work on a local Dask cluster, 2 workers vs 1, side by side.

Runs the real stage command ``python -m flows prepare <dataset>`` (a Prefect
flow run whose per-image work is Prefect task mapping on a Dask task runner)
with ``prepare.workers`` = 1 and 2, alternating, ``--repeats`` times each, on
the already generated default data, and prints medians and the ratio:

* mapped work: the time prepare_dataset itself logs ("done in X s": scanning,
  the mapped decode / validate / resize / cache work, the manifest), with the
  Dask cluster already up;
* steady mapping: from the first mapped task starting on a worker to the
  last result (the part that scales; it leaves out the ~3 s a fresh Dask
  worker takes to run its first Prefect task, paid once per worker, in
  parallel);
* whole command: process start to exit, including Prefect's temporary API and
  the cluster's start and stop.

    .venv/bin/python bench/prepare_dask.py [--repeats 3] [--scale 2]

``--scale S`` first generates the synthetic MMR with S times the default image
sides (the default is a quarter of the real fundus side and half the real OCT
side; S = 2 gives real-size OCT B-scans) into a temporary folder, so the
per-image work has the weight real data gives it.

Target (issue 6): at least 1.6x with 2 workers vs 1 on a 2-core machine.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]


def _clock(stamp: str) -> float:
    h, m, sec = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def run(params_file: Path, dataset: str, out: Path) -> tuple[float, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows", "--params", str(params_file), "prepare", dataset,
                           "--out", str(out)], cwd=PROJECT, capture_output=True, text=True)
    whole = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"prepare failed:\n{done.stderr[-3000:]}")
    inner = re.search(r"prepare \w+: done in ([0-9.]+) s", done.stderr)
    first = re.search(r"^(\d\d:\d\d:[0-9.]+) .*images on Dask worker", done.stderr, re.M)
    last = re.search(r"^(\d\d:\d\d:[0-9.]+) .*prepare \w+: done in", done.stderr, re.M)
    return float(inner.group(1)), _clock(last.group(1)) - _clock(first.group(1)), whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="image sides x S (generated into a temporary folder)")
    args = parser.parse_args()
    args.dataset = "mmr"
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    root = Path(raw["datasets"][args.dataset]["root"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.scale != 1:
            mmr = raw["synthetic"]["mmr"]
            mmr["fundus_size"] = [v * args.scale for v in mmr["fundus_size"]]
            mmr["oct_size"] = [v * args.scale for v in mmr["oct_size"]]
            (tmp / "generate.yaml").write_text(yaml.safe_dump(raw))
            subprocess.run([sys.executable, "-m", "mmrad", "-q", "--params", str(tmp / "generate.yaml"), "generate",
                            "--out", str(tmp / "raw")], cwd=PROJECT, check=True)
            raw["datasets"]["mmr"]["root"] = str(tmp / "raw" / "MMR")
        elif not (PROJECT / root).is_dir():
            sys.exit(f"{root} is missing: run `dvc repro generate` first")
        files = {}
        for workers in (1, 2):
            raw["prepare"]["workers"] = workers
            files[workers] = tmp / f"params-{workers}.yaml"
            files[workers].write_text(yaml.safe_dump(raw))
            # relative dataset roots resolve against the project (the command runs there)
        results: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
        for repeat in range(args.repeats):
            for workers in (1, 2):
                results[workers].append(run(files[workers], args.dataset, tmp / f"out-{workers}"))
                inner, steady, whole = results[workers][-1]
                print(f"repeat {repeat + 1}, {workers} worker(s): mapped work {inner:.1f} s, steady mapping "
                      f"{steady:.1f} s, whole command {whole:.1f} s", flush=True)
        images = len(list((tmp / "out-1" / "images").rglob("*.png")))
    sizes = f"fundus {raw['synthetic']['mmr']['fundus_size']}, OCT {raw['synthetic']['mmr']['oct_size']}"
    print(f"\nprepare {args.dataset} ({images} images: {sizes} -> {raw['prepare']['resolution']}), "
          f"median of {args.repeats}:")
    inner = {w: statistics.median(r[0] for r in results[w]) for w in (1, 2)}
    steady = {w: statistics.median(r[1] for r in results[w]) for w in (1, 2)}
    whole = {w: statistics.median(r[2] for r in results[w]) for w in (1, 2)}
    print("| | 1 worker | 2 workers | speed-up |")
    print("|---|---|---|---|")
    print(f"| mapped work | {inner[1]:.1f} s | {inner[2]:.1f} s | {inner[1] / inner[2]:.2f}x |")
    print(f"| steady mapping | {steady[1]:.1f} s | {steady[2]:.1f} s | {steady[1] / steady[2]:.2f}x |")
    print(f"| whole command | {whole[1]:.1f} s | {whole[2]:.1f} s | {whole[1] / whole[2]:.2f}x |")


if __name__ == "__main__":
    main()
