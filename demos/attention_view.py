"""The chat's "Attention" view: what the last reply's tokens read, layer by layer and head by head.

The last exchange is run once more through the model with ``output_attentions=True`` (its
prompt exactly as the answer was generated from, the reply's text tokenized back as the chat
template frames a reply), and for the chosen layer and head (each, or the mean over them):

* **prompt tokens** coloured by the attention the reply's tokens give them on average (an
  image counts once, the sum over its slots);
* a **heatmap** with one row per reply token and one column per earlier position (prompt, then
  reply): each row is that token's attention and sums to 1;
* for each image of the prompt, the reply's attention to its **patches**, on the patch grid and
  over the image (:func:`mmgpt.eval.attention.overlay`).

The drawing is :mod:`mmgpt.eval.attention`'s (the ``mmgpt attention`` command's); this module
only picks the reply's rows and the chat's prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from demos.common import NO_ADAPTER, DemoModel, Message, UserInputError, split_items
from mmgpt.data.sample import IMAGE_OUT_PLACEHOLDER
from mmgpt.eval.attention import heatmap, overlay, patch_grid
from mmgpt.processor import IGNORE_INDEX

MEAN = "mean"
EMPTY_REPLY = "…"  # what the chat shows when the model ended its answer at once


@dataclass
class ReplyAttention:
    """The attention weights of one prompt + reply: ``weights[l]`` is layer ``l``'s
    ``(H, T, T)``; positions ``prompt_length ..`` are the reply's tokens."""

    tokens: list[str]  # (T,) the text of each position; image slots read "<image>"
    prompt_length: int
    weights: list[Tensor]  # per layer (H, T, T), rows sum to 1
    images: list[Image.Image] = field(default_factory=list)
    image_slots: list[tuple[int, int]] = field(default_factory=list)  # (first slot, count)

    @property
    def reply_length(self) -> int:
        return len(self.tokens) - self.prompt_length

    def matrix(self, layer: int | str = MEAN, head: int | str = MEAN) -> Tensor:
        """``(reply tokens, T)``: each reply token's attention to every position, for one layer
        and head or averaged over them (a mean of softmax rows still sums to 1)."""
        w = torch.stack(self.weights)  # (L, H, T, T)
        w = w.mean(0) if layer == MEAN else w[_index("layer", layer, w.size(0))]
        w = w.mean(0) if head == MEAN else w[_index("head", head, w.size(0))]  # (T, T)
        return w[self.prompt_length :]


def _index(what: str, value: int | str, count: int) -> int:
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < count:
        raise UserInputError(f"Choose a {what} from 0 to {count - 1}, or '{MEAN}'.")
    return index


def split_last_reply(messages: Sequence[Message], remember: bool) -> tuple[list[Message], str]:
    """The messages the last reply answered (all of them with ``remember``, else the last user
    message alone, as the chat answers) and the reply's text."""
    if len(messages) < 2 or messages[-1].role != "assistant" or messages[-2].role != "user":
        raise UserInputError("There is no reply yet: send a message, then show its attention.")
    reply = messages[-1].text.strip()
    if not reply or reply == EMPTY_REPLY:
        raise UserInputError("The last reply is empty: there is no attention to show.")
    prompt = list(messages[:-1]) if remember else [messages[-2]]
    return prompt, reply


def reply_ids(model: DemoModel, reply: str) -> list[int]:
    """The reply's tokens as the chat template frames a reply (after its separator); a drawn
    image is the signal tokens the model wrote for it."""
    tokenizer = model.tokenizer
    if IMAGE_OUT_PLACEHOLDER in reply:
        signal_ids = list(getattr(tokenizer, "signal_token_ids", None) or [])
        signals = "".join(tokenizer.decode([i]) for i in signal_ids)
        reply = reply.replace(IMAGE_OUT_PLACEHOLDER, signals)
    separator = getattr(model._processor.template, "assistant_separator", " ")
    ids = list(tokenizer.encode(separator + reply))
    if not ids:
        raise UserInputError("The last reply has no tokens: there is no attention to show.")
    return ids


