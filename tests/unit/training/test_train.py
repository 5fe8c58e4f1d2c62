"""Training: the loss goes down, resume equals an uninterrupted run, outputs hold only what trains."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch

from mmrad.core.errors import DataError
from mmrad.core.params import Params
from mmrad.data.splits import load_training_images
from mmrad.models.builder import build_model, load_finetuned
from mmrad.training.train import batch_indices, lovasz_hinge, make_batch, map_loss, train
from tests.conftest import tiny_params_dict


def _params(**train) -> Params:
    raw = tiny_params_dict()
    raw["train"].update(train)
    return Params.model_validate(raw)


def test_batches_visit_every_case_once_per_epoch_and_are_reproducible():
    seen = np.concatenate([batch_indices(10, 3, step, seed=5) for step in range(4)])
    assert sorted(seen[:10]) == list(range(10))  # epoch 0: 4 steps of 3, the last topped up
    assert np.array_equal(batch_indices(10, 3, 2, 5), batch_indices(10, 3, 2, 5))
    assert not np.array_equal(batch_indices(10, 3, 4, 5), batch_indices(10, 3, 0, 5))  # next epoch, new order


def test_make_batch_is_a_pure_function_of_seed_and_step(prepared_mmr):
    params = _params()
    images, cases = load_training_images(prepared_mmr)
    assert list(images) == ["fundus", "oct"]
    assert images["fundus"].shape == images["oct"].shape == (len(cases), 64, 64, 3)
    a, b = make_batch(images, 3, params), make_batch(images, 3, params)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the case label is "either modality has an anomaly" (Eq. 9)
    expected = torch.maximum(a["fundus_mask"].flatten(1).amax(1), a["oct_mask"].flatten(1).amax(1))
    assert torch.equal(a["label"], expected)


@pytest.mark.parametrize("kind", ["ce", "focal", "dice", "lovasz"])
def test_map_losses_reward_the_right_answer(kind):
    target = torch.zeros(2, 8, 8)
    target[:, 2:5, 2:5] = 1
    good = torch.where(target > 0, 6.0, -6.0)
    assert map_loss(good, target, kind) < map_loss(-good, target, kind)
    assert map_loss(good, target, kind) < 0.05


def test_training_drives_the_loss_down_and_says_random_init_loudly(prepared_mmr, tmp_path, caplog):
    params = _params(steps=40, batch_size=2, lr=2e-3, checkpoint_every=40)
    with caplog.at_level(logging.INFO, logger="mmrad"):
        metrics = train(params, prepared_mmr, tmp_path / "model", tmp_path / "ckpt", progress=False)
    assert "RANDOM INIT" in caplog.text
    # progress reaches the log (a flow run's log) without the terminal's bar: every 4th of 40 steps
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" (")[0] for line in progress] == [f"step {k}/40" for k in range(4, 41, 4)]
    assert re.fullmatch(r"step 40/40 \(100 %\): loss \d\.\d{4}, \d+\.\d\d steps/s, about 0 s left", progress[-1])
    assert metrics["pretrained"] is False and metrics["weights"]["sam"] == "random init"
    assert metrics["final_loss"] < 0.8 * metrics["first_loss"], metrics
    saved = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert saved["trainable_parameters"] == metrics["trainable_parameters"] > 0
    assert saved["frozen_parameters"] > saved["trainable_parameters"]
    assert len((tmp_path / "model" / "loss.tsv").read_text().splitlines()) == 41


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(prepared_mmr, tmp_path):
    params = _params(steps=6, checkpoint_every=3)
    train(params, prepared_mmr, tmp_path / "full", tmp_path / "ckpt-full", progress=False)
    partial = train(params, prepared_mmr, tmp_path / "split", tmp_path / "ckpt-split", stop_after=3, progress=False)
    assert partial == {"step": 3, "finished": False} and not (tmp_path / "split" / "model.pt").exists()
    train(params, prepared_mmr, tmp_path / "split", tmp_path / "ckpt-split", resume=True, progress=False)
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["trainable"]
    split = torch.load(tmp_path / "split" / "model.pt", weights_only=True)["trainable"]
    assert full.keys() == split.keys()
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert (tmp_path / "full" / "loss.tsv").read_text() == (tmp_path / "split" / "loss.tsv").read_text()


def test_resume_refuses_a_checkpoint_of_other_params(prepared_mmr, tmp_path):
    train(_params(steps=6), prepared_mmr, tmp_path / "m", tmp_path / "ckpt", stop_after=3, progress=False)
    with pytest.raises(DataError, match="checkpoint was made with other parameters"):
        train(_params(steps=6, lr=1e-3), prepared_mmr, tmp_path / "m", tmp_path / "ckpt", resume=True)
    with pytest.raises(DataError, match="no checkpoint to resume from"):
        train(_params(steps=6), prepared_mmr, tmp_path / "m", tmp_path / "none", resume=True)


def test_the_model_file_holds_only_trainable_weights_and_reloads(prepared_mmr, tmp_path):
    params = _params(steps=3)
    train(params, prepared_mmr, tmp_path / "m", tmp_path / "ckpt", progress=False)
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    model, _ = build_model(params)
    assert set(state["trainable"]) == set(model.trainable_state_dict())
    assert not any(k.startswith(("image_encoder.", "cnns.")) for k in state["trainable"])
    reloaded = load_finetuned(tmp_path / "m" / "model.pt", params)
    for key, value in state["trainable"].items():
        assert torch.equal(reloaded.state_dict()[key], value)
    other_seed = Params.model_validate({**tiny_params_dict(), "seed": 1})
    with pytest.raises(DataError, match="trained on other frozen weights"):
        load_finetuned(tmp_path / "m" / "model.pt", other_seed)


def test_configured_weights_are_loaded_and_identified(tmp_path):
    """Official-format files written here (a SAM state dict with its three prefixes, a torchvision
    ResNet state dict) go through params.yaml's `weights` into the model."""
    import torchvision

    torch.manual_seed(123)
    donor, _ = build_model(_params())
    sam_state = {f"{part}.{k}": v for part in ("image_encoder", "prompt_encoder", "mask_decoder")
                 for k, v in getattr(donor, part).state_dict().items()}
    torch.save(sam_state, tmp_path / "sam_tiny.pth")
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    raw = tiny_params_dict()
    raw["weights"] = {"sam": {"path": str(tmp_path / "sam_tiny.pth"), "format": "sam"},
                      "resnets": [{"path": str(tmp_path / "resnet18.pth"), "format": "torchvision"}]}
    model, identity = build_model(Params.model_validate(raw))
    assert identity["sam"].startswith("sam:sam_tiny.pth:sha256=")
    assert identity["resnets"][0].startswith("torchvision:resnet18.pth:sha256=")
    assert identity["resnets"][1] == "random init"  # a second CNN without a file stays random, and is said so
    for key, value in donor.image_encoder.state_dict().items():
        assert torch.equal(model.image_encoder.state_dict()[key], value)
    assert torch.equal(model.mask_token, donor.mask_decoder.mask_tokens.weight[:1])  # T_m from the loaded SAM
    assert torch.equal(model.cnns[0].resnet.conv1.weight, resnet.conv1.weight)
    raw["weights"]["sam"]["sha256"] = "0" * 64
    with pytest.raises(DataError, match="sha256 mismatch"):
        build_model(Params.model_validate(raw))


