"""Synthetic colour fundus photograph ("retina phantom") with pixel-masked lesions.

Anatomy model
-------------
Everything is laid out relative to the circular field of view (FOV) of the
camera, centre ``(cx, cy)`` and radius ``R`` pixels, so that features scale
with the image size:

* **FOV** - the camera sees a disc of the retina; outside it the sensor is black
  (a little noise). The VISUCAM style shows the whole disc in a near-square
  image; the IDRiD (Kowa) style uses a wide 3:2 image in which the disc is cut
  at the top and bottom.
* **Background** - the orange-red glow of the choroid seen through the retinal
  pigment epithelium. Its colour follows ``eye.pigmentation`` (light fundus:
  orange-yellow; dark: brown-red). Illumination falls off toward the rim, a
  low-frequency texture (uneven pigment, choroidal vessels) modulates it, and
  lightly pigmented or older eyes show a faint tigroid choroidal pattern.
* **Optic disc** - a yellow-pink vertical ellipse of diameter ``dd`` (about
  0.11 of the FOV diameter) with a brighter, paler cup and a soft rim. It sits
  nasally: right of the fovea in a right eye ("OD"), left in a left eye ("OS").
* **Macula** - about 2.5 disc diameters temporal to the disc: a darker diffuse
  region (macular pigment), a darker fovea and a tiny foveal light reflex.
  ``eye.fovea_offset`` nudges it (fractions of the image width / height).
* **Vessels** - a tree grown from the disc: four arteries and four veins
  (superior / inferior temporal arcades that arch around the macula, superior /
  inferior nasal trunks) plus thin papillomacular twigs. Each vessel is a
  polyline with a calibre per point; branches leave at random intervals
  (``eye.vessel_density`` scales how often), take part of the parent's calibre
  (Murray's law) and wander with smooth random curvature. No vessel enters the
  foveal avascular zone. Veins are darker and ~1.5x wider than arteries; large
  arteries carry a light central reflex. The tree is grown in units of ``R``
  so the same eye looks the same at any image size.
* **Camera** - media haze grows with ``eye.age``; the style sets colour balance
  and brightness; a slight blur and per-channel sensor noise finish the image.

Randomness: the healthy anatomy (and the sensor noise) comes from
``eye.rng("fundus")``, lesions from ``eye.rng("lesions-fundus")`` (one
sub-stream per lesion kind), so an eye's background is the same with or
without lesions and one kind's draws never change another's.

Lesions
-------
Each lesion kind has its own appearance model (blots, streaks, fluffy patches,
dots, altered vessel calibre, new vessel networks ...) composited at one of
three stages: onto the background before vessels are laid over it
(``_BASE``: retinal whitening), onto the vessel coverage maps (``_VESSELS``:
segmental change, AV nicking), or on top of the finished picture (``_TOP``).
No lesion is a colour jitter, channel shuffle or rotation of an image region:
those are what training-time anomaly simulation does. The mask of a lesion is
where it is visible, and its area aims at the kind's ``target_fraction`` from
``mmrad.data.symptoms`` (jittered), with a floor so tiny lesions survive resizing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage
from scipy.signal import lfilter
from scipy.spatial import cKDTree
from scipy.special import ndtri

from mmrad.data import symptoms
from mmrad.synthetic.phantom import stable
from mmrad.synthetic.phantom.eye import Eye, Rendered, check_request

STYLES = ("visucam", "idrid")

# Target pixel fraction per lesion kind; MMR's figure wins for kinds in both tables.
_TARGET_FRACTION: dict[str, float] = {s.kind: s.target_fraction for s in symptoms.IDRID_LESIONS.values()}
_TARGET_FRACTION.update({s.kind: s.target_fraction for s in symptoms.MMR_FUNDUS.values()})
_MIN_FRACTION = 0.00015  # floor of a lesion's area, so it survives downsampling to 256x256

# --- geometry constants, in units of the FOV radius R unless said otherwise ---
_DISC_DIAMETER = 0.22  # ~0.11 of the FOV diameter
_DISC_TO_FOVEA = 2.5  # disc diameters
_FAZ_RADIUS = 0.3  # foveal avascular zone radius, disc diameters
_STEP = 0.01  # vessel polyline step
_MIN_WIDTH = 0.0025  # vessels thinner than this are not drawn
_FULL_DENSITY_WIDTH = 0.011  # thinner vessels hold less blood and look paler

# Light absorption of blood per RGB channel (vessel colour = background * exp(-coverage * k)).
_K_VEIN = np.array([0.85, 1.90, 1.40], np.float32)
_K_ARTERY = np.array([0.28, 0.85, 0.65], np.float32)
_K_NEW_VESSEL = np.array([0.55, 1.40, 1.00], np.float32)
# Vessel coverage is kept as uint8 (0..255); these tables turn it into per-channel transmission.
_LEVELS = np.arange(256, dtype=np.float32) / 255
_T_VEIN = stable.exp(-_K_VEIN[:, None] * _LEVELS)  # (3, 256)
_T_ARTERY = stable.exp(-_K_ARTERY[:, None] * _LEVELS)

# Stages at which a lesion is composited (see module docstring).
_BASE, _VESSELS, _TOP = "base", "vessels", "top"


# ----------------------------------------------------------------------------
# Small numeric helpers
# ----------------------------------------------------------------------------


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """0 at edge0, 1 at edge1, smooth in between (edge0 > edge1 gives a falling step)."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _wrap(angle: float) -> float:
    """Angle folded into (-pi, pi]."""
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


def _upsampled_noise(rng: np.random.Generator, grid: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
    """Smooth noise: a (gh, gw) grid of N(0,1) values resized bicubically to out=(h, w)."""
    g = rng.standard_normal(grid).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((out[1], out[0]), Image.BICUBIC))


def _window(shape: tuple[int, int], x: float, y: float, half_w: float, half_h: float | None = None):
    """Crop of an image around (x, y).

    Returns (slices, dx, dy) where dx (1, w) and dy (h, 1) are the offsets of the
    crop's pixel centres from (x, y), or None when the crop is off the image.
    """
    half_h = half_w if half_h is None else half_h
    h, w = shape
    x0, x1 = max(0, int(math.floor(x - half_w))), min(w, int(math.ceil(x + half_w)) + 1)
    y0, y1 = max(0, int(math.floor(y - half_h))), min(h, int(math.ceil(y + half_h)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(x))[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(y))[:, None]
    return (slice(y0, y1), slice(x0, x1)), dx, dy


def _col(values) -> np.ndarray:
    """An RGB triple shaped (3, 1, 1), to broadcast over planar (3, h, w) images."""
    return np.asarray(values, np.float32).reshape(3, 1, 1)


def _paint(img: np.ndarray, sl, alpha: np.ndarray, colour) -> None:
    """Alpha-blend a flat colour into the crop sl=(rows, cols) of a planar (3, H, W) image, in place."""
    crop = img[:, sl[0], sl[1]]
    crop += alpha * (_col(colour) - crop)


def _blob(dx, dy, radius: float, aspect: float, angle: float, harmonics: np.ndarray,
          softness: float, jitter: np.ndarray | None = None) -> np.ndarray:
    """Alpha of an irregular blob centred at the crop origin.

    The blob is elongated ``aspect``:1 along ``angle``; its border radius is
    modulated by Fourier ``harmonics`` (rows of amplitude, phase for k = 2, 3 ...)
    and optionally by a per-pixel ``jitter`` field (feathery edges).
    """
    c, s = math.cos(angle), math.sin(angle)
    u = (dx * c + dy * s) / math.sqrt(aspect)
    v = (-dx * s + dy * c) * math.sqrt(aspect)
    rho = np.hypot(u, v)
    theta = stable.arctan2(v, u)
    border = np.ones_like(rho)
    for k, (amp, phase) in enumerate(harmonics, start=2):
        border += amp * stable.cos(k * theta + phase)
    d = rho / (radius * border)
    if jitter is not None:
        d = d + jitter
    return _smoothstep(1.0 + softness, 1.0 - softness, d)


def _crop_mask(shape: tuple[int, int], sl, alpha: np.ndarray) -> np.ndarray:
    """A full-size lesion mask: where the crop sl's alpha is above one half."""
    mask = np.zeros(shape, bool)
    mask[sl] = alpha > 0.5
    return mask


def _dots(shape: tuple[int, int], dots: np.ndarray, edge: float = 0.7):
    """Alpha of sharp round dots, rows (x, y, r); returns (slices, alpha) of their bounding crop."""
    pad = float(dots[:, 2].max()) + 2.0
    x0 = max(0, int(dots[:, 0].min() - pad))
    y0 = max(0, int(dots[:, 1].min() - pad))
    x1 = min(shape[1], int(dots[:, 0].max() + pad) + 1)
    y1 = min(shape[0], int(dots[:, 1].max() + pad) + 1)
    alpha = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), np.float32)
    for x, y, r in dots:
        win = _window(alpha.shape, x - x0, y - y0, r + 1.5)
        if win is None:
            continue
        sl, dx, dy = win
        np.maximum(alpha[sl], np.clip((r - np.hypot(dx, dy)) / edge + 0.5, 0.0, 1.0), out=alpha[sl])
    return (slice(y0, y1), slice(x0, x1)), alpha


