"""Images held in memory (parquet cells, tar members) get exactly what image files get: the
format allowlist before any decoder, the pixel and memory budgets, the same RGB pixels."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from mmgpt.data.images import (
    ImageLoadError,
    image_extension,
    load_image,
    load_image_bytes,
    open_image_bytes,
)

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
%%EndComments
newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill
showpage
%%EOF
"""


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` and holds almost nothing (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))


@pytest.mark.parametrize(
    ("mode", "fmt", "extension"),
    [
        ("RGB", "PNG", ".png"),
        ("L", "JPEG", ".jpg"),
        ("RGBA", "WEBP", ".webp"),
        ("I;16", "PNG", ".png"),
    ],
)
def test_same_pixels_as_the_file_loader(
    tmp_path: Path, mode: str, fmt: str, extension: str
) -> None:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (5, 7), dtype=np.uint16))
    else:
        shape = (5, 7, len(mode)) if len(mode) > 1 else (5, 7)
        image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
    data = encoded(image, fmt)
    path = tmp_path / f"x{extension}"
    path.write_bytes(data)
    from_bytes = load_image_bytes(data, name="cell")
    assert from_bytes.mode == "RGB"
    assert from_bytes.tobytes() == load_image(path).tobytes()
    with open_image_bytes(data) as opened:
        assert image_extension(opened) == extension


def test_eps_bytes_are_refused_before_any_decoder(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "gs-was-called"
    (tmp_path / "gs").write_text(f'#!/bin/sh\ntouch "{marker}"\n')
    (tmp_path / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    with pytest.raises(ImageLoadError, match=r"shard\.tar: 1\.png: detected format EPS") as info:
        load_image_bytes(EPS, name="shard.tar: 1.png")
    assert info.value.reason == "unsupported_format" and not marker.exists()


def test_budgets_refuse_from_the_header() -> None:
    bomb = png_header_only(5_000, 5_000)
    assert len(bomb) < 100
    with pytest.raises(ImageLoadError, match="above the limit of 1000000") as info:
        load_image_bytes(bomb, name="row 3", max_pixels=1_000_000)
    assert info.value.reason == "too_large"
    with pytest.raises(ImageLoadError, match="above the limit of 1000"):
        load_image_bytes(png_header_only(100, 100), max_pixels=None, max_decoded_bytes=1000)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not_an_image"),
        (b"plain text", "not_an_image"),
        (encoded(Image.effect_noise((40, 40), 60).convert("RGB"), "PNG")[:-30], "truncated_image"),
        ("a str", "not_an_image"),
    ],
)
def test_bad_bytes_name_the_source(data, reason: str) -> None:
    with pytest.raises(ImageLoadError, match=r"^data\.parquet:4 column 'image': ") as info:
        load_image_bytes(data, name="data.parquet:4 column 'image'")
    assert info.value.reason == reason
