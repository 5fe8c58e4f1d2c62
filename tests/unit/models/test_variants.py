"""The ablation variants of the model (issue 15): each reads as the paper's table describes it.

Shapes for every variant, and trainable parameter counts that match each variant's definition exactly:
decoder-only trains nothing on the encoder side, VPT adds its prompt tokens per block, AdaptFormer its
bottlenecks, EVP swaps LPT's CNN projection for a patch embedding of the high frequencies, the prompt
sharing choices add or remove per-block layers, a separate decoder doubles the decoder's trainable part.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmrad.core.params import Params
from mmrad.models.builder import model_config
from mmrad.models.mmrad import (
    ENCODERS,
    MMRAD,
    PATCH,
    PROMPT_EMBED_DIM,
    RESNETS,
    TUNINGS,
    block_forward,
    high_frequencies,
    prompted_attention,
)
from tests.conftest import tiny_params_dict

CONFIG = model_config(Params.model_validate(tiny_params_dict()))  # vit_tiny at 64 px, resnet18 trunks
DEPTH, WIDTH, H = ENCODERS[CONFIG.encoder]["depth"], CONFIG.width, CONFIG.h


def _build(**changes) -> MMRAD:
    torch.manual_seed(0)
    return MMRAD(replace(CONFIG, **changes)).eval()


def _images(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 64, 64, generator=g) * 255


def _trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _encoder_side(model: MMRAD) -> int:
    """Trainable parameters outside the decoder, its tokens and the fusion head."""
    decoder_side = {id(p) for part in (*model.decoders().values(), model.fusion_head, model.fusion_norm)
                    for p in part.parameters()}
    decoder_side |= {id(model.fusion_token), *(id(t) for t in model.mask_tokens().values())}
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in decoder_side)


def _linear(n_in, n_out):
    return n_in * n_out + n_out


@pytest.mark.parametrize("tuning", TUNINGS)
def test_every_tuning_gives_maps_and_a_score(tuning):
    model = _build(tuning=tuning)
    with torch.no_grad():
        out = model(_images(), _images(seed=2))
    assert out["fundus"].shape == out["oct"].shape == (2, 64, 64)
    assert out["score"].shape == (2,)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_encoder_side_parameters_match_each_tuning_method():
    lpt_generator = _linear(H, WIDTH) + DEPTH * _linear(H, H) + _linear(WIDTH, H)  # LN_s + LN_i + patch_proj
    expected = {
        "decoder_only": 0,
        "vpt": DEPTH * CONFIG.vpt_tokens * WIDTH,
        "adaptformer": DEPTH * (_linear(WIDTH, H) + _linear(H, WIDTH)),
        "lpt": lpt_generator + _linear(CONFIG.cnn_count * sum(RESNETS[CONFIG.cnn]), H),
        "evp": lpt_generator + 3 * PATCH * PATCH * H + H,
    }
    for tuning, count in expected.items():
        model = _build(tuning=tuning)
        assert _encoder_side(model) == count, tuning
        assert _trainable(model.image_encoder) == 0, tuning  # the encoder itself stays frozen in every variant
    assert len(_build(tuning="evp").cnns) == 0 and len(_build(tuning="vpt").cnns) == 0


def test_decoder_only_builds_no_graph_through_the_encoder():
    model = _build(tuning="decoder_only").train()
    embedding = model.embed(_images())
    assert not embedding.requires_grad


@pytest.mark.parametrize("tuning", ["lpt", "evp", "vpt", "adaptformer"])
def test_every_tuning_starts_as_the_frozen_encoder_and_then_trains(tuning):
    """Zero-initialised LN_s / adapter up-projections: at step 0 the embedding is the frozen encoder's
    (VPT's prompts change it from the start, as in VPT); each one's encoder-side parameters get gradients."""
    model = _build(tuning=tuning).train()
    images = _images()
    plain = model.image_encoder(((images - model.pixel_mean) / model.pixel_std))
    embedding = model.embed(images)
    if tuning != "vpt":
        assert torch.allclose(embedding, plain, atol=1e-5)
    embedding.square().mean().backward()
    side = [p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] in
            ("lpt", "vpt_prompts", "adapters")]
    assert side and any(p.grad is not None and p.grad.abs().sum() > 0 for p in side)


@pytest.mark.parametrize("sharing, per_block, lifts", [("ln_s", DEPTH, 1), ("ln_i", 1, DEPTH), ("all", 1, 1),
                                                       ("none", DEPTH, DEPTH)])
def test_prompt_sharing_counts_the_shared_layers_once(sharing, per_block, lifts):
    model = _build(prompt_sharing=sharing)
    lpt = model.lpt
    assert _trainable(lpt.per_block) == per_block * _linear(H, H)
    lift_params = _trainable(lpt.lift)
    assert lift_params == lifts * _linear(H, WIDTH)
    with torch.no_grad():  # every block's prompt comes from its own (or the shared) layers
        base = torch.randn(1, CONFIG.grid, CONFIG.grid, H)
        for module in lpt.lift.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_()
        prompts = [lpt.prompt(base, i) for i in range(DEPTH)]
    distinct = len({tuple(p.flatten()[:8].tolist()) for p in prompts})
    assert distinct == (1 if sharing == "all" else DEPTH)


def test_a_separate_decoder_doubles_the_decoders_trainable_parameters():
    shared, separate = _build(), _build(decoder_sharing="separate")
    one = _trainable(shared.mask_decoder)
    assert one > 0
    assert _trainable(separate.mask_decoder) + _trainable(separate.oct_decoder) == 2 * one
    assert _trainable(separate) - _trainable(shared) == one
    assert separate.decoders()["oct"] is separate.oct_decoder and shared.decoders()["oct"] is shared.mask_decoder
    # it starts as a copy of the first, then trains on its own
    for a, b in zip(separate.mask_decoder.state_dict().values(), separate.oct_decoder.state_dict().values()):
        assert torch.equal(a, b)


def test_a_separate_mask_token_adds_one_token_and_is_used_for_the_oct():
    shared, separate = _build(), _build(mask_token_sharing="separate")
    assert _trainable(separate) - _trainable(shared) == PROMPT_EMBED_DIM
    assert torch.equal(separate.oct_mask_token, separate.mask_token)  # initialised alike
    fundus, oct_ = _images(), _images(seed=2)
    with torch.no_grad():
        before = separate(fundus, oct_)
        separate.oct_mask_token.add_(1.0)
        after = separate(fundus, oct_)
    assert torch.equal(before["fundus"], after["fundus"])
    assert not torch.allclose(before["oct"], after["oct"])


def test_prompted_attention_without_prompts_is_sams_attention():
    model = _build(tuning="vpt")
    block = model.image_encoder.blocks[1]  # global attention with relative positions
    x = torch.randn(2, CONFIG.grid, CONFIG.grid, WIDTH)
    with torch.no_grad():
        assert torch.allclose(prompted_attention(block.attn, x, torch.zeros(0, WIDTH)), block.attn(x), atol=1e-5)
        windowed = model.image_encoder.blocks[0]
        assert torch.allclose(block_forward(windowed, x), windowed(x), atol=1e-5)


def test_high_frequencies_remove_the_image_mean_and_keep_edges():
    flat = torch.full((1, 3, 64, 64), 100.0)
    assert high_frequencies(flat, 0.25).abs().max() < 1e-3  # a constant image has no high frequencies
    edge = flat.clone()
    edge[..., 32:] = 200.0
    hfc = high_frequencies(edge, 0.25)
    assert hfc[..., 30:34].mean() > 5 * hfc[..., 8:24].mean()  # the response sits on the edge
