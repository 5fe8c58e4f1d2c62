"""The project's own Prefect server: started once, reused by every stage of a ``dvc repro``.

Without a server, each ``python -m flows <stage>`` would start and stop Prefect's
temporary API (about 12 s per stage on 2 cores, 16 stages). Instead the first
stage starts one ``prefect server start`` in the background, on a free local
port, with its database in the project's PREFECT_HOME (``.prefect/``), and the
following stages find it here and use it (under a second each). So a repro's
flow runs stay browsable in the Prefect UI afterwards, beside the project.

Rules (docs/architecture.md, "The project's Prefect server"):

* Only when nothing else is configured: ``PREFECT_API_URL`` set (a team
  server, the ``retrain`` flow's API) or ``MMRAD_PREFECT_SERVER=off`` means
  no project server (the latter: Prefect's temporary API per stage, as before).
* Nothing runs unannounced: starting prints one line with the address and how
  to stop it. The server stops by itself after ``MMRAD_PREFECT_SERVER_IDLE``
  seconds (default 3600) without a stage; a running stage keeps it alive.
* When it cannot start (port taken, no disk, a broken database), the stage
  says so in one line and runs with the temporary API: a stage never fails
  because of the project server.

``python -m flows server status|start|stop`` manages it by hand. This module
imports no Prefect (it runs before Prefect is imported, so the stage's
Prefect picks up the address from the environment).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

STATE = "mmrad-server.json"  # {"pid": supervisor pid, "url": api url, "started": epoch}; its mtime = last use
LOG = "mmrad-server.log"
START_TIMEOUT_S = 120.0  # a fresh database's migrations take ~15 s on a quiet 2-core machine, more when busy
HEARTBEAT_S = 60.0  # a running stage touches the state file this often, so the idle stop never hits it
DEFAULT_IDLE_S = 3600.0
STOP_HINT = "python -m flows server stop"
# set by for_stage to the project server's API URL: flows.pipeline then runs the stage without Prefect's flow-run
# heartbeats, which only the server's services read (this server runs none) and which cost each stage up to 1 s
PROJECT_SERVER_ENV = "MMRAD_PREFECT_PROJECT_SERVER"


def home() -> Path:
    """The Prefect home the stages use (flows/__init__.py defaults it to the project's .prefect/)."""
    return Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()


def _idle_seconds() -> float:
    return float(os.environ.get("MMRAD_PREFECT_SERVER_IDLE", DEFAULT_IDLE_S))


def _idle_text() -> str:
    idle = _idle_seconds()
    return f"{idle:.0f} idle seconds" if idle < 120 else f"{idle / 60:.0f} idle minutes"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def healthy(url: str, timeout: float = 2.0) -> bool:
    """The API answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def read_state(where: Path | None = None) -> dict | None:
    """The running project server's record, or None (no record, or its supervisor is gone)."""
    path = (where or home()) / STATE
    try:
        state = json.loads(path.read_text())
        pid, url = int(state["pid"]), str(state["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _alive(pid):
        path.unlink(missing_ok=True)
        return None
    state["pid"], state["url"] = pid, url
    state["last_used"] = path.stat().st_mtime
    return state


def touch(where: Path | None = None) -> None:
    """Mark the server as used now (the idle clock restarts)."""
    with contextlib.suppress(OSError):
        os.utime((where or home()) / STATE)


@contextlib.contextmanager
def _locked(where: Path):
    """One stage at a time decides whether to start the server (two parallel stages start one)."""
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "mmrad-server.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _port(where: Path) -> int:
    """The same port for the same project while it is free (a bookmarkable UI), else any free one."""
    preferred = 4300 + zlib.crc32(str(where.resolve()).encode()) % 700
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free local port")


def _say(line: str) -> None:
    print(f"mmrad: {line}", file=sys.stderr, flush=True)


def start(where: Path | None = None, announce: bool = True) -> str | None:
    """The project server's API URL: the running one, or a new one started now; None if it cannot start."""
    where = where or home()
    with _locked(where):
        state = read_state(where)
        if state and healthy(state["url"]):
            touch(where)
            return state["url"]
        if state:  # a supervisor that does not answer: stop it before starting another
            stop(where, quiet=True)
        port = int(os.environ.get("MMRAD_PREFECT_SERVER_PORT") or _port(where))
        url = f"http://127.0.0.1:{port}/api"
        log = where / LOG
        with open(log, "ab") as out:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "flows.server", "_supervise", str(port), str(_idle_seconds())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PREFECT_HOME": str(where), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and supervisor.poll() is None and not healthy(url):
            time.sleep(0.5)
        if supervisor.poll() is not None or not healthy(url):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(supervisor.pid, signal.SIGTERM)
            supervisor.wait()
            _say(f"could not start this project's Prefect server (its log: {log}); this stage uses Prefect's "
                 "temporary API instead")
            return None
        (where / STATE).write_text(json.dumps({"pid": supervisor.pid, "url": url, "started": time.time()}))
    if announce:
        _say(f"started this project's Prefect server at {url.removesuffix('/api')} (flow-run history in "
             f"{where}); it stops after {_idle_text()}, or now with `{STOP_HINT}`")
    return url


def stop(where: Path | None = None, quiet: bool = False) -> bool:
    """Stop the project server (its supervisor stops the Prefect server); True if one was running."""
    where = where or home()
    state = read_state(where)
    if state is None:
        if not quiet:
            print("no project Prefect server is running")
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(state["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    (where / STATE).unlink(missing_ok=True)
    if not quiet:
        print(f"stopped the project Prefect server at {state['url'].removesuffix('/api')}")
    return True


def for_stage() -> None:
    """Before a stage imports Prefect: point it at the project server (started if needed), unless configured.

    Sets PREFECT_API_URL for this process (and the Dask workers and subprocesses it starts) and keeps the
    server from its idle stop while the stage runs.
    """
    if os.environ.get("PREFECT_API_URL") or os.environ.get("MMRAD_PREFECT_SERVER", "on").lower() in (
            "off", "0", "false", "no"):
        return
    url = start()
    if url is None:
        return
    os.environ["PREFECT_API_URL"] = os.environ[PROJECT_SERVER_ENV] = url
    where = home()

    every = min(HEARTBEAT_S, _idle_seconds() / 3)

    def heartbeat():
        while True:
            time.sleep(every)
            touch(where)

    threading.Thread(target=heartbeat, name="prefect-server-heartbeat", daemon=True).start()


def _supervise(port: int, idle_s: float) -> int:
    """The background process: runs the Prefect server and stops it when idle or told to (SIGTERM)."""
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--no-services", "--analytics-off"], stdin=subprocess.DEVNULL)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    state = home() / STATE
    while not stopping and server.poll() is None:
        time.sleep(1.0)
        with contextlib.suppress(OSError):
            if time.time() - state.stat().st_mtime > idle_s:
                print(f"idle for {idle_s:.0f} s: stopping", flush=True)
                break
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    with contextlib.suppress(OSError, ValueError, KeyError):
        if json.loads(state.read_text())["pid"] == os.getpid():
            state.unlink()
    return 0


def main(argv: list[str]) -> int:
    """``python -m flows server status|start|stop``."""
    action = argv[0] if argv else "status"
    if action == "_supervise":
        return _supervise(int(argv[1]), float(argv[2]))
    if action not in ("status", "start", "stop"):
        print("usage: python -m flows server status|start|stop  (this project's Prefect server, PREFECT_HOME "
              f"{home()})", file=sys.stderr)
        return 2
    if action == "stop":
        stop()
        return 0
    if action == "start":
        return 0 if start() else 1
    state = read_state()
    if state is None:
        print(f"no project Prefect server is running (PREFECT_HOME {home()}); the next stage starts one")
        return 1
    idle = (time.time() - state["last_used"]) / 60
    answers = "answers" if healthy(state["url"]) else "DOES NOT ANSWER"
    print(f"project Prefect server at {state['url'].removesuffix('/api')} ({answers}; pid {state['pid']}, "
          f"last used {idle:.0f} min ago, history in {home()}); stop it with `{STOP_HINT}`")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