# ----------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    h: int
    w: int
    cx: float  # FOV centre and radius, pixels
    cy: float
    r: float
    side: int  # +1: nasal (disc) to the right of the fovea (OD); -1: to the left (OS)
    dd: float  # disc diameter, pixels
    fovea: tuple[float, float]
    disc: tuple[float, float]
    disc_rx: float  # disc half-axes, pixels
    disc_ry: float
    cup: float  # cup-to-disc ratio

    def to_px(self, p: np.ndarray) -> np.ndarray:
        """FOV units (origin FOV centre, unit R) -> pixel coordinates."""
        return p * self.r + np.array([self.cx, self.cy])

    def to_fov(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.cx) / self.r, (y - self.cy) / self.r


def _geometry(eye: Eye, h: int, w: int, style: str, rng: np.random.Generator) -> _Geometry:
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    if style == "visucam":
        r = 0.47 * min(h, w)
    else:  # Kowa/IDRiD: the FOV is wider than the image is tall, cut top and bottom
        r = min(0.62 * h, 0.44 * w)
    side = 1 if eye.laterality == "OD" else -1
    dd = _DISC_DIAMETER * r * rng.uniform(0.92, 1.08)
    # Macula-centred photo: fovea slightly temporal of the centre and a little low.
    fx = cx - side * 0.07 * r + eye.fovea_offset[0] * w
    fy = cy + 0.03 * r + eye.fovea_offset[1] * h
    dist = _DISC_TO_FOVEA * dd * rng.uniform(0.93, 1.07)
    disc = (fx + side * dist, fy - rng.uniform(0.15, 0.4) * dd)
    ellipticity = rng.uniform(1.03, 1.12)  # discs are slightly taller than wide
    return _Geometry(h, w, cx, cy, r, side, dd, (fx, fy), disc,
                     disc_rx=dd / 2 / math.sqrt(ellipticity), disc_ry=dd / 2 * math.sqrt(ellipticity),
                     cup=rng.uniform(0.28, 0.5))


# ----------------------------------------------------------------------------
# Vessel tree
# ----------------------------------------------------------------------------


@dataclass
class _Vessel:
    pts: np.ndarray  # (N, 2) x, y; FOV units while growing, pixels once converted
    width: np.ndarray  # (N,) calibre, same units
    artery: bool
    depth: int  # 0 trunk from the disc, 1 branch, 2 twig
    parent: int = -1  # index of the parent vessel in the tree list
    branch_at: int = 0  # index on the parent's polyline where this vessel leaves it
    temporal: bool = False  # a temporal arcade trunk


@dataclass(frozen=True)
class _Frame:
    """Landmarks in FOV units, for growing the tree size-independently."""

    fovea: tuple[float, float]
    disc: tuple[float, float]
    dd: float
    side: int


# Branching per depth: (gap between branches lo, hi), (child/parent calibre lo, hi), max steps of a child.
_BRANCHING = {0: ((0.06, 0.13), (0.35, 0.65)), 1: ((0.09, 0.2), (0.45, 0.75)), 2: None}
_CHILD_STEPS = {1: 45, 2: 25}


def _branch_plan(rng, width: np.ndarray, n: int, depth: int, density: float, taper: float,
                 first_branch: float):
    """Calibre along m polylines of n points, and where their branches leave.

    Branches leave at random arc-length gaps; each takes a fraction of the
    parent's calibre and the parent narrows after the fork so that
    w^3 = w1^3 + w2^3 (Murray's law). Returns (widths (m, n), branches) with
    branches a list of (row, point index, child width, turn angle).
    """
    m = len(width)
    widths = width[:, None] * stable.power(taper, np.arange(n), np.float64)
    plan = _BRANCHING[depth]
    if plan is None:
        return widths, []
    (gap_lo, gap_hi), (ratio_lo, ratio_hi) = plan
    k = 24
    gaps = rng.uniform(gap_lo, gap_hi, (m, k)) / density
    ratios = rng.uniform(ratio_lo, ratio_hi, (m, k))
    turns = rng.uniform(0.55, 1.25, (m, k)) * rng.choice([-1.0, 1.0], (m, k))
    at = np.floor((first_branch + np.cumsum(gaps, 1) - gaps[:, :1]) / _STEP).astype(int)
    rows, cols = np.nonzero(at < n - 2)
    idx = at[rows, cols]
    drop = np.ones((m, n))
    ratio = ratios[rows, cols]
    drop[rows, idx + 1] = stable.power(1.0 - ratio * ratio * ratio, 1.0 / 3.0, np.float64)
    widths *= np.cumprod(drop, 1)
    child = widths[rows, idx] * ratios[rows, cols]
    keep = child >= _MIN_WIDTH
    branches = list(zip(rows[keep].tolist(), idx[keep].tolist(), child[keep].tolist(), turns[rows, cols][keep].tolist()))
    return widths, branches


def _alive(pts: np.ndarray, widths: np.ndarray, frame: _Frame) -> np.ndarray:
    """Per polyline (rows of pts (m, n, 2)), the number of leading points before it
    leaves the FOV, enters the foveal avascular zone or fades out."""
    fovea_d = np.hypot(pts[..., 0] - frame.fovea[0], pts[..., 1] - frame.fovea[1])
    dead = ((pts**2).sum(-1) > 0.985**2) | (fovea_d < _FAZ_RADIUS * frame.dd + widths) | (widths < _MIN_WIDTH)
    return np.where(dead.any(1), dead.argmax(1), pts.shape[1])


def _grow_trunk(rng, frame: _Frame, start, heading: float, temporal: bool) -> np.ndarray:
    """Polyline of a trunk from the disc. Temporal trunks arch around the macula:
    they follow a tangent of a circle round the fovea, then turn outward."""
    n = 180
    eps = rng.standard_normal(n) * 0.022
    sweep_max = rng.uniform(1.6, 2.2)  # how far (radians) the arcade wraps round the fovea
    r0 = frame.dd * rng.uniform(2.2, 2.6)  # arcade's distance from the fovea
    fx, fy = frame.fovea
    x, y = start
    th, k = heading, 0.0
    pts = [(x, y)]
    sign, sweep, prev_phi = 0.0, 0.0, 0.0
    for i in range(n):
        k = 0.8 * k + eps[i]  # smooth random curvature (tortuosity)
        th += k
        if temporal:
            rx, ry = x - fx, y - fy
            d = math.hypot(rx, ry)
            rx, ry = rx / d, ry / d
            phi = math.atan2(ry, rx)
            if i == 0:
                sign = 1.0 if (-ry * math.cos(th) + rx * math.sin(th)) > 0 else -1.0
            else:
                sweep += abs(_wrap(phi - prev_phi))
            prev_phi = phi
            tx, ty = -ry * sign, rx * sign
            if sweep < sweep_max:
                pull = 2.5 * (r0 + 0.15 * sweep * frame.dd - d) / r0  # >0 pushes outward
                vx, vy = tx + pull * rx, ty + pull * ry
            else:
                vx, vy = rx + 0.6 * tx, ry + 0.6 * ty
            th += 0.25 * _wrap(math.atan2(vy, vx) - th)
        else:
            th += 0.05 * _wrap(heading - th)
        x += _STEP * math.cos(th)
        y += _STEP * math.sin(th)
        pts.append((x, y))
        if x * x + y * y > 0.985**2:
            break
    return np.array(pts)


def _grow_free(rng, start: np.ndarray, heading: np.ndarray, depth: int) -> np.ndarray:
    """Polylines (m, n, 2) of m branches at once: smooth random curvature, weakly pulled
    back to each branch's first heading."""
    n = _CHILD_STEPS[depth]
    eps = rng.standard_normal((len(start), n)) * (0.028 if depth == 1 else 0.036)
    curvature = lfilter([1.0], [1.0, -0.8], eps, axis=1)
    theta = heading[:, None] + lfilter([1.0], [1.0, -0.94], curvature, axis=1)
    steps = _STEP * np.stack([stable.cos(theta, np.float64), stable.sin(theta, np.float64)], -1)
    return np.concatenate([start[:, None], start[:, None] + np.cumsum(steps, 1)], 1)


