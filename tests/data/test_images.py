"""Untrusted image files: the format allowlist, the pixel and memory budgets, 16-bit conversion."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, features

from mmgpt.data import images
from mmgpt.data.images import (
    ALLOWED_FORMATS,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    decoded_bytes,
    load_image,
    open_image,
    to_rgb,
)

ROOT = Path(__file__).resolve().parents[2]

# A complete EPS file: PIL's EPS plugin opens it and hands it to Ghostscript on load().
EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
%%EndComments
newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill
showpage
%%EOF
"""


@pytest.fixture
def fake_gs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, str]]:
    """A ``gs`` first on PATH that only records that it ran: (marker file, environment)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gs-was-called"
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\ntouch "{marker}"\n')
    gs.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # PIL caches where gs is
    return marker, env


def test_eps_named_png_never_reaches_ghostscript(tmp_path, fake_gs) -> None:
    marker, _ = fake_gs
    path = tmp_path / "x.png"
    path.write_bytes(EPS)
    # The setup would catch the bug: PIL left to itself runs the fake gs on this file.
    with pytest.raises(OSError), Image.open(path) as opened:
        opened.load()
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert info.value.reason == "unsupported_format" and info.value.format == "EPS"
    assert str(path) in str(info.value) and "EPS" in str(info.value)
    with pytest.raises(ImageLoadError, match="detected format EPS"), open_image(path):
        pass
    assert not marker.exists()


def test_vit_encoder_opens_paths_with_the_safe_loader(tmp_path, fake_gs) -> None:
    vit = pytest.importorskip("mmgpt_vit.encoder")
    marker, _ = fake_gs
    (tmp_path / "x.png").write_bytes(EPS)
    with pytest.raises(ImageLoadError, match="detected format EPS"):
        vit.to_rgb(tmp_path / "x.png")
    assert not marker.exists()
    Image.new("L", (3, 2), 70).save(tmp_path / "g.png")
    image = vit.to_rgb(str(tmp_path / "g.png"))
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (3, 2), (70, 70, 70))


def test_data_check_reports_eps_without_running_ghostscript(tmp_path, fake_gs) -> None:
    marker, env = fake_gs
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.png").write_bytes(EPS)
    Image.new("RGB", (4, 4), (9, 9, 9)).save(data / "ok.png")
    rows = [{"file_name": "x.png", "text": "a square"}, {"file_name": "ok.png", "text": "ok"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = subprocess.run(
        [sys.executable, "-m", "mmgpt.cli", "data", "check", str(data)],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr  # a problem fails the check
    assert "metadata.jsonl:1: unsupported_format" in result.stdout
    assert "x.png: detected format EPS" in result.stdout and "1 usable samples" in result.stdout
    assert not marker.exists()


def test_other_formats_are_refused_by_name(tmp_path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png", format="PCX")
    (tmp_path / "b.png").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    for name, detected in (("a.png", "PCX"), ("b.png", "PDF")):
        with pytest.raises(ImageLoadError, match=f"{name}: detected format {detected}") as info:
            load_image(tmp_path / name)
        assert info.value.reason == "unsupported_format"


def test_every_listed_extension_is_an_allowed_format(tmp_path) -> None:
    registered = Image.registered_extensions()
    assert {registered[ext] for ext in IMAGE_EXTENSIONS} == set(ALLOWED_FORMATS)
    for ext in sorted(IMAGE_EXTENSIONS):
        if registered[ext] == "WEBP" and not features.check("webp"):
            continue
        mode = "1" if ext == ".pbm" else "L" if ext == ".pgm" else "RGB"
        Image.new(mode, (5, 3)).save(tmp_path / f"i{ext}")
        assert load_image(tmp_path / f"i{ext}").size == (5, 3)


def test_open_image_reads_the_header_only(tmp_path) -> None:
    buffer = tmp_path / "full.png"
    noise = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer)
    (tmp_path / "cut.png").write_bytes(buffer.read_bytes()[:200])
    with open_image(tmp_path / "cut.png") as image:  # header intact, pixels missing
        assert (image.format, image.size, image.mode) == ("PNG", (48, 64), "RGB")
    assert image.fp.closed  # the file is closed after the block
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "cut.png")
    assert info.value.reason == "truncated_image"
    with (
        pytest.raises(ImageLoadError, match="above the limit of 1000"),
        open_image(buffer, max_pixels=1000),
    ):
        pass


def test_decoded_bytes_budget(tmp_path) -> None:
    Image.new("RGBA", (100, 100)).save(tmp_path / "rgba.png")
    Image.new("L", (100, 100)).save(tmp_path / "gray.png")
    assert decoded_bytes((100, 100), "RGBA") == 100 * 100 * 8  # decoded + RGB copy
    assert decoded_bytes((100, 100), "L") == 100 * 100 * 5
    assert decoded_bytes((100, 100), "RGB") == 100 * 100 * 4  # returned as decoded
    with pytest.raises(ImageLoadError, match="raise max_decoded_bytes") as info:
        load_image(tmp_path / "rgba.png", max_decoded_bytes=79_999)
    assert info.value.reason == "too_large" and "mode RGBA" in str(info.value)
    assert load_image(tmp_path / "gray.png", max_decoded_bytes=79_999).size == (100, 100)


def test_target_size_decodes_jpegs_at_a_smaller_scale(tmp_path) -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.jpg", quality=90)
    Image.fromarray(photo).save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.jpg").size == (1600, 1200)
    small = load_image(tmp_path / "p.jpg", target_size=200)
    assert small.size == (400, 300) and small.mode == "RGB"  # scale 1/4 still covers 200
    # the budget is that of what is decoded: the full photo would be refused
    covered = load_image(tmp_path / "p.jpg", target_size=(200, 150), max_pixels=100_000)
    assert covered.size == (200, 150)  # scale 1/8
    with pytest.raises(ImageLoadError, match="above the limit of 100000"):
        load_image(tmp_path / "p.jpg", max_pixels=100_000)
    assert load_image(tmp_path / "p.png", target_size=200).size == (1600, 1200)  # not a JPEG
    with pytest.raises(ValueError, match="target_size"):
        load_image(tmp_path / "p.jpg", target_size=(0, 5))


def test_loaded_image_does_not_follow_the_file(tmp_path) -> None:
    # PIL memory-maps uncompressed files opened by path; a returned image must not be a view
    # of a file that can change (or shrink: a crash) after loading.
    path = tmp_path / "raw.bmp"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path)
    image = load_image(path)
    Image.new("RGB", (64, 64), (200, 100, 0)).save(path)
    assert image.getpixel((5, 5)) == (10, 20, 30)
    path.write_bytes(b"")
    assert image.resize((8, 8)).getpixel((1, 1)) == (10, 20, 30)


# -- high-depth images ----------------------------------------------------------------------
def old_high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """The float64 conversion load_image used before; the reference for the new one."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:
        top = float(values.max()) if values.size else 0.0
        if top > 255.0:
            scale = 255.0 / 65535.0
        elif image.mode == "F" and top <= 1.0:
            scale = 255.0
        else:
            scale = 1.0
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


