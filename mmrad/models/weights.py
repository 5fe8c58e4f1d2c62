"""Load pretrained weights from local files into SAM and ResNet-50 modules.

No machine of this project can download anything, so every checkpoint is a
local file the user fetched once. This module turns such a file into
parameters of a module built from ``segment_anything`` or ``torchvision``,
checks it strictly, and reports what it did. Every failure is a one-line
:class:`~mmrad.core.errors.DataError` naming the file and the broken rule.

Public API::

    load_checkpoint(path, sha256=None) -> dict[str, Tensor]
    load_sam(sam, path, sha256=None) -> LoadReport
    load_sam_encoder(encoder, path, fmt="sam" | "lvm-med", sha256=None) -> LoadReport
    load_resnet50(resnet, path, fmt="torchvision" | "lvm-med" | "vilref", sha256=None) -> LoadReport
    ClipResNetTrunk  # the module ViLReF's ResNet-50 weights load into (see below)

Strictness: after the format's key mapping, the file's keys and the module's
``state_dict()`` keys must agree exactly, except for keys a format skips or
lacks *on purpose* (listed per format below and returned in the report);
shapes must agree too. Nothing is interpolated or resized.

Formats, and what was verified about each (from the public code that writes
or reads the real release; the weight files themselves cannot be fetched here):

``load_sam`` -- official SAM checkpoints ``sam_vit_{b,l,h}_*.pth``
    A flat state dict of ``Sam``: keys ``image_encoder.*``, ``prompt_encoder.*``
    (including the buffer ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``)
    and ``mask_decoder.*``; ``pixel_mean``/``pixel_std`` are non-persistent
    buffers, so they are not in the file. Loaded into the module's three
    children only, so a larger model that holds them (ours adds prompt-tuning
    layers) is accepted; its other parameters are not touched. Verified in
    facebookresearch/segment-anything ``segment_anything/build_sam.py``
    (``torch.load`` then a strict ``sam.load_state_dict``) and
    ``segment_anything/modeling/sam.py``.

``load_sam_encoder(fmt="sam")`` -- the image encoder out of a full SAM checkpoint
    ``image_encoder.`` is stripped; every ``prompt_encoder.*`` and
    ``mask_decoder.*`` key is skipped on purpose (reported in ``skipped``).

``load_sam_encoder(fmt="lvm-med")`` -- LVM-Med's SAM ViT-B release ``lvmmed_vit.pth``
    A flat state dict with *no* prefix and no container, i.e. the keys of
    ``ImageEncoderViT`` itself (``patch_embed.*``, ``blocks.N.*``, ``neck.*``),
    and *no* ``pos_embed``: LVM-Med builds the encoder with
    ``use_abs_pos=False``. Verified in duyhominhnguyen/LVM-Med
    ``segment_anything/our_vit.py`` (``vit_encoder_b``: ViT-B, window 14,
    global blocks 2/5/8/11, rel-pos, ``use_abs_pos=False``) and
    ``segmentation_2d/LVMMed_SAM_2d.py`` (``torch.load`` then a strict
    ``load_state_dict`` into that encoder, whose output feeds SAM's mask
    decoder, so the 256-channel ``neck`` is included). Consequence here: the
    target must be built with ``ImageEncoderViT(..., use_abs_pos=False)``;
    an encoder with a ``pos_embed`` fails with "missing: ['pos_embed']"
    rather than running with an untrained position embedding.

``load_resnet50(fmt="torchvision")`` -- ``resnet50-*.pth`` ImageNet weights
    The plain ``torchvision.models.resnet50()`` state dict (``conv1``, ``bn1``,
    ``layer1..4``, ``fc``). Verified in pytorch/vision
    ``torchvision/models/resnet.py`` (``_resnet``: strict
    ``model.load_state_dict(weights.get_state_dict(...))``; URLs
    ``resnet50-0676ba61.pth`` V1, ``resnet50-11ad3fa6.pth`` V2).
    The target may be a trunk with ``layer4`` and/or ``fc`` deleted (LPT uses
    the first three stages): the file's keys for a deleted part are skipped on
    purpose and listed in ``skipped``; a part the module has is strict.

``load_resnet50(fmt="lvm-med")`` -- LVM-Med's ``lvmmed_resnet.torch``
    A flat torchvision-named state dict, no prefix, no container. Verified in
    duyhominhnguyen/LVM-Med: ``object_detection/finetune_with_path_modify_test_eval.py``
    iterates ``torch.load(weight_path).items()`` and prefixes ``backbone.``;
    ``classification_R50/train_R50_classification.py`` loads it into
    ``torchvision.models.resnet50`` (with ``strict=False``);
    ``segmentation_models_pytorch/encoders/resnet.py`` (a headless
    torchvision ResNet) pops ``fc.*`` before loading. Third-party users add
    empty ``fc.*`` entries before loading it into that encoder, i.e. the
    release has no classifier head. So here ``fc.weight``/``fc.bias`` may be
    absent (then the module keeps its own; reported in ``kept_init``) and are
    loaded if present; everything else is strict.

``load_resnet50(fmt="vilref")`` -- ViLReF's RN50 release (``ViLReF_RN50``)
    ViLReF (T6Yang/ViLReF) is built on Chinese-CLIP. Its RN50 image tower is
    CLIP's ``ModifiedResNet`` (``ViLReF/clip/model.py``; config
    OFA-Sys/Chinese-CLIP ``cn_clip/clip/model_configs/RN50.json``: layers
    [3, 4, 6, 3], width 64): a 3-conv stem (3x3 convs 3->32 stride 2, 32->32,
    32->64, then a 2x2 average pool), bottlenecks that downsample with an
    average pool instead of a strided conv (downsample branch keys
    ``downsample.0``/``downsample.1``; ``downsample.-1`` is the parameterless
    pool), and an attention pool. The checkpoint is what
    ``ViLReF/training/main.py`` saves: ``{"epoch", "step", "name",
    "state_dict", "optimizer"}`` with the model wrapped in
    DistributedDataParallel, so keys read ``module.visual.*``,
    ``module.bert.*``, ``module.text_projection``, ``module.logit_scale``
    (its loader reads ``checkpoint["state_dict"]``).
    Decision: those weights do NOT fit torchvision's ResNet-50 (different
    stem; same-shaped bottleneck weights but a different downsampling
    computation), so they are loaded into :class:`ClipResNetTrunk`, our own
    small module with ModifiedResNet's stem + layer1..layer3 and identical key
    names. Passing a torchvision ResNet with ``fmt="vilref"`` is an error.
    Skipped on purpose (all reported in ``skipped``), because LPT only uses
    the stem and the first three stages: ``visual.layer4.*``,
    ``visual.attnpool.*``, and every key outside ``visual.`` (the text tower
    ``bert.*``, ``text_projection``, ``logit_scale``). A leading ``module.``
    is stripped; the non-tensor entries around ``state_dict`` are ignored.

Every format: BatchNorm ``*.num_batches_tracked`` may be absent from a file
(older releases predate that buffer; BatchNorm itself fills it in); such keys
are reported in ``kept_init``. Tensors are copied with ``Tensor.copy_``, so a
half-precision file loads into a float32 module.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmrad.core.errors import DataError
from mmrad.core.io import sha256_file

SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
SAM_ENCODER_FORMATS = ("sam", "lvm-med")
RESNET50_FORMATS = ("torchvision", "lvm-med", "vilref")

# How many key names an error message lists before it says "(N total)".
_SHOW = 10


@dataclass
class LoadReport:
    """What one load did.

    ``loaded``: number of tensors copied into the module.
    ``skipped``: keys of the file ignored on purpose (format-specific, documented).
    ``kept_init``: keys of the module the file lacks on purpose; the module keeps its own values.
    """

    path: str
    fmt: str
    sha256: str
    loaded: int
    skipped: list[str]
    kept_init: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Reading a checkpoint file
# --------------------------------------------------------------------------------------


def _check_sha256(path: Path, expected: str | None, actual: str) -> None:
    """Compare a file's digest with the expected one (full digest or a prefix of >= 8 hex).

    A prefix is accepted because torchvision names its files with the first 8
    hex digits of their SHA-256 (resnet50-0676ba61.pth).
    """
    if expected is None:
        return
    wanted = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", wanted):
        raise DataError(path, "bad sha256 parameter", f"expected 8 to 64 hex digits, got {expected!r}")
    if not actual.startswith(wanted):
        raise DataError(path, "sha256 mismatch", f"expected {wanted}, got {actual}")


def _one_line(exc: BaseException) -> str:
    """The informative line of a (possibly long, multi-line, ANSI-coloured) exception text."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # torch's weights_only refusal hides the reason ("Unsupported global: GLOBAL x.y.Z ...")
    # on a "WeightsUnpickler error:" line below several lines of advice.
    for line in lines:
        if line.startswith("WeightsUnpickler error:"):
            return line[len("WeightsUnpickler error:"):].strip().split(". ")[0]
    return lines[0] if lines else "(no message)"


