"""The registry of methods is the one list: the CLI, the scorers and the report read it."""

from __future__ import annotations

import pytest

from mmrad.cli import build_parser
from mmrad.core.errors import DataError
from mmrad.core.params import DATASETS
from mmrad.data.datasets import LAYOUTS
from mmrad.evaluation import methods, scorers
from mmrad.evaluation.report import render


def test_every_method_has_its_scorer():
    for method in methods.METHODS.values():
        assert callable(getattr(scorers, method.scorer)), method
    assert methods.MAIN in methods.METHODS and methods.METHODS[methods.MAIN].trained
    assert methods.BASELINES == ("padim", "patchcore")


def test_unknown_method_names_the_known_ones():
    with pytest.raises(DataError, match="sparkle: unknown method") as caught:
        methods.get("sparkle")
    assert caught.value.detail == "known: mmrad, padim, patchcore"


def test_the_cli_offers_exactly_the_registered_methods(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "sparkle"])
    assert "(choose from 'mmrad', 'padim', 'patchcore')" in capsys.readouterr().err


def test_the_report_titles_come_from_the_registry():
    result = {"localisation": {}, "detection": {"max": 0.5}}
    text = render({"patchcore": result}, {"data": "d", "weights": "w"})
    assert "| PatchCore |" in text


def test_params_know_the_datasets_the_readers_know():
    assert DATASETS == tuple(LAYOUTS)
