"""Benchmark: data-parallel training throughput, 2 gloo processes vs 1 process, side by side on the CPU.

Runs the real `mmrad train` on the default prepared data and params with
``train.steps`` = --steps and ``train.processes`` = 1 and 2 (torchrun, gloo),
alternating, --repeats times each, and prints the median training-loop
throughput (cases per second, from the run's own metrics.json "seconds",
which excludes start-up and model building) and the whole command's time.

    .venv/bin/python bench/ddp.py [--steps 12] [--repeats 2]

On a 2-core machine one process already uses both cores (torch's intra-op
threads); two processes get one thread each (torchrun sets OMP_NUM_THREADS=1),
so this measures DDP's overhead more than a speed-up. On N GPUs each process
has its own device and throughput scales with N.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    prepared = PROJECT / "data" / "prepared" / raw["train"]["dataset"]
    if not prepared.is_dir():
        sys.exit(f"{prepared} is missing: run `dvc repro prepare@{raw['train']['dataset']}` first")
    batch = raw["train"]["batch_size"]
    results: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for repeat in range(args.repeats):
            for processes in (1, 2):
                raw["train"].update(steps=args.steps, processes=processes, checkpoint_every=args.steps)
                params = tmp / f"params-{processes}.yaml"
                params.write_text(yaml.safe_dump(raw))
                out = tmp / f"model-{processes}-{repeat}"
                started = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "mmrad", "-q", "--params", str(params), "train",
                                       "--prepared", str(prepared), "--out", str(out),
                                       "--checkpoints", str(tmp / f"ckpt-{processes}-{repeat}")],
                                      cwd=PROJECT, capture_output=True, text=True)
                whole = time.perf_counter() - started
                if done.returncode:
                    sys.exit(f"train failed:\n{done.stderr[-3000:]}")
                seconds = json.loads((out / "metrics.json").read_text())["seconds"]
                results[processes].append((args.steps * batch / seconds, whole))
                print(f"repeat {repeat + 1}, {processes} process(es): {results[processes][-1][0]:.2f} cases/s "
                      f"(loop {seconds:.1f} s), whole command {whole:.1f} s", flush=True)
    rate = {p: statistics.median(r[0] for r in results[p]) for p in (1, 2)}
    whole = {p: statistics.median(r[1] for r in results[p]) for p in (1, 2)}
    print(f"\nmmrad train, {raw['model']['encoder']}@{raw['model']['image_size']}, batch {batch}, "
          f"{args.steps} steps, median of {args.repeats}:")
    print("| | 1 process | 2 processes (gloo) | ratio |")
    print("|---|---|---|---|")
    print(f"| training throughput | {rate[1]:.2f} cases/s | {rate[2]:.2f} cases/s | {rate[2] / rate[1]:.2f}x |")
    print(f"| whole command | {whole[1]:.1f} s | {whole[2]:.1f} s | {whole[1] / whole[2]:.2f}x |")


if __name__ == "__main__":
    main()
