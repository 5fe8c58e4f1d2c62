"""Benchmark: `mmrad predict` latency per fundus + OCT pair on the CPU default.

Loads the default pipeline's model once (models/mmrad with params.yaml, or
--model models:/mmrad@champion), then scores --cases test pairs of the
prepared MMR cache one at a time (batch of one: the clinic's case), through
the same predict_files the command uses, with and without the overlay PNG,
and prints the medians. A pair's latency includes reading both files,
resizing, the paired forward pass and the two single-modal passes (the
per-modality scores), and writing the outputs.

    .venv/bin/python bench/predict_latency.py [--cases 10] [--model models/mmrad]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from mmrad.ops.predict import find_cases, load_model, predict_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--model", default=str(PROJECT / "models" / "mmrad"))
    args = parser.parse_args()
    started = time.perf_counter()
    model, params = load_model(args.model, PROJECT / "params.yaml")
    loading = time.perf_counter() - started
    cases = find_cases(PROJECT / "data" / "prepared" / "mmr" / "images" / "test")[: args.cases]
    timings: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        predict_files(model, params, cases[:1], Path(tmp) / "warm-up", overlays=False)
        for i, case in enumerate(cases):
            for overlays in (False, True):  # side by side, alternating
                started = time.perf_counter()
                predict_files(model, params, [case], Path(tmp) / f"{i}-{overlays}", overlays=overlays)
                timings[overlays].append(time.perf_counter() - started)
    print(f"mmrad predict, {params.model.encoder}@{params.model.image_size}, CPU ({torch.get_num_threads()} threads), "
          f"{len(cases)} pairs one at a time:")
    print(f"| model load | {loading:.2f} s |")
    print(f"| per pair, scores only (median) | {statistics.median(timings[False]) * 1000:.0f} ms |")
    print(f"| per pair, scores + overlay PNG (median) | {statistics.median(timings[True]) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
