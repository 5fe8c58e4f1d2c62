"""Benchmark: what Prefect and MLflow add to the default `dvc repro`.

Runs in the project (after a full `dvc repro`, so the inputs exist), side by
side and interleaved ``--repeats`` times:

* one short stage (`report`) plainly (MMRAD_ORCHESTRATION=off) and as a
  Prefect flow run, (a) with Prefect's temporary local API (what a plain
  `dvc repro` pays per stage) and (b) against a running API (the retrain
  flow shares its API with its stages; a team server does the same): the
  difference is the per-stage orchestration overhead;
* the register stage (MLflow tracking + registry, into a scratch store);
* a no-op `dvc repro`.

The whole-pipeline overhead is then (stages x per-stage overhead + register)
against the stage times of the default run recorded in docs/benchmarks.md
(``--pipeline-seconds``): the target is at most 15 % or 20 s, whichever is
larger.

    .venv/bin/python bench/orchestration.py [--repeats 3] [--pipeline-seconds 1310]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]


def timed(args: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(args, cwd=PROJECT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{args} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_count() -> int:
    """Stages of dvc.yaml, foreach expanded."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    count = 0
    for stage in stages.values():
        each = stage.get("foreach")
        if each is None:
            count += 1
        elif isinstance(each, str):  # ${datasets}
            count += len(params[each.strip("${}")])
        else:
            count += len(each)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline-seconds", type=float, default=None,
                        help="the default pipeline's total stage time without orchestration (docs/benchmarks.md)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mmrad-bench-orch-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base.update(PREFECT_HOME=str(scratch / "prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{scratch / 'mlflow.db'}")
    report = [sys.executable, "-m", "flows", "report", "--out", str(scratch / "report.md")]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}/api"
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        timed(report, {**base, "PREFECT_API_URL": api})  # warm-up: database migrations, imports
        timed(report, base)
        plain, temporary, shared, register = [], [], [], []
        for _ in range(args.repeats):
            plain.append(timed(report, {**base, "MMRAD_ORCHESTRATION": "off"}))
            temporary.append(timed(report, base))
            shared.append(timed(report, {**base, "PREFECT_API_URL": api}))
            register.append(timed([sys.executable, "-m", "mmrad", "register", "--out",
                                   str(scratch / "registered.json")], base))
        noop = [timed([sys.executable, "-m", "dvc", "repro"], base) for _ in range(args.repeats)]
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)

    med = statistics.median
    stages = stage_count()
    per_temporary, per_shared = med(temporary) - med(plain), med(shared) - med(plain)
    print(f"stage `report`, median of {args.repeats}: plain {med(plain):.1f} s, Prefect temporary API "
          f"{med(temporary):.1f} s (+{per_temporary:.1f} s), Prefect running API {med(shared):.1f} s "
          f"(+{per_shared:.1f} s)")
    print(f"register stage (MLflow run + model + registry): {med(register):.1f} s")
    print(f"no-op dvc repro: {med(noop):.2f} s (target <= 3 s)")
    for label, per in (("plain `dvc repro` (temporary API per stage)", per_temporary),
                       ("retrain flow / team server (one API)", per_shared)):
        total = stages * per + med(register)
        line = f"{label}: {stages} stages x {per:.1f} s + register {med(register):.1f} s = {total:.0f} s"
        if args.pipeline_seconds:
            budget = max(0.15 * args.pipeline_seconds, 20.0)
            line += (f" = {100 * total / args.pipeline_seconds:.1f} % of {args.pipeline_seconds:.0f} s "
                     f"(budget {budget:.0f} s: {'met' if total <= budget else 'NOT met'})")
        print(line)


if __name__ == "__main__":
    main()