def reply_attention(
    model: DemoModel,
    messages: Sequence[Message],
    *,
    remember: bool = False,
    max_new_tokens: int = 0,
    adapter: str = NO_ADAPTER,
) -> ReplyAttention:
    """Run the chat's last exchange (``messages`` as :func:`demos.chat.to_messages` reads the
    conversation) once with ``output_attentions=True``.

    The prompt is fitted to the context as the answer's was (:meth:`DemoModel.fit`, with
    ``max_new_tokens`` or the reply's length, whichever is larger, kept free).
    """
    prompt_messages, reply = split_last_reply(messages, remember)
    answer = reply_ids(model, reply)
    budget = max(int(max_new_tokens or 0), len(answer))
    turns, items = model.fit(prompt_messages, budget, lambda _warning: None)
    images, inputs = split_items(items)
    processor = model._processor  # the processor the chat built its prompt with
    encoded = processor.encode_prompt(turns, images, inputs=inputs)
    prompt_length = len(encoded.input_ids)
    encoded.input_ids = [*encoded.input_ids, *answer]
    encoded.labels = [*encoded.labels, *[IGNORE_INDEX] * len(answer)]
    batch = processor.collate([encoded], padding_side="right")

    def forward() -> Any:
        with torch.no_grad():
            if model.is_text_model:
                device = next(model.model.parameters()).device
                ids = batch.input_ids.to(device)
                return model.model(input_ids=ids, output_attentions=True, logits_to_keep=1)
            return model.model(batch, output_attentions=True, logits_to_keep=1)

    out = model.run(forward, adapter)
    ids = batch.input_ids[0].tolist()
    slot_id = getattr(model.tokenizer, "image_token_id", None)
    tokens = [
        "<image>" if slot_id is not None and t == slot_id else model.tokenizer.decode([t])
        for t in ids
    ]
    slots = [(int(start), int(length)) for start, length in encoded.image_spans]
    weights = [w[0].float().cpu() for w in out.attentions]  # per layer (H, T, T)
    return ReplyAttention(tokens, prompt_length, weights, list(images), slots)


@dataclass
class AttentionFigures:
    """What the view shows for one layer/head choice."""

    prompt_tokens: list[tuple[str, float]]  # (text, share of the reply's attention / max)
    heatmap: Image.Image  # rows: reply tokens; columns: every position
    overlays: list[tuple[Image.Image, str]]  # per image: (over the image, caption), (grid, caption)
    summary: str
    matrix: Tensor  # (reply tokens, T): the heatmap's numbers


def figures(
    result: ReplyAttention, layer: int | str = MEAN, head: int | str = MEAN
) -> AttentionFigures:
    """The view's figures for ``layer`` and ``head`` (an index or ``"mean"``)."""
    m = result.matrix(layer, head)  # (R, T)
    P = result.prompt_length
    to_prompt = m[:, :P].mean(0)  # (P,) the average reply token's attention to each
    starts = {first: (i, count) for i, (first, count) in enumerate(result.image_slots)}
    spans: list[tuple[str, float]] = []  # an image's slots as one entry: their sum
    position = 0
    while position < P:
        if position in starts:
            i, count = starts[position]
            image_score = float(to_prompt[position : position + count].sum())
            spans.append((f"[image {i + 1}]", image_score))
            position += count
        else:
            spans.append((result.tokens[position], float(to_prompt[position])))
            position += 1
    top = max((score for _, score in spans), default=0.0)
    prompt_tokens = [(text, score / top if top > 0 else 0.0) for text, score in spans]

    overlays = []
    for i, (image, (first, count)) in enumerate(
        zip(result.images, result.image_slots, strict=True)
    ):
        scores = m[:, first : first + count].mean(0)  # (K,) the average reply token's attention
        grid = scores.reshape(patch_grid(count))  # (rows, cols)
        share = f"{float(scores.sum()):.1%} of the reply's attention"
        overlays.append((overlay(image, grid), f"image {i + 1}: {share}"))
        overlays.append((heatmap(grid), f"image {i + 1}, patch grid {tuple(grid.shape)}"))

    prompt_share = float(m[:, :P].sum(1).mean())
    image_share = sum(float(m[:, f : f + c].sum(1).mean()) for f, c in result.image_slots)
    where = f"layer {layer}" if layer != MEAN else "mean of the layers"
    which = f"head {head}" if head != MEAN else "mean of the heads"
    images_part = f" ({image_share:.1%} to the images)" if result.image_slots else ""
    summary = (
        f"**{where}, {which}**: the reply's {result.reply_length} token(s) give "
        f"{prompt_share:.1%} of their attention to the prompt's {P} positions{images_part} and "
        f"{1 - prompt_share:.1%} to the reply's earlier tokens and themselves."
    )
    return AttentionFigures(prompt_tokens, heatmap(m), overlays, summary, m)


