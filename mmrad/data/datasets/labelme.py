"""LabelMe JSON annotations: validate, rasterise to per-class masks, and write.

LabelMe stores one JSON per image (keys: version, flags, shapes, imagePath,
imageData, imageHeight, imageWidth). Each shape has a ``label`` (here a numeric
symptom id such as "3"), ``points`` as [x, y] numbers, and a ``shape_type``.
Shapes are drawn with Pillow exactly as LabelMe's own ``shape_to_mask``
(``labelme/_utils/shape.py``) does, so our masks equal what LabelMe users get
from their tools: polygon, rectangle and circle filled with their outline,
line and linestrip drawn ``LINE_WIDTH`` px wide (a linestrip with rounded
joints, as LabelMe >= 7 does), a point as a disc of radius ``POINT_SIZE``.

Rules enforced (each breach raises ``DataError`` naming the JSON file and the rule):
  * the file is UTF-8 (a byte-order mark is allowed) and parses as a JSON object
    with ``shapes``, ``imageHeight`` and ``imageWidth``;
  * imageHeight / imageWidth are positive integers (not booleans; an integral
    float such as 512.0, written by some converters, is accepted as 512) and
    equal the image's size;
  * ``shapes`` is a list of objects; each has a string ``label``, a ``shape_type``
    LabelMe knows (missing or null means polygon) and ``points``, a list of
    [x, y] pairs of finite numbers;
  * ``imageData``, when present and not null, is the base64 text of an image file
    whose size (read from its header) equals imageHeight x imageWidth;
    invalid base64 or an undecodable image breaks the rule too;
  * ``imagePath`` is a string or null and (relative to the JSON, backslashes
    allowed) stays inside the dataset folder;
  * every label is a known numeric class id of the modality;
  * polygons and linestrips have at least 3 and 2 points; rectangles, circles,
    lines and masks exactly 2, oriented rectangles 4, points 1;
  * every point lies inside the image (with a tolerance of ``BOUNDS_TOLERANCE`` px,
    because LabelMe stores the click position, which may sit on the border).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import measure  # find_contours only (exact on 0/1 masks)

from mmrad.core.errors import DataError
from mmrad.core.outputs import atomic_write_text

BOUNDS_TOLERANCE = 1.0
LINE_WIDTH = 10  # px, line / linestrip width: labelme's value (shape_to_mask's line_width)
POINT_SIZE = 5  # px, radius of a point shape: labelme's value (shape_to_mask's point_size)
# shape_type -> (fewest points, most points or None)
_POINTS = {"polygon": (3, None), "linestrip": (2, None), "rectangle": (2, 2), "circle": (2, 2), "line": (2, 2),
           "mask": (2, 2), "oriented_rectangle": (4, 4), "point": (1, 1)}
LABELME_VERSION = "5.4.1"


def _short(value) -> str:
    """A bad value for the message: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load(path: Path) -> dict:
    """Parse a LabelMe file and check the type of every field used (rules in the module docstring).

    Returns the parsed dict with imageHeight / imageWidth as ints.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(path, "LabelMe file cannot be read", str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise DataError(path, "LabelMe file is not UTF-8 text", str(exc)) from exc
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or an integer of over 4300 digits
        raise DataError(path, "LabelMe JSON is malformed", str(exc)) from exc
    if not isinstance(data, dict):
        raise DataError(path, "LabelMe JSON must be an object", f"got {type(data).__name__}")
    for key in ("shapes", "imageHeight", "imageWidth"):
        if key not in data:
            raise DataError(path, f"LabelMe JSON lacks required key '{key}'")
    for key in ("imageHeight", "imageWidth"):
        data[key] = _size(path, key, data[key])
    if not isinstance(data["shapes"], list):
        raise DataError(path, "LabelMe 'shapes' must be a list", f"got {type(data['shapes']).__name__}")
    for index, shape in enumerate(data["shapes"]):
        _check_shape(path, index, shape)
    if not isinstance(data.get("imagePath"), str | None):
        raise DataError(path, "LabelMe imagePath must be a string or null", f"got {_short(data['imagePath'])}")
    _check_image_data(path, data)
    return data


def _size(path: Path, key: str, value) -> int:
    """imageHeight / imageWidth: a positive int; an integral float (512.0) counts as one, a bool does not."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(path, f"LabelMe {key} must be a positive integer", f"got {_short(value)}")
    return value


def _is_number(value) -> bool:
    """An int or a finite float; a bool is not a number here (ints are finite, and may exceed a float)."""
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)))


def _check_shape(path: Path, index: int, shape) -> None:
    if not isinstance(shape, dict):
        raise DataError(path, "LabelMe shape must be an object", f"shape {index}: got {_short(shape)}")
    if not isinstance(shape.get("label"), str):
        raise DataError(path, "LabelMe shape label must be a string", f"shape {index}: got {_short(shape.get('label'))}")
    kind = shape.get("shape_type")
    if kind is not None and not (isinstance(kind, str) and kind in _POINTS):
        raise DataError(path, "unsupported shape_type", f"shape {index}: {_short(kind)}; known: {', '.join(_POINTS)}")
    points = shape.get("points")
    if not (isinstance(points, list)
            and all(isinstance(p, list) and len(p) == 2 and all(map(_is_number, p)) for p in points)):
        raise DataError(path, "LabelMe shape points must be a list of [x, y] number pairs",
                        f"shape {index}: got {_short(points)}")


