"""params.yaml, validated: one typed object every stage reads.

params.yaml states every value, defaults included; this module gives their
types and ranges and no defaults of its own (only a weight file's optional
``sha256``). Validation is pydantic's (types, ranges, unknown and missing keys
rejected); any breach
becomes a one-line ``DataError`` naming params.yaml and the offending key.
Comments in params.yaml document each value; docs/decisions.md gives the
reasons behind the choices the paper leaves open.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmrad.core.errors import DataError

# The dataset layouts the readers know (mmrad.data.datasets.LAYOUTS has one reader per name; a test checks both agree).
DATASETS = ("mmr", "idrid", "resc")

Count = Annotated[int, Field(ge=1)]
Pixels = Annotated[int, Field(ge=64, le=8192)]
Size = tuple[Pixels, Pixels]  # (height, width)


def _admits_bool(annotation) -> bool:
    return annotation is bool or bool in getattr(annotation, "__args__", ())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info):
        # pydantic reads `true` as 1 for an int field: `steps: true` must be an error, not one step
        if isinstance(value, bool) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number or text, got the boolean {str(value).lower()}")
        return value


class LesionDifficulty(_Strict):
    contrast: float = Field(gt=0.0, le=4.0)  # x the lesions' change of the image (1: the phantom as it is)
    size: float = Field(gt=0.0, le=8.0)      # x every lesion's target area


class MMRLesions(_Strict):
    fundus: LesionDifficulty
    oct: LesionDifficulty


class MMRSynthetic(_Strict):
    train_normal: Count
    test_normal: Count
    test_anomalous: Count
    fundus_size: Size
    oct_size: Size
    one_modality_fraction: float = Field(ge=0.0, le=1.0)
    lesions: MMRLesions


class IDRiDSynthetic(_Strict):
    seg_train: Count
    seg_test: Count
    grading_train: Count
    grading_test: Count
    healthy_fraction: float = Field(gt=0.0, le=1.0)
    size: Size


class RESCSynthetic(_Strict):
    train_good: Count
    val_good: Count
    val_ungood: Count
    test_good: Count
    test_ungood: Count
    size: Size


class Synthetic(_Strict):
    workers: Count
    mmr: MMRSynthetic
    idrid: IDRiDSynthetic
    resc: RESCSynthetic


class DatasetSource(_Strict):
    root: str


class Prepare(_Strict):
    resolution: Annotated[int, Field(ge=32, le=4096, multiple_of=16)]
    workers: Count
    dask_address: str | None  # a Dask scheduler (tcp://host:8786), `local` (a cluster of `workers`), None: a pool
    max_image_pixels: Annotated[int, Field(ge=1)]  # larger images are refused (mmrad.core.io.read_image)


class Model(_Strict):
    encoder: Literal["vit_tiny", "vit_b", "vit_l", "vit_h"]
    image_size: Annotated[int, Field(ge=64, le=1024, multiple_of=16)]
    prompt_dim: Annotated[int, Field(ge=1)] | None
    cnn: Literal["resnet50", "resnet18"]
    cnn_count: Annotated[int, Field(ge=1, le=4)]
    fusion_order: tuple[Literal["fundus", "oct"], Literal["fundus", "oct"]]
    token_init: Literal["pretrained", "normal", "kaiming"]
    position_init: Literal["sincos", "zero"]
    cnn_norm: Literal["rms", "none"]
    fusion_norm: Literal["running", "none"]
    fusion_input: Literal["token", "token_maps"]
    tuning: Literal["lpt", "evp", "vpt", "adaptformer", "decoder_only"]
    prompt_sharing: Literal["ln_s", "ln_i", "all", "none"]
    vpt_tokens: Count
    fourier_mask: float = Field(gt=0.0, lt=1.0)
    decoder_sharing: Literal["shared", "separate"]
    mask_token_sharing: Literal["shared", "separate"]


class WeightFile(_Strict):
    path: str
    format: str
    sha256: str | None = None


class Weights(_Strict):
    sam: WeightFile | None  # a full SAM checkpoint (format "sam") or an encoder ("lvm-med")
    resnets: list[WeightFile | None]  # one per CNN of the LPT; missing entries stay random


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class PairShares(_Strict):
    fundus_only: Annotated[float, Field(ge=0.0)]
    oct_only: Annotated[float, Field(ge=0.0)]
    both: Annotated[float, Field(ge=0.0)]

    @model_validator(mode="after")
    def _some_share(self) -> "PairShares":
        if self.fundus_only + self.oct_only + self.both <= 0:
            raise ValueError("at least one pair share must be positive")
        return self


class Simulation(_Strict):
    probability: Fraction
    pairing: Literal["pair", "independent"]
    pair_shares: PairShares
    transforms: Literal["color_jitter", "channel_shuffle", "rgb_shift", "rotate", "composition"]
    composition_n: tuple[Annotated[int, Field(ge=1, le=4)], Annotated[int, Field(ge=1, le=4)]]
    min_area: float = Field(gt=0.0, lt=1.0)
    max_area: float = Field(gt=0.0, lt=1.0)
    max_blobs: Count
    max_aspect: float = Field(ge=1.0)
    twist_shear: float = Field(ge=0.0, le=90.0)
    twist_alpha: float = Field(ge=0.0)
    twist_sigma: float = Field(gt=0.0)
    rgb_shift: Annotated[int, Field(ge=0, le=255)]
    jitter: float = Field(ge=0.0, le=1.0)
    hue: float = Field(ge=0.0, le=0.5)
    rotate_min: float = Field(ge=0.0, le=180.0)
    min_change: Annotated[int, Field(ge=1, le=765)]
    min_changed_fraction: Fraction
    min_mean_change: float = Field(ge=0.0, le=255.0)
    max_attempts: Count
    fundus_threshold: Annotated[int, Field(ge=0, le=254)]
    oct_threshold: Annotated[int, Field(ge=0, le=254)]
    margin: float = Field(ge=0.0, lt=0.5)
    oct_gray: bool

    @model_validator(mode="after")
    def _ranges(self) -> "Simulation":
        if self.min_area > self.max_area:
            raise ValueError(f"min_area ({self.min_area}) must not exceed max_area ({self.max_area})")
        if self.composition_n[0] > self.composition_n[1]:
            raise ValueError(f"composition_n must be [min, max] with min <= max, got {list(self.composition_n)}")
        return self


class Train(_Strict):
    dataset: str
    steps: Count
    batch_size: Count
    lr: float = Field(gt=0)
    head_lr_scale: float = Field(gt=0)  # the fusion head's learning rate = lr * this
    betas: tuple[float, float]
    weight_decay: float = Field(ge=0)
    loss: Literal["ce", "focal", "dice", "lovasz"]
    modalities: list[Literal["fundus", "oct"]] = Field(min_length=1, max_length=2)  # of a paired dataset
    checkpoint_every: Count
    device: Literal["auto", "cpu", "cuda"]
    threads: Annotated[int, Field(ge=0)]
    processes: Count  # data-parallel processes (DDP); > 1 starts torchrun (mmrad.training.distributed)


class Baselines(_Strict):
    padim_channels: Count
    patchcore_coreset_ratio: float = Field(gt=0.0, le=1.0)


class Evaluation(_Strict):
    bootstrap: Annotated[int, Field(ge=0, le=100_000)]  # case-level bootstrap replicates; 0: no intervals
    bins: Annotated[int, Field(ge=16, le=1_000_000)]  # score bins of the pixel metrics' replicates
    degenerate_spread: float = Field(ge=0.0, lt=1.0)  # relative range of a case score below this: flagged


class GateRule(_Strict):
    min_gain: float = Field(ge=0.0, le=1.0)  # a gain of at least this counts as an improvement
    max_regression: float = Field(ge=0.0, le=1.0)  # a loss of more than this fails the gate


class Tracking(_Strict):
    experiment: Annotated[str, Field(min_length=1)]
    model_name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    gate: dict[str, GateRule]
    significance: float = Field(gt=0.0, lt=1.0)  # familywise level of the gate's paired tests (Bonferroni)

    @field_validator("gate")
    @classmethod
    def _some_metric(cls, value: dict[str, GateRule]) -> dict[str, GateRule]:
        if not value:
            raise ValueError("the promotion gate needs at least one metric")
        return value


class Ablation(_Strict):
    profile: Literal["quick", "paper"]  # mmrad.ops.ablation.PROFILES: the CPU model, or the paper's vit_b @ 1024
    quick_steps: Count  # train.steps of the quick profile
    seeds: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)  # every variant runs with each


class Params(_Strict):
    seed: Annotated[int, Field(ge=0)]
    synthetic: Synthetic
    datasets: dict[str, DatasetSource]
    prepare: Prepare
    model: Model
    weights: Weights
    simulation: Simulation
    train: Train
    baselines: Baselines
    evaluation: Evaluation
    tracking: Tracking
    ablation: Ablation

    @field_validator("datasets")
    @classmethod
    def _known_datasets(cls, value: dict[str, DatasetSource]) -> dict[str, DatasetSource]:
        unknown = sorted(set(value) - set(DATASETS))
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; known: {sorted(DATASETS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        if self.model.image_size != self.prepare.resolution:
            raise ValueError(f"model.image_size ({self.model.image_size}) must equal prepare.resolution "
                             f"({self.prepare.resolution}): the model reads the prepared cache")
        if self.train.dataset not in self.datasets:
            raise ValueError(f"train.dataset {self.train.dataset!r} is not configured under 'datasets'")
        resnet50_only = [w.format for w in self.weights.resnets if w is not None and w.format in ("lvm-med", "vilref")]
        if resnet50_only and self.model.cnn != "resnet50":
            raise ValueError(f"weights.resnets: {resnet50_only[0]} files are ResNet-50s, so model.cnn must be "
                             f"resnet50 (it is {self.model.cnn}, the CPU default)")
        return self

    def is_synthetic(self, dataset: str) -> bool:
        """Whether the data set is the generated one: its root (``datasets``) lies under a `synthetic` folder."""
        source = self.datasets.get(dataset.lower())
        return source is not None and "synthetic" in Path(source.root).parts


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(path, "parameter file is missing") from exc
    except yaml.YAMLError as exc:
        raise DataError(path, "parameter file is not valid YAML", str(exc).replace("\n", " ")) from exc
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "<top level>"
        raise DataError(path, f"invalid parameter '{key}'", first["msg"]) from exc


def check_batch_size(params: Params, healthy_cases: int, where: str | Path) -> None:
    """train.batch_size must not exceed the healthy training cases (``where`` names the data they came from)."""
    if params.train.batch_size > healthy_cases:
        raise DataError(where, f"train.batch_size ({params.train.batch_size}) exceeds the healthy training cases "
                        f"({healthy_cases})", "lower train.batch_size in params.yaml or add training cases")
