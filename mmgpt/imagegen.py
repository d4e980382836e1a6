"""Image generation by a :class:`~mmgpt.multimodal.MultimodalGPT` (GILL / NExT-GPT style).

The GPT draws by writing the signal tokens ``[IMG0]..[IMGk-1]``:

1. It samples ``[IMG0]`` like any other token; the next ``k - 1`` tokens are then *forced*
   to ``[IMG1]..[IMGk-1]`` (:class:`mmgpt.generation.ForceAfter`), whatever it prefers.
2. The final hidden states of those ``k`` tokens (``(k, n_embd)``, read through the
   generation token hook as the tokens are fed) go through the model's ``output_projector``
   into the decoder's conditioning ``(num_condition_tokens, condition_dim)``.
3. The ``image_decoder`` samples an image from it (:class:`ImageGenerationConfig`: steps,
   guidance scale, sampler, seed). Text generation then continues after the image.

Any other output modality of the model (``model.decoders[m]``) is produced the same way from
its own signal tokens (``[AUD0]..``): the span is forced once started, its states go through
``model.output_projectors[m]``, and ``decoders[m].generate(condition, seed=…)`` makes the item.

:func:`stream` yields, in order, :class:`TextEvent` (a chunk of text), :class:`ImageEvent`
(a PIL image) and :class:`OutputEvent` (an item of another output modality). Text chunks follow the rules of :func:`mmgpt.generation.stream_text` (no
partial UTF-8 characters, nothing of a stop string) and never contain signal tokens. An image
is a boundary for text: text before it is released before the image, and a stop string must
lie within the text between two images. A signal span cut short by ``max_new_tokens`` draws
nothing; signal tokens outside a span that starts with ``[IMG0]`` are dropped.

:func:`generate_images` is the batched, non-streaming path (evaluation, benchmarks): one
generation for all prompts, then one decoder call per seed. Training pairs with this module
through :func:`gather_signal_states` (the objective reads the same positions).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mmgpt import generation, registry
from mmgpt.generation import (
    ForceAfter,
    GenerationConfig,
    IncrementalText,
    StepState,
    TokenHook,
)
from mmgpt.registry import register

if TYPE_CHECKING:
    from PIL import Image

    from mmgpt.multimodal import MultimodalGPT

__all__ = [
    "ImageEvent",
    "ImageGenerationConfig",
    "MultimodalOutput",
    "OutputEvent",
    "StandardizedSignalProjector",
    "TextEvent",
    "decode_images",
    "gather_signal_states",
    "generate_images",
    "generate_multimodal",
    "signal_condition",
    "signal_spans",
    "stream",
]

_MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------------------
# Configuration and events
# --------------------------------------------------------------------------------------


@dataclass
class ImageGenerationConfig:
    """How the decoder samples an image from the signal-token conditioning.

    ``seed``: image ``i`` of a reply uses ``seed + i``; ``None`` draws the base seed from
    torch's global generator (so ``torch.manual_seed`` reproduces a whole reply).
    ``sampler`` is one of the decoder's samplers (``"dpm"``, ``"ddim"``, ``"ddpm"`` for the
    diffusion decoder); ``guidance_scale <= 1`` turns classifier-free guidance off.
    """

    steps: int = 20
    guidance_scale: float = 3.0
    sampler: str = "dpm"
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(
                f"ImageGenerationConfig.steps: expected an integer >= 1, got {self.steps!r}"
            )
        if (
            isinstance(self.guidance_scale, bool)
            or not isinstance(self.guidance_scale, (int, float))
            or not self.guidance_scale >= 0
        ):
            raise ValueError(
                "ImageGenerationConfig.guidance_scale: expected a number >= 0, got "
                f"{self.guidance_scale!r}"
            )
        if not isinstance(self.sampler, str) or not self.sampler:
            raise ValueError(
                f"ImageGenerationConfig.sampler: expected a name, got {self.sampler!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED):
            raise ValueError(
                f"ImageGenerationConfig.seed: expected None or an integer in [0, 2**63), got "
                f"{self.seed!r}"
            )


@dataclass
class TextEvent:
    """A chunk of the reply's text."""

    text: str


