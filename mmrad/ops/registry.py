"""The model registry the ML-ops team promotes from: gate, promote, roll back, list.

Every trained model is a version of one registered MLflow model
(``tracking.model_name``); the ``register`` stage gives the newest the alias
``challenger``. ``promote`` compares challenger and ``champion`` on the gated
metrics of params.yaml (``tracking.gate``) and moves ``champion`` only when
the gate passes:

* no gated metric drops by more than its ``max_regression``, and
* at least one gains ``min_gain`` or more **and** the gain is significant:
  paired on the same test cases (both versions' per-case evidence, logged by
  the register stage under ``evidence/``: DeLong for a detection AUROC, the
  paired case bootstrap for pixel metrics), p below ``tracking.significance``
  divided by the number of gated metrics (Bonferroni: one chance per metric to
  promote noise), and
* every gated metric exists on the challenger's run.

A retrain on the same data and params reproduces the champion's scores, so
its gain is 0 and p = 1: it never promotes. A version without evidence (or
evaluated on other test cases) cannot show a significant gain: the gate says
so and only ``--force`` promotes it.

With no champion yet, the first challenger becomes champion. ``force`` skips
the gate and records who, when and why as version tags. Every promotion
records the version it replaced (``mmrad.previous_champion``), which
``rollback`` restores.

Concurrency: an MLflow alias points at exactly one version, so there is never
more than one champion. All decisions are taken before anything is written,
tags are written before the alias moves, and promoting the version that is
already champion changes nothing: running ``promote`` twice, or from two
processes at once, ends with the same single champion.
"""

from __future__ import annotations

import getpass
import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mmrad.core.errors import DataError
from mmrad.evaluation import uncertainty
from mmrad.evaluation.compare import SCORES, Comparison, Evidence, comparable, compare, load_evidence
from mmrad.evaluation.methods import MAIN
from mmrad.ops.tracking import CHALLENGER, CHAMPION, EVIDENCE, use_tracking

log = logging.getLogger(__name__)

PREVIOUS = "mmrad.previous_champion"


@dataclass
class Row:
    metric: str
    champion: float | None
    challenger: float | None
    min_gain: float
    max_regression: float
    test: Comparison | str | None = None  # the paired test of challenger vs champion, or why there is none
    alpha: float = 0.05  # the significance level this row is held to (already Bonferroni-divided)

    @property
    def delta(self) -> float | None:
        if self.champion is None or self.challenger is None:
            return None
        return self.challenger - self.champion

    @property
    def p_value(self) -> float | None:
        return self.test.p_value if isinstance(self.test, Comparison) else None

    @property
    def verdict(self) -> str:
        if self.challenger is None:
            return "missing"
        if self.champion is None:
            return "new"
        if self.delta < -self.max_regression - 1e-12:
            return "regression"
        if self.delta < self.min_gain - 1e-12:
            return "within tolerance"
        if self.p_value is None:
            return "gain, untested"
        return "gain" if self.p_value < self.alpha else "gain, not significant"


@dataclass
class Decision:
    challenger: str | None
    champion: str | None
    rows: list[Row] = field(default_factory=list)
    passed: bool = False
    reason: str = ""
    promoted: bool = False

    def table(self) -> str:
        lines = [f"challenger: version {self.challenger}   champion: "
                 f"{'version ' + self.champion if self.champion else 'none'}",
                 f"{'metric':44s} {'champion':>9s} {'challenger':>10s} {'delta':>8s} {'95 % CI of delta':>18s} "
                 f"{'p':>8s} {'alpha':>6s}  rule (gain >= / drop <=)  verdict"]
        for r in self.rows:
            fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
            delta = "–" if r.delta is None else f"{r.delta:+.4f}"
            ci = f"[{r.test.low:+.3f}, {r.test.high:+.3f}]" if isinstance(r.test, Comparison) else "–"
            p = "–" if r.p_value is None else uncertainty.format_p(r.p_value, r.test.p_floor)
            lines.append(f"{r.metric:44s} {fmt(r.champion):>9s} {fmt(r.challenger):>10s} {delta:>8s} {ci:>18s} "
                         f"{p:>8s} {r.alpha:6.4f}  {r.min_gain:.3f} / {r.max_regression:.3f}{'':12s} {r.verdict}")
        notes = sorted({r.test for r in self.rows if isinstance(r.test, str)})
        lines += [f"no paired test: {note}" for note in notes]
        lines.append(f"gate: {'PASS' if self.passed else 'FAIL'}: {self.reason}")
        return "\n".join(lines)


