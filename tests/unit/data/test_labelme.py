"""LabelMe: rasterisation of every shape type (equal to labelme's), the write/read round trip, every rule, a fuzz."""

from __future__ import annotations

import base64
import copy
import io
import json
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmrad.core.errors import DataError
from mmrad.data.datasets import labelme

IDS = set(range(1, 10))


def _doc(shapes, height=40, width=50, image_path="fundus.jpg"):
    return {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
            "imageData": None, "imageHeight": height, "imageWidth": width}


def _shape(points, label="1", kind="polygon", **extra):
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}, **extra}


def _write(tmp_path, doc, name="fundus.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _masks(tmp_path, shapes, **kw):
    path = _write(tmp_path, _doc(shapes, **kw))
    data = labelme.load(path)
    labelme.check_image_path(path, data, tmp_path)
    return labelme.rasterise(path, data, kw.get("height", 40), kw.get("width", 50), IDS)


def test_polygon_fills_with_outline_like_labelme(tmp_path):
    masks = _masks(tmp_path, [_shape([[10, 5], [19, 5], [19, 14], [10, 14]], "3")])
    assert set(masks) == {3}
    # Outline included: columns 10..19 and rows 5..14 inclusive -> 10 x 10 pixels.
    assert masks[3].sum() == 100
    assert masks[3][5, 10] and masks[3][14, 19] and not masks[3][15, 10]


def test_rectangle_circle_line_point_and_mask_shapes(tmp_path):
    patch = np.zeros((4, 6), np.uint8)
    patch[1:3, 2:5] = 1
    buffer = io.BytesIO()
    Image.fromarray(patch * 255).save(buffer, format="PNG")
    shapes = [
        _shape([[30, 20], [20, 10]], "1", "rectangle"),  # corners in any order
        _shape([[10, 30], [13, 30]], "2", "circle"),  # centre, point on the rim: radius 3
        _shape([[0, 0], [9, 0]], "4", "line"),
        _shape([[40, 30]], "5", "point"),
        _shape([[40, 2], [45, 5]], "6", "mask", mask=base64.b64encode(buffer.getvalue()).decode()),
    ]
    masks = _masks(tmp_path, shapes)
    assert masks[1].sum() == 11 * 11
    assert 25 <= masks[2].sum() <= 37 and masks[2][30, 10]  # ~ pi r^2 = 28, plus outline
    assert masks[4][0, :10].all() and masks[4][:, 20:].sum() == 0
    assert masks[5][30, 40] and masks[5][25:36, 35:46].sum() == masks[5].sum() > 25  # radius 5
    assert masks[6].sum() == 6 and masks[6][3, 42]


def test_same_label_twice_is_a_union(tmp_path):
    masks = _masks(tmp_path, [_shape([[0, 0], [4, 0], [4, 4]], "7"), _shape([[20, 20], [24, 20], [24, 24]], "7")])
    assert masks[7][0:5, 0:5].any() and masks[7][20:25, 20:25].any()


def test_masks_round_trip_through_polygons(tmp_path):
    yy, xx = np.mgrid[:40, :50]
    blob = (yy - 20) ** 2 / 100 + (xx - 25) ** 2 / 196 <= 1
    dot = np.zeros_like(blob)
    dot[5, 5] = dot[5, 6] = dot[6, 5] = dot[6, 6] = True  # a 2x2 lesion must survive
    shapes = labelme.masks_to_shapes({1: blob, 9: dot})
    labelme.write(tmp_path / "fundus.json", "fundus.jpg", 40, 50, shapes)
    data = labelme.load(tmp_path / "fundus.json")
    assert data["imagePath"] == "fundus.jpg" and data["imageData"] is None
    masks = labelme.rasterise(tmp_path / "fundus.json", data, 40, 50, IDS)
    iou = (masks[1] & blob).sum() / (masks[1] | blob).sum()
    assert iou > 0.9
    assert masks[9][5:7, 5:7].all()


def _png_b64(height, width):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


_DROP = object()  # a key to remove


def _with(doc=None, **changes):
    """A valid document (one triangle) as JSON text, with top-level keys changed (_DROP: key removed)."""
    doc = dict(doc or _doc([_shape([[1, 1], [5, 5], [5, 1]])]), **changes)
    return json.dumps({k: v for k, v in doc.items() if v is not _DROP})


def _with_shape(**changes):
    shape = {k: v for k, v in {**_shape([[1, 1], [5, 5], [5, 1]]), **changes}.items() if v is not _DROP}
    return json.dumps(_doc([shape]))


@pytest.mark.parametrize(
    "doc, rule",
    [
        ("{not json", "LabelMe JSON is malformed"),
        ('{"shapes": [], "imageHeight": 1' + "0" * 5000 + ', "imageWidth": 50}', "LabelMe JSON is malformed"),
        (b'{"shapes": [], "label": "\xff\xfe"}', "LabelMe file is not UTF-8 text"),
        (json.dumps([1, 2]), "LabelMe JSON must be an object"),
        (json.dumps("text"), "LabelMe JSON must be an object"),
        (_with(shapes=_DROP), "lacks required key 'shapes'"),
        (json.dumps({"shapes": [], "imageWidth": 50}), "lacks required key 'imageHeight'"),
        (_with(imageWidth=_DROP), "lacks required key 'imageWidth'"),
        (_with(shapes={"0": {}}), "LabelMe 'shapes' must be a list"),
        (_with(shapes=[1]), "LabelMe shape must be an object"),
        (_with(shapes=[[[1, 1], [5, 5], [5, 1]]]), "LabelMe shape must be an object"),
        (_with_shape(points="1,1 5,5 5,1"), "points must be a list of [x, y] number pairs"),
        (_with_shape(points=_DROP), "points must be a list of [x, y] number pairs"),
        (_with_shape(points=[[1, 1], [5, 5, 0], [5, 1]]), "points must be a list of [x, y] number pairs"),
        (_with_shape(points=[[1, 1], [5, "5"], [5, 1]]), "points must be a list of [x, y] number pairs"),
        (_with_shape(points=[[1, 1], [5, True], [5, 1]]), "points must be a list of [x, y] number pairs"),
        (_with_shape(points=[[1, 1], [5, None], [5, 1]]), "points must be a list of [x, y] number pairs"),
        (_with_shape(points=[[1, 1], 5, [5, 1]]), "points must be a list of [x, y] number pairs"),
        (_with_shape(points=[[1, 1], [5, float("nan")], [5, 1]]), "points must be a list of [x, y] number pairs"),
        (_with_shape(label=3), "LabelMe shape label must be a string"),
        (_with_shape(label=_DROP), "LabelMe shape label must be a string"),
        (_with_shape(shape_type="cuboid"), "unsupported shape_type"),
        (_with_shape(shape_type=["polygon"]), "unsupported shape_type"),
        (_with(imageHeight=None), "LabelMe imageHeight must be a positive integer"),
        (_with(imageHeight=True), "LabelMe imageHeight must be a positive integer"),
        (_with(imageHeight="40"), "LabelMe imageHeight must be a positive integer"),
        (_with(imageHeight=40.5), "LabelMe imageHeight must be a positive integer"),
        (_with(imageHeight=0), "LabelMe imageHeight must be a positive integer"),
        (_with(imageHeight=-40), "LabelMe imageHeight must be a positive integer"),
        (_with(imageWidth=[50]), "LabelMe imageWidth must be a positive integer"),
        (_with(imagePath=7), "LabelMe imagePath must be a string or null"),
        (_with(imagePath="fundus\u0000.jpg"), "imagePath is not a valid path"),
        (_with(imageData=12), "LabelMe imageData must be a base64 string or null"),
        (_with(imageData="@@not base64@@"), "LabelMe imageData is not valid base64"),
        (_with(imageData="abc"), "LabelMe imageData is not valid base64"),  # bad padding
        (_with(imageData=base64.b64encode(b"not an image").decode()), "LabelMe imageData is not a decodable image"),
        (_with(imageData=_png_b64(30, 30)), "LabelMe imageData size differs from imageHeight/imageWidth"),
        (_with(imageData=_png_b64(50, 40)), "LabelMe imageData size differs from imageHeight/imageWidth"),  # transposed
        (json.dumps(_doc([_shape([[1, 1], [5, 5]])])), "polygon needs at least 3 points"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [80, 5]])])), "point out of the image bounds"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, -3]])])), "point out of the image bounds"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [10 ** 400, 1]])])), "point out of the image bounds"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, 1]], label="12")])), "unknown class label '12'"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, 1]], label="whitening")])), "unknown class label 'whitening'"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, 1]], label="1_0")])), "unknown class label '1_0'"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, 1]], kind="circle")])), "circle needs exactly 2 points"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, 1]], kind="line")])), "line needs exactly 2 points"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5]], kind="point")])), "point needs exactly 1 points"),
        (json.dumps(_doc([_shape([[1, 1]], kind="linestrip")])), "linestrip needs at least 2 points"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5]], kind="mask", mask="@@")])), "mask shape has an undecodable mask"),
        (json.dumps(_doc([], height=41)), "LabelMe imageHeight/imageWidth differ from the image"),
    ],
)
def test_each_rule_names_the_file(tmp_path, doc, rule):
    path = tmp_path / "oct.json"
    path.write_bytes(doc if isinstance(doc, bytes) else doc.encode())
    with pytest.raises(DataError) as info:
        data = labelme.load(path)
        labelme.check_image_path(path, data, tmp_path)
        labelme.rasterise(path, data, 40, 50, IDS)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and rule in message and "\n" not in message


