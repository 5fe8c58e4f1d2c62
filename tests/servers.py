"""Real servers on 127.0.0.1 for tests: a throwaway PostgreSQL cluster and `mlflow server` processes.

``postgres_url`` (session scope) initdb's a private cluster in a temporary
folder, starts it on a free port of 127.0.0.1 (trust authentication, its
socket in that folder, fsync off: nothing here needs to survive a crash),
creates the database ``mlflow`` and yields its SQLAlchemy URL
``postgresql+psycopg2://postgres@127.0.0.1:PORT/mlflow``; the cluster is
stopped (``pg_ctl stop -m fast``) and its folder removed at teardown.

PostgreSQL refuses to run as root: as root the cluster belongs to, and runs
as, the ``postgres`` system user (``runuser``); otherwise as the current user.
The binaries come from $MMRAD_PG_BINDIR if set, else PATH or Debian's
/usr/lib/postgresql/<version>/bin;
``scripts/ci-services.sh`` installs them (Debian's ``postgresql`` package).
Without them the tests that use the fixture are skipped, except under
``CI=true``, where they fail: CI must not pass by skipping.

Use it from a test module with ``from tests.servers import postgres_url  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

INSTALL_HINT = "install PostgreSQL with `bash scripts/ci-services.sh` (as root; Debian's postgresql package)"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(why: str):
    """Skip the test, or fail it under CI=true (CI must not go green by skipping)."""
    message = f"{why}: {INSTALL_HINT}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_bindir() -> Path | None:
    """The folder with initdb and pg_ctl: $MMRAD_PG_BINDIR when set (only there), else PATH first, then the
    newest /usr/lib/postgresql/*/bin."""
    if os.environ.get("MMRAD_PG_BINDIR"):
        folder = Path(os.environ["MMRAD_PG_BINDIR"])
        return folder if (folder / "pg_ctl").is_file() and (folder / "initdb").is_file() else None
    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name)) or (0,)

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    for folder in candidates:
        if (folder / "pg_ctl").is_file() and (folder / "initdb").is_file():
            return folder
    return None


def libpq_dsn(url: str) -> str:
    """The SQLAlchemy URL as a libpq URI psycopg2 takes (``postgresql+psycopg2://`` -> ``postgresql://``)."""
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def _run(command: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout}\n{done.stderr}")


@pytest.fixture(scope="session")
def postgres_url():
    """A private PostgreSQL cluster on 127.0.0.1 with an empty database ``mlflow``; yields its SQLAlchemy URL."""
    bindir = find_bindir()
    if bindir is None:
        unavailable("PostgreSQL binaries (pg_ctl, initdb) not found "
                    "($MMRAD_PG_BINDIR, PATH, /usr/lib/postgresql/*/bin)")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # "root" execution of the PostgreSQL server is not permitted
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` system user to run PostgreSQL as")
        runuser = shutil.which("runuser")
        if runuser is None:
            unavailable("running as root and `runuser` (util-linux) is missing")
        as_user = [runuser, "-u", "postgres", "--"]
    import psycopg2

    home = Path(tempfile.mkdtemp(prefix="mmrad-pg-"))  # short: the socket path must stay under 107 bytes
    data, log = home / "data", home / "server.log"
    if owner is not None:
        os.chown(home, owner.pw_uid, owner.pw_gid)
    started = False
    try:
        _run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
              "--encoding=UTF8", "--no-locale", "--no-sync"], home, "initdb")
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {home} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            done = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                                   "-t", "60", "-o", options, "start"],
                                  cwd=home, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                started = True
                break
            server_log = log.read_text(errors="replace") if log.is_file() else ""
            if attempt == 2 or "already in use" not in server_log:
                raise RuntimeError(f"pg_ctl start failed ({done.returncode}): {done.stdout}\n{done.stderr}\n"
                                   f"{server_log[-4000:]}")
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("CREATE DATABASE mlflow")
        finally:
            connection.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           cwd=home, capture_output=True, text=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


# --------------------------------------------------------------------------- an `mlflow server` process

class MlflowServer:
    """A real ``mlflow server`` process on 127.0.0.1 with proxied artifacts under ``artifacts``; ``start``
    returns once /health answers; ``stop`` and ``start`` again keep the port (and so the URL).

    The server's background job runner (huey consumers, for GenAI evaluation jobs) is off: the
    registry does not use it, it slows shutdown by seconds and leaves a folder in /dev/shm per start.
    """

    def __init__(self, backend_store_uri: str, artifacts: Path, port: int | None = None, timeout: float = 120):
        self.backend_store_uri, self.artifacts, self.timeout = backend_store_uri, Path(artifacts), timeout
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with tempfile.TemporaryFile(mode="w+") as log:  # the server's output, shown if it does not come up
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", self.backend_store_uri,
                 "--serve-artifacts", "--artifacts-destination", str(self.artifacts)],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    if urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200:
                        return self.url
                except OSError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log.seek(0)
                    pytest.fail(f"mlflow server did not start on {self.url}: {log.read()[-4000:]}", pytrace=False)
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()  # (mlflow server forwards it to its uvicorn child)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # the whole group: the uvicorn child too
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifacts: Path, port: int | None = None):
    """``MlflowServer`` as a context: yields the started server, stops it on exit."""
    server = MlflowServer(backend_store_uri, artifacts, port)
    try:
        server.start()
        yield server
    finally:
        server.stop()