def test_single_modal_training_uses_the_localisation_loss_only(prepared_resc, tmp_path):
    """Fig. 5b: an OCT-only dataset trains the same model on its one modality, without fusion."""
    params = _params(steps=30, batch_size=2, lr=2e-3, checkpoint_every=30)
    images, cases = load_training_images(prepared_resc)
    assert list(images) == ["oct"] and len(cases) == 3
    batch = make_batch(images, 0, params)
    assert set(batch) == {"oct", "oct_mask", "label"}
    metrics = train(params, prepared_resc, tmp_path / "m", tmp_path / "ckpt", progress=False)
    assert metrics["modalities"] == ["oct"]
    assert metrics["final_loss"] < 0.8 * metrics["first_loss"], metrics
    header = (tmp_path / "m" / "loss.tsv").read_text().splitlines()[0]
    assert header == "step\tloss\toct"


def test_lovasz_hinge_equals_the_jaccard_loss_where_the_errors_are_zero_or_one():
    """The Lovasz extension agrees with the set function on indicator vectors (Berman et al. 2018): logits
    +-1 (hinge error 0) on correct pixels and 0 (error 1) on a chosen set M give Jaccard's 1 - IoU with M's
    positives missed and M's negatives predicted."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        target = torch.from_numpy(rng.random((1, 6, 6)) < 0.3).float()
        target[0, 0, 0] = 1  # at least one positive
        wrong = torch.from_numpy(rng.random((1, 6, 6)) < 0.25)
        logits = torch.where(wrong, 0.0, 2 * target - 1)
        missed = float((wrong & (target > 0)).sum())
        false_alarms = float((wrong & (target == 0)).sum())
        positives = float(target.sum())
        jaccard = 1 - (positives - missed) / (positives + false_alarms)
        assert float(lovasz_hinge(logits, target)) == pytest.approx(jaccard, abs=1e-6)


def test_train_modalities_trains_one_modality_of_a_pair(prepared_mmr, prepared_resc, tmp_path):
    """Table 6: ``train.modalities: [fundus]`` on the paired MMR trains a fundus-only model (no fusion loss);
    a modality the dataset lacks is refused, naming the manifest and the rule, and nothing is written."""
    params = _params(steps=2, batch_size=2, checkpoint_every=2, modalities=["fundus"])
    metrics = train(params, prepared_mmr, tmp_path / "m", tmp_path / "ckpt", progress=False)
    assert metrics["modalities"] == ["fundus"]
    assert (tmp_path / "m" / "loss.tsv").read_text().splitlines()[0] == "step\tloss\tfundus"
    with pytest.raises(DataError, match=r"manifest.parquet: train.modalities names no modality of this dataset "
                                        r"\(train.modalities \['fundus'\], the dataset has \['oct'\]\)"):
        train(params, prepared_resc, tmp_path / "n", tmp_path / "ck2", progress=False)
    assert not (tmp_path / "n").exists()
