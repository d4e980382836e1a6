"""What the demo apps share, without Gradio: the model wrapper, input checks and settings.

:class:`DemoModel` wraps a model of any directory mmgpt reads for serving: a
:class:`~mmgpt.multimodal.MultimodalGPT`, or a text-only :class:`~mmgpt.model.GPT` (an mmgpt
GPT directory, or a Hugging Face gpt2 / llama / qwen2 / mistral one) with its tokenizer:

* **Prompts** are built by the processor (:class:`~mmgpt.processor.MultimodalProcessor`), as
  in training: with the tokenizer's own chat template when it has one, else with mmgpt's
  (``User: …\nAssistant:``, what mmgpt's SFT teaches). A text model's reply stops at the
  tokenizer's end-of-turn ids (:func:`mmgpt.generation.stream_text`).

* **Inputs are checked here** and every problem is a :class:`UserInputError` whose message is
  meant for the person at the keyboard (the apps show it as a ``gr.Error``): an empty prompt,
  a file that is not an image, an image over the size limits, a message longer than the
  model's context, an image sent to a model that cannot see.
* **Limits** (:class:`ImageLimits`): uploads over ``MAX_UPLOAD_MB`` are refused by the server;
  images over ``max_pixels`` (``DEMO_MAX_PIXELS``, 16 megapixels) or whose decoding would take
  more than ``max_decoded_bytes`` are refused after reading only their header, and only the
  allowlisted raster formats are ever parsed (:func:`mmgpt.data.images.open_image`); images
  with a side over ``max_side`` (1024 px) are downscaled with a warning — the model itself
  sees ``input_size`` pixels (32×32 for ``shapes-tiny``).
* **Context**: a conversation that does not fit ``block_size`` together with the answer's
  ``max_new_tokens`` loses its oldest exchanges (whole turns, with their images) and the app
  says so; if the last message alone does not fit, that is an error naming the numbers.
  An image sent to a model without an image encoder (a text model) is refused.
* **Other modalities**: an attached file whose extension a plugin's loader claims (``.wav``
  for ``mmgpt-audio``) is read by that loader (:func:`mmgpt.data.loaders.load_input`: its
  size limit and its errors) for a model with an encoder of that modality, and placed with
  the modality's placeholder; :meth:`DemoModel.fit` returns it as a :class:`ModalityItem`
  beside the images. A file of a modality the model does not read is refused, naming the
  types it reads.
* **Concurrency**: requests run in Gradio's worker threads; every decoding step takes one
  lock, with the request's adapter switched on for that step. Concurrent requests thus
  interleave step by step, each computing exactly what it would alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mmgpt.data.images import (
    DEMO_MAX_DECODED_BYTES,
    DEMO_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    load_image,
    open_image,
)
from mmgpt.data.sample import DEFAULT_CAPTION_PROMPT, IMAGE_OUT_PLACEHOLDER, output_placeholder

if TYPE_CHECKING:
    from PIL import Image
    from torch import nn

    from mmgpt.generation import GenerationConfig

logger = logging.getLogger("mmgpt.demo")

# The server refuses uploads above this size (passed to ``launch(max_file_size=...)``).
MAX_UPLOAD_MB = 20
NO_ADAPTER = "none"
# Decoded user images kept for re-reading (a few conversations' worth of 1024 px images).
IMAGE_CACHE_BYTES = 64 * 2**20
MAX_SEED = 2**31 - 1
T = TypeVar("T")


class UserInputError(ValueError):
    """A problem with what the user gave; the message is shown to them as is."""


Warn = Callable[[str], None]


def _log_warning(message: str) -> None:
    logger.warning(message)


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLimits:
    """Refuse images above ``max_pixels``; downscale those with a side above ``max_side``."""

    max_side: int = 1024
    max_pixels: int = DEMO_MAX_PIXELS
    max_decoded_bytes: int = DEMO_MAX_DECODED_BYTES

    def describe(self) -> str:
        return (
            f"files up to {MAX_UPLOAD_MB} MB and {self.max_pixels / 1e6:g} megapixels; images "
            f"larger than {self.max_side} px on a side are downscaled"
        )


IMAGE_TYPES_TEXT = "PNG, JPEG, WebP, GIF, BMP or TIFF"


def load_user_image(
    path: str | Path, limits: ImageLimits = ImageLimits(), warn: Warn = _log_warning
) -> Image.Image:
    """An uploaded file → RGB image, or a :class:`UserInputError` saying what is wrong."""
    from PIL import Image

    path = Path(path)
    name = path.name
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserInputError(
            f"'{name}' is not an image. Upload a {IMAGE_TYPES_TEXT} file ({limits.describe()})."
        )
    try:
        image = load_image(
            path, max_pixels=limits.max_pixels, max_decoded_bytes=limits.max_decoded_bytes
        )
    except ImageLoadError as exc:
        if exc.reason == "too_large":
            raise UserInputError(_too_large(path, limits)) from None
        if exc.reason == "missing_image":
            raise UserInputError(f"'{name}' did not arrive; upload it again.") from None
        if exc.reason == "unsupported_format":
            raise UserInputError(
                f"'{name}' holds {exc.format} data, not an image format this demo reads. "
                f"Upload a {IMAGE_TYPES_TEXT} file."
            ) from None
        raise UserInputError(
            f"'{name}' could not be read as an image ({exc.detail}). Upload a "
            f"{IMAGE_TYPES_TEXT} file."
        ) from None
    width, height = image.size
    if max(width, height) > limits.max_side:
        image.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
        warn(
            f"'{name}' ({width}×{height}) was downscaled to {image.size[0]}×{image.size[1]} "
            f"pixels (the limit is {limits.max_side} px on a side)."
        )
    return image


def _too_large(path: Path, limits: ImageLimits) -> str:
    """Why an image over a budget was refused, in the user's terms (its header only is read)."""
    name = path.name
    try:
        with open_image(path, max_pixels=None, max_decoded_bytes=None) as header:
            (width, height), mode = header.size, header.mode
    except ImageLoadError:  # so large that even PIL's own limit refuses the header
        return (
            f"'{name}' is too large, above this demo's limit of {limits.max_pixels / 1e6:g} "
            "megapixels. Downscale it and try again."
        )
    if width * height > limits.max_pixels:
        return (
            f"'{name}' is {width}×{height} pixels, above this demo's limit of "
            f"{limits.max_pixels / 1e6:g} megapixels. Downscale it and try again."
        )
    return (
        f"'{name}' ({width}×{height}, mode {mode}) would take more than "
        f"{limits.max_decoded_bytes / 2**20:g} MB of memory to decode. Save it as an 8-bit "
        "RGB image or downscale it and try again."
    )


