"""Paired comparisons of two evaluations of the same test cases: the difference, its interval and a p-value.

What an evaluation folder leaves behind (``mmrad.evaluation.evaluate``) is the
evidence: ``scores.csv`` (one row per case: label and every case score) and
``replicates.parquet`` (every metric under the same case resamples). Two
folders are comparable when they scored the same cases (the same case ids,
and for the replicates the same resampling seed):

* a detection AUROC (``detection.<score>``): DeLong's paired test on the two
  per-case score columns (``mmrad.evaluation.uncertainty.delong``);
* anything else (pixel AUROC, AU-PRO, per symptom): the paired bootstrap, the
  difference of the two methods' replicates resample by resample.

The report uses this to compare MMRAD with each baseline, the registry gate
(``mmrad.ops.registry``) to compare a challenger with the champion.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mmrad.core.errors import DataError
from mmrad.evaluation import uncertainty

SCORES = "scores.csv"
REPLICATES = "replicates.parquet"


@dataclass
class Evidence:
    """One evaluation's per-case scores and bootstrap replicates."""

    folder: Path
    case_ids: list[str]
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    replicates: dict[str, np.ndarray]
    cases_digest: str
    seed: str | None


@dataclass(frozen=True)
class Comparison:
    metric: str
    a: float
    b: float
    difference: float  # a - b
    low: float  # 95 % interval of the difference
    high: float
    p_value: float
    test: str
    p_floor: float = 0.0  # the smallest p the test can give (paired bootstrap: 2 / (B + 1)); DeLong: 0


def cases_digest(case_ids: list[str]) -> str:
    """What identifies a test set in a replicates file: the sha256 of its case ids, in order."""
    return hashlib.sha256("\n".join(case_ids).encode()).hexdigest()


def load_evidence(folder: str | Path) -> Evidence:
    """Read ``scores.csv`` and ``replicates.parquet`` of an evaluation folder (the replicates may be absent)."""
    folder = Path(folder)
    path = folder / SCORES
    if not path.is_file():
        raise DataError(path, "per-case scores are missing (run the evaluation first)")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "case_id" not in rows[0] or "label" not in rows[0]:
        raise DataError(path, "per-case scores need a header with case_id, label and score columns")
    case_ids = [r["case_id"] for r in rows]
    try:
        labels = np.array([int(r["label"]) for r in rows])
        scores = {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k not in ("case_id", "label")}
    except (TypeError, ValueError) as exc:
        raise DataError(path, "per-case scores must be numbers", str(exc)) from exc
    digest = cases_digest(case_ids)
    replicates, seed = {}, None
    if (folder / REPLICATES).is_file():
        table = pq.read_table(folder / REPLICATES)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("cases") != digest:
            raise DataError(folder / REPLICATES, "replicates were made on other cases than scores.csv lists")
        seed = meta.get("seed")
        replicates = {name: table.column(name).to_numpy() for name in table.column_names}
    return Evidence(folder, case_ids, labels, scores, replicates, digest, seed)


def comparable(a: Evidence, b: Evidence) -> str | None:
    """None when a and b scored the same cases with the same labels, else why not."""
    if a.case_ids != b.case_ids:
        return f"different test cases ({len(a.case_ids)} vs {len(b.case_ids)}, or another order / set)"
    if not np.array_equal(a.labels, b.labels):
        return "the same cases carry different labels"
    return None


def compare(a: Evidence, b: Evidence, metric: str, value_a: float, value_b: float) -> Comparison:
    """Paired comparison of one metric (flat name: ``detection.fusion``, ``fundus.pixel_auroc`` ...).

    ``value_a`` / ``value_b`` are the metrics' exact values (from metrics.json);
    a detection metric may compare two different score columns, written
    ``detection.fusion|max`` (a's column | b's column).
    """
    why = comparable(a, b)
    if why:
        raise DataError(b.folder, f"cannot compare with {a.folder}: {why}")
    if metric.startswith("detection."):
        names = metric.split(".", 1)[1].split("|")
        col_a, col_b = names[0], names[-1]
        if col_a not in a.scores or col_b not in b.scores:
            raise DataError(b.folder / SCORES, f"no per-case score for {metric}")
        result = uncertainty.delong(a.scores[col_a], b.scores[col_b], a.labels)
        return Comparison(metric, value_a, value_b, value_a - value_b, result.interval[0], result.interval[1],
                          result.p_value, "DeLong")
    if metric not in a.replicates or metric not in b.replicates:
        raise DataError(b.folder / REPLICATES, f"no bootstrap replicates for {metric}")
    if a.seed != b.seed:
        raise DataError(b.folder / REPLICATES, f"replicates resampled with another seed ({b.seed} vs {a.seed})")
    d = a.replicates[metric] - b.replicates[metric]
    low, high = uncertainty.percentile_interval(d)
    return Comparison(metric, value_a, value_b, value_a - value_b, low, high,
                      uncertainty.paired_bootstrap_p(a.replicates[metric], b.replicates[metric]), "paired bootstrap",
                      uncertainty.bootstrap_p_floor(int(np.count_nonzero(np.isfinite(d)))))
