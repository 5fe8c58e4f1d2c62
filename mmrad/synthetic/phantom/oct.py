"""Synthetic SD-OCT B-scan (one horizontal line through the macula) with lesion masks.

Layer model
-----------
Every column of the image is one A-scan. The retina is described by 14
*boundary curves* ``b[k](x)`` (row positions, float, one value per column) that
split each A-scan into 15 *layers*, top to bottom::

     k  boundary below layer k          layer k (what it looks like on OCT)
     0  ILM                             vitreous   (no signal, noise only)
     1  RNFL / GCL                      RNFL       bright, thick nasally, ~0 at the fovea
     2  GCL / IPL                       GCL        medium-dark
     3  IPL / INL                       IPL        medium-bright
     4  INL / OPL                       INL        dark
     5  OPL / ONL                       OPL        medium-bright, thin
     6  ELM                             ONL        dark, thickest, thicker at the fovea
     7  EZ top                          myoid zone dark-ish (the ELM is a thin line on top)
     8  EZ bottom                       EZ         bright line (ellipsoid zone)
     9  IZ top                          OS         outer segments, darker
    10  IZ bottom                       IZ         interdigitation zone, fainter line
    11  RPE top                         (gap)      a few micrometres, dark
    12  Bruch's membrane                RPE        brightest band
    13  choroid / sclera                choroid    medium, granular, dark vessel lumens
        (image bottom)                  sclera     darker, fading with depth

The boundaries are built from the bottom up: Bruch's membrane is a gently
curved (bowl + tilt) wavy line, and each layer thickness (micrometres, a
function of the signed distance from the fovea in millimetres) is stacked on
top of it. The inner layers (RNFL..INL) are multiplied by a smooth "pit"
profile that goes to ~0 at the fovea; the ONL and the outer segments bulge
there instead. Every boundary gets its own small smooth undulation.

Reflectivity is handled in decibels. Each layer has a per-column level
``layer_db[k](x)``; the image is the sum of anti-aliased steps (one per
boundary, computed only in the rows the boundary spans), plus the ELM line,
a Bruch-relative choroid texture (vessel lumens), retinal vessels with their
shadows, then attenuation with depth. Finally the linear signal plus a noise
floor is multiplied by speckle (exponential intensity, horizontally
correlated, scaled in log space per style) and log-compressed into uint8.

Lesions (``mmrad.data.symptoms.OCT_KINDS``) work in two phases: first they edit
the boundary curves / layer levels inside a compact column window (exactly
zero outside it), then, after the layers are rendered, they paint their own
2-D structure (cysts, membranes, fluid) and return their pixel mask. Every
draw for the healthy eye comes from ``eye.rng("oct")`` in a fixed order and
the speckle field is drawn regardless of lesions, so columns away from a
lesion are byte-identical with and without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import beta

from mmrad.data.symptoms import MMR_OCT, OCT_KINDS, RESC_LESIONS
from mmrad.synthetic.phantom import stable
from mmrad.synthetic.phantom.eye import Eye, Rendered, check_request

__all__ = ["render_oct"]

F32 = np.float32

# Layer / boundary indices (see the module docstring).
VITREOUS, RNFL, GCL, IPL, INL, OPL, ONL, MYOID, EZ, OS, IZ, GAP, RPE, CHOROID, SCLERA = range(15)
B_ILM, B_RNFL, B_GCL, B_IPL, B_INL, B_OPL, B_ELM, B_EZ_TOP, B_EZ_BOT, B_IZ_TOP, B_IZ_BOT, B_RPE_TOP, B_BRUCH, B_CSI = range(14)
N_BOUNDARIES = 14

# Healthy reflectivity of each layer in dB relative to the RPE.
_LAYER_DB = np.array(
    [-60.0, -7.0, -17.0, -11.0, -21.0, -12.0, -25.0, -20.0, -3.5, -17.0, -8.5, -16.0, 0.0, -11.0, -17.0],
    dtype=F32,
)

# Lesion look-up: target pixel fraction of each kind (MMR table first, else RESC).
_TARGET_FRACTION = {s.kind: s.target_fraction for s in RESC_LESIONS.values()}
_TARGET_FRACTION.update({s.kind: s.target_fraction for s in MMR_OCT.values()})
_MIN_FRACTION = 0.00015  # floor so tiny lesions survive downsampling to 256x256


@dataclass(frozen=True)
class _Style:
    """Device look. Depth/width in mm; levels in dB relative to the RPE."""

    scan_mm: float  # lateral extent of the B-scan
    depth_mm: float  # axial extent of the image
    bruch_row: float  # mean row of Bruch's membrane under the fovea, fraction of H
    bruch_row_sd: float
    bowl: tuple[float, float]  # range of the edge rise (fraction of H)
    tilt: float  # max |tilt| (fraction of H across the width)
    speckle: float  # speckle strength (scale of log-speckle)
    noise_db: float  # noise floor
    black_db: float  # level mapped to 0
    white_db: float  # level mapped to 255
    shadow_db: float  # vessel shadow depth


_STYLES = {
    # Heidelberg Spectralis: averaged frames -> moderate speckle, black vitreous, crisp layers.
    "spectralis": _Style(6.5, 1.92, 0.56, 0.035, (0.02, 0.07), 0.05, 0.8, -36.0, -31.0, 1.0, 6.0),
    # Zeiss Cirrus: single/few frames -> heavy speckle, grey noisy background, lower contrast.
    "cirrus": _Style(6.0, 2.0, 0.60, 0.05, (0.04, 0.10), 0.08, 1.0, -33.5, -40.0, 4.0, 5.0),
}


@dataclass
class _Scene:
    """Geometry and reflectivity of one B-scan before it is rasterised."""

    H: int
    W: int
    style: _Style
    x: np.ndarray  # column index, float32 (W,)
    r_mm: np.ndarray  # signed distance from the fovea, mm (W,)
    nasal: int  # +1 if nasal is towards +x (OD), else -1
    px_per_um: float  # rows per micrometre (depth)
    px_per_mm: float  # columns per millimetre (lateral)
    fovea_col: float
    bounds: np.ndarray  # (14, W) boundary rows; lesions may edit
    layer_db: np.ndarray  # (15, W) layer levels; lesions may edit
    healthy: np.ndarray  # (14, W) copy of the healthy boundaries (never edited)

    def col_of_mm(self, r: float) -> float:
        return self.fovea_col + r * self.px_per_mm


# --------------------------------------------------------------------------- helpers


def _smooth_wave(rng: np.random.Generator, x: np.ndarray, W: int, amp: float, max_cycles: float) -> np.ndarray:
    """A smooth random undulation of roughly ``amp`` (sum of 4 random sinusoids)."""
    freqs = rng.uniform(0.5, max_cycles, 4)
    phases = rng.uniform(0, 2 * np.pi, 4)
    weights = rng.normal(0, 1, 4)
    u = x / W
    wave = sum(w * stable.sin(2 * np.pi * f * u + p) for w, f, p in zip(weights, freqs, phases))
    return (amp * wave / 2.0).astype(F32)


def _taper(x: np.ndarray, centre: float, half: float, edge: float) -> np.ndarray:
    """1 for |x - centre| <= half - edge, raised cosine down to exactly 0 at ``half``."""
    t = np.clip((half - np.abs(x - centre)) / max(edge, 1e-3), 0.0, 1.0)
    return (0.5 - 0.5 * stable.cos(np.pi * t)).astype(F32)


def _dome(x: np.ndarray, centre: float, half: float, power: float) -> np.ndarray:
    """Dome profile (1 - s^2)^power on |s| < 1 (s = (x - centre) / half), 0 outside.

    Small powers give steep-walled domes (PED), larger ones flat lenses (SRF).
    """
    s = (x - centre) / max(half, 1e-3)
    return stable.power(np.clip(1.0 - s * s, 0.0, None), power)


def _dome_lift(scene: "_Scene", rng: np.random.Generator, area: float, um_per_mm: tuple[float, float],
               power: float, spread_mm: float) -> tuple[np.ndarray, float]:
    """Lift profile (rows, per column) of a dome of ``area`` px near the fovea, and its centre column.

    The dome's height/width ratio is drawn in physical units (um of height per
    mm of width); its area is height * half_width * B(1/2, power + 1).
    """
    ratio = rng.uniform(*um_per_mm)
    shape_area = float(beta(0.5, power + 1.0))  # integral of (1 - s^2)^power over [-1, 1]
    k = 0.5 * shape_area * ratio * scene.px_per_um * scene.px_per_mm  # area = k * width_mm^2
    w_mm = np.sqrt(area / k)
    centre = scene.col_of_mm(rng.uniform(-spread_mm, spread_mm))
    h = max(ratio * w_mm * scene.px_per_um, 1.5)
    return h * _dome(scene.x, centre, 0.5 * w_mm * scene.px_per_mm, power), centre


def _row_span(H: int, *curves: np.ndarray, pad: int = 2) -> tuple[int, int]:
    """Row range [lo, hi) covering every curve (clipped to the image)."""
    lo = min(float(c.min()) for c in curves)
    hi = max(float(c.max()) for c in curves)
    return max(int(np.floor(lo)) - pad, 0), min(int(np.ceil(hi)) + pad, H)


def _add_step(g: np.ndarray, curve: np.ndarray, delta: np.ndarray) -> None:
    """g += delta for pixels below ``curve``, with a 1-px linear ramp (anti-aliasing)."""
    H = g.shape[0]
    lo, hi = _row_span(H, curve, pad=1)
    if hi < H:
        g[hi:] += delta
    if lo < hi:
        rows = np.arange(lo, hi, dtype=F32)[:, None]
        g[lo:hi] += delta * np.clip(rows - curve + 0.5, 0.0, 1.0)


def _add_line(g: np.ndarray, curve: np.ndarray, sigma: float, amp, cols: slice = slice(None)) -> None:
    """g += amp * gaussian(row - curve) for a thin line following ``curve``."""
    H = g.shape[0]
    c = curve[cols]
    if c.size == 0:
        return
    lo, hi = _row_span(H, c, pad=int(3 * sigma) + 2)
    if lo >= hi:
        return
    rows = np.arange(lo, hi, dtype=F32)[:, None]
    g[lo:hi, cols] += amp * stable.exp(-0.5 * ((rows - c) / sigma) ** 2)


def _max_line(g: np.ndarray, curve: np.ndarray, sigma: float, level_db: float, win: np.ndarray) -> None:
    """g = max(g, line) for a membrane of peak ``level_db`` (gaussian in linear power).

    Unlike ``_add_line`` this works in empty regions (vitreous, fluid), where
    adding decibels to "no signal" would stay invisible. ``win`` (0..1 per
    column) fades the line; columns with win == 0 are untouched.
    """
    cols = np.flatnonzero(win > 0)
    if cols.size == 0:
        return
    c0, c1 = cols[0], cols[-1] + 1
    c = curve[c0:c1]
    lo, hi = _row_span(g.shape[0], c, pad=int(3 * sigma) + 2)
    rows = np.arange(lo, hi, dtype=F32)[:, None]
    line = level_db + 10.0 * stable.log10(np.maximum(win[c0:c1], 1e-6)) - 4.343 * ((rows - c) / sigma) ** 2
    np.maximum(g[lo:hi, c0:c1], line, out=g[lo:hi, c0:c1])


def _band_mask(H: int, W: int, top: np.ndarray, bot: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """bool (H, W): pixel centres with top[x] <= row < bot[x] in the selected columns."""
    mask = np.zeros((H, W), dtype=bool)
    idx = np.flatnonzero(cols)
    if idx.size == 0:
        return mask
    c0, c1 = idx[0], idx[-1] + 1
    lo, hi = _row_span(H, top[c0:c1], bot[c0:c1], pad=1)
    rows = np.arange(lo, hi, dtype=F32)[:, None]
    mask[lo:hi, c0:c1] = (rows >= top[c0:c1]) & (rows < bot[c0:c1]) & cols[c0:c1]
    return mask


def _ensure_nonempty(mask: np.ndarray, row: float, col: float) -> np.ndarray:
    """Guarantee at least one pixel (tiny images): mark the lesion's centre pixel."""
    if not mask.any():
        H, W = mask.shape
        mask[int(np.clip(row, 0, H - 1)), int(np.clip(col, 0, W - 1))] = True
    return mask


