"""LabelMe: rasterisation of every shape type, the write/read round trip, and every rule."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

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
    assert masks[5][30, 40] and masks[5].sum() <= 25
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


@pytest.mark.parametrize(
    "doc, rule",
    [
        ("{not json", "LabelMe JSON is malformed"),
        (json.dumps([1, 2]), "LabelMe JSON must be an object"),
        (json.dumps({"shapes": [], "imageWidth": 50}), "lacks required key 'imageHeight'"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5]])])), "polygon needs at least 3 points"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [80, 5]])])), "point out of the image bounds"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, -3]])])), "point out of the image bounds"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, 1]], label="12")])), "unknown class label '12'"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, 1]], label="whitening")])), "unknown class label 'whitening'"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, 1]], kind="cuboid")])), "unsupported shape_type 'cuboid'"),
        (json.dumps(_doc([_shape([[1, 1], [5, 5], [5, 1]], kind="circle")])), "circle needs exactly 2 points"),
        (json.dumps(_doc([], height=41)), "LabelMe imageHeight/imageWidth differ from the image"),
    ],
)
def test_each_rule_names_the_file(tmp_path, doc, rule):
    path = tmp_path / "oct.json"
    path.write_text(doc)
    with pytest.raises(DataError) as info:
        data = labelme.load(path)
        labelme.rasterise(path, data, 40, 50, IDS)
    assert str(path) in str(info.value) and rule in str(info.value)


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