def _grow_tree(rng, frame: _Frame, density: float) -> list[_Vessel]:
    """All vessels: trunks first, then branches one generation at a time.

    Each branch records its parent and the point where it leaves it.
    """
    tree: list[_Vessel] = []
    temporal_dir = np.array([-frame.side, 0.0])
    disc = np.array(frame.disc)
    # (temporal?, up(-1)/down(+1), angle from the horizontal in degrees, relative calibre);
    # the last two are thin papillomacular twigs, grown like branches.
    trunks = [(True, -1, 78, 1.0), (True, 1, 78, 1.0), (False, -1, 45, 0.78), (False, 1, 45, 0.78),
              (True, -1, 12, 0.32), (True, 1, 12, 0.28)]
    # Seeds of the next generation: (parent index, branch point, start, heading, width, artery).
    seeds: list[tuple[int, int, np.ndarray, float, float, bool]] = []
    for artery in (True, False):
        base_width = 0.0105 if artery else 0.0158
        for temporal, vert, angle_deg, rel in trunks:
            a = math.radians(angle_deg + rng.normal(0, 7))
            horiz = temporal_dir if temporal else -temporal_dir
            vec = math.cos(a) * horiz + math.sin(a) * np.array([0.0, vert])
            heading = math.atan2(vec[1], vec[0])
            nasal_shift = 0.06 * frame.dd * frame.side * (1 if artery else -1)  # artery a bit nasal in the cup
            start = disc + rng.normal(0, 0.08, 2) * frame.dd + (nasal_shift, 0.0)
            width = base_width * rel * rng.uniform(0.9, 1.1)
            if angle_deg < 30:
                seeds.append((-1, 0, start, heading, width, artery))
                continue
            pts = _grow_trunk(rng, frame, start, heading, temporal)
            widths, branches = _branch_plan(rng, np.array([width]), len(pts), 0, density, 0.998,
                                            first_branch=0.6 * frame.dd)
            tree.append(_Vessel(pts, widths[0], artery, 0, temporal=temporal))
            seeds += [(len(tree) - 1, i, pts[i], _heading(pts, i) + turn, w, artery) for _, i, w, turn in branches]
    for depth in (1, 2):
        if not seeds:
            break
        start = np.array([s[2] for s in seeds])
        pts = _grow_free(rng, start, np.array([s[3] for s in seeds]), depth)
        widths, branches = _branch_plan(rng, np.array([s[4] for s in seeds]), pts.shape[1], depth, density,
                                        0.992, first_branch=0.06)
        alive = _alive(pts, widths, frame)
        rows = {}  # seed row -> tree index
        for row, (parent, at, _, _, _, artery) in enumerate(seeds):
            n = int(alive[row])
            if n >= 3:
                rows[row] = len(tree)
                tree.append(_Vessel(pts[row, :n], widths[row, :n], artery, depth, parent, at))
        seeds = [(rows[r], i, pts[r, i], _heading(pts[r], i) + turn, w, seeds[r][5])
                 for r, i, w, turn in branches if r in rows and i < alive[r] - 1]
    return tree


def _heading(pts: np.ndarray, i: int) -> float:
    """Direction of a polyline at point i."""
    d = pts[i + 1] - pts[i]
    return math.atan2(d[1], d[0])


def _tree_to_px(tree: list[_Vessel], geo: _Geometry) -> list[_Vessel]:
    return [replace(v, pts=geo.to_px(v.pts), width=v.width * geo.r) for v in tree]


# ----------------------------------------------------------------------------
# Vessel rasterisation
# ----------------------------------------------------------------------------


def _supersample(geo: _Geometry) -> int:
    return 2 if geo.h * geo.w <= 2_500_000 else 1