# --------------------------------------------------------------------------- healthy anatomy


def _pit(r: np.ndarray, radius: float, residual: float) -> np.ndarray:
    """Smooth foveal pit factor: ``residual`` at r=0 rising to 1 (sloping walls)."""
    return (1.0 - (1.0 - residual) * stable.exp(-stable.power(np.abs(r) / radius, 2.4))).astype(F32)


def _thicknesses_um(eye: Eye, r: np.ndarray, nasal: int) -> list[np.ndarray]:
    """Layer thicknesses (um) from the ILM down to the RPE, per column."""
    rn = r * nasal  # >0 towards the optic disc
    d = eye.foveal_pit_depth
    resid = 0.3 * (1.0 - d)  # inner retina left at the foveal centre
    scale_pit = 0.85 + 0.3 * d  # deeper pits are also a bit wider
    a = np.abs(r)
    bump = stable.exp(-((r / 0.8) ** 2))  # central ONL bulge (wider than the pit: smooth floor)
    rnfl = np.where(rn > 0, 16 + 26 * rn, 16 + 3 * np.abs(rn))
    rnfl = np.minimum(rnfl, 120) * _pit(r, 0.9 * scale_pit, resid * 0.5)
    gcl = 58 * _pit(r, 0.7 * scale_pit, resid) * stable.exp(-np.maximum(a - 1.2, 0) / 3.0)
    ipl = 42 * _pit(r, 0.65 * scale_pit, resid) * stable.exp(-np.maximum(a - 1.3, 0) / 5.0)
    inl = 36 * _pit(r, 0.55 * scale_pit, resid) * stable.exp(-np.maximum(a - 1.5, 0) / 6.0)
    opl = 12 + 14 * _pit(r, 0.45 * scale_pit, 0.0)
    onl = (68 + 22 * bump) * stable.exp(-np.maximum(a - 2.0, 0) / 8.0)
    myoid = np.full_like(r, 24.0)
    ez = np.full_like(r, 11.0)
    os_ = 20 + 10 * stable.exp(-((r / 0.6) ** 2))  # longer foveal cone outer segments
    iz = np.full_like(r, 8.0)
    gap = np.full_like(r, 3.0)
    rpe = np.full_like(r, 19.0)
    return [rnfl, gcl, ipl, inl, opl, onl, myoid, ez, os_, iz, gap, rpe]


