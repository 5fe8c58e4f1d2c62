"""The command line: help, one-line errors with exit status 2, bad params."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from mmrad.cli import main
from tests.conftest import PROJECT, tiny_params_dict


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmrad", *args], cwd=cwd, capture_output=True, text=True)


def test_help_lists_every_stage():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("generate", "prepare", "contact-sheet"):
        assert command in result.stdout
        assert len(re.findall(rf"^  {command} ", result.stdout, re.M)) == 1  # one command list, not two
    assert "dvc repro" in result.stdout and not result.stderr


def test_registry_list_prints_no_warning_and_no_escape_codes(tmp_path):
    (tmp_path / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    result = run_cli("registry", "list", cwd=tmp_path)
    assert result.returncode == 0 and "no versions of mmrad registered yet" in result.stdout
    assert "Warning" not in result.stderr and "\x1b[" not in result.stdout + result.stderr


def _write_params(tmp_path, raw):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "change, rule",
    [
        (lambda p: p["prepare"].update(resolution=100), "invalid parameter 'prepare.resolution'"),
        (lambda p: p["synthetic"]["mmr"].update(train_normal=0), "invalid parameter 'synthetic.mmr.train_normal'"),
        (lambda p: p["synthetic"]["mmr"].update(fundus_size=[10, 10]), "invalid parameter 'synthetic.mmr.fundus_size.0'"),
        (lambda p: p["synthetic"].update(colour="blue"), "invalid parameter 'synthetic.colour'"),
        (lambda p: p.pop("seed"), "invalid parameter 'seed'"),
        (lambda p: p["datasets"].update(mvtec={"root": "x"}), "unknown dataset(s) ['mvtec']"),
        (lambda p: p["model"].update(image_size=128), "model.image_size (128) must equal prepare.resolution (64)"),
        (lambda p: p["train"].update(loss="l2"), "invalid parameter 'train.loss'"),
        (lambda p: p["weights"].update(sam={"path": "x.pth"}), "invalid parameter 'weights.sam.format'"),
        (lambda p: p["weights"].update(resnets=[{"path": "r.torch", "format": "lvm-med"}]),
         "weights.resnets: lvm-med files are ResNet-50s, so model.cnn must be resnet50 (it is resnet18"),
        (lambda p: p["synthetic"]["mmr"]["lesions"]["fundus"].update(size=0),
         "invalid parameter 'synthetic.mmr.lesions.fundus.size'"),
        (lambda p: p["model"].update(fusion_input="maps"), "invalid parameter 'model.fusion_input'"),
        (lambda p: p["model"].update(tuning="lora"), "invalid parameter 'model.tuning'"),
        (lambda p: p["model"].update(prompt_sharing="some"), "invalid parameter 'model.prompt_sharing'"),
        (lambda p: p["model"].update(fourier_mask=1.0), "invalid parameter 'model.fourier_mask'"),
        (lambda p: p["model"].update(decoder_sharing="twice"), "invalid parameter 'model.decoder_sharing'"),
        (lambda p: p["train"].update(modalities=[]), "invalid parameter 'train.modalities'"),
        (lambda p: p["train"].update(modalities=["retina"]), "invalid parameter 'train.modalities.0'"),
    ],
)
def test_bad_params_give_one_line_naming_file_and_key(tmp_path, capsys, change, rule):
    raw = tiny_params_dict()
    change(raw)
    path = _write_params(tmp_path, raw)
    assert main(["--params", str(path), "generate", "--out", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and rule in err
    assert not (tmp_path / "raw").exists()


def test_yaml_syntax_error_and_missing_file(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1,\n")
    assert main(["--params", str(path), "prepare", "mmr"]) == 2
    assert "parameter file is not valid YAML" in capsys.readouterr().err
    assert main(["--params", str(tmp_path / "none.yaml"), "prepare", "mmr"]) == 2
    assert "parameter file is missing" in capsys.readouterr().err


def test_prepare_error_exits_2_with_the_file_and_rule(tmp_path):
    raw = tiny_params_dict()
    raw["datasets"]["mmr"]["root"] = str(tmp_path / "absent")
    path = _write_params(tmp_path, raw)
    result = run_cli("--params", str(path), "prepare", "mmr", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"mmrad prepare: error: {tmp_path / 'absent'}: dataset folder is missing"
    assert not (tmp_path / "out").exists()


def test_prepare_unconfigured_dataset(tmp_path, capsys):
    raw = tiny_params_dict()
    del raw["datasets"]["resc"]
    path = _write_params(tmp_path, raw)
    assert main(["--params", str(path), "prepare", "resc"]) == 2
    assert "dataset 'resc' is not configured under 'datasets'" in capsys.readouterr().err


def test_the_project_params_file_is_valid():
    from mmrad.core.params import load_params

    params = load_params(PROJECT / "params.yaml")
    assert set(params.datasets) == {"mmr", "idrid", "resc"}
