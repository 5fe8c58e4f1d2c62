"""Training-time anomaly simulation (paper Sec. 4.3.1, Fig. 3, Table 4).

MMRAD is trained on healthy images only. Each healthy image is turned into a
pseudo-anomalous one plus its pixel mask, and the model learns to segment the
mask. The paper's workflow, the same for fundus and OCT:

1. **pi** - with probability ``config.probability`` (0.7) choose an anomaly
   region; otherwise the sample stays normal (image unchanged, empty mask).
2. **phi** - shift the region's distribution "violently" with albumentations
   transforms: pixel-level ColorJitter, ChannelShuffle, RGBShift and the
   spatial Rotate, alone (Table 4's single settings) or randomly composed
   (the "composition" setting, best detection AUC, our default).
3. **twist** - an affine + elastic warp makes the region's shape irregular.

How this module does it (``simulate``)::

    valid   = imaged part of the picture   fundus: circular field of view
                                           OCT:    tissue band (ILM .. choroid)
    shape   = 1-3 random ellipses on a fixed 96x96 canvas,
              twisted by albumentations Affine(shear) + ElasticTransform,
              rescaled to a random area (a fraction of the valid area)
    region  = shape placed at a random centre well inside `valid`, clipped to
              `valid` less a thin rim (``margin``)
    shifted = phi(crop of the image around the region); "composition" picks
              2-4 of the four transforms at random (OneOf over SomeOf's)
    mask    = region & (sum over channels |shifted - image| >= min_change)
    out     = image with `shifted` pasted where mask (hard edge)

so the pixels that changed are *exactly* the mask pixels, and a region that
phi left (nearly) untouched never becomes a positive label. A weak phi draw
(too few pixels changed, or too little on average) is re-drawn up to
``max_attempts`` times; if nothing visible comes out at all, the sample is
returned as normal.

OCT B-scans arrive as 3 identical gray channels. ChannelShuffle is then the
identity and RGBShift/ColorJitter would paint colours no OCT ever has, so by
default (``oct_gray=True``) OCT gets gray stand-ins that keep the 3 channels
equal: RGBShift -> an additive intensity shift of the same range,
ChannelShuffle -> InvertImg (reverses the intensity order, the gray analogue
of reassigning channel values), ColorJitter -> brightness/contrast only;
Rotate is unchanged. ``oct_gray=False`` applies the fundus transforms
literally (paper-faithful for the Table 4 ablation, where channel shuffle was
weak on OCT; here a no-op ChannelShuffle then yields normal samples).

Determinism: every random draw comes from the caller's ``np.random.Generator``;
albumentations transforms are reseeded from it before each call (never the
global ``random``/``np.random`` state). The albumentations pipelines are built
once per (config, modality) and cached; they are reseeded in place, so one
config must not be used from several threads at once (processes, e.g.
DataLoader workers, are fine).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
from scipy.ndimage import median_filter

from mmrad.core.params import Simulation
from mmrad.data.symptoms import FUNDUS, MODALITIES, OCT

TRANSFORM_SETS = ("color_jitter", "channel_shuffle", "rgb_shift", "rotate", "composition")

_CANVAS = 96  # side of the square canvas the region shape is drawn and twisted on
_SEED_MAX = 2**31 - 1


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationConfig:
    """The knobs of one image's simulation. No defaults here: params.yaml's ``simulation`` section states every
    value with a comment, docs/decisions.md ("Anomaly simulation") the reasons; ``simulation_config`` makes this
    from it. (``pairing`` / ``pair_shares``, which decide *which* images of a pair get an anomaly, are the
    training loop's: ``mmrad.training.train.make_batch``.)

    What each knob shapes, briefly: ``probability`` pi; ``transforms`` Table 4's set ("composition": 2-4 of the
    four, ``composition_n``); region area log-uniform in [``min_area``, ``max_area``] of the imaged area, a union
    of up to ``max_blobs`` ellipses of aspect <= ``max_aspect``, twisted by an affine shear (``twist_shear``)
    and an elastic warp (``twist_alpha`` / ``twist_sigma`` on the 96 px canvas: ~8.6 px rms displacement);
    phi's magnitudes ``rgb_shift``, ``jitter``, ``hue``, ``rotate_min``; a pixel is labelled only when it changed
    by ``min_change`` (summed over channels), and phi is re-drawn (up to ``max_attempts``) until
    ``min_changed_fraction`` of the region changed by ``min_mean_change`` per channel on average; the imaged
    area is found with ``fundus_threshold`` / ``oct_threshold`` and a rim of ``margin``; ``oct_gray`` swaps in
    gray stand-ins for OCT (module docstring).
    """

    probability: float
    transforms: str
    composition_n: tuple[int, int]
    min_area: float
    max_area: float
    max_blobs: int
    max_aspect: float
    twist_shear: float
    twist_alpha: float
    twist_sigma: float
    rgb_shift: int
    jitter: float
    hue: float
    rotate_min: float
    min_change: int
    min_changed_fraction: float
    min_mean_change: float
    max_attempts: int
    fundus_threshold: int
    oct_threshold: int
    margin: float
    oct_gray: bool

    def __post_init__(self) -> None:
        # A list (e.g. from YAML) would make the config unhashable, and it keys the pipeline cache.
        object.__setattr__(self, "composition_n", tuple(self.composition_n))
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {self.probability}")
        if self.transforms not in TRANSFORM_SETS:
            raise ValueError(f"unknown transform set {self.transforms!r}; valid: {', '.join(TRANSFORM_SETS)}")
        if not 0.0 < self.min_area <= self.max_area < 1.0:
            raise ValueError(f"need 0 < min_area <= max_area < 1, got {self.min_area}, {self.max_area}")
        lo, hi = self.composition_n
        if not 1 <= lo <= hi <= 4:
            raise ValueError(f"composition_n must satisfy 1 <= min <= max <= 4, got {self.composition_n}")
        if self.max_blobs < 1 or self.max_aspect < 1.0 or self.max_attempts < 1:
            raise ValueError("max_blobs, max_aspect and max_attempts must be >= 1")
        if not 0.0 <= self.rotate_min <= 180.0:
            raise ValueError(f"rotate_min must lie in [0, 180], got {self.rotate_min}")


PAIR_KEYS = ("pairing", "pair_shares")  # the training loop's part of the section (which images of a pair)


def simulation_config(section: Simulation) -> SimulationConfig:
    """The per-image simulation params.yaml's ``simulation`` section describes."""
    return SimulationConfig(**{k: v for k, v in section.model_dump().items() if k not in PAIR_KEYS})


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def simulate(
    image: np.ndarray, modality: str, config: SimulationConfig, rng: np.random.Generator,
    anomalous: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One pseudo-anomalous sample from a healthy image.

    image: (H, W, 3) uint8; OCT as 3 identical gray channels.
    ``anomalous``: None draws pi (``config.probability``); True / False is the
    caller's decision (pair-level simulation), pi is then not drawn.
    Returns (image_out, mask): image_out (H, W, 3) uint8, a new array; mask
    (H, W) bool, True exactly where image_out differs from image.
    """
    _check_modality(modality)
    _check_image(image)
    out, empty = image.copy(), np.zeros(image.shape[:2], bool)
    if anomalous is None:
        anomalous = rng.random() < config.probability  # pi
    if not anomalous:  # this sample stays normal
        return out, empty

    valid = valid_area(image, modality, config)
    region = _choose_region(valid, config, rng)
    if region is None:  # nothing imaged (e.g. a black frame): nothing to alter
        return out, empty
    mask, shifted, box = _shift_region(image, region, modality, config, rng)
    if mask is None:
        return out, empty
    y0, y1, x0, x1 = box
    crop = out[y0:y1, x0:x1]
    crop[mask] = shifted[mask]  # hard edge: a pixel is anomalous or it is not
    empty[y0:y1, x0:x1] = mask
    return out, empty


def simulate_batch(
    images: np.ndarray, modality: str, config: SimulationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``simulate`` over (N, H, W, 3) uint8; returns (N, H, W, 3) uint8 and (N, H, W) bool."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    pairs = [simulate(img, modality, config, rng) for img in images]
    out = np.stack([p[0] for p in pairs]) if pairs else images.copy()
    masks = np.stack([p[1] for p in pairs]) if pairs else np.zeros(images.shape[:3], bool)
    return out, masks


def valid_area(image: np.ndarray, modality: str, config: SimulationConfig) -> np.ndarray:
    """(H, W) bool: the imaged part of the picture, where anomalies may go.

    fundus: the circular field of view (not near-black).
    OCT: per column, the rows from the first to the last pixel above the
    threshold, i.e. the tissue band without the black vitreous above it.
    """
    _check_modality(modality)
    if modality == FUNDUS:
        r, g, b = cv2.split(image)
        level = cv2.medianBlur(cv2.max(cv2.max(r, g), b), 5)
        return level > config.fundus_threshold
    level = cv2.medianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 5)
    bright = level > config.oct_threshold
    rows = np.arange(image.shape[0])[:, None]
    has = bright.any(axis=0)
    top = np.argmax(bright, axis=0)
    bottom = image.shape[0] - 1 - np.argmax(bright[::-1], axis=0)
    # Speckle makes the edges ragged from column to column: median-smooth them.
    top = median_filter(top, size=9, mode="nearest")
    bottom = median_filter(bottom, size=9, mode="nearest")
    return has & (rows >= top) & (rows <= bottom)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape} dtype {image.dtype}")


# ---------------------------------------------------------------------------
# pi: where the anomaly goes and what shape it has
# ---------------------------------------------------------------------------


def _choose_region(valid: np.ndarray, config: SimulationConfig, rng: np.random.Generator) -> np.ndarray | None:
    """(H, W) bool region inside `valid`, or None when there is no room."""
    h, w = valid.shape
    valid_px = np.count_nonzero(valid)
    if valid_px == 0:
        return None
    # Distance to the nearest non-valid pixel: keeps regions off the rim and
    # tells which centres leave room for a region of a given radius.
    dist = cv2.distanceTransform(valid.view(np.uint8), cv2.DIST_L2, 3)
    margin = config.margin * min(h, w)
    inner = dist > margin
    if not inner.any():
        return None

    # Log-uniform area between min_area and max_area of the valid area.
    fraction = np.exp(rng.uniform(np.log(config.min_area), np.log(config.max_area)))
    shape = _region_shape(fraction * valid_px, config, rng)
    shape_px = np.count_nonzero(shape)
    radius = np.sqrt(shape_px / np.pi)  # equivalent-disc radius

    # Centres at least `radius` (plus margin) inside; fall back to the deepest
    # pixels when the valid area is thinner than the region.
    room = dist >= min(radius + margin, 0.8 * float(dist.max()))
    centres = np.flatnonzero(room)
    best, best_px = None, -1
    for _ in range(4):  # a twisted shape may stick out of `inner`: try a few centres
        cy, cx = divmod(int(centres[rng.integers(len(centres))]), w)
        region = _paste_shape(shape, cy, cx, (h, w)) & inner
        region_px = np.count_nonzero(region)
        if region_px > best_px:
            best, best_px = region, region_px
        if region_px >= 0.8 * shape_px:
            break
    return best if best_px > 0 else None


def _region_shape(area_px: float, config: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """Bool array of an irregular shape with about `area_px` True pixels.

    Drawn and twisted on a fixed-size canvas (so the cached twist pipeline's
    pixel parameters fit every region), then cropped and rescaled.
    """
    canvas = np.zeros((_CANVAS, _CANVAS), np.uint8)
    c = _CANVAS / 2
    base = _CANVAS * 0.12  # equivalent radius of the first ellipse, leaving room for the twist
    for i in range(int(rng.integers(1, config.max_blobs + 1))):
        aspect = rng.uniform(1.0, config.max_aspect)
        r = base * (1.0 if i == 0 else rng.uniform(0.5, 0.9))
        axes = (max(1, round(r * np.sqrt(aspect))), max(1, round(r / np.sqrt(aspect))))
        # Later blobs overlap the first one (centres within its radius) so the union is one lobed shape.
        offset = rng.uniform(-1, 1, 2) * base if i else np.zeros(2)
        centre = (round(c + offset[0]), round(c + offset[1]))
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, thickness=-1)

    # The twist: affine shear/rotation, then an elastic warp.
    twist = _twist_pipeline(config)
    _reseed(twist, rng)
    twisted = twist(image=canvas)["image"]
    if np.count_nonzero(twisted > 127) == 0:  # degenerate warp (not seen in practice): keep the untwisted shape
        twisted = canvas

    # Crop to the shape, then rescale so it covers about area_px pixels.
    x, y, bw, bh = cv2.boundingRect((twisted > 127).view(np.uint8))
    tight = twisted[y: y + bh, x: x + bw]
    scale = np.sqrt(area_px / np.count_nonzero(tight > 127))
    size = (max(1, round(bw * scale)), max(1, round(bh * scale)))
    resized = cv2.resize(tight, size, interpolation=cv2.INTER_LINEAR) > 127
    return resized if resized.any() else np.ones((1, 1), bool)


def _paste_shape(shape: np.ndarray, cy: int, cx: int, size: tuple[int, int]) -> np.ndarray:
    """Place `shape` centred at (cy, cx) on an empty (H, W) bool array, clipped to it."""
    h, w = size
    sh, sw = shape.shape
    top, left = cy - sh // 2, cx - sw // 2
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + sh, h), min(left + sw, w)
    out = np.zeros(size, bool)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = shape[y0 - top: y1 - top, x0 - left: x1 - left]
    return out


# ---------------------------------------------------------------------------
# phi: shift the region's distribution
# ---------------------------------------------------------------------------


def _shift_region(image, region, modality, config, rng):
    """Apply phi around `region`; returns (mask, shifted, box) on the crop `box`, or (None,)*3.

    The crop is the region's bounding box plus a margin (so Rotate pulls in
    surrounding content rather than reflections), which is also much cheaper
    than transforming the whole image. `mask` keeps the region pixels that
    changed by at least ``min_change``.
    """
    h, w = region.shape
    x, y, bw, bh = cv2.boundingRect(region.view(np.uint8))
    pad = max(4, (bw + bh) // 4)
    box = (max(y - pad, 0), min(y + bh + pad, h), max(x - pad, 0), min(x + bw + pad, w))
    y0, y1, x0, x1 = box
    crop, inside = image[y0:y1, x0:x1], region[y0:y1, x0:x1]
    n_inside = np.count_nonzero(inside)
    channels = image.shape[2]

    phi = _phi_pipeline(config, modality)
    best_mask, best_shifted, best_score = None, None, -1
    for _ in range(config.max_attempts):
        _reseed(phi, rng)
        shifted = phi(image=crop)["image"]
        change = cv2.absdiff(shifted, crop).sum(axis=2, dtype=np.int32)
        mask = inside & (change >= config.min_change)
        score = int(change[mask].sum())  # total visible change
        if score > best_score:
            best_mask, best_shifted, best_score = mask, shifted, score
        coverage = np.count_nonzero(mask) / n_inside
        strength = change[inside].mean() / channels  # mean |change| per channel over the region
        if coverage >= config.min_changed_fraction and strength >= config.min_mean_change:
            break
    if best_score <= 0:
        return None, None, None
    return best_mask, best_shifted, box


def _reseed(pipeline: A.BaseCompose, rng: np.random.Generator) -> None:
    """Seed `pipeline` and everything nested in it from `rng`, as one shared stream.

    ``set_random_state`` hands the same two generator objects to every nested
    transform, so they draw one after another from a single stream.
    (``set_random_seed`` would instead give each child its own generator with
    the *same* seed, so e.g. the Rotate angle and the RGBShift offset would
    come from identical streams and be correlated.)
    """
    seed = int(rng.integers(_SEED_MAX))
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


@functools.lru_cache(maxsize=None)
def _twist_pipeline(config: SimulationConfig) -> A.Compose:
    """Affine shear + elastic warp of the shape canvas (built once per config)."""
    return A.Compose(
        [
            A.Affine(shear=(-config.twist_shear, config.twist_shear), rotate=(-180, 180), p=1.0),
            A.ElasticTransform(alpha=config.twist_alpha, sigma=config.twist_sigma, p=1.0),
        ]
    )


@functools.lru_cache(maxsize=None)
def _phi_pipeline(config: SimulationConfig, modality: str) -> A.Compose:
    """The distribution shift for one transform set and modality (built once, then reseeded)."""
    menu = _transform_menu(config, gray=modality == OCT and config.oct_gray)
    if config.transforms != "composition":
        return A.Compose([menu[config.transforms]])
    # Randomly composed: first draw how many (composition_n), then which ones.
    everything = [menu["color_jitter"], menu["channel_shuffle"], menu["rgb_shift"], menu["rotate"]]
    lo, hi = config.composition_n
    counts = [A.SomeOf(everything, n=n, replace=False, p=1.0) for n in range(lo, hi + 1)]
    return A.Compose([A.OneOf(counts, p=1.0)])


def _transform_menu(config: SimulationConfig, gray: bool) -> dict[str, A.BasicTransform]:
    """The four transforms by name, every one with p=1 so a region really changes.

    gray=True (OCT) swaps in stand-ins that keep 3 equal channels equal.
    """
    # |angle| in [rotate_min, 180]: angles are taken modulo 360, so this range skips small ones.
    rotate = A.Rotate(limit=(config.rotate_min, 360 - config.rotate_min), border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    shift = config.rgb_shift
    factors = (max(0.0, 1 - config.jitter), 1 + config.jitter)
    if gray:
        return {
            "color_jitter": A.ColorJitter(brightness=factors, contrast=factors, saturation=0, hue=0, p=1.0),
            "channel_shuffle": A.InvertImg(p=1.0),
            "rgb_shift": A.RandomBrightnessContrast(
                brightness_limit=shift / 255, contrast_limit=0, brightness_by_max=True, p=1.0
            ),
            "rotate": rotate,
        }
    return {
        "color_jitter": A.ColorJitter(
            brightness=factors, contrast=factors, saturation=factors, hue=config.hue, p=1.0
        ),
        "channel_shuffle": A.ChannelShuffle(p=1.0),
        "rgb_shift": A.RGBShift(r_shift_limit=shift, g_shift_limit=shift, b_shift_limit=shift, p=1.0),
        "rotate": rotate,
    }
