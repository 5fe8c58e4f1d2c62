"""Image decoding rules (mmrad.core.io.read_image / image_size; docs/data.md, "Image decoding rules").

Every case writes real files to tmp_path and reads them back through read_image: 16-bit samples scaled by
round(v * 255 / 65535), palettes, CMYK, alpha over black, the pixel limit before decoding, and broken files
(truncated, corrupt JPEG data, PNG CRCs, a seeded fuzz run) giving DataError and nothing else.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from mmrad.core.errors import DataError
from mmrad.core.io import MAX_IMAGE_PIXELS, image_size, read_image

CORRUPT = "image is corrupt or truncated"
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


@pytest.fixture(autouse=True)
def _no_warning_escapes():
    """Any warning (Pillow's DecompressionBombWarning included) that leaves read_image fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def rule16(values) -> np.ndarray:
    """The documented rule, in floating point: round(v * 255 / 65535) (no ties occur)."""
    return np.round(np.asarray(values, dtype=np.float64) * 255 / 65535).astype(np.uint8)


def over_black(colour, alpha) -> np.ndarray:
    colour, alpha = np.asarray(colour, np.float64), np.asarray(alpha, np.float64)
    if colour.ndim == alpha.ndim + 1:
        alpha = alpha[..., None]
    return np.round(colour * alpha / 255).astype(np.uint8)


def luma(rgb) -> np.ndarray:
    """ITU-R 601-2 luma as Pillow computes it: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    rgb = np.asarray(rgb, np.int64)
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) >> 16).astype(np.uint8)


def png_bytes(samples: np.ndarray, colour_type: int, interlace: bool = False) -> bytes:
    """A PNG of 8- or 16-bit samples (uint8 / uint16), which Pillow cannot write for 16-bit colour."""
    samples = samples if samples.ndim == 3 else samples[..., None]
    height, width = samples.shape[:2]
    stored = samples.astype(">u2") if samples.dtype == np.uint16 else samples
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    raw = b"".join(b"\x00" + row.tobytes() for x0, y0, dx, dy in passes for row in stored[y0::dy, x0::dx]
                   if row.size)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    depth = 16 if samples.dtype == np.uint16 else 8
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def pillow(path) -> Image.Image:
    """What Pillow alone makes of a file (decoded, the file closed)."""
    with Image.open(path) as image:
        image.load()
    return image


def save(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


def rng_image(rng, height, width, channels=3) -> np.ndarray:
    """Smooth content with some noise: compresses like a photograph, not like white noise."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 3 + y) % 256, (y * 2) % 256, (x + 2 * y) % 256][:channels], axis=-1)
    return np.clip(base + rng.integers(0, 24, base.shape), 0, 255).astype(np.uint8).squeeze()


def jpeg_scan(data: bytes) -> tuple[int, int]:
    """Where the entropy-coded data of a one-scan JPEG starts and ends (before EOI)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"), data.rindex(b"\xff\xd9")


# --- 16-bit samples -----------------------------------------------------------------------------------------

def test_16_bit_grey_png_known_values(tmp_path):
    values = np.array([[0, 65535, 32768, 128, 129, 257 * 7], [257, 32767, 32896, 65407, 65408, 1000]], np.uint16)
    path = save(Image.fromarray(values), tmp_path / "oct16.png")
    assert pillow(path).mode == "I;16"  # (Pillow's convert("L") would clip: 0, 255, 255, 128, 129, 255)

    grey = read_image(path, mode="L")
    assert grey.dtype == np.uint8 and grey.shape == values.shape
    assert grey[0].tolist() == [0, 255, 128, 0, 1, 7]
    np.testing.assert_array_equal(grey, rule16(values))
    np.testing.assert_array_equal(read_image(path, mode="RGB"), np.repeat(rule16(values)[..., None], 3, axis=2))
    stored = read_image(path)
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, values)


def test_the_16_bit_rule_on_every_value(tmp_path):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    path = save(Image.fromarray(values), tmp_path / "all.png")
    np.testing.assert_array_equal(read_image(path, mode="L"), rule16(values))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grey_tiff(tmp_path, mode):
    values = np.array([[0, 65535, 32768], [128, 129, 4095]], np.uint16)
    image = Image.frombytes(mode, (3, 2), values.astype(">u2" if mode.endswith("B") else "<u2").tobytes())
    path = save(image, tmp_path / "oct16.tif")
    assert pillow(path).mode == mode
    np.testing.assert_array_equal(read_image(path, mode="L"), rule16(values))


@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "adam7"])
def test_16_bit_colour_png_uses_all_16_bits(tmp_path, interlace):
    """Pillow opens 48-bit PNGs as 8-bit "RGB" keeping each sample's high byte; read_image reads both bytes."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    rgb[0, :4] = [[0, 65535, 32768], [128, 129, 257 * 9], [255, 256, 32767], [65407, 65408, 1]]
    path = tmp_path / "fundus48.png"
    path.write_bytes(png_bytes(rgb, colour_type=2, interlace=interlace))
    assert pillow(path).mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pillow(path)), (rgb >> 8).astype(np.uint8))  # what Pillow gives

    out = read_image(path, mode="RGB")
    assert out[0, 0].tolist() == [0, 255, 128] and out[0, 1].tolist() == [0, 1, 9]
    np.testing.assert_array_equal(out, rule16(rgb))
    np.testing.assert_array_equal(read_image(path, mode="L"), luma(rule16(rgb)))
    stored = read_image(path)
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, rgb)


