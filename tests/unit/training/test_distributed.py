"""Data-parallel training (DDP, gloo on the CPU): 2 real processes give the 1-process result up to float order.

The 2-process runs are real torchrun launches of `mmrad train` (two Python
processes, a gloo process group over 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from mmrad.core.errors import DataError
from mmrad.data.splits import load_training_images
from mmrad.training import distributed
from mmrad.training.train import make_batch, train
from tests.conftest import tiny_params_dict


def _params_file(tmp_path, **train) -> str:
    raw = tiny_params_dict()
    raw["train"].update(steps=4, batch_size=4, checkpoint_every=2, **train)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _mmrad(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mmrad", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _trained(folder) -> tuple[dict, list[str]]:
    state = torch.load(folder / "model.pt", weights_only=True)
    return state["trainable"], (folder / "loss.tsv").read_text().splitlines()


def test_shards_rebuild_the_global_batch(prepared_mmr, tiny_params):
    images, _ = load_training_images(prepared_mmr)
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"batch_size": 4})})
    whole = make_batch(images, 3, params)
    parts = [make_batch(images, 3, params, distributed.shard(4, distributed.Context(rank, 2))) for rank in (0, 1)]
    for key in whole:
        assert torch.equal(whole[key], torch.cat([p[key] for p in parts])), key


def test_the_batch_must_divide_by_the_processes():
    with pytest.raises(DataError, match=r"train.batch_size \(4\) must be divisible .* processes \(3\)"):
        distributed.shard(4, distributed.Context(0, 3))


@pytest.fixture(scope="module")
def prepared_four(tmp_path_factory):
    """The tiny MMR with 4 healthy training cases: a global batch of 4, 2 per process, each case once
    (train.batch_size may not exceed the healthy cases)."""
    from mmrad.core.params import Params
    from mmrad.data.prepare import prepare_dataset
    from mmrad.synthetic.generate import generate

    raw = tiny_params_dict()
    raw["synthetic"]["mmr"]["train_normal"] = 4
    params = Params.model_validate(raw)
    root = tmp_path_factory.mktemp("four")
    generate(params, root / "raw", progress=False)
    prepare_dataset("mmr", root / "raw" / "MMR", root / "prepared", params.prepare.resolution, progress=False)
    return root / "prepared"


@pytest.mark.slow
def test_two_gloo_processes_train_the_one_process_model(prepared_four, tmp_path):
    prepared_mmr = prepared_four
    one = tmp_path / "one"
    result = _mmrad(["--params", _params_file(tmp_path), "train", "--prepared", str(prepared_mmr),
                     "--out", str(one), "--checkpoints", str(tmp_path / "ckpt1")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    (tmp_path / "two").mkdir()
    two = tmp_path / "two" / "model"
    # train.processes: 2 -> `mmrad train` starts torchrun itself (what `dvc repro` and the flow do)
    result = _mmrad(["--params", _params_file(tmp_path / "two", processes=2), "train", "--prepared",
                     str(prepared_mmr), "--out", str(two), "--checkpoints", str(tmp_path / "ckpt2")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stderr and "torch.distributed.run" in result.stderr

    weights1, losses1 = _trained(one)
    weights2, losses2 = _trained(two)
    assert weights1.keys() == weights2.keys()
    # Same up to the order of float sums (gloo's all-reduce vs one backward pass). Attention key biases have a
    # zero gradient in exact arithmetic (softmax ignores a bias shared by all keys), so AdamW turns their rounding
    # noise into full steps; and the fusion head reads T_f standardised by its tiny spread (model.fusion_norm),
    # which amplifies float-order noise in the decoder's gradients. Measured after 4 steps: per-step losses equal
    # to 1e-5, every weight within 6e-4 (4 steps of lr 2e-4 move a weight by up to 8e-4).
    for name in weights1:
        torch.testing.assert_close(weights2[name], weights1[name], rtol=1e-3, atol=1e-3, msg=name)
    assert losses1[0] == losses2[0] and len(losses1) == len(losses2) == 5
    for line1, line2 in zip(losses1[1:], losses2[1:]):
        assert [float(v) for v in line2.split("\t")] == pytest.approx([float(v) for v in line1.split("\t")], abs=1e-4)
    assert json.loads((two / "metrics.json").read_text())["processes"] == 2
    # one writer: rank 0 alone wrote the outputs and the checkpoint
    assert sorted(p.name for p in two.iterdir()) == [".mmrad-output", "loss.tsv", "metrics.json", "model.pt"]
    assert sorted(p.name for p in (tmp_path / "ckpt2").iterdir()) == ["checkpoint.pt"]


def test_one_process_is_untouched_by_the_distributed_code(prepared_mmr, tiny_params, tmp_path):
    """No launcher in the environment: no process group, the plain loop (the default pipeline's numbers)."""
    assert not distributed.under_launcher()
    metrics = train(tiny_params, prepared_mmr, tmp_path / "m", tmp_path / "c", progress=False)
    assert metrics["processes"] == 1 and not torch.distributed.is_initialized()
