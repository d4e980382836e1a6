"""One training example of image-text data: a conversation plus its images.

Every multimodal dataset of mmgpt yields :class:`Sample`; the processor turns samples into
batches. ``images`` are the *input* images, in the order of the ``"<image>"`` placeholders in
the conversation text; ``output_images`` are the images the assistant must draw, one per
``"<image_out>"`` placeholder in its turns. Inputs of any other modality (a plugin's, e.g.
``"audio"``) go in ``inputs[modality]``, in the order of that modality's placeholder
(``"<audio>"``; each encoder declares its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_CAPTION_PROMPT",
    "IMAGE_OUT_PLACEHOLDER",
    "IMAGE_PLACEHOLDER",
    "ROLES",
    "Sample",
    "Turn",
]

ROLES = ("user", "assistant")
IMAGE_PLACEHOLDER = "<image>"
IMAGE_OUT_PLACEHOLDER = "<image_out>"
# The user turn of a caption sample is "<image>\n" + this prompt (shapes world and imagefolder
# share it, so a shapes world exported as an imagefolder loads back as the same samples).
DEFAULT_CAPTION_PROMPT = "Describe the image."


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

    @property
    def num_image_placeholders(self) -> int:
        """How many ``"<image>"`` placeholders the conversation holds (should equal ``len(images)``)."""
        return sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in self.conversation)

    @property
    def num_output_placeholders(self) -> int:
        """How many ``"<image_out>"`` placeholders the conversation holds."""
        return sum(turn.text.count(IMAGE_OUT_PLACEHOLDER) for turn in self.conversation)
