"""Safe image loading: an untrusted file → a fully decoded PIL RGB image, or a clear error.

``open_image`` opens a file for its header only (size, mode, format, metadata). The format,
told from the content and not the name, must be one of ``ALLOWED_FORMATS``: PIL's other
plugins never parse untrusted bytes, and PostScript (an EPS file named ``x.png``) never reaches
Ghostscript. The image must also fit a pixel budget and a decoded-bytes budget, both checked
from the header: a 10 KB PNG can declare 80 megapixels (a decompression bomb).

``load_image`` builds on it: it decodes the whole file (so truncated and corrupt files fail
here, not in the middle of a forward pass) and converts every mode to RGB: grayscale, palette,
CMYK, 16-bit and float images, and transparent images composited onto white.

``open_image_bytes`` and ``load_image_bytes`` do the same for an image held in memory (a
parquet cell, a tar member), with the same allowlist and budgets; ``name`` says where the bytes
came from in errors.

PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed: a truncated file must be an
error, not an image padded with grey.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmgpt.data.errors import DataError

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_DECODED_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEMO_MAX_DECODED_BYTES",
    "DEMO_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "decoded_bytes",
    "image_extension",
    "load_image",
    "load_image_bytes",
    "open_image",
    "open_image_bytes",
    "sniff_format",
    "to_rgb",
]

# PIL's own default budget (about 89 megapixels, e.g. 9459 x 9459).
DEFAULT_MAX_PIXELS = 89_478_485
# 2**29 bytes = DEFAULT_MAX_PIXELS x 6: an 8-bit or 16-bit grayscale or RGB image at the pixel
# limit still fits; what it stops is many bytes per pixel (RGBA, CMYK, 32-bit, float) at sizes
# near the pixel limit, and any image once a caller raises max_pixels.
DEFAULT_MAX_DECODED_BYTES = 1 << 29
# Lower limits for servers that decode what anyone uploads (the demos): 16 megapixels is a
# 4000 x 4000 photo, and 128 MiB covers it in every mode.
DEMO_MAX_PIXELS = 16_000_000
DEMO_MAX_DECODED_BYTES = 128 << 20

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
# PIL format names of IMAGE_EXTENSIONS ("PPM" reads .ppm, .pgm and .pbm). Only these plugins
# ever see a file's bytes.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
# A JPEG with several pictures (phone cameras) opens through the JPEG plugin as "MPO".
_JPEG_FORMATS = ("JPEG", "MPO")
WHITE = (255, 255, 255)

# Bytes per pixel of PIL's in-memory storage: modes of more than one band take 4.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_RGB_PIXEL_BYTES = 4
# High-depth images are converted in strips of about this many pixels, so the temporary
# arrays stay a few MB whatever the image size.
_STRIP_PIXELS = 1 << 18
# 16-bit → 8-bit as v * 255 / 65535 = v / 257, rounded. v / 257 is never exactly halfway
# between two integers, so (v + 128) // 257 rounds exactly like the float computation.
_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


class ImageLoadError(DataError):
    """An image that cannot be used; ``reason`` is one of ``missing_image``,
    ``unreadable_image``, ``not_an_image``, ``unsupported_format``, ``truncated_image``,
    ``corrupt_image``, ``too_large``. ``format`` is the detected format of an
    ``unsupported_format`` file."""

    def __init__(
        self, path: str | os.PathLike, reason: str, detail: str, *, format: str | None = None
    ) -> None:
        super().__init__(f"{path}: {detail}", file=str(path), reason=reason)
        self.path = Path(path)
        self.detail = detail
        self.format = format


def decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """About how much memory decoding an image of ``size`` and PIL ``mode`` to RGB takes: the
    decoded pixels plus the RGB image made from them (none for an RGB image)."""
    width, height = size
    extra = 0 if mode == "RGB" else _RGB_PIXEL_BYTES
    return width * height * (_PIXEL_BYTES.get(mode, 4) + extra)


def sniff_format(prefix: bytes) -> str | None:
    """The format a file's first 16 bytes show, or ``None``.

    Only PIL's magic-byte checks run (no plugin parses the file), so this is safe on any
    input; it names formats ``open_image`` refuses, for the error message.
    """
    if prefix.startswith(b"%PDF-"):
        return "PDF"  # no PIL plugin reads PDF, but it is a common wrong upload
    Image.init()
    for format_id in Image.ID:
        accept = Image.OPEN[format_id][1]
        try:
            if accept is not None and accept(prefix):
                return format_id
        except Exception:  # a check that chokes on odd bytes has not recognized them
            continue
    return None


@contextmanager
def open_image(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
    target_size: int | tuple[int, int] | None = None,
) -> Iterator[Image.Image]:
    """Open ``path`` for its header, with the format allowlist and the budgets enforced.

    For callers that need only the size, mode or metadata; the pixels are not decoded until
    ``image.load()`` is called, which must happen inside the ``with`` block (the file is
    closed after it). ``load_image`` is the full decoder.

    Args:
        path: an image file; its format (from the content) must be in ``ALLOWED_FORMATS``.
        max_pixels: refuse images with more pixels than this. ``None`` leaves PIL's limit.
        max_decoded_bytes: refuse images whose decoding to RGB takes more memory than this
            (see ``decoded_bytes``). ``None`` for no limit.
        target_size: ``(width, height)`` (or one side of a square) the caller will resize to
            anyway: a JPEG is then decoded at the smallest DCT scale that still covers it
            (PIL's draft mode: a 4000x3000 photo for a 224x224 input decodes at 500x375).
            ``image.size`` and the budgets are those of what will be decoded.

    Raises:
        ImageLoadError: with ``reason`` naming what is wrong with the file.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            detail = "is a directory, not an image"
        elif path.exists():
            detail = "is not a regular file (a device, socket or pipe), not an image"
        else:
            detail = "file not found"
        raise ImageLoadError(path, "missing_image", detail)
    size = None if target_size is None else _size_pair(target_size)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below, after the caller's block)
    except OSError as exc:
        raise ImageLoadError(
            path, "unreadable_image", f"cannot read the file ({exc.strerror or exc})"
        ) from None
    # PIL gets the open file, not the path: it then never memory-maps the pixels, so an
    # image returned by load_image does not change (or crash) when the file is rewritten.
    with handle:
        yield _open_checked(path, handle, max_pixels, max_decoded_bytes, size)


@contextmanager
def open_image_bytes(
    data: bytes,
    *,
    name: str = "<image bytes>",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
    target_size: int | tuple[int, int] | None = None,
) -> Iterator[Image.Image]:
    """:func:`open_image` for an image held in memory: the same allowlist and budgets.

    ``name`` says where the bytes came from (``"shard-000000.tar: 0007.jpg"``) in errors.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageLoadError(
            name, "not_an_image", f"expected image bytes, got {type(data).__name__}"
        )
    if not len(data):
        raise ImageLoadError(name, "not_an_image", "empty: no image bytes")
    size = None if target_size is None else _size_pair(target_size)
    with io.BytesIO(data) as handle:
        yield _open_checked(name, handle, max_pixels, max_decoded_bytes, size)


def load_image(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
    target_size: int | tuple[int, int] | None = None,
) -> Image.Image:
    """Open, fully decode and convert ``path`` to an RGB image.

    Args:
        path: an image file; its format (from the content) must be in ``ALLOWED_FORMATS``.
        max_pixels: refuse images with more pixels than this (checked from the header,
            before decoding). ``None`` leaves only PIL's own limit.
        max_decoded_bytes: refuse images whose decoding takes more memory than this (checked
            from the header too). ``None`` for no limit.
        target_size: the size the caller will resize to anyway; JPEGs then decode at a
            smaller scale that still covers it (see ``open_image``). The result may be
            larger than ``target_size``, never smaller (unless the file is).

    Raises:
        ImageLoadError: with ``reason`` naming what is wrong with the file.
    """
    path = Path(path)
    opened = open_image(
        path, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes, target_size=target_size
    )
    return _decode(path, opened)


def load_image_bytes(
    data: bytes,
    *,
    name: str = "<image bytes>",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
    target_size: int | tuple[int, int] | None = None,
) -> Image.Image:
    """:func:`load_image` for an image held in memory (a parquet cell, a tar member): the
    same allowlist, budgets, full decode and conversion to RGB.

    Args:
        data: the bytes of an image file.
        name: where the bytes came from, for errors (``"data.parquet:12 column 'image'"``).
        max_pixels, max_decoded_bytes, target_size: as for :func:`load_image`.

    Raises:
        ImageLoadError: with ``reason`` naming what is wrong with the bytes.
    """
    opened = open_image_bytes(
        data,
        name=name,
        max_pixels=max_pixels,
        max_decoded_bytes=max_decoded_bytes,
        target_size=target_size,
    )
    return _decode(name, opened)


# File name extensions of the allowed formats, for writing an image's bytes to a file.
_EXTENSIONS = {
    "PNG": ".png",
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "BMP": ".bmp",
    "GIF": ".gif",
    "WEBP": ".webp",
    "TIFF": ".tif",
    "PPM": ".ppm",
}


def image_extension(image: Image.Image) -> str:
    """The file name extension (``".png"``) of an image opened by :func:`open_image` or
    :func:`open_image_bytes`, from its detected format."""
    return _EXTENSIONS[image.format or ""]


def _decode(name: str | os.PathLike, opened: contextlib.AbstractContextManager) -> Image.Image:
    """Decode what ``opened`` (an ``open_image*`` context) opens, converted to RGB."""
    try:
        with opened as image:
            image.load()
        ImageOps.exif_transpose(image, in_place=True)
        # An RGB image is returned as decoded: a copy would double the peak memory.
        return image if image.mode == "RGB" else to_rgb(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            name, "too_large", f"decompression bomb refused by PIL: {exc}"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, EOFError, zlib.error…
        raise _decode_error(name, exc) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image from any PIL mode; transparency is composited onto white."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(image)
    # 1, L, P, CMYK, YCbCr, LAB, HSV: PIL's conversions are right for these.
    return image.convert("RGB")


# -- helpers --------------------------------------------------------------------------------
def _size_pair(target_size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (target_size, target_size) if isinstance(target_size, int) else tuple(target_size)
    if len(pair) != 2 or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in pair
    ):
        raise ValueError(
            f"target_size must be a positive int or (width, height) of positive ints, "
            f"got {target_size!r}"
        )
    return pair  # type: ignore[return-value]


def _open_checked(
    path: str | os.PathLike,
    handle: IO[bytes],
    max_pixels: int | None,
    max_decoded_bytes: int | None,
    size: tuple[int, int] | None,
) -> Image.Image:
    """The image's header from ``handle``: allowlisted format, draft scale, budgets."""
    image = _open_allowed(path, handle)
    if size is not None and image.format in _JPEG_FORMATS:
        image.draft("RGB", size)
    _check_budget(path, image, max_pixels, max_decoded_bytes)
    return image


def _open_allowed(path: str | os.PathLike, handle: IO[bytes]) -> Image.Image:
    """``Image.open`` restricted to ``ALLOWED_FORMATS``; any failure is an ``ImageLoadError``."""
    try:
        with warnings.catch_warnings():
            # Our own budgets decide; PIL's warning would only repeat them.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(handle, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            path, "too_large", f"decompression bomb refused by PIL: {exc}"
        ) from None
    except UnidentifiedImageError:
        pass  # told apart below: an image of another format, or no image at all
    except MemoryError:
        raise
    except Exception as exc:
        raise _decode_error(path, exc) from None
    handle.seek(0)
    detected = sniff_format(handle.read(16))
    allowed = ", ".join(ALLOWED_FORMATS)
    if detected is None:
        raise ImageLoadError(
            path,
            "not_an_image",
            f"not an image file PIL can read (unknown or wrong format; expected {allowed})",
        )
    if detected in ALLOWED_FORMATS:
        raise ImageLoadError(
            path, "not_an_image", f"starts like a {detected} file but its header cannot be read"
        )
    raise ImageLoadError(
        path,
        "unsupported_format",
        f"detected format {detected}, not one of the image formats accepted ({allowed}); "
        "it was not decoded",
        format=detected,
    )