def test_16_bit_rgba_and_grey_alpha_png(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 65536, (7, 5, 4), dtype=np.uint16)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 65535
    (tmp_path / "rgba64.png").write_bytes(png_bytes(rgba, colour_type=6))
    expected = over_black(rule16(rgba[..., :3]), rule16(rgba[..., 3]))
    np.testing.assert_array_equal(read_image(tmp_path / "rgba64.png", mode="RGB"), expected)
    assert read_image(tmp_path / "rgba64.png", mode="RGB")[0, 0].tolist() == [0, 0, 0]

    grey_alpha = rng.integers(0, 65536, (7, 5, 2), dtype=np.uint16)
    (tmp_path / "la32.png").write_bytes(png_bytes(grey_alpha, colour_type=4))
    expected = over_black(rule16(grey_alpha[..., 0]), rule16(grey_alpha[..., 1]))
    np.testing.assert_array_equal(read_image(tmp_path / "la32.png", mode="L"), expected)
    np.testing.assert_array_equal(read_image(tmp_path / "la32.png"), grey_alpha)


def test_16_bit_rgb_tiff_and_planar_refused(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rgb = np.random.default_rng(2).integers(0, 65536, (6, 8, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb48.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb48.tif", mode="RGB"), rule16(rgb))
    # samples in separate planes: Pillow reads the 16-bit planes as 8-bit bytes (garbage), so refused
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, 2, 0), photometric="rgb", planarconfig="separate")
    with pytest.raises(DataError, match=r"planar\.tif: image mode is not supported \(TIFF with 16-bit samples"):
        read_image(tmp_path / "planar.tif", mode="RGB")


def test_32_bit_integer_image(tmp_path):
    values = np.array([[0, 65535, 32768], [128, 129, 1000]], np.int32)
    path = save(Image.fromarray(values), tmp_path / "int32.tif")
    assert pillow(path).mode == "I"
    np.testing.assert_array_equal(read_image(path, mode="L"), rule16(values))
    for bad in (65536, -1):
        values[1, 2] = bad
        path = save(Image.fromarray(values), tmp_path / f"int32_{bad}.tif")
        with pytest.raises(DataError, match=rf"int32_{bad}\.tif: image values are outside the 16-bit range "
                                            rf"\(mode I, values {min(bad, 0)}\.\.{max(bad, 65535)}"):
            read_image(path, mode="L")
    assert read_image(path).dtype == np.int32  # stored samples: no rule needed


def test_float_image_refused(tmp_path):
    path = save(Image.fromarray(np.array([[0.0, 0.5], [1.0, 2.0]], np.float32)), tmp_path / "float.tif")
    with pytest.raises(DataError, match=r"float\.tif: floating-point image has no 8-bit scaling rule \(mode F"):
        read_image(path, mode="L")
    assert read_image(path).dtype == np.float32


# --- palette, CMYK, alpha, 1-bit ----------------------------------------------------------------------------

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [10, 20, 30]], np.uint8)
INDICES = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 3, 3]], np.uint8)