def evaluate_gate(challenger: dict[str, float], champion: dict[str, float] | None, gate: dict,
                  tests: dict[str, Comparison | str] | None = None, significance: float = 0.05,
                  ) -> tuple[bool, list[Row], str]:
    """(passed, rows, reason) of the gate on two runs' metrics (``champion`` None: no champion yet).

    ``tests``: per gated metric, the paired comparison of challenger vs champion (``paired_tests``) or the
    reason there is none; a gain counts only when its p-value is below ``significance / len(gate)``.
    """
    alpha = significance / len(gate)
    tests = tests or {}
    rows = [Row(name, None if champion is None else champion.get(name), challenger.get(name),
                rule.min_gain, rule.max_regression, tests.get(name, "no per-case evidence"), alpha)
            for name, rule in gate.items()]
    missing = [r.metric for r in rows if r.verdict == "missing"]
    if missing:
        return False, rows, f"the challenger lacks gated metric(s) {missing}"
    if champion is None:
        return True, rows, "no champion yet: the first challenger becomes champion"
    worse = [r.metric for r in rows if r.verdict == "regression"]
    if worse:
        return False, rows, f"regression beyond tolerance on {worse}"
    if not any(r.verdict == "gain" for r in rows):
        if any(r.verdict.startswith("gain,") for r in rows):
            return False, rows, (f"no gain is significant at p < {alpha:.4g} ({significance} over {len(gate)} gated "
                                 "metrics): it may be noise")
        return False, rows, "no gated metric improves by its min_gain"
    gains = [r.metric for r in rows if r.verdict == "gain"]
    return True, rows, f"improves {gains}, no regression beyond tolerance"


def _client() -> MlflowClient:
    use_tracking()
    return MlflowClient()


def _version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metrics(client: MlflowClient, version) -> dict[str, float]:
    return dict(client.get_run(version.run_id).data.metrics)


def _evidence(version, folder: Path) -> dict[str, Evidence] | str:
    """The per-case evidence logged with a version's run, by evaluation (``mmrad``, ``transfer.mmr_to_idrid``),
    or why there is none."""
    try:
        root = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=EVIDENCE,
                                                        dst_path=str(folder)))
    except (MlflowException, OSError) as exc:
        return f"version {version.version} has no per-case evidence ({type(exc).__name__})"
    found = {d.name: load_evidence(d) for d in sorted(root.iterdir()) if (d / SCORES).is_file()}
    return found or f"version {version.version} has no per-case evidence"


def paired_tests(challenger: dict[str, Evidence] | str, champion: dict[str, Evidence] | str,
                 values: tuple[dict, dict], metrics: list[str]) -> dict[str, Comparison | str]:
    """Per gated metric (MLflow name), the challenger-vs-champion comparison on the same cases, or why not.

    A metric belongs to the evaluation whose name prefixes it (``transfer.mmr_to_idrid.fundus.pixel_auroc``),
    else to MMRAD's own (``detection.fusion``).
    """
    out: dict[str, Comparison | str] = {}
    for metric in metrics:
        if isinstance(challenger, str) or isinstance(champion, str):
            out[metric] = challenger if isinstance(challenger, str) else champion
            continue
        key = max((k for k in challenger if metric.startswith(k + ".")), key=len, default=MAIN)
        inner = metric[len(key) + 1:] if metric.startswith(key + ".") else metric
        if key not in challenger or key not in champion:
            out[metric] = f"no evidence of the {key} evaluation on both versions"
            continue
        why = comparable(challenger[key], champion[key])
        if why:
            out[metric] = f"{key}: {why}"
            continue
        try:
            out[metric] = compare(challenger[key], champion[key], inner, values[0].get(metric, float("nan")),
                                  values[1].get(metric, float("nan")))
        except DataError as exc:
            out[metric] = str(exc)
    return out


def _who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return "unknown"