def _read(path: str | Path, sha256: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """Hash, unpickle (weights only) and unwrap a checkpoint; returns (state dict, sha256)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint file is missing")
    digest = sha256_file(path)
    _check_sha256(path, sha256, digest)  # before unpickling anything

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only=True refuses pickled objects (a saved nn.Module, custom classes).
        raise DataError(path, "not a readable torch checkpoint",
                        f"refused by torch.load(weights_only=True): {_one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not a checkpoint"
        raise DataError(path, "not a readable torch checkpoint",
                        f"torch.load failed with {type(exc).__name__}: {_one_line(exc)}") from exc

    # The only container a verified release uses: Chinese-CLIP/ViLReF save
    # {"epoch", "step", "name", "state_dict", "optimizer"}. SAM, torchvision and
    # LVM-Med files are flat state dicts.
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DataError(path, "checkpoint is not a state dict",
                        f"top level is a {type(obj).__name__}, expected a dict of tensors")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise DataError(path, "checkpoint is not a state dict",
                        f"entries that are not name -> tensor: {bad[:_SHOW]} ({len(bad)} total)")
    return dict(obj), digest


def load_checkpoint(path: str | Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a local checkpoint as a flat ``name -> tensor`` dict on the CPU.

    ``torch.load(weights_only=True)`` is used, so a pickled model object is
    refused. A ``{"state_dict": ...}`` container (ViLReF / Chinese-CLIP) is
    unwrapped. ``sha256`` (full digest or a prefix of >= 8 hex digits) is
    checked before the file is unpickled.
    """
    state, _ = _read(path, sha256)
    return state


# --------------------------------------------------------------------------------------
# Matching a mapped state dict against a module, strictly
# --------------------------------------------------------------------------------------


@dataclass
class _Mapped:
    """A checkpoint after a format's key mapping, ready to compare with a module."""

    state: dict[str, torch.Tensor]  # module key -> tensor
    skipped: list[str]  # file keys ignored on purpose
    may_lack: Callable[[str], bool] = lambda key: False  # module keys the file may lack on purpose


def _is_bn_counter(key: str) -> bool:
    return key.endswith(".num_batches_tracked")


def _preview(keys: list[str]) -> str:
    return f"{keys[:_SHOW]} ({len(keys)} total)"


def _apply(module: nn.Module, path: str | Path, fmt: str, digest: str, mapped: _Mapped) -> LoadReport:
    """Check keys and shapes, then copy the tensors into ``module``."""
    target = module.state_dict()
    absent = [k for k in target if k not in mapped.state]
    kept_init = [k for k in absent if _is_bn_counter(k) or mapped.may_lack(k)]
    missing = [k for k in absent if k not in kept_init]
    unexpected = [k for k in mapped.state if k not in target]
    if missing or unexpected:
        raise DataError(path, "checkpoint does not match the model",
                        f"format {fmt}; missing: {_preview(missing)}; unexpected: {_preview(unexpected)}")

    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
             for k, v in mapped.state.items() if v.shape != target[k].shape]
    if wrong:
        raise DataError(path, "checkpoint tensor shapes do not match the model",
                        f"format {fmt}; {_preview(wrong)}")

    result = module.load_state_dict(mapped.state, strict=False)
    # Our own check above is stricter than torch's; this only guards against drift.
    leftover = [k for k in result.missing_keys if k not in kept_init] + list(result.unexpected_keys)
    if leftover:  # pragma: no cover - would mean the checks above are wrong
        raise DataError(path, "checkpoint does not match the model", f"format {fmt}; {_preview(leftover)}")
    return LoadReport(path=str(path), fmt=fmt, sha256=digest, loaded=len(mapped.state),
                      skipped=sorted(mapped.skipped), kept_init=sorted(kept_init))


