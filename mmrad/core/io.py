"""File helpers shared by every stage: validated image reads, hashes.

Writing outputs (atomically, never over a user's files) is mmrad.core.outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import sys
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from mmrad.core.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


MAX_IMAGE_PIXELS = 100_000_000
"""read_image's and image_size's pixel limit when ``max_pixels`` is None (the stages pass
``prepare.max_image_pixels``): far above any real fundus photograph or OCT scan (IDRiD's 4288 x 2848 are
12.2 M pixels), checked from the header before anything is decoded."""

# What a dataset's images may be (IMAGE_SUFFIXES); Pillow's other plugins never see our files (EPS would run Ghostscript).
_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")
_CORRUPT = "image is corrupt or truncated"
_TOO_LARGE = "image is larger than the pixel limit"
_UNSUPPORTED = "image mode is not supported"
_GREY16 = ("I;16", "I;16B", "I;16L", "I;16N")
# Pillow's modes read_image converts to "RGB" / "L" (docs/data.md, "Image decoding rules")
_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", *_GREY16)


def read_image(path: str | Path, mode: str | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image fully, turning every decoder failure into a DataError.

    ``mode`` "RGB" gives (H, W, 3) uint8 and "L" gives (H, W) uint8 by the rules of docs/data.md
    ("Image decoding rules"): 16-bit samples become round(v * 255 / 65535), alpha is applied over black,
    palettes are expanded, CMYK is (255 - C)(255 - K) / 255, grey from colour is ITU-R 601-2 luma.
    None returns the samples as stored (uint8; uint16 for 16-bit files; Pillow's int32 "I" and float32 "F"),
    for masks, where every non-zero value counts.

    Before anything is decoded: the size from the header against ``max_pixels`` (None: MAX_IMAGE_PIXELS),
    libjpeg's warnings on a JPEG (simplejpeg, strict), every PNG chunk's CRC. A truncated or broken file fails here, with
    ``<file>: <rule> (<detail>)``, rather than producing a half-grey image later.
    """
    if mode not in (None, "RGB", "L"):
        raise ValueError(f"read_image: mode must be None, 'RGB' or 'L', not {mode!r}")
    path = Path(path)
    data = _read_bytes(path)
    _check_container(path, data)
    with _decoding(path), _open(path, io.BytesIO(data), max_pixels) as image:
        if image.format == "TIFF":
            _check_tiff_samples(path, image)
        if mode is None:
            return _stored(path, image, data)
        if image.mode == "F":
            raise DataError(path, "floating-point image has no 8-bit scaling rule",
                            "mode F: export it as 8- or 16-bit integers")
        if image.mode not in _MODES:
            raise DataError(path, _UNSUPPORTED, f"mode {image.mode}")
        colour, alpha = _samples8(path, image, data)
    return _to_mode(colour, alpha, mode)


