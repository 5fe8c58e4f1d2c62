"""Benchmark: the README's first command, stage by stage, with and without Prefect.

Each side is ``dvc repro`` on its own fresh clone of HEAD: with Prefect (each
stage a Prefect flow run against the project's own Prefect server, started by
the first stage: the shipped default) and plainly (``MMRAD_ORCHESTRATION=off``).
Both sides pay the same fresh-clone costs (an empty DVC cache, Python compiling
the project's modules); the Prefect side also pays its server's first start,
database creation included. The sides alternate: plain first in the first
pair, Prefect first in the second, and so on (``--pairs``). After each Prefect
side, a no-op ``dvc repro`` (``--noop-repeats`` times).

Each side's stage processes are watched from outside: a stage's wall time runs
from its process appearing under dvc to its end, its peak memory is the
largest summed RSS of its process tree (sampled every ``--interval`` s; the
project's Prefect server is counted apart, it serves every stage). The Prefect
overhead is the difference of the two sides' totals in each pair. Both sides
must write the same bytes (dvc.lock's output hashes are compared).

    .venv/bin/python bench/pipeline.py               # one pair: plain, then Prefect
    .venv/bin/python bench/pipeline.py --pairs 2     # and then Prefect, then plain

The clones use this checkout's virtual environment (the README's setup step is
timed in docs/benchmarks.md on its own).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from scipy import stats

PROJECT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")


class Watch:
    """Stage processes under one ``dvc repro``: (name, wall s, peak MB) per stage, and the server's peak MB."""

    def __init__(self, dvc: subprocess.Popen, interval: float):
        self.dvc, self.interval = psutil.Process(dvc.pid), interval
        self.stages: dict[int, dict] = {}  # pid -> {name, start, end, peak}
        self.server_peak = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _name(cmdline: list[str]) -> str | None:
        """``evaluate reports/transfer/mmr_to_idrid`` for a stage process (dvc starts it through a shell)."""
        words = " ".join(cmdline).split()
        for module in ("flows", "mmrad"):
            if "-m" in words and module in words:
                rest = words[words.index(module) + 1:]
                out = rest[rest.index("--out") + 1] if "--out" in rest[:-1] else " ".join(rest[1:2])
                return f"{rest[0] if rest else module} {out}"
        return None

    def _run(self) -> None:
        while self.dvc.is_running():
            now = time.perf_counter()
            seen = set()
            try:
                children = self.dvc.children()
            except psutil.Error:
                break
            for child in children:
                try:
                    cmdline = child.cmdline()
                    name = self._name(cmdline)
                    if name is None:
                        continue
                    tree = [child, *child.children(recursive=True)]
                    rss, server = 0, 0
                    for p in tree:
                        try:
                            size = p.memory_info().rss
                            if "flows.server" in p.cmdline() or "server" in p.cmdline()[1:4]:
                                server += size
                            else:
                                rss += size
                        except psutil.Error:
                            pass
                except psutil.Error:
                    continue
                seen.add(child.pid)
                entry = self.stages.setdefault(child.pid, {"name": name, "start": now, "peak": 0})
                entry["end"], entry["peak"] = now, max(entry["peak"], rss / 2**20)
                self.server_peak = max(self.server_peak, server / 2**20)
            for pid, entry in self.stages.items():
                if pid not in seen and "done" not in entry:
                    entry["done"] = True
            time.sleep(self.interval)

    def rows(self) -> list[tuple[str, float, float]]:
        self.thread.join()
        return [(e["name"], e["end"] - e["start"] + self.interval, e["peak"]) for e in self.stages.values()]


def repro(project: Path, env: dict, interval: float, *extra: str) -> tuple[float, list, float]:
    started = time.perf_counter()
    process = subprocess.Popen([DVC, "repro", *extra], cwd=project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    watch = Watch(process, interval)
    output = process.communicate()[0]
    total = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"dvc repro {' '.join(extra)} failed:\n{output[-3000:]}")
    return total, watch.rows(), watch.server_peak


