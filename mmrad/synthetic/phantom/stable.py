"""Transcendental functions for the phantoms that give the same bits on every x86-64 CPU.

numpy chooses the code of ``exp``, ``log10``, ``sin``, ``cos``, ``arctan2`` and ``power`` at run
time from the CPU's SIMD features (AVX512 / AVX2+FMA / SSE, see ``numpy.show_runtime()``), and
the implementations do not round alike: in float32, 1 to 3 ulp apart in up to 40 % of the
elements; in float64 (SVML on AVX512 vs glibc's libm) 1 to 2 ulp apart in 0.1 to 15 %. A
float32 image rendered with them crosses a few uint8 or mask thresholds differently on an
AVX2 machine than on an AVX512 one (docs/decisions.md, "Same bytes on every machine").

Every function here evaluates in float64 and rounds the result to float32 (round to nearest,
exact and the same everywhere). Two float64 results at most 2 ulp apart round to the same
float32 unless they straddle a float32 rounding midpoint, about 4e-9 per element; everything
after it is IEEE arithmetic (+ - * / sqrt, comparisons, order-fixed reductions), which is
exact and gives the same bits on every CPU. So the renderers use these for every array
transcendental, and for ``x ** p`` with p other than 2 (numpy's ``power`` is a
transcendental too; ``x ** 2`` is an exact square; ``np.hypot`` and ``np.sqrt`` are the same
on every path). Scalars (geometry: angles, radii) go through Python's ``math``, i.e. glibc,
whose FMA and non-FMA variants differ in the last bit in about 0.05 % of calls; those
float64 values only place shapes, 1e-16 apart, and have not changed a byte in any test.

``dtype`` is the dtype of the result: float32 (default) or float64 holding the
float32-rounded values, for geometry kept in float64.
"""

from __future__ import annotations

import numpy as np

__all__ = ["arctan2", "cos", "exp", "log10", "power", "sin"]

_F32 = np.dtype(np.float32)


def _f64(x) -> np.ndarray:
    """A float64 working copy (float32 -> float64 is exact)."""
    return np.array(x, dtype=np.float64)


def _rounded(y: np.ndarray, dtype) -> np.ndarray:
    out = y.astype(np.float32)
    return out if np.dtype(dtype) == _F32 else out.astype(dtype)


def exp(x, dtype=np.float32) -> np.ndarray:
    y = _f64(x)
    return _rounded(np.exp(y, out=y), dtype)


def log10(x, dtype=np.float32) -> np.ndarray:
    y = _f64(x)
    return _rounded(np.log10(y, out=y), dtype)


def sin(x, dtype=np.float32) -> np.ndarray:
    y = _f64(x)
    return _rounded(np.sin(y, out=y), dtype)


def cos(x, dtype=np.float32) -> np.ndarray:
    y = _f64(x)
    return _rounded(np.cos(y, out=y), dtype)


def arctan2(y, x, dtype=np.float32) -> np.ndarray:
    return _rounded(np.arctan2(_f64(y), _f64(x)), dtype)


def power(x, p, dtype=np.float32) -> np.ndarray:
    """x ** p for a base array and a scalar exponent, or a scalar base and an exponent array."""
    return _rounded(np.power(_f64(x), _f64(p)), dtype)
