"""Samples → :class:`MultimodalBatch`: chat template, placeholder expansion, labels, padding.

Without a chat template of its own, a tokenizer's conversations are rendered by mmgpt's
:class:`ChatTemplate` as::

    <bos>User: {user text}\\n
    Assistant: {assistant text}<eos>\\n
    User: …

Only the assistant's replies are learned: the labels cover ``" {assistant text}<eos>"`` and
are ``-100`` on the ``<bos>``, every user turn, each ``"Assistant:"`` prefix, the newline after
``<eos>``, image slots and padding. A generation prompt (:meth:`MultimodalProcessor.encode_prompt`)
is the same rendering of the turns so far followed by ``"Assistant:"``, so training and
inference tokenize identically.

A tokenizer with a chat template (a pretrained chat model's Jinja template: the tokenizer has
``chat_template`` and ``render_chat``) is used with its own template
(:class:`TokenizerChatTemplate`): the conversation is rendered exactly as the model was trained
(``<|start_header_id|>user<|end_header_id|>\\n\\n…<|eot_id|>``, ``<|im_start|>user\\n…<|im_end|>``),
turns may also have the role ``"system"``, and a generation prompt is the rendering with
``add_generation_prompt=True``. The labels cover each assistant reply and its end-of-turn token
(the first of the tokenizer's ``stop_ids`` after the reply), nothing else: the reply of turn
``i`` is what the rendering of ``turns[:i + 1]`` adds to the rendering of ``turns[:i]`` with a
generation prompt. A template that does not render a conversation prefix by prefix (one that
rewrites earlier turns) cannot be trained on this way, and is an error.

Placeholders in any turn's text, any number, at any position:

* ``"<image>"`` becomes ``num_tokens`` copies of the tokenizer's image token (the encoder says
  how many, or ``slot_counts`` where a projector merges tokens);
  :meth:`MultimodalGPT.embed` overwrites those slots with projected image features. Their
  labels are ``-100``.
* ``"<image_out>"`` (an image the assistant draws) becomes the signal tokens
  ``[IMG0]..[IMGk-1]``; in an assistant turn their labels are *on*, since the model must learn
  to emit them.
* Any other modality's placeholder (each encoder declares one: ``encoder.placeholder``,
  default ``f"<{encoder.modality}>"``, e.g. ``"<audio>"``) becomes ``num_tokens`` slots like an
  image's, filled from ``sample.inputs[modality]``. Every modality's slots hold the same id, the
  tokenizer's ``<image>`` token (the generic *modality slot*): the batch records which modality
  owns which slots (``modality_positions``), so a new modality needs no new token and no
  change to the tokenizer's vocabulary.

Counts are validated here, when a sample is processed: the number of ``"<image>"``
placeholders must equal ``len(sample.images)`` (each other modality's placeholders the number
of its ``inputs``, and ``"<image_out>"`` the number of ``output_images`` when any are given),
otherwise a ``ValueError`` names the sample (its
``meta`` source and line, or its index in the batch) and both counts. A sequence longer than
``max_length`` is an error too, unless ``truncation=True``, which cuts at ``max_length`` but
never inside an image, modality or signal span (the whole span goes, with its item).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgpt.data.sample import IMAGE_OUT_PLACEHOLDER, IMAGE_PLACEHOLDER
from mmgpt.interfaces import Tokenizer

IGNORE_INDEX = -100
PADDING_SIDES = ("left", "right")


# --------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------


@dataclass
class MultimodalBatch:
    """Tensors for one forward pass of :class:`~mmgpt.multimodal.MultimodalGPT`.

    ``labels`` are aligned with ``input_ids`` (not shifted): the loss compares
    ``logits[:, :-1]`` with ``labels[:, 1:]``. Image ``i`` (in placeholder order, sample by
    sample) fills slots ``input_ids[r, s : s + num_tokens]`` where
    ``(r, s) = image_positions[i]``; the slots hold the tokenizer's image token id until fused.
    Other modalities (a plugin's ``"audio"``…) are in ``modality_inputs[m]`` with their
    ``modality_positions[m]`` (``(N_m, 2)``, the same layout); their slots hold the same id.
    """

    input_ids: Tensor  # (B, T) long
    attention_mask: Tensor  # (B, T) long, 1 = token, 0 = padding
    labels: Tensor | None = None  # (B, T) long, IGNORE_INDEX where no loss
    images: Tensor | None = None  # (N, 3, H, W) preprocessed input images
    image_positions: Tensor = field(  # (N, 2) long: (row, first slot) of each image
        default_factory=lambda: torch.zeros(0, 2, dtype=torch.long)
    )
    # (M, 2) long: (row, first slot) of each "<image_out>" signal span
    signal_positions: Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))
    # one per signal span when the samples gave output images: a (M, 3, H', W') tensor if the
    # processor has an output-image transform, else the PIL images as given; None otherwise
    output_images: Tensor | list[Any] | None = None
    meta: list[dict[str, Any]] = field(default_factory=list)
    # non-image modality → its preprocessed items (N_m, …) and their (N_m, 2) first slots
    modality_inputs: dict[str, Tensor] = field(default_factory=dict)
    modality_positions: dict[str, Tensor] = field(default_factory=dict)
    # non-image output modality → (M_m, 2) first slots of its "<modality_out>" signal spans,
    # and their targets (the decoder's preprocessed tensor, or the items as given) when given
    output_positions: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor | list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "image" in self.modality_inputs or "image" in self.modality_positions:
            raise ValueError("MultimodalBatch: images go in images/image_positions")
        if set(self.modality_inputs) != set(self.modality_positions):
            raise ValueError(
                f"MultimodalBatch: modality_inputs has {sorted(self.modality_inputs)} but "
                f"modality_positions has {sorted(self.modality_positions)}"
            )

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultimodalBatch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.to(device, non_blocking=non_blocking)
            elif f.name in ("modality_inputs", "modality_positions", "output_positions", "outputs"):
                value = {
                    k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
                    for k, v in value.items()
                }
            moved[f.name] = value
        return MultimodalBatch(**moved)

    def fusion_inputs(self) -> dict[str, tuple[Tensor | None, Tensor]]:
        """``{modality: (inputs, positions)}`` for fusion: images first, then the others."""
        return {
            "image": (self.images, self.image_positions),
            **{m: (x, self.modality_positions[m]) for m, x in self.modality_inputs.items()},
        }


# --------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """How turns become text; see the module docstring for the rendering and the labels.

    ``assistant_separator`` starts the learned reply (so the reply is tokenized as
    ``" word …"`` like running text); a generation prompt stops just before it.
    """

    roles: ClassVar[tuple[str, ...]] = ("user", "assistant")

    user_prefix: str = "User: "
    user_suffix: str = "\n"
    assistant_prefix: str = "Assistant:"
    assistant_separator: str = " "
    assistant_suffix: str = "\n"
    add_bos: bool = True

    def render(self, conversation: Sequence[Any], *, add_generation_prompt: bool = False) -> str:
        """The conversation as text, ``<bos>``/``<eos>`` written literally (for display)."""
        parts = ["<bos>"] if self.add_bos else []
        for role, text in _turns(conversation):
            if role == "user":
                parts.append(f"{self.user_prefix}{text}{self.user_suffix}")
            else:
                parts.append(
                    f"{self.assistant_prefix}{self.assistant_separator}{text}<eos>"
                    f"{self.assistant_suffix}"
                )
        if add_generation_prompt:
            parts.append(self.assistant_prefix)
        return "".join(parts)


DEFAULT_TEMPLATE = ChatTemplate()


class TokenizerChatTemplate:
    """The tokenizer's own chat template (a pretrained chat model's Jinja template).

    The tokenizer renders (``tokenizer.render_chat(messages, add_generation_prompt=...)``, with
    ``messages`` as ``[{"role": ..., "content": ...}]``), so the text is exactly what the model
    was trained on, its special tokens written out and its bos included where the template
    writes one. A reply starts right after the generation prompt (``assistant_separator`` is
    empty); a raw-string prompt starts with bos iff the tokenizer's ``add_bos_token``.
    """

    roles: ClassVar[tuple[str, ...]] = ("system", "user", "assistant")
    assistant_separator = ""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None) or not callable(
            getattr(tokenizer, "render_chat", None)
        ):
            raise TypeError(
                f"{type(tokenizer).__name__} has no chat template to use (it needs a "
                "chat_template and render_chat(messages, add_generation_prompt=...))"
            )
        self.tokenizer = tokenizer

    @property
    def add_bos(self) -> bool:
        return bool(getattr(self.tokenizer, "add_bos_token", False))

    def render(self, conversation: Sequence[Any], *, add_generation_prompt: bool = False) -> str:
        """The conversation as the model reads it (special tokens written out)."""
        messages = [
            {"role": role, "content": text} for role, text in _turns(conversation, self.roles)
        ]
        return self.tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)

    def __repr__(self) -> str:
        return f"TokenizerChatTemplate({type(self.tokenizer).__name__})"


def _turns(
    conversation: Sequence[Any], roles: Sequence[str] = ChatTemplate.roles
) -> list[tuple[str, str]]:
    """(role, text) pairs from Turns (or anything with ``role``/``text``, or such dicts; a
    dict's text may also be under ``content``, as in Hugging Face messages)."""
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise TypeError(
            f"a conversation must be a list of turns, got {type(conversation).__name__}"
        )
    out = []
    expected = " or ".join(repr(r) for r in roles)
    for i, turn in enumerate(conversation):
        if isinstance(turn, Mapping):
            role, text = turn.get("role"), turn.get("text", turn.get("content"))
        else:
            role, text = getattr(turn, "role", None), getattr(turn, "text", None)
        if role not in roles or not isinstance(text, str):
            raise ValueError(
                f"conversation[{i}]: expected a turn with role {expected} and a str "
                f"text, got role={role!r}, text of type {type(text).__name__}"
            )
        out.append((role, text))
    return out


# --------------------------------------------------------------------------------------
# Encoded sequences
# --------------------------------------------------------------------------------------


@dataclass
class EncodedSample:
    """One sample as ids before padding; spans are ``(start, length)``."""

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]
    signal_spans: list[tuple[int, int]]
    images: list[Any]
    output_images: list[Any]
    meta: dict[str, Any]
    # non-image modalities: spans and items by modality, like image_spans/images
    modality_spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    modality_items: dict[str, list[Any]] = field(default_factory=dict)
    # non-image output modalities: signal spans and target items by modality
    output_spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    output_items: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModalitySlots:
    """How one non-image modality enters a sequence: its placeholder text, the slots per item
    (``encoder.num_tokens``) and the batch transform (``encoder.preprocess``)."""

    modality: str
    placeholder: str
    num_tokens: int
    transform: Callable[[list[Any]], Tensor]

    @classmethod
    def from_encoder(
        cls, modality: str, encoder: Any, num_tokens: int | None = None
    ) -> ModalitySlots:
        """``num_tokens``: slots per item when they differ from the encoder's ``num_tokens``
        (a projector that merges tokens)."""
        placeholder = getattr(encoder, "placeholder", None) or f"<{modality}>"
        if num_tokens is None:
            num_tokens = getattr(encoder, "num_tokens", None)
        if not isinstance(placeholder, str) or not placeholder.strip():
            raise ValueError(
                f"the {modality!r} encoder's placeholder must be a non-empty string, "
                f"got {placeholder!r}"
            )
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ValueError(
                f"the {modality!r} encoder's num_tokens must be a positive integer, "
                f"got {num_tokens!r}"
            )
        return cls(modality, placeholder, num_tokens, encoder.preprocess)


