"""Files of any modality → items: the loaders that plugins register per modality.

A loader is a registry entry of kind ``loader`` named after its modality (the contract is
:class:`mmgpt.interfaces.ModalityLoader`): ``extensions`` it reads, ``load(path)`` → one item
as the modality's encoder's ``preprocess`` takes it, an optional ``placeholder`` (default
``f"<{modality}>"``), ``max_bytes`` and, for an output modality, ``save(item, path)``.
mmgpt's own ``image`` loader reads images through :func:`mmgpt.data.images.load_image`
(format allowlist, pixel budgets); a plugin adds ``@register("loader", "audio")`` and its
files are read by every dataset, ``mmgpt data check``, ``mmgpt generate --input`` and the chat
demo without a change to mmgpt.

:func:`load_input` is the one door: it checks that the file exists, is a regular file, has an
extension the loader reads and fits the loader's byte budget, then loads it; every failure is
an :class:`InputLoadError` (a :class:`~mmgpt.data.errors.DataError`) naming the file, the
modality and what was expected, with a ``reason`` like the image errors'.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmgpt.data.errors import DataError
from mmgpt.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageLoadError, load_image
from mmgpt.data.sample import IMAGE_PLACEHOLDER
from mmgpt.registry import REGISTRY, RegistryError, register

__all__ = [
    "DEFAULT_MAX_INPUT_BYTES",
    "ImageLoader",
    "InputLoadError",
    "accepted_extensions",
    "get_loader",
    "load_input",
    "loader_modalities",
    "modality_of_file",
    "placeholder_of",
    "placeholders",
    "save_output",
]

# Files of a plugin's modality larger than this are refused before they are read (a loader
# may set its own ``max_bytes``): a dataset row must not make training read gigabytes.
DEFAULT_MAX_INPUT_BYTES = 256 << 20


class InputLoadError(DataError):
    """A file of some modality that cannot be used; ``reason`` is ``missing_file``,
    ``unsupported_format`` (an extension the loader does not read), ``too_large`` or
    ``unreadable_input`` (the loader refused it), or an image's reason for images."""

    def __init__(self, path: str | os.PathLike, modality: str, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}", file=str(path), reason=reason)
        self.path = Path(path)
        self.modality = modality
        self.detail = detail


