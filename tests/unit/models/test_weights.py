"""Pretrained-weight loaders: each test writes a checkpoint in a release's real layout and loads it.

Small modules built from the same code (segment_anything, torchvision) keep
the files small; the real torchvision ResNet-50 state dict (~100 MB) is
written once per session. "Loaded" always means: the module's tensors equal
the tensors written, number for number.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from mmrad.core.errors import DataError
from mmrad.models.weights import (
    ClipResNetTrunk,
    LoadReport,
    load_checkpoint,
    load_resnet50,
    load_sam,
    load_sam_encoder,
)

# --------------------------------------------------------------------------------------
# Small models with the structure of segment_anything/build_sam.py
# --------------------------------------------------------------------------------------


def tiny_encoder(seed: int, use_abs_pos: bool = True) -> ImageEncoderViT:
    torch.manual_seed(seed)
    return ImageEncoderViT(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                           global_attn_indexes=(1,), window_size=2, out_chans=256,
                           use_rel_pos=True, use_abs_pos=use_abs_pos)


def tiny_sam(seed: int) -> Sam:
    encoder = tiny_encoder(seed)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(4, 4), input_image_size=(64, 64),
                           mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                          transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every float tensor (parameters and BN statistics) fresh random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            else:  # num_batches_tracked
                tensor.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))
    return module


def assert_holds(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Every tensor in ``expected`` (module key -> tensor) equals the module's."""
    actual = module.state_dict()
    assert expected, "nothing to compare"
    for key, value in expected.items():
        assert torch.equal(actual[key], value.to(actual[key].dtype)), key