def _healthy_scene(eye: Eye, H: int, W: int, style: _Style, rng: np.random.Generator) -> _Scene:
    """Boundary curves and layer levels of the healthy eye."""
    x = np.arange(W, dtype=F32)
    px_per_mm = W / style.scan_mm
    px_per_um = H / (style.depth_mm * 1000.0)
    fovea_col = (0.5 + eye.fovea_offset[0]) * W
    r = ((x - fovea_col) / px_per_mm).astype(F32)
    nasal = 1 if eye.laterality == "OD" else -1

    # Bruch's membrane: bowl (edges higher) + tilt + slow undulation.
    row0 = style.bruch_row + rng.normal(0, style.bruch_row_sd)
    bowl = rng.uniform(*style.bowl)
    tilt = rng.uniform(-style.tilt, style.tilt)
    bowl_centre = fovea_col + rng.normal(0, 0.1) * W
    u = (x - bowl_centre) / (W / 2)
    bruch = H * (row0 - bowl * u * u + tilt * (x / W - 0.5)) + _smooth_wave(rng, x, W, 6 * px_per_um, 2.5)

    # Stack thicknesses upwards; each boundary gets its own small undulation.
    thick = _thicknesses_um(eye, r, nasal)
    bounds = np.empty((N_BOUNDARIES, W), dtype=F32)
    bounds[B_BRUCH] = bruch
    edge = bruch
    for k, t_um in zip(range(B_RPE_TOP, -1, -1), thick[::-1]):
        wobble = 1.0 + _smooth_wave(rng, x, W, 0.12, 8.0)  # +-~10 % thickness, inner and outer alike
        edge = edge - np.maximum(t_um * eye.retinal_thickness * wobble, 0.0) * px_per_um
        bounds[k] = edge
    # Fine waviness of the inner boundaries (a few um, higher spatial frequency).
    for k in range(B_ILM, B_ELM):
        bounds[k] += _smooth_wave(rng, x, W, 2.5 * px_per_um, 14.0)
    # Keep the stack ordered after the wobble.
    bounds[: B_BRUCH + 1] = np.minimum.accumulate(bounds[: B_BRUCH + 1][::-1], axis=0)[::-1]

    # Choroid thickness (thinner with age) and choroid/sclera boundary.
    choroid_um = (260 - 90 * eye.age) * (1 + _smooth_wave(rng, x, W, 0.25, 3.0)) * (1 - 0.15 * np.abs(r) / style.scan_mm)
    bounds[B_CSI] = bruch + np.maximum(choroid_um, 80) * px_per_um

    # Layer levels: healthy table + a per-eye gain; RNFL brighter where thick.
    layer_db = np.repeat(_LAYER_DB[:, None], W, axis=1)
    layer_db[RNFL] += np.clip((bounds[B_RNFL] - bounds[B_ILM]) / (px_per_um * 60.0), 0, 1) * 2.0
    layer_db[VITREOUS + 1 :] += rng.normal(0, 1.0)
    return _Scene(H, W, style, x, r, nasal, px_per_um, px_per_mm, fovea_col, bounds, layer_db, bounds.copy())


