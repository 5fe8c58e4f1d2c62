"""Output safety (mmrad.core.outputs): never replace what mmrad did not write, no leftovers, the umask honoured.

Real folders and files on disk; the commands run through the real CLI (``mmrad.cli.main``).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest
import yaml

from mmrad.cli import main
from mmrad.core.errors import DataError
from mmrad.core.outputs import MARKER, atomic_dir, atomic_write_text, check_output_folder, clean_stale
from tests.conftest import tiny_params_dict, tree_snapshot


def _user_folder(path):
    (path / "sub").mkdir(parents=True)
    (path / "patient_001.jpg").write_bytes(b"a patient's photograph")
    (path / "sub" / "notes.txt").write_text("the user's notes")
    return tree_snapshot(path)


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_a_folder_mmrad_did_not_write_is_refused_and_untouched(tmp_path):
    user = tmp_path / "clinic"
    before = _user_folder(user)
    with pytest.raises(DataError) as info:
        with atomic_dir(user) as tmp:
            (tmp / "x").write_text("never")
    assert str(user) in str(info.value) and "was not written by mmrad" in str(info.value)
    assert tree_snapshot(user) == before and _siblings(user) == []


def test_an_earlier_mmrad_output_is_replaced_atomically_and_an_empty_folder_accepted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # empty: nothing of anyone's is lost
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt"]
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"] and _siblings(out) == []
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "c.txt").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"] and _siblings(out) == []


@pytest.mark.parametrize("where", [".", "/", "~", ".."])
def test_the_working_directory_its_parents_home_and_root_are_refused(tmp_path, monkeypatch, where):
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(DataError, match="refusing to write an output folder here"):
        check_output_folder(os.path.expanduser(where))
    assert list(tmp_path.iterdir()) == [work] and list(work.iterdir()) == []  # no `..tmp-*`


@pytest.mark.parametrize("relation", ["equal", "inside", "contains"])
def test_an_output_overlapping_an_input_is_refused(tmp_path, relation):
    data = tmp_path / "data" / "raw"
    data.mkdir(parents=True)
    out = {"equal": data, "inside": data / "prepared", "contains": tmp_path / "data"}[relation]
    with pytest.raises(DataError, match="the output folder overlaps an input") as info:
        check_output_folder(out, [data])
    assert str(out) in str(info.value) and str(data) in str(info.value)


def test_a_killed_runs_temporaries_are_removed_by_the_next_run_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that no longer runs
    from mmrad.core import outputs

    ours = tmp_path / f".out.tmp-{outputs._HOST}-{dead}-abcd1234"
    ours.mkdir()
    (ours / MARKER).write_text("x")
    (ours / "half.png").write_bytes(b"half")
    stale_file = tmp_path / f".out.tmp-{outputs._HOST}-{dead}-0000beef"
    stale_file.write_bytes(b"half a file")
    lookalike = tmp_path / f".out.tmp-{outputs._HOST}-{dead}-feedf00d"  # same name shape, no marker: not ours
    lookalike.mkdir()
    alive = tmp_path / f".out.tmp-{outputs._HOST}-{os.getpid()}-12345678"  # a live writer's: left alone
    alive.mkdir()
    (alive / MARKER).write_text("x")
    other = tmp_path / ".other.tmp-x-1-aa"
    other.mkdir()
    assert sorted(p.name for p in clean_stale(out)) == sorted([ours.name, stale_file.name])
    assert lookalike.is_dir() and alive.is_dir() and other.is_dir()


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "inside.txt").write_text("x")
        atomic_write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == oct(0o750)
    assert oct((tmp_path / "metrics.json").stat().st_mode & 0o777) == oct(0o640)


def test_the_errors_of_the_project_survive_pickling():
    from flows.pipeline import StageFailed

    error = pickle.loads(pickle.dumps(DataError("a/b.png", "image is corrupt or truncated", "detail")))
    assert (str(error), error.path, error.rule, error.detail) == (
        "a/b.png: image is corrupt or truncated (detail)", "a/b.png", "image is corrupt or truncated", "detail")
    failed = pickle.loads(pickle.dumps(StageFailed(["prepare", "mmr"], 2)))
    assert failed.status == 2 and "mmrad prepare mmr exited with status 2" in str(failed)


# --------------------------------------------------------------------------- the commands

def _params_file(tmp_path, **sections):
    raw = tiny_params_dict()
    for section, values in sections.items():
        raw[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _refused(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_predict_into_the_patients_folder_is_refused(tmp_path, capsys):
    clinic = tmp_path / "clinic"
    before = _user_folder(clinic)
    line = _refused(["predict", "--folder", str(clinic), "--out", str(clinic), "--model", str(tmp_path / "m")], capsys)
    assert line.startswith(f"mmrad predict: error: {clinic}: the output folder overlaps an input")
    assert tree_snapshot(clinic) == before and _siblings(clinic) == []


def test_prepare_over_the_raw_data_and_generate_into_a_user_folder_are_refused(tmp_path, synthetic_root,
                                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "MMR").symlink_to(synthetic_root / "MMR", target_is_directory=True)
    params = _params_file(tmp_path, datasets={"mmr": {"root": "data/raw/MMR"}}, prepare={"workers": 2})
    line = _refused(["--params", str(params), "prepare", "mmr", "--out", "data"], capsys)
    assert line.startswith("mmrad prepare: error: data: the output folder overlaps an input")
    line = _refused(["--params", str(params), "prepare", "mmr", "--out", "."], capsys)
    assert "refusing to write an output folder here" in line
    user = tmp_path / "mine"
    before = _user_folder(user)
    line = _refused(["--params", str(params), "generate", "--out", str(user)], capsys)
    assert "was not written by mmrad" in line and tree_snapshot(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine", "params.yaml"]


def test_bad_parameters_are_reported_before_any_heavy_import(tmp_path):
    bad = _params_file(tmp_path, train={"steps": True})
    code = ("import sys; from mmrad.cli import check_arguments; status = check_arguments(sys.argv[1:]); "
            "heavy = sorted(m for m in ('torch', 'prefect', 'mlflow', 'pandas') if m in sys.modules); "
            "print(status, heavy)")
    done = subprocess.run([sys.executable, "-c", code, "--params", str(bad), "train"], capture_output=True, text=True)
    assert done.stdout.strip() == "2 []", done.stderr
    assert done.stderr.strip() == (f"mmrad train: error: {bad}: invalid parameter 'train.steps' "
                                   "(Value error, expected a number or text, got the boolean true)")
    started = time.perf_counter()  # the same line through the Prefect entry point, which imports no Prefect first
    flows = subprocess.run([sys.executable, "-m", "flows", "--params", str(bad), "train"], capture_output=True, text=True)
    assert flows.returncode == 2 and flows.stderr.strip() == done.stderr.strip()
    assert time.perf_counter() - started < 30  # generous: the point is that no flow starts


def test_batch_size_above_the_training_cases_and_zero_are_refused(tmp_path, prepared_mmr, capsys):
    healthy = len({p.name for p in (prepared_mmr / "images" / "train").iterdir()}) // 2
    params = _params_file(tmp_path, train={"batch_size": healthy + 1})
    line = _refused(["--params", str(params), "train", "--prepared", str(prepared_mmr), "--out",
                     str(tmp_path / "m"), "--checkpoints", str(tmp_path / "c")], capsys)
    assert line == (f"mmrad train: error: {prepared_mmr / 'summary.json'}: train.batch_size ({healthy + 1}) exceeds "
                    f"the healthy training cases ({healthy}) (lower train.batch_size in params.yaml or add training "
                    "cases)")
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--fundus", "x.png", "--batch-size", "0"])
    assert exit_info.value.code == 2 and "expected an integer of at least 1, got '0'" in capsys.readouterr().err


def test_resuming_from_a_truncated_checkpoint_names_it_and_how_to_start_over(tmp_path, prepared_mmr, capsys):
    checkpoints = tmp_path / "c"
    checkpoints.mkdir()
    (checkpoints / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a zip")
    params = _params_file(tmp_path)
    line = _refused(["--params", str(params), "train", "--prepared", str(prepared_mmr), "--out", str(tmp_path / "m"),
                     "--checkpoints", str(checkpoints), "--resume"], capsys)
    assert line.startswith(f"mmrad train: error: {checkpoints / 'checkpoint.pt'}: checkpoint is unreadable")
    assert "running without --resume" in line and not (tmp_path / "m").exists()