@dataclass
class ImageEvent:
    """An image the model drew: ``index`` counts the images of the reply from 0; ``seed``
    regenerates it from the same conditioning."""

    image: Image.Image
    index: int
    seed: int


@dataclass
class OutputEvent:
    """An item of a non-image output modality (what ``decoders[modality].generate`` returns
    for one span; the modality's loader ``save`` writes it): ``index`` counts that modality's
    items of the reply from 0; ``seed`` regenerates it from the same conditioning."""

    modality: str
    item: Any
    index: int
    seed: int


@dataclass
class MultimodalOutput:
    """A whole reply: its events in order, the text (all chunks), the images and the items
    of the other output modalities."""

    events: list[TextEvent | ImageEvent | OutputEvent] = field(default_factory=list)

    @property
    def outputs(self) -> list[OutputEvent]:
        return [e for e in self.events if isinstance(e, OutputEvent)]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextEvent))

    @property
    def images(self) -> list[Image.Image]:
        return [e.image for e in self.events if isinstance(e, ImageEvent)]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------
# Signal states → conditioning → images
# --------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Eval mode (no dropout) and inference mode for a block, restoring training flags."""
    flags = [(m, m.training) for m in modules if m is not None]
    for m, _ in flags:
        m.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, training in flags:
            m.train(training)


def _signal_ids(model: MultimodalGPT) -> list[int]:
    ids = list(getattr(model.tokenizer, "signal_token_ids", None) or [])
    if not ids:
        raise ValueError(
            "the tokenizer has no signal tokens [IMG0]..; train it with num_signal_tokens > 0"
        )
    return ids


def require_image_generation(model: MultimodalGPT) -> list[int]:
    """Check that ``model`` can draw; return its signal token ids."""
    missing = [n for n in ("image_decoder", "output_projector") if getattr(model, n) is None]
    if missing:
        raise ValueError(
            f"the model cannot generate images: it has no {' and no '.join(missing)} (build it "
            "with image_decoder='diffusion', output_projector='signal_mlp')"
        )
    ids = _signal_ids(model)
    expected = getattr(model.output_projector, "num_signal_tokens", len(ids))
    if expected != len(ids):
        raise ValueError(
            f"the output projector reads {expected} signal tokens but the tokenizer has "
            f"{len(ids)} ([IMG0]..[IMG{len(ids) - 1}])"
        )
    return ids


def gather_signal_states(hidden: Tensor, positions: Tensor, num_signal_tokens: int) -> Tensor:
    """Hidden states ``(B, T, C)`` at the signal spans starting at ``positions`` ``(M, 2)``
    (row, first slot) → ``(M, num_signal_tokens, C)``."""
    if positions.dim() != 2 or positions.size(1) != 2:
        raise ValueError(f"signal positions must be (M, 2), got {tuple(positions.shape)}")
    k = num_signal_tokens
    positions = positions.to(hidden.device)
    rows = positions[:, 0].repeat_interleave(k)  # (M·k,)
    cols = (positions[:, 1:2] + torch.arange(k, device=hidden.device)).reshape(-1)  # (M·k,)
    if positions.numel() and (
        int(cols.max()) >= hidden.size(1) or int(rows.max()) >= hidden.size(0)
    ):
        raise ValueError(
            f"a signal span runs past the sequence (length {hidden.size(1)}, {k} signal tokens)"
        )
    return hidden[rows, cols].reshape(positions.size(0), k, hidden.size(-1))  # (M, k, C)


def signal_condition(model: MultimodalGPT, states: Tensor) -> Tensor:
    """Signal-token states ``(M, k, n_embd)`` → decoder conditioning ``(M, N, D)``."""
    require_image_generation(model)
    return model.output_projector(states.to(model.device))


