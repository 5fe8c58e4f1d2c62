"""Where mmrad writes: atomic outputs that never touch what mmrad did not write.

One rule for every command that writes (``generate``, ``prepare``, ``train``,
``evaluate``, ``predict``, the report and registry files):

* **Atomic.** A folder is built under a temporary sibling name and renamed
  into place only when complete; a file is written to a temporary sibling and
  renamed. A failed run leaves the earlier output as it was.
* **Never a user's folder.** Every output folder holds a marker file,
  ``.mmrad-output``. An existing ``--out`` is replaced only when it carries
  that marker (an earlier mmrad output) or is empty. A folder without the
  marker, ``.``, ``/``, the home folder, any folder that contains the working
  directory, and any ``--out`` that equals, contains or lies inside one of the
  command's inputs are refused with a ``DataError`` before anything is
  written.
* **No leftovers.** Temporary names carry the host and process id
  (``.<name>.tmp-<host>-<pid>-<random>``). On failure the temporary is removed
  at once; after a ``kill -9`` the next run writing the same output removes
  the temporaries of dead processes of this host (only names of that shape,
  and for folders only those holding the marker, so nothing else is ever
  deleted).
* **The umask is honoured.** ``tempfile`` creates 0700 folders and 0600
  files; they are given the permissions a plain ``mkdir`` / ``open`` would
  have (0777 / 0666 less the umask).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from mmrad.core.errors import DataError

MARKER = ".mmrad-output"
MARKER_TEXT = "written by mmrad; a folder with this file may be replaced by the next mmrad run writing here\n"
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]+$")
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it; restored at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _temp_sibling(final: Path, kind: str = "tmp") -> Path:
    return final.with_name(f".{final.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(final: str | Path) -> list[Path]:
    """Remove the temporaries that dead processes of this host left beside ``final``; returns what went."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for path in final.parent.iterdir():
        match = _TEMP.match(path.name)
        if not match or match["name"] != final.name or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            if not (path / MARKER).is_file():
                continue  # not built by us: leave it
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _forms(path: str | Path) -> set[Path]:
    """The path as written (made absolute) and with its links resolved: an overlap in either form counts."""
    absolute = Path(os.path.abspath(path))
    return {absolute, absolute.resolve()}


def _overlap(a: str | Path, b: str | Path) -> bool:
    return any(x == y or x.is_relative_to(y) or y.is_relative_to(x) for x in _forms(a) for y in _forms(b))


def check_output_folder(final: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an output folder whose replacement could destroy something mmrad did not write (rules above)."""
    shown = str(final)
    target = Path(os.path.abspath(final)).resolve()
    cwd, home = Path.cwd(), Path.home()
    if any(t == t.parent or t in _forms(home) or any(c.is_relative_to(t) for c in _forms(cwd)) for t in _forms(final)):
        raise DataError(shown, "refusing to write an output folder here",
                        "it is the working directory, one of its parents, the home folder or /; give a new "
                        "folder such as out/ instead")
    for given in inputs:
        if _overlap(final, given):
            raise DataError(shown, "the output folder overlaps an input",
                            f"input {given}; writing there could replace it: give a separate folder")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise DataError(shown, "the output path exists and is not a folder mmrad wrote", "give a new folder")
    if target.is_dir() and not (target / MARKER).is_file() and any(target.iterdir()):
        raise DataError(shown, "the output folder exists and was not written by mmrad",
                        f"no {MARKER} marker in it; mmrad never replaces a folder it did not write: give a new "
                        "or empty folder, or remove this one yourself")


@contextlib.contextmanager
def atomic_dir(final: str | Path, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``final`` on success.

    ``inputs`` are the folders and files the command reads: an output
    overlapping one is refused. On any exception the temporary folder is
    removed and ``final`` is left as it was (or absent).
    """
    final = Path(final)
    check_output_folder(final, inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = _temp_sibling(final)
    tmp.mkdir()
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        (tmp / MARKER).write_text(MARKER_TEXT)  # first, so that a killed run's leftover is recognisably ours
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _temp_sibling(final, "old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces ``path`` on success, vanishes on failure."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "the output file is an existing folder", "give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def claim_folder(final: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """An output folder that grows over several runs (``mmrad ablate``'s grid): checked as any output, then
    created with the marker (or kept, when it has it), never replaced as a whole; its parts are written with
    ``atomic_dir`` / ``atomic_file``."""
    check_output_folder(final, inputs)
    final = Path(final)
    final.mkdir(parents=True, exist_ok=True)
    if not (final / MARKER).is_file():
        atomic_write_text(final / MARKER, MARKER_TEXT)
    return final
