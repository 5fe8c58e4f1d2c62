"""Benchmark: wall time and peak memory of the data stages on the default params.

Copies the project's pipeline into a temporary git + DVC repository and runs
each data stage with `dvc repro -s <stage>` (exactly what `dvc repro` runs),
sampling the summed resident memory of the whole process tree (DVC, the stage
command and its worker processes) every 20 ms. Repeats the whole sequence
``--repeats`` times and prints the median per stage.

    .venv/bin/python bench/data_stages.py [--repeats 3]

Targets (issue 2): all data stages together <= 60 s and <= 2 GB on 2 cores.
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

PROJECT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "prepare@mmr", "prepare@idrid", "prepare@resc")


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(args: list[str], cwd: Path, env: dict) -> tuple[float, int]:
    """(seconds, peak summed RSS in bytes) of one command and its children."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    handle, peak, done = psutil.Process(proc.pid), 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, tree_rss(handle))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{err.decode()}")
    return time.perf_counter() - started, peak


def make_repo(root: Path, env: dict) -> None:
    shutil.copytree(PROJECT / "mmrad", root / "mmrad", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "params.yaml"):
        shutil.copy(PROJECT / name, root / name)
    for cmd in (["git", "init", "-q"], [str(Path(sys.executable).parent / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).parent / "dvc")
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    peaks: dict[str, list[int]] = {s: [] for s in STAGES}
    totals, noop = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_repo(root, env)
            for stage in STAGES:
                seconds, peak = measure([dvc, "repro", "-s", stage], root, env)
                times[stage].append(seconds)
                peaks[stage].append(peak)
            totals.append(sum(times[s][-1] for s in STAGES))
            noop.append(measure([dvc, "repro"], root, env)[0])

    print(f"data stages, default params.yaml, {os.cpu_count()} cores, median of {args.repeats} runs")
    print(f"{'stage':<16}{'wall s':>9}{'peak MB':>10}")
    for stage in STAGES:
        print(f"{stage:<16}{statistics.median(times[stage]):>9.1f}{statistics.median(peaks[stage]) / 2**20:>10.0f}")
    total, peak = statistics.median(totals), max(statistics.median(peaks[s]) for s in STAGES)
    print(f"{'all data stages':<16}{total:>9.1f}{peak / 2**20:>10.0f}")
    print(f"{'no-op dvc repro':<16}{statistics.median(noop):>9.1f}")
    print(f"target: <= 60 s ({total / 60:.2f}x of budget), <= 2048 MB ({peak / 2**31:.2f}x of budget)")


if __name__ == "__main__":
    main()
