"""The MMRAD model (paper Sec. 4): frozen SAM encoder + low-level prompt tuning + a shared decoder.

Built from segment-anything's own modules:

* ``ImageEncoderViT`` (frozen): patch embedding, transformer blocks, neck.
* **LPT** (Eq. 6-7, trainable): low-level features ``F_c`` from the first three
  stages (layer1-3) of two frozen ResNets, resampled to the token grid,
  concatenated and projected to ``h``; ``F_p`` from the frozen patch
  embeddings projected to ``h``; prompt for block i ``Pr_i = LN_s(LN_i(F_c + F_p))``
  added to the tokens right before block i. ``LN_i`` is Linear(h, h) + GELU
  (one per block), ``LN_s`` one shared Linear(h, C) (Table 7: sharing only the
  lifting layer is best). ``LN_s`` starts at zero, so at step 0 the encoder
  computes exactly its pretrained embedding.
* **Decoder** (trainable, shared by both modalities): SAM's ``MaskDecoder``
  (two-way transformer, upscaling, hypernetwork MLP) driven by two tokens, the
  mask token ``T_m`` (from SAM's first mask token) and the fusion token ``T_f``
  (from SAM's IoU token) (Table 14). Per modality the tokens ``[T_f, T_m]``
  attend to that modality's embedding; ``T_m``'s output gives the anomaly map
  as in SAM (hypernetwork MLP . upscaled embedding, bilinear to input size).
  ``T_f`` visits the fundus first, then its output visits the OCT (Table 12:
  fundus first is best), and ``S = sigmoid(MLP(T_f))`` (Eq. 5; ``fusion_input:
  token``). ``fusion_input: token_maps`` (an option, a documented
  deviation, measured no better) also gives the head each map's maximum and
  top-1 % mean logit, detached, so it reads the evidence the maps carry.
* Single-modal input (Fig. 5): one pass; the score is the map's maximum.

Prompt-free use: no sparse prompts, dense prompt = SAM's ``no_mask_embed``.
Inputs are RGB float tensors in 0..255 (OCT as three equal channels), of side
``image_size``; SAM's pixel mean/std normalise them (they equal ImageNet's,
which the ResNets expect).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos, window_partition, window_unpartition
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from mmrad.data.symptoms import FUNDUS, OCT

# segment-anything's encoder configurations (build_sam.py), plus a small CPU one.
ENCODERS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), window_size=14),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), window_size=14),
    # The CPU default: the same code, 192 wide, 4 deep; at 256 px the grid is 16x16.
    "vit_tiny": dict(embed_dim=192, depth=4, num_heads=3, global_attn_indexes=(1, 3), window_size=8),
}
PATCH = 16
PROMPT_EMBED_DIM = 256  # SAM's decoder width
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
RESNETS = {"resnet50": (256, 512, 1024), "resnet18": (64, 128, 256)}  # layer1-3 channels
FUSION_INPUTS = ("token", "token_maps")
# Table 8's tuning methods: LPT (the paper's), EVP (the same prompt generator on Fourier high-frequency components
# instead of CNN features, Table 7's "Fourier transform" row too), VPT-deep, AdaptFormer, and the decoder alone.
TUNINGS = ("lpt", "evp", "vpt", "adaptformer", "decoder_only")
# Table 7's prompt-generator sharing: (per-block LN_1..LN_n shared by all blocks?, lifting LN_s shared?)
PROMPT_SHARING = {"ln_s": (False, True), "ln_i": (True, False), "all": (True, True), "none": (False, False)}
SHARING = ("shared", "separate")
ADAPTER_SCALE = 0.1  # AdaptFormer's s: the parallel branch's output scale (its paper's default)
MAP_TOP_SHARE = 0.01  # the fusion head's "top" map statistic: the mean of this share of the highest logits


def map_statistics(maps: list[torch.Tensor]) -> torch.Tensor:
    """(B, 2 x len(maps)): each map's maximum and top-1 % mean logit, detached (the head reads, not trains, them)."""
    stats = []
    for logits in maps:
        flat = logits.detach().float().flatten(1)
        k = max(1, round(MAP_TOP_SHARE * flat.shape[1]))
        stats += [flat.amax(dim=1), flat.topk(k, dim=1).values.mean(dim=1)]
    return torch.stack(stats, dim=1)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture. No defaults here: params.yaml's ``model`` section states them once
    (``mmrad.models.builder.model_config`` makes this from it)."""

    encoder: str  # a key of ENCODERS
    image_size: int
    prompt_dim: int | None  # h; None -> max(8, C // 32) (24 for vit_b, as facts.md)
    cnn: str  # a key of RESNETS
    cnn_count: int
    fusion_order: tuple[str, str]
    token_init: str  # "pretrained" (SAM mask / IoU tokens), "normal", "kaiming" (Table 14)
    abs_pos: bool  # SAM's absolute position embedding; LVM-Med's encoder is trained without one
    position_init: str  # "sincos": fixed 2-D sin-cos absolute + small random relative embeddings; "zero": as
    #                     segment-anything leaves them (no positional information until SAM weights load)
    cnn_norm: str  # "rms": each LPT CNN stage divided by its RMS before the concatenation; "none": as Eq. 6
    fusion_norm: str  # "running": the head's input standardised with running statistics; "none": as is
    fusion_input: str  # "token": the head reads T_f (Eq. 5); "token_maps": T_f and each map's statistics
    tuning: str  # how the frozen encoder is tuned (Table 8): a key of TUNINGS
    prompt_sharing: str  # which prompt-generator layers all blocks share (Table 7): a key of PROMPT_SHARING
    vpt_tokens: int  # VPT-deep: learned prompt tokens per block
    fourier_mask: float  # EVP: the share of the spectrum (a centred square) removed to keep the high frequencies
    decoder_sharing: str  # "shared": one decoder for both modalities (the paper); "separate": one each (Table 9)
    mask_token_sharing: str  # "shared": one mask token T_m (the paper); "separate": one per modality (Table 9)

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; known: {sorted(ENCODERS)}")
        if self.cnn not in RESNETS:
            raise ValueError(f"unknown cnn {self.cnn!r}; known: {sorted(RESNETS)}")
        if self.image_size % PATCH:
            raise ValueError(f"image_size must be a multiple of {PATCH}, got {self.image_size}")
        if sorted(self.fusion_order) != [FUNDUS, OCT]:
            raise ValueError(f"fusion_order must order 'fundus' and 'oct', got {self.fusion_order}")
        if self.token_init not in ("pretrained", "normal", "kaiming"):
            raise ValueError(f"unknown token_init {self.token_init!r}")
        for name, allowed in (("position_init", ("sincos", "zero")), ("cnn_norm", ("rms", "none")),
                              ("fusion_norm", ("running", "none")), ("fusion_input", FUSION_INPUTS),
                              ("tuning", TUNINGS), ("prompt_sharing", tuple(PROMPT_SHARING)),
                              ("decoder_sharing", SHARING), ("mask_token_sharing", SHARING)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: {list(allowed)}")

        if self.vpt_tokens < 1 or not 0 < self.fourier_mask < 1:
            raise ValueError(f"vpt_tokens must be >= 1 and fourier_mask in (0, 1), got {self.vpt_tokens}, "
                             f"{self.fourier_mask}")

    @property
    def prompted(self) -> bool:
        """LPT or EVP: prompts from low-level features added before each block (Eq. 6-7)."""
        return self.tuning in ("lpt", "evp")

    @property
    def width(self) -> int:
        return ENCODERS[self.encoder]["embed_dim"]

    @property
    def grid(self) -> int:
        return self.image_size // PATCH

    @property
    def h(self) -> int:
        return self.prompt_dim or max(8, self.width // 32)


def build_sam_parts(config: ModelConfig) -> tuple[ImageEncoderViT, PromptEncoder, MaskDecoder]:
    """SAM's encoder, prompt encoder and mask decoder, as build_sam.py builds them."""
    spec = ENCODERS[config.encoder]
    encoder = ImageEncoderViT(
        depth=spec["depth"], embed_dim=spec["embed_dim"], img_size=config.image_size, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=spec["num_heads"], patch_size=PATCH,
        qkv_bias=True, use_abs_pos=config.abs_pos, use_rel_pos=True, global_attn_indexes=spec["global_attn_indexes"],
        window_size=spec["window_size"], out_chans=PROMPT_EMBED_DIM,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM, image_embedding_size=(config.grid, config.grid),
        input_image_size=(config.image_size, config.image_size), mask_in_chans=16,
    )
    return encoder, prompt_encoder, build_decoder()


