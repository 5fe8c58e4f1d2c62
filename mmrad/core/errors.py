"""The one error type for bad input data and bad parameters.

Every message has the same shape, ``<file>: <rule> (<detail>)``, so a person
sees at once which file broke which rule, and the CLI can print it on one line
and exit non-zero.
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