@dataclass(frozen=True)
class _Vessel:
    col: float
    half_w: float  # columns
    half_h: float  # rows


def _retinal_vessels(scene: _Scene, rng: np.random.Generator) -> list[_Vessel]:
    """A few large retinal vessels in the inner retina (outside the avascular zone)."""
    half_scan = scene.style.scan_mm / 2
    vessels = []
    for _ in range(int(rng.integers(3, 7))):
        r = rng.uniform(0.7, half_scan * 0.95) * rng.choice([-1, 1])
        diam_um = rng.uniform(45, 110)
        vessels.append(
            _Vessel(scene.col_of_mm(r), max(diam_um / 2000 * scene.px_per_mm, 1.0), max(diam_um / 2 * scene.px_per_um * 0.6, 1.0))
        )
    return vessels


def _choroid_map(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Bruch-relative texture (rows = depth below Bruch): vessel lumens and depth fade (dB)."""
    H, W = scene.H, scene.W
    tc = scene.healthy[B_CSI] - scene.healthy[B_BRUCH]  # choroid thickness in rows
    depth = int(np.ceil(H - scene.healthy[B_BRUCH].min())) + 2
    cmap = np.zeros((max(depth, 4), W), dtype=F32)
    rows = np.arange(cmap.shape[0], dtype=F32)[:, None]
    # Choriocapillaris slightly bright, stroma fading with depth.
    cmap += 2.0 * stable.exp(-rows / max(8 * scene.px_per_um, 0.8)) - 0.012 * rows / scene.px_per_um
    # Vessel lumens: Sattler (inner, small, dense) then Haller (outer, large) layer.
    n_mm = scene.style.scan_mm
    for layer_frac, size_frac, per_mm in ((0.32, (0.07, 0.13), 14), (0.64, (0.12, 0.22), 8)):
        n = int(per_mm * n_mm)
        cols = rng.uniform(0, W, n)
        size = rng.uniform(*size_frac, n)
        aspect = rng.uniform(1.0, 2.6, n)  # lumens cut obliquely look wider than tall
        dark = rng.uniform(4, 8, n)
        jitter = rng.normal(0, 0.1, n)
        for c, s, a, dk, j in zip(cols, size, aspect, dark, jitter):
            t = float(tc[int(c)])
            ry = max(s * t, 1.0)
            rx = max(ry * a, 1.5)
            cy = float(np.clip((layer_frac + j) * t, ry, max(t - ry, ry)))
            _paint_ellipse_min(cmap, cy, c, ry, rx, -dk)
    return cmap


def _paint_ellipse_min(img: np.ndarray, cy: float, cx: float, ry: float, rx: float, value: float) -> None:
    """img = min(img, value * soft_ellipse) on the ellipse's bounding box."""
    H, W = img.shape
    r0, r1 = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, H)
    c0, c1 = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, W)
    if r0 >= r1 or c0 >= c1:
        return
    yy = np.arange(r0, r1, dtype=F32)[:, None]
    xx = np.arange(c0, c1, dtype=F32)[None, :]
    v = 1.0 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2
    prof = np.clip(v * 1.6, 0.0, 1.0)
    np.minimum(img[r0:r1, c0:c1], value * prof, out=img[r0:r1, c0:c1])


