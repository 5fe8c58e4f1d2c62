"""Same bytes on every machine: ``generate`` and ``prepare`` do not depend on the CPU's SIMD code.

numpy chooses its kernels at run time from the CPU's features; ``NPY_DISABLE_CPU_FEATURES``
makes it run the code an older CPU would get. A small generation plus its prepared cache is
made in subprocesses as this CPU runs it, as a CPU without AVX512 would, and as an
x86-64-v2 CPU would (no AVX2 / FMA in numpy, glibc's libm without FMA, libjpeg-turbo's SSE2
code), and every file must be byte-identical; the bytes are also pinned as golden hashes.
See docs/decisions.md, "Same bytes on every machine".
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, __cpu_features__

from mmrad.data.datasets.labelme import simplify_polygon
from mmrad.synthetic.phantom import stable

SEED = 20241123
RESOLUTION = 64
# A quarter of the default sizes; small, yet the code before the fix gave different
# bytes without AVX512 in every dataset (OCT PNGs, fundus LabelMe JSON, RESC scans).
# The default lesion difficulty, so the contrast blend and the area scale are pinned too.
SYNTHETIC = {
    "workers": 1,
    "mmr": {"train_normal": 1, "test_normal": 1, "test_anomalous": 3, "fundus_size": [128, 133],
            "oct_size": [108, 192], "one_modality_fraction": 0.2,
            "lesions": {"fundus": {"contrast": 0.25, "size": 0.5}, "oct": {"contrast": 0.9, "size": 2.5}}},
    "idrid": {"seg_train": 1, "seg_test": 1, "grading_train": 1, "grading_test": 1, "healthy_fraction": 0.75,
              "size": [178, 268]},
    "resc": {"train_good": 1, "val_good": 1, "val_ungood": 1, "test_good": 1, "test_ungood": 2, "size": [128, 128]},
}
# sha256 over "<path> <sha256 of the file>" lines, sorted by path (see _combined). Issue 12 added only the
# .mmrad-output marker files (without them the hashes were the earlier 3ade7bfe... / 4ec67857...).
GOLDEN_RAW = "f9f2f4774a4a106f4d379a5cf1173f009b1f7778813ab5bec82aaaa3b7ed92a1"
GOLDEN_PREPARED = "fc005df69e2031ef500e33c100980e4f6cd91bda7112bbf47c3728514eed0fef"

# Generate and prepare in a fresh interpreter (numpy reads NPY_DISABLE_CPU_FEATURES at import).
# Only seed and synthetic matter to generate; the rest of params.yaml is not read.
_DRIVER = r"""
import json, sys
from pathlib import Path
from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
from mmrad.core.params import Params, Synthetic
from mmrad.data.prepare import prepare_dataset
from mmrad.synthetic.generate import FOLDERS, generate

seed, synthetic, resolution = json.loads(sys.argv[1])
generate(Params.model_construct(seed=seed, synthetic=Synthetic.model_validate(synthetic)), Path("raw"), progress=False)
for name, folder in FOLDERS.items():
    prepare_dataset(name, Path("raw") / folder, Path("prepared") / name, resolution, workers=1, progress=False)
print(json.dumps([f for f in __cpu_dispatch__ if __cpu_features__.get(f)]))
"""

_OUR_VARIABLES = ("NPY_DISABLE_CPU_FEATURES", "NPY_ENABLE_CPU_FEATURES", "GLIBC_TUNABLES", "JSIMD_FORCENONE",
                  "JSIMD_FORCESSE2", "JSIMD_FORCEAVX2")


def _optional(group) -> list[str]:
    """numpy's dispatch targets in ``group`` that this CPU has and numpy can switch off."""
    return [f for f in __cpu_dispatch__ if group(f) and f not in __cpu_baseline__ and __cpu_features__.get(f)]


def _is_avx512(name: str) -> bool:
    return name.startswith("AVX512") or name == "X86_V4"


def _is_avx2(name: str) -> bool:
    return name in ("X86_V3", "AVX2", "FMA3", "AVX", "F16C")