def _coverage(vessels: Sequence[_Vessel], shape: tuple[int, int], origin: tuple[int, int], ss: int,
              r: float, width_scale: float = 1.0, core: bool = True) -> np.ndarray:
    """Blood "optical density" (uint8 0..255, shape) of vessels drawn as lines of their calibre.

    A line's value grows with the calibre (thin vessels hold less blood and
    look paler; full at _FULL_DENSITY_WIDTH * r). With `core`, an inner line of
    half the calibre is drawn denser than the outer one, so that vessels are
    darker along their axis, like a cylinder of blood. Lines are drawn on an
    ss-times supersampled canvas, one run of equal (rounded) width and value at
    a time, palest first; sub-pixel calibres are drawn one canvas pixel wide
    but fainter. `origin` is the image pixel at the canvas' top-left corner
    (for redrawing a crop); the result is lightly blurred (1-2-1 kernel).
    """
    h, w = shape
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    runs = []
    shift = np.array(origin, float)
    layers = ((1.0, 0.62), (0.5, 1.0)) if core else ((1.0, 1.0),)
    for v in vessels:
        p = (v.pts - shift + 0.5) * ss - 0.5
        density = stable.power(np.clip(v.width / (_FULL_DENSITY_WIDTH * r), 0.12, 1.0), 0.8, np.float64)
        for scale, weight in layers:
            wc = v.width * (ss * width_scale * scale)
            if scale < 1 and wc.max() < 3:
                continue  # no visible core on thin vessels
            iw = np.maximum(1, np.rint(wc)).astype(int)
            level = density * weight * np.clip(wc, 0, 1)  # sub-pixel lines: fainter
            fill = np.rint(level * 10).clip(0, 10).astype(int)
            cuts = np.flatnonzero((np.diff(iw) != 0) | (np.diff(fill) != 0)) + 1
            bounds = [0, *cuts.tolist(), len(p) - 1]
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b > a and fill[a] > 0:
                    runs.append((int(fill[a]) * 255 // 10, int(iw[a]), p[a:b + 1].ravel().tolist()))
    runs.sort(key=lambda run: (run[0], run[1]))
    for fill, width, xy in runs:
        draw.line(xy, fill=fill, width=width, joint="curve" if width >= 3 else None)
    if ss > 1:
        canvas = canvas.reduce(ss).filter(ImageFilter.BoxBlur(0.5))
    else:  # no supersampling: soften the aliased edges instead
        canvas = canvas.filter(ImageFilter.BoxBlur(0.5) if min(h, w) < 1500 else ImageFilter.GaussianBlur(1.0))
    return np.array(canvas)  # a writable copy: lesions edit coverage in place


def _reflex_vessels(arteries: Sequence[_Vessel], geo: _Geometry) -> list[_Vessel]:
    """Arteries wide enough to show a central light reflex."""
    return [v for v in arteries if v.width[0] > 0.0075 * geo.r]


# ----------------------------------------------------------------------------
# Scene: the healthy picture, and the state lesions draw into
#
# Images are planar float32 (3, H, W) while being built (per-channel factors
# then broadcast over long rows, which numpy does much faster than over a
# trailing axis of 3) and become (H, W, 3) uint8 at the very end.
# ----------------------------------------------------------------------------


@dataclass
class _Scene:
    geo: _Geometry
    style: str
    arteries: list[_Vessel]
    veins: list[_Vessel]
    base: np.ndarray  # (3, H, W) float32 background before vessels
    disc_alpha: np.ndarray  # (H, W) float32 optic-disc opacity
    fov: np.ndarray  # (H, W) bool
    cov_a: np.ndarray | None = None  # (H, W) uint8 artery / vein coverage, artery reflex
    cov_v: np.ndarray | None = None
    reflex: np.ndarray | None = None
    img: np.ndarray | None = None  # (3, H, W) composite after vessels
    boxes: dict = field(default_factory=dict)  # artery? -> (n, 4) vessel bounding boxes (see _redraw)

    @property
    def shape(self) -> tuple[int, int]:
        return self.geo.h, self.geo.w


def _fundus_colour(pigmentation: float) -> np.ndarray:
    """Background RGB: light fundus orange-yellow, dark fundus brown-red."""
    light = np.array([0.93, 0.52, 0.26], np.float32)
    dark = np.array([0.66, 0.25, 0.10], np.float32)
    return light + (dark - light) * np.float32(pigmentation)


def _background(eye: Eye, geo: _Geometry, rng: np.random.Generator):
    """Background (choroidal glow, texture, falloff, macula, disc). Returns (rgb planar, disc_alpha)."""
    h, w = geo.h, geo.w
    dx = (np.arange(w, dtype=np.float32) - np.float32(geo.cx)) / np.float32(geo.r)
    dy = (np.arange(h, dtype=np.float32) - np.float32(geo.cy)) / np.float32(geo.r)
    rr2 = dx[None, :] ** 2 + dy[:, None] ** 2

    # Noise grids sized so features have a fixed size relative to the FOV.
    def grid(cells: float) -> tuple[int, int]:
        return max(2, round(cells * h / (2 * geo.r))), max(2, round(cells * w / (2 * geo.r)))

    low = _upsampled_noise(rng, grid(5), (h, w))  # uneven illumination
    mid = _upsampled_noise(rng, grid(18), (h, w))  # pigment mottling
    fine = _upsampled_noise(rng, grid(70), (h, w))  # granularity
    choroid = _upsampled_noise(rng, grid(26), (h, w))  # choroidal vessel pattern

    # Illumination: bright centre falling off toward the rim (~r^2.4), slightly uneven.
    illum = (1.0 - 0.5 * rr2 * (0.55 + 0.45 * rr2)) * (1.0 + 0.06 * low)
    # Tigroid pattern: bright ridges along the zero crossings of a smooth field,
    # stronger in light / older eyes and toward the periphery.
    tigroid = stable.exp(-(choroid * np.float32(1 / 0.35)) ** 2)
    tigroid *= np.sqrt(rr2) * np.float32(0.05 + 0.10 * (1 - eye.pigmentation) * (0.4 + eye.age))
    texture = illum * (0.03 * mid + 0.03 * fine - 0.6 * tigroid)
    colour = _fundus_colour(eye.pigmentation)
    rgb = _col(colour) * illum  # (3, H, W)
    rgb += _col(colour * np.array([0.7, 1.2, 1.4], np.float32)) * texture
    rgb += _col([0.25, 0.12, 0.04]) * tigroid

    _macula(rgb, eye, geo)
    disc_alpha = _optic_disc(rgb, eye, geo, fine, rng)
    return rgb, disc_alpha


def _macula(rgb: np.ndarray, eye: Eye, geo: _Geometry) -> None:
    """Darker macular region, darker fovea, foveal light reflex, faint ring reflex in the young."""
    fx, fy = geo.fovea
    dd = geo.dd
    win = _window((geo.h, geo.w), fx, fy, 3.2 * dd)
    if win is None:
        return
    sl, dx, dy = win
    d2 = (dx * dx + dy * dy) / np.float32(dd * dd)
    macula = stable.exp(-d2 / (2 * 0.95**2))
    fovea = stable.exp(-d2 / (2 * 0.22**2))
    crop = rgb[:, sl[0], sl[1]]
    crop *= 1 - _col([0.20, 0.33, 0.30]) * macula - _col([0.15, 0.22, 0.18]) * fovea
    reflex = stable.exp(-d2 / (2 * 0.035**2)) * (0.35 * (1 - 0.5 * eye.age))
    ring = stable.exp(-((np.sqrt(d2) - 1.25) / 0.1) ** 2) * (0.035 * (1 - eye.age))
    crop += _col([1.0, 0.95, 0.85]) * (reflex + ring)


def _optic_disc(rgb: np.ndarray, eye: Eye, geo: _Geometry, fine: np.ndarray, rng) -> np.ndarray:
    """Paint the disc (rim, cup, peripapillary crescent); returns its opacity (H, W)."""
    x, y = geo.disc
    alpha_full = np.zeros((geo.h, geo.w), np.float32)
    win = _window((geo.h, geo.w), x, y, 1.6 * geo.disc_rx, 1.6 * geo.disc_ry)
    if win is None:
        return alpha_full
    sl, dx, dy = win
    e = np.sqrt((dx / geo.disc_rx) ** 2 + (dy / geo.disc_ry) ** 2)
    # Peripapillary atrophy: a pale crescent on the temporal side, more with age.
    temporal = np.clip(-geo.side * dx / (np.hypot(dx, dy) + 1e-3), 0, 1)
    crescent = _smoothstep(1.0, 1.08, e) * _smoothstep(1.35, 1.12, e) * temporal**2 * (0.15 + 0.35 * eye.age)
    _paint(rgb, sl, crescent * rng.uniform(0.5, 1.0), (0.85, 0.62, 0.45))

    alpha = _smoothstep(1.07, 0.9, e)
    rim = _col([0.96, 0.60, 0.40]) * (1 + 0.06 * fine[sl])
    # The cup: paler, a little temporal of the disc centre, soft edged.
    cx = dx + np.float32(geo.side * 0.15 * geo.disc_rx)
    ec = np.sqrt((cx / geo.disc_rx) ** 2 + (dy / geo.disc_ry) ** 2) / geo.cup
    cup = _smoothstep(1.25, 0.7, ec)
    colour = rim + cup * (_col([1.0, 0.87, 0.68]) - rim)
    crop = rgb[:, sl[0], sl[1]]
    crop += alpha * (colour - crop)
    alpha_full[sl] = alpha
    return alpha_full


def _healthy_scene(eye: Eye, geo: _Geometry, style: str, rng) -> _Scene:
    frame = _Frame(geo.to_fov(*geo.fovea), geo.to_fov(*geo.disc), geo.dd / geo.r, geo.side)
    tree = _tree_to_px(_grow_tree(rng, frame, eye.vessel_density), geo)
    base, disc_alpha = _background(eye, geo, rng)
    yy, xx = np.ogrid[: geo.h, : geo.w]
    fov = (xx - geo.cx) ** 2 + (yy - geo.cy) ** 2 <= geo.r**2
    return _Scene(geo, style, _split(tree, True), _split(tree, False), base, disc_alpha, fov)


def _split(tree: list[_Vessel], artery: bool) -> list[_Vessel]:
    """The arteries (or veins) of a tree, parent indices renumbered within that list."""
    keep = [i for i, v in enumerate(tree) if v.artery == artery]
    new_index = {old: new for new, old in enumerate(keep)}
    return [replace(tree[i], parent=new_index.get(tree[i].parent, -1)) for i in keep]


def _draw_vessels(scene: _Scene) -> None:
    ss = _supersample(scene.geo)
    r = scene.geo.r
    scene.cov_a = _coverage(scene.arteries, scene.shape, (0, 0), ss, r)
    scene.cov_v = _coverage(scene.veins, scene.shape, (0, 0), ss, r)
    scene.reflex = _coverage(_reflex_vessels(scene.arteries, scene.geo), scene.shape, (0, 0), 1, r,
                             width_scale=0.3, core=False)


def _composite(scene: _Scene) -> None:
    """Lay the vessels over the background: blood absorbs, big arteries reflect a central streak."""
    scene.img = scene.base.copy()
    for c in range(3):  # table look-ups per channel are much faster than exp()
        scene.img[c] *= _T_VEIN[c][scene.cov_v]
        scene.img[c] *= _T_ARTERY[c][scene.cov_a]
    scene.img += _col([0.20, 0.17, 0.14]) * (scene.reflex * np.float32(1 / 255))


def _soften(img: np.ndarray, geo: _Geometry) -> np.ndarray:
    """Optical blur of a planar image, for large images only.

    Up to ~1000 px the layers are soft already (supersampled vessel edges,
    smooth lesion borders), as in a photo downscaled from the camera's
    resolution; at camera resolution the optics blur over a few pixels.
    """
    sigma = 0.45 * geo.r / 250
    if sigma <= 0.8:
        return img
    return ndimage.gaussian_filter(img, (0, sigma, sigma), mode="nearest")


def _noise_table(sigma: float) -> np.ndarray:
    """256 equiprobable quantiles of N(0, sigma): a random byte looked up here is ~Gaussian.

    (Drawing bytes is several times faster than drawing float normals.)
    """
    return (sigma * ndtri((np.arange(256) + 0.5) / 256)).astype(np.float32)


_NOISE_TABLE = _noise_table(1.8)  # sensor noise, 8-bit units


def _finish(scene: _Scene, eye: Eye, rng) -> np.ndarray:
    """Media haze, camera colour balance, FOV vignette, blur and sensor noise -> (H, W, 3) uint8."""
    geo = scene.geo
    # Haze (age) and the camera's colour balance are one affine map per channel.
    haze = 0.03 + 0.12 * eye.age
    gain = np.array([1.06, 0.93, 0.72] if scene.style == "idrid" else [0.97, 1.0, 1.05], np.float32)
    veil = np.array([0.62, 0.42, 0.30], np.float32) * haze
    img = scene.img * _col(gain * (1 - haze) * 255) + _col(veil * gain * 255)
    yy, xx = np.ogrid[: geo.h, : geo.w]
    rad = np.sqrt((xx - geo.cx) ** 2 + (yy - geo.cy) ** 2, dtype=np.float32)
    img *= np.clip(np.float32(geo.r + 0.5) - rad, 0, 1)  # anti-aliased FOV border
    img = _soften(img, geo)
    noise = np.take(_NOISE_TABLE, rng.integers(0, 256, img.shape, dtype=np.uint8))
    img += noise + np.float32(3.5)  # black level
    u8 = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(u8.transpose(1, 2, 0))

# ----------------------------------------------------------------------------
# Lesions
# ----------------------------------------------------------------------------


def _target_area(kind: str, geo: _Geometry, rng, jitter=(0.6, 1.7)) -> float:
    """Pixels a lesion aims to cover: target fraction x log-uniform jitter, with a floor."""
    j = math.exp(rng.uniform(math.log(jitter[0]), math.log(jitter[1])))
    floor = max(_MIN_FRACTION * geo.h * geo.w, 3.0)
    return max(_TARGET_FRACTION[kind] * geo.h * geo.w * j, floor)


def _harmonics(rng, n: int, strength: float) -> np.ndarray:
    """Random (amplitude, phase) rows for k = 2..n+1, amplitudes falling with k."""
    k = np.arange(2, n + 2)
    return np.stack([rng.uniform(0.3, 1.0, n) * strength / k, rng.uniform(0, 2 * np.pi, n)], 1)


def _blob_radius(area: float, harmonics: np.ndarray) -> float:
    """Mean radius of a `_blob` with these harmonics whose area is `area`.

    (Area of r(t) = r0 (1 + sum a_k cos(k t + p_k)) is pi r0^2 (1 + sum a_k^2 / 2).)
    """
    return math.sqrt(area / (math.pi * (1 + 0.5 * float((harmonics[:, 0] ** 2).sum()))))


def _sized(make: Callable[[float], tuple], area: float, fov: np.ndarray):
    """Call make(scale) -> (slices, alpha) and rescale once so the mask (alpha > 0.5) hits ~area."""
    out = make(1.0)
    if out is None:
        return None
    got = np.count_nonzero((out[1] > 0.5) & fov[out[0]])
    if got > 0 and abs(got / area - 1) > 0.3:
        out = make(float(np.clip(math.sqrt(area / got), 0.5, 2.0))) or out
    return out


def _random_spot(rng, geo: _Geometry, near: tuple[float, float], r_lo: float, r_hi: float,
                 avoid_disc: float = 1.0, max_fov: float = 0.85) -> tuple[float, float]:
    """A point r_lo..r_hi disc diameters from `near`, inside the FOV, away from the disc."""
    for _ in range(60):
        ang = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(r_lo, r_hi) * geo.dd
        x, y = near[0] + dist * math.cos(ang), near[1] + dist * math.sin(ang)
        in_fov = math.hypot(x - geo.cx, y - geo.cy) < max_fov * geo.r
        in_image = 2 <= x < geo.w - 2 and 2 <= y < geo.h - 2
        clear = math.hypot(x - geo.disc[0], y - geo.disc[1]) > avoid_disc * geo.dd
        if in_fov and in_image and clear:
            return x, y
    return geo.fovea


def _whitening(scene: _Scene, rng, area: float) -> np.ndarray:
    """Retinal whitening: an opaque pale-grey swelling of the posterior pole that spares the fovea."""
    geo = scene.geo
    fx, fy = geo.fovea
    cx = fx + geo.side * rng.uniform(0.2, 0.6) * geo.dd  # centred between fovea and disc
    cy = fy + rng.normal(0, 0.15) * geo.dd
    harm = _harmonics(rng, 6, 0.45)
    aspect = rng.uniform(1.0, 1.35)
    angle = rng.uniform(-0.3, 0.3)
    spared = math.pi * (0.375 * geo.dd) ** 2  # the fovea is left out of the mask
    radius0 = _blob_radius(area + spared, harm)
    cloud_seed = rng.integers(2**31)
    opacity = rng.uniform(0.55, 0.72)

    def make(scale: float):
        # The border is soft over tens of pixels: evaluate on a coarse grid and upsample.
        rad = radius0 * scale
        win = _window(scene.shape, cx, cy, 1.3 * rad * math.sqrt(aspect) * 1.3)
        if win is None:
            return None
        sl, dx, dy = win
        f = max(1, int(rad / 30))
        cdx, cdy = dx[:, ::f], dy[::f, :]
        jitter = 0.08 * _upsampled_noise(np.random.default_rng(cloud_seed), (9, 9), (cdy.shape[0], cdx.shape[1]))
        alpha = _blob(cdx, cdy, rad, aspect, angle, harm, 0.18, jitter)
        spare = _smoothstep(0.25 * geo.dd, 0.5 * geo.dd, np.hypot(cdx + np.float32(cx - fx), cdy + np.float32(cy - fy)))
        alpha = np.asarray(Image.fromarray(alpha * spare).resize((dx.shape[1], dy.shape[0]), Image.BILINEAR))
        return sl, alpha * (1 - scene.disc_alpha[sl])

    sl, alpha = _sized(make, area, scene.fov)
    cloud = _upsampled_noise(rng, (14, 14), alpha.shape)
    strength = alpha * opacity * (0.85 + 0.12 * cloud)
    _paint(scene.base, sl, strength, (0.86, 0.82, 0.78))
    return _crop_mask(scene.shape, sl, alpha)


def _cherry_red(scene: _Scene, rng, area: float) -> np.ndarray:
    """Cherry-red spot: the fovea shows as a small, deep-red round spot."""
    geo = scene.geo
    rad = math.sqrt(area / math.pi)
    win = _window(scene.shape, *geo.fovea, 2 * rad + 2)
    sl, dx, dy = win
    alpha = _blob(dx, dy, rad, rng.uniform(1.0, 1.15), rng.uniform(0, np.pi), _harmonics(rng, 3, 0.1), 0.3)
    _paint(scene.img, sl, alpha * 0.9, (0.50, 0.05, 0.05))
    return _crop_mask(scene.shape, sl, alpha)


def _arc_length(pts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T))])