def palette_image() -> Image.Image:
    image = Image.frombytes("P", (4, 3), INDICES.tobytes())
    image.putpalette(PALETTE.ravel().tolist())
    return image


def test_palette_expanded(tmp_path):
    path = save(palette_image(), tmp_path / "palette.png")
    assert pillow(path).mode == "P"
    np.testing.assert_array_equal(read_image(path, mode="RGB"), PALETTE[INDICES])
    np.testing.assert_array_equal(read_image(path, mode="L"), luma(PALETTE[INDICES]))
    np.testing.assert_array_equal(read_image(path), INDICES)  # stored: the indices


def test_palette_with_transparency_over_black(tmp_path):
    alpha = np.array([255, 128, 0, 64], np.uint8)
    path = save(palette_image(), tmp_path / "palette_trns.png", transparency=alpha.tobytes())
    assert "transparency" in pillow(path).info
    expected = over_black(PALETTE[INDICES], alpha[INDICES])
    assert expected[0, 1].tolist() == [128, 0, 0] and expected[0, 2].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(read_image(path, mode="RGB"), expected)
    np.testing.assert_array_equal(read_image(path, mode="L"), luma(expected))


def test_cmyk_tiff_and_jpeg(tmp_path):
    rng = np.random.default_rng(3)
    cmyk = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    cmyk[0, 0], cmyk[0, 1], cmyk[0, 2] = [0, 0, 0, 0], [255, 255, 255, 255], [255, 0, 128, 0]
    path = save(Image.frombytes("CMYK", (6, 5), cmyk.tobytes()), tmp_path / "cmyk.tif")
    white = 255 - cmyk.astype(np.float64)
    expected = np.round(white[..., :3] * white[..., 3:] / 255).astype(np.uint8)
    assert expected[0, :3].tolist() == [[255, 255, 255], [0, 0, 0], [0, 255, 127]]
    out = read_image(path, mode="RGB")
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(read_image(path, mode="L"), luma(expected))

    jpeg = save(Image.frombytes("CMYK", (6, 5), cmyk.tobytes()), tmp_path / "cmyk.jpg", quality=95)
    decoded = 255 - np.asarray(pillow(jpeg)).astype(np.float64)  # the decoder's (lossy) CMYK
    assert pillow(jpeg).mode == "CMYK"
    np.testing.assert_array_equal(read_image(jpeg, mode="RGB"),
                                  np.round(decoded[..., :3] * decoded[..., 3:] / 255).astype(np.uint8))


def test_alpha_over_black(tmp_path):
    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    path = save(Image.fromarray(rgba), tmp_path / "rgba.png")
    expected = over_black(rgba[..., :3], rgba[..., 3])
    assert expected[0, 0].tolist() == [0, 0, 0] and expected[0, 1].tolist() == rgba[0, 1, :3].tolist()
    np.testing.assert_array_equal(read_image(path, mode="RGB"), expected)
    np.testing.assert_array_equal(read_image(path, mode="L"), luma(expected))
    assert read_image(path).shape == (6, 7, 4)

    opaque = rgba.copy()
    opaque[..., 3] = 255
    np.testing.assert_array_equal(read_image(save(Image.fromarray(opaque), tmp_path / "opaque.png"), mode="RGB"),
                                  opaque[..., :3])

    grey_alpha = rgba[..., :2]
    path = save(Image.frombytes("LA", (7, 6), grey_alpha.tobytes()), tmp_path / "la.png")
    assert pillow(path).mode == "LA"
    expected = over_black(grey_alpha[..., 0], grey_alpha[..., 1])
    np.testing.assert_array_equal(read_image(path, mode="L"), expected)
    np.testing.assert_array_equal(read_image(path, mode="RGB"), np.repeat(expected[..., None], 3, axis=2))


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_1_bit_images(tmp_path, suffix):
    bits = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]], bool)
    path = save(Image.frombytes("1", (5, 2), np.packbits(bits, axis=1).tobytes()), tmp_path / f"mask{suffix}")
    assert pillow(path).mode == "1"
    np.testing.assert_array_equal(read_image(path, mode="L"), bits * np.uint8(255))
    np.testing.assert_array_equal(read_image(path, mode="RGB"), np.repeat(bits[..., None] * np.uint8(255), 3, 2))


