"""Batches for the RLHF objectives: preference pairs → two-answer batches, samples → prompts.

A preference batch holds the chosen and the rejected answers of ``B`` pairs as ONE
:class:`~mmgpt.processor.MultimodalBatch` of ``2B`` rows (chosen rows first), padded to one
length, so the reward model and the DPO policy score both answers in a single forward pass;
``chosen``/``rejected`` give the two halves as batches of their own. Both halves carry the
pair's image(s): the model sees the image with each answer.

Items accepted by :class:`PreferenceCollator`: anything with ``samples() -> (chosen Sample,
rejected Sample)`` — :class:`~mmgpt.data.preference.PreferencePair` (text answers) or
:class:`ImageOutputPair` (the answers are images, scored by a reward model that reads them as
input images) — optionally as ``(pair, reference_logps)`` tuples, where ``reference_logps`` is
a ``(2,)`` tensor of the reference policy's log-probabilities of (chosen, rejected) that DPO
caches (:mod:`mmgpt.rlhf.reference`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mmgpt.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from mmgpt.processor import MultimodalBatch, MultimodalProcessor

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "ImageOutputPair",
    "PreferenceBatch",
    "PreferenceCollator",
    "as_prompt",
    "collate_prompts",
    "select_rows",
]


# --------------------------------------------------------------------------------------
# Row selection on a MultimodalBatch
# --------------------------------------------------------------------------------------


def _pick(positions: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Items (by ``positions[:, 0]``) lying in ``rows``: their indices, ordered by new row and
    slot as the processor orders them, and their positions renumbered to the new rows."""
    new_row = {r: i for i, r in enumerate(rows.tolist())}
    picked = sorted(
        (new_row[r], s, k) for k, (r, s) in enumerate(positions.tolist()) if r in new_row
    )
    index = torch.tensor([k for _, _, k in picked], dtype=torch.long)
    renumbered = torch.tensor([(r, s) for r, s, _ in picked], dtype=torch.long).reshape(-1, 2)
    return index, renumbered.to(positions.device)


def select_rows(batch: MultimodalBatch, rows: Sequence[int] | Tensor) -> MultimodalBatch:
    """The sub-batch of ``rows`` (in that order), with each row's images and positions."""
    rows = torch.as_tensor(list(rows) if not isinstance(rows, Tensor) else rows, dtype=torch.long)
    image_index, image_positions = _pick(batch.image_positions, rows)
    images = None
    if batch.images is not None and len(image_index):
        images = batch.images[image_index.to(batch.images.device)]
    signal_index, signal_positions = _pick(batch.signal_positions, rows)
    outputs: Any = None
    if batch.output_images is not None and len(signal_index):
        if isinstance(batch.output_images, Tensor):
            outputs = batch.output_images[signal_index.to(batch.output_images.device)]
        else:
            outputs = [batch.output_images[k] for k in signal_index.tolist()]
    modality_inputs, modality_positions = {}, {}
    for modality, inputs in batch.modality_inputs.items():
        index, positions = _pick(batch.modality_positions[modality], rows)
        modality_inputs[modality] = inputs[index.to(inputs.device)]
        modality_positions[modality] = positions
    idx = rows.to(batch.input_ids.device)
    return MultimodalBatch(
        input_ids=batch.input_ids[idx],
        attention_mask=batch.attention_mask[idx],
        labels=None if batch.labels is None else batch.labels[idx],
        images=images,
        image_positions=image_positions,
        signal_positions=signal_positions,
        output_images=outputs,
        meta=[batch.meta[i] for i in rows.tolist()] if batch.meta else [],
        modality_inputs=modality_inputs,
        modality_positions=modality_positions,
    )


# --------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------