def _check_image_data(path: Path, data: dict) -> None:
    """imageData, unless absent or null: a base64 image file of imageHeight x imageWidth (only its header is read)."""
    raw = data.get("imageData")
    if raw is None:
        return
    if not isinstance(raw, str):
        raise DataError(path, "LabelMe imageData must be a base64 string or null", f"got {type(raw).__name__}")
    try:
        payload = base64.b64decode("".join(raw.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(path, "LabelMe imageData is not valid base64", str(exc)) from exc
    try:
        with Image.open(io.BytesIO(payload)) as image:
            width, height = image.size
    except Exception as exc:  # Pillow raises many types for a bad header; all break the same rule
        raise DataError(path, "LabelMe imageData is not a decodable image", f"{type(exc).__name__}: {exc}") from exc
    if (height, width) != (data["imageHeight"], data["imageWidth"]):
        raise DataError(path, "LabelMe imageData size differs from imageHeight/imageWidth",
                        f"imageData {height}x{width}, declared {data['imageHeight']}x{data['imageWidth']}")


def check_image_path(path: Path, data: dict, dataset_root: Path) -> None:
    """imagePath, resolved against the JSON's folder, must stay inside the dataset."""
    raw = data.get("imagePath")
    if not raw:
        return
    if "\0" in raw:
        raise DataError(path, "imagePath is not a valid path", "it holds a NUL character")
    # LabelMe written on Windows uses backslashes; treat both separators alike.
    parts = PureWindowsPath(raw).parts if "\\" in raw else PurePosixPath(raw).parts
    if PurePosixPath(raw).is_absolute() or PureWindowsPath(raw).is_absolute():
        raise DataError(path, "imagePath escapes the dataset folder", raw)
    target = (path.parent.joinpath(*parts)).resolve()
    if not target.is_relative_to(dataset_root.resolve()):
        raise DataError(path, "imagePath escapes the dataset folder", raw)


def rasterise(path: Path, data: dict, height: int, width: int, class_ids: set[int], *,
              line_width: int = LINE_WIDTH, point_size: int = POINT_SIZE) -> dict[int, np.ndarray]:
    """Per-class bool masks of shape (height, width) from a dict that ``load`` returned.

    ``line_width`` (line, linestrip) and ``point_size`` (radius of a point) default
    to labelme's values, as in its ``shape_to_mask``.
    """
    if (data["imageHeight"], data["imageWidth"]) != (height, width):
        raise DataError(
            path, "LabelMe imageHeight/imageWidth differ from the image",
            f"json {data['imageHeight']}x{data['imageWidth']}, image {height}x{width}",
        )
    masks: dict[int, np.ndarray] = {}
    for index, shape in enumerate(data["shapes"]):
        class_id = _class_id(path, index, shape, class_ids)
        mask = _shape_mask(path, index, shape, height, width, line_width, point_size)
        masks[class_id] = masks.get(class_id, np.zeros((height, width), bool)) | mask
    return masks


def _class_id(path: Path, index: int, shape: dict, class_ids: set[int]) -> int:
    label = shape["label"].strip()
    class_id = int(label) if label.isascii() and label.isdigit() else None
    if class_id not in class_ids:
        raise DataError(path, f"unknown class label {_short(label)}",
                        f"shape {index}; known ids: {sorted(class_ids)}")
    return class_id


def _shape_mask(path: Path, index: int, shape: dict, height: int, width: int,
                line_width: int, point_size: int) -> np.ndarray:
    """One shape drawn as labelme's shape_to_mask draws it (``load`` checked the types)."""
    kind = shape.get("shape_type") or "polygon"
    points = shape["points"]
    fewest, most = _POINTS[kind]
    if not fewest <= len(points) <= (most or len(points)):
        need = f"exactly {fewest}" if fewest == most else f"at least {fewest}"
        raise DataError(path, f"{kind} needs {need} points", f"shape {index} has {len(points)}")
    for x, y in points:  # exact comparisons: an int too large for a float still fails cleanly
        if not (-BOUNDS_TOLERANCE <= x <= width - 1 + BOUNDS_TOLERANCE
                and -BOUNDS_TOLERANCE <= y <= height - 1 + BOUNDS_TOLERANCE):
            raise DataError(path, "shape has a point out of the image bounds",
                            f"shape {index}: ({_short(x)}, {_short(y)}) outside {width}x{height}")
    if kind == "mask":
        return _mask_shape(path, index, shape, points, height, width)
    xy = [(float(x), float(y)) for x, y in points]
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if kind in ("polygon", "oriented_rectangle"):
        draw.polygon(xy, outline=1, fill=1)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = xy
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
    elif kind == "circle":
        (cx, cy), (px, py) = xy
        r = float(np.hypot(cx - px, cy - py))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    elif kind == "line":
        draw.line(xy, fill=1, width=line_width)
    elif kind == "linestrip":
        draw.line(xy, fill=1, width=line_width, joint="curve")
    else:  # point
        (cx, cy), r = xy[0], point_size
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    return np.asarray(canvas, dtype=bool)


def _mask_shape(path, index, shape, points, height, width) -> np.ndarray:
    """A base64 PNG whose top-left pixel is points[0], clipped to the image as labelme clips it."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(shape["mask"]))) as image:
            patch = np.asarray(image.convert("L")) > 0
    except Exception as exc:  # any decoding failure is the same broken rule
        raise DataError(path, "mask shape has an undecodable mask", f"shape {index}: {type(exc).__name__}: {exc}") from exc
    x0, y0 = (int(round(float(v))) for v in points[0])
    out = np.zeros((height, width), bool)
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y0 + patch.shape[0], height), min(x0 + patch.shape[1], width)
    if top < bottom and left < right:
        out[top:bottom, left:right] = patch[top - y0:bottom - y0, left - x0:right - x0]
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