def test_rgb_to_grey_is_601_luma_and_grey_to_rgb_repeats(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = save(Image.fromarray(rgb), tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(path, mode="RGB"), rgb)
    np.testing.assert_array_equal(read_image(path, mode="L"), luma(rgb))
    grey = save(Image.fromarray(rgb[..., 0]), tmp_path / "grey.png")
    np.testing.assert_array_equal(read_image(grey, mode="RGB"), np.repeat(rgb[..., :1], 3, axis=2))


def test_unsupported_mode_and_format(tmp_path):
    path = save(Image.new("LAB", (4, 3)), tmp_path / "lab.tif")
    with pytest.raises(DataError, match=r"lab\.tif: image mode is not supported \(mode LAB\)"):
        read_image(path, mode="RGB")
    gif = save(Image.new("P", (4, 3)), tmp_path / "animation.gif")
    with pytest.raises(DataError, match=rf"animation\.gif: {CORRUPT} \(not a JPEG, PNG, BMP or TIFF file"):
        read_image(gif, mode="RGB")
    with pytest.raises(ValueError, match="mode must be"):
        read_image(gif, mode="RGBA")


# --- the pixel limit ----------------------------------------------------------------------------------------

def test_pixel_limit_checked_from_the_header(tmp_path):
    assert MAX_IMAGE_PIXELS >= 4288 * 2848 * 4  # far above IDRiD's fundus photographs
    path = save(Image.fromarray(rng_image(np.random.default_rng(6), 30, 40)), tmp_path / "fundus.png")
    message = (r"fundus\.png: image is larger than the pixel limit \(40x30 = 1200 pixels, limit 1000; "
               r"raise prepare\.max_image_pixels in params\.yaml")
    with pytest.raises(DataError, match=message) as caught:
        read_image(path, mode="RGB", max_pixels=1000)
    assert caught.value.rule == "image is larger than the pixel limit" and "\n" not in str(caught.value)
    with pytest.raises(DataError, match=message):
        image_size(path, max_pixels=1000)
    assert read_image(path, mode="RGB", max_pixels=1200).shape == (30, 40, 3)
    assert image_size(path, max_pixels=1200) == (30, 40)


def test_pixel_limit_checked_before_decoding(tmp_path):
    """A header promising 10^10 pixels (past Pillow's own refusal too) fails on its size, never decoded."""
    header = png_bytes(np.zeros((1, 1), np.uint8), colour_type=0)[:33]
    big = bytearray(header)
    big[16:24] = struct.pack(">II", 100_000, 100_000)
    big[29:33] = struct.pack(">I", zlib.crc32(bytes(big[12:29])))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(big) + b"\x00\x00\x00\x00IEND\xaeB`\x82")  # no image data at all
    for call in (read_image, image_size):
        with pytest.raises(DataError, match=r"bomb\.png: image is larger than the pixel limit \(100000x100000"):
            call(path)