def decode_images(
    model: MultimodalGPT,
    states: Tensor,
    image_config: ImageGenerationConfig,
    seed: int,
) -> list[Image.Image]:
    """Draw one image per row of ``states`` ``(M, k, n_embd)`` with one generator ``seed``.

    Row ``i``'s noise depends on the batch it is in; for an image reproducible on its own,
    call with one row.
    """
    with _eval_mode(model.output_projector, model.image_decoder):
        condition = signal_condition(model, states)
        return model.image_decoder.generate(
            condition,
            num_inference_steps=image_config.steps,
            guidance_scale=image_config.guidance_scale,
            sampler=image_config.sampler,
            seed=seed,
            output_type="pil",
        )


def _base_seed(image_config: ImageGenerationConfig) -> int:
    if image_config.seed is not None:
        return int(image_config.seed)
    return int(torch.randint(0, 2**62, (1,)).item())


def signal_spans(tokens: Sequence[int], signal_ids: Sequence[int]) -> list[int]:
    """Start indices of the complete spans ``[IMG0]..[IMGk-1]`` in ``tokens``."""
    k, first = len(signal_ids), signal_ids[0]
    expected = list(signal_ids)
    starts, i = [], 0
    while i <= len(tokens) - k:
        if tokens[i] == first and list(tokens[i : i + k]) == expected:
            starts.append(i)
            i += k
        else:
            i += 1
    return starts


# --------------------------------------------------------------------------------------
# An output projector with standardized conditions
# --------------------------------------------------------------------------------------


STATISTICS = ("batch", "renorm")
# Batch renormalization's bounds on the correction from batch to running statistics: a batch
# far from the running statistics (a sudden change of the GPT) is not amplified without limit.
_RENORM_MAX_SCALE, _RENORM_MAX_SHIFT = 3.0, 5.0


