"""One training example of image-text data: a conversation plus its images.

Every multimodal dataset of mmgpt yields :class:`Sample`; the processor turns samples into
batches. ``images`` are the *input* images, in the order of the ``"<image>"`` placeholders in
the conversation text; ``output_images`` are the images the assistant must draw, one per
``"<image_out>"`` placeholder in its turns. Inputs of any other modality (a plugin's, e.g.
``"audio"``) go in ``inputs[modality]``, in the order of that modality's placeholder
(``"<audio>"``; each encoder declares its own).

A *drawing sample* is one whose assistant turn holds ``"<image_out>"``: the model learns to
answer with the signal tokens and the image decoder to draw ``output_images`` from them.
:func:`split_images` sorts a record's images (listed in placeholder order) into inputs and
outputs; :func:`count_drawing_samples` tells whether a dataset holds any drawing sample.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_CAPTION_PROMPT",
    "IMAGE_OUT_PLACEHOLDER",
    "IMAGE_PLACEHOLDER",
    "ROLES",
    "DrawingCount",
    "Sample",
    "Turn",
    "count_drawing_samples",
    "describe_dataset",
    "is_drawing",
    "output_placeholder",
    "split_images",
]

ROLES = ("user", "assistant")
IMAGE_PLACEHOLDER = "<image>"
IMAGE_OUT_PLACEHOLDER = "<image_out>"
# The user turn of a caption sample is "<image>\n" + this prompt (shapes world and imagefolder
# share it, so a shapes world exported as an imagefolder loads back as the same samples).
DEFAULT_CAPTION_PROMPT = "Describe the image."
# An output of any modality the assistant produces: "<image_out>", "<audio_out>", …
_OUTPUT_PLACEHOLDER = re.compile(r"<\w+_out>")


def output_placeholder(modality: str) -> str:
    """The text that marks an output of ``modality`` in an assistant turn: ``"<image_out>"``
    for images, ``f"<{modality}_out>"`` for the others (the processor expands it into that
    modality's signal tokens)."""
    return IMAGE_OUT_PLACEHOLDER if modality == "image" else f"<{modality}_out>"


@dataclass
class Turn:
    """One message of a conversation; ``role`` is ``"user"`` or ``"assistant"``."""

    role: str
    text: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn.role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"Turn.text must be a str, got {type(self.text).__name__}")


@dataclass
class Sample:
    """A conversation with its input images and the images the assistant must draw.

    ``meta`` carries whatever evaluation or error messages need: the shapes-world scene, the
    question type, the source file and line. ``inputs`` holds the items of non-image
    modalities, ``{modality: [item, …]}`` (images always go in ``images``).
    """

    conversation: list[Turn]
    images: list[Image.Image] = field(default_factory=list)
    output_images: list[Image.Image] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, list[Any]] = field(default_factory=dict)
    # output targets by modality, {modality: [item, …]}, one per "<modality_out>" placeholder
    # (outputs["image"] is another spelling of output_images)
    outputs: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, turn in enumerate(self.conversation):
            if not isinstance(turn, Turn):
                raise TypeError(
                    f"Sample.conversation[{i}] must be a Turn, got {type(turn).__name__}"
                )
        if not isinstance(self.inputs, dict):
            raise TypeError(
                f"Sample.inputs must be a dict {{modality: [items]}}, got {type(self.inputs).__name__}"
            )
        for modality, items in self.inputs.items():
            if not isinstance(modality, str) or not modality:
                raise TypeError(f"Sample.inputs keys must be modality names, got {modality!r}")
            if modality == "image":
                raise ValueError("Sample.inputs['image']: input images go in Sample.images")
            if not isinstance(items, list):
                raise TypeError(
                    f"Sample.inputs[{modality!r}] must be a list of items, got "
                    f"{type(items).__name__}"
                )
        if not isinstance(self.outputs, dict) or not all(
            isinstance(m, str) and m and isinstance(v, list) for m, v in self.outputs.items()
        ):
            raise TypeError("Sample.outputs must be a dict {modality: [items]}")
        if self.outputs.get("image") and self.output_images:
            raise ValueError(
                "Sample: output images given both in output_images and outputs['image']; "
                "give them once"
            )

    @property
    def num_image_placeholders(self) -> int:
        """How many ``"<image>"`` placeholders the conversation holds (should equal ``len(images)``)."""
        return sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in self.conversation)

    @property
    def num_output_placeholders(self) -> int:
        """How many ``"<image_out>"`` placeholders the conversation holds."""
        return sum(turn.text.count(IMAGE_OUT_PLACEHOLDER) for turn in self.conversation)


# -- input and output images ------------------------------------------------------------------
_IMAGE_PLACEHOLDERS = re.compile(
    "(" + re.escape(IMAGE_OUT_PLACEHOLDER) + "|" + re.escape(IMAGE_PLACEHOLDER) + ")"
)