def test_our_limit_replaces_pillows(tmp_path, monkeypatch):
    """Pillow warns past Image.MAX_IMAGE_PIXELS and refuses past twice that; neither escapes, ours applies."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    rng = np.random.default_rng(7)
    warned = save(Image.fromarray(rng_image(rng, 20, 40)), tmp_path / "warned.png")  # 800 px: Pillow warns
    refused = save(Image.fromarray(rng_image(rng, 40, 40)), tmp_path / "refused.jpg")  # 1600 px: Pillow refuses
    with pytest.raises(Image.DecompressionBombError):
        Image.open(refused)
    assert read_image(warned, mode="RGB").shape == (20, 40, 3)
    assert read_image(refused, mode="L").shape == (40, 40)
    assert image_size(refused) == (40, 40)
    with pytest.raises(DataError, match=r"refused\.jpg: image is larger than the pixel limit \(40x40 = 1600"):
        read_image(refused, mode="L", max_pixels=1500)
    assert Image.MAX_IMAGE_PIXELS == 500  # Pillow's global left as it was


# --- broken files -------------------------------------------------------------------------------------------

@pytest.fixture
def good_jpeg(tmp_path) -> bytes:
    path = save(Image.fromarray(rng_image(np.random.default_rng(8), 64, 80)), tmp_path / "good.jpg", quality=90)
    return path.read_bytes()


@pytest.fixture
def good_png(tmp_path) -> bytes:
    return save(Image.fromarray(rng_image(np.random.default_rng(9), 48, 56)), tmp_path / "good.png").read_bytes()


def test_missing_and_not_an_image(tmp_path):
    with pytest.raises(DataError, match=r"absent\.png: image file is missing"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(DataError, match=r"absent\.png: image file is missing"):
        image_size(tmp_path / "absent.png")
    (tmp_path / "notes.png").write_text("not an image")
    for call in (read_image, image_size):
        with pytest.raises(DataError, match=rf"notes\.png: {CORRUPT}"):
            call(tmp_path / "notes.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=rf"empty\.jpg: {CORRUPT}"):
        read_image(tmp_path / "empty.jpg")


@pytest.mark.parametrize("keep", [0.5, 0.9, -2])
def test_truncated_jpeg_and_png(tmp_path, good_jpeg, good_png, keep):
    for name, data in (("cut.jpg", good_jpeg), ("cut.png", good_png)):
        path = tmp_path / name
        path.write_bytes(data[:int(len(data) * keep)] if keep > 0 else data[:keep])
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: {CORRUPT} \((JPEG|PNG): "):
            read_image(path, mode="RGB")


def test_png_with_a_flipped_bit_in_its_image_data(tmp_path, good_png):
    """Pillow checks no CRC of the image data (IDAT): a flipped bit may decode to wrong pixels; ours fails."""
    data = bytearray(good_png)
    idat = data.index(b"IDAT")
    data[idat + 4 + 40] ^= 0x01
    (tmp_path / "flipped.png").write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"flipped\.png: {CORRUPT} \(PNG: chunk IDAT at byte {idat - 4} fails its CRC"):
        read_image(tmp_path / "flipped.png", mode="RGB")
    (tmp_path / "trailing.png").write_bytes(good_png + b"anything after IEND")
    np.testing.assert_array_equal(read_image(tmp_path / "trailing.png"), read_image(tmp_path / "good.png"))


def _corrupt_jpeg(data: bytes, how: str) -> bytes:
    start, end = jpeg_scan(data)
    mid = (start + end) // 2
    if how == "garbage after the scan's data":  # libjpeg: "Corrupt JPEG data: 100 extraneous bytes before marker 0xd9"
        return data[:end] + bytes(range(1, 101)) + data[end:]
    if how == "scan data cut short":  # libjpeg: "Corrupt JPEG data: premature end of data segment"
        return data[:end - 40] + data[end:]
    if how == "invalid marker inside the scan":  # libjpeg: premature end of data segment, then extraneous bytes
        return data[:mid] + b"\xff\x01garbage" + data[mid:]
    if how == "garbage between segments":  # libjpeg: "Corrupt JPEG data: 5 extraneous bytes before marker 0xc4"
        dht = data.index(b"\xff\xc4")
        return data[:dht] + b"junk!" + data[dht:]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["garbage after the scan's data", "scan data cut short",
                                 "invalid marker inside the scan", "garbage between segments"])
def test_corrupt_jpeg_data(tmp_path, good_jpeg, how):
    """Cases libjpeg reports as "Corrupt JPEG data" warnings that Pillow discards: DataError here."""
    bad = _corrupt_jpeg(good_jpeg, how)
    Image.open(io.BytesIO(bad)).load()  # Pillow alone accepts it, with made-up pixels
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(bad)
    with pytest.raises(DataError, match=rf"corrupt\.jpg: {CORRUPT} \(JPEG: "):
        read_image(path, mode="RGB")


def test_jpeg_restart_markers_checked(tmp_path):
    image = Image.fromarray(rng_image(np.random.default_rng(10), 128, 64))  # 8 MCU rows: RST0..RST6
    data = save(image, tmp_path / "rst.jpg", quality=90, restart_marker_rows=1).read_bytes()
    np.testing.assert_array_equal(read_image(tmp_path / "rst.jpg"), np.asarray(pillow(tmp_path / "rst.jpg")))
    rst3 = data.index(b"\xff\xd3")
    (tmp_path / "lost.jpg").write_bytes(data[:rst3] + data[rst3 + 2:])
    with pytest.raises(DataError, match=rf"lost\.jpg: {CORRUPT} \(JPEG: "):
        read_image(tmp_path / "lost.jpg")


@pytest.mark.parametrize("options", [dict(quality=90), dict(quality=95, subsampling=0), dict(progressive=True),
                                     dict(restart_marker_blocks=3), dict(quality=50, mode="L"), dict(mode="CMYK")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_valid_jpegs_decode_to_pillows_pixels(tmp_path, options):
    options = dict(options)
    mode = options.pop("mode", "RGB")
    image = Image.fromarray(rng_image(np.random.default_rng(11), 37, 53)).convert(mode)
    path = save(image, tmp_path / "valid.jpg", **options)
    np.testing.assert_array_equal(read_image(path), np.asarray(pillow(path)))


def test_undetectable_jpeg_damage_decodes_like_pillow(tmp_path, good_jpeg):
    """A flipped bit inside entropy-coded data that keeps the data's length consistent decodes silently in
    libjpeg too: read_image then returns the decoder's pixels (or DataError), never anything else."""
    start, end = jpeg_scan(good_jpeg)
    outcomes = set()
    for offset in range(start + 50, end - 50, 97):
        data = bytearray(good_jpeg)
        data[offset] ^= 0x04
        path = tmp_path / "flip.jpg"
        path.write_bytes(bytes(data))
        try:
            pixels = read_image(path, mode="RGB")
        except DataError as exc:
            assert str(exc).startswith(f"{path}: {CORRUPT}")
            outcomes.add("DataError")
        else:
            np.testing.assert_array_equal(pixels, np.asarray(Image.open(io.BytesIO(bytes(data)))))
            outcomes.add("accepted")
    assert "accepted" in outcomes  # such damage exists: docs/data.md says so