def test_integral_float_sizes_bom_and_matching_image_data_are_accepted(tmp_path):
    doc = _doc([_shape([[1, 1], [5, 5], [5, 1]])], height=40.0, width=50.0)
    doc["imageData"] = _png_b64(40, 50)
    path = tmp_path / "fundus.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())  # a UTF-8 byte-order mark
    data = labelme.load(path)
    assert (data["imageHeight"], data["imageWidth"]) == (40, 50) and type(data["imageHeight"]) is int
    assert labelme.rasterise(path, data, 40, 50, IDS)[1].any()


def _labelme_rule(height, width, points, kind, line_width=10, point_size=5):
    """labelme's shape_to_mask rule, written out from its description, for comparison."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    xy = [tuple(p) for p in points]
    if kind == "line":
        draw.line(xy, fill=1, width=line_width)
    elif kind == "linestrip":
        draw.line(xy, fill=1, width=line_width, joint="curve")
    elif kind == "point":
        (cx, cy), r = xy[0], point_size
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    elif kind == "circle":
        (cx, cy), (px, py) = xy
        r = ((cx - px) ** 2 + (cy - py) ** 2) ** 0.5
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = xy
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
    else:
        draw.polygon(xy, outline=1, fill=1)
    return np.asarray(canvas, dtype=bool)


@pytest.mark.parametrize("points, kind", [
    ([[3, 4], [40, 30]], "line"),
    ([[0, 20], [49, 20]], "line"),
    ([[5.5, 5], [20, 30.25], [45, 10], [30, 2]], "linestrip"),
    ([[25, 20]], "point"),
    ([[0.5, 39]], "point"),
    ([[10, 30], [13, 34]], "circle"),
    ([[30, 20], [20, 10.5]], "rectangle"),
    ([[2, 3], [30, 8], [18, 35.5], [4, 20]], "polygon"),
])
def test_shapes_equal_labelme_shape_to_mask(tmp_path, points, kind):
    masks = _masks(tmp_path, [_shape(points, "2", kind)])
    expected = _labelme_rule(40, 50, points, kind)
    assert masks[2].dtype == bool and np.array_equal(masks[2], expected)


def test_line_width_and_point_size_are_parameters_with_labelme_defaults(tmp_path):
    assert (labelme.LINE_WIDTH, labelme.POINT_SIZE) == (10, 5)
    path = _write(tmp_path, _doc([_shape([[5, 20], [45, 20]], "1", "line"), _shape([[25, 5]], "2", "point")]))
    data = labelme.load(path)
    thin = labelme.rasterise(path, data, 40, 50, IDS, line_width=3, point_size=2)
    assert np.array_equal(thin[1], _labelme_rule(40, 50, [[5, 20], [45, 20]], "line", line_width=3))
    assert np.array_equal(thin[2], _labelme_rule(40, 50, [[25, 5]], "point", point_size=2))
    assert thin[1].sum() < labelme.rasterise(path, data, 40, 50, IDS)[1].sum()


# --- fuzz ------------------------------------------------------------------------------

_WRONG = [None, True, False, 0, -3, 2.5, 1e308, 10 ** 40, "", "x", "3", [], {}, [1], [[1, 2, 3]], {"a": 1}, [None, 1]]


def _fuzz_base() -> dict:
    doc = _doc([
        _shape([[2, 3], [30, 8], [18, 35]], "1"),
        _shape([[30, 20], [20, 10]], "2", "rectangle"),
        _shape([[10, 30], [13, 30]], "3", "circle"),
        _shape([[0, 0], [9, 0]], "4", "line"),
        _shape([[5, 5], [20, 30], [45, 10]], "5", "linestrip"),
        _shape([[40, 30]], "6", "point"),
    ])
    doc["imageData"] = _png_b64(40, 50)
    return doc


def _paths(node, prefix=()):
    """Every key path into a JSON tree (each dict key and list index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _corrupt(rng: random.Random, base: dict, case: int) -> bytes:
    raw = json.dumps(base).encode()
    kind = case % 4
    if kind == 0:  # random byte flips: mostly to printable ASCII (any byte breaks UTF-8 too often)
        data = bytearray(raw)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256) if rng.random() < 0.2 else rng.randrange(32, 127)
        return bytes(data)
    if kind == 1:  # truncation at a random point
        return raw[:rng.randrange(len(raw))]
    doc = copy.deepcopy(base)
    if kind == 2:  # a wrong type substituted for a random field
        *parents, last = rng.choice(list(_paths(doc)))
        node = doc
        for key in parents:
            node = node[key]
        node[last] = copy.deepcopy(rng.choice(_WRONG))
    else:  # wrong image sizes, declared or embedded
        choice = rng.randrange(3)
        if choice == 0:
            doc[rng.choice(["imageHeight", "imageWidth"])] = rng.choice([0, -1, 39, 41, 40.0, 50.0, 40.5, 10 ** 9])
        elif choice == 1:
            doc["imageData"] = _png_b64(rng.randint(1, 60), rng.randint(1, 60))
        else:
            doc["imageData"] = doc["imageData"][:rng.randrange(len(doc["imageData"]))]
    return json.dumps(doc).encode()