class ImageFolder:
    """Images handed to Gradio by path (the chat's drawn images): PNG files in one folder,
    at most ``max_files`` of them and ``max_bytes`` in all, the oldest removed first.

    Gradio copies a file into its own cache when it sends it to the page, so a file here is
    needed only for a moment; the bound keeps a long-running server's disk use flat.
    :meth:`close` (also run at interpreter exit) removes the folder when it was created here,
    or only the files written here when the caller gave the folder.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        *,
        prefix: str = "mmgpt-",
        max_files: int = 256,
        max_bytes: int = 64 * 2**20,
    ) -> None:
        if max_files < 1 or max_bytes < 1:
            raise ValueError(
                f"ImageFolder: max_files and max_bytes must be positive, got {max_files} "
                f"and {max_bytes}"
            )
        owned = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix=prefix) if owned else directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_files, self.max_bytes = max_files, max_bytes
        self._files: OrderedDict[Path, int] = OrderedDict()  # path → size, oldest first
        self._lock = threading.Lock()
        # a finalizer, not atexit.register(self.close): it runs at exit without keeping
        # every folder (and its app) alive until then
        self._finalizer = weakref.finalize(self, _remove_images, self.directory, owned, self._files)

    def save(self, image: Any) -> str:
        """Write ``image`` as a new PNG file (or an output of another modality, an
        :class:`~mmgpt.imagegen.OutputEvent`, with its loader's ``save`` and suffix); returns
        its path."""
        path = self.directory / f"{uuid.uuid4().hex}.png"
        # again each time: a temp cleaner may remove an idle server's folder
        self.directory.mkdir(parents=True, exist_ok=True)
        modality = getattr(image, "modality", None)
        if isinstance(modality, str):  # the page shows it by its suffix (audio player, file)
            from mmgpt.data.loaders import save_output

            path = save_output(modality, image.item, path.with_suffix(""))
        else:
            image.save(path, format="PNG")
        size = path.stat().st_size
        with self._lock:
            self._files[path] = size
            total = sum(self._files.values())
            while len(self._files) > 1 and (
                len(self._files) > self.max_files or total > self.max_bytes
            ):
                old, old_size = self._files.popitem(last=False)
                total -= old_size
                old.unlink(missing_ok=True)
        return str(path)

    def close(self) -> None:
        self._finalizer()


def _remove_images(directory: Path, owned: bool, files: dict[Path, int]) -> None:
    if owned:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for path in list(files):
        path.unlink(missing_ok=True)
    files.clear()


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


def _number(name: str, value: Any, low: float, high: float, *, integer: bool = False) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{name} must be a number, got {value!r}.") from None
    if not low <= number <= high:  # also refuses nan
        raise UserInputError(f"{name} must be between {low:g} and {high:g}, got {value!r}.")
    if integer:
        if number != int(number):
            raise UserInputError(f"{name} must be a whole number, got {value!r}.")
        return int(number)
    return number


@dataclass(frozen=True)
class Settings:
    """Sampling and drawing settings of one request (validated by :meth:`from_values`)."""

    temperature: float = 0.3  # 0 = greedy; low: the shapes answers are short and exact
    top_p: float = 0.9
    max_new_tokens: int = 48
    guidance: float = 3.0  # classifier-free guidance of the image decoder
    steps: int = 20  # diffusion sampling steps
    seed: int = -1  # -1 = a fresh random seed per request

    @classmethod
    def from_values(
        cls,
        temperature: Any = 0.3,
        top_p: Any = 0.9,
        max_new_tokens: Any = 48,
        guidance: Any = 3.0,
        steps: Any = 20,
        seed: Any = -1,
    ) -> Settings:
        """Settings from UI/API values (numbers may arrive as floats or strings)."""
        return cls(
            temperature=_number("Temperature", temperature, 0.0, 5.0),
            top_p=_number("Top-p", top_p, 0.01, 1.0),
            max_new_tokens=_number("Max new tokens", max_new_tokens, 1, 4096, integer=True),
            guidance=_number("Guidance", guidance, 0.0, 30.0),
            steps=_number("Diffusion steps", steps, 1, 200, integer=True),
            seed=_number("Seed", -1 if seed is None else seed, -1, MAX_SEED, integer=True),
        )

    def resolve_seed(self) -> int:
        """The seed to use: the given one, or a fresh random one for ``-1``."""
        return self.seed if self.seed >= 0 else random.SystemRandom().randrange(MAX_SEED)

    def generation_config(self, seed: int, **overrides: Any) -> GenerationConfig:
        from mmgpt.generation import GenerationConfig

        options: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": seed,
        }
        options.update(overrides)
        return GenerationConfig(**options)


# --------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------


@dataclass
class Message:
    """One turn as the model reads it: text with placeholders, and the paths of its input
    files (images, or any modality a plugin's loader reads, e.g. ``.wav`` audio)."""

    role: str  # "user" | "assistant"
    text: str
    images: list[str]  # attached files of every modality, in the order attached


@dataclass(frozen=True)
class ModalityItem:
    """A loaded input of a modality other than images (a plugin's ``"audio"``…); user
    images stay PIL images in the item lists :meth:`DemoModel.fit` returns."""

    modality: str
    value: Any


def file_modality(path: str | os.PathLike) -> str:
    """The modality of an attached file, told by its extension from the registered loaders
    (:mod:`mmgpt.data.loaders`); a file no loader claims counts as an image, which
    :func:`load_user_image` then refuses with its own message."""
    from mmgpt.data.errors import DataError
    from mmgpt.data.loaders import accepted_extensions

    try:
        table = accepted_extensions()
    except DataError as exc:  # two plugins' loaders claim one extension
        raise UserInputError(f"'{Path(path).name}': {exc}") from None
    return table.get(Path(path).suffix.lower(), "image")


def split_items(items: Sequence[Any]) -> tuple[list[Any], dict[str, list[Any]]]:
    """``(images, {modality: items})`` of a list of loaded inputs, each in order."""
    images: list[Any] = []
    inputs: dict[str, list[Any]] = {}
    for item in items:
        if isinstance(item, ModalityItem):
            inputs.setdefault(item.modality, []).append(item.value)
        else:
            images.append(item)
    return images, inputs


def user_message(text: str | None, image_paths: Sequence[str] = ()) -> Message:
    """A user turn from typed text and attached files.

    Files go before the text, one placeholder each (``"<image>"``, ``"<audio>"``… as their
    modality's loader names it; LLaVA's convention, the one the shapes world and the
    preference JSONL use), unless the text places that modality's files itself. A file with
    no text asks for a caption.
    """
    from mmgpt.data.loaders import placeholder_of

    text = (text or "").strip()
    paths = [str(p) for p in image_paths]
    if not text and not paths:
        raise UserInputError("The message is empty: type a question or attach an image.")
    by_modality: dict[str, int] = {"image": 0}
    for path in paths:
        modality = file_modality(path)
        by_modality[modality] = by_modality.get(modality, 0) + 1
    prefix = ""
    for modality, count in by_modality.items():
        mark = placeholder_of(modality)
        placed = text.count(mark)
        noun = "image" if modality == "image" else f"{modality} file"
        if placed and placed != count:
            raise UserInputError(
                f"The message mentions {mark} {placed} time(s) but has {count} {noun}(s) "
                f"attached; attach one {noun} per {mark}, or leave {mark} out."
            )
        if not placed:
            prefix += f"{mark}\n" * count
    if prefix:
        text = prefix + (text or DEFAULT_CAPTION_PROMPT)
    return Message("user", text, paths)


class DemoModel:
    """A model ready to serve (see the module docstring).

    Args:
        model: a :class:`~mmgpt.multimodal.MultimodalGPT`, or a text-only
            :class:`~mmgpt.model.GPT` (put in eval mode here).
        tokenizer: a text model's tokenizer (a multimodal model carries its own).
        name: shown in the apps (the model directory's name).
        adapters: names of loaded adapters the user may pick from.
        limits: image limits.
        directory: the model directory, named in errors about the model.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        name: str = "model",
        adapters: Sequence[str] = (),
        limits: ImageLimits = ImageLimits(),
        directory: str | Path | None = None,
    ) -> None:
        from mmgpt.multimodal import MultimodalGPT
        from mmgpt.processor import MultimodalProcessor

        self.model = model.eval()
        self.is_text_model = not isinstance(model, MultimodalGPT)
        if self.is_text_model:
            if tokenizer is None:
                raise TypeError(
                    f"DemoModel: a text model ({type(model).__name__}) needs its tokenizer "
                    "(tokenizer=...)"
                )
            # no encoders: the processor renders turns with the tokenizer's chat template,
            # or mmgpt's, exactly as MultimodalGPT would
            self._processor = MultimodalProcessor(tokenizer)
        else:
            self._processor = model.processor(max_length=None)
        self.tokenizer = self._processor.tokenizer
        self.name = name
        self.directory = Path(directory) if directory is not None else None
        self.adapters = list(adapters)
        self.limits = limits
        self._lock = threading.Lock()
        # decoded user images by path: a conversation re-reads its images at every turn
        self._image_cache: OrderedDict[str, Image.Image] = OrderedDict()
        self._image_cache_lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | Path, *, limits: ImageLimits = ImageLimits()) -> DemoModel:
        """Load a model directory (multimodal or text-only, see
        :func:`mmgpt.pretrained.load_model`) and the adapters under
        ``model_dir/adapters/<name>/``.

        An adapter that fails to load is left out with a logged warning, not fatal: the demo
        still serves the base model.
        """
        from mmgpt.adapters import adapter_dirs, load_adapter
        from mmgpt.config import CONFIG_NAME, read_model_config
        from mmgpt.pretrained import architecture, load_model, load_tokenizer

        model_dir = Path(model_dir)
        config = read_model_config(model_dir)
        text_only = architecture(config, model_dir / CONFIG_NAME) != "multimodal"
        # before the weights: a directory without a tokenizer fails at once
        tokenizer = load_tokenizer(model_dir, config) if text_only else None
        model = load_model(model_dir)
        adapters = []
        for name, directory in adapter_dirs(model_dir).items():
            try:
                adapters.append(load_adapter(model, directory, name))
            except Exception as exc:
                logger.warning("adapter %s not loaded: %s", directory, exc)
        return cls(
            model,
            tokenizer=tokenizer,
            name=model_dir.resolve().name,
            adapters=adapters,
            limits=limits,
            directory=model_dir,
        )

    # -- what the model can do ------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return int(self.model.config.block_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def can_see(self) -> bool:
        return "image" in getattr(self.model, "encoders", {})

    @property
    def input_modalities(self) -> list[str]:
        """The modalities the model reads from files: its encoders' that have a loader."""
        from mmgpt.data.loaders import loader_modalities

        return [m for m in getattr(self.model, "encoders", {}) if m in loader_modalities()]

    @property
    def file_types(self) -> list[str]:
        """Extensions of the files the model reads (``[".png", …, ".wav"]``)."""
        from mmgpt.data.loaders import accepted_extensions

        return sorted(accepted_extensions(self.input_modalities))

    def _item(self, path: str, warn: Warn) -> Any:
        """An attached file loaded for the model: a PIL image, or a :class:`ModalityItem`
        read by its modality's loader (its limits; errors for the person uploading)."""
        modality = file_modality(path)
        if modality == "image" or not self.input_modalities:
            if self.input_modalities and not self.can_see:
                raise UserInputError(self._unreadable(path))
            return self.image(path, warn)
        if modality not in self.input_modalities:
            raise UserInputError(self._unreadable(path))
        from mmgpt.data.errors import DataError
        from mmgpt.data.loaders import load_input

        try:
            return ModalityItem(modality, load_input(modality, path))
        except DataError as exc:
            name = Path(path).name
            detail = getattr(exc, "detail", str(exc))
            raise UserInputError(f"'{name}' could not be read as {modality} ({detail}).") from None

    def _unreadable(self, path: str) -> str:
        types = ", ".join(self.file_types)
        return (
            f"'{Path(path).name}' is not a file this model reads ({', '.join(self.input_modalities)}"
            f"). Upload a {types} file."
        )

    @property
    def can_draw(self) -> bool:
        return (
            getattr(self.model, "image_decoder", None) is not None
            and getattr(self.model, "output_projector", None) is not None
            and bool(getattr(self.tokenizer, "signal_token_ids", None))
        )

    @property
    def output_modalities(self) -> list[str]:
        """The modalities the model's replies may hold besides text (``"image"`` first)."""
        others = list(getattr(self.model, "decoders", None) or [])
        return (["image"] if self.can_draw else []) + others

    @property
    def uses_own_chat_template(self) -> bool:
        """Whether prompts are rendered with the tokenizer's chat template (else mmgpt's)."""
        from mmgpt.processor import TokenizerChatTemplate

        return isinstance(self._processor.template, TokenizerChatTemplate)

    @property
    def image_tokens(self) -> int:
        """Decoder positions one input image takes (0 without an image encoder)."""
        return int(self.model.encoders["image"].num_tokens) if self.can_see else 0

    @property
    def input_size(self) -> int | None:
        """Side in pixels of the images the encoder reads."""
        if not self.can_see:
            return None
        return int(self.model.encoders["image"].input_size[-1])

    def describe(self) -> str:
        """The model in errors: its directory when known, else its name."""
        return str(self.directory) if self.directory is not None else f"'{self.name}'"

    def adapter_choices(self) -> list[str]:
        return [NO_ADAPTER, *self.adapters]

    # -- inputs ---------------------------------------------------------------------------
    def image(self, path: str | Path, warn: Warn = _log_warning) -> Image.Image:
        """A user image, checked and cached by path (a conversation re-reads its images)."""
        key = str(path)
        with self._image_cache_lock:
            cached = self._image_cache.get(key)
            if cached is not None:
                self._image_cache.move_to_end(key)
                return cached
        image = load_user_image(path, self.limits, warn)
        with self._image_cache_lock:
            self._image_cache[key] = image
            # bounded by decoded bytes, not entries: each may be up to max_side² RGB pixels
            while len(self._image_cache) > 1 and (
                sum(i.width * i.height * 3 for i in self._image_cache.values()) > IMAGE_CACHE_BYTES
            ):
                self._image_cache.popitem(last=False)
        return image

    def prompt_ids(self, turns: Sequence[dict[str, str]], images: Sequence[Any] = ()) -> list[int]:
        """The generation prompt for ``turns`` as token ids (slots of ``images``, the items
        :meth:`fit` returns, included)."""
        images, inputs = split_items(images)
        try:
            ids = self._processor.encode_prompt(turns, images, inputs=inputs).input_ids
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
        unknown = sorted({i for i in ids if not 0 <= i < self.vocab_size})
        if unknown:
            # e.g. mmgpt's own tokens ("[IMG0]") typed to a model whose vocabulary lacks them
            names = ", ".join(repr(self.tokenizer.decode([i])) for i in unknown[:3])
            raise UserInputError(
                f"The message holds tokens this model does not know ({names}); leave them out."
            )
        return ids

    def prompt_length(self, turns: Sequence[dict[str, str]], images: Sequence[Any]) -> int:
        """Tokens of the generation prompt for ``turns`` (image slots included)."""
        return len(self.prompt_ids(turns, images))

    def fit(
        self, messages: Sequence[Message], max_new_tokens: int, warn: Warn = _log_warning
    ) -> tuple[list[dict[str, str]], list[Image.Image]]:
        """The prompt turns and images for ``messages`` (ending with a user turn) that fit
        the context with ``max_new_tokens`` to spare; the oldest exchanges go first."""
        if not messages or messages[-1].role != "user":
            raise UserInputError("There is no question to answer: send a message first.")
        for message in messages:
            if message.images and not self.input_modalities:
                what = "is a text model" if self.is_text_model else "has no image encoder"
                raise UserInputError(
                    f"The model '{self.name}' cannot see images (it {what}); send text only."
                )
        if max_new_tokens >= self.block_size:
            raise UserInputError(
                f"Max new tokens ({max_new_tokens}) must be below the model's context of "
                f"{self.block_size} tokens."
            )
        budget = self.block_size - max_new_tokens
        start = 0
        while True:
            kept = messages[start:]
            turns = [{"role": m.role, "text": m.text} for m in kept]
            # PIL images, and ModalityItems for the other modalities (split_items)
            images = [self._item(p, warn) for m in kept for p in m.images]
            length = self.prompt_length(turns, images)
            if length <= budget:
                break
            if len(kept) == 1:
                per_image = f"; each image takes {self.image_tokens}" if kept[0].images else ""
                raise UserInputError(
                    f"The message is too long for this model: it needs {length} tokens"
                    f"{per_image}, and the model reads at most {self.block_size} tokens "
                    f"including the {max_new_tokens} of the answer. Shorten the message or "
                    "lower 'Max new tokens'."
                )
            # drop the oldest exchange: up to (and excluding) the next user turn after it
            start += 1
            while start < len(messages) - 1 and messages[start].role != "user":
                start += 1
        if start:
            warn(
                f"The conversation is longer than the model's context of {self.block_size} "
                f"tokens: the oldest {start} message(s) were left out."
            )
        return turns, images

    def check_adapter(self, adapter: str | None) -> str:
        adapter = adapter or NO_ADAPTER
        if adapter != NO_ADAPTER and adapter not in self.adapters:
            raise UserInputError(
                f"Unknown adapter '{adapter}'; choose one of: {', '.join(self.adapter_choices())}."
            )
        return adapter

    # -- running the model ----------------------------------------------------------------
    @contextlib.contextmanager
    def _adapter(self, adapter: str) -> Iterator[None]:
        if not self.adapters:
            yield
            return
        from mmgpt.adapters import adapters_disabled, set_active_adapter

        if adapter == NO_ADAPTER:
            with adapters_disabled(self.model):
                yield
        else:
            set_active_adapter(self.model, adapter)
            yield

    def locked(self, make: Callable[[], Iterator[T]], adapter: str = NO_ADAPTER) -> Iterator[T]:
        """Iterate ``make()`` taking the model lock (and the adapter) for each step."""
        adapter = self.check_adapter(adapter)
        iterator: Iterator[T] | None = None
        try:
            while True:
                with self._lock, self._adapter(adapter):
                    if iterator is None:
                        iterator = make()
                    try:
                        item = next(iterator)
                    except StopIteration:
                        return
                yield item
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with self._lock:
                    close()

    def run(self, fn: Callable[[], T], adapter: str = NO_ADAPTER) -> T:
        """Call ``fn`` under the model lock with ``adapter`` active."""
        adapter = self.check_adapter(adapter)
        with self._lock, self._adapter(adapter):
            return fn()

    def stream_reply(
        self,
        turns: Sequence[dict[str, str]],
        images: Sequence[Image.Image],
        settings: Settings,
        seed: int,
        adapter: str = NO_ADAPTER,
    ) -> Iterator[Any]:
        """The assistant's reply to ``turns``: text chunks (``str``) as they are sampled,
        images (PIL) where the model draws one (with ``seed``, ``seed + 1``… in order) and
        :class:`~mmgpt.imagegen.OutputEvent` s where it produces another output modality."""
        config = settings.generation_config(seed)
        if self.is_text_model:
            if images:
                raise UserInputError(f"The model '{self.name}' is a text model: send text only.")
            from mmgpt.generation import stream_text

            ids = self.prompt_ids(turns)
            chunks = self.locked(
                lambda: stream_text(self.model, self.tokenizer, ids, config), adapter
            )
            # mmgpt's template puts a space before the reply, as MultimodalGPT.stream_text drops
            yield from _strip_leading_space(chunks)
            return
        images, inputs = split_items(images)
        if not self.output_modalities:
            yield from self.locked(
                lambda: self.model.stream_text(list(turns), images, config, inputs=inputs),
                adapter,
            )
            return
        from mmgpt.imagegen import ImageEvent, TextEvent

        image_config = self.image_config(settings, seed)
        events = self.locked(
            lambda: self.model.stream(list(turns), images, config, image_config, inputs=inputs),
            adapter,
        )
        for event in events:
            if isinstance(event, TextEvent):
                yield event.text
            else:
                yield event.image if isinstance(event, ImageEvent) else event

    def image_config(self, settings: Settings, seed: int) -> Any:
        from mmgpt.imagegen import ImageGenerationConfig

        return ImageGenerationConfig(
            steps=settings.steps, guidance_scale=settings.guidance, seed=seed
        )

    def draw(
        self, prompt: str, settings: Settings, seed: int, adapter: str = NO_ADAPTER
    ) -> Image.Image:
        """One image for a drawing prompt with ``seed``; the model is made to start its
        reply with the signal tokens, so it always draws."""
        if not self.can_draw:
            what = "is a text model" if self.is_text_model else "has no image decoder"
            raise UserInputError(f"The model '{self.name}' cannot draw (it {what}).")
        text = (prompt or "").strip()
        if not text:
            raise UserInputError("The prompt is empty: describe what to draw.")
        k = len(self.model.tokenizer.signal_token_ids)
        turns, images = self.fit([user_message(text)], k + 1)
        from mmgpt import imagegen

        def run() -> Image.Image:
            result = imagegen.generate_images(
                self.model,
                [turns],
                self.image_config(settings, seed),
                seeds=[seed],
                force_image=True,
                images=[images],
            )
            return result[0][0][0]

        return self.run(run, adapter)

    def reply(
        self,
        turns: Sequence[dict[str, str]],
        images: Sequence[Image.Image],
        settings: Settings,
        seed: int,
        adapter: str = NO_ADAPTER,
    ) -> tuple[str, list[Image.Image]]:
        """The whole reply: its text (an image's place marked ``<image_out>``, another
        output's ``<modality_out>``) and images."""
        text, drawn = [], []
        for event in self.stream_reply(turns, images, settings, seed, adapter):
            if isinstance(event, str):
                text.append(event)
            elif isinstance(getattr(event, "modality", None), str):
                text.append(output_placeholder(event.modality))
            else:
                drawn.append(event)
                text.append(IMAGE_OUT_PLACEHOLDER)
        return "".join(text).strip(), drawn


def _strip_leading_space(chunks: Iterator[str]) -> Iterator[str]:
    """``chunks`` without the whitespace that starts the first of them (closing ``chunks``
    when closed early, e.g. by Stop)."""
    with contextlib.closing(chunks):
        started = False
        for chunk in chunks:
            if not started:
                chunk = chunk.lstrip()
                started = bool(chunk)
            if chunk:
                yield chunk


__all__ = [
    "IMAGE_TYPES_TEXT",
    "MAX_SEED",
    "MAX_UPLOAD_MB",
    "NO_ADAPTER",
    "DemoModel",
    "ImageFolder",
    "ImageLimits",
    "Message",
    "Settings",
    "UserInputError",
    "load_user_image",
    "user_message",
]
