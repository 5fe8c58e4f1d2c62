"""The ablation grid (issue 15): a tiny grid end to end on real data, tracked in a real sqlite MLflow store,
interrupted and resumed without redoing finished runs, rendered in the paper's shape."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from mmrad.core.errors import DataError
from mmrad.core.outputs import MARKER
from mmrad.core.params import Params
from mmrad.ops import ablation
from mmrad.training.train import train
from tests.conftest import tiny_params_dict

SEEDS = [1, 2]


@pytest.fixture
def params():
    raw = tiny_params_dict()
    raw["ablation"].update(quick_steps=2, seeds=SEEDS)
    raw["evaluation"].update(bootstrap=50)
    return Params.model_validate(raw)


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri, uri)  # tracking and registry: an earlier test may have pointed the registry elsewhere


def test_every_table_row_names_a_known_variant_and_the_paper_has_a_number_per_column():
    for tid, table in ablation.TABLES.items():
        assert table.reference in [row.title for row in table.rows], tid
        for row in table.rows:
            assert row.variant in ablation.VARIANTS and set(row.variants.values()) <= set(ablation.VARIANTS)
            assert len(row.paper) == len(table.columns), (tid, row.title)
    used = {v for t in ablation.TABLES.values() for v in ablation.table_variants(t)}
    assert used == set(ablation.VARIANTS)  # no variant defined and never run
    assert ablation.TABLES["8"].rows[0].variant == "decoder_only"


def test_each_variant_changes_what_it_says_and_the_profile_sets_the_steps(params):
    p = ablation.run_params(params, "vpt", 7)
    assert (p.seed, p.model.tuning, p.train.steps) == (7, "vpt", 2)
    assert ablation.run_params(params, "train_oct", 1).train.modalities == ["oct"]
    assert ablation.run_params(params, "oct_first", 1).model.fusion_order == ("oct", "fundus")
    paper = Params.model_validate({**params.model_dump(mode="json"),
                                   "ablation": {**params.ablation.model_dump(), "profile": "paper"}})
    big = ablation.run_params(paper, "default", 1)
    assert (big.model.encoder, big.model.image_size, big.prepare.resolution, big.model.cnn) == \
        ("vit_b", 1024, 1024, "resnet50")
    assert not ablation.runnable(params, "pretrained_cnn")  # no weights.resnets configured


def test_a_tiny_grid_runs_tracks_resumes_and_renders(params, prepared_mmr, tmp_path, store, monkeypatch, caplog):
    out = tmp_path / "ablations"
    # an earlier grid's interrupted training of the first run: the grid resumes it from its checkpoint
    ablation.claim_folder(out)
    first = ablation.run_params(params, "default", SEEDS[0])
    train(first, prepared_mmr, tmp_path / "elsewhere", out / "checkpoints" / "default" / f"seed-{SEEDS[0]}",
          stop_after=1, progress=False)

    # the grid is killed during its third training
    calls = []

    def dies_on_the_third(*args, **kwargs):
        calls.append(args[0].model.fusion_order)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(ablation, "train", dies_on_the_third)
    tracker = lambda record: ablation.track_run(params, record, tmp_path)  # noqa: E731
    with caplog.at_level("INFO", logger="mmrad"), pytest.raises(KeyboardInterrupt):
        ablation.run_grid(params, ["12"], prepared_mmr, out, tracker=tracker)
    assert "ablation default seed 1: training 2 steps (resuming)" in caplog.text
    assert sorted(p.parent.name + "/" + p.name for p in (out / "runs").glob("*/seed-*")) == \
        ["default/seed-1", "default/seed-2"]
    assert not list((out / "runs").glob("*/.seed-*"))  # no half-written run folder

    monkeypatch.setattr(ablation, "train", train)
    records = ablation.run_grid(params, ["12"], prepared_mmr, out, tracker=tracker)
    assert [(r["variant"], r["seed"], r["skipped"]) for r in records] == [
        ("default", 1, True), ("default", 2, True), ("oct_first", 1, False), ("oct_first", 2, False)]
    again = ablation.run_grid(params, ["12"], prepared_mmr, out, tracker=tracker)
    assert all(r["skipped"] for r in again)  # a finished grid does nothing
    assert not list((out / "checkpoints").glob("*/seed-*"))  # finished runs' checkpoints removed, models kept
    assert len(list((out / "models").glob("*/seed-*/model.pt"))) == 4

    # each run in MLflow once, in its own experiment, never a registered model
    experiment = store.get_experiment_by_name(f"{params.tracking.experiment}-ablations")
    runs = store.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["default seed 1", "default seed 2", "oct_first seed 1",
                                                     "oct_first seed 2"]
    assert all("detection.fusion" in r.data.metrics and "fundus.pixel_auroc" in r.data.metrics for r in runs)
    assert store.search_registered_models() == []

    # the report: the paper's rows, ours with an interval and a p-value, the paper's number
    text = ablation.render(params, ["12", "10"], out)
    assert "## Table 12: the fusion strategy" in text
    assert "4 of 10 runs finished" in text  # Table 10's 3 other variants x 2 seeds were not run
    assert "| setting | detection AUC ours | detection AUC paper |" in text
    row = next(line for line in text.splitlines() if line.startswith("| Fusion token (T_oct - T_c)"))
    assert row.endswith(" | 0.7456 |") and ", p " in row and " [" in row
    assert "| Maximum | " in text and " | 0.7338 |" in text
    assert "| Focal | not run | 0.7210 | not run | 0.3477 |" in text
    # max and mean of the maps come from the same runs as the proposed row, and differ from its fusion score
    values = {line.split(" | ")[0]: line.split(" | ")[1].split(" [")[0] for line in text.splitlines()
              if line.startswith("| ") and " [" in line}
    assert len({values["| Maximum"], values["| Mean"], values["| Fusion token (T_c - T_oct) (proposed)"]}) == 3
    paper = Params.model_validate({**params.model_dump(mode="json"),
                                   "ablation": {**params.ablation.model_dump(), "quick_steps": 3}})
    assert "0 of 4 runs finished" in ablation.render(paper, ["12"], out)  # runs of other params do not count
    # the written report links one figure per table with runs, a real PNG in the grid's folder
    report = ablation.write_report(params, ["12", "10"], out, tmp_path / "r" / "ablations.md")
    assert "![Table 12: the fusion strategy (multi-modal detection AUC)](../ablations/figures/table-12.png)" in \
        report.read_text()
    assert (out / "figures" / "table-12.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "figures" / "table-10.png").is_file()  # its proposed row has runs (Table 12's)


def test_a_changed_variant_is_run_again_not_taken_from_the_old_folder(params, prepared_mmr, tmp_path):
    out = tmp_path / "a"
    ablation.run_grid(params, ["12"], prepared_mmr, out, seeds=[1])
    changed = Params.model_validate({**params.model_dump(mode="json"),
                                     "ablation": {**params.ablation.model_dump(), "quick_steps": 3}})
    records = ablation.run_grid(changed, ["12"], prepared_mmr, out, seeds=[1])
    assert [r["skipped"] for r in records] == [False, False] and records[0]["steps"] == 3


def test_bad_tables_and_a_users_folder_are_refused_before_any_work(params, prepared_mmr, tmp_path):
    with pytest.raises(DataError, match=r"mmrad ablate: unknown table\(s\) \['99'\] \(known: \['4', "):
        ablation.run_grid(params, ["99"], prepared_mmr, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="the output folder exists and was not written by mmrad"):
        ablation.run_grid(params, ["12"], prepared_mmr, mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (ablation.claim_folder(tmp_path / "new") / MARKER).is_file()  # a new folder becomes ours


def test_a_cache_of_another_resolution_is_refused_with_what_to_do(params, prepared_mmr, tmp_path):
    paper = Params.model_validate({**params.model_dump(mode="json"),
                                   "ablation": {**params.ablation.model_dump(), "profile": "paper"}})
    with pytest.raises(DataError, match=rf"^{prepared_mmr}: the prepared cache is 64 px but the profile's model "
                                        r"reads 1024 px \(prepare MMR with prepare.resolution 1024"):
        ablation.run_grid(paper, ["12"], prepared_mmr, tmp_path / "p")
    assert not (tmp_path / "p").exists()