def describe_sample(meta: Mapping[str, Any] | None, index: int | None) -> str:
    """``"sample data.json:12"`` or ``"sample 3 of the batch"``, for error messages."""
    meta = meta or {}
    source, line = meta.get("source"), meta.get("line")
    if source is not None:
        where = f"{source}:{line}" if line is not None else str(source)
        ident = meta.get("id")
        return f"sample {where}" + (f" (id {ident})" if ident is not None else "")
    if meta.get("id") is not None:
        return f"sample id {meta['id']}"
    return f"sample {index} of the batch" if index is not None else "the prompt"


class MultimodalProcessor:
    """Turns :class:`~mmgpt.data.sample.Sample` s into a :class:`MultimodalBatch`.

    Args:
        tokenizer: mmgpt tokenizer (``encode``, ``bos_id``, ``eos_id``, ``pad_id``,
            ``image_token_id``, ``signal_token_ids``).
        encoders: an encoder (keyed by its ``modality``, default ``"image"``) or a mapping
            ``{modality: encoder}`` (e.g. a model's ``encoders``); each gives its slots per
            item (``num_tokens``), ``preprocess`` and, for non-image modalities, its
            ``placeholder`` (default ``f"<{modality}>"``).
        num_image_tokens: slots per image when no encoder is given.
        slot_counts: slots per item by modality where they differ from the encoder's
            ``num_tokens`` (a projector that reduces the tokens, e.g. ``pixel_shuffle``; a
            model's :meth:`~mmgpt.multimodal.MultimodalGPT.processor` passes them).
        image_transform: list of images → ``(N, 3, H, W)``; default ``encoder.preprocess``.
        output_image_transform: list of output images → tensor (e.g. a decoder's
            ``preprocess``); without it ``batch.output_images`` holds the PIL images.
        template: a :class:`ChatTemplate`, or a :class:`TokenizerChatTemplate`; default: the
            tokenizer's own chat template when it has one, else :data:`DEFAULT_TEMPLATE`.
        max_length: longest sequence allowed (e.g. the decoder's ``block_size``).
        padding_side: ``"right"`` for training, ``"left"`` for batched generation.
        truncation: cut long sequences at ``max_length`` instead of raising.
        output_signals: ``{modality: signal token ids}`` of the non-image output modalities;
            each one's placeholder ``f"<{modality}_out>"`` becomes its signal tokens, like
            ``"<image_out>"``, and ``sample.outputs[modality]`` its targets.
        output_transforms: ``{modality: items → tensor}`` for those targets (the decoder's
            ``preprocess``); without one ``batch.outputs[modality]`` holds the items.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        encoders: Any = None,
        *,
        num_image_tokens: int | None = None,
        image_transform: Callable[[list[Any]], Tensor] | None = None,
        output_image_transform: Callable[[list[Any]], Tensor] | None = None,
        template: ChatTemplate | TokenizerChatTemplate | None = None,
        max_length: int | None = None,
        padding_side: str = "right",
        truncation: bool = False,
        slot_counts: Mapping[str, int] | None = None,
        output_signals: Mapping[str, Sequence[int]] | None = None,
        output_transforms: Mapping[str, Callable[[list[Any]], Tensor]] | None = None,
    ) -> None:
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        if max_length is not None and (isinstance(max_length, bool) or max_length <= 0):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        if isinstance(encoders, torch.nn.ModuleDict):  # not a Mapping: no .get()
            encoders = dict(encoders.items())
        if encoders is None:
            encoders = {}
        elif not isinstance(encoders, Mapping):
            encoders = {getattr(encoders, "modality", "image"): encoders}
        slot_counts = dict(slot_counts or {})
        unknown = sorted(set(slot_counts) - set(encoders))
        if unknown:
            raise ValueError(f"slot_counts names modalities without an encoder: {unknown}")
        encoder = encoders.get("image")
        if encoder is not None:
            image_slots = slot_counts.get("image", encoder.num_tokens)
            if num_image_tokens is not None and num_image_tokens != image_slots:
                raise ValueError(
                    f"num_image_tokens={num_image_tokens} disagrees with the image encoder's "
                    f"num_tokens={image_slots}"
                )
            num_image_tokens = int(image_slots)
            image_transform = image_transform or encoder.preprocess
        if num_image_tokens is not None and (
            isinstance(num_image_tokens, bool) or num_image_tokens <= 0
        ):
            raise ValueError(f"num_image_tokens must be a positive integer, got {num_image_tokens}")
        self.modalities: dict[str, ModalitySlots] = {
            m: ModalitySlots.from_encoder(m, enc, slot_counts.get(m))
            for m, enc in encoders.items()
            if m != "image"
        }
        fixed = (IMAGE_PLACEHOLDER, IMAGE_OUT_PLACEHOLDER)
        self.output_signals = {m: list(ids) for m, ids in (output_signals or {}).items()}
        self.output_transforms = dict(output_transforms or {})
        self._output_placeholder = {f"<{m}_out>": m for m in self.output_signals}
        placeholders = [
            *fixed,
            *(spec.placeholder for spec in self.modalities.values()),
            *self._output_placeholder,
        ]
        if len(set(placeholders)) != len(placeholders):
            raise ValueError(
                f"modality placeholders must be distinct and differ from {fixed}, got "
                + ", ".join(f"{m}: {s.placeholder!r}" for m, s in self.modalities.items())
            )
        self._placeholder_modality = {s.placeholder: m for m, s in self.modalities.items()}
        # longest first, so a placeholder that extends another one wins
        alternatives = sorted(placeholders, key=len, reverse=True)
        self._placeholder_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        if template is None:
            has_own = getattr(tokenizer, "chat_template", None)
            template = TokenizerChatTemplate(tokenizer) if has_own else DEFAULT_TEMPLATE
        elif not isinstance(template, (ChatTemplate, TokenizerChatTemplate)):
            raise TypeError(
                "template must be a ChatTemplate or a TokenizerChatTemplate, got "
                f"{type(template).__name__}"
            )
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_transform = image_transform
        self.output_image_transform = output_image_transform
        self.template = template
        self.max_length = max_length
        self.padding_side = padding_side
        self.truncation = truncation

    # -- public API -------------------------------------------------------------------
    def __call__(self, samples: Any) -> MultimodalBatch:
        """Sample or list of Samples → padded batch with labels (usable as a ``collate_fn``)."""
        if not isinstance(samples, Sequence):
            samples = [samples]
        if not samples:
            raise ValueError("MultimodalProcessor: no samples to process")
        encoded = [self.encode_sample(s, index=i) for i, s in enumerate(samples)]
        return self.collate(encoded)

    def encode_sample(self, sample: Any, index: int | None = None) -> EncodedSample:
        """One sample (conversation + images) → ids, labels and spans, validated."""
        meta = dict(getattr(sample, "meta", None) or {})
        where = describe_sample(meta, index)
        try:
            turns = _turns(sample.conversation, self.template.roles)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        images = list(getattr(sample, "images", None) or [])
        output_images = list(getattr(sample, "output_images", None) or [])
        outputs = dict(getattr(sample, "outputs", None) or {})
        output_images = output_images or list(outputs.pop("image", None) or [])
        items = self._modality_items(getattr(sample, "inputs", None), where)
        ids, labels, image_spans, signal_spans, spans = self._encode_turns(turns, where)
        out_spans = self._pop_output_spans(spans)
        self._check_counts(where, len(image_spans), len(images), len(signal_spans), output_images)
        self._check_modality_counts(where, spans, items)
        self._check_output_counts(where, out_spans, outputs)
        enc = EncodedSample(
            ids,
            labels,
            image_spans,
            signal_spans,
            images,
            output_images,
            meta,
            spans,
            items,
            out_spans,
            {m: list(v) for m, v in outputs.items() if v},
        )
        return self._fit_length(enc, where)

    def encode_prompt(
        self,
        prompt: str | Sequence[Any],
        images: Sequence[Any] = (),
        *,
        inputs: Mapping[str, Sequence[Any]] | None = None,
        index: int | None = None,
    ) -> EncodedSample:
        """A generation prompt: a conversation (rendered with the template and ending with
        ``"Assistant:"``, or a chat template's generation prompt) or a raw string (used verbatim
        after ``<bos>``, if the template adds one; placeholders expanded).
        ``inputs``: items of non-image modalities, ``{modality: [item, …]}``.
        """
        where = f"prompt {index}" if index is not None else "the prompt"
        images = list(images)
        items = self._modality_items(inputs, where)
        if isinstance(prompt, str):
            ids: list[int] = [self.tokenizer.bos_id] if self.template.add_bos else []
            labels = [IGNORE_INDEX] * len(ids)
            image_spans: list[tuple[int, int]] = []
            signal_spans: list[tuple[int, int]] = []
            spans: dict[str, list[tuple[int, int]]] = {}
            self._append_text(prompt, False, ids, labels, image_spans, signal_spans, where, spans)
        else:
            turns = _turns(prompt, self.template.roles)
            if turns and turns[-1][0] != "user":
                raise ValueError(
                    f"{where}: a generation prompt must end with a user turn, "
                    f"the last turn is {turns[-1][0]!r}"
                )
            if isinstance(self.template, TokenizerChatTemplate):
                ids, labels, image_spans, signal_spans, spans = self._encode_chat(
                    turns, where, add_generation_prompt=True
                )
            else:
                ids, labels, image_spans, signal_spans, spans = self._encode_turns(turns, where)
                self._append_text(
                    self.template.assistant_prefix,
                    False,
                    ids,
                    labels,
                    image_spans,
                    signal_spans,
                    where,
                )
        self._check_counts(where, len(image_spans), len(images), 0, [])
        self._pop_output_spans(spans)  # a prompt may force an output; it has no target
        self._check_modality_counts(where, spans, items)
        enc = EncodedSample(
            ids, [IGNORE_INDEX] * len(ids), image_spans, signal_spans, images, [], {}, spans, items
        )
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(
                f"{where}: {len(ids)} tokens exceed max_length={self.max_length} "
                f"({len(image_spans)} image(s) × {self.num_image_tokens} slots included)"
            )
        return enc

    def build_prompt(self, conversation: Sequence[Any]) -> str:
        """The generation prompt as text (``<bos>`` literal; ends with ``"Assistant:"`` or the
        chat template's generation prompt)."""
        return self.template.render(conversation, add_generation_prompt=True)

    def prompt_batch(
        self,
        prompts: Sequence[str | Sequence[Any]],
        images: Sequence[Sequence[Any]] | None = None,
        inputs: Sequence[Mapping[str, Sequence[Any]] | None] | None = None,
    ) -> MultimodalBatch:
        """Several generation prompts, left-padded, without labels. ``images[i]`` and
        ``inputs[i]`` (``{modality: items}``) belong to prompt ``i``."""
        images = images if images is not None else [()] * len(prompts)
        inputs = inputs if inputs is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
        if len(inputs) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(inputs)} input mappings")
        encoded = [
            self.encode_prompt(p, im, inputs=x, index=i)
            for i, (p, im, x) in enumerate(zip(prompts, images, inputs))
        ]
        batch = self.collate(encoded, padding_side="left")
        batch.labels = None
        return batch

    def collate(
        self, encoded: Sequence[EncodedSample], *, padding_side: str | None = None
    ) -> MultimodalBatch:
        """Pad encoded samples into tensors."""
        side = padding_side or self.padding_side
        if side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {side!r}")
        T = max(len(e.input_ids) for e in encoded)
        B = len(encoded)
        input_ids = torch.full((B, T), int(self.tokenizer.pad_id), dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        image_positions, signal_positions = [], []
        images: list[Any] = []
        output_images: list[Any] = []
        positions: dict[str, list[tuple[int, int]]] = {m: [] for m in self.modalities}
        items: dict[str, list[Any]] = {m: [] for m in self.modalities}
        out_positions: dict[str, list[tuple[int, int]]] = {m: [] for m in self.output_signals}
        out_items: dict[str, list[Any]] = {m: [] for m in self.output_signals}
        with_outputs = [bool(e.output_images) for e in encoded if e.signal_spans]
        if any(with_outputs) and not all(with_outputs):
            raise ValueError(
                "the batch mixes samples whose '<image_out>' spans have output images with "
                "samples whose spans have none; batch them separately"
            )
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            offset = T - n if side == "left" else 0
            input_ids[row, offset : offset + n] = torch.tensor(e.input_ids, dtype=torch.long)
            attention_mask[row, offset : offset + n] = 1
            labels[row, offset : offset + n] = torch.tensor(e.labels, dtype=torch.long)
            image_positions += [(row, offset + start) for start, _ in e.image_spans]
            signal_positions += [(row, offset + start) for start, _ in e.signal_spans]
            images += e.images
            output_images += e.output_images
            for m, spans in e.modality_spans.items():
                positions[m] += [(row, offset + start) for start, _ in spans]
                items[m] += e.modality_items.get(m, [])
            for m, spans in e.output_spans.items():
                out_positions[m] += [(row, offset + start) for start, _ in spans]
                out_items[m] += e.output_items.get(m, [])
        for m, found in out_items.items():
            if found and len(found) != len(out_positions[m]):
                raise ValueError(
                    f"the batch mixes samples whose '<{m}_out>' spans have {m} outputs with "
                    "samples whose spans have none; batch them separately"
                )
        present = [m for m in self.modalities if items[m]]
        return MultimodalBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            images=self._preprocess_images(images),
            image_positions=torch.tensor(image_positions, dtype=torch.long).reshape(-1, 2),
            signal_positions=torch.tensor(signal_positions, dtype=torch.long).reshape(-1, 2),
            output_images=self._preprocess_outputs(output_images),
            meta=[e.meta for e in encoded],
            modality_inputs={m: self.modalities[m].transform(items[m]) for m in present},
            modality_positions={
                m: torch.tensor(positions[m], dtype=torch.long).reshape(-1, 2) for m in present
            },
            output_positions={
                m: torch.tensor(p, dtype=torch.long).reshape(-1, 2)
                for m, p in out_positions.items()
                if p
            },
            outputs={m: self._preprocess_output(m, v) for m, v in out_items.items() if v},
        )

    # -- internals --------------------------------------------------------------------
    def _encode_turns(
        self, turns: list[tuple[str, str]], where: str
    ) -> tuple[
        list[int],
        list[int],
        list[tuple[int, int]],
        list[tuple[int, int]],
        dict[str, list[tuple[int, int]]],
    ]:
        t = self.template
        if isinstance(t, TokenizerChatTemplate):
            return self._encode_chat(turns, where, add_generation_prompt=False)
        ids: list[int] = [self.tokenizer.bos_id] if t.add_bos else []
        labels = [IGNORE_INDEX] * len(ids)
        image_spans: list[tuple[int, int]] = []
        signal_spans: list[tuple[int, int]] = []
        modality_spans: dict[str, list[tuple[int, int]]] = {}
        spans = (image_spans, signal_spans)
        for role, text in turns:
            if role == "user":
                self._append_text(
                    f"{t.user_prefix}{text}{t.user_suffix}",
                    False,
                    ids,
                    labels,
                    *spans,
                    where,
                    modality_spans,
                )
            else:
                self._append_text(t.assistant_prefix, False, ids, labels, *spans, where)
                self._append_text(
                    f"{t.assistant_separator}{text}",
                    True,
                    ids,
                    labels,
                    *spans,
                    where,
                    modality_spans,
                )
                ids.append(self.tokenizer.eos_id)
                labels.append(self.tokenizer.eos_id)
                self._append_text(t.assistant_suffix, False, ids, labels, *spans, where)
        return ids, labels, image_spans, signal_spans, modality_spans

    def _encode_chat(
        self, turns: list[tuple[str, str]], where: str, *, add_generation_prompt: bool
    ) -> tuple[
        list[int],
        list[int],
        list[tuple[int, int]],
        list[tuple[int, int]],
        dict[str, list[tuple[int, int]]],
    ]:
        """Turns rendered by the tokenizer's chat template; labels on the assistant replies.

        The text is tokenized in pieces cut where a reply starts (the end of the generation
        prompt, so a prompt is tokenized as at inference) and after its end-of-turn token."""

        def render(upto: int, generation_prompt: bool) -> str:
            messages = [{"role": role, "text": text} for role, text in turns[:upto]]
            try:
                return self.template.render(messages, add_generation_prompt=generation_prompt)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc

        text = render(len(turns), add_generation_prompt)
        pieces: list[tuple[str, bool]] = []  # (text, learned)
        done = 0
        for i, (role, reply) in enumerate(turns):
            if role != "assistant" or add_generation_prompt:
                continue
            before, through = render(i, True), render(i + 1, False)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    f"{where}: the chat template does not render this conversation prefix by "
                    f"prefix (turn {i}: the text of the turns before it, with a generation "
                    "prompt, does not start the text of the turns through it, or that does not "
                    "start the whole), so the assistant's reply cannot be told apart from the "
                    "template's own text"
                )
            start, end = len(before), self._reply_end(through, len(before), reply)
            pieces += [(text[done:start], False), (text[start:end], True)]
            done = end
        pieces.append((text[done:], False))

        ids: list[int] = []
        labels: list[int] = []
        image_spans: list[tuple[int, int]] = []
        signal_spans: list[tuple[int, int]] = []
        modality_spans: dict[str, list[tuple[int, int]]] = {}
        for piece, learn in pieces:
            self._append_text(
                piece, learn, ids, labels, image_spans, signal_spans, where, modality_spans
            )
        return ids, labels, image_spans, signal_spans, modality_spans

    def _reply_end(self, through: str, start: int, reply: str) -> int:
        """Where the learned part of a rendered reply ends: just after the first stop token
        (end of turn) that follows the reply's text, else at the end of the rendering."""
        tail = through[start:]
        content = reply.strip()  # templates may trim the reply (Llama-3's does)
        at = tail.find(content) if content else 0
        after = at + len(content) if at >= 0 else 0
        stop_ids = list(getattr(self.tokenizer, "stop_ids", None) or [self.tokenizer.eos_id])
        ends = [
            found + len(token)
            for token in (self.tokenizer.decode([i]) for i in stop_ids)
            if token and (found := tail.find(token, after)) >= 0
        ]
        return start + min(ends) if ends else len(through)

    def _append_text(
        self,
        text: str,
        learn: bool,
        ids: list[int],
        labels: list[int],
        image_spans: list[tuple[int, int]],
        signal_spans: list[tuple[int, int]],
        where: str,
        modality_spans: dict[str, list[tuple[int, int]]] | None = None,
    ) -> None:
        """Tokenize ``text`` with its placeholders expanded; labels on iff ``learn``.

        Non-image modality spans go into ``modality_spans[modality]``."""
        for piece in self._placeholder_re.split(text):
            if not piece:
                continue
            modality = self._placeholder_modality.get(piece)
            output = self._output_placeholder.get(piece)
            if output is not None:
                if modality_spans is None:
                    raise ValueError(f"{where}: unexpected {piece!r} placeholder")
                signal = self.output_signals[output]
                # kept under the placeholder (no modality name has "<") until _pop_output_spans
                modality_spans.setdefault(piece, []).append((len(ids), len(signal)))
                ids += signal
                labels += signal if learn else [IGNORE_INDEX] * len(signal)
            elif modality is not None:
                if modality_spans is None:
                    raise ValueError(f"{where}: unexpected {piece!r} placeholder")
                n = self.modalities[modality].num_tokens
                modality_spans.setdefault(modality, []).append((len(ids), n))
                # the generic modality slot id: the fusion knows each slot's modality
                ids += [self.tokenizer.image_token_id] * n
                labels += [IGNORE_INDEX] * n
            elif piece == IMAGE_PLACEHOLDER:
                if self.num_image_tokens is None:
                    raise ValueError(
                        f"{where}: the text has an '<image>' placeholder but the processor has "
                        "no image encoder (pass encoders= or num_image_tokens=)"
                    )
                image_spans.append((len(ids), self.num_image_tokens))
                ids += [self.tokenizer.image_token_id] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
            elif piece == IMAGE_OUT_PLACEHOLDER:
                signal = list(getattr(self.tokenizer, "signal_token_ids", None) or [])
                if not signal:
                    raise ValueError(
                        f"{where}: the text has an '<image_out>' placeholder but the tokenizer "
                        "has no signal tokens [IMG0]..; train it with num_signal_tokens > 0"
                    )
                signal_spans.append((len(ids), len(signal)))
                ids += signal
                labels += signal if learn else [IGNORE_INDEX] * len(signal)
            else:
                piece_ids = self.tokenizer.encode(piece)
                ids += piece_ids
                labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)

    @staticmethod
    def _check_counts(
        where: str, n_placeholders: int, n_images: int, n_out: int, output_images: list[Any]
    ) -> None:
        if n_placeholders != n_images:
            raise ValueError(
                f"{where}: the conversation has {n_placeholders} '<image>' placeholder(s) but "
                f"{n_images} image(s) were given"
            )
        if output_images and n_out != len(output_images):
            raise ValueError(
                f"{where}: the conversation has {n_out} '<image_out>' placeholder(s) but "
                f"{len(output_images)} output image(s) were given"
            )

    def _pop_output_spans(
        self, spans: dict[str, list[tuple[int, int]]]
    ) -> dict[str, list[tuple[int, int]]]:
        """The output modalities' signal spans, taken out of the input modalities' ``spans``."""
        return {
            m: spans.pop(placeholder)
            for placeholder, m in self._output_placeholder.items()
            if placeholder in spans
        }

    def _check_output_counts(
        self, where: str, spans: dict[str, list[tuple[int, int]]], outputs: Mapping[str, Any]
    ) -> None:
        unknown = sorted(m for m, v in outputs.items() if v and m not in self.output_signals)
        if unknown:
            known = ", ".join(sorted(self.output_signals)) or "none"
            raise ValueError(
                f"{where}: has {unknown} outputs but the model has no decoder for them "
                f"(its non-image output modalities: {known})"
            )
        for m, items in outputs.items():
            if items and len(items) != len(spans.get(m, [])):
                raise ValueError(
                    f"{where}: the conversation has {len(spans.get(m, []))} '<{m}_out>' "
                    f"placeholder(s) but {len(items)} {m} output(s) were given"
                )

    def _modality_items(self, inputs: Any, where: str) -> dict[str, list[Any]]:
        """``sample.inputs`` as lists, every modality known to this processor."""
        if not inputs:
            return {}
        if not isinstance(inputs, Mapping):
            raise ValueError(
                f"{where}: inputs must be a mapping {{modality: [items]}}, got "
                f"{type(inputs).__name__}"
            )
        items = {}
        for modality, values in inputs.items():
            if isinstance(values, Sequence) and not isinstance(values, (str, bytes)) and not values:
                continue  # no items of that modality
            if modality == "image":
                raise ValueError(f"{where}: input images go in images, not inputs['image']")
            if modality not in self.modalities:
                known = ", ".join(sorted(self.modalities)) or "none"
                raise ValueError(
                    f"{where}: has {modality!r} inputs but the processor has no {modality!r} "
                    f"encoder (its non-image modalities: {known})"
                )
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(
                    f"{where}: inputs[{modality!r}] must be a list of items, got "
                    f"{type(values).__name__}"
                )
            items[modality] = list(values)
        return items

    def _check_modality_counts(
        self, where: str, spans: dict[str, list[tuple[int, int]]], items: dict[str, list[Any]]
    ) -> None:
        for modality, spec in self.modalities.items():
            n_placeholders = len(spans.get(modality, []))
            n_items = len(items.get(modality, []))
            if n_placeholders != n_items:
                raise ValueError(
                    f"{where}: the conversation has {n_placeholders} {spec.placeholder!r} "
                    f"placeholder(s) but {n_items} {modality} input(s) were given"
                )

    def _fit_length(self, enc: EncodedSample, where: str) -> EncodedSample:
        n = len(enc.input_ids)
        if self.max_length is None or n <= self.max_length:
            return enc
        if not self.truncation:
            raise ValueError(
                f"{where}: {n} tokens exceed max_length={self.max_length} "
                f"({len(enc.image_spans)} image(s) × {self.num_image_tokens} slots included); "
                "shorten the text, use fewer images, or pass truncation=True"
            )
        cut = self.max_length
        other_spans = [
            span
            for group in (enc.modality_spans, enc.output_spans)
            for spans in group.values()
            for span in spans
        ]
        for start, length in enc.image_spans + enc.signal_spans + other_spans:
            if start < cut < start + length:
                cut = min(cut, start)  # never cut through a span: drop it whole
        keep_images = sum(start + length <= cut for start, length in enc.image_spans)
        keep_signals = sum(start + length <= cut for start, length in enc.signal_spans)
        kept = {
            m: [span for span in spans if span[0] + span[1] <= cut]
            for m, spans in enc.modality_spans.items()
        }
        kept_out = {
            m: [span for span in spans if span[0] + span[1] <= cut]
            for m, spans in enc.output_spans.items()
        }
        return EncodedSample(
            input_ids=enc.input_ids[:cut],
            labels=enc.labels[:cut],
            image_spans=enc.image_spans[:keep_images],
            signal_spans=enc.signal_spans[:keep_signals],
            images=enc.images[:keep_images],
            output_images=enc.output_images[:keep_signals],
            meta=enc.meta,
            modality_spans=kept,
            modality_items={
                m: items[: len(kept.get(m, []))] for m, items in enc.modality_items.items()
            },
            output_spans=kept_out,
            output_items={
                m: items[: len(kept_out.get(m, []))] for m, items in enc.output_items.items()
            },
        )

    def _preprocess_images(self, images: list[Any]) -> Tensor | None:
        if not images:
            return None
        if self.image_transform is None:
            raise ValueError("the processor has no image encoder to preprocess images with")
        return self.image_transform(images)  # (N, 3, H, W)

    def _preprocess_output(self, modality: str, items: list[Any]) -> Tensor | list[Any]:
        transform = self.output_transforms.get(modality)
        return items if transform is None else transform(items)

    def _preprocess_outputs(self, images: list[Any]) -> Tensor | list[Any] | None:
        if not images:
            return None
        if self.output_image_transform is None:
            return images
        return self.output_image_transform(images)


__all__ = [
    "DEFAULT_TEMPLATE",
    "IGNORE_INDEX",
    "IMAGE_OUT_PLACEHOLDER",
    "IMAGE_PLACEHOLDER",
    "ChatTemplate",
    "EncodedSample",
    "ModalitySlots",
    "MultimodalBatch",
    "MultimodalProcessor",
    "TokenizerChatTemplate",
    "describe_sample",
]