def _check_budget(
    path: str | os.PathLike,
    image: Image.Image,
    max_pixels: int | None,
    max_decoded_bytes: int | None,
) -> None:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            path,
            "too_large",
            f"image is {width}x{height} = {width * height} pixels, above the limit "
            f"of {max_pixels} (a decompression bomb or a huge image; raise max_pixels "
            "to accept it)",
        )
    need = decoded_bytes(image.size, image.mode)
    if max_decoded_bytes is not None and need > max_decoded_bytes:
        raise ImageLoadError(
            path,
            "too_large",
            f"image is {width}x{height} in mode {image.mode}: decoding it takes about "
            f"{need} bytes, above the limit of {max_decoded_bytes} (raise max_decoded_bytes "
            "to accept it)",
        )


def _decode_error(path: str | os.PathLike, exc: Exception) -> ImageLoadError:
    message = str(exc) or type(exc).__name__
    reason = "truncated_image" if "truncated" in message.lower() else "corrupt_image"
    return ImageLoadError(path, reason, f"cannot decode image ({type(exc).__name__}: {message})")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale → 8-bit RGB, scaled rather than clipped.

    Converted strip by strip into the output, so the memory beyond the source and the
    result stays a few MB (a whole-image float64 copy was 8 bytes per pixel, several times).
    """
    mode = image.mode
    to_8bit: Callable[[np.ndarray], np.ndarray]
    if mode.startswith("I;16"):
        to_8bit = _sixteen_bit
    else:
        # "I" and "F" carry no range; 16-bit PNGs may open as "I" with values up to 65535,
        # float images are usually in [0, 1]. PIL finds the maximum without a copy.
        top = image.getextrema()[1] if image.width and image.height else 0
        if mode == "I":
            to_8bit = _sixteen_bit if top > 255 else _clip_8bit
        else:
            if top > 255:
                scale = 255.0 / 65535.0
            elif top <= 1.0:
                scale = 255.0
            else:
                scale = 1.0
            to_8bit = functools.partial(_float_8bit, scale=scale)
    width, height = image.size
    out = Image.new("RGB", image.size)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for top_row in range(0, height, rows):
        box = (0, top_row, width, min(height, top_row + rows))
        strip = np.asarray(image.crop(box))
        out.paste(Image.fromarray(to_8bit(strip)), box)  # gray → R = G = B
    return out


def _sixteen_bit(values: np.ndarray) -> np.ndarray:
    # Clipping only matters for "I" images: I;16 values are in range already.
    if values.dtype.itemsize > 2:
        values = np.clip(values, 0, 65535)
    return _SIXTEEN_TO_EIGHT[values]


def _clip_8bit(values: np.ndarray) -> np.ndarray:
    return np.clip(values, 0, 255).astype(np.uint8)


def _float_8bit(values: np.ndarray, scale: float) -> np.ndarray:
    # float64 on one strip only: the same rounding as a whole-image computation.
    scaled = np.nan_to_num(values.astype(np.float64), nan=0.0) * scale
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