def assert_differs(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Sanity: before loading, the target does not already hold the written weights."""
    actual = module.state_dict()
    assert any(not torch.equal(actual[k], v) for k, v in expected.items() if v.is_floating_point())


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


# --------------------------------------------------------------------------------------
# Session files
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sam_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An official-format SAM checkpoint: the flat Sam state dict."""
    state = clone(randomized(tiny_sam(0), 100).state_dict())
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in state
    path = tmp_path_factory.mktemp("sam") / "sam_vit_t_000000.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="session")
def resnet_state() -> dict[str, torch.Tensor]:
    return clone(randomized(torchvision.models.resnet50(), 200).state_dict())


@pytest.fixture(scope="session")
def torchvision_file(tmp_path_factory, resnet_state) -> Path:
    path = tmp_path_factory.mktemp("tv") / "resnet50-00000000.pth"
    torch.save(resnet_state, path)
    return path


@pytest.fixture(scope="session")
def fresh_resnet():
    """A factory for differently-initialised torchvision ResNet-50s."""
    def make(seed: int = 1):
        torch.manual_seed(seed)
        return torchvision.models.resnet50()
    return make


# --------------------------------------------------------------------------------------
# The five formats
# --------------------------------------------------------------------------------------


def test_official_sam_checkpoint_loads_every_tensor(sam_file):
    path, state = sam_file
    sam = tiny_sam(1)
    assert_differs(sam, state)
    report = load_sam(sam, path)
    assert_holds(sam, state)
    assert isinstance(report, LoadReport)
    assert report.loaded == len(state) and report.skipped == [] and report.kept_init == []
    assert report.fmt == "sam" and report.path == str(path)
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sam_checkpoint_loads_into_a_larger_model_holding_the_three_parts(sam_file):
    path, state = sam_file

    class Bigger(torch.nn.Module):  # like MMRAD: SAM's parts plus layers of its own
        def __init__(self):
            super().__init__()
            sam = tiny_sam(1)
            self.image_encoder, self.prompt_encoder, self.mask_decoder = (
                sam.image_encoder, sam.prompt_encoder, sam.mask_decoder)
            self.prompt_layer = torch.nn.Linear(4, 4)

    model = Bigger()
    own = model.prompt_layer.weight.detach().clone()
    report = load_sam(model, path)
    assert_holds(model, state)
    assert torch.equal(model.prompt_layer.weight, own) and report.loaded == len(state)

    with pytest.raises(DataError, match=r"target module lacks SAM's parts .*\['mask_decoder'\]"):
        load_sam(torch.nn.ModuleDict({"image_encoder": tiny_encoder(1),
                                      "prompt_encoder": model.prompt_encoder}), path)


def test_sam_encoder_from_full_checkpoint_skips_prompt_encoder_and_decoder(sam_file):
    path, state = sam_file
    encoder = tiny_encoder(1)
    expected = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    assert_differs(encoder, expected)
    report = load_sam_encoder(encoder, path, fmt="sam")
    assert_holds(encoder, expected)
    assert report.loaded == len(expected) == len(encoder.state_dict())
    assert report.skipped == sorted(k for k in state if not k.startswith("image_encoder."))
    assert any(k.startswith("mask_decoder.") for k in report.skipped)


def test_lvm_med_vit_release_loads_into_encoder_without_abs_pos(tmp_path):
    # lvmmed_vit.pth: flat ImageEncoderViT keys, no prefix, no pos_embed (use_abs_pos=False).
    state = clone(randomized(tiny_encoder(0, use_abs_pos=False), 300).state_dict())
    assert "pos_embed" not in state and "neck.0.weight" in state and "blocks.1.attn.rel_pos_h" in state
    path = tmp_path / "lvmmed_vit.pth"
    torch.save(state, path)

    encoder = tiny_encoder(1, use_abs_pos=False)
    assert_differs(encoder, state)
    report = load_sam_encoder(encoder, path, fmt="lvm-med")
    assert_holds(encoder, state)
    assert report.loaded == len(state) and report.skipped == []

    # An encoder with an absolute position embedding cannot take it: named, not silently kept.
    with pytest.raises(DataError, match=r"missing: \['pos_embed'\]"):
        load_sam_encoder(tiny_encoder(1, use_abs_pos=True), path, fmt="lvm-med")


def test_torchvision_resnet50_state_dict(torchvision_file, resnet_state, fresh_resnet):
    resnet = fresh_resnet()
    assert_differs(resnet, resnet_state)
    report = load_resnet50(resnet, torchvision_file, fmt="torchvision")
    assert_holds(resnet, resnet_state)
    assert report.loaded == len(resnet_state) == 320
    assert report.skipped == [] and report.kept_init == []


def test_torchvision_file_into_trunk_without_layer4_and_fc(torchvision_file, resnet_state, fresh_resnet):
    trunk = fresh_resnet()
    del trunk.layer4, trunk.fc  # what the model keeps: stem + layer1..3
    report = load_resnet50(trunk, torchvision_file, fmt="torchvision")
    kept = {k: v for k, v in resnet_state.items() if not k.startswith(("layer4.", "fc."))}
    assert_holds(trunk, kept)
    assert report.loaded == len(kept) == len(trunk.state_dict())
    assert report.skipped == sorted(k for k in resnet_state if k.startswith(("layer4.", "fc.")))
    assert "fc.weight" in report.skipped and "layer4.2.bn3.running_var" in report.skipped

    # Only a part the module lacks is skipped: with layer4 present it is strict again.
    partial = fresh_resnet()
    del partial.fc
    state = {k: v for k, v in resnet_state.items() if k != "layer4.0.conv1.weight"}
    torch.save(state, torchvision_file.with_name("partial.pth"))
    with pytest.raises(DataError, match=r"missing: \['layer4.0.conv1.weight'\]"):
        load_resnet50(partial, torchvision_file.with_name("partial.pth"))


def test_torchvision_file_without_batchnorm_counters_loads(tmp_path, resnet_state, fresh_resnet):
    # Older releases (resnet50-19c8e357.pth) predate BatchNorm's num_batches_tracked buffer.
    state = {k: v for k, v in resnet_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet50-19c8e357.pth"
    torch.save(state, path)
    resnet = fresh_resnet()
    report = load_resnet50(resnet, path)
    assert_holds(resnet, state)
    assert len(report.kept_init) == 53 and all(k.endswith("num_batches_tracked") for k in report.kept_init)


def test_lvm_med_resnet50_release_without_fc(tmp_path, resnet_state, fresh_resnet):
    # lvmmed_resnet.torch: flat torchvision keys, no prefix, no classifier head.
    state = {k: v for k, v in resnet_state.items() if not k.startswith("fc.")}
    path = tmp_path / "lvmmed_resnet.torch"
    torch.save(state, path)
    resnet = fresh_resnet()
    fc_before = resnet.fc.weight.detach().clone()
    report = load_resnet50(resnet, path, fmt="lvm-med")
    assert_holds(resnet, state)
    assert torch.equal(resnet.fc.weight, fc_before)
    assert report.kept_init == ["fc.bias", "fc.weight"] and report.loaded == len(state)

    # The same file is not a complete torchvision checkpoint.
    with pytest.raises(DataError, match=r"missing: \['fc.weight', 'fc.bias'\]"):
        load_resnet50(fresh_resnet(), path, fmt="torchvision")


def vilref_checkpoint(trunk_state: dict[str, torch.Tensor]) -> dict:
    """ViLReF/Chinese-CLIP layout: a container around a DDP ("module.") CLIP state dict.

    The trunk's keys are real ModifiedResNet keys; stage 4, the attention pool
    and the text tower carry their real names with small stand-in tensors
    (skipped keys are never shape-checked).
    """
    state = {f"module.visual.{k}": v for k, v in trunk_state.items()}
    for key in ("layer4.0.conv1.weight", "layer4.0.downsample.0.weight", "layer4.2.bn3.running_var",
                "attnpool.positional_embedding", "attnpool.k_proj.weight", "attnpool.q_proj.bias",
                "attnpool.v_proj.weight", "attnpool.c_proj.weight"):
        state[f"module.visual.{key}"] = torch.randn(3)
    for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
                "text_projection", "logit_scale"):
        state[f"module.{key}"] = torch.randn(2)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "weight_decay": 0.0, "params": [0, 1]}]}
    return {"epoch": 10, "step": 1234, "name": "ViLReF_RN50", "state_dict": state, "optimizer": optimizer}