def image_size(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) from the header, without decoding the pixels.

    The header rules of read_image apply: a missing or unidentifiable file, an empty image, the pixel limit.
    """
    path = Path(path)
    data = _read_bytes(path)
    with _decoding(path), _open(path, io.BytesIO(data), max_pixels) as image:
        width, height = image.size
    return height, width


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(path, "image file is missing")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(path, "image file cannot be read", _one_line(exc)) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """Pillow's warnings as errors, and every failure of a decoder as a DataError.

    Pillow warns about some broken files instead of failing (corrupt EXIF or TIFF tags, a malformed MPO);
    here those fail. Its DecompressionBombWarning is silenced: our pixel limit applies instead (_open).
    catch_warnings sets the process's filters, not a thread's (Python 3.11): the stages decode one image at a
    time per process (prepare's Dask workers run one thread each).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("error", RuntimeWarning)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except (DataError, MemoryError):
            raise
        except Image.DecompressionBombError as exc:  # only from a frame that a header did not announce (MPO)
            raise DataError(path, _TOO_LARGE, _one_line(exc)) from exc
        except Exception as exc:  # a decoder fed bad bytes raises anything: OSError, SyntaxError, struct.error, ...
            raise DataError(path, _CORRUPT, _one_line(exc)) from exc


def _open(path: Path, fp: io.BytesIO, max_pixels: int | None) -> Image.Image:
    """The image with its header read and nothing decoded, within the pixel limit."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    image = _open_header(path, fp)
    width, height = image.size
    if width * height == 0:
        image.close()
        raise DataError(path, "image is empty", f"{width}x{height}")
    if width * height > limit:
        image.close()
        raise DataError(path, _TOO_LARGE, f"{width}x{height} = {width * height} pixels, limit {limit}; "
                                          "raise prepare.max_image_pixels in params.yaml to read it")
    return image


def _open_header(path: Path, fp: io.BytesIO) -> Image.Image:
    try:
        return Image.open(fp, formats=_FORMATS)
    except UnidentifiedImageError as exc:
        raise DataError(path, _CORRUPT, "not a JPEG, PNG, BMP or TIFF file that Pillow can read") from exc
    except Image.DecompressionBombError:
        pass
    # Pillow refuses more than twice its own Image.MAX_IMAGE_PIXELS outright, before our limit is asked; when a
    # caller raised max_pixels past that, the format's own opener (what Image.open calls) reads the header
    Image.init()
    fp.seek(0)
    prefix = fp.read(16)
    for name in _FORMATS:
        factory, accept = Image.OPEN[name]
        accepted = accept(prefix) if accept else True
        if accepted and not isinstance(accepted, str):  # (a str: a warning that it is not this format)
            with contextlib.suppress(SyntaxError, IndexError, TypeError, struct.error):
                fp.seek(0)
                return factory(fp, "")
    raise DataError(path, _CORRUPT, "not a JPEG, PNG, BMP or TIFF file that Pillow can read")


def _check_tiff_samples(path: Path, image: Image.Image) -> None:
    """Pillow reads some TIFF layouts of 16-bit samples (separate planes) as 8-bit bytes: refuse those."""
    bits = image.tag_v2.get(258, (1,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    if max(bits) > 8 and image.mode not in ("I", "F", *_GREY16) and _wide(image) is None:
        raise DataError(path, _UNSUPPORTED, f"TIFF with {max(bits)}-bit samples that Pillow reads as mode "
                                            f"{image.mode} (samples in separate planes?): save it interleaved")


def _rawmode(tile) -> str:
    args = tile.args
    return args if isinstance(args, str) else args[0] if args and isinstance(args[0], str) else ""


def _with_rawmode(tile, rawmode: str):
    args = tile.args
    return tile._replace(args=rawmode if isinstance(args, str) else (rawmode, *args[1:]))


def _wide(image: Image.Image) -> str | None:
    """How to read 16-bit colour samples that Pillow (no 16-bit colour modes) would cut to their high byte."""
    rawmodes = [_rawmode(tile) for tile in image.tile]
    if image.mode == "RGBA" and rawmodes == ["LA;16B"] and isinstance(image.tile[0].args, str):
        return "bytes"  # 16-bit grey + alpha PNG (Pillow has no LA;16L): its 4 bytes a pixel read as 8-bit RGBA
    if image.mode in ("RGB", "RGBA", "RGBX", "CMYK") and rawmodes and all(
            r.endswith((";16B", ";16L", ";16N")) for r in rawmodes):
        return "twice"  # once as stored (high bytes), once with the byte order swapped (low bytes)
    return None


def _load_wide(path: Path, image: Image.Image, data: bytes, how: str) -> np.ndarray:
    """(H, W, C) uint16 of a 16-bit colour image (C = 2 for grey + alpha)."""
    if how == "bytes":
        image.tile = [_with_rawmode(tile, "RGBA") for tile in image.tile]
        image.load()
        b = np.asarray(image).astype(np.uint16)
        return np.stack([b[..., 0] << 8 | b[..., 1], b[..., 2] << 8 | b[..., 3]], axis=-1)
    native = ";16L" if sys.byteorder == "little" else ";16B"
    swap = {";16B": ";16L", ";16L": ";16B", ";16N": {";16L": ";16B", ";16B": ";16L"}[native]}
    with _open_header(path, io.BytesIO(data)) as twin:
        twin.tile = [_with_rawmode(tile, _rawmode(tile)[:-4] + swap[_rawmode(tile)[-4:]]) for tile in twin.tile]
        image.load()
        twin.load()
        return np.asarray(image).astype(np.uint16) << 8 | np.asarray(twin)


def _stored(path: Path, image: Image.Image, data: bytes) -> np.ndarray:
    how = _wide(image)
    if how is None:
        image.load()
        return np.asarray(image)
    wide = _load_wide(path, image, data, how)
    return wide[..., :3] if image.mode == "RGBX" else wide


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """16-bit samples (0..65535) as 8-bit: round(v * 255 / 65535), never a tie (255 and 65535 share no factor 2)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _samples8(path: Path, image: Image.Image, data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """8-bit colour, (H, W) grey or (H, W, 3) RGB, and the alpha channel if the image has one."""
    how = _wide(image)
    if how is not None:
        samples = _to_8bit(_load_wide(path, image, data, how))
        kind = "LA" if how == "bytes" else image.mode
    elif image.mode in ("I", *_GREY16):
        image.load()
        values = np.asarray(image)
        if image.mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise DataError(path, "image values are outside the 16-bit range",
                            f"mode I, values {values.min()}..{values.max()}; 0..65535 is scaled to 8 bit")
        return _to_8bit(values), None
    elif image.mode in ("P", "PA"):
        rgba = image.mode == "PA" or "transparency" in image.info or getattr(image.palette, "mode", "") == "RGBA"
        samples, kind = np.asarray(image.convert("RGBA" if rgba else "RGB")), "RGBA" if rgba else "RGB"
    elif image.mode == "1":
        samples, kind = np.asarray(image.convert("L")), "L"  # 0 and 255
    elif image.mode == "YCbCr":
        samples, kind = np.asarray(image.convert("RGB")), "RGB"
    else:
        image.load()
        samples, kind = np.asarray(image), image.mode
    if kind == "CMYK":
        white = 255 - samples.astype(np.uint16)  # (255 - C)(255 - K) / 255, rounded (Pillow's rule too)
        return ((white[..., :3] * white[..., 3:] + 127) // 255).astype(np.uint8), None
    if kind in ("LA", "RGBA"):
        return samples[..., :-1].squeeze(-1) if kind == "LA" else samples[..., :3], samples[..., -1]
    if kind in ("La", "RGBa"):  # premultiplied alpha: the colour is already over black
        return samples[..., 0] if kind == "La" else samples[..., :3], None
    return (samples[..., :3] if kind == "RGBX" else samples), None


def _to_mode(colour: np.ndarray, alpha: np.ndarray | None, mode: str) -> np.ndarray:
    if alpha is not None and alpha.min() < 255:  # over black: round(c * a / 255), never a tie
        weight = alpha.astype(np.uint16)[..., None] if colour.ndim == 3 else alpha.astype(np.uint16)
        colour = ((colour.astype(np.uint16) * weight + 127) // 255).astype(np.uint8)
    if mode == "L" and colour.ndim == 3:
        return np.asarray(Image.fromarray(np.ascontiguousarray(colour)).convert("L"))  # (19595 R + 38470 G + 7471 B + 2^15) >> 16
    if mode == "RGB" and colour.ndim == 2:
        return np.repeat(colour[..., None], 3, axis=2)
    return np.ascontiguousarray(colour)


def _check_container(path: Path, data: bytes) -> None:
    """The checks Pillow leaves out: libjpeg's warnings on a JPEG, the CRC of every PNG chunk."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        problem = _png_problem(data)
        if problem:
            raise DataError(path, _CORRUPT, problem)
    elif data.startswith(b"\xff\xd8"):
        _check_jpeg(path, data)


def _check_jpeg(path: Path, data: bytes) -> None:
    """Pillow's libjpeg decoder discards libjpeg's "Corrupt JPEG data" warnings (premature end of a data
    segment, extraneous bytes before a marker, lost restart markers) and returns the pixels libjpeg made up.
    simplejpeg drives the same libjpeg-turbo with ``strict=True``, which turns those warnings into errors; it
    decodes at 1/8 scale (the entropy-coded data is read in full either way), and the pixels still come from
    Pillow. Damage inside entropy-coded data that libjpeg itself decodes without a warning passes, as it would
    anywhere."""
    try:
        colourspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if colourspace in ("CMYK", "YCCK") else "GRAY",
                               min_factor=8, strict=True)
    except ValueError as exc:
        raise DataError(path, _CORRUPT, f"JPEG: {_one_line(exc)}") from exc


def _png_problem(data: bytes) -> str | None:
    """Pillow checks the CRCs of the chunks before the image data only; a flipped bit in IDAT passes it."""
    view, pos = memoryview(data), 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        name = kind.decode("latin-1") if kind.isalpha() else "0x" + kind.hex()
        end = pos + 12 + length
        if end > len(data):
            return f"PNG: chunk {name} at byte {pos} runs past the end of the file"
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return f"PNG: chunk {name} at byte {pos} fails its CRC"
        if kind == b"IEND":
            return None  # anything after IEND is not part of the image
        pos = end
    return "PNG: the file ends before the IEND chunk"


def write_image(path: str | Path, array: np.ndarray, jpeg_quality: int = 92) -> None:
    """Save an array in the format its suffix names (JPEG, PNG, BMP, TIFF)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        # libjpeg-turbo's default accurate integer DCT: its C, SSE2 and AVX2 code write the same bytes
        # (docs/decisions.md, "Same bytes on every machine"); the float DCT may not.
        image.save(path, quality=jpeg_quality, subsampling=0)
    elif suffix in (".tif", ".tiff"):
        image.save(path, compression="tiff_deflate")
    else:
        image.save(path)


def find_image(folder: Path, stem: str) -> Path | None:
    """The image in ``folder`` whose name is ``stem`` plus an image suffix (any case)."""
    if not folder.is_dir():
        return None
    matches = sorted(
        p for p in folder.iterdir()
        if p.stem.lower() == stem.lower() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    return matches[0] if matches else None