def build_decoder() -> MaskDecoder:
    """SAM's mask decoder, as build_sam.py builds it."""
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256,
    )


def sincos_grid(grid: int, dim: int) -> torch.Tensor:
    """(grid, grid, dim) fixed 2-D sin-cos position embedding (MAE's): half the channels encode the row, half the
    column, each as sin / cos at ``dim / 4`` frequencies from 1 to 1 / 10000."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]  # (grid, quarter)
    rows = torch.cat([pos.sin(), pos.cos()], dim=1)  # (grid, dim / 2)
    out = torch.zeros(grid, grid, dim, dtype=torch.float64)
    out[..., : 2 * quarter] = rows[:, None, :]
    out[..., 2 * quarter: 4 * quarter] = rows[None, :, :]
    return out.float()


def init_positions(encoder: ImageEncoderViT, rel_std: float = 0.02) -> None:
    """Position embeddings for a randomly initialised encoder (SAM weights, when loaded, replace them).

    segment-anything creates ``pos_embed`` and every block's ``rel_pos_h`` / ``rel_pos_w`` as zeros (they are
    learned in SAM's pre-training): a random frozen encoder then has no positional information at all. The
    absolute embedding becomes the fixed 2-D sin-cos one; the relative ones a small normal draw (ViT's
    ``std=0.02`` convention), drawn from torch's seeded generator like every other random weight.
    """
    with torch.no_grad():
        if encoder.pos_embed is not None:
            _, g, _, dim = encoder.pos_embed.shape
            encoder.pos_embed.copy_(sincos_grid(g, dim)[None])
        for block in encoder.blocks:
            if getattr(block.attn, "use_rel_pos", False):
                nn.init.trunc_normal_(block.attn.rel_pos_h, std=rel_std)
                nn.init.trunc_normal_(block.attn.rel_pos_w, std=rel_std)


class RunningStandardise(nn.Module):
    """Standardise the fusion head's input with running (EMA) statistics, in training as in evaluation.

    T_f varies across cases by < 1 % of its norm (SAM's decoder ends in LayerNorms), so a head reading it
    as is sees a constant. Plain BatchNorm would standardise each training batch by its own statistics:
    with 4 cases, often all positive, that removes the absolute level the head must learn ("anomalous or
    not"), and it differs from the running statistics used at test time. Here the statistics are updated
    from each training batch (no gradient; the *global* batch across data-parallel processes, so 1 and N
    processes train the same model) and applied the same way in both modes; the first batch initialises
    them. A learned affine (``weight``, ``bias``) follows, as in BatchNorm.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-10):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        n = x.shape[0] * world
        total = x.float().sum(0)
        if world > 1:
            dist.all_reduce(total)
        mean = total / n
        squares = ((x.float() - mean) ** 2).sum(0)  # centred: the spread is tiny next to the mean
        if world > 1:
            dist.all_reduce(squares)
        var = squares / max(n - 1, 1)
        if int(self.updates) == 0:
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        else:
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        self.updates += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._update(x)
        return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps) * self.weight + self.bias


