"""Benchmark: the README's first command, stage by stage, with and without Prefect.

Runs ``dvc repro`` (each stage a Prefect flow run against the project's own
Prefect server, started by the first stage: the shipped default), then the
same stages plainly (``MMRAD_ORCHESTRATION=off dvc repro --force``), then a
no-op ``dvc repro`` (``--noop-repeats`` times). Each side's stage processes are
watched from outside: a stage's wall time runs from its process appearing
under dvc to its end, its peak memory is the largest summed RSS of its process
tree (sampled every ``--interval`` s; the project's Prefect server is counted
apart, it serves every stage). The Prefect overhead is the difference of the
two sides' totals. Both sides must write the same bytes (dvc.lock's output
hashes are compared at the end).

    .venv/bin/python bench/pipeline.py                   # a fresh clone of this checkout (HEAD) in a temp folder
    .venv/bin/python bench/pipeline.py --project .       # in this checkout, as it is

The fresh clone uses this checkout's virtual environment (the README's setup
step is timed in docs/benchmarks.md on its own).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="measure in this checkout (default: a fresh clone of HEAD)")
    parser.add_argument("--interval", type=float, default=0.2, help="sampling period, seconds")
    parser.add_argument("--noop-repeats", type=int, default=3)
    args = parser.parse_args()

    scratch = None
    if args.project is None:
        scratch = Path(tempfile.mkdtemp(prefix="mmrad-bench-pipeline-"))
        project = scratch / "project"
        subprocess.run(["git", "clone", "-q", str(PROJECT), str(project)], check=True)
    else:
        project = args.project.resolve()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MMRAD_"))}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"
    base["DVC_NO_ANALYTICS"] = "1"
    flows = [sys.executable, "-m", "flows", "server", "stop"]
    try:
        subprocess.run(flows, cwd=project, env=base, capture_output=True)  # the "on" side starts its own
        on_total, on_rows, server_mb = repro(project, base, args.interval)
        on_hashes = output_hashes(project)
        off_total, off_rows, _ = repro(project, {**base, "MMRAD_ORCHESTRATION": "off"}, args.interval, "--force")
        off_hashes = output_hashes(project)
        differ = sorted(path for path in on_hashes if off_hashes.get(path) != on_hashes[path])
        noop = [repro(project, base, args.interval)[0] for _ in range(args.noop_repeats)]
    finally:
        subprocess.run(flows, cwd=project, env=base, capture_output=True)
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    off_by_name = {name: (wall, peak) for name, wall, peak in off_rows}
    print(f"{'stage':<40} {'Prefect s':>10} {'plain s':>8} {'peak MB':>8} {'plain MB':>8}")
    for name, wall, peak in on_rows:
        plain = off_by_name.get(name, (float("nan"), float("nan")))
        print(f"{name:<40} {wall:>10.1f} {plain[0]:>8.1f} {peak:>8.0f} {plain[1]:>8.0f}")
    on_stages, off_stages = sum(r[1] for r in on_rows), sum(r[1] for r in off_rows)
    print(f"{'sum of stages':<40} {on_stages:>10.1f} {off_stages:>8.1f}")
    print(f"total `dvc repro`: {on_total:.1f} s with Prefect ({on_total / 60:.1f} min; target <= 10 min), "
          f"{off_total:.1f} s plainly")
    overhead = on_total - off_total
    print(f"Prefect overhead: {overhead:+.1f} s = {100 * overhead / off_total:+.1f} % (target <= 5 %); "
          f"project server peak {server_mb:.0f} MB")
    peak = max(r[2] for r in on_rows)
    print(f"peak stage memory: {peak:.0f} MB with Prefect (+ server), {max(r[2] for r in off_rows):.0f} MB plainly "
          "(target <= 4096 MB)")
    print(f"no-op `dvc repro`: median {statistics.median(noop):.2f} s of {len(noop)} (target <= 2 s)")
    print(f"outputs that differ with and without Prefect: {', '.join(differ) or 'none'} "
          f"(of {len(on_hashes)}; expected: the files holding wall times or run ids)")


if __name__ == "__main__":
    main()