def _enlarged(picture: Image.Image, width: int = 720) -> Image.Image:
    """``picture`` scaled up by a whole factor to about ``width`` pixels, cells kept sharp (the
    page would otherwise blur a small map when it stretches it)."""
    factor = max(1, width // picture.width)
    size = (picture.width * factor, picture.height * factor)
    return picture.resize(size, Image.Resampling.NEAREST)


def layer_choices(model: DemoModel) -> list[str]:
    return [MEAN, *(str(i) for i in range(model.model.config.n_layer))]


def head_choices(model: DemoModel) -> list[str]:
    return [MEAN, *(str(i) for i in range(model.model.config.n_head))]


def show_attention(
    model: DemoModel,
    messages: Sequence[Message],
    layer: int | str = MEAN,
    head: int | str = MEAN,
    *,
    remember: bool = False,
    max_new_tokens: int = 0,
    adapter: str = NO_ADAPTER,
) -> AttentionFigures:
    """The view's handler without Gradio: the last reply's figures for ``layer`` and ``head``."""
    result = reply_attention(
        model, messages, remember=remember, max_new_tokens=max_new_tokens, adapter=adapter
    )
    return figures(result, layer, head)


def add_attention_view(
    model: DemoModel,
    chatbot: Any,
    to_messages: Callable[[Any], list[Message]],
    *,
    remember: Any,
    max_new_tokens: Any,
    adapter: Any,
) -> None:
    """The "Attention" accordion of the chat (call inside its ``gr.Blocks``); ``to_messages``
    reads the Chatbot's value as model turns."""
    import gradio as gr

    from demos import ui

    with gr.Accordion("Attention", open=False, elem_id="attention"):
        gr.Markdown(
            "What the last reply's tokens attend to: the prompt tokens coloured by the "
            "attention they get, one heatmap row per reply token (columns: every earlier "
            "position; each row sums to 1) and, for each image, its patches.",
            elem_classes=["mmgpt-note"],
        )
        with gr.Row():
            layer = gr.Dropdown(
                layer_choices(model), value=MEAN, label="Layer", elem_id="attention-layer"
            )
            head = gr.Dropdown(
                head_choices(model), value=MEAN, label="Head", elem_id="attention-head"
            )
            show = gr.Button("Show attention of the last reply", elem_id="attention-show")
        summary = gr.Markdown(elem_id="attention-summary")
        tokens = gr.HighlightedText(
            label="Prompt tokens by the reply's attention", elem_id="attention-tokens"
        )
        with gr.Row():
            grid = gr.Image(
                label="Reply tokens (rows) → positions (columns)",
                show_label=False,  # the label would cover the map's first rows
                type="pil",
                format="png",
                elem_id="attention-heatmap",
            )
            patches = gr.Gallery(
                label="Attention to the image patches",
                format="png",
                columns=2,
                height=320,
                object_fit="contain",
                elem_id="attention-images",
            )

    def handle(history: Any, layer: str, head: str, remember: bool, max_new: Any, adapter: str):
        result = show_attention(
            model,
            to_messages(history),
            layer,
            head,
            remember=bool(remember),
            max_new_tokens=int(max_new or 0),
            adapter=adapter,
        )
        return result.summary, result.prompt_tokens, _enlarged(result.heatmap), result.overlays

    inputs = [chatbot, layer, head, remember, max_new_tokens, adapter]
    outputs = [summary, tokens, grid, patches]
    for trigger in (show.click, layer.change, head.change):
        trigger(ui.friendly(handle), inputs, outputs, api_visibility="private")


__all__ = [
    "AttentionFigures",
    "ReplyAttention",
    "add_attention_view",
    "figures",
    "reply_attention",
    "show_attention",
]