def fields_to(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """A copy of the dataclass ``batch`` with every field that is not ``None`` (tensors,
    ``MultimodalBatch``es) moved to ``device``."""
    moved = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        moved[f.name] = None if value is None else value.to(device, non_blocking=non_blocking)
    return type(batch)(**moved)


@dataclass
class ImageOutputPair:
    """A prompt and two candidate OUTPUT images, ``chosen`` preferred over ``rejected``.

    The answer of each side is ``"<image>"``: a reward model's image encoder reads the
    generated image as an input image placed in the assistant turn (preference over image
    outputs, e.g. for a text-to-image policy).
    """

    prompt: str
    images: list[Image.Image]  # the prompt's own images (often none)
    chosen_image: Image.Image
    rejected_image: Image.Image
    meta: dict[str, Any] = field(default_factory=dict)

    def samples(self) -> tuple[Sample, Sample]:
        def side(image: Image.Image) -> Sample:
            turns = [Turn("user", self.prompt), Turn("assistant", IMAGE_PLACEHOLDER)]
            return Sample(turns, [*self.images, image], meta=dict(self.meta))

        return side(self.chosen_image), side(self.rejected_image)


@dataclass
class PreferenceBatch:
    """``B`` preference pairs as one batch of ``2B`` rows: chosen rows ``0..B-1``, then rejected.

    ``reference_logps`` (B, 2): the frozen reference policy's sequence log-probabilities of
    (chosen, rejected), when the pairs came with cached values (DPO).
    """

    pairs: MultimodalBatch
    reference_logps: Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs) // 2

    @property
    def chosen(self) -> MultimodalBatch:
        return select_rows(self.pairs, range(len(self)))

    @property
    def rejected(self) -> MultimodalBatch:
        return select_rows(self.pairs, range(len(self), 2 * len(self)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreferenceBatch:
        return fields_to(self, device, non_blocking)


class PreferenceCollator:
    """A ``collate_fn``: pairs → :class:`PreferenceBatch` through a model's processor.

    Args:
        processor: e.g. ``model.processor()``; right padding (the reward head and the
            log-probabilities read the real tokens whatever the padding, but right padding
            keeps every prompt at the same positions as in SFT).
    """

    def __init__(self, processor: MultimodalProcessor) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[Any]) -> PreferenceBatch:
        if not items:
            raise ValueError("PreferenceCollator: no pairs to collate")
        pairs, refs = [], []
        for i, item in enumerate(items):
            ref = None
            if isinstance(item, tuple):
                if len(item) != 2:
                    raise ValueError(
                        f"PreferenceCollator: item {i} is a tuple of {len(item)}; expected a pair "
                        "or (pair, reference_logps)"
                    )
                item, ref = item
            if not hasattr(item, "samples"):
                raise TypeError(
                    f"PreferenceCollator: item {i} ({type(item).__name__}) is not a preference "
                    "pair (needs samples() -> (chosen, rejected))"
                )
            pairs.append(item)
            refs.append(ref)
        if any(r is None for r in refs) and not all(r is None for r in refs):
            raise ValueError("PreferenceCollator: some pairs have reference log-probs, some not")
        chosen, rejected = zip(*(p.samples() for p in pairs))
        # one processor call: both halves share the padded length (one forward for all rows)
        batch = self.processor([*chosen, *rejected])
        reference = None
        if refs[0] is not None:
            reference = torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in refs])
            if reference.shape != (len(pairs), 2):
                raise ValueError(
                    f"PreferenceCollator: reference log-probs must be (chosen, rejected) per "
                    f"pair, got shape {tuple(reference.shape)}"
                )
        return PreferenceBatch(batch, reference)


# --------------------------------------------------------------------------------------
# Prompts (PPO rollouts)
# --------------------------------------------------------------------------------------


def as_prompt(item: Any) -> Sample:
    """The prompt of a dataset item: a :class:`Sample` whose conversation ends with a user turn.

    Accepts a prompt string, a :class:`Sample` (its final assistant turn(s) are dropped and
    only the images of the kept placeholders stay), or a preference pair (its prompt and
    images).
    """
    if isinstance(item, str):
        return Sample([Turn("user", item)])
    if isinstance(item, Sample):
        turns = list(item.conversation)
        while turns and turns[-1].role == "assistant":
            turns.pop()
        if not turns:
            raise ValueError(
                f"as_prompt: sample {item.meta.get('source', '')} has no user turn to prompt with"
            )
        n_images = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
        prompt = Sample(turns, list(item.images[:n_images]), meta=dict(item.meta))
        if getattr(item, "inputs", None):  # other modalities' items stay with the prompt
            prompt.inputs = {m: list(v) for m, v in item.inputs.items()}
        return prompt
    if hasattr(item, "prompt") and hasattr(item, "images"):
        return Sample([Turn("user", item.prompt)], list(item.images), meta=dict(item.meta))
    raise TypeError(
        f"as_prompt: cannot take a prompt from {type(item).__name__}; expected a str, a Sample "
        "or a preference pair"
    )


def collate_prompts(items: Sequence[Any]) -> list[Sample]:
    """A ``collate_fn`` for prompt data: the items as prompts, in a list (no tensors yet)."""
    return [as_prompt(item) for item in items]
