"""Overlay figures a reader takes in without help: per modality the image with its annotated lesions, and the
anomaly map over a greyscale copy of it.

* the map is drawn with 'inferno' (perceptually uniform, dark to bright), fully transparent below
  ``TRANSPARENT_BELOW`` of the scale and growing opaque up to ``OPAQUE_FROM``, so the anatomy stays visible
  where the model sees nothing;
* one scale per method and modality (``scale_ranges``: from the median pixel of that method's test maps to their
  ``SCALE_PERCENTILE``-th percentile), the same for every case, on a colour bar that says what the number is
  (``OverlayLabels.map_label``: a probability for MMRAD, a feature distance for the baselines);
* the annotated lesions are outlined in ``TRUTH_NAME`` on both panels, named from the bit masks
  (``mmrad.data.symptoms``); a panel without a lesion says so;
* the case score beside a stated threshold: the score at ``SPECIFICITY`` specificity on the normal test cases
  (``operating_threshold``), and how many of those normals the case exceeds;
* ``OverlayLabels.note`` (e.g. "research use only ...": decided by the caller from its params) on every PNG.

The PNGs are deterministic (RGB, no software / date metadata): DVC hashes them.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg  # files only, never a window (no pyplot, no display)
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from PIL import Image

from mmrad.data import symptoms
from mmrad.data.splits import SplitData
from mmrad.evaluation import methods
from mmrad.evaluation.inference import Predictions

SCALE_PERCENTILE = 99.9  # top of each method + modality's colour scale, over all its test maps
SCALE_FLOOR_PERCENTILE = 50  # its bottom: the median pixel (most pixels are healthy tissue)
TRANSPARENT_BELOW = 0.10  # share of the scale under which the map is not drawn
OPAQUE_FROM = 0.45  # share of the scale from which the map has its full opacity
MAX_ALPHA = 0.8
SPECIFICITY = 0.95  # the operating point the case score is compared with
TRUTH_COLOUR, TRUTH_NAME = "#00e5ff", "cyan"
DPI = 100
INTERPOLATION = "nearest"
GREY_TOP = 0.75  # the greyscale under the map: its 99th percentile shown at this grey
TITLE_PT, TEXT_PT = 12, 11
MODALITY_NAMES = {symptoms.FUNDUS: "Fundus photograph", symptoms.OCT: "OCT B-scan"}
SHORT_NAMES = {symptoms.FUNDUS: "Fundus", symptoms.OCT: "OCT"}
SCORE_NAMES = {"fusion": "fusion-token probability", "max": "max of the fundus and OCT image scores",
               "mean": "mean of the fundus and OCT image scores"}


@dataclass(frozen=True)
class OverlayLabels:
    """What the figures say about the method: its title, what its map's number is, and a note for every PNG."""

    method: str = "MMRAD"
    map_label: str = "anomaly probability"
    note: str = ""


def overlay_cmap() -> ListedColormap:
    """'inferno' with an opacity ramp: transparent below TRANSPARENT_BELOW of the scale, MAX_ALPHA from
    OPAQUE_FROM (the colour bar shows the same ramp, over white)."""
    x = np.linspace(0.0, 1.0, 256)
    colours = matplotlib.colormaps["inferno"](x)
    colours[:, 3] = MAX_ALPHA * np.clip((x - TRANSPARENT_BELOW) / (OPAQUE_FROM - TRANSPARENT_BELOW), 0.0, 1.0)
    return ListedColormap(colours, name="inferno_ramp")


def scale_ranges(maps: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """One colour scale per modality, (low, high): from the median pixel of all its maps (the typical, healthy
    value, drawn transparent) to their SCALE_PERCENTILE-th percentile; a flat map gets a scale of width 1."""
    ranges = {}
    for modality, values in maps.items():
        low, high = (float(v) for v in np.percentile(values, (SCALE_FLOOR_PERCENTILE, SCALE_PERCENTILE)))
        if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
            low, high = (low if math.isfinite(low) else 0.0), (low if math.isfinite(low) else 0.0) + 1.0
        ranges[modality] = (low, high)
    return ranges


def operating_threshold(scores: np.ndarray, labels: np.ndarray, specificity: float = SPECIFICITY) -> float | None:
    """The smallest normal-case score t with at least ``specificity`` of the normal cases scoring <= t (a case
    is flagged when its score is above t); None without normal cases."""
    normal = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 0])
    if normal.size == 0:
        return None
    return float(normal[math.ceil(specificity * normal.size - 1e-9) - 1])