def output_hashes(project: Path) -> dict[str, str]:
    """md5 of every cached output in dvc.lock (the uncached metrics hold wall times and run ids)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {o["path"]: o.get("md5", "") for stage in lock.values() for o in stage.get("outs", [])}


def side(scratch: Path, name: str, env: dict, interval: float, noop_repeats: int) -> dict:
    """``dvc repro`` on a fresh clone of HEAD: total, stage rows, server peak, output hashes, no-op times."""
    project = scratch / name
    subprocess.run(["git", "clone", "-q", str(PROJECT), str(project)], check=True)
    stop = [sys.executable, "-m", "flows", "server", "stop"]
    try:
        total, rows, server_mb = repro(project, env, interval)
        hashes = output_hashes(project)
        noop = [repro(project, env, interval)[0] for _ in range(noop_repeats)]
    finally:
        subprocess.run(stop, cwd=project, env=env, capture_output=True)  # the Prefect side's server
        shutil.rmtree(project, ignore_errors=True)
    print(f"{name}: {total:.1f} s", flush=True)
    return {"total": total, "rows": rows, "server_mb": server_mb, "hashes": hashes, "noop": noop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1, help="pairs of sides, their order alternating")
    parser.add_argument("--interval", type=float, default=0.2, help="sampling period, seconds")
    parser.add_argument("--noop-repeats", type=int, default=3)
    args = parser.parse_args()

    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MMRAD_"))}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"
    base["DVC_NO_ANALYTICS"] = "1"
    settings = {"prefect": base, "plain": {**base, "MMRAD_ORCHESTRATION": "off"}}
    scratch = Path(tempfile.mkdtemp(prefix="mmrad-bench-pipeline-"))
    runs: dict[str, list[dict]] = {"prefect": [], "plain": []}
    try:
        for pair in range(args.pairs):
            for kind in ("plain", "prefect") if pair % 2 == 0 else ("prefect", "plain"):
                runs[kind].append(side(scratch, f"{kind}-{pair + 1}", settings[kind], args.interval,
                                       args.noop_repeats if kind == "prefect" else 0))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary(runs["prefect"], runs["plain"])


def summary(on: list[dict], off: list[dict]) -> None:
    """Print the stage table and the targets (each list: one ``side`` result per pair)."""
    missing = (float("nan"), 0.0)
    on_rows, off_rows = ([{name: (wall, peak) for name, wall, peak in run["rows"]} for run in runs]
                         for runs in (on, off))
    print(f"{'stage':<40} {'Prefect s':>14} {'plain s':>14} {'peak MB':>8} {'plain MB':>8}")
    for name in on_rows[0]:
        walls, plain = (" / ".join(f"{rows.get(name, missing)[0]:.1f}" for rows in side) for side in (on_rows, off_rows))
        peak, plain_peak = (max(rows.get(name, missing)[1] for rows in side) for side in (on_rows, off_rows))
        print(f"{name:<40} {walls:>14} {plain:>14} {peak:>8.0f} {plain_peak:>8.0f}")
    on_totals, off_totals = (" / ".join(f"{run['total']:.1f}" for run in runs) for runs in (on, off))
    print(f"total `dvc repro`: {on_totals} s with Prefect (target <= 600 s), {off_totals} s plainly")
    ratios = []
    for pair, (a, b) in enumerate(zip(on, off), 1):
        overhead = a["total"] - b["total"]
        ratios.append(100 * overhead / b["total"])
        print(f"pair {pair}: Prefect overhead {overhead:+.1f} s = {ratios[-1]:+.1f} % (target <= 5 %)")
    spread = ""
    if len(ratios) > 1:  # Student's t over the pairs (each pair: one paired difference)
        mean, half = statistics.mean(ratios), stats.t.ppf(0.975, len(ratios) - 1) * stats.sem(ratios)
        spread = f", mean {mean:+.1f} % (95 % t-interval {mean - half:+.1f} to {mean + half:+.1f} %)"
    print(f"Prefect overhead, median of {len(ratios)} pairs: {statistics.median(ratios):+.1f} %{spread}; project "
          f"server peak {max(run['server_mb'] for run in on):.0f} MB")
    print(f"peak stage memory: {max(r[2] for run in on for r in run['rows']):.0f} MB with Prefect (+ server), "
          f"{max(r[2] for run in off for r in run['rows']):.0f} MB plainly (target <= 4096 MB)")
    noop = [t for run in on for t in run["noop"]]
    print(f"no-op `dvc repro`: median {statistics.median(noop):.2f} s of {len(noop)} (target <= 2 s)")
    differ = sorted({path for a, b in zip(on, off) for path in a["hashes"] if b["hashes"].get(path) != a["hashes"][path]})
    print(f"outputs that differ with and without Prefect: {', '.join(differ) or 'none'} "
          f"(of {len(on[0]['hashes'])}; expected: the files holding wall times or run ids)")

if __name__ == "__main__":
    main()
