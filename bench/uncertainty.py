"""What the intervals cost: ``evaluate_predictions`` with and without the case bootstrap, side by side.

Runs on the prepared default test split (``data/prepared/mmr``: the real masks, 50 cases x 2 modalities at
256 px) with maps of the same shape (the masks plus noise, seeded: the metrics' cost does not depend on how
good the maps are). Prints the median of ``--repeats`` runs per setting and the ratio, and the share of the
evaluate stage's wall time (``--stage-seconds``, from dvc repro's log) the intervals add.

    python bench/uncertainty.py [--prepared data/prepared/mmr] [--repeats 3] [--stage-seconds 60]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from mmrad.core.params import load_params
from mmrad.data.splits import load_split
from mmrad.evaluation.evaluate import evaluate_predictions
from mmrad.evaluation.inference import Predictions, with_combined_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", default="data/prepared/mmr")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stage-seconds", type=float, default=None,
                        help="wall time of one evaluate stage, to express the cost as a share of it")
    args = parser.parse_args()
    params = load_params()
    test = load_split(args.prepared)
    rng = np.random.default_rng(0)
    maps = {m: (0.6 * (masks > 0) + rng.random(masks.shape)).astype(np.float32) for m, masks in test.masks.items()}
    scores = {f"{m}_only": v.reshape(len(v), -1).max(1) for m, v in maps.items()}
    scores["fusion"] = scores["fundus_only"] + scores["oct_only"]
    predictions = with_combined_scores(Predictions(maps, scores))
    off = params.evaluation.model_copy(update={"bootstrap": 0})
    timings: dict[str, list[float]] = {"without intervals": [], f"with {params.evaluation.bootstrap} resamples": []}
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
        for name, settings in zip(timings, (off, params.evaluation)):
            start = time.perf_counter()
            evaluate_predictions(test, predictions, settings, params.seed)
            timings[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in timings.items()}
    base, full = medians.values()
    pixels = sum(v.size for v in maps.values())
    print(f"test split: {len(test.case_ids)} cases, {pixels / 1e6:.1f} M pixels; median of {args.repeats}")
    for name, value in medians.items():
        print(f"  {name:28s} {value:7.2f} s")
    print(f"  intervals cost            {full - base:7.2f} s  (ratio {full / base:.2f}x)")
    if args.stage_seconds:
        print(f"  share of a {args.stage_seconds:.0f} s evaluate stage: {(full - base) / args.stage_seconds:.1%}")


if __name__ == "__main__":
    main()
