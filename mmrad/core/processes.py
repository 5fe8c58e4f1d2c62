"""Processes that never outlive the command that started them.

* ``die_with_parent``: run in a worker process (a process-pool initializer,
  a Dask worker's preload), it ends the worker as soon as its parent is gone,
  even when the parent was killed with ``kill -9`` and could not clean up. A
  daemon thread polls the parent id twice a second: portable (Linux, macOS),
  and idle workers would otherwise wait on their task queue forever.
* ``process_pool``: the local process pool of the stages (generate,
  prepare): workers that die with their parent, and on an error no work left
  running that could write into a temporary output after its removal.
* ``exit_on_sigterm``: ``SIGTERM`` (what ``kill``, Prefect cancellation and
  a scheduler's time limit send) becomes ``SystemExit(143)``, so the command's
  clean-up code (temporary outputs, worker pools) runs as on any error.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

POLL_SECONDS = 0.5


def die_with_parent(parent_pid: int) -> None:
    """Exit this process (status 1, no clean-up of its own) once ``parent_pid`` is no longer its parent."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="mmrad-die-with-parent", daemon=True).start()


# How per-item work is spread: mapper(fn, items) yields fn(item) for every item, in order.
Mapper = Callable[[Callable, list], Iterator]


def process_pool(workers: int, chunksize: int = 8) -> Mapper:
    """A local process pool of ``workers`` (a plain loop for one worker) as a Mapper.

    On an error the queued work is cancelled and the running items are waited
    for before the error travels on, so nothing writes into the output's
    temporary folder after it is removed. The workers exit when this process
    dies, even by ``kill -9`` (``die_with_parent``).
    """
    def run(fn, items):
        if workers <= 1:
            yield from map(fn, items)
            return
        pool = ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),))
        try:
            yield from pool.map(fn, items, chunksize=chunksize)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return run


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143) in this (main-thread) process."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