def _densify(v: _Vessel, step: float) -> _Vessel:
    """The same vessel resampled at `step` pixels (for calibre patterns finer than the polyline)."""
    s = _arc_length(v.pts)
    t = np.arange(0, s[-1] + 1e-9, step)
    pts = np.stack([np.interp(t, s, v.pts[:, 0]), np.interp(t, s, v.pts[:, 1])], 1)
    return replace(v, pts=pts, width=np.interp(t, s, v.width))


def _redraw(scene: _Scene, kind_artery: bool, changed: dict[int, _Vessel], box: tuple[float, float, float, float]):
    """Redraw one vessel class inside box=(x0, y0, x1, y1) with some vessels replaced.

    Writes the new coverage into the interior of the box (the border band is left
    alone: blur there differs from the full-frame drawing). Returns the slices written.
    """
    geo = scene.geo
    ss = _supersample(geo)
    margin = 4
    x0, y0 = max(0, int(box[0]) - margin), max(0, int(box[1]) - margin)
    x1, y1 = min(geo.w, int(box[2]) + margin + 1), min(geo.h, int(box[3]) + margin + 1)
    vessels = scene.arteries if kind_artery else scene.veins
    if kind_artery not in scene.boxes:
        scene.boxes[kind_artery] = np.array([[*(v.pts.min(0) - v.width.max() - 2), *(v.pts.max(0) + v.width.max() + 2)]
                                             for v in vessels])
    b = scene.boxes[kind_artery]
    hits = np.flatnonzero((b[:, 2] >= x0) & (b[:, 0] <= x1) & (b[:, 3] >= y0) & (b[:, 1] <= y1))
    drawn = [changed.get(int(i), vessels[i]) for i in hits]  # a changed vessel keeps its extent
    shape = (y1 - y0, x1 - x0)
    cov = _coverage(drawn, shape, (x0, y0), ss, geo.r)
    inner = (slice(margin, shape[0] - margin), slice(margin, shape[1] - margin))
    target = (slice(y0 + margin, y1 - margin), slice(x0 + margin, x1 - margin))
    if kind_artery:
        scene.cov_a[target] = cov[inner]
        refl = _coverage(_reflex_vessels(drawn, geo), shape, (x0, y0), 1, geo.r, width_scale=0.3, core=False)
        scene.reflex[target] = refl[inner]
    else:
        scene.cov_v[target] = cov[inner]
    return target


def _stroke_mask(shape: tuple[int, int], pts: np.ndarray, width: float):
    """Bool mask of a polyline drawn `width` pixels wide; returns (slices, mask) of its bounding crop."""
    pad = width / 2 + 2
    x0, y0 = (np.maximum(0, np.floor(pts.min(0) - pad))).astype(int)
    x1 = min(shape[1], int(pts[:, 0].max() + pad) + 1)
    y1 = min(shape[0], int(pts[:, 1].max() + pad) + 1)
    canvas = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    xy = (pts - (x0, y0)).ravel().tolist()
    ImageDraw.Draw(canvas).line(xy, fill=255, width=max(1, int(round(width))), joint="curve")
    return (slice(y0, y1), slice(x0, x1)), np.asarray(canvas)[: y1 - y0, : x1 - x0] > 0


