"""File helpers shared by every stage: atomic outputs, validated image reads, hashes.

Atomic output is the rule for every stage: files and folders are written
under a temporary sibling name and renamed into place only when complete, so
a failed or interrupted run never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmrad.core.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``final`` on success.

    On any exception the temporary folder is removed and ``final`` is left as
    it was (or absent), so no partial output is ever visible.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_image(path: str | Path, mode: str | None = None) -> np.ndarray:
    """Decode an image fully, turning every decoder failure into a DataError.

    ``mode`` is a Pillow mode to convert to ("RGB", "L"); None keeps the file's.
    A truncated file fails here (Pillow refuses truncated data by default)
    rather than producing a half-grey image later.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file is missing")
    try:
        with Image.open(path) as image:
            image.load()
            if mode is not None and image.mode != mode:
                image = image.convert(mode)
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, "image is corrupt or truncated", str(exc)) from exc
    if array.size == 0:
        raise DataError(path, "image is empty")
    return array


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, "image is corrupt or truncated", str(exc)) from exc
    return height, width


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