def main_score(scores: dict[str, np.ndarray]) -> tuple[str, str] | None:
    """(score name, what it is) of the case score the figures show (mmrad.evaluation.methods.main_score)."""
    if not scores:
        return None
    name = methods.main_score(scores)
    if name in SCORE_NAMES:
        return name, SCORE_NAMES[name]
    modality = name.removesuffix("_only")
    return name, f"{SHORT_NAMES.get(modality, modality)} image score, the map maximum"


def symptom_names(dataset: str, modality: str, bits: np.ndarray) -> list[str]:
    """Names of the symptom classes present in one bit mask, in class order."""
    present = int(np.bitwise_or.reduce(np.asarray(bits, dtype=np.uint16).ravel())) if np.size(bits) else 0
    try:
        table = symptoms.table(dataset, modality)
    except KeyError:
        table = {}
    ids = [c for c in range(1, 17) if present & (1 << (c - 1))]
    return [table[c].name if c in table else f"class {c}" for c in ids]


def fmt(value: float) -> str:
    """A score, probabilities and distances alike, to three significant digits."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3g}"


def score_line(method: str, score: float, what: str, threshold: float | None, normals: np.ndarray) -> str:
    """The case score with its threshold context."""
    text = f"{method} case score {fmt(score)} ({what})"
    if threshold is None:
        return text
    above = int((np.asarray(normals) < score).sum())
    verdict = "ABOVE" if score > threshold else "not above"
    return (f"{text}: {verdict} the flag threshold {fmt(threshold)} (the score at {SPECIFICITY:.0%} specificity "
            f"on the {len(normals)} normal test cases); higher than {above} of the {len(normals)}")


def save_overlays(test: SplitData, predictions: Predictions, folder: Path, count: int,
                  labels: OverlayLabels | None = None) -> list[Path]:
    """PNG per case for a sample of cases (anomalous first, then two normal ones): each modality's image with
    its annotated lesions, and its anomaly map on the method + modality's one scale."""
    labels = labels or OverlayLabels()
    anomalous = [i for i in range(len(test.labels)) if test.labels[i] == 1]
    normal = [i for i in range(len(test.labels)) if test.labels[i] == 0]
    chosen = anomalous[: max(1, count - 2)] + normal[:2]
    modalities = list(predictions.maps)
    ranges = scale_ranges(predictions.maps)  # the same for every case of this method and modality
    main = main_score(predictions.scores)
    threshold, normals = None, np.zeros(0)
    if main is not None:
        normals = np.asarray(predictions.scores[main[0]])[test.labels == 0]
        threshold = operating_threshold(predictions.scores[main[0]], test.labels)
    scale = (f"Colour scale per modality, the same for every case of this method: from the median pixel to the "
             f"{SCALE_PERCENTILE:g}th percentile of its {len(test.labels)} test maps; the lowest "
             f"{TRANSPARENT_BELOW:.0%} of that range is not drawn, so the anatomy shows through.")
    paths = []
    for i in chosen:
        kind = "annotated anomalous case" if test.labels[i] else "annotated normal case"
        lines = [f"Case {test.case_ids[i]}: {kind}"]
        if main is not None:
            lines.append(score_line(labels.method, float(predictions.scores[main[0]][i]), main[1], threshold, normals))
        paths.append(plot_case(
            folder / f"{test.case_ids[i]}.png", "\n".join(lines),
            images={m: test.images[m][i] for m in modalities}, maps={m: predictions.maps[m][i] for m in modalities},
            vmin={m: ranges[m][0] for m in modalities}, vmax={m: ranges[m][1] for m in modalities},
            scores={m: predictions.scores.get(f"{m}_only", [np.nan] * len(test.labels))[i] for m in modalities},
            truths={m: test.masks[m][i] > 0 for m in modalities},
            lesions={m: symptom_names(test.dataset, m, test.masks[m][i]) for m in modalities},
            map_label=labels.map_label, note=labels.note, caption=scale))
    return paths