def test_vilref_rn50_loads_stem_and_three_stages(tmp_path):
    trunk_state = clone(randomized(ClipResNetTrunk(), 400).state_dict())
    # Real ModifiedResNet names: 3-conv stem and the "downsample.0/1" branch.
    assert {"conv3.weight", "bn3.running_mean", "layer2.0.downsample.0.weight",
            "layer3.5.bn3.weight"} <= set(trunk_state)
    checkpoint = vilref_checkpoint(trunk_state)
    path = tmp_path / "ViLReF_RN50.pt"
    torch.save(checkpoint, path)

    trunk = ClipResNetTrunk()
    assert_differs(trunk, trunk_state)
    report = load_resnet50(trunk, path, fmt="vilref")
    assert_holds(trunk, trunk_state)
    assert report.loaded == len(trunk_state)
    assert report.skipped == sorted(k for k in checkpoint["state_dict"]
                                    if k.startswith(("module.visual.layer4.", "module.visual.attnpool."))
                                    or not k.startswith("module.visual."))
    assert len(report.skipped) == 12


def test_vilref_half_precision_tensors_load_into_float_trunk(tmp_path):
    trunk_state = clone(randomized(ClipResNetTrunk(), 401).state_dict())
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in trunk_state.items()}
    path = tmp_path / "ViLReF_RN50_fp16.pt"
    torch.save(vilref_checkpoint(half), path)
    trunk = ClipResNetTrunk()
    load_resnet50(trunk, path, fmt="vilref")
    assert trunk.conv1.weight.dtype == torch.float32
    assert_holds(trunk, {k: v.float() if v.is_floating_point() else v for k, v in half.items()})


def test_vilref_refuses_a_torchvision_resnet(tmp_path, fresh_resnet):
    path = tmp_path / "ViLReF_RN50.pt"
    torch.save(vilref_checkpoint(ClipResNetTrunk().state_dict()), path)
    with pytest.raises(DataError, match="vilref weights need a ClipResNetTrunk"):
        load_resnet50(fresh_resnet(), path, fmt="vilref")


def test_clip_trunk_stage_shapes_match_torchvision_resnet50(fresh_resnet):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    resnet = fresh_resnet().eval()
    with torch.no_grad():
        y = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        tv = []
        for stage in (resnet.layer1, resnet.layer2, resnet.layer3):
            y = stage(y)
            tv.append(y.shape)
        ours = [f.shape for f in ClipResNetTrunk().eval()(x)]
    assert ours == tv == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4)]


# --------------------------------------------------------------------------------------
# Integrity and failures
# --------------------------------------------------------------------------------------


def test_sha256_match_passes_and_mismatch_names_both_hashes(sam_file):
    path, state = sam_file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_sam(tiny_sam(1), path, sha256=digest).sha256 == digest
    assert load_sam(tiny_sam(1), path, sha256=digest[:8].upper()).sha256 == digest  # torchvision-style prefix
    assert set(load_checkpoint(path, sha256=digest)) == set(state)

    wrong = "0" * 64
    with pytest.raises(DataError, match="sha256 mismatch") as info:
        load_sam(tiny_sam(1), path, sha256=wrong)
    assert wrong in str(info.value) and digest in str(info.value) and str(path) in str(info.value)
    with pytest.raises(DataError, match="bad sha256 parameter"):
        load_checkpoint(path, sha256="xyz")