def split_images(conversation: Sequence[Turn], images: Sequence[Any]) -> tuple[list, list]:
    """``(input images, output images)`` of a conversation whose ``images`` are listed in the
    order of its ``"<image>"`` and ``"<image_out>"`` placeholders, turn by turn.

    Raises ``ValueError`` when the number of placeholders is not ``len(images)``.
    """
    kinds = [m for turn in conversation for m in _IMAGE_PLACEHOLDERS.findall(turn.text)]
    if len(kinds) != len(images):
        raise ValueError(
            f"the conversation has {len(kinds)} image placeholder(s) ('<image>' or "
            f"'<image_out>') but {len(images)} image(s) were given"
        )
    inputs = [im for kind, im in zip(kinds, images) if kind == IMAGE_PLACEHOLDER]
    outputs = [im for kind, im in zip(kinds, images) if kind == IMAGE_OUT_PLACEHOLDER]
    return inputs, outputs


def is_drawing(conversation: Sequence[Any], *, any_output: bool = False) -> bool:
    """Whether an assistant turn of ``conversation`` holds ``"<image_out>"`` (an image to
    draw). Turns are :class:`Turn` s, anything with ``role`` and ``text``, or such dicts (the
    text may be under ``content``), as the processor takes them. ``any_output``: an output of
    any modality counts (``"<audio_out>"``…)."""
    for turn in conversation:
        if isinstance(turn, Mapping):
            role, text = turn.get("role"), turn.get("text", turn.get("content"))
        else:
            role, text = getattr(turn, "role", None), getattr(turn, "text", None)
        if role != "assistant" or not isinstance(text, str):
            continue
        if IMAGE_OUT_PLACEHOLDER in text or (any_output and _OUTPUT_PLACEHOLDER.search(text)):
            return True
    return False


@dataclass(frozen=True)
class DrawingCount:
    """What :func:`count_drawing_samples` found: ``drawing`` of the ``checked`` samples ask the
    model to draw; ``complete`` says whether ``checked`` is the whole dataset (file datasets are
    counted record by record, without loading images) or an evenly spread probe."""

    drawing: int
    checked: int
    complete: bool


def _underlying(dataset: Any) -> tuple[Any, list[int] | None]:
    """The dataset behind ``torch.utils.data.Subset`` wrappers, and the indices they keep."""
    indices: list[int] | None = None
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):
        kept = [int(i) for i in dataset.indices]
        indices = kept if indices is None else [kept[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def describe_dataset(dataset: Any) -> str:
    """A dataset for messages: its file or directory when it has one (``source``), else its
    class and task."""
    base, _ = _underlying(dataset)
    source = getattr(base, "source", None)
    if isinstance(source, str) and source:
        return source
    task = getattr(base, "tasks", None) or getattr(base, "task", None)
    if isinstance(task, (list, tuple)):
        task = task[0] if len(task) == 1 else list(task)
    return type(base).__name__ + (f" (task={task!r})" if task is not None else "")


def count_drawing_samples(
    dataset: Any, probe: int = 64, *, any_output: bool = False
) -> DrawingCount | None:
    """How many samples of ``dataset`` ask the model to draw (:func:`is_drawing`; with
    ``any_output``, to produce an output of any modality).

    File datasets (``records`` whose ``data`` are turns, e.g. imagefolder and LLaVA; also
    behind a ``Subset``) are counted completely from their parsed records. Other map-style
    datasets are probed: at most ``probe`` samples spread evenly over them, and when those hold
    no drawing, up to 16 times as many (a mix with 1% drawings is then still found; the
    larger probe runs only on the way to an error). ``None`` when the dataset cannot be
    inspected (an iterable one, or one without conversations).
    """
    base, indices = _underlying(dataset)
    records = getattr(base, "records", None)
    if isinstance(records, list) and all(
        isinstance(getattr(r, "data", None), list) for r in records
    ):
        chosen = records if indices is None else [records[i] for i in indices]
        drawing = sum(is_drawing(r.data, any_output=any_output) for r in chosen)
        return DrawingCount(drawing, len(chosen), complete=True)
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return None
    n = len(dataset)
    if n == 0:
        return DrawingCount(0, 0, complete=True)
    for size in (probe, probe * 16):
        count = min(n, size)
        picked = sorted({i * n // count for i in range(count)})
        drawing = 0
        for i in picked:
            conversation = getattr(dataset[i], "conversation", None)
            if conversation is None:
                return None
            drawing += is_drawing(conversation, any_output=any_output)
        if drawing or count == n:
            break
    return DrawingCount(drawing, len(picked), complete=len(picked) == n)