def lesion_line(modality: str, truth: np.ndarray | None, lesions: list[str] | None) -> str | None:
    """What the annotation says about one image ("Fundus: anomalous: ... (cyan outline)"); None without one."""
    if truth is None:
        return None
    short = SHORT_NAMES.get(modality, modality)
    if not truth.any():
        return f"{short}: no annotated lesion"
    return f"{short}: anomalous: {', '.join(lesions) if lesions else 'annotated lesion'} ({TRUTH_NAME} outline)"


def panel_titles(modality: str, score: float, truth: np.ndarray | None) -> tuple[str, str]:
    """(image panel title, map panel title) of one modality."""
    name, short = MODALITY_NAMES.get(modality, modality), SHORT_NAMES.get(modality, modality)
    image_title = name
    if truth is not None:
        image_title += f"\n{TRUTH_NAME} outline: annotated lesion" if truth.any() else "\nno annotated lesion"
    return image_title, f"{short}: anomaly map\nimage score {fmt(score)} (map maximum)"


# Layout, in inches: panels side by side, a header above, the note and caption below.
PANEL_IN, BAR_IN, BAR_LABELS_IN, GAP_IN, MARGIN_IN = 3.5, 0.16, 1.0, 0.12, 0.15
BAR_LABEL_CHARS = 30  # the colour bar's label wraps to two lines beyond this
HEADER_LINE_IN, TEXT_LINE_IN, TITLES_IN, NOTE_IN = 0.25, 0.21, 0.5, 0.42


def _wrap(lines: list[str], width_in: float, points: float) -> list[str]:
    chars = max(20, int(width_in * 72 / (0.57 * points)))
    return [part for line in lines for part in (textwrap.wrap(line, chars, subsequent_indent="    ") or [""])]