class ResNetTrunk(nn.Module):
    """A torchvision ResNet up to layer3 (the "first three stages"), frozen."""

    def __init__(self, name: str):
        super().__init__()
        self.resnet = getattr(torchvision.models, name)(weights=None)
        del self.resnet.layer4, self.resnet.fc  # never used: keeps memory and checkpoints small

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        f1 = r.layer1(x)
        f2 = r.layer2(f1)
        return [f1, f2, r.layer3(f2)]


def high_frequencies(x: torch.Tensor, mask: float) -> torch.Tensor:
    """EVP's hand-crafted low-level feature: the image with the central ``mask`` share of its (shifted) 2-D
    spectrum removed, back in image space (magnitude), per channel. (B, 3, S, S) -> (B, 3, S, S)."""
    size = x.shape[-1]
    half = int((size * size * mask) ** 0.5 // 2)
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="forward"), dim=(-2, -1))
    keep = torch.ones(size, size, device=x.device)
    keep[size // 2 - half: size // 2 + half, size // 2 - half: size // 2 + half] = 0
    spectrum = torch.fft.ifftshift(spectrum * keep, dim=(-2, -1))
    return torch.fft.ifft2(spectrum, norm="forward").real.abs()


class LowLevelPrompts(nn.Module):
    """LPT (Eq. 6-7): one prompt per encoder block from low-level features and patch embeddings.

    ``tuning: lpt`` takes the features from the frozen CNNs' layer1-3 (Eq. 6's ``LN`` projects them);
    ``tuning: evp`` from the image's high-frequency components through a trainable patch embedding (EVP's
    hand-crafted feature; the rest of the generator is the same, as in EVP). ``prompt_sharing`` picks which
    of ``LN_1..LN_n`` (per block) and ``LN_s`` (lifting to the encoder width) all blocks share (Table 7).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        depth, width, h = ENCODERS[config.encoder]["depth"], config.width, config.h
        self.grid = config.grid
        self.rms_norm = config.cnn_norm == "rms"
        self.fourier_mask = config.fourier_mask if config.tuning == "evp" else None
        if self.fourier_mask is None:
            self.cnn_proj = nn.Linear(config.cnn_count * sum(RESNETS[config.cnn]), h)  # Eq. 6's LN
        else:
            self.hfc_embed = nn.Conv2d(3, h, kernel_size=PATCH, stride=PATCH)  # EVP's patch embedding of the HFC
        self.patch_proj = nn.Linear(width, h)
        share_blocks, share_lift = PROMPT_SHARING[config.prompt_sharing]
        self.per_block = nn.ModuleList(nn.Sequential(nn.Linear(h, h), nn.GELU())
                                       for _ in range(1 if share_blocks else depth))
        # LN_s: one Linear shared by all blocks (the paper's), or one per block
        self.lift = nn.Linear(h, width) if share_lift else nn.ModuleList(nn.Linear(h, width) for _ in range(depth))
        for lift in self.lift.modules():
            if isinstance(lift, nn.Linear):  # zero: at step 0 the encoder computes its pretrained embedding
                nn.init.zeros_(lift.weight)
                nn.init.zeros_(lift.bias)

    def base(self, low_level: list[torch.Tensor] | torch.Tensor, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """F_c + F_p on the token grid, (B, g, g, h). ``low_level``: the CNNs' stage features (LPT) or the
        normalised image (EVP)."""
        if self.fourier_mask is not None:
            f_c = self.hfc_embed(high_frequencies(low_level, self.fourier_mask)).permute(0, 2, 3, 1)
            return f_c + self.patch_proj(patch_embeddings)
        pooled = [F.adaptive_avg_pool2d(f, self.grid) for f in low_level]
        if self.rms_norm:  # a common scale per stage and image: a random layer3 (RMS ~17) would swamp layer1 (~0.5)
            pooled = [f / f.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6) for f in pooled]
        f_c = self.cnn_proj(torch.cat(pooled, dim=1).permute(0, 2, 3, 1))
        return f_c + self.patch_proj(patch_embeddings)

    def prompt(self, base: torch.Tensor, block: int) -> torch.Tensor:
        per_block = self.per_block[block if len(self.per_block) > 1 else 0]
        lift = self.lift[block] if isinstance(self.lift, nn.ModuleList) else self.lift
        return lift(per_block(base))


def prompted_attention(attn, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention.forward`` with ``prompts`` (P, C) as extra keys and values (VPT-deep).

    In VPT-deep a block's prompt tokens are dropped after it, so their only effect is as keys / values the
    image tokens attend to; with SAM's windowed attention every window attends to the same prompts. Prompts
    carry no position: the relative-position bias applies to the image tokens' keys only. With no prompts
    this computes exactly ``attn(x)``.
    """
    b, height, width, _ = x.shape
    heads, n = attn.num_heads, height * width
    qkv = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * heads, n, -1)
    q, k, v = qkv.unbind(0)
    extra = attn.qkv(prompts).reshape(len(prompts), 3, heads, q.shape[-1]).permute(1, 2, 0, 3)  # (3, heads, P, d)
    pk, pv = (t.repeat(b, 1, 1) for t in extra[1:])  # (b * heads, P, d), in q's head order
    logits = (q * attn.scale) @ torch.cat([k, pk], dim=1).transpose(-2, -1)
    if attn.use_rel_pos:
        image = add_decomposed_rel_pos(logits[..., :n].contiguous(), q, attn.rel_pos_h, attn.rel_pos_w,
                                       (height, width), (height, width))
        logits = torch.cat([image, logits[..., n:]], dim=-1)
    out = logits.softmax(dim=-1) @ torch.cat([v, pv], dim=1)
    out = out.view(b, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(b, height, width, -1)
    return attn.proj(out)


def block_forward(block, x: torch.Tensor, prompts: torch.Tensor | None = None,
                  adapter: nn.Module | None = None) -> torch.Tensor:
    """segment-anything's ``Block.forward`` with VPT-deep ``prompts`` in its attention and an AdaptFormer
    ``adapter`` parallel to its MLP (``x + mlp(norm2(x)) + s * adapter(norm2(x))``)."""
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        height, width = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, block.window_size)
    x = block.attn(x) if prompts is None else prompted_attention(block.attn, x, block.norm1(prompts))
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, pad_hw, (height, width))
    x = shortcut + x
    y = block.norm2(x)
    out = x + block.mlp(y)
    return out if adapter is None else out + ADAPTER_SCALE * adapter(y)