def _beading(rng, s: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Calibre factors along arc length s of a beaded ("box-carring") artery stretch.

    Random-length segments of narrowed, near-normal and blank (no blood column)
    vessel. Returns (factor, blank) arrays like s.
    """
    period = rng.uniform(3.0, 5.0) * width
    n = int((s[-1] - s[0]) / (0.35 * period)) + 2
    ends = s[0] + np.cumsum(period * rng.uniform(0.35, 0.8, n))
    states = rng.choice(3, n, p=[0.45, 0.3, 0.25])
    levels = np.stack([rng.uniform(0.55, 0.75, n), rng.uniform(1.15, 1.4, n), np.zeros(n)])
    seg = np.minimum(np.searchsorted(ends, s, side="right"), n - 1)
    factor = ndimage.uniform_filter1d(levels[states[seg], seg], 3)
    return factor, states[seg] == 2


def _segmental_change(scene: _Scene, rng, area: float) -> np.ndarray:
    """Vessel segmental change: beaded artery stretches (narrowed, normal, blank segments)."""
    geo = scene.geo
    mask = np.zeros(scene.shape, bool)
    cand = [i for i, v in enumerate(scene.arteries) if v.depth == 0] or list(range(len(scene.arteries)))
    weights = np.array([len(scene.arteries[i].pts) * scene.arteries[i].width[0] for i in cand], float)
    order = rng.choice(cand, size=len(cand), replace=False, p=weights / weights.sum())
    got = 0
    changed: dict[int, _Vessel] = {}
    box = [np.inf, np.inf, -np.inf, -np.inf]
    for idx in order[:4]:
        v = _densify(scene.arteries[idx], 0.5)
        s = _arc_length(v.pts)
        dist_disc = np.hypot(v.pts[:, 0] - geo.disc[0], v.pts[:, 1] - geo.disc[1])
        dist_centre = np.hypot(v.pts[:, 0] - geo.cx, v.pts[:, 1] - geo.cy)
        ok = np.flatnonzero((dist_disc > 0.9 * geo.dd) & (dist_centre < 0.8 * geo.r))
        if ok.size < 10:
            continue
        mean_w = float(v.width[ok].mean())
        pad = max(1.0, 0.4 * mean_w)
        need = (area - got) / (mean_w + 2 * pad)  # stretch length that gives the remaining area
        i0 = int(ok[rng.integers(0, max(1, ok.size // 4))])  # near the disc, where it is wide
        i1 = min(int(np.searchsorted(s, s[i0] + need)), int(ok[-1]), len(s) - 1)
        if i1 - i0 < 6:
            continue
        seg = slice(i0, i1 + 1)
        factor, blank = _beading(rng, s[seg], float(v.width[i0]))
        width = v.width.copy()
        width[seg] *= factor
        x0, y0 = v.pts[seg].min(0) - 3 * v.width.max()
        x1, y1 = v.pts[seg].max(0) + 3 * v.width.max()
        changed[int(idx)] = replace(v, width=width)
        box = [min(box[0], x0), min(box[1], y0), max(box[2], x1), max(box[3], y1)]
        # Where the blood column is missing, a pale, sheathed vessel wall remains.
        if blank.any():
            wall = replace(v, pts=v.pts[seg], width=np.where(blank, v.width[seg] * 0.9, 0.0))
            x0i, y0i = int(max(0, x0)), int(max(0, y0))
            shape = (int(min(geo.h, y1)) - y0i + 1, int(min(geo.w, x1)) - x0i + 1)
            pale = _coverage([wall], shape, (x0i, y0i), _supersample(geo), 1e-6, core=False) * np.float32(0.55 / 255)
            sl = (slice(y0i, y0i + shape[0]), slice(x0i, x0i + shape[1]))
            _paint(scene.base, sl, pale[: shape[0], : shape[1]], (0.93, 0.80, 0.66))
        sl, stroke = _stroke_mask(scene.shape, v.pts[seg], mean_w + 2 * pad)
        mask[sl] |= stroke
        got = int(np.count_nonzero(mask))
        if got >= 0.8 * area:
            break
    if changed:
        _redraw(scene, True, changed, tuple(box))
    return mask & scene.fov


def _crossings(scene: _Scene) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Artery-over-vein crossings: (artery index, point, vein index, point, location).

    Candidate segment pairs come from a k-d tree of polyline points; a pair
    crosses when the two segments intersect at a clear angle. One crossing is
    kept per artery-vein pair.
    """
    def flat(vessels):
        pts = np.vstack([v.pts for v in vessels])
        who = np.concatenate([np.full(len(v.pts), i) for i, v in enumerate(vessels)])
        at = np.concatenate([np.arange(len(v.pts)) for v in vessels])
        last = np.concatenate([np.arange(len(v.pts)) == len(v.pts) - 1 for v in vessels])
        return pts, who, at, last

    a_pts, a_who, a_at, a_last = flat(scene.arteries)
    v_pts, v_who, v_at, v_last = flat(scene.veins)
    pairs = cKDTree(a_pts).query_ball_tree(cKDTree(v_pts), r=1.5 * _STEP * scene.geo.r)
    i = np.repeat(np.arange(len(pairs)), [len(p) for p in pairs])
    j = np.fromiter((k for p in pairs for k in p), int, count=len(i))
    keep = ~a_last[i] & ~v_last[j]  # segment k runs from point k to k + 1 of the same vessel
    i, j = i[keep], j[keep]
    p, d1 = a_pts[i], a_pts[i + 1] - a_pts[i]
    r, d2 = v_pts[j], v_pts[j + 1] - v_pts[j]
    den = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    den = np.where(np.abs(den) < 1e-9, 1e-9, den)
    t = ((r[:, 0] - p[:, 0]) * d2[:, 1] - (r[:, 1] - p[:, 1]) * d2[:, 0]) / den
    u = ((r[:, 0] - p[:, 0]) * d1[:, 1] - (r[:, 1] - p[:, 1]) * d1[:, 0]) / den
    cos = np.abs((d1 * d2).sum(1)) / (np.hypot(*d1.T) * np.hypot(*d2.T) + 1e-9)
    hit = np.flatnonzero((t >= 0) & (t <= 1) & (u >= 0) & (u <= 1) & (cos < 0.85))
    found = {}
    for k in hit:
        key = (int(a_who[i[k]]), int(v_who[j[k]]))
        if key not in found:
            found[key] = (key[0], int(a_at[i[k]]), key[1], int(v_at[j[k]]), p[k] + t[k] * d1[k])
    return list(found.values())


def _av_crossing(scene: _Scene, rng, area: float) -> np.ndarray:
    """AV nicking at an artery-over-vein crossing; mask = the crossing neighbourhood.

    The thickened, semi-opaque wall of the artery (a pale sheath) hides the
    vein, which tapers to a thread on both sides of the artery; distal to the
    crossing the congested vein is dilated (banking).
    """
    geo = scene.geo
    good = []
    for ai, ap, vi, vp, loc in _crossings(scene):
        wa, wv = scene.arteries[ai].width[ap], scene.veins[vi].width[vp]
        far = math.hypot(loc[0] - geo.disc[0], loc[1] - geo.disc[1]) > 1.0 * geo.dd
        inside = math.hypot(loc[0] - geo.cx, loc[1] - geo.cy) < 0.85 * geo.r
        if far and inside:
            good.append((wa * wv, ai, ap, vi, vp, loc))
    if not good:  # should not happen with a normal tree; mark a vein stretch instead
        vi = int(np.argmax([len(v.pts) for v in scene.veins]))
        vp = len(scene.veins[vi].pts) // 3
        good = [(0.0, -1, 0, vi, vp, scene.veins[vi].pts[vp])]
    good.sort(key=lambda g: -g[0])
    _, ai, ap, vi, vp, loc = good[int(rng.integers(0, min(4, len(good))))]
    wa = scene.arteries[ai].width[ap] if ai >= 0 else 2.0
    vein = _densify(scene.veins[vi], 0.5)
    s = _arc_length(vein.pts)
    s0 = s[int(np.argmin(np.hypot(*(vein.pts - loc).T)))]
    d = s - s0  # signed distance along the vein; > 0 is distal (away from the disc)
    wv = float(np.interp(s0, s, vein.width))
    taper = rng.uniform(2.5, 4.0) * wv
    nick = stable.power(np.clip((np.abs(d) - 0.5 * wa) / taper, 0, 1), 0.8, np.float64)
    factor = 0.05 + 0.95 * nick
    bank = rng.uniform(0.4, 0.6) * stable.exp(-((d - taper - 4.0 * wv) / (4.0 * wv)) ** 2, np.float64)
    factor = factor + bank
    new = replace(vein, width=vein.width * factor)
    rad = math.sqrt(area / math.pi)
    reach = max(rad, taper + 8 * wv)
    _redraw(scene, False, {vi: new}, (loc[0] - reach, loc[1] - reach, loc[0] + reach, loc[1] + reach))
    if ai >= 0:
        _arterial_sheath(scene, scene.arteries[ai], loc, rad, wa)
    win = _window(scene.shape, loc[0], loc[1], rad + 1)
    sl, dx, dy = win
    mask = np.zeros(scene.shape, bool)
    mask[sl] = dx * dx + dy * dy <= rad * rad
    return mask & scene.fov


def _arterial_sheath(scene: _Scene, artery: _Vessel, loc: np.ndarray, rad: float, wa: float) -> None:
    """A pale, semi-opaque sheath round the artery near a crossing that hides the vein under it."""
    near = np.flatnonzero(np.hypot(*(artery.pts - loc).T) < 0.45 * rad)
    if near.size < 2:
        return
    part = replace(artery, pts=artery.pts[near[0]:near[-1] + 1], width=np.full(near[-1] - near[0] + 1, 2.3 * wa))
    x0, y0 = np.maximum(0, np.floor(part.pts.min(0) - 3 * wa - 2)).astype(int)
    x1, y1 = np.ceil(part.pts.max(0) + 3 * wa + 2).astype(int)
    x1, y1 = min(scene.geo.w, x1), min(scene.geo.h, y1)
    sheath = _coverage([part], (y1 - y0, x1 - x0), (x0, y0), _supersample(scene.geo), 1e-6, core=False)
    sl = (slice(y0, y1), slice(x0, x1))
    scene.cov_v[sl] = (scene.cov_v[sl] * (1 - 0.85 * sheath / 255.0)).astype(np.uint8)
    _paint(scene.base, sl, sheath * np.float32(0.15 / 255), (0.90, 0.74, 0.60))


def _haemorrhage(scene: _Scene, rng, area: float) -> np.ndarray:
    """Dark-red dot/blot haemorrhages and flame-shaped streaks along the nerve fibres."""
    geo = scene.geo
    n = int(rng.integers(3, 8))
    shares = rng.dirichlet(np.full(n, 1.5)) * area
    mask = np.zeros(scene.shape, bool)
    for a in shares:
        x, y = _random_spot(rng, geo, geo.fovea, 0.8, 3.3)
        flame = rng.random() < 0.5
        fibre = math.atan2(y - geo.disc[1], x - geo.disc[0])  # nerve fibres run radially from the disc
        harm = _harmonics(rng, 4, 0.35 if not flame else 0.12)
        aspect = rng.uniform(2.5, 4.0) if flame else rng.uniform(1.0, 1.4)
        angle = fibre + rng.normal(0, 0.15) if flame else rng.uniform(0, np.pi)
        colour = (0.55, 0.07, 0.05) if flame else (0.38, 0.04, 0.03)
        phase = rng.uniform(0, 2 * np.pi)

        def make(scale, a=a, x=x, y=y, harm=harm, aspect=aspect, angle=angle, flame=flame, phase=phase):
            rad = _blob_radius(a, harm) * scale
            win = _window(scene.shape, x, y, rad * math.sqrt(aspect) * 1.6 + 2)
            if win is None:
                return None
            sl, dx, dy = win
            alpha = _blob(dx, dy, rad, aspect, angle, harm, 0.25)
            if flame:  # taper toward the far end and striate along the fibres
                c, s_ = math.cos(angle), math.sin(angle)
                u = (dx * c + dy * s_) / (rad * math.sqrt(aspect))
                v = (-dx * s_ + dy * c) / (rad / math.sqrt(aspect))
                alpha = alpha * _smoothstep(1.0, 0.3, u + 0.6 * np.abs(v)) * (0.8 + 0.2 * stable.cos(2.5 * v + phase))
                alpha = np.clip(alpha * 1.3, 0, 1)
            return sl, alpha

        out = _sized(make, a, scene.fov)
        if out is None:
            continue
        sl, alpha = out
        core = np.clip(alpha * 1.4 - 0.4, 0, 1)  # darker centre
        _paint(scene.img, sl, alpha * 0.9, colour)
        _paint(scene.img, sl, core * 0.35, (0.25, 0.02, 0.02))
        mask[sl] |= alpha > 0.5
    return mask & scene.fov


def _cotton_wool(scene: _Scene, rng, area: float) -> np.ndarray:
    """Fluffy white-grey patches with feathery edges near the temporal arcades."""
    geo = scene.geo
    arcades = [v for v in scene.veins + scene.arteries if v.temporal and len(v.pts) > 30]
    typical = math.pi * (0.33 * geo.dd) ** 2  # a spot is a quarter to half a disc diameter across
    n = int(np.clip(round(area / typical * rng.uniform(0.7, 1.3)), 2, 10))
    shares = rng.dirichlet(np.full(n, 3.0)) * area
    mask = np.zeros(scene.shape, bool)
    for a in shares:
        v = arcades[int(rng.integers(len(arcades)))]
        i = int(rng.integers(8, min(len(v.pts) - 1, 70)))
        normal = np.array([-(v.pts[i + 1, 1] - v.pts[i, 1]), v.pts[i + 1, 0] - v.pts[i, 0]])
        normal /= math.hypot(*normal) + 1e-9  # not np.linalg.norm: BLAS kernels differ per CPU
        harm = _harmonics(rng, 6, 0.5)
        rad0 = _blob_radius(a, harm)
        x, y = v.pts[i] + normal * rng.uniform(-1.2, 1.2) * rad0
        fibre = math.atan2(y - geo.disc[1], x - geo.disc[0])
        aspect = rng.uniform(1.2, 1.9)
        fluff_seed = rng.integers(2**31)

        def make(scale, x=x, y=y, rad0=rad0, harm=harm, aspect=aspect, fibre=fibre, fluff_seed=fluff_seed):
            rad = rad0 * scale
            win = _window(scene.shape, x, y, rad * math.sqrt(aspect) * 2.4 + 3)
            if win is None:
                return None
            sl, dx, dy = win
            cells = (min(max(3, dy.shape[0] // 7), 16), min(max(3, dx.shape[1] // 7), 16))
            fluff = _upsampled_noise(np.random.default_rng(fluff_seed), cells, (dy.shape[0], dx.shape[1]))
            return sl, _blob(dx, dy, rad, aspect, fibre, harm, 0.4, 0.28 * fluff)

        out = _sized(make, a, scene.fov)
        if out is None:
            continue
        sl, alpha = out
        # Opaque, slightly lumpy centre fading into feathery, translucent edges.
        body = stable.power(alpha, 0.8) * (0.74 + 0.14 * _upsampled_noise(rng, (5, 5), alpha.shape))
        _paint(scene.img, sl, np.clip(body, 0, 0.92), (0.90, 0.86, 0.78))
        mask[sl] |= alpha > 0.5
    return mask & scene.fov


def _embolus(scene: _Scene, rng, area: float) -> np.ndarray:
    """A bright yellow refractile plaque lodged in an artery, at a bifurcation if one is handy."""
    geo = scene.geo
    spots = []
    for v in scene.arteries:
        if v.parent < 0:
            continue
        parent = scene.arteries[v.parent]
        p = parent.pts[v.branch_at]
        ok_disc = math.hypot(p[0] - geo.disc[0], p[1] - geo.disc[1]) > 0.8 * geo.dd
        ok_fov = math.hypot(p[0] - geo.cx, p[1] - geo.cy) < 0.85 * geo.r
        if ok_disc and ok_fov and parent.width[v.branch_at] > 0.004 * geo.r:
            spots.append((parent, v.branch_at))
    if not spots:
        big = max(scene.arteries, key=lambda v: len(v.pts))
        spots = [(big, len(big.pts) // 3)]
    vessel, i = spots[int(rng.integers(len(spots)))]
    i = min(i, len(vessel.pts) - 2)
    direction = vessel.pts[i + 1] - vessel.pts[i]
    angle = math.atan2(direction[1], direction[0])
    across = max(0.75 * float(vessel.width[i]), 0.9)  # plaques look wider than the vessel
    along = max(area / (math.pi * across), across * 1.2)
    x, y = vessel.pts[i] + direction / (math.hypot(*direction) + 1e-9) * along * 0.4
    win = _window(scene.shape, x, y, along + 3)
    sl, dx, dy = win
    aspect = along / across
    alpha = _blob(dx, dy, math.sqrt(along * across), aspect, angle, _harmonics(rng, 2, 0.1), 0.3)
    _paint(scene.img, sl, alpha * 0.95, (1.0, 0.90, 0.52))
    glint = _blob(dx + np.float32(0.2 * across), dy + np.float32(0.2 * across),
                  0.5 * math.sqrt(along * across), aspect, angle, np.zeros((0, 2)), 0.5)
    _paint(scene.img, sl, glint * 0.7, (1.0, 1.0, 0.92))
    mask = _crop_mask(scene.shape, sl, alpha)
    if not mask.any():
        mask[int(round(y)), int(round(x))] = True
    return mask & scene.fov


def _neovascularisation(scene: _Scene, rng, area: float) -> np.ndarray:
    """A tangle of fine tortuous new vessels on the disc (NVD) or along a temporal arcade (NVE)."""
    geo = scene.geo
    if rng.random() < 0.5:
        x, y = geo.disc
    else:
        v = max((v for v in scene.veins if v.temporal), key=lambda v: len(v.pts))
        i = int(rng.integers(int(0.2 * len(v.pts)), int(0.6 * len(v.pts))))
        x, y = v.pts[i]
    reach = max(math.sqrt(area / math.pi) * 1.5, 4.0)
    win = _window(scene.shape, x, y, reach + 4)
    sl, dx, dy = win
    ss = 4 if geo.h * geo.w <= 2_500_000 else 2
    h, w = dy.shape[0], dx.shape[1]
    ox, oy = float(dx[0, 0]), float(dy[0, 0])  # crop origin relative to the centre
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, int(round(0.0032 * geo.r * ss)))
    step = 0.09 * reach
    mask = np.zeros((h, w), bool)
    for n in range(120):
        # One new vessel: a random walk with strong, drifting curvature (loops).
        p = rng.normal(0, 0.45 * reach, 2)
        th, k = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.5)
        pts = [p.copy()]
        for e in rng.normal(0, 0.45, int(rng.integers(8, 22))):
            k = 0.7 * k + e
            th += k
            p = p + step * np.array([math.cos(th), math.sin(th)])
            if np.hypot(*p) > reach:  # turn back toward the centre of the tuft
                th = math.atan2(-p[1], -p[0]) + rng.normal(0, 0.5)
                p = pts[-1].copy()
            pts.append(p.copy())
        xy = ((np.array(pts) - (ox, oy) + 0.5) * ss - 0.5).ravel().tolist()
        draw.line(xy, fill=255, width=width, joint="curve")
        if n % 4 == 3:
            cov = np.asarray(canvas.reduce(ss)) > 60
            mask = ndimage.binary_dilation(cov) & scene.fov[sl]
            if mask.sum() >= area:
                break
    cov = np.asarray(canvas.reduce(ss).filter(ImageFilter.GaussianBlur(0.4)), np.float32) / 255
    scene.img[:, sl[0], sl[1]] *= stable.exp(-_K_NEW_VESSEL.reshape(3, 1, 1) * np.clip(cov * 1.6, 0, 1.2))
    full = np.zeros(scene.shape, bool)
    full[sl] = mask
    return full


def _hard_exudate(scene: _Scene, rng, area: float) -> np.ndarray:
    """Small, sharply bordered bright yellow dots in a cluster or a circinate ring."""
    geo = scene.geo
    cx, cy = _random_spot(rng, geo, geo.fovea, 0.7, 2.0, max_fov=0.8)
    ring = rng.random() < 0.6
    dots = []
    got = 0.0
    while got < area * 1.1 and len(dots) < 400:
        if ring:
            ang = rng.uniform(0, rng.uniform(3.5, 6.0))
            rr = geo.dd * rng.uniform(0.35, 0.6) * rng.normal(1, 0.08)
            x, y = cx + rr * math.cos(ang), cy + rr * math.sin(ang)
        else:
            x, y = cx + rng.normal(0, 0.3 * geo.dd), cy + rng.normal(0, 0.3 * geo.dd)
        r = max(0.9, rng.uniform(0.003, 0.0075) * geo.r)
        dots.append((x, y, r))
        got += math.pi * r * r
        for _ in range(int(rng.integers(0, 3))):  # small clumps
            r2 = max(0.8, r * rng.uniform(0.5, 0.9))
            dots.append((x + rng.normal(0, 1.5 * r), y + rng.normal(0, 1.5 * r), r2))
            got += math.pi * r2 * r2
    sl, alpha = _dots(scene.shape, np.array(dots))
    _paint(scene.img, sl, alpha * 0.95, (0.98, 0.90, 0.48))
    return _crop_mask(scene.shape, sl, alpha) & scene.fov


def _microaneurysm(scene: _Scene, rng, area: float) -> np.ndarray:
    """Tiny dark-red round dots scattered around the macula."""
    geo = scene.geo
    dots = []
    got = 0.0
    while got < area and len(dots) < 300:
        x, y = _random_spot(rng, geo, geo.fovea, 0.5, 2.6, max_fov=0.85)
        r = max(0.9, rng.uniform(0.004, 0.008) * geo.r)
        dots.append((x, y, r))
        got += math.pi * r * r
    sl, alpha = _dots(scene.shape, np.array(dots))
    _paint(scene.img, sl, alpha * 0.9, (0.40, 0.03, 0.03))
    return _crop_mask(scene.shape, sl, alpha) & scene.fov


# kind -> (compositing stage, painter(scene, rng, target area) -> mask)
_LESIONS: dict[str, tuple[str, Callable]] = {
    "retinal_whitening": (_BASE, _whitening),
    "cherry_red_spot": (_TOP, _cherry_red),
    "vessel_segmental_change": (_VESSELS, _segmental_change),
    "haemorrhage": (_TOP, _haemorrhage),
    "cotton_wool_spot": (_TOP, _cotton_wool),
    "embolus": (_TOP, _embolus),
    "av_crossing": (_VESSELS, _av_crossing),
    "neovascularisation": (_TOP, _neovascularisation),
    "hard_exudate": (_TOP, _hard_exudate),
    "microaneurysm": (_TOP, _microaneurysm),
}
_JITTER = {"retinal_whitening": (0.75, 1.3)}
assert set(_LESIONS) == set(symptoms.FUNDUS_KINDS), "lesion painters out of step with mmrad.data.symptoms"


def _apply_lesions(scene: _Scene, eye: Eye, kinds: list[str], stage: str, masks: dict[str, np.ndarray],
                   area_scale: float = 1.0) -> None:
    """Paint every requested kind of one stage; each kind draws from its own sub-stream."""
    seeds = eye.rng("lesions-fundus").integers(0, 2**63, len(symptoms.FUNDUS_KINDS))
    for kind in kinds:
        kind_stage, painter = _LESIONS[kind]
        if kind_stage != stage:
            continue
        rng = np.random.default_rng(seeds[symptoms.FUNDUS_KINDS.index(kind)])
        area = _target_area(kind, scene.geo, rng, _JITTER.get(kind, (0.6, 1.7))) * area_scale
        mask = painter(scene, rng, area)
        if not mask.any():  # never return an empty mask: mark the lesion's nominal site
            mask[int(round(scene.geo.fovea[1])) % scene.geo.h, int(round(scene.geo.fovea[0])) % scene.geo.w] = True
        masks[kind] = mask


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def render_fundus(eye: Eye, size: tuple[int, int], lesions: Sequence[str] = (), style: str = "visucam",
                  area_scale: float = 1.0) -> Rendered:
    """Render a colour fundus photograph of `eye` at size=(H, W) with the given lesion kinds.

    style "visucam" (MMR, Zeiss VISUCAM: whole circular FOV) or "idrid" (Kowa:
    FOV cut at top and bottom, warmer colour balance). Returns a ``Rendered``
    with the RGB uint8 image, one bool mask per lesion kind and the "fov" and
    "optic_disc" anatomy masks. ``area_scale`` multiplies every lesion's target
    area (the benchmark's lesion size, ``synthetic.mmr.lesions``). Deterministic
    in (eye, size, lesions, style, area_scale).
    """
    h, w, kinds = check_request("fundus", size, lesions, style, STYLES, symptoms.FUNDUS_KINDS)

    rng = eye.rng("fundus")
    geo = _geometry(eye, h, w, style, rng)
    scene = _healthy_scene(eye, geo, style, rng)
    masks: dict[str, np.ndarray] = {}
    _apply_lesions(scene, eye, kinds, _BASE, masks, area_scale)
    _draw_vessels(scene)
    _apply_lesions(scene, eye, kinds, _VESSELS, masks, area_scale)
    _composite(scene)
    _apply_lesions(scene, eye, kinds, _TOP, masks, area_scale)
    image = _finish(scene, eye, rng)
    return Rendered(image=image, lesions={k: masks[k] for k in kinds},
                    anatomy={"fov": scene.fov.copy(), "optic_disc": (scene.disc_alpha >= 0.5) & scene.fov})