def render_case(title: str, images: dict, maps: dict, vmax: dict, scores: dict, truths: dict | None = None,
                lesions: dict | None = None, map_label: str = "anomaly probability", note: str = "",
                caption: str = "", vmin: dict | None = None) -> Figure:
    """One case as a Figure: a header (``title``, then what the annotation says per modality), per modality the
    image (truth outline) and its map over a greyscale copy on the scale vmin..vmax[modality] (vmin 0 when not
    given) with a labelled
    colour bar, then ``note`` (boxed, red) and ``caption``."""
    modalities = list(maps)
    aspect = {m: np.asarray(images[m]).shape[0] / np.asarray(images[m]).shape[1] for m in modalities}
    panel_h = PANEL_IN * max(aspect.values())
    pair_w = 2 * PANEL_IN + GAP_IN + GAP_IN / 2 + BAR_IN + BAR_LABELS_IN
    width = 2 * MARGIN_IN + len(modalities) * pair_w + (len(modalities) - 1) * 2 * GAP_IN
    header = [line for line in title.splitlines()]
    header += [line for m in modalities
               if (line := lesion_line(m, truths[m] if truths is not None else None, (lesions or {}).get(m)))]
    header = _wrap(header, width - 2 * MARGIN_IN, TITLE_PT)
    footer = _wrap([caption], width - 2 * MARGIN_IN, TEXT_PT - 1) if caption else []
    note_lines = _wrap([note], width - 2 * MARGIN_IN - 0.3, TITLE_PT * 1.1) if note else []  # bold, in a box
    top_h = MARGIN_IN + len(header) * HEADER_LINE_IN + 0.12 + TITLES_IN
    note_h = NOTE_IN + (len(note_lines) - 1) * HEADER_LINE_IN if note else 0.0
    bottom_h = 0.2 + note_h + len(footer) * TEXT_LINE_IN + MARGIN_IN
    height = top_h + panel_h + bottom_h
    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    cmap = overlay_cmap()

    def box(x: float, y: float, w: float, h: float):  # inches from the bottom left -> figure fraction
        return fig.add_axes((x / width, y / height, w / width, h / height))

    x = MARGIN_IN
    for m in modalities:
        image, amap = np.asarray(images[m]), np.asarray(maps[m], dtype=np.float32)
        gt = truths[m] if truths is not None else None
        image_title, map_title = panel_titles(m, scores[m], gt)
        h = PANEL_IN * aspect[m]
        y = bottom_h + (panel_h - h)
        left = box(x, y, PANEL_IN, h)
        right = box(x + PANEL_IN + GAP_IN, y, PANEL_IN, h)
        bar_ax = box(x + 2 * PANEL_IN + GAP_IN * 1.5, y, BAR_IN, h)
        left.imshow(image, interpolation=INTERPOLATION, aspect="auto")
        right.imshow(greyscale(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation=INTERPOLATION, aspect="auto")
        shown = right.imshow(amap, cmap=cmap, norm=Normalize((vmin or {}).get(m, 0.0), vmax[m], clip=True), interpolation=INTERPOLATION,
                             aspect="auto")
        if gt is not None and gt.any():
            for ax in (left, right):
                ax.contour(gt.astype(float), levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.5)
        left.set_title(image_title, fontsize=TEXT_PT, loc="left")
        right.set_title(map_title, fontsize=TEXT_PT, loc="left")
        bar = fig.colorbar(shown, cax=bar_ax)
        bar.set_label(textwrap.fill(map_label, BAR_LABEL_CHARS), fontsize=TEXT_PT)
        bar.ax.tick_params(labelsize=TEXT_PT - 1)
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        x += pair_w + 2 * GAP_IN
    y = height - MARGIN_IN
    for k, line in enumerate(header):
        fig.text(MARGIN_IN / width, (y - k * HEADER_LINE_IN) / height, line, fontsize=TITLE_PT, va="top",
                 ha="left", fontweight="bold" if k == 0 else "normal")
    y = bottom_h - 0.2
    if note:
        fig.text(MARGIN_IN / width, (y - 0.05) / height, "\n".join(note_lines), fontsize=TITLE_PT,
                 fontweight="bold", color="#b00020", va="top", ha="left",
                 bbox={"facecolor": "#fff3cd", "edgecolor": "#b00020", "boxstyle": "round,pad=0.3"})
        y -= note_h
    for k, line in enumerate(footer):
        fig.text(MARGIN_IN / width, (y - k * TEXT_LINE_IN) / height, line, fontsize=TEXT_PT - 1, va="top",
                 ha="left", color="#333333")
    return fig


def greyscale(image: np.ndarray) -> np.ndarray:
    """Luminance of an RGB uint8 image in [0, 1], its 99th percentile at GREY_TOP (dimmed: the map's bright
    colours stand out, the anatomy stays readable)."""
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32) if rgb.ndim == 3 else rgb
    high = float(np.percentile(grey, 99))
    return np.clip(grey * (GREY_TOP / max(high, 1e-6)), 0.0, 1.0)


def save_figure(fig: Figure, path: Path) -> Path:
    """RGB PNG without software or date metadata (Pillow writes none unless asked): the same bytes on every
    run; RGB, not matplotlib's RGBA, keeps the file smaller. zlib's default level, not Pillow's ``optimize``:
    that is 6x slower per overlay (0.5 vs 0.08 s for a 1722 x 650 pair) for files 2 % smaller."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    Image.fromarray(pixels).save(path, format="png")
    return path


def plot_case(path: Path, title: str, images: dict, maps: dict, vmax: dict, scores: dict,
              truths: dict | None = None, lesions: dict | None = None, map_label: str = "anomaly probability",
              note: str = "", caption: str = "", vmin: dict | None = None) -> Path:
    """One case as a PNG (``render_case``)."""
    return save_figure(render_case(title, images, maps, vmax, scores, truths, lesions, map_label, note, caption,
                                   vmin), Path(path))