@register("loader", "image")
class ImageLoader:
    """mmgpt's image loader: :func:`~mmgpt.data.images.load_image` (allowlisted formats told
    from the content, pixel and decoded-bytes budgets, full decode, RGB)."""

    modality = "image"
    placeholder = IMAGE_PLACEHOLDER
    extensions = tuple(sorted(IMAGE_EXTENSIONS))
    max_bytes = None  # images are bounded by their pixel budgets instead

    def __init__(self, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.max_pixels = max_pixels

    def load(self, path: Path) -> Any:
        return load_image(path, max_pixels=self.max_pixels)

    def save(self, item: Any, path: Path) -> Path:
        path = Path(path).with_suffix(".png")
        item.save(path, format="PNG")
        return path


def loader_modalities() -> list[str]:
    """The modalities that have a loader (built in and from plugins)."""
    return REGISTRY.names("loader")


def get_loader(modality: str) -> Any:
    """The loader of ``modality`` (an instance; a registered class is built without arguments).

    Raises ``DataError`` naming the modalities that have one."""
    try:
        entry = REGISTRY.get("loader", modality)
    except RegistryError as exc:
        raise DataError(
            f"no loader reads {modality!r} files ({exc}); a plugin adds one with "
            f'@register("loader", "{modality}")',
            reason="unknown_modality",
        ) from None
    return entry() if isinstance(entry, type) else entry


def placeholder_of(modality: str) -> str:
    """The text that marks an item of ``modality`` in a conversation (its loader's
    ``placeholder``, default ``f"<{modality}>"``; always ``"<image>"`` for images)."""
    if modality == "image":
        return IMAGE_PLACEHOLDER
    try:
        loader = get_loader(modality)
    except DataError:
        return f"<{modality}>"
    return getattr(loader, "placeholder", None) or f"<{modality}>"


def placeholders() -> dict[str, str]:
    """``{modality: placeholder}`` of every modality with a loader."""
    return {m: placeholder_of(m) for m in loader_modalities()}


def accepted_extensions(modalities: Any = None) -> dict[str, str]:
    """``{".wav": "audio", ".png": "image", …}`` for ``modalities`` (default: all loaders).

    Two loaders claiming one extension is an error naming both."""
    names = loader_modalities() if modalities is None else list(modalities)
    found: dict[str, str] = {}
    for modality in names:
        for ext in _extensions(get_loader(modality), modality):
            other = found.setdefault(ext, modality)
            if other != modality:
                raise DataError(
                    f"the {other!r} and {modality!r} loaders both read {ext!r} files; "
                    "name the modality of such a file explicitly"
                )
    return found


def modality_of_file(path: str | os.PathLike, modalities: Any = None) -> str:
    """The modality whose loader reads ``path``'s extension (among ``modalities``, default
    all); ``DataError`` listing what is accepted otherwise."""
    table = accepted_extensions(modalities)
    ext = Path(path).suffix.lower()
    if ext in table:
        return table[ext]
    accepted = ", ".join(sorted(table)) or "none"
    raise InputLoadError(
        path,
        "?",
        "unsupported_format",
        f"no loader reads {ext or 'files without an extension'!r} files (accepted: {accepted})",
    )


def load_input(
    modality: str,
    path: str | os.PathLike,
    *,
    loader: Any = None,
    max_bytes: int | None = None,
    check_extension: bool = True,
) -> Any:
    """One file of ``modality`` → its item, through the modality's loader.

    Checks, in order: a loader exists, the file exists and is a regular file, its extension is
    one the loader reads (``check_extension``), its size fits ``max_bytes`` (default: the
    loader's ``max_bytes``, else :data:`DEFAULT_MAX_INPUT_BYTES`; images are bounded by their
    pixel budgets), then ``loader.load(path)``. Raises :class:`InputLoadError`."""
    path = Path(path)
    loader = get_loader(modality) if loader is None else loader
    if not path.is_file():
        what = (
            "is a directory"
            if path.is_dir()
            else "is not a regular file"
            if path.exists()
            else "file not found"
        )
        raise InputLoadError(path, modality, "missing_file", f"{what} ({modality} input)")
    extensions = _extensions(loader, modality)
    if check_extension and path.suffix.lower() not in extensions:
        raise InputLoadError(
            path,
            modality,
            "unsupported_format",
            f"a {modality} input must be a {', '.join(extensions)} file, got "
            f"{path.suffix or 'no extension'!r}",
        )
    if modality != "image":
        limit = max_bytes if max_bytes is not None else getattr(loader, "max_bytes", None)
        limit = DEFAULT_MAX_INPUT_BYTES if limit is None else int(limit)
        size = path.stat().st_size
        if size > limit:
            raise InputLoadError(
                path,
                modality,
                "too_large",
                f"{size} bytes, above the limit of {limit} for a {modality} input",
            )
    try:
        return loader.load(path)
    except ImageLoadError:
        raise
    except DataError as exc:
        raise InputLoadError(
            path, modality, exc.reason or "unreadable_input", _detail(exc, path)
        ) from None
    except Exception as exc:  # a plugin's loader may raise anything for a bad file
        raise InputLoadError(
            path,
            modality,
            "unreadable_input",
            f"the {modality} loader cannot read it ({_detail(exc, path)})",
        ) from None


def save_output(modality: str, item: Any, path: str | os.PathLike) -> Path:
    """Write an output item of ``modality`` with its loader's ``save`` (the suffix is the
    loader's); ``DataError`` when the loader cannot write."""
    loader = get_loader(modality)
    save = getattr(loader, "save", None)
    if not callable(save):
        raise DataError(
            f"the {modality!r} loader has no save(item, path): outputs of {modality} cannot "
            "be written"
        )
    return Path(save(item, Path(path)))


def _extensions(loader: Any, modality: str) -> tuple[str, ...]:
    exts = getattr(loader, "extensions", None)
    if isinstance(exts, str) or not exts or not all(isinstance(e, str) for e in exts):
        raise DataError(
            f"the {modality!r} loader must declare extensions, a tuple like ('.wav',); got {exts!r}"
        )
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in exts)


def _detail(exc: BaseException, path: Path) -> str:
    """The loader's message without a repeated ``"{path}: "`` prefix."""
    message = str(exc) or type(exc).__name__
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