@pytest.mark.parametrize("strip_pixels", [1 << 20, 1000])  # one strip; many, with a ragged end
def test_high_depth_conversion_equals_the_float_reference(
    tmp_path, monkeypatch, strip_pixels
) -> None:
    monkeypatch.setattr(images, "_STRIP_PIXELS", strip_pixels)
    every_16bit_value = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(every_16bit_value).save(tmp_path / "s.png")
    loaded = load_image(tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as opened:
        assert opened.mode in ("I;16", "I")
        expected = old_high_depth_to_rgb(opened)
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))

    rng = np.random.default_rng(0)
    cases = {
        "I wide": rng.integers(-70_000, 140_000, (37, 29), dtype=np.int32),
        "I narrow": rng.integers(-5, 250, (37, 29), dtype=np.int32),
        "F unit": rng.random((37, 29), dtype=np.float32),
        "F bytes": (rng.random((37, 29)) * 250).astype(np.float32),
        "F wide": (rng.random((37, 29)) * 70_000 - 100).astype(np.float32),
        "I;16B": rng.integers(0, 65536, (37, 29), dtype=np.uint16),
    }
    for name, values in cases.items():
        image = Image.fromarray(values)
        if name == "I;16B":
            image = image.convert("I").convert("I;16B")
        assert image.mode == name.split()[0]
        got, want = np.asarray(to_rgb(image)), np.asarray(old_high_depth_to_rgb(image))
        assert np.array_equal(got, want), name


PEAK_SCRIPT = """
import sys
import numpy as np
from PIL import Image

{reference}

def status(field):
    with open("/proc/self/status") as handle:
        return next(int(l.split()[1]) * 1024 for l in handle if l.startswith(field + ":"))

if sys.argv[2] == "new":
    sys.path.insert(0, sys.argv[3])
    from mmgpt.data.images import load_image
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # the peak (VmHWM) restarts from the current size
before = status("VmRSS")
if sys.argv[2] == "new":
    image = load_image(sys.argv[1])
else:
    with Image.open(sys.argv[1]) as opened:
        opened.load()
        image = old_high_depth_to_rgb(opened)
print(status("VmHWM") - before, image.size)
"""


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS"
)
def test_sixteen_bit_png_costs_a_few_bytes_per_pixel(tmp_path) -> None:
    side = 3000
    ramp = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16)
    Image.fromarray(ramp.reshape(side, side)).save(tmp_path / "deep.png", compress_level=1)
    script = PEAK_SCRIPT.replace("{reference}", inspect.getsource(old_high_depth_to_rgb))

    def peak(which: str) -> int:
        result = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "deep.png"), which, str(ROOT)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert f"({side}, {side})" in result.stdout
        return int(result.stdout.split()[0])

    rgb_output = side * side * 3
    old, new = peak("old"), peak("new")
    assert old > 6 * rgb_output  # the whole-image float64 copies
    assert new < 3 * rgb_output, (new / rgb_output, old / rgb_output)
