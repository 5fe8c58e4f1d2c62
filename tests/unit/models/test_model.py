"""The MMRAD model: shapes, ranges, single- and multi-modal use, what trains and what stays frozen."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmrad.core.params import Params
from mmrad.models.builder import model_config
from mmrad.models.mmrad import MMRAD, ModelConfig, RunningStandardise, map_statistics, sincos_grid
from tests.conftest import tiny_params_dict

CONFIG = model_config(Params.model_validate(tiny_params_dict()))  # vit_tiny at 64 px, resnet18 trunks


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MMRAD(CONFIG).eval()


def _images(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 64, 64, generator=g) * 255


def test_paired_input_gives_two_maps_and_a_fused_score(model):
    with torch.no_grad():
        out = model(_images(), _images(seed=2))
    assert out["fundus"].shape == out["oct"].shape == (2, 64, 64)
    assert out["score"].shape == (2,)
    for value in out.values():
        assert torch.isfinite(value).all()
        probabilities = torch.sigmoid(value)
        assert (probabilities >= 0).all() and (probabilities <= 1).all()


@pytest.mark.parametrize("modality", ["fundus", "oct"])
def test_single_modal_input_scores_with_the_map_maximum(model, modality):
    with torch.no_grad():
        out = model(**{modality: _images()})
    assert set(out) == {modality, "score"}
    assert torch.equal(out["score"], out[modality].flatten(1).amax(1))


def test_single_modal_map_equals_the_paired_one_for_the_first_modality(model):
    # T_m is shared; the fundus pass of a pair sees the initial T_f, like a fundus-only pass.
    fundus, oct_ = _images(), _images(seed=2)
    with torch.no_grad():
        assert torch.allclose(model(fundus, oct_)["fundus"], model(fundus=fundus)["fundus"], atol=1e-5)


def test_fusion_order_matters(model):
    flipped = MMRAD(ModelConfig(**{**CONFIG.__dict__, "fusion_order": ("oct", "fundus")})).eval()
    flipped.load_state_dict(model.state_dict())
    fundus, oct_ = _images(), _images(seed=2)
    with torch.no_grad():
        assert not torch.allclose(model(fundus, oct_)["score"], flipped(fundus, oct_)["score"])


def test_missing_input_is_an_error(model):
    with pytest.raises(ValueError, match="needs a fundus image, an OCT image, or both"):
        model()


def test_zero_lift_means_the_pretrained_embedding_at_step_zero(model):
    images = _images()
    with torch.no_grad():
        assert torch.allclose(model.embed(images), model.image_encoder((images - model.pixel_mean) / model.pixel_std),
                              atol=1e-5)


def test_tokens_start_from_sams_mask_and_iou_tokens(model):
    assert torch.equal(model.mask_token, model.mask_decoder.mask_tokens.weight[:1])
    assert torch.equal(model.fusion_token, model.mask_decoder.iou_token.weight)


def test_frozen_parts_do_not_move_and_trainable_ones_do():
    torch.manual_seed(0)
    model = MMRAD(CONFIG).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=1e-3)
    out = model(_images(), _images(seed=2))
    (out["fundus"].mean() + out["oct"].mean() + out["score"].mean()).backward()
    optimiser.step()
    after = model.state_dict()
    names = set(model.trainable_state_dict())
    frozen_prefixes = ("image_encoder.", "prompt_encoder.", "cnns.")
    assert names and not any(n.startswith(frozen_prefixes) for n in names)
    for key, value in after.items():
        if key in names:
            continue
        assert torch.equal(value, before[key]), f"frozen {key} changed"  # incl. BatchNorm running stats
    moved = sum(not torch.equal(after[k], before[k]) for k in names)
    assert moved == len(names)  # every trainable tensor got an update (the zero lift too)
    counts = model.parameter_counts()
    buffers = {f"fusion_norm.{n}" for n, _ in model.fusion_norm.named_buffers()}  # saved, but not parameters
    assert buffers < names
    assert counts["trainable"] == sum(v.numel() for k, v in model.trainable_state_dict().items() if k not in buffers)
    assert counts["frozen"] > counts["trainable"]


def test_unknown_configuration_is_rejected():
    with pytest.raises(ValueError, match="unknown encoder 'vit_x'"):
        replace(CONFIG, encoder="vit_x")
    with pytest.raises(ValueError, match="multiple of 16"):
        replace(CONFIG, image_size=100)


def test_a_random_encoder_gets_position_embeddings_and_zero_keeps_segment_anythings():
    torch.manual_seed(0)
    model = MMRAD(CONFIG)
    pos = model.image_encoder.pos_embed[0]  # (grid, grid, C)
    assert CONFIG.position_init == "sincos"
    assert torch.allclose(pos, sincos_grid(CONFIG.grid, CONFIG.width))
    assert not torch.equal(pos[0, 0], pos[1, 0]) and not torch.equal(pos[0, 0], pos[0, 1])  # rows and columns differ
    for block in model.image_encoder.blocks:
        assert 0.01 < float(block.attn.rel_pos_h.std()) < 0.03 and 0.01 < float(block.attn.rel_pos_w.std()) < 0.03
    zero = MMRAD(replace(CONFIG, position_init="zero"))
    assert not zero.image_encoder.pos_embed.any() and not zero.image_encoder.blocks[0].attn.rel_pos_h.any()


def test_cnn_stages_are_brought_to_a_common_scale():
    torch.manual_seed(0)
    model = MMRAD(CONFIG).eval()
    captured = {}
    model.lpt.cnn_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("x", i[0]))
    with torch.no_grad():
        model(fundus=_images())
    widths = [64, 128, 256] * CONFIG.cnn_count  # resnet18's layer1-3 channels, per CNN
    chunks = torch.split(captured["x"], widths, dim=-1)  # (B, g, g, channels) per stage
    rms = torch.stack([c.pow(2).mean(dim=(1, 2, 3)).sqrt() for c in chunks])
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)


def test_the_fusion_head_input_is_standardised_with_running_statistics():
    norm = RunningStandardise(3, momentum=0.5)
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([100.0, -50.0, 7.0])
    first = base + 0.01 * torch.randn(8, 3, generator=g)
    out = norm.train()(first)  # the first batch initialises the statistics
    assert torch.allclose(norm.running_mean, first.mean(0)) and torch.allclose(norm.running_var, first.var(0))
    assert torch.allclose(out.std(0), torch.ones(3), atol=1e-3)  # the 1 % spread becomes unit scale
    second = base + 0.02 * torch.randn(4, 3, generator=g)
    norm(second)
    assert torch.allclose(norm.running_mean, 0.5 * first.mean(0) + 0.5 * second.mean(0))
    # a case scores the same whatever else is in its batch (train and eval alike): no batch statistics
    norm.eval()
    alone, together = norm(second[:1]), norm(second)[:1]
    assert torch.equal(alone, together)
    # the statistics are saved with the trainable weights (a loaded model must standardise the same way)
    torch.manual_seed(0)
    model = MMRAD(CONFIG)
    assert {"fusion_norm.running_mean", "fusion_norm.running_var", "fusion_norm.weight"} <= set(model.trainable_state_dict())


def test_map_statistics_are_each_maps_max_and_top_share_mean():
    logits = torch.zeros(2, 10, 10)
    logits[0, 0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])  # top 1 % of 100 pixels: the single highest
    logits[1] = -1.0
    stats = map_statistics([logits, 2 * logits])
    assert stats.shape == (2, 4)
    assert torch.equal(stats[0], torch.tensor([5.0, 5.0, 10.0, 10.0]))
    assert torch.equal(stats[1], torch.tensor([-1.0, -1.0, -2.0, -2.0]))
    big = torch.arange(2 * 200.0).reshape(2, 20, 10)  # 200 pixels: the top 2
    assert torch.equal(map_statistics([big])[:, 1], torch.tensor([198.5, 398.5]))
    assert not map_statistics([big.requires_grad_()]).requires_grad  # the head reads the maps, never trains them


def test_the_fusion_head_reads_the_maps_with_token_maps_and_only_the_token_with_token():
    fundus, oct_ = _images(), _images(seed=2)
    for fusion_input in ("token", "token_maps"):
        torch.manual_seed(0)
        m = MMRAD(replace(CONFIG, fusion_input=fusion_input)).eval()
        assert m.fusion_head.layers[0].in_features == 256 + (4 if fusion_input == "token_maps" else 0)
        with torch.no_grad():
            out = m(fundus, oct_)
            t_f = m.decode(m.embed(oct_), m.decode(m.embed(fundus), m.fusion_token.expand(2, 1, -1))[1])[1]
            maps = {k: out[k] for k in ("fundus", "oct")}
            shifted = {k: v + 3.0 for k, v in maps.items()}  # the same T_f, maps 3 logits higher
            assert torch.allclose(out["score"], m.fused_score(t_f, maps), atol=1e-5)
            # the map inputs start at weight zero: at initialisation the head scores as the paper's
            assert torch.equal(m.fused_score(t_f, maps), m.fused_score(t_f, shifted))
            m.fusion_head.layers[0].weight[:, 256:] = 0.1
            moved = not torch.allclose(m.fused_score(t_f, maps), m.fused_score(t_f, shifted))
        assert moved == (fusion_input == "token_maps")