def adapter(width: int, bottleneck: int) -> nn.Sequential:
    """AdaptFormer's bottleneck (down, ReLU, up); ``up`` starts at zero, so at step 0 the block is unchanged."""
    module = nn.Sequential(nn.Linear(width, bottleneck), nn.ReLU(), nn.Linear(bottleneck, width))
    nn.init.zeros_(module[2].weight)
    nn.init.zeros_(module[2].bias)
    return module


class MMRAD(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image_encoder, self.prompt_encoder, self.mask_decoder = build_sam_parts(config)
        # LPT's CNNs; EVP, VPT, AdaptFormer and the decoder alone use none
        self.cnns = nn.ModuleList(ResNetTrunk(config.cnn) for _ in range(config.cnn_count if config.tuning == "lpt" else 0))
        self.lpt = LowLevelPrompts(config) if config.prompted else None
        self.mask_token = nn.Parameter(torch.zeros(1, PROMPT_EMBED_DIM))
        self.fusion_token = nn.Parameter(torch.zeros(1, PROMPT_EMBED_DIM))
        depth, width = ENCODERS[config.encoder]["depth"], config.width
        if config.tuning == "vpt":  # VPT-deep: P tokens per block, VPT's uniform (Xavier) initialisation
            bound = (6.0 / (3 * PATCH * PATCH + width)) ** 0.5
            self.vpt_prompts = nn.Parameter(torch.empty(depth, config.vpt_tokens, width).uniform_(-bound, bound))
        if config.tuning == "adaptformer":  # bottleneck h: the prompt width LPT uses
            self.adapters = nn.ModuleList(adapter(width, config.h) for _ in range(depth))
        # Table 9: a second decoder / mask token for the OCT (copies of the first, made again by init_tokens)
        if config.decoder_sharing == "separate":
            self.oct_decoder = build_decoder()
        if config.mask_token_sharing == "separate":
            self.oct_mask_token = nn.Parameter(torch.zeros(1, PROMPT_EMBED_DIM))
        # T_f varies across cases by < 1 % of its norm: standardised, the head sees that variation at unit scale
        head_in = PROMPT_EMBED_DIM + (2 * len(config.fusion_order) if config.fusion_input == "token_maps" else 0)
        self.fusion_norm = RunningStandardise(head_in) if config.fusion_norm == "running" else nn.Identity()
        self.fusion_head = MLP(head_in, 256, 1, 3)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.cnns.to(memory_format=torch.channels_last)
        if config.position_init == "sincos":
            init_positions(self.image_encoder)
        self.init_tokens()
        for module in self.frozen_modules():
            module.requires_grad_(False)

    # --- parameters -----------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """Parts that never train: the SAM encoder, the prompt encoder, the CNNs, and the
        decoder parts MMRAD does not use (SAM's own tokens and IoU head only seed T_m, T_f
        and the fusion head; hypernetworks 1-3 serve SAM's extra mask outputs)."""
        unused = [part for d in self.decoders().values()
                  for part in (d.mask_tokens, d.iou_token, d.iou_prediction_head, *d.output_hypernetworks_mlps[1:])]
        return [self.image_encoder, self.prompt_encoder, self.cnns, *unused]

    def decoders(self) -> dict[str, MaskDecoder]:
        """modality -> its decoder (one shared by both, the paper's, or one each: ``decoder_sharing``)."""
        oct_decoder = self.oct_decoder if self.config.decoder_sharing == "separate" else self.mask_decoder
        return {FUNDUS: self.mask_decoder, OCT: oct_decoder}

    def mask_tokens(self) -> dict[str, nn.Parameter]:
        """modality -> its mask token T_m (shared, the paper's, or one each: ``mask_token_sharing``)."""
        oct_token = self.oct_mask_token if self.config.mask_token_sharing == "separate" else self.mask_token
        return {FUNDUS: self.mask_token, OCT: oct_token}

    def init_tokens(self) -> None:
        """T_m, T_f and the fusion head from the decoder's (pretrained, once loaded) tokens.

        Call again after loading SAM weights. "normal" and "kaiming" are Table 14's
        alternatives.
        """
        with torch.no_grad():
            if self.config.decoder_sharing == "separate":  # the OCT's decoder starts as the (loaded) first one
                self.oct_decoder.load_state_dict(self.mask_decoder.state_dict())
            if self.config.token_init == "pretrained":
                self.mask_token.copy_(self.mask_decoder.mask_tokens.weight[:1])
                self.fusion_token.copy_(self.mask_decoder.iou_token.weight)
                # The fusion head starts as SAM's IoU head, keeping its first output (the map statistics'
                # extra inputs, with fusion_input token_maps, start at weight zero).
                for mine, sams in zip(self.fusion_head.layers, self.mask_decoder.iou_prediction_head.layers):
                    weight = sams.weight[: mine.out_features]
                    mine.weight.zero_()
                    mine.weight[:, : weight.shape[1]].copy_(weight)
                    mine.bias.copy_(sams.bias[: mine.out_features])
            elif self.config.token_init == "normal":
                nn.init.normal_(self.mask_token, std=0.01)
                nn.init.normal_(self.fusion_token, std=0.01)
            else:
                nn.init.kaiming_normal_(self.mask_token)
                nn.init.kaiming_normal_(self.fusion_token)
            if self.config.mask_token_sharing == "separate":  # the OCT's T_m starts as the fundus one
                self.oct_mask_token.copy_(self.mask_token)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the fine-tuned parameters and the statistics training accumulates (the fusion head input's
        running statistics); the frozen parts come from their own weight files."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        names |= {f"fusion_norm.{n}" for n, _ in self.fusion_norm.named_buffers()}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (BatchNorm statistics must not move)."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    # --- forward --------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in 0..255 -> prompted SAM image embedding (B, 256, g, g)."""
        x = (images - self.pixel_mean) / self.pixel_std
        tuning = self.config.tuning
        with torch.no_grad():  # frozen, and the input needs no gradient: skip their graph
            # channels-last runs the frozen CNNs ~1.25x faster on the CPU (oneDNN), same on CUDA
            x_cl = x.contiguous(memory_format=torch.channels_last)
            cnn_features = [f for cnn in self.cnns for f in cnn(x_cl)]
            patches = self.image_encoder.patch_embed(x)
        tokens = patches if self.image_encoder.pos_embed is None else patches + self.image_encoder.pos_embed
        if tuning == "decoder_only":  # nothing in the encoder trains: no graph at all
            with torch.no_grad():
                return self.image_encoder.neck(self._blocks(tokens).permute(0, 3, 1, 2))
        if self.lpt is not None:  # LPT / EVP: a prompt added to the tokens before each block
            base = self.lpt.base(cnn_features if tuning == "lpt" else x, patches)
            for i, block in enumerate(self.image_encoder.blocks):
                tokens = block(tokens + self.lpt.prompt(base, i))
        else:
            tokens = self._blocks(tokens)
        return self.image_encoder.neck(tokens.permute(0, 3, 1, 2))

    def _blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """The encoder's blocks, with VPT-deep's prompts or AdaptFormer's adapters where configured."""
        for i, block in enumerate(self.image_encoder.blocks):
            if self.config.tuning == "vpt":
                tokens = block_forward(block, tokens, prompts=self.vpt_prompts[i])
            elif self.config.tuning == "adaptformer":
                tokens = block_forward(block, tokens, adapter=self.adapters[i])
            else:
                tokens = block(tokens)
        return tokens

    def decode(self, embedding: torch.Tensor, fusion_in: torch.Tensor,
               modality: str = FUNDUS) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass with tokens [T_f, T_m] (the modality's decoder and T_m): (map logits at input
        size, T_f out)."""
        decoder = self.decoders()[modality]
        b = embedding.shape[0]
        tokens = torch.cat([fusion_in, self.mask_tokens()[modality].expand(b, 1, -1)], dim=1)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        src = embedding + dense
        pos = self.prompt_encoder.get_dense_pe().expand(b, -1, -1, -1)
        hs, src = decoder.transformer(src, pos, tokens)
        src = src.transpose(1, 2).reshape(embedding.shape)
        upscaled = decoder.output_upscaling(src)
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1])
        logits = torch.einsum("bc,bchw->bhw", hyper, upscaled)
        size = self.config.image_size
        logits = F.interpolate(logits[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return logits, hs[:, :1]

    def fused_score(self, fusion: torch.Tensor, maps: dict) -> torch.Tensor:
        """The case score logit (B,) from T_f's output (B, 1, 256) and, with fusion_input token_maps,
        the maps' statistics (``maps``: modality -> map logits)."""
        x = fusion[:, 0]
        if self.config.fusion_input == "token_maps":
            x = torch.cat([x, map_statistics([maps[m] for m in self.config.fusion_order])], dim=1)
        return self.fusion_head(self.fusion_norm(x))[:, 0]

    def forward(self, fundus: torch.Tensor | None = None, oct: torch.Tensor | None = None,
                pooled: bool = False) -> dict:
        """Maps (logits, (B, S, S)) per given modality and the case score logit (B,).

        With both modalities the score is the fusion token's; with one, the
        maximum of its map (Fig. 5), so one trained model serves both uses.
        ``pooled`` adds ``"<modality>_pooled"``: the image embedding averaged over
        the token grid, (B, 256), for the cross-modal retrieval diagnostic.
        """
        inputs = {FUNDUS: fundus, OCT: oct}
        given = [m for m in self.config.fusion_order if inputs[m] is not None]
        if not given:
            raise ValueError("MMRAD needs a fundus image, an OCT image, or both")
        b = inputs[given[0]].shape[0]
        fusion = self.fusion_token.expand(b, 1, -1)
        out: dict = {}
        for modality in given:  # fundus first by default: T_f carries over
            embedding = self.embed(inputs[modality])
            out[modality], fusion = self.decode(embedding, fusion, modality)
            if pooled:
                out[f"{modality}_pooled"] = embedding.mean(dim=(2, 3))
        if len(given) == 2:
            out["score"] = self.fused_score(fusion, out)
        else:
            out["score"] = out[given[0]].flatten(1).amax(dim=1)
        return out