def _check_fmt(path: str | Path, fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise DataError(path, "unknown checkpoint format", f"fmt {fmt!r}, expected one of {list(allowed)}")


# --------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------


def load_sam(sam: nn.Module, path: str | Path, sha256: str | None = None) -> LoadReport:
    """Load an official SAM checkpoint (sam_vit_{b,l,h}_*.pth) into SAM's three parts, strictly.

    ``sam`` is a ``segment_anything.modeling.Sam`` or any module with children
    ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``; those three must
    match the file exactly, other parameters of ``sam`` are left untouched.
    """
    lacking = [name for name in SAM_PARTS if not isinstance(getattr(sam, name, None), nn.Module)]
    if lacking:
        raise DataError(path, "target module lacks SAM's parts",
                        f"{type(sam).__name__} has no {lacking}; expected children {list(SAM_PARTS)}")
    state, digest = _read(path, sha256)
    # A ModuleDict holding references to the three children: its keys are exactly the
    # checkpoint's ("image_encoder.*", ...), and loading into it writes into `sam` itself,
    # while any other part of `sam` (e.g. prompt-tuning layers) is neither checked nor touched.
    parts = nn.ModuleDict({name: getattr(sam, name) for name in SAM_PARTS})
    return _apply(parts, path, "sam", digest, _Mapped(state=state, skipped=[]))


def load_sam_encoder(encoder: nn.Module, path: str | Path, fmt: str = "sam",
                     sha256: str | None = None) -> LoadReport:
    """Load a SAM ViT image encoder (``segment_anything.modeling.ImageEncoderViT``).

    fmt "sam": a full official SAM checkpoint; ``image_encoder.*`` is loaded,
    the prompt encoder and mask decoder are skipped (listed in the report).
    fmt "lvm-med": LVM-Med's ``lvmmed_vit.pth`` (encoder keys, no prefix, no
    ``pos_embed``): build the encoder with ``use_abs_pos=False``.
    """
    _check_fmt(path, fmt, SAM_ENCODER_FORMATS)
    state, digest = _read(path, sha256)
    if fmt == "sam":
        mapped, skipped = {}, []
        for key, value in state.items():
            if key.startswith("image_encoder."):
                mapped[key[len("image_encoder."):]] = value
            elif key.startswith(("prompt_encoder.", "mask_decoder.")):
                skipped.append(key)
            else:
                mapped[key] = value  # not ours to ignore: reported as unexpected
        return _apply(encoder, path, fmt, digest, _Mapped(state=mapped, skipped=skipped))
    return _apply(encoder, path, fmt, digest, _Mapped(state=state, skipped=[]))


# --------------------------------------------------------------------------------------
# ResNet-50
# --------------------------------------------------------------------------------------


class _ClipBottleneck(nn.Module):
    """CLIP's anti-aliased bottleneck: the stride is an average pool after the 3x3 conv.

    Parameter names match CLIP's ``ModifiedResNet`` so its weights load 1:1;
    the downsample branch is a Sequential named "-1" (pool), "0" (conv), "1" (BN).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.avgpool(self.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(y + shortcut)


class ClipResNetTrunk(nn.Module):
    """Stem + layer1..layer3 of CLIP's ModifiedResNet-50 (the ViLReF RN50 image tower).

    Output grids and channels equal torchvision's ResNet-50 stages:
    layer1 (256, H/4), layer2 (512, H/8), layer3 (1024, H/16). ``layer4`` and the
    attention pool are left out on purpose (LPT uses the first three stages).
    ``forward`` returns the three stage outputs as a tuple.
    """

    def __init__(self, layers: tuple[int, int, int] = (3, 4, 6), width: int = 64):
        super().__init__()
        half = width // 2
        # 3-conv stem, then a 2x2 average pool (torchvision: one 7x7 conv + max pool).
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)

        inplanes = width
        stages = []
        for index, (blocks, stride) in enumerate(zip(layers, (1, 2, 2))):
            planes = width * 2**index
            stage = [_ClipBottleneck(inplanes, planes, stride)]
            inplanes = planes * _ClipBottleneck.expansion
            stage += [_ClipBottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = self.relu(bn(conv(x)))
        x = self.avgpool(x)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return f1, f2, f3


# ViLReF keys (after "module." is stripped) that LPT does not need; see the module docstring.
_VILREF_SKIP_VISUAL = ("visual.layer4.", "visual.attnpool.")


def _map_vilref(state: dict[str, torch.Tensor]) -> _Mapped:
    mapped, skipped = {}, []
    for key, value in state.items():
        bare = key[len("module."):] if key.startswith("module.") else key  # DistributedDataParallel
        if not bare.startswith("visual."):
            skipped.append(key)  # text tower: bert.*, text_projection, logit_scale
        elif bare.startswith(_VILREF_SKIP_VISUAL):
            skipped.append(key)  # stage 4 and attention pool: not used by LPT
        else:
            mapped[bare[len("visual."):]] = value
    return _Mapped(state=mapped, skipped=skipped)


def load_resnet50(resnet: nn.Module, path: str | Path, fmt: str = "torchvision",
                  sha256: str | None = None) -> LoadReport:
    """Load ResNet-50 weights.

    fmt "torchvision" / "lvm-med": into ``torchvision.models.resnet50()``
    (LVM-Med's file has no ``fc``; the module keeps its own, see ``kept_init``).
    A trunk from which ``layer4`` and/or ``fc`` were deleted is accepted: the
    file's ``layer4.*`` / ``fc.*`` keys are then skipped and listed in ``skipped``.
    fmt "vilref": into a :class:`ClipResNetTrunk` (stem + layer1..3 of CLIP's
    ModifiedResNet); stage 4, the attention pool and the text tower are skipped.
    """
    _check_fmt(path, fmt, RESNET50_FORMATS)
    if fmt == "vilref" and not isinstance(resnet, ClipResNetTrunk):
        raise DataError(path, "vilref weights need a ClipResNetTrunk",
                        f"got {type(resnet).__name__}; ViLReF's RN50 is CLIP's ModifiedResNet "
                        "(3-conv stem, average-pool strides), which torchvision's ResNet-50 cannot hold")
    state, digest = _read(path, sha256)
    if fmt == "vilref":
        return _apply(resnet, path, fmt, digest, _map_vilref(state))

    # torchvision / lvm-med: same key names. A trunk that dropped layer4 / fc (LPT uses
    # the first three stages only) gets those file keys skipped, and reported.
    own = resnet.state_dict()
    dropped = tuple(part for part in ("layer4.", "fc.") if not any(k.startswith(part) for k in own))
    mapped = {k: v for k, v in state.items() if not k.startswith(dropped)} if dropped else dict(state)
    skipped = [k for k in state if k not in mapped]
    # LVM-Med's release has no classifier head: a module that has one keeps its own.
    may_lack = (lambda key: key in ("fc.weight", "fc.bias")) if fmt == "lvm-med" else (lambda key: False)
    return _apply(resnet, path, fmt, digest, _Mapped(state=mapped, skipped=skipped, may_lack=may_lack))