@register("projector", "signal_standardized")
class StandardizedSignalProjector(nn.Module):
    """An output projector (``inner``, default ``signal_mlp``) whose conditions are standardized
    feature by feature across the samples: batch normalization without affine parameters.

    Why: the signal states of a GPT trained from scratch are dominated by what every prompt
    shares (the signal tokens' own embeddings); what the prompt says is a small part of them,
    and whatever the image loss does with it, the decoder first learns to ignore conditions
    that barely vary. Standardizing removes the shared part and gives the prompt-dependent
    part unit scale from the first step, so the decoder's conditioning is learned at the
    speed it is for well-separated conditions. A pretrained GPT does not need it.

    ``statistics`` says how training standardizes (inference always uses the running
    statistics). ``"batch"``: by the batch's own mean and variance (batch normalization).
    ``"renorm"``: batch renormalization (Ioffe, 2017), whose value is standardized by the
    running statistics (updated from the batch first) while the gradient flows as through
    batch statistics. Why renorm: batch statistics shift every condition of a batch by the
    batch's sampling error, about ``1/sqrt(batch)`` of a feature's spread, and with a dozen
    drawings in a batch that noise was larger than the quietest part of the prompt. In the
    `shapes-tiny` curriculum which kind of shape to draw moved the conditions far less than
    where to draw it; a linear probe read the kind from 94% of the inference conditions but
    from 61% of the same conditions standardized by batches of 12, and the decoder drew the
    kind near chance. Plain running statistics in training are not the answer: without the
    batch's gradient nothing holds the shared part still, it grew (to 300 times the spread)
    and the running mean's lag behind it swamped the conditions.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_signal_tokens: int = 8,
        num_condition_tokens: int | None = None,
        inner: str = "signal_mlp",
        inner_kwargs: Mapping[str, Any] | None = None,
        momentum: float = 0.1,
        eps: float = 1e-5,
        statistics: str = "batch",
    ) -> None:
        super().__init__()
        if statistics not in STATISTICS:
            raise ValueError(
                f"signal_standardized: statistics must be one of {STATISTICS}, got {statistics!r}"
            )
        self.inner = registry.create(
            "projector",
            inner,
            in_dim=in_dim,
            out_dim=out_dim,
            num_signal_tokens=num_signal_tokens,
            num_condition_tokens=num_condition_tokens,
            **dict(inner_kwargs or {}),
        )
        self.inner_name = inner
        self.in_dim, self.out_dim = in_dim, out_dim
        self.num_signal_tokens = num_signal_tokens
        self.num_condition_tokens = int(
            getattr(self.inner, "num_condition_tokens", None) or num_signal_tokens
        )
        self.statistics = statistics
        self.norm = nn.BatchNorm1d(
            self.num_condition_tokens * out_dim, eps=eps, momentum=momentum, affine=False
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)  # (M, N, D)
        flat = y.reshape(y.size(0), -1)  # (M, N·D)
        norm = self.norm
        if not self.training or flat.size(0) < 2:  # one sample has no batch statistics
            flat = torch.nn.functional.batch_norm(
                flat, norm.running_mean, norm.running_var, training=False, eps=norm.eps
            )
        elif self.statistics == "renorm":
            flat = self._renormalize(flat)
        else:
            flat = norm(flat)
        return flat.view_as(y)

    def _renormalize(self, flat: Tensor) -> Tensor:
        """``(x − μ_B)/σ_B · r + d`` with ``r = σ_B/σ`` and ``d = (μ_B − μ)/σ`` held constant:
        the value of ``(x − μ)/σ`` (running statistics, updated from this batch first), the
        gradient of batch normalization."""
        norm = self.norm
        x = flat.float()  # statistics in fp32, as batch normalization computes them under autocast
        mean, var = x.mean(0), x.var(0, unbiased=False)
        with torch.no_grad():
            seen = int(norm.num_batches_tracked)
            # the first batches are averaged as they come (the first sets the statistics, so
            # training does not start from the initial 0 and 1), then the momentum takes over
            weight = 1.0 / (seen + 1)
            if norm.momentum is not None:
                weight = max(norm.momentum, weight)
            n = x.size(0)
            norm.running_mean.lerp_(mean.detach().to(norm.running_mean), weight)
            norm.running_var.lerp_((var.detach() * n / (n - 1)).to(norm.running_var), weight)
            norm.num_batches_tracked += 1
            std = (var + norm.eps).sqrt()
            running_std = (norm.running_var + norm.eps).sqrt().to(std)
            scale = (std / running_std).clamp(1 / _RENORM_MAX_SCALE, _RENORM_MAX_SCALE)
            shift = ((mean - norm.running_mean.to(mean)) / running_std).clamp(
                -_RENORM_MAX_SHIFT, _RENORM_MAX_SHIFT
            )
        return ((x - mean) / (var + norm.eps).sqrt() * scale + shift).to(flat.dtype)

    def config_dict(self) -> dict[str, Any]:
        shared = ("in_dim", "out_dim", "num_signal_tokens", "num_condition_tokens")
        inner = {k: v for k, v in self.inner.config_dict().items() if k not in shared}
        config = {
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "num_signal_tokens": self.num_signal_tokens,
            "num_condition_tokens": self.num_condition_tokens,
            "inner": self.inner_name,
            "inner_kwargs": inner,
            "momentum": self.norm.momentum,
            "eps": self.norm.eps,
        }
        if self.statistics != "batch":  # models saved before the option keep their config
            config["statistics"] = self.statistics
        return config

    @classmethod
    def conformance_example(cls) -> StandardizedSignalProjector:
        """A small instance for :mod:`mmgpt.testing`."""
        return cls(in_dim=8, out_dim=6, num_signal_tokens=3, num_condition_tokens=5)


# --------------------------------------------------------------------------------------
# Token hooks
# --------------------------------------------------------------------------------------


class _SignalHook:
    """Forces ``[IMG1]..`` after ``[IMG0]`` (and each of ``other_spans`` after its first
    token), optionally a start of each row's reply (``prefixes[row]``, e.g. the chat separator
    + ``[IMG0]``), and records the final hidden state of every signal token as it is fed
    (``hidden[(row, index)]``)."""

    def __init__(
        self,
        signal_ids: Sequence[int],
        user_hook: TokenHook | None = None,
        prefixes: Sequence[Sequence[int]] | None = None,
        *,
        other_spans: Sequence[Sequence[int]] = (),
    ) -> None:
        self.signal_ids = list(signal_ids)
        spans = [list(ids) for ids in ([signal_ids] if signal_ids else []) + list(other_spans)]
        self.signal_set = frozenset(t for ids in spans for t in ids)
        self.forces = [ForceAfter(ids[0], ids[1:]) for ids in spans if len(ids) > 1]
        self.user_hook = user_hook
        self.prefixes = [list(p) for p in prefixes] if prefixes is not None else None
        self.hidden: dict[tuple[int, int], Tensor] = {}

    def __call__(self, state: StepState) -> dict[int, int] | None:
        for row, toks in enumerate(state.tokens):
            if toks and toks[-1] in self.signal_set and not state.finished[row]:
                # the hidden state of the token chosen at the previous step
                self.hidden[(row, len(toks) - 1)] = state.hidden_states[row].detach().clone()
        forced: dict[int, int] = {}
        if self.user_hook is not None:
            forced.update(self.user_hook(state) or {})
        if self.prefixes is not None:  # forced reply starts (e.g. separator + [IMG0])
            forced.update(
                {r: p[state.step] for r, p in enumerate(self.prefixes) if state.step < len(p)}
            )
        for force in self.forces:
            forced.update(force(state) or {})  # a started span always completes
        return forced or None


def _missing_states(
    model: MultimodalGPT, prompt_embeds: Tensor, tokens: Sequence[int], start: int, k: int
) -> Tensor:
    """States of a span whose last token ended generation (never fed back): one full forward
    over prompt + new tokens, which gives the same states as the cached steps."""
    with _eval_mode(model.gpt):
        ids = torch.tensor([list(tokens[: start + k])], dtype=torch.long, device=model.device)
        x = torch.cat([prompt_embeds, model.gpt.get_input_embeddings()(ids)], dim=1)
        hidden = model.gpt(inputs_embeds=x, return_logits=False).hidden_states  # (1, T, C)
        T = prompt_embeds.size(1)
        return hidden[0, T + start : T + start + k]


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------


def stream(
    model: MultimodalGPT,
    prompt: str | Sequence[Any],
    images: Sequence[Any] = (),
    config: GenerationConfig | None = None,
    image_config: ImageGenerationConfig | None = None,
    *,
    inputs: Mapping[str, Sequence[Any]] | None = None,
    stop_at_eos: bool = True,
    skip_special_tokens: bool = True,
    token_hook: TokenHook | None = None,
) -> Iterator[TextEvent | ImageEvent | OutputEvent]:
    """Reply to one prompt (a conversation or a raw string) with text, image and other output
    events, in the order the model writes them.

    ``config`` drives the text (its ``stop_strings`` apply within the text between images);
    ``image_config`` the decoder. ``token_hook`` may force tokens too (the signal span wins
    once started). ``inputs``: the prompt's items of non-image modalities. A model without
    decoders streams its text only. Items of other output modalities take ``image_config``'s
    seed rule (item ``i`` of a modality: ``seed + i``).
    """
    tokenizer = model.tokenizer
    can_draw = model.image_decoder is not None and model.output_projector is not None
    # an image config needs a decoder, unless it only seeds another modality's outputs
    if can_draw or (image_config is not None and not len(model.decoders)):
        signal_ids = require_image_generation(model)
    else:  # text only: signal tokens are merely kept out of the text
        signal_ids = list(getattr(tokenizer, "signal_token_ids", None) or [])
    image_config = image_config if image_config is not None else ImageGenerationConfig()
    if can_draw:
        model.image_decoder.make_sampler(image_config.sampler)  # unknown sampler: fail now
    gen_config = model._generation_config(config, stop_at_eos)
    stop_strings = gen_config.stop_strings
    embeds, _ = model.prepare_prompts([prompt], [images], [inputs])  # (1, T, C)
    collector = _SignalHook(signal_ids, token_hook) if can_draw else None
    others = {
        m: model.output_signal_token_ids(m) for m in model.output_modalities() if m != "image"
    }
    if others:
        collector = _SignalHook(
            signal_ids if can_draw else [], token_hook, other_spans=list(others.values())
        )
    # the first token of each span → (modality, its signal ids)
    spans_by_first = {ids[0]: (m, ids) for m, ids in others.items()}
    if signal_ids:
        spans_by_first[signal_ids[0]] = ("image", signal_ids)
    signal_set = frozenset(signal_ids) | {t for ids in others.values() for t in ids}
    k = len(signal_ids)
    base_seed = _base_seed(image_config) if can_draw or others else 0
    counts = dict.fromkeys(others, 0)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    events = generation.stream_batch(
        model.gpt,
        None,
        replace(gen_config, stop_strings=()),  # matched here, per text segment
        pad_id=int(tokenizer.pad_id),
        inputs_embeds=embeds,
        token_hook=collector if collector is not None else token_hook,
    )
    tokens: list[int] = []
    segment = IncrementalText(decode, stop_strings)
    span_start: int | None = None  # index of the first token of the span being written
    span: tuple[str, list[int]] | None = None  # its modality and signal ids
    pending: tuple[str, int] | None = None  # a complete span waiting for its last state
    n_images = 0
    strip = not isinstance(prompt, str)  # chat replies start with the template's space

    def text_event(chunk: str) -> TextEvent | None:
        nonlocal strip
        if strip:
            chunk = chunk.lstrip()
            strip = not chunk
        return TextEvent(chunk) if chunk else None

    def draw(start: int) -> ImageEvent:
        nonlocal n_images
        states = [collector.hidden.get((0, start + j)) for j in range(k)]
        if any(s is None for s in states):
            stacked = _missing_states(model, embeds, tokens, start, k)
        else:
            stacked = torch.stack(states)  # (k, C)
        seed = base_seed + n_images
        image = decode_images(model, stacked[None], image_config, seed)[0]
        n_images += 1
        return ImageEvent(image, n_images - 1, seed)

    def produce(modality: str, start: int) -> OutputEvent:
        ids = others[modality]
        states = [collector.hidden.get((0, start + j)) for j in range(len(ids))]
        if any(s is None for s in states):
            stacked = _missing_states(model, embeds, tokens, start, len(ids))
        else:
            stacked = torch.stack(states)  # (k_m, C)
        decoder, projector = model.decoders[modality], model.output_projectors[modality]
        seed = base_seed + counts[modality]
        with _eval_mode(projector, decoder):
            condition = projector(stacked[None].to(model.device))  # (1, N, D)
            item = decoder.generate(condition, seed=seed)[0]
        counts[modality] += 1
        return OutputEvent(modality, item, counts[modality] - 1, seed)

    def emit(done: tuple[str, int]) -> ImageEvent | OutputEvent:
        modality, start = done
        return draw(start) if modality == "image" else produce(modality, start)

    try:
        for event in events:
            if pending is not None:  # the span's last state was recorded before this event
                yield emit(pending)
                pending = None
            if event.token_id is None:
                break
            tok = event.token_id
            tokens.append(tok)
            index = len(tokens) - 1
            if tok in signal_set:
                if tok in spans_by_first:
                    # an output is a boundary: text before it is final
                    out = text_event(segment.finish())
                    if out is not None:
                        yield out
                    segment = IncrementalText(decode, stop_strings)
                    span_start, span = index, spans_by_first[tok]
                if span is not None and index - span_start == len(span[1]) - 1:
                    modality, ids = span
                    if tokens[span_start:] == ids and (modality != "image" or can_draw):
                        pending = (modality, span_start)
                    span_start = span = None
                continue
            span_start = span = None  # a text token inside a span: the span is broken
            stop = segment.push(tok)
            out = text_event(segment.take())
            if out is not None:
                yield out
            if stop is not None:
                return
        if pending is not None:  # generation ended on the span's last token
            yield emit(pending)
        out = text_event(segment.finish())
        if out is not None:
            yield out
    finally:
        events.close()


def generate_multimodal(
    model: MultimodalGPT,
    prompt: str | Sequence[Any],
    images: Sequence[Any] = (),
    config: GenerationConfig | None = None,
    image_config: ImageGenerationConfig | None = None,
    **kwargs: Any,
) -> MultimodalOutput:
    """The whole reply of :func:`stream`: ``.events``, ``.text`` and ``.images``."""
    return MultimodalOutput(list(stream(model, prompt, images, config, image_config, **kwargs)))


# --------------------------------------------------------------------------------------
# Batched generation (evaluation)
# --------------------------------------------------------------------------------------


def generate_images(
    model: MultimodalGPT,
    prompts: Sequence[str | Sequence[Any]],
    image_config: ImageGenerationConfig | None = None,
    *,
    config: GenerationConfig | None = None,
    seeds: Sequence[int] | None = None,
    force_image: bool = False,
    images: Sequence[Sequence[Any]] | None = None,
) -> list[list[list[Image.Image]]]:
    """Batched text-to-image: ``result[s][i]`` is the list of images of prompt ``i`` drawn
    with seed ``seeds[s]`` (empty where the reply has no complete signal span).

    The text is generated once (greedy by default, ``max_new_tokens`` covering one span, an
    eos and a few words before them); each seed is then one decoder call over every span of the
    batch, so a seed's images depend on the batch. ``force_image=True`` starts every reply with
    ``[IMG0]`` (after the chat template's separator, as in training) whatever the model prefers.
    """
    signal_ids = require_image_generation(model)
    k = len(signal_ids)
    image_config = image_config if image_config is not None else ImageGenerationConfig()
    if config is None:
        processor = model.processor()
        longest = max(
            len(processor.encode_prompt(p, im, index=i).input_ids)
            for i, (p, im) in enumerate(zip(prompts, images or [()] * len(prompts)))
        )
        room = model.config.block_size - longest
        if room <= k:
            raise ValueError(
                f"a prompt has {longest} tokens, leaving {max(room, 0)} of the model's context "
                f"(block_size={model.config.block_size}) for a reply of {k} signal tokens"
            )
        config = GenerationConfig(max_new_tokens=min(k + 8, room), temperature=0)
    seeds = list(seeds) if seeds is not None else [_base_seed(image_config)]
    prefixes = None
    if force_image:
        # a chat reply starts with the template's separator, as in training: " " + [IMG0]..
        separator = model.tokenizer.encode(model.processor().template.assistant_separator)
        prefixes = [([] if isinstance(p, str) else separator) + signal_ids[:1] for p in prompts]
    hook = _SignalHook(signal_ids, prefixes=prefixes)
    out = model.generate(
        prompts,
        images,
        config,
        token_hook=hook,
        return_hidden_states=True,
        skip_special_tokens=True,
    )
    spans = [signal_spans(toks, signal_ids) for toks in out.tokens]
    states = [out.hidden_states[row][s : s + k] for row, starts in enumerate(spans) for s in starts]
    result: list[list[list[Image.Image]]] = []
    for seed in seeds:
        drawn = decode_images(model, torch.stack(states), image_config, seed) if states else []
        per_prompt: list[list[Image.Image]] = []
        it = iter(drawn)
        for starts in spans:
            per_prompt.append([next(it) for _ in starts])
        result.append(per_prompt)
    return result
