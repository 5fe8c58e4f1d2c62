"""The one way bench scripts run an ``mmrad`` command: as ``dvc repro`` does, from the project root, timed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def run(*args: str, quiet_stderr: bool = False) -> float:
    """Run ``python -m mmrad -q ARGS`` in the project (an error stops the bench); print and return its seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmrad", "-q", *args], check=True, cwd=PROJECT,
                   stderr=subprocess.DEVNULL if quiet_stderr else None)
    seconds = time.perf_counter() - start
    shown = [a for a in args if not a.startswith("/") and not a.startswith("--")]
    print(f"<!-- {' '.join(shown)}: {seconds:.0f} s -->", flush=True)
    return seconds
