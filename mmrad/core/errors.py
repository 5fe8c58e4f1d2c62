"""The one error type for bad input data and bad parameters.

Every message has the same shape, ``<file>: <rule> (<detail>)``, so a person
sees at once which file broke which rule, and the CLI can print it on one line
and exit with status 2.

The error crosses process boundaries intact (a process pool, a Dask worker, a
Prefect task's result): ``__reduce__`` pickles the three fields, so the
receiving side raises the same message, not a ``TypeError`` about missing
constructor arguments.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A file (or a parameter) breaks a rule of the dataset layout."""

    def __init__(self, path: str | Path, rule: str, detail: str = ""):
        self.path = str(path)
        self.rule = rule
        self.detail = detail
        message = f"{self.path}: {rule}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.path, self.rule, self.detail)