# --- fuzz ---------------------------------------------------------------------------------------------------

def test_fuzzed_images_give_pixels_or_data_error(tmp_path):
    """100 corrupted files (seed 0): a uint8 array of the header's size, or a DataError naming the file."""
    rng = np.random.default_rng(0)
    sources = []
    for height, width in ((17, 23), (40, 64), (96, 72)):
        pixels = rng_image(rng, height, width)
        for suffix, options in ((".png", {}), (".jpg", dict(quality=85))):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG" if suffix == ".png" else "JPEG", **options)
            sources.append((suffix, buffer.getvalue()))
    outcomes = {".png": {"accepted": 0, "DataError": 0}, ".jpg": {"accepted": 0, "DataError": 0}}
    for case in range(100):
        suffix, original = sources[case % len(sources)]
        data = bytearray(original)
        how = case % 3
        if how == 0:  # bit flips
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        elif how == 1:  # truncation
            data = data[:int(rng.integers(1, len(data)))]
        else:  # random bytes inserted
            at = int(rng.integers(len(data)))
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
        path = tmp_path / f"fuzz{case:03d}{suffix}"
        path.write_bytes(bytes(data))
        mode = "RGB" if case % 2 else "L"
        try:
            pixels = read_image(path, mode=mode)
        except DataError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
            outcomes[suffix]["DataError"] += 1
            continue
        outcomes[suffix]["accepted"] += 1
        assert pixels.dtype == np.uint8 and pixels.ndim == (3 if mode == "RGB" else 2)
        assert pixels.shape[:2] == image_size(path)
        if suffix == ".png":  # every chunk's CRC held: the file is intact up to IEND, the pixels exact
            np.testing.assert_array_equal(pixels, np.asarray(Image.open(io.BytesIO(original)).convert(mode)))
    # (seed 0: PNG 50 of 50 refused, every damage breaks a CRC or the structure; JPEG 37 of 50 refused, the
    # rest is damage inside entropy-coded data that libjpeg decodes silently too)
    assert outcomes[".png"]["DataError"] >= 45 and outcomes[".jpg"]["DataError"] >= 20, outcomes
