"""Safe image loading: any common file → a fully decoded PIL RGB image, or a clear error.

``load_image`` decodes the whole file (so truncated and corrupt files fail here, not in the
middle of a forward pass), refuses images above a pixel budget before decoding them
(decompression bombs), and converts every mode to RGB: grayscale, palette, CMYK, 16-bit and
float images, and transparent images composited onto white.

PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed: a truncated file must be an
error, not an image padded with grey.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mmgpt.data.records import DataError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageLoadError", "load_image", "to_rgb"]

# PIL's own default budget (about 89 megapixels, e.g. 9459 x 9459).
DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
WHITE = (255, 255, 255)


class ImageLoadError(DataError):
    """An image that cannot be used; ``reason`` is one of ``missing_image``,
    ``not_an_image``, ``truncated_image``, ``corrupt_image``, ``too_large``."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}", file=str(path), reason=reason)
        self.path = Path(path)
        self.detail = detail


def load_image(
    path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open, fully decode and convert ``path`` to an RGB image.

    Args:
        path: an image file.
        max_pixels: refuse images with more pixels than this (checked from the header,
            before decoding). ``None`` leaves only PIL's own limit.

    Raises:
        ImageLoadError: with ``reason`` naming what is wrong with the file.
    """
    path = Path(path)
    if not path.is_file():
        detail = "is a directory, not an image" if path.is_dir() else "file not found"
        raise ImageLoadError(path, "missing_image", detail)
    try:
        with warnings.catch_warnings():
            # Our own guard below decides; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageLoadError(
                        path,
                        "too_large",
                        f"image is {width}x{height} = {width * height} pixels, above the limit "
                        f"of {max_pixels} (a decompression bomb or a huge image; raise max_pixels "
                        "to accept it)",
                    )
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            path, "too_large", f"decompression bomb refused by PIL: {exc}"
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            path, "not_an_image", "not an image file PIL can read (unknown or wrong format)"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, EOFError, zlib.error…
        message = str(exc) or type(exc).__name__
        reason = "truncated_image" if "truncated" in message.lower() else "corrupt_image"
        raise ImageLoadError(
            path, reason, f"cannot decode image ({type(exc).__name__}: {message})"
        ) from None


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


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale → 8-bit RGB, scaled rather than clipped."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:
        # "I" and "F" carry no range; 16-bit PNGs open as "I" with values up to 65535,
        # float images are usually in [0, 1].
        top = float(values.max()) if values.size else 0.0
        if top > 255.0:
            scale = 255.0 / 65535.0
        elif image.mode == "F" and top <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
