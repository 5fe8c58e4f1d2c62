"""Pictures people look at: the contact sheet of the synthetic data.

Uses matplotlib's Agg backend (no screen needed).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mmrad.core.params import Params  # noqa: E402
from mmrad.data import symptoms  # noqa: E402
from mmrad.synthetic.phantom.eye import Eye  # noqa: E402
from mmrad.synthetic.phantom.fundus import render_fundus  # noqa: E402
from mmrad.synthetic.phantom.oct import render_oct  # noqa: E402


def _zoom_box(mask: np.ndarray, share: float = 0.4) -> tuple[slice, slice]:
    """A window of ``share`` of the image centred on a small lesion (whole image for big ones)."""
    if mask.mean() > 0.01:
        return slice(None), slice(None)
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    half_h, half_w = int(h * share / 2), int(w * share / 2)
    cy = int(np.clip(np.median(rows), half_h, h - half_h))
    cx = int(np.clip(np.median(cols), half_w, w - half_w))
    return slice(cy - half_h, cy + half_h), slice(cx - half_w, cx + half_w)


def _tiles(params: Params) -> list[tuple[np.ndarray, np.ndarray | None, str]]:
    s = params.synthetic
    tiles = []
    for seed in (1, 2, 3):
        eye = Eye.sample(params.seed + seed)
        tiles.append((render_fundus(eye, s.mmr.fundus_size).image, None, f"fundus, healthy ({eye.laterality})"))
    eye = Eye.sample(params.seed + 4)
    tiles.append((render_fundus(eye, s.idrid.size, style="idrid").image, None, "IDRiD-style fundus, healthy"))
    lesion_tables = ((symptoms.MMR_FUNDUS, "MMR fundus", "fundus"), ({1: symptoms.IDRID_LESIONS[1]}, "IDRiD", "fundus"),
                     (symptoms.MMR_OCT, "MMR OCT", "oct"), ({1: symptoms.RESC_LESIONS[1], 3: symptoms.RESC_LESIONS[3]}, "RESC", "oct"))
    for seed in (5, 6):
        eye = Eye.sample(params.seed + seed)
        tiles.append((render_oct(eye, s.mmr.oct_size).image, None, "OCT, healthy (spectralis)"))
    eye = Eye.sample(params.seed + 7)
    tiles.append((render_oct(eye, s.resc.size, style="cirrus").image, None, "RESC-style OCT, healthy"))
    for table, source, modality in lesion_tables:
        for class_id, symptom in table.items():
            eye = Eye.sample(params.seed + 100 + len(tiles))
            if modality == "fundus":
                style, size = ("idrid", s.idrid.size) if source == "IDRiD" else ("visucam", s.mmr.fundus_size)
                rendered = render_fundus(eye, size, [symptom.kind], style=style)
            else:
                style, size = ("cirrus", s.resc.size) if source == "RESC" else ("spectralis", s.mmr.oct_size)
                rendered = render_oct(eye, size, [symptom.kind], style=style)
            tiles.append((rendered.image, rendered.lesions[symptom.kind], f"{source} {class_id}: {symptom.name}"))
    return tiles


def contact_sheet(params: Params, out: str | Path, columns: int = 5) -> Path:
    """Save a grid of synthetic images, each lesion outlined (small ones zoomed)."""
    tiles = _tiles(params)
    rows = -(-len(tiles) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 3.2, rows * 2.9), dpi=110)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, mask, title) in zip(axes.flat, tiles):
        box = _zoom_box(mask) if mask is not None else (slice(None), slice(None))
        ax.imshow(image[box], cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        if mask is not None:
            ax.contour(mask[box].astype(float), levels=[0.5], colors=["#00e5ff"], linewidths=0.8)
            if box != (slice(None), slice(None)):
                title += " (zoom)"
        ax.set_title(textwrap.fill(title, 34), fontsize=7)
    fig.suptitle("mmrad synthetic default data: healthy eyes and every symptom class (cyan: mask outline)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
