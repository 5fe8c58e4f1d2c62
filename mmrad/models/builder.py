"""Build MMRAD from params.yaml, with its pretrained weights, and save / load a fine-tuned model file.

The one place that knows how a model comes to be (segment-anything's
``build_sam.py`` plays this part there):

* ``model_config(params)``: the architecture from params.yaml's ``model`` section;
* ``build_model(params)``: the model with its frozen parts loaded from the
  configured weight files (``mmrad.models.weights``), or randomly initialised
  from ``params.seed`` (said loudly);
* ``save_finetuned`` / ``load_finetuned``: the model file, format
  ``mmrad-finetuned/1``: only the trainable tensors, with the architecture, the
  identity of the frozen weights and the seed they were built with. Loading
  rebuilds the frozen parts from params.yaml and refuses a file whose
  architecture, frozen weights or seed differ from what params.yaml configures.

Training, evaluation, ``mmrad predict`` and the MLflow model all load models
through here; none of them imports the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from mmrad.core.errors import DataError
from mmrad.core.outputs import atomic_file
from mmrad.core.params import Params
from mmrad.models import weights as weight_files
from mmrad.models.mmrad import MMRAD, ModelConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
MODEL_FORMAT = "mmrad-finetuned/1"
RANDOM_INIT = "random init"


def model_config(params: Params) -> ModelConfig:
    """The architecture params.yaml describes (LVM-Med's encoder has no absolute position embedding)."""
    m = params.model
    sam = params.weights.sam
    return ModelConfig(encoder=m.encoder, image_size=m.image_size, prompt_dim=m.prompt_dim, cnn=m.cnn,
                       cnn_count=m.cnn_count, fusion_order=tuple(m.fusion_order), token_init=m.token_init,
                       abs_pos=not (sam is not None and sam.format == "lvm-med"), position_init=m.position_init,
                       cnn_norm=m.cnn_norm, fusion_norm=m.fusion_norm, fusion_input=m.fusion_input, tuning=m.tuning,
                       prompt_sharing=m.prompt_sharing, vpt_tokens=m.vpt_tokens, fourier_mask=m.fourier_mask,
                       decoder_sharing=m.decoder_sharing, mask_token_sharing=m.mask_token_sharing)


def build_model(params: Params) -> tuple[MMRAD, dict]:
    """The model with its frozen parts loaded (or randomly initialised, said loudly).

    Returns the model and the identity of its pretrained weights, for tracking.
    """
    torch.manual_seed(params.seed)
    model = MMRAD(model_config(params))
    identity = {"sam": RANDOM_INIT, "resnets": []}
    if params.weights.sam is not None:
        w = params.weights.sam
        if w.format == "sam":
            report = weight_files.load_sam(model, w.path, sha256=w.sha256)
        else:
            report = weight_files.load_sam_encoder(model.image_encoder, w.path, fmt=w.format, sha256=w.sha256)
        identity["sam"] = f"{w.format}:{Path(w.path).name}:sha256={report.sha256}"
        model.init_tokens()  # T_m / T_f from the loaded SAM tokens
    for i, cnn in enumerate(model.cnns):
        w = params.weights.resnets[i] if i < len(params.weights.resnets) else None
        if w is None:
            identity["resnets"].append(RANDOM_INIT)
            continue
        if w.format == "vilref":  # CLIP's ModifiedResNet: its own stem, same stage shapes
            cnn = model.cnns[i] = weight_files.ClipResNetTrunk().requires_grad_(False).to(memory_format=torch.channels_last)
            report = weight_files.load_resnet50(cnn, w.path, fmt=w.format, sha256=w.sha256)
        else:
            report = weight_files.load_resnet50(cnn.resnet, w.path, fmt=w.format, sha256=w.sha256)
        identity["resnets"].append(f"{w.format}:{Path(w.path).name}:sha256={report.sha256}")
    if identity["sam"] == RANDOM_INIT or RANDOM_INIT in identity["resnets"]:
        log.warning("RANDOM INIT: no pretrained weights configured for %s; the frozen encoder is random "
                    "(set `weights` in params.yaml to use SAM / ResNet checkpoints)",
                    ", ".join(k for k, v in [("SAM", identity["sam"])] + [(f"resnet {i}", r) for i, r in
                                                                           enumerate(identity["resnets"])]
                              if v == RANDOM_INIT))
    return model, identity


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename (mmrad.core.outputs): a reader never sees half a file."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def save_finetuned(path: Path, model: MMRAD, identity: dict, params: Params, fingerprint: str) -> None:
    """Write the model file: trainable tensors + what ``load_finetuned`` checks (``fingerprint``: the training
    run's, ``mmrad.training.train.training_fingerprint``)."""
    save_atomic({"format": MODEL_FORMAT, "config": dataclasses.asdict(model.config),
                 "trainable": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
                 "weights": identity, "seed": params.seed, "steps": params.train.steps, "params_hash": fingerprint},
                path)


# Architecture keys added after model files were first written (issue 15's ablation variants), with the values
# that are the older files' architecture: a file without them is that model and loads as it always did.
ADDED_KEYS = {"tuning": "lpt", "prompt_sharing": "ln_s", "vpt_tokens": 10, "fourier_mask": 0.25,
              "decoder_sharing": "shared", "mask_token_sharing": "shared"}


def _plain(value):
    """Tuples and lists alike (a stored config comes back from torch.load with either)."""
    return json.loads(json.dumps(value))


def load_finetuned(path: str | Path, params: Params) -> MMRAD:
    """Rebuild a trained model: frozen parts from their weights (as ``params`` says), trainable from the file.

    The file must match params.yaml: the same architecture (``model``), and the
    same frozen parts: the same weight files, or for a random initialisation the
    same seed.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable / not a torch file: one rule
        raise DataError(path, "not a readable model file", str(exc)) from exc
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise DataError(path, f"not an {MODEL_FORMAT} model file")
    expected = dataclasses.asdict(model_config(params))
    stored = state.get("config")
    if isinstance(stored, dict):
        stored = {**ADDED_KEYS, **stored}
    if not isinstance(stored, dict) or _plain(stored) != _plain(expected):
        stored = stored if isinstance(stored, dict) else {}
        differ = sorted(k for k in expected.keys() | stored.keys() if _plain(stored.get(k)) != _plain(expected.get(k)))
        raise DataError(path, "model was trained with another architecture than params.yaml configures",
                        "; ".join(f"{k}: file {stored.get(k)!r}, params {expected.get(k)!r}" for k in differ))
    model, identity = build_model(params)
    if identity != state["weights"] or state["seed"] != params.seed:
        raise DataError(path, "model was trained on other frozen weights than params.yaml configures",
                        f"file: {state['weights']} seed {state['seed']}; params: {identity} seed {params.seed}")
    missing = set(model.trainable_state_dict()) - set(state["trainable"])
    if missing:
        raise DataError(path, "model file lacks trainable parameters", f"{sorted(missing)[:5]}")
    model.load_state_dict(state["trainable"], strict=False)
    return model.eval()
