"""LabelMe JSON annotations: validate, rasterise to per-class masks, and write.

LabelMe stores one JSON per image (keys: version, flags, shapes, imagePath,
imageData, imageHeight, imageWidth). Each shape has a ``label`` (here a numeric
symptom id such as "3"), ``points`` as [x, y] floats, and a ``shape_type``.
Shapes are drawn with Pillow exactly as LabelMe's own ``shape_to_mask`` does
(outline included), so our masks equal what LabelMe users get from their tools.

Rules enforced (each breach raises ``DataError`` naming the JSON file):
  * the file parses as a JSON object with ``shapes``, ``imageHeight``, ``imageWidth``;
  * imageHeight / imageWidth equal the image's size;
  * ``imagePath`` (relative to the JSON, backslashes allowed) stays inside the dataset folder;
  * every label is a known numeric class id of the modality;
  * polygons have at least 3 points, rectangles and circles exactly 2, lines at least 2;
  * every point lies inside the image (with a tolerance of ``BOUNDS_TOLERANCE`` px,
    because LabelMe stores the click position, which may sit on the border).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import measure  # find_contours only (exact on 0/1 masks)

from mmrad.core.errors import DataError
from mmrad.core.io import atomic_write_text

BOUNDS_TOLERANCE = 1.0
LINE_WIDTH = 3  # px at the annotated resolution, for line / linestrip shapes
POINT_RADIUS = 2  # px, for point shapes
_MIN_POINTS = {"polygon": 3, "rectangle": 2, "circle": 2, "line": 2, "linestrip": 2, "point": 1, "mask": 2}
LABELME_VERSION = "5.4.1"


def load(path: Path) -> dict:
    """Parse a LabelMe file and check its top-level structure."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, "LabelMe JSON is malformed", str(exc)) from exc
    if not isinstance(data, dict):
        raise DataError(path, "LabelMe JSON must be an object")
    for key in ("shapes", "imageHeight", "imageWidth"):
        if key not in data:
            raise DataError(path, f"LabelMe JSON lacks required key '{key}'")
    if not isinstance(data["shapes"], list):
        raise DataError(path, "LabelMe 'shapes' must be a list")
    return data


def check_image_path(path: Path, data: dict, dataset_root: Path) -> None:
    """imagePath, resolved against the JSON's folder, must stay inside the dataset."""
    raw = data.get("imagePath")
    if not raw:
        return
    # LabelMe written on Windows uses backslashes; treat both separators alike.
    parts = PureWindowsPath(raw).parts if "\\" in raw else PurePosixPath(raw).parts
    if PurePosixPath(raw).is_absolute() or PureWindowsPath(raw).is_absolute():
        raise DataError(path, "imagePath escapes the dataset folder", raw)
    target = (path.parent.joinpath(*parts)).resolve()
    if not target.is_relative_to(dataset_root.resolve()):
        raise DataError(path, "imagePath escapes the dataset folder", raw)


def rasterise(path: Path, data: dict, height: int, width: int, class_ids: set[int]) -> dict[int, np.ndarray]:
    """Per-class bool masks of shape (height, width) from a validated LabelMe dict."""
    if (int(data["imageHeight"]), int(data["imageWidth"])) != (height, width):
        raise DataError(
            path, "LabelMe imageHeight/imageWidth differ from the image",
            f"json {data['imageHeight']}x{data['imageWidth']}, image {height}x{width}",
        )
    masks: dict[int, np.ndarray] = {}
    for index, shape in enumerate(data["shapes"]):
        class_id = _class_id(path, index, shape, class_ids)
        mask = _shape_mask(path, index, shape, height, width)
        masks[class_id] = masks.get(class_id, np.zeros((height, width), bool)) | mask
    return masks


def _class_id(path: Path, index: int, shape: dict, class_ids: set[int]) -> int:
    label = str(shape.get("label", "")).strip()
    try:
        class_id = int(label)
    except ValueError:
        class_id = None
    if class_id not in class_ids:
        raise DataError(path, f"unknown class label {label!r} in shape {index}",
                        f"known ids: {sorted(class_ids)}")
    return class_id