def promote(params, dry_run: bool = False, force: bool = False, reason: str | None = None,
            user: str | None = None) -> Decision:
    """Move ``champion`` to the challenger if the gate passes (or ``force`` with a ``reason``)."""
    if force and not (reason and reason.strip()):
        raise DataError("--reason", "a forced promotion needs a reason")
    name = params.tracking.model_name
    client = _client()
    challenger = _version(client, name, CHALLENGER)
    if challenger is None:
        raise DataError(f"models:/{name}@{CHALLENGER}", "no challenger to promote (run the register stage first)")
    champion = _version(client, name, CHAMPION)
    decision = Decision(str(challenger.version), str(champion.version) if champion else None)
    new, old = _metrics(client, challenger), _metrics(client, champion) if champion else None
    tests = None
    if champion is not None and champion.version != challenger.version:
        with tempfile.TemporaryDirectory(prefix="mmrad-gate-") as tmp:  # removed with everything in it
            tests = paired_tests(_evidence(challenger, Path(tmp) / "challenger"), _evidence(champion, Path(tmp) / "champion"),
                                 (new, old), list(params.tracking.gate))
    passed, decision.rows, decision.reason = evaluate_gate(new, old, params.tracking.gate, tests,
                                                           params.tracking.significance)
    decision.passed = passed
    if decision.champion == decision.challenger:
        decision.passed, decision.reason = True, f"version {challenger.version} is already champion: nothing to do"
        return decision
    if dry_run or not (passed or force):
        return decision
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tags = {"mmrad.promoted_at": now, "mmrad.promoted_by": user or _who(),
            "mmrad.promotion": "gate" if passed else "forced",
            PREVIOUS: decision.champion or ""}
    if force and not passed:
        tags["mmrad.force_reason"] = reason.strip()
        decision.reason = f"FORCED past a failed gate ({decision.reason}): {reason.strip()}"
    for key, value in tags.items():
        _retry(lambda k=key, v=value: client.set_model_version_tag(name, challenger.version, k, v))
    _retry(lambda: client.set_registered_model_alias(name, CHAMPION, decision.challenger))
    decision.promoted = True
    log.info("promoted %s version %s to %s (%s)", name, challenger.version, CHAMPION, decision.reason)
    return decision


def rollback(params, user: str | None = None) -> tuple[str, str]:
    """Give ``champion`` back to the version it replaced; returns (from version, to version)."""
    name = params.tracking.model_name
    client = _client()
    champion = _version(client, name, CHAMPION)
    if champion is None:
        raise DataError(f"models:/{name}@{CHAMPION}", "there is no champion to roll back")
    previous = champion.tags.get(PREVIOUS, "")
    if not previous:
        raise DataError(f"models:/{name}/{champion.version}", "the champion replaced no earlier version: "
                        "nothing to roll back to")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client.set_model_version_tag(name, champion.version, "mmrad.rolled_back_at", now)
    client.set_model_version_tag(name, champion.version, "mmrad.rolled_back_by", user or _who())
    # the restored champion keeps its own record of what it replaced: a second rollback goes further back
    client.set_registered_model_alias(name, CHAMPION, previous)
    log.info("rolled %s back from version %s to %s", name, champion.version, previous)
    return str(champion.version), previous


def list_versions(params, keys: tuple[str, ...] | None = None) -> str:
    """A table of the registered versions: aliases, run, key metrics, promotion tags."""
    name = params.tracking.model_name
    client = _client()
    keys = keys or tuple(params.tracking.gate)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True)
    if not versions:
        return f"no versions of {name} registered yet"
    short = [k.replace("transfer.", "t.").replace(".pixel_auroc", " AUC") for k in keys]
    widths = [max(8, len(s)) for s in short]
    lines = ["version  aliases              " + "  ".join(f"{s:>{w}s}" for s, w in zip(short, widths)) + "  promoted"]
    for v in versions:
        metrics = _metrics(client, v)
        aliases = ",".join(client.get_model_version(name, v.version).aliases) or "–"
        values = "  ".join(f"{metrics[k]:{w}.4f}" if k in metrics else f"{'–':>{w}s}" for k, w in zip(keys, widths))
        promoted = v.tags.get("mmrad.promoted_at", "")
        if promoted:
            promoted += f" by {v.tags.get('mmrad.promoted_by', '?')} ({v.tags.get('mmrad.promotion', '?')})"
        lines.append(f"{str(v.version):>7s}  {aliases:20s} {values}  {promoted}")
    return "\n".join(lines)


TRANSIENT = ("database is locked", "timeout", "unique constraint", "integrityerror", "temporarily unavailable")


def _retry(write, attempts: int = 5):
    """A registry write, retried on transient store errors.

    Transient: a locked sqlite file, a server timeout, or another process
    inserting the same tag first (a unique-constraint race: the retry then
    updates the row it inserted).
    """
    for attempt in range(attempts):
        try:
            return write()
        except Exception as exc:  # MlflowException or the store's own (sqlalchemy) error
            if attempt == attempts - 1 or not any(t in f"{type(exc).__name__} {exc}".lower() for t in TRANSIENT):
                raise
            time.sleep(0.2 * 2 ** attempt)