@pytest.fixture
def encoder_state() -> dict[str, torch.Tensor]:
    return clone(randomized(tiny_encoder(0, use_abs_pos=False), 500).state_dict())


def test_missing_key_is_named(tmp_path, encoder_state):
    del encoder_state["blocks.1.attn.proj.weight"]
    torch.save(encoder_state, tmp_path / "w.pth")
    with pytest.raises(DataError, match="checkpoint does not match the model") as info:
        load_sam_encoder(tiny_encoder(1, use_abs_pos=False), tmp_path / "w.pth", fmt="lvm-med")
    message = str(info.value)
    assert "missing: ['blocks.1.attn.proj.weight'] (1 total)" in message and "unexpected: [] (0 total)" in message


def test_extra_key_is_named(tmp_path, encoder_state):
    encoder_state["blocks.2.attn.qkv.weight"] = torch.zeros(3)
    torch.save(encoder_state, tmp_path / "w.pth")
    with pytest.raises(DataError, match=r"unexpected: \['blocks.2.attn.qkv.weight'\] \(1 total\)"):
        load_sam_encoder(tiny_encoder(1, use_abs_pos=False), tmp_path / "w.pth", fmt="lvm-med")


def test_sam_encoder_keeps_unknown_prefixes_unexpected(tmp_path, sam_file):
    _, state = sam_file
    torch.save({**state, "text_encoder.weight": torch.zeros(2)}, tmp_path / "w.pth")
    with pytest.raises(DataError, match=r"unexpected: \['text_encoder.weight'\]"):
        load_sam_encoder(tiny_encoder(1), tmp_path / "w.pth", fmt="sam")


def test_wrong_shape_is_named(tmp_path, encoder_state):
    # A global-attention block's rel-pos table from a different image size.
    encoder_state["blocks.1.attn.rel_pos_h"] = torch.zeros(15, 32)
    torch.save(encoder_state, tmp_path / "w.pth")
    with pytest.raises(DataError, match="shapes do not match") as info:
        load_sam_encoder(tiny_encoder(1, use_abs_pos=False), tmp_path / "w.pth", fmt="lvm-med")
    assert "blocks.1.attn.rel_pos_h: file (15, 32) vs model (7, 32)" in str(info.value)


def test_model_is_untouched_when_a_check_fails(tmp_path, encoder_state):
    del encoder_state["neck.0.weight"]
    torch.save(encoder_state, tmp_path / "w.pth")
    encoder = tiny_encoder(1, use_abs_pos=False)
    before = clone(encoder.state_dict())
    with pytest.raises(DataError):
        load_sam_encoder(encoder, tmp_path / "w.pth", fmt="lvm-med")
    assert_holds(encoder, before)


def test_non_checkpoint_file_fails(tmp_path, sam_file):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(b"<html>403 Forbidden</html>\n")  # what a failed download often leaves
    with pytest.raises(DataError, match="not a readable torch checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)

    truncated = tmp_path / "truncated.pth"  # an interrupted copy of a real checkpoint
    truncated.write_bytes(sam_file[0].read_bytes()[:100_000])
    with pytest.raises(DataError, match="not a readable torch checkpoint"):
        load_checkpoint(truncated)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled object, not a state dict
    with pytest.raises(DataError, match="not a readable torch checkpoint") as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "weights_only" in message and "Unsupported global" in message and "\n" not in message


def test_tensor_or_nested_object_is_not_a_state_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pth")
    with pytest.raises(DataError, match="checkpoint is not a state dict"):
        load_checkpoint(tmp_path / "t.pth")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "n.pth")  # no verified release uses "model"
    with pytest.raises(DataError, match=r"not name -> tensor: \['model'\]"):
        load_checkpoint(tmp_path / "n.pth")


def test_missing_file_fails(tmp_path):
    with pytest.raises(DataError, match="checkpoint file is missing"):
        load_checkpoint(tmp_path / "absent.pth")


def test_unknown_format_fails(tmp_path, sam_file, fresh_resnet):
    path, _ = sam_file
    with pytest.raises(DataError, match="unknown checkpoint format"):
        load_sam_encoder(tiny_encoder(1), path, fmt="medsam")
    with pytest.raises(DataError, match=r"unknown checkpoint format \(fmt 'imagenet'"):
        load_resnet50(fresh_resnet(), path, fmt="imagenet")