def _ellipse(H: int, W: int, cy: float, cx: float, ry: float, rx: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """(slices, bool block) of pixels inside an ellipse."""
    r0, r1 = max(int(np.floor(cy - ry)), 0), min(int(np.ceil(cy + ry)) + 1, H)
    c0, c1 = max(int(np.floor(cx - rx)), 0), min(int(np.ceil(cx + rx)) + 1, W)
    yy = np.arange(r0, r1, dtype=F32)[:, None]
    xx = np.arange(c0, c1, dtype=F32)[None, :]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return (slice(r0, r1), slice(c0, c1)), inside


# --------------------------------------------------------------------------- rendering


def _render_layers(scene: _Scene) -> np.ndarray:
    """Piecewise layer reflectivity (dB) from the boundary curves, plus the ELM line."""
    g = np.empty((scene.H, scene.W), dtype=F32)
    g[:] = scene.layer_db[VITREOUS]
    for k in range(N_BOUNDARIES):
        _add_step(g, scene.bounds[k], scene.layer_db[k + 1] - scene.layer_db[k])
    _add_line(g, scene.bounds[B_ELM], max(0.45 * scene.px_per_um * 4, 0.5), 11.0)
    return g


def _add_choroid(g: np.ndarray, scene: _Scene, cmap: np.ndarray) -> None:
    """Add the Bruch-relative choroid texture below the (healthy) Bruch's membrane."""
    bruch = scene.healthy[B_BRUCH]
    lo = max(int(np.floor(bruch.min())), 0)
    rows = np.arange(lo, scene.H, dtype=F32)[:, None]
    d = rows - bruch
    idx = np.clip(d, 0, cmap.shape[0] - 1).astype(np.intp)
    vals = np.take_along_axis(cmap, idx, axis=0)
    g[lo:] += np.where(d >= 0, vals, 0.0)


def _add_vessels(g: np.ndarray, scene: _Scene, vessels: list[_Vessel]) -> None:
    """Bright vessel cross-sections in the inner retina with a shadow below."""
    H, W = g.shape
    for v in vessels:
        c = int(round(v.col))
        if not 0 <= c < W:
            continue
        top = float(scene.bounds[B_ILM, c]) + 0.6
        cy = top + v.half_h
        (rs, cs), inside = _ellipse(H, W, cy, v.col, v.half_h, v.half_w)
        yy = np.arange(rs.start, rs.stop, dtype=F32)[:, None]
        xx = np.arange(cs.start, cs.stop, dtype=F32)[None, :]
        d2 = ((yy - cy) / v.half_h) ** 2 + ((xx - v.col) / v.half_w) ** 2
        # Bright wall/blood column, brightest at the top edge where the beam enters.
        level = -5.0 - 6.0 * d2 + 3.0 * ((yy - cy) / v.half_h) ** 2 * (yy < cy)
        g[rs, cs] = np.where(inside, np.maximum(g[rs, cs], level), g[rs, cs])
        # Shadow: below the vessel, whole column, cosine lateral profile.
        c0, c1 = max(int(v.col - 1.3 * v.half_w), 0), min(int(v.col + 1.3 * v.half_w) + 1, W)
        if c0 >= c1:
            continue
        prof = _taper(np.arange(c0, c1, dtype=F32), v.col, 1.3 * v.half_w, 1.3 * v.half_w)
        r0 = min(int(cy + v.half_h), H)
        g[r0:, c0:c1] -= scene.style.shadow_db * prof


def _attenuation_db(scene: _Scene, age: float) -> np.ndarray:
    """Signal loss (dB) with depth in tissue, under the RPE, and SD-OCT roll-off; healthy geometry."""
    H, W = scene.H, scene.W
    rows = np.arange(H, dtype=F32)[:, None]
    per_um = 0.012 + 0.012 * age
    att = (per_um / scene.px_per_um) * np.maximum(rows - scene.healthy[B_ILM], 0.0)
    att += (0.012 / scene.px_per_um) * np.maximum(rows - scene.healthy[B_BRUCH], 0.0)
    lateral = ((scene.x / W - 0.5) * 2) ** 2
    lateral = lateral * lateral * 2.5  # slight vignetting at the scan ends (u**4 as two exact squares)
    att += (5.0 + 5.0 * age) * (rows / H) ** 2 + lateral
    return att


def _speckle_db(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """Log speckle (dB, zero mean): exponential intensity with short horizontal correlation."""
    e = rng.standard_exponential((H, W), dtype=F32)
    s = 0.5 * e
    s[:, 1:] += 0.25 * e[:, :-1]
    s[:, :-1] += 0.25 * e[:, 1:]
    s[:, 0] += 0.25 * e[:, 0]
    s[:, -1] += 0.25 * e[:, -1]
    sdb = 10.0 * stable.log10(s + 1e-6)
    return sdb + F32(1.2)  # mean of 10 log10 of this mixture is about -1.2 dB


def _to_uint8(g_db: np.ndarray, speckle_db: np.ndarray, style: _Style, noise_db: float) -> np.ndarray:
    """Signal + noise floor, speckle, log compression -> uint8."""
    lin = stable.power(10.0, g_db * F32(0.1))
    lin += F32(10.0 ** (noise_db / 10.0))
    out = F32(10.0) * stable.log10(lin) + style.speckle * speckle_db
    out = (out - style.black_db) * F32(255.0 / (style.white_db - style.black_db))
    return np.clip(out, 0, 255).astype(np.uint8)


def _psf(g: np.ndarray) -> None:
    """Axial point-spread: [1 2 1]/4 along depth (in place)."""
    top = g[:-1].copy()
    g[1:-1] = 0.5 * g[1:-1] + 0.25 * (top[:-1] + g[2:])


# --------------------------------------------------------------------------- lesions
#
# Each lesion function edits ``scene`` (geometry / layer levels, inside a
# compact column window) and returns ``paint(g) -> mask``, run after the
# layers are rasterised.

Paint = Callable[[np.ndarray], np.ndarray]


def _area_px(kind: str, H: int, W: int, rng: np.random.Generator) -> float:
    """Target lesion area in pixels: table fraction x log-uniform jitter in [0.5, 2], with a floor."""
    jitter = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    return max(_TARGET_FRACTION[kind] * jitter, _MIN_FRACTION) * H * W


def _lift_retina(scene: _Scene, lift: np.ndarray, upto: int) -> None:
    """Shift boundaries 0..upto (inclusive) up by ``lift`` rows (fluid/PED elevating the retina)."""
    scene.bounds[: upto + 1] -= lift


def _lesion_subretinal_fluid(scene: _Scene, rng: np.random.Generator, area: float) -> Paint:
    """Dark dome between the photoreceptor tips (IZ) and the RPE; outer layers lifted."""
    lift, centre = _dome_lift(scene, rng, area, (70, 130), power=1.5, spread_mm=0.6)
    _lift_retina(scene, lift, B_IZ_BOT)
    fluid = lift > 0.5
    scene.layer_db[GAP] = np.where(fluid, -40.0, scene.layer_db[GAP])

    def paint(g: np.ndarray) -> np.ndarray:
        b = scene.bounds
        mask = _band_mask(scene.H, scene.W, b[B_IZ_BOT], b[B_RPE_TOP], fluid)
        # Elongated outer segments hang into the fluid: faint granules at its roof.
        _max_line(g, b[B_IZ_BOT] + 1.0, 0.8, -20.0, fluid.astype(F32))
        return _ensure_nonempty(mask, float(b[B_RPE_TOP, int(centre) % scene.W]) - 1, centre)

    return paint


def _lesion_ped(scene: _Scene, rng: np.random.Generator, area: float) -> Paint:
    """RPE band lifted off Bruch's membrane in a dome; dark (serous) or medium content."""
    lift, centre = _dome_lift(scene, rng, area, (90, 170), power=0.6, spread_mm=0.8)
    _lift_retina(scene, lift, B_BRUCH)
    content_db = -30.0 if rng.random() < 0.6 else -19.0
    bruch0 = scene.healthy[B_BRUCH]

    def paint(g: np.ndarray) -> np.ndarray:
        mask = _band_mask(scene.H, scene.W, scene.bounds[B_BRUCH], bruch0, lift > 0.5)
        g[mask] = content_db
        # Bruch's membrane stays in place as a thin bright line under the dome.
        _add_line(g, bruch0, 0.7, np.where(lift > 0.5, 10.0, 0.0).astype(F32))
        return _ensure_nonempty(mask, float(bruch0[int(centre) % scene.W]) - 1, centre)

    return paint


def _lesion_retinal_edema(scene: _Scene, rng: np.random.Generator, area: float) -> Paint:
    """Swollen, less reflective, spongy outer retina (OPL..ELM) over a wide stretch."""
    swell = rng.uniform(0.5, 0.9)  # extra ONL/OPL thickness at the centre
    centre = scene.col_of_mm(rng.uniform(-0.5, 0.5))
    c = int(np.clip(centre, 0, scene.W - 1))
    base = float(np.median(scene.bounds[B_ELM] - scene.bounds[B_INL]))
    width = np.clip(area / (base * (1 + 0.75 * swell)), 6, 0.9 * scene.W)
    half = 0.5 * width / 0.85  # taper keeps the mask ~ width wide
    win = _taper(scene.x, centre, half, 0.5 * half)
    _lift_retina(scene, swell * win * (scene.bounds[B_ELM] - scene.bounds[B_INL]), B_OPL)
    for layer in (OPL, ONL, INL):
        scene.layer_db[layer] -= 4.0 * win
    cols = win > 0.3

    def paint(g: np.ndarray) -> np.ndarray:
        b = scene.bounds
        mask = _band_mask(scene.H, scene.W, b[B_INL], b[B_ELM], cols)
        # Spongy hyporeflective spaces: thresholded smooth noise inside the mask.
        rows, cls = np.nonzero(mask)
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cls.min(), cls.max() + 1
        sponge = _blobs(rng, r1 - r0, c1 - c0, scale=max(1.5, 14 * scene.px_per_um))
        dark = np.clip((sponge - 0.8) * 2.0, 0, 1) * 16.0 * win[c0:c1]
        g[r0:r1, c0:c1] -= np.where(mask[r0:r1, c0:c1], dark, 0.0)
        return _ensure_nonempty(mask, float(b[B_OPL, c]), c)

    return paint


def _blobs(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Smooth zero-mean random field (unit std) with blobs about ``scale`` pixels wide."""
    n = rng.standard_normal((h, w)).astype(F32)
    f = gaussian_filter(n, sigma=(scale * 0.6, scale))
    return f / max(float(f.std()), 1e-6)


def _lesion_inner_atrophy(scene: _Scene, rng: np.random.Generator, area: float) -> Paint:
    """Thinned inner retina (RNFL..IPL) with lost lamination; ILM lowered."""
    keep = rng.uniform(0.35, 0.6)
    side = rng.choice([-1, 1])
    r_c = side * rng.uniform(0.9, 1.8)
    centre = scene.col_of_mm(r_c)
    c = int(np.clip(centre, 0, scene.W - 1))
    inner = float(scene.bounds[B_IPL, c] - scene.bounds[B_ILM, c])
    width = np.clip(area / max(keep * inner, 1.0), 4, 0.5 * scene.W)
    half = 0.5 * width / 0.8
    win = _taper(scene.x, centre, half, 0.6 * half)
    b = scene.bounds
    for k in (B_ILM, B_RNFL, B_GCL):
        b[k] = b[k] + win * (1 - keep) * (b[B_IPL] - b[k])
    for layer in (RNFL, GCL, IPL):
        scene.layer_db[layer] += win * (-10.0 - scene.layer_db[layer])
    cols = win > 0.5

    def paint(g: np.ndarray) -> np.ndarray:
        mask = _band_mask(scene.H, scene.W, scene.bounds[B_ILM], scene.bounds[B_IPL], cols)
        return _ensure_nonempty(mask, float(scene.bounds[B_GCL, c]), c)

    return paint


def _lesion_prominent_mlm(scene: _Scene, rng: np.random.Generator, area: float) -> Paint:
    """Continuous hyperreflective line in the inner ONL (OPL/ONL junction) across the parafovea."""
    thick = max(38 * scene.px_per_um * rng.uniform(0.8, 1.2), 2.0)  # mask band: line + halo
    sides = [-1, 1] if rng.random() < 0.7 else [int(rng.choice([-1, 1]))]
    length = min(area / thick / len(sides), 0.45 * scene.W)
    start = 0.35 * scene.px_per_mm  # starts off the foveal centre
    win = np.zeros(scene.W, dtype=F32)
    for s in sides:
        centre = scene.fovea_col + s * (start + length / 2)
        win = np.maximum(win, _taper(scene.x, centre, length / 2 / 0.92, 0.15 * length))
    depth = rng.uniform(0.25, 0.4)  # fraction of the way from the OPL down the ONL

    def paint(g: np.ndarray) -> np.ndarray:
        b = scene.bounds
        line = b[B_OPL] + depth * (b[B_ELM] - b[B_OPL])
        sigma = max(3.5 * scene.px_per_um, 0.6)
        _add_line(g, line, sigma, 17.0 * win)  # bright core
        _add_line(g, line, thick / 3.0, 6.0 * win)  # hyperreflective halo
        cols = win > 0.5
        mask = _band_mask(scene.H, scene.W, line - thick / 2, line + thick / 2, cols)
        c = int(np.argmax(win))
        return _ensure_nonempty(mask, float(line[c]), c)

    return paint


def _lesion_outer_hyper(scene: _Scene, rng: np.random.Generator, area: float, macular: bool) -> Paint:
    """Brightened outer retina + inner choroid (EZ .. Bruch + ~70 um)."""
    below = rng.uniform(50, 90) * scene.px_per_um
    if macular:
        centres = [scene.col_of_mm(rng.uniform(-0.15, 0.15))]
    else:
        r0 = rng.uniform(0.8, 1.5)
        centres = [scene.col_of_mm(s * r0) for s in ([-1, 1] if rng.random() < 0.5 else [rng.choice([-1, 1])])]
    c = int(np.clip(centres[0], 0, scene.W - 1))
    thick = float(scene.bounds[B_BRUCH, c] - scene.bounds[B_EZ_TOP, c]) + 0.9 * below + 2
    width = np.clip(area / thick / len(centres), 3, 0.3 * scene.W)
    win = np.zeros(scene.W, dtype=F32)
    for ctr in centres:
        win = np.maximum(win, _taper(scene.x, ctr, 0.5 * width / 0.8, 0.4 * width))
    boost = rng.uniform(8, 12)

    def paint(g: np.ndarray) -> np.ndarray:
        b = scene.bounds
        # Deepest under the lesion centre, shallower towards its ends (rounded bottom).
        top, bot = b[B_EZ_TOP] - 2, b[B_BRUCH] + below * (0.4 + 0.6 * np.sqrt(win))
        mask = _band_mask(scene.H, scene.W, top, bot, win > 0.5)
        lo, hi = _row_span(scene.H, top, bot, pad=3)
        rows = np.arange(lo, hi, dtype=F32)[:, None]
        # Soft vertical profile: 1 inside [top, bot], fading over a few rows.
        vert = np.clip(np.minimum(rows - top + 2, bot - rows + 2) / 3.0, 0, 1)
        gg = g[lo:hi]
        w2 = vert * win
        # Brighter and less laminated: pull towards a bright level, then boost.
        gg += w2 * (0.5 * (-8.0 - gg) + boost * 0.5)
        return _ensure_nonempty(mask, float(b[B_BRUCH, c]), c)

    return paint


def _lesion_middle_hyper(scene: _Scene, rng: np.random.Generator, area: float) -> Paint:
    """Short band-like hyperreflective lesion at the INL/OPL level (PAMM look)."""
    side = rng.choice([-1, 1])
    centre = scene.col_of_mm(side * rng.uniform(0.5, 1.4))
    c = int(np.clip(centre, 0, scene.W - 1))
    thick = float(scene.bounds[B_OPL, c] - scene.bounds[B_IPL, c])
    width = np.clip(area / max(thick * 1.05, 1.0), 3, 0.2 * scene.W)
    win = _taper(scene.x, centre, 0.5 * width / 0.8, 0.4 * width)
    target = -6.0 + rng.uniform(-1.5, 1.5)
    for layer in (INL, OPL):
        scene.layer_db[layer] += win * (target - scene.layer_db[layer])

    def paint(g: np.ndarray) -> np.ndarray:
        b = scene.bounds
        # Fusiform: the band narrows towards its ends (mask follows the window).
        mid = 0.5 * (b[B_IPL] + b[B_OPL])
        halfh = 0.5 * (b[B_OPL] - b[B_IPL]) * np.sqrt(np.clip(win, 0, 1))
        mask = _band_mask(scene.H, scene.W, mid - halfh, mid + halfh, win > 0.3)
        return _ensure_nonempty(mask, float(mid[c]), c)

    return paint


def _lesion_intraretinal_fluid(scene: _Scene, rng: np.random.Generator, area: float) -> Paint:
    """A few small dark oval cysts in the INL / ONL."""
    n = int(rng.integers(2, 5))
    shares = rng.dirichlet(np.ones(n) * 2.0)
    cysts = []
    for share in shares:
        layer_top, layer_bot = (B_IPL, B_INL) if rng.random() < 0.5 else (B_OPL, B_ELM)
        c = scene.col_of_mm(rng.choice([-1, 1]) * rng.uniform(0.3, 1.4))
        ci = int(np.clip(c, 0, scene.W - 1))
        top, bot = float(scene.bounds[layer_top, ci]), float(scene.bounds[layer_bot, ci])
        a = share * area
        ry = np.sqrt(a / np.pi * rng.uniform(0.7, 1.3))
        ry = float(np.clip(ry, 0.7, max(0.45 * (bot - top), 0.7)))
        rx = max(a / (np.pi * ry), 0.7)
        cysts.append((0.5 * (top + bot), c, ry, rx))

    def paint(g: np.ndarray) -> np.ndarray:
        mask = np.zeros((scene.H, scene.W), dtype=bool)
        for cy, cx, ry, rx in cysts:
            (rs, cs), rim = _ellipse(scene.H, scene.W, cy, cx, ry + 1.0, rx + 1.0)
            g[rs, cs] += np.where(rim, 3.0, 0.0)  # slightly bright wall
            (rs, cs), inside = _ellipse(scene.H, scene.W, cy, cx, ry, rx)
            if not inside.any():  # tiny images: at least the centre pixel
                (rs, cs), inside = (slice(int(cy), int(cy) + 1), slice(int(cx), int(cx) + 1)), np.ones((1, 1), bool)
            g[rs, cs] = np.where(inside, -36.0, g[rs, cs])
            mask[rs, cs] |= inside
        return mask

    return paint


def _lesion_vitreous_erm(scene: _Scene, rng: np.random.Generator, area: float) -> Paint:
    """Posterior vitreous detachment (membrane above the ILM) or wrinkled ERM on the ILM."""
    H, W = scene.H, scene.W
    pvd = rng.random() < 0.6
    thick = max(9 * scene.px_per_um * rng.uniform(0.8, 1.3), 1.2) if pvd else max(14 * scene.px_per_um, 1.5)
    length = area / thick
    if length > 0.9 * W:
        thick *= length / (0.9 * W)
        length = 0.9 * W
    x = scene.x
    if pvd:
        # Attached at (or near) the fovea, rising away on one or both sides.
        start = np.clip(scene.fovea_col + rng.uniform(-0.3, 0.3) * scene.px_per_mm - rng.uniform(0, 1) * length, 0, W - length)
        centre = start + length / 2
        attach = scene.fovea_col + rng.normal(0, 0.2) * scene.px_per_mm
        rise = rng.uniform(0.06, 0.16) * H
        d = np.abs(x - attach) / max(length, 1.0)
        gap = rise * stable.power(np.clip(d - 0.08, 0, None), 1.3) + _smooth_wave(rng, x, W, 0.01 * H, 3.0) * np.clip(d * 4, 0, 1)
        level = rng.uniform(-15, -9)  # faint posterior hyaloid
    else:
        centre = scene.col_of_mm(rng.uniform(-1.2, 1.2))
        # The membrane floats 0..a few px above the ILM and touches it in places.
        gap = 0.5 * thick + np.clip(_smooth_wave(rng, x, W, 1.2 * thick, 10.0), 0, None)
        level = rng.uniform(-4, 0)  # bright membrane
    win = _taper(x, centre, length / 2 / 0.95, 0.1 * length)
    if not pvd:
        # Wrinkled inner retina under the membrane (folds of the ILM/RNFL).
        folds = _smooth_wave(rng, x, W, 1.0, 6.0 * scene.style.scan_mm) + 0.5 * _smooth_wave(rng, x, W, 1.0, 14.0 * scene.style.scan_mm)
        ripple = win * F32(max(7 * scene.px_per_um, 0.8)) * folds
        scene.bounds[B_ILM] += ripple
        scene.bounds[B_RNFL] += 0.5 * ripple

    def paint(g: np.ndarray) -> np.ndarray:
        line = scene.bounds[B_ILM] - gap - (0.5 * thick if not pvd else 0.0)
        line = np.maximum(line, 1.0)
        _max_line(g, line, max(thick / 2.5, 0.5), level, win)
        mask = _band_mask(H, W, line - max(thick / 2, 0.5), line + max(thick / 2, 0.5), win > 0.5)
        c = int(np.clip(centre, 0, W - 1))
        return _ensure_nonempty(mask, float(line[c]), c)

    return paint


_LESIONS: dict[str, Callable[[_Scene, np.random.Generator, float], Paint]] = {
    "subretinal_fluid": _lesion_subretinal_fluid,
    "pigment_epithelial_detachment": _lesion_ped,
    "retinal_edema": _lesion_retinal_edema,
    "inner_layer_atrophy": _lesion_inner_atrophy,
    "prominent_mlm": _lesion_prominent_mlm,
    "outer_hyperreflectivity_macular": lambda s, r, a: _lesion_outer_hyper(s, r, a, macular=True),
    "outer_hyperreflectivity_parafoveal": lambda s, r, a: _lesion_outer_hyper(s, r, a, macular=False),
    "middle_hyperreflectivity": _lesion_middle_hyper,
    "intraretinal_fluid": _lesion_intraretinal_fluid,
    "vitreous_detachment_erm": _lesion_vitreous_erm,
}
assert set(_LESIONS) == set(OCT_KINDS)


# --------------------------------------------------------------------------- public API


def render_oct(eye: Eye, size: tuple[int, int], lesions: Sequence[str] = (), style: str = "spectralis",
               area_scale: float = 1.0) -> Rendered:
    """Render one OCT B-scan of ``eye`` at ``size`` = (H, W) with the requested lesion kinds.

    ``area_scale`` multiplies every lesion's target area (the benchmark's lesion
    size, ``synthetic.mmr.lesions``).

    Returns ``Rendered`` with a (H, W) uint8 image, one bool mask per lesion kind
    and the anatomy mask "retina" (ILM to Bruch's membrane).
    """
    H, W, kinds = check_request("OCT", size, lesions, style, _STYLES, OCT_KINDS)
    st = _STYLES[style]

    # Healthy eye: every draw from rng("oct"), in a fixed order.
    rng = eye.rng("oct")
    scene = _healthy_scene(eye, H, W, st, rng)
    vessels = _retinal_vessels(scene, rng)
    cmap = _choroid_map(scene, rng)
    speckle = _speckle_db(rng, H, W)

    # Lesions: one generator per kind (derived from rng("lesions-oct")), so a
    # kind looks the same whichever other kinds are requested.
    seeds = eye.rng("lesions-oct").integers(0, 2**63 - 1, size=len(OCT_KINDS))
    painters = []
    for kind in kinds:
        lrng = np.random.default_rng(int(seeds[OCT_KINDS.index(kind)]))
        painters.append((kind, _LESIONS[kind](scene, lrng, _area_px(kind, H, W, lrng) * area_scale)))

    g = _render_layers(scene)
    _add_choroid(g, scene, cmap)
    _add_vessels(g, scene, vessels)
    masks = {kind: paint(g) for kind, paint in painters}
    _psf(g)
    g -= _attenuation_db(scene, eye.age)
    image = _to_uint8(g, speckle, st, st.noise_db + 3.0 * eye.age)

    rows = np.arange(H, dtype=F32)[:, None]
    retina = (rows >= scene.bounds[B_ILM]) & (rows < scene.bounds[B_BRUCH])
    return Rendered(image=image, lesions={k: masks[k] for k in kinds}, anatomy={"retina": retina})