_NO_AVX512 = _optional(_is_avx512)
_NO_AVX2 = _optional(lambda f: _is_avx512(f) or _is_avx2(f))
VARIANTS = {
    "no-avx512": {"NPY_DISABLE_CPU_FEATURES": " ".join(_NO_AVX512)} if _NO_AVX512 else None,
    "x86-64-v2": {"NPY_DISABLE_CPU_FEATURES": " ".join(_NO_AVX2), "JSIMD_FORCESSE2": "1",
                  "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX2,-FMA,-FMA4,-AVX"}
    if any(_is_avx2(f) for f in _NO_AVX2) else None,
}


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _combined(hashes: dict[str, str], prefix: str) -> str:
    lines = "".join(f"{k} {v}\n" for k, v in sorted(hashes.items()) if k.startswith(prefix))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict[str, str], list[str]]]:
    """variant -> (sha256 of every output file, numpy features enabled); all runs in parallel."""
    base = {k: v for k, v in os.environ.items() if k not in _OUR_VARIABLES}
    variants = {"native": {}, **{k: v for k, v in VARIANTS.items() if v is not None}}
    started = {}
    for name, extra in variants.items():
        cwd = tmp_path_factory.mktemp(name)  # relative paths: the manifest must not name the tmp folder
        args = [sys.executable, "-c", _DRIVER, json.dumps([SEED, SYNTHETIC, RESOLUTION])]
        started[name] = cwd, subprocess.Popen(args, cwd=cwd, env={**base, **extra}, text=True,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for name, (cwd, proc) in started.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        results[name] = _hashes(cwd), json.loads(out.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_bytes_without_optional_cpu_features(runs, variant):
    if VARIANTS[variant] is None:
        pytest.skip(f"{variant}: this CPU has none of the optional numpy features it switches off "
                    f"(dispatch {list(__cpu_dispatch__)}, baseline {list(__cpu_baseline__)})")
    native, native_features = runs["native"]
    hashes, features = runs[variant]
    switched_off = VARIANTS[variant]["NPY_DISABLE_CPU_FEATURES"].split()
    assert not set(switched_off) & set(features), f"numpy ignored NPY_DISABLE_CPU_FEATURES: {features}"
    assert set(switched_off) <= set(native_features)
    assert set(hashes) == set(native)
    differ = sorted(k for k in native if hashes[k] != native[k])
    assert not differ, f"{len(differ)} of {len(native)} files differ with {VARIANTS[variant]}: {differ[:8]}"


def test_golden_hashes(runs):
    """The bytes of a small generation and of its prepared cache, as pinned.

    A change here changes dvc.lock's generate / prepare outputs too; when the renderer or the
    cache changed on purpose, update both constants (the assertion message shows the new ones).
    """
    native, _ = runs["native"]
    assert any(k.endswith(".jpg") for k in native) and any(k.endswith("manifest.parquet") for k in native)
    got = _combined(native, "raw/"), _combined(native, "prepared/")
    assert got == (GOLDEN_RAW, GOLDEN_PREPARED), f"new hashes: raw {got[0]}, prepared {got[1]}"


def test_stable_functions_round_float64_results_to_float32():
    x = np.linspace(-3, 3, 1001, dtype=np.float32)
    pos = np.abs(x) + np.float32(0.5)
    cases = [(stable.exp(x), np.exp(x.astype(np.float64))),
             (stable.sin(x), np.sin(x.astype(np.float64))),
             (stable.cos(x), np.cos(x.astype(np.float64))),
             (stable.log10(pos), np.log10(pos.astype(np.float64))),
             (stable.arctan2(x, pos), np.arctan2(x.astype(np.float64), pos.astype(np.float64))),
             (stable.power(pos, 0.8), pos.astype(np.float64) ** 0.8),
             (stable.power(0.99, np.arange(5)), 0.99 ** np.arange(5.0))]
    for got, exact in cases:
        assert got.dtype == np.float32
        assert np.array_equal(got, exact.astype(np.float32))
    kept = stable.exp(x, np.float64)
    assert kept.dtype == np.float64 and np.array_equal(kept, stable.exp(x))


def test_polygon_simplification_is_exact_and_keeps_the_first_of_tied_points():
    # (1, 1) and (2, 1) are equally far from the chord (0, 0)-(3, 0); the first is kept, and the
    # other is then within tolerance of the new chord. skimage's trigonometry could pick either.
    tied = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 1.0], [3.0, 0.0]])
    assert simplify_polygon(tied, 0.5).tolist() == [[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]]
    # A closed outline on the half-pixel grid (find_contours' output) keeps its corners.
    square = np.array([[0, 0], [0, 2], [0, 4], [2, 4], [4, 4], [4, 2], [4, 0], [2, 0], [0, 0]], float) + 0.5
    assert simplify_polygon(square, 0.6).tolist() == square[[0, 2, 4, 6, 8]].tolist()
    line = np.array([[0.0, 0.0], [0.3, 1.0], [0.0, 2.0], [-0.2, 3.0], [0.0, 4.0]])
    assert simplify_polygon(line, 0.5).tolist() == [[0.0, 0.0], [0.0, 4.0]]
    assert simplify_polygon(line, 0).tolist() == line.tolist()