def _shape_mask(path: Path, index: int, shape: dict, height: int, width: int) -> np.ndarray:
    kind = shape.get("shape_type") or "polygon"
    if kind not in _MIN_POINTS:
        raise DataError(path, f"unsupported shape_type {kind!r} in shape {index}")
    try:
        points = [(float(x), float(y)) for x, y in shape.get("points", [])]
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"shape {index} has malformed points") from exc
    need = _MIN_POINTS[kind]
    if len(points) < need or (kind in ("rectangle", "circle") and len(points) != 2):
        rule = f"{kind} needs at least {need} points" if kind not in ("rectangle", "circle") \
            else f"{kind} needs exactly 2 points"
        raise DataError(path, f"{rule} (shape {index} has {len(points)})")
    for x, y in points:
        if not (-BOUNDS_TOLERANCE <= x <= width - 1 + BOUNDS_TOLERANCE
                and -BOUNDS_TOLERANCE <= y <= height - 1 + BOUNDS_TOLERANCE):
            raise DataError(path, f"shape {index} has a point out of the image bounds",
                            f"({x:g}, {y:g}) outside {width}x{height}")

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "polygon":
        draw.polygon(points, outline=1, fill=1)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = points
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
    elif kind == "circle":
        (cx, cy), (px, py) = points
        r = float(np.hypot(cx - px, cy - py))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    elif kind in ("line", "linestrip"):
        draw.line(points, fill=1, width=LINE_WIDTH)
    elif kind == "point":
        cx, cy = points[0]
        draw.ellipse([cx - POINT_RADIUS, cy - POINT_RADIUS, cx + POINT_RADIUS, cy + POINT_RADIUS], outline=1, fill=1)
    else:  # "mask": a base64 PNG covering the box from points[0] to points[1]
        return _mask_shape(path, index, shape, points, height, width)
    return np.asarray(canvas, dtype=bool)


def _mask_shape(path, index, shape, points, height, width) -> np.ndarray:
    try:
        patch = np.asarray(Image.open(io.BytesIO(base64.b64decode(shape["mask"])))) > 0
    except Exception as exc:  # any decoding failure is the same broken rule
        raise DataError(path, f"shape {index} has an undecodable mask", str(exc)) from exc
    x0, y0 = (int(round(v)) for v in points[0])
    out = np.zeros((height, width), bool)
    h = min(patch.shape[0], height - y0)
    w = min(patch.shape[1], width - x0)
    out[y0:y0 + h, x0:x0 + w] = patch[:h, :w]
    return out


def masks_to_shapes(masks: dict[int, np.ndarray], tolerance: float = 0.6) -> list[dict]:
    """LabelMe polygon shapes outlining each connected region of each class mask.

    Holes are filled (a polygon annotation has none) and outlines simplified
    with ``tolerance`` px, much as an annotator's clicks would.
    """
    shapes = []
    for class_id in sorted(masks):
        filled = ndimage.binary_fill_holes(masks[class_id])
        padded = np.pad(filled, 1).astype(float)
        for contour in measure.find_contours(padded, 0.5):
            contour = simplify_polygon(contour - 1.0, tolerance)[:-1]  # drop the closing repeat
            if len(contour) < 3:
                continue
            h, w = filled.shape
            points = [[float(np.clip(c, 0, w - 1)), float(np.clip(r, 0, h - 1))] for r, c in contour]
            shapes.append({"label": str(class_id), "points": points, "group_id": None,
                           "description": "", "shape_type": "polygon", "flags": {}})
    return shapes


def simplify_polygon(coords: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a (K, 2) chain, with the same result on every CPU.

    The algorithm of ``skimage.measure.approximate_polygon``, but without its
    trigonometry: skimage measures point-to-line distances through np.arctan2,
    np.sin and np.cos, whose last bits depend on the CPU's SIMD code path, and
    contour points on the half-pixel grid are very often equally far from a
    line, so the vertex kept (the first of the farthest) changed between an
    AVX512 and an AVX2 machine. Here the distance is |cross product| / length,
    exact on that grid up to one shared division, so ties stay ties.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if tolerance <= 0 or len(coords) < 3:
        return coords
    keep = np.zeros(len(coords), bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(coords) - 1)]
    while stack:
        start, end = stack.pop()
        if end - start < 2:
            continue
        (r0, c0), (r1, c1) = coords[start], coords[end]
        dr, dc = r1 - r0, c1 - c0
        inner = coords[start + 1:end]
        dr0, dc0 = inner[:, 0] - r0, inner[:, 1] - c0
        dr1, dc1 = inner[:, 0] - r1, inner[:, 1] - c1
        # Beside the segment: distance to the line; beyond its ends: to the nearer end point.
        perp = (dr0 * dr + dc0 * dc > 0) & (-dr1 * dr - dc1 * dc > 0)
        length = np.sqrt(dr * dr + dc * dc)
        ends = np.sqrt(np.minimum(dr0 * dr0 + dc0 * dc0, dr1 * dr1 + dc1 * dc1))
        dist = np.where(perp, np.abs(dr0 * dc - dc0 * dr) / (length if length > 0 else 1.0), ends)
        if (dist > tolerance).any():
            split = start + 1 + int(np.argmax(dist))
            keep[split] = True
            stack += [(split, end), (start, split)]
    return coords[keep]


def write(path: Path, image_name: str, height: int, width: int, shapes: list[dict]) -> None:
    """Write a LabelMe file for the image ``image_name`` in the same folder."""
    data = {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": image_name,
            "imageData": None, "imageHeight": height, "imageWidth": width}
    atomic_write_text(path, json.dumps(data, indent=1))