def test_fuzzed_files_load_or_fail_with_a_data_error_naming_the_file(tmp_path):
    rng = random.Random(0)
    base = _fuzz_base()
    loaded = failed = 0
    for case in range(100):
        path = tmp_path / f"case_{case:03d}.json"
        path.write_bytes(_corrupt(rng, base, case))
        try:
            data = labelme.load(path)
            labelme.check_image_path(path, data, tmp_path)
            masks = labelme.rasterise(path, data, 40, 50, IDS)
        except DataError as exc:
            assert str(path) in str(exc), str(exc)
            assert "\n" not in str(exc)
            failed += 1
        else:
            assert all(m.dtype == bool and m.shape == (40, 50) for m in masks.values())
            loaded += 1
    assert loaded >= 5 and failed >= 50  # both outcomes are exercised (seed 0: 11 and 89)


@pytest.mark.parametrize("image_path", ["../../../../outside.jpg", "/etc/passwd", "..\\..\\..\\..\\outside.jpg", "C:\\data\\x.jpg"])
def test_image_path_may_not_escape_the_dataset(tmp_path, image_path):
    case = tmp_path / "MMR" / "test" / "anomaly" / "case_1"
    case.mkdir(parents=True)
    path = _write(case, _doc([], image_path=image_path))
    with pytest.raises(DataError, match="imagePath escapes the dataset folder") as info:
        labelme.check_image_path(path, labelme.load(path), tmp_path / "MMR")
    assert str(path) in str(info.value)


def test_windows_separators_inside_the_dataset_are_fine(tmp_path):
    case = tmp_path / "MMR" / "test" / "anomaly" / "case_1"
    case.mkdir(parents=True)
    path = _write(case, _doc([], image_path="..\\case_1\\fundus.jpg"))
    labelme.check_image_path(path, labelme.load(path), tmp_path / "MMR")
