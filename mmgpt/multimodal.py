"""MultimodalGPT: a GPT decoder fed with projected encoder features in its placeholder slots.

The decoder (:class:`mmgpt.model.GPT`) knows nothing about images. Fusion happens on its input
embeddings: the processor expands each ``"<image>"`` into ``num_tokens`` image-token slots, and
:meth:`MultimodalGPT.embed` replaces those slots by ``projector(encoder(image))`` with one
``index_put``. Any other modality (a plugin's ``"audio"`` encoder, say) works the same way:
its placeholder (``encoder.placeholder``, e.g. ``"<audio>"``) becomes ``num_tokens`` slots and
``projector(encoder(item))`` fills them. All modalities share one slot id, the tokenizer's
``<image>`` token (:attr:`MultimodalGPT.slot_token_id`); the batch's per-modality positions say
whose slots are whose, so adding a modality changes neither the tokenizer nor the vocabulary.
Optional ``image_decoder`` and ``output_projector`` (registry kinds ``decoder``
and ``projector``) turn the hidden states of the signal tokens ``[IMG0]..`` back into images;
any other output modality has its decoder in ``decoders[modality]`` and its projector in
``output_projectors[modality]``, reading its own signal tokens (``[AUD0]..``, see
:class:`~mmgpt.interfaces.OutputDecoder`). This class holds, saves and loads them, and
:meth:`MultimodalGPT.stream` produces every output modality with them (:mod:`mmgpt.imagegen`).
The image decoder keeps its own attributes (and weight prefixes ``image_decoder.`` /
``output_projector.``) so that model directories written before other output modalities
existed load unchanged.

A saved model is one directory::

    config.json        {"architecture": "multimodal", "format_version": 1, "gpt": {...},
                        "tokenizer": {"name": "bpe", ...},
                        "encoders": {"image": {"name": "vit", "config": {...}}},
                        "projectors": {"image": {"name": "mlp2x_gelu", "config": {...}}},
                        "image_decoder": {...}, "output_projector": {...},   (when present)
                        "decoders": {"audio": {...}}, "output_projectors": {"audio": {...}}}
    model.safetensors  every weight, prefixed gpt. / encoders.image. / projectors.image. / …
    tokenizer.json     (and the tokenizer's other files)

Components are rebuilt with ``registry.create(kind, name, **config)``, so an encoder from a
third-party plugin round-trips like the built-in ones. :meth:`MultimodalGPT.from_pretrained`
also reads a Hugging Face LLaVA directory (:mod:`mmgpt.interop.llava`): its CLIP or SigLIP
tower becomes the encoder ``clip``/``siglip``, its projector ``mlp2x_gelu``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmgpt import generation, imagegen, registry
from mmgpt.config import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    GPTConfig,
    gpt_config,
    read_model_config,
)
from mmgpt.data.loaders import placeholder_of
from mmgpt.generation import GenerationConfig, GenerationOutput
from mmgpt.imagegen import (
    ImageEvent,
    ImageGenerationConfig,
    MultimodalOutput,
    OutputEvent,
    TextEvent,
)
from mmgpt.interfaces import Tokenizer
from mmgpt.interop.llava import is_llava_config, read_llava
from mmgpt.model import GPT, GPTOutput, KVCache
from mmgpt.processor import MultimodalBatch, MultimodalProcessor
from mmgpt.weights import check_weights_file, load_model_files, load_model_state, save_model_files

ARCHITECTURE = "multimodal"
# Names accepted by freeze()/trainable(), mapped to attributes.
PARTS = {
    "gpt": "gpt",
    "encoder": "encoders",
    "encoders": "encoders",
    "projector": "projectors",
    "projectors": "projectors",
    "image_decoder": "image_decoder",
    "decoder": "image_decoder",
    "output_projector": "output_projector",
    "decoders": "decoders",
    "output_projectors": "output_projectors",
}
# Signal tokens of an output modality whose decoder does not say (``num_signal_tokens``).
DEFAULT_OUTPUT_SIGNAL_TOKENS = 4
# The output projector of a non-image modality when none is named.
DEFAULT_OUTPUT_PROJECTOR = "signal_mlp"


class MultimodalGPT(nn.Module):
    """GPT + tokenizer + encoders/projectors by modality (+ optional image decoder).

    Args:
        gpt: the decoder; its vocabulary must cover the tokenizer's.
        tokenizer: an mmgpt tokenizer (``image_token_id``, ``signal_token_ids``…).
        encoders: ``{modality: encoder}`` (``"image"`` → e.g. the ``"vit"`` encoder).
        projectors: ``{modality: projector}`` mapping ``encoder.output_dim`` → ``n_embd``.
        image_decoder: optional decoder that turns signal-token conditions into images.
        output_projector: optional projector from signal-token states to the decoder's
            conditioning width.
        decoders: decoders of other output modalities, ``{modality: decoder}`` (a
            ``"image"`` entry is the same as ``image_decoder``); the tokenizer must already
            have each one's signal tokens (:meth:`build` adds them).
        output_projectors: their output projectors, ``{modality: projector}``.
        component_names: registry names of the components, keyed ``"encoders.image"``,
            ``"projectors.image"``, ``"image_decoder"``, ``"output_projector"``; needed by
            :meth:`save_pretrained` for components whose class is not itself the registered
            entry (a factory function). :meth:`build` and :meth:`from_pretrained` fill them.
    """

    def __init__(
        self,
        gpt: GPT,
        tokenizer: Tokenizer,
        encoders: Mapping[str, nn.Module] | None = None,
        projectors: Mapping[str, nn.Module] | None = None,
        *,
        image_decoder: nn.Module | None = None,
        output_projector: nn.Module | None = None,
        component_names: Mapping[str, str] | None = None,
        decoders: Mapping[str, nn.Module] | None = None,
        output_projectors: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        decoders, output_projectors = dict(decoders or {}), dict(output_projectors or {})
        if "image" in decoders:
            if image_decoder is not None:
                raise ValueError("pass the image decoder once: image_decoder or decoders['image']")
            image_decoder = decoders.pop("image")
        if "image" in output_projectors:
            if output_projector is not None:
                raise ValueError(
                    "pass the image output projector once: output_projector or "
                    "output_projectors['image']"
                )
            output_projector = output_projectors.pop("image")
        _check_output_decoders(tokenizer, decoders, output_projectors)
        if gpt.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"the GPT's vocabulary ({gpt.config.vocab_size}) does not cover the tokenizer's "
                f"({tokenizer.vocab_size} ids); build the GPT with vocab_size >= "
                f"{tokenizer.vocab_size}"
            )
        encoders, projectors = dict(encoders or {}), dict(projectors or {})
        if set(encoders) != set(projectors):
            raise ValueError(
                f"every encoder needs a projector of the same modality: encoders for "
                f"{sorted(encoders)}, projectors for {sorted(projectors)}"
            )
        n_embd = gpt.config.n_embd
        for modality, enc in encoders.items():
            declared = getattr(enc, "modality", modality)
            if declared != modality:
                raise ValueError(
                    f"encoder under key {modality!r} declares modality {declared!r}; "
                    "key encoders by their modality"
                )
            proj = projectors[modality]
            if (proj.in_dim, proj.out_dim) != (enc.output_dim, n_embd):
                raise ValueError(
                    f"projector for {modality!r} maps {proj.in_dim} → {proj.out_dim}, but the "
                    f"encoder outputs {enc.output_dim} and the GPT's width is {n_embd}"
                )
            _slots(modality, enc, proj)  # a projector that cannot take the tokens fails here
            _check_loader_placeholder(modality, enc)
        self.gpt = gpt
        self.tokenizer = tokenizer
        self.encoders = nn.ModuleDict(encoders)
        self.projectors = nn.ModuleDict(projectors)
        self.image_decoder = image_decoder
        self.output_projector = output_projector
        self.decoders = nn.ModuleDict(decoders)
        self.output_projectors = nn.ModuleDict(output_projectors)
        self.component_names: dict[str, str] = dict(component_names or {})
        if encoders and getattr(tokenizer, "image_token_id", None) is None:
            raise ValueError(
                f"the tokenizer has no '<image>' token, which every modality's slots use "
                f"(encoders for {sorted(encoders)})"
            )

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        gpt: str | GPTConfig | GPT | Mapping[str, Any],
        tokenizer: Tokenizer,
        *,
        encoder: str | None = "vit",
        encoder_kwargs: Mapping[str, Any] | None = None,
        projector: str = "mlp2x_gelu",
        projector_kwargs: Mapping[str, Any] | None = None,
        image_decoder: str | None = None,
        image_decoder_kwargs: Mapping[str, Any] | None = None,
        output_projector: str | None = None,
        output_projector_kwargs: Mapping[str, Any] | None = None,
        encoders: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
        projectors: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
        decoders: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
        output_projectors: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
        **gpt_overrides: Any,
    ) -> MultimodalGPT:
        """Assemble a model from registry names.

        Several encoders: ``encoders={modality: (name, kwargs)}`` (e.g. ``{"image": ("vit",
        {}), "audio": ("spectrogram", {"sample_rate": 8000})}``), each with its own projector,
        ``projectors[modality] = (name, kwargs)`` or else ``projector``/``projector_kwargs``.
        ``encoder`` is the one-encoder form (keyed by the encoder's ``modality``); both may be
        given for different modalities. Each key must be its encoder's ``modality``.

        ``gpt`` is a preset name (``"gpt-nano"``…), a config (dataclass or dict) or a built GPT;
        for a preset or dict, ``vocab_size`` defaults to the tokenizer's. The encoder is
        registered under its ``modality``; the projector gets ``in_dim``/``out_dim`` from the
        encoder and the GPT (and ``num_tokens``, the encoder's, where its signature names it).
        The output projector gets ``in_dim=n_embd`` and, where its
        signature names them, ``out_dim``/``num_condition_tokens`` from the image decoder and
        ``num_signal_tokens`` from the tokenizer, unless given.

        Several output modalities: ``decoders={modality: (name, kwargs)}`` (``"image"`` is
        the ``image_decoder`` form), each with its output projector
        ``output_projectors[modality] = (name, kwargs)``, else ``output_projector`` for the
        image and :data:`DEFAULT_OUTPUT_PROJECTOR` for the others. Each non-image decoder's
        signal tokens are added to ``tokenizer`` first (which grows; the GPT's default
        ``vocab_size`` covers them).
        """
        names: dict[str, str] = {}
        decoders = dict(decoders or {})
        output_projectors = dict(output_projectors or {})
        unknown = sorted(set(output_projectors) - set(decoders) - {"image"})
        if unknown:
            raise ValueError(f"output_projectors given for modalities without a decoder: {unknown}")
        if "image" in decoders:
            if image_decoder is not None:
                raise ValueError("give the image decoder once: image_decoder or decoders['image']")
            image_decoder, image_decoder_kwargs = decoders.pop("image")
        if "image" in output_projectors:
            if output_projector is not None:
                raise ValueError(
                    "give the image output projector once: output_projector or "
                    "output_projectors['image']"
                )
            output_projector, output_projector_kwargs = output_projectors.pop("image")
        built_decoders: dict[str, nn.Module] = {}
        for key, (name, kwargs) in decoders.items():
            dec = registry.create("decoder", name, **dict(kwargs))
            modality = getattr(dec, "modality", None)
            if modality != key:
                raise ValueError(
                    f"decoders[{key!r}] is {name!r}, a decoder of modality {modality!r}; key "
                    "decoders by their modality"
                )
            tokenizer.add_output_signal_tokens(
                key,
                getattr(dec, "signal_prefix", None) or key[:3].upper(),
                int(getattr(dec, "num_signal_tokens", DEFAULT_OUTPUT_SIGNAL_TOKENS)),
            )
            built_decoders[key] = dec
            names[f"decoders.{key}"] = name
        if isinstance(gpt, GPT):
            if gpt_overrides:
                raise ValueError("gpt overrides apply to a preset or config, not to a built GPT")
            model = gpt
        else:
            if isinstance(gpt, str):
                gpt_overrides.setdefault("vocab_size", tokenizer.vocab_size)
                config = gpt_config(gpt, **gpt_overrides)
            elif isinstance(gpt, Mapping):
                config = GPTConfig.from_dict(
                    {"vocab_size": tokenizer.vocab_size, **gpt, **gpt_overrides}
                )
            elif isinstance(gpt, GPTConfig):
                config = GPTConfig.from_dict({**gpt.to_dict(), **gpt_overrides})
            else:
                raise TypeError(
                    f"gpt must be a preset name, GPTConfig, dict or GPT, got {type(gpt).__name__}"
                )
            model = GPT(config)
        n_embd = model.config.n_embd
        built_encoders: dict[str, nn.Module] = {}
        built_projectors: dict[str, nn.Module] = {}
        wanted: list[tuple[str | None, str, Mapping[str, Any], str, Mapping[str, Any]]] = []
        if encoder is not None:
            wanted.append((None, encoder, encoder_kwargs or {}, projector, projector_kwargs or {}))
        per_modality = dict(projectors or {})
        unknown = sorted(set(per_modality) - set(encoders or {}))
        if unknown:
            raise ValueError(f"projectors given for modalities without an encoder: {unknown}")
        for key, (name, kwargs) in (encoders or {}).items():
            proj_name, proj_kwargs = per_modality.get(key, (projector, projector_kwargs or {}))
            wanted.append((key, name, kwargs, proj_name, proj_kwargs))
        for key, name, kwargs, proj_name, proj_kwargs in wanted:
            enc = registry.create("encoder", name, **dict(kwargs))
            modality = enc.modality
            if key is not None and key != modality:
                raise ValueError(
                    f"encoders[{key!r}] is {name!r}, an encoder of modality {modality!r}; key "
                    "encoders by their modality"
                )
            if modality in built_encoders:
                raise ValueError(
                    f"two encoders for modality {modality!r} ({names[f'encoders.{modality}']!r} "
                    f"and {name!r}); a model has one encoder per modality"
                )
            full_kwargs = {"in_dim": enc.output_dim, "out_dim": n_embd, **proj_kwargs}
            if _takes_argument(registry.get("projector", proj_name), "num_tokens"):
                # a projector that depends on the token count (pixel_shuffle) learns it here
                full_kwargs.setdefault("num_tokens", enc.num_tokens)
            built_encoders[modality] = enc
            built_projectors[modality] = registry.create("projector", proj_name, **full_kwargs)
            names[f"encoders.{modality}"] = name
            names[f"projectors.{modality}"] = proj_name
        decoder = out_proj = None
        if image_decoder is not None:
            decoder = registry.create("decoder", image_decoder, **dict(image_decoder_kwargs or {}))
            names["image_decoder"] = image_decoder
        if output_projector is not None:
            k = len(getattr(tokenizer, "signal_token_ids", None) or [])
            out_proj = _output_projector(
                output_projector, output_projector_kwargs, decoder, n_embd, k
            )
            names["output_projector"] = output_projector
        built_out_projs: dict[str, nn.Module] = {}
        for key, dec in built_decoders.items():
            proj_name, proj_kwargs = output_projectors.get(key, (DEFAULT_OUTPUT_PROJECTOR, {}))
            k = len(tokenizer.output_signal_token_ids(key))
            built_out_projs[key] = _output_projector(proj_name, proj_kwargs, dec, n_embd, k)
            names[f"output_projectors.{key}"] = proj_name
        return cls(
            model,
            tokenizer,
            built_encoders,
            built_projectors,
            image_decoder=decoder,
            output_projector=out_proj,
            component_names=names,
            decoders=built_decoders,
            output_projectors=built_out_projs,
        )

    # -- properties -------------------------------------------------------------------------
    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    @property
    def device(self) -> torch.device:
        return self.gpt.get_input_embeddings().weight.device

    @property
    def tied_weight_keys(self) -> list[str]:
        """Aliased state-dict keys (stored once): the GPT's and any component's."""
        keys = [f"gpt.{k}" for k in self.gpt.tied_weight_keys]
        for prefix, module in self._components():
            keys += [f"{prefix}.{k}" for k in getattr(module, "tied_weight_keys", [])]
        return keys

    @property
    def slot_token_id(self) -> int:
        """The id of every modality slot: the tokenizer's ``<image>`` token, shared by all
        modalities (the batch's per-modality positions tell them apart)."""
        return int(self.tokenizer.image_token_id)

    def output_modalities(self) -> dict[str, tuple[nn.Module, nn.Module]]:
        """``{modality: (decoder, output projector)}`` of every output modality the model can
        produce, the image first."""
        out: dict[str, tuple[nn.Module, nn.Module]] = {}
        if self.image_decoder is not None and self.output_projector is not None:
            out["image"] = (self.image_decoder, self.output_projector)
        for modality, dec in self.decoders.items():
            out[modality] = (dec, self.output_projectors[modality])
        return out

    def output_signal_token_ids(self, modality: str) -> list[int]:
        """The signal token ids of output ``modality`` (``[IMG0]..`` for ``"image"``)."""
        if modality == "image":
            return list(getattr(self.tokenizer, "signal_token_ids", None) or [])
        return list(self.tokenizer.output_signal_token_ids(modality))

    def num_slots(self, modality: str) -> int:
        """Placeholder slots one item of ``modality`` fills: the encoder's ``num_tokens``, or
        what its projector makes of them (``output_tokens``, e.g. ``pixel_shuffle``)."""
        return _slots(modality, self.encoders[modality], self.projectors[modality])

    def processor(self, **kwargs: Any) -> MultimodalProcessor:
        """A :class:`MultimodalProcessor` for this model (``max_length`` = ``block_size``;
        slots per item: :meth:`num_slots`)."""
        kwargs.setdefault("max_length", self.config.block_size)
        kwargs.setdefault("slot_counts", {m: self.num_slots(m) for m in self.encoders})
        if self.image_decoder is not None and hasattr(self.image_decoder, "preprocess"):
            kwargs.setdefault("output_image_transform", self.image_decoder.preprocess)
        if len(self.decoders):
            kwargs.setdefault(
                "output_signals", {m: self.output_signal_token_ids(m) for m in self.decoders}
            )
            kwargs.setdefault(
                "output_transforms",
                {m: d.preprocess for m, d in self.decoders.items() if hasattr(d, "preprocess")},
            )
        return MultimodalProcessor(self.tokenizer, self.encoders, **kwargs)

    # -- fusion --------------------------------------------------------------------------------
    def encode(self, modality: str, inputs: Tensor) -> Tensor:
        """Preprocessed items → projected features ``(N, num_slots(modality), n_embd)``."""
        feats = self.encoders[modality](inputs)  # (N, K, d_enc)
        return self.projectors[modality](feats)  # (N, K, C)

    def embed(self, batch: MultimodalBatch) -> Tensor:
        """Token embeddings with each modality's projected features in its slots: ``(B, T, C)``.

        Every slot (:attr:`slot_token_id`) must be filled by exactly one item's features.
        """
        input_ids = batch.input_ids.to(self.device)
        embeds = self.gpt.get_input_embeddings()(input_ids)  # (B, T, C)
        is_slot = input_ids == self.slot_token_id if self.encoders else None  # (B, T)
        n_slots = int(is_slot.sum()) if is_slot is not None else 0
        # validate every modality's slots before running any encoder
        filled = torch.zeros_like(input_ids, dtype=torch.bool)
        plan: list[tuple[str, Tensor, Tensor, Tensor, int]] = []
        for modality, (inputs, positions) in batch.fusion_inputs().items():
            n_items = 0 if inputs is None else inputs.size(0)
            if n_items == 0:
                continue
            if modality not in self.encoders:
                raise ValueError(f"the batch has {modality} inputs but the model has no encoder")
            if positions.shape != (n_items, 2):
                raise ValueError(
                    f"{modality}_positions must have shape ({n_items}, 2), got {tuple(positions.shape)}"
                )
            K = self.num_slots(modality)
            positions = positions.to(self.device)
            rows = positions[:, 0].repeat_interleave(K)  # (N·K,)
            cols = (positions[:, 1:2] + torch.arange(K, device=self.device)).reshape(-1)  # (N·K,)
            in_range = bool(((cols >= 0) & (cols < input_ids.size(1))).all())
            if not in_range or not bool(is_slot[rows, cols].all()):
                raise ValueError(
                    f"{modality}_positions do not point at {modality} slots of input_ids"
                )
            if bool(filled[rows, cols].any()):
                raise ValueError(f"{modality}_positions overlap slots that are already filled")
            filled[rows, cols] = True
            plan.append((modality, inputs, rows, cols, K))
        total = int(filled.sum())
        if total != n_slots:
            names = "/".join(m for m, *_ in plan) or "/".join(self.encoders)
            if not plan:
                raise ValueError(f"the batch has {n_slots} {names} slot(s) but no {names} inputs")
            parts = " + ".join(f"{x.size(0)} item(s) × {k} tokens" for _, x, _, _, k in plan)
            raise ValueError(
                f"the batch has {n_slots} {names} slots, but {parts} = {total} features; "
                "was it processed for this model's encoders?"
            )
        for modality, inputs, rows, cols, K in plan:
            feats = self.encode(modality, inputs.to(self.device))  # (N, K, C)
            if tuple(feats.shape[:2]) != (inputs.size(0), K):
                raise ValueError(
                    f"the {modality} encoder returned features of shape {tuple(feats.shape)} "
                    f"for {inputs.size(0)} item(s); expected {K} tokens each (its num_tokens, "
                    "or its projector's output_tokens)"
                )
            # one scatter of all items' features into their slots (autograd flows to feats)
            flat = feats.reshape(rows.numel(), feats.size(-1)).to(embeds.dtype)  # (N·K, C)
            embeds = embeds.index_put((rows, cols), flat)
        return embeds  # (B, T, C)

    def forward(
        self,
        batch: MultimodalBatch | None = None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        images: Tensor | None = None,
        image_positions: Tensor | None = None,
        modality_inputs: Mapping[str, Tensor] | None = None,
        modality_positions: Mapping[str, Tensor] | None = None,
        inputs_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        output_attentions: bool = False,
    ) -> GPTOutput:
        """Run the decoder on a batch (or on ids + images and other modalities' inputs and
        positions, or on ready ``inputs_embeds``); ``output_attentions``: as :meth:`GPT.forward`."""
        if batch is not None:
            if (
                input_ids is not None
                or inputs_embeds is not None
                or images is not None
                or modality_inputs is not None
            ):
                raise ValueError("pass either a batch or tensors, not both")
            inputs_embeds = self.embed(batch)
            if attention_mask is None:
                attention_mask = batch.attention_mask
        elif input_ids is not None:
            if inputs_embeds is not None:
                raise ValueError("pass exactly one of input_ids or inputs_embeds")
            if images is not None and image_positions is None:
                raise ValueError("images need image_positions (row, first slot) per image")
            # through embed() even without images: image slots with no image are an error
            inputs_embeds = self.embed(
                MultimodalBatch(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    images=images,
                    image_positions=(
                        image_positions
                        if image_positions is not None
                        else torch.zeros(0, 2, dtype=torch.long)
                    ),
                    modality_inputs=dict(modality_inputs or {}),
                    modality_positions=dict(modality_positions or {}),
                )
            )
        elif inputs_embeds is None:
            raise ValueError("MultimodalGPT.forward: pass a batch, input_ids or inputs_embeds")
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return self.gpt(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_logits=return_logits,
            output_attentions=output_attentions,
        )

    # -- generation ------------------------------------------------------------------------
    @contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def prepare_prompts(
        self,
        prompts: Sequence[str | Sequence[Any]],
        images: Sequence[Sequence[Any]] | None = None,
        inputs: Sequence[Mapping[str, Sequence[Any]] | None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Prompts (conversations or raw strings) + their images (and ``inputs[i]``, other
        modalities' items ``{modality: [item, …]}``) → left-padded
        ``(inputs_embeds (B, T, C), attention_mask (B, T))`` for a prefill."""
        batch = self.processor().prompt_batch(prompts, images, inputs)
        with self._inference():
            embeds = self.embed(batch)  # (B, T, C)
        return embeds, batch.attention_mask.to(self.device)

    def _generation_config(self, config: GenerationConfig | None, stop_at_eos: bool):
        config = config if config is not None else GenerationConfig()
        if stop_at_eos:  # eos, and a chat model's end-of-turn tokens
            stops = generation.tokenizer_stop_ids(self.tokenizer)
            missing = tuple(t for t in stops if t not in config.stop_token_ids)
            if missing:
                config = replace(config, stop_token_ids=(*config.stop_token_ids, *missing))
        return config

    def generate(
        self,
        prompts: Sequence[str | Sequence[Any]],
        images: Sequence[Sequence[Any]] | None = None,
        config: GenerationConfig | None = None,
        *,
        inputs: Sequence[Mapping[str, Sequence[Any]] | None] | None = None,
        stop_at_eos: bool = True,
        skip_special_tokens: bool = True,
        **kwargs: Any,
    ) -> GenerationOutput:
        """Batched generation with :func:`mmgpt.generation.generate` (KV cache, image-fused
        prefill). ``prompts``: conversations (rendered with the chat template, ending with
        ``"Assistant:"``) or raw strings; ``images[i]``: the images of prompt ``i``;
        ``inputs[i]``: its items of other modalities (``{"audio": [wave]}``). Returns a
        :class:`~mmgpt.generation.GenerationOutput` with ``texts``; ``kwargs`` go to ``generate``
        (``token_hook``, ``return_hidden_states``)."""
        embeds, mask = self.prepare_prompts(prompts, images, inputs)
        out = generation.generate(
            self.gpt,
            None,
            self._generation_config(config, stop_at_eos),
            pad_id=int(self.tokenizer.pad_id),
            inputs_embeds=embeds,
            attention_mask=mask,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens),
            return_dict=True,
            **kwargs,
        )
        # chat replies start with the template's separator (" "), which is not part of the answer;
        # beam search gives num_return_sequences rows per prompt
        per_prompt = len(out.tokens) // len(prompts)
        out.texts = [
            t.lstrip() if not isinstance(prompts[i // per_prompt], str) else t
            for i, t in enumerate(out.texts or [])
        ]
        return out

    def stream_text(
        self,
        prompt: str | Sequence[Any],
        images: Sequence[Any] = (),
        config: GenerationConfig | None = None,
        *,
        inputs: Mapping[str, Sequence[Any]] | None = None,
        stop_at_eos: bool = True,
        skip_special_tokens: bool = True,
        token_hook: Any = None,
    ) -> Iterator[str]:
        """Yield the reply to one prompt (a conversation or a raw string) in text chunks;
        ``inputs``: its items of non-image modalities, ``{modality: [item, …]}``."""
        embeds, _ = self.prepare_prompts([prompt], [images], [inputs])
        chunks = generation.stream_text(
            self.gpt,
            self.tokenizer,
            None,
            config,
            inputs_embeds=embeds,
            stop_at_eos=stop_at_eos,
            skip_special_tokens=skip_special_tokens,
            token_hook=token_hook,
        )
        started = isinstance(prompt, str)  # raw prompts are continued verbatim
        for chunk in chunks:
            if not started:
                chunk = chunk.lstrip()
                started = bool(chunk)
            if chunk:
                yield chunk

    def generate_text(
        self,
        prompt: str | Sequence[Any],
        images: Sequence[Any] = (),
        config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> str:
        """The whole reply to one prompt; options as :meth:`stream_text`."""
        return "".join(self.stream_text(prompt, images, config, **kwargs))

    def stream(
        self,
        prompt: str | Sequence[Any],
        images: Sequence[Any] = (),
        config: GenerationConfig | None = None,
        image_config: ImageGenerationConfig | None = None,
        **kwargs: Any,
    ) -> Iterator[TextEvent | ImageEvent | OutputEvent]:
        """Reply to one prompt with :class:`~mmgpt.imagegen.TextEvent` s and, where the model
        writes ``[IMG0]..``, :class:`~mmgpt.imagegen.ImageEvent` s (another output modality's
        signal tokens: :class:`~mmgpt.imagegen.OutputEvent` s); see
        :func:`mmgpt.imagegen.stream`."""
        return imagegen.stream(self, prompt, images, config, image_config, **kwargs)

    def generate_multimodal(
        self,
        prompt: str | Sequence[Any],
        images: Sequence[Any] = (),
        config: GenerationConfig | None = None,
        image_config: ImageGenerationConfig | None = None,
        **kwargs: Any,
    ) -> MultimodalOutput:
        """The whole reply of :meth:`stream`: ``.events``, ``.text``, ``.images`` and
        ``.outputs`` (the other output modalities' events)."""
        return imagegen.generate_multimodal(self, prompt, images, config, image_config, **kwargs)

    # -- training stages ---------------------------------------------------------------------
    def _part_modules(self, parts: str | Iterable[str]) -> list[nn.Module]:
        if isinstance(parts, str):
            parts = [p for chunk in parts.split("+") for p in chunk.split(",")]
        names = [p.strip() for p in parts if p.strip()]
        if "all" in names:
            names = sorted(set(PARTS.values()))
        modules = []
        for name in names:
            if name not in PARTS:
                raise ValueError(
                    f"unknown model part {name!r}; parts are: {', '.join(sorted(PARTS))}, all"
                )
            module = getattr(self, PARTS[name])
            if module is not None:
                modules.append(module)
        return modules

    @staticmethod
    def _set_trainable(module: nn.Module, flag: bool) -> None:
        children = module.values() if isinstance(module, nn.ModuleDict) else [module]
        for child in children:
            # encoders with a `frozen` switch also keep themselves in eval mode when frozen
            if isinstance(getattr(type(child), "frozen", None), property):
                child.frozen = not flag
            else:
                child.requires_grad_(flag)

    def freeze(self, parts: str | Iterable[str]) -> MultimodalGPT:
        """Turn gradients off for ``parts`` (``"encoder+gpt"``, ``["gpt"]``, ``"all"``…)."""
        for module in self._part_modules(parts):
            self._set_trainable(module, False)
        return self

    def trainable(self, parts: str | Iterable[str]) -> MultimodalGPT:
        """Train exactly ``parts`` and freeze everything else.

        LLaVA's stages: ``trainable("projector")`` (alignment), then
        ``trainable("projector+gpt")`` (instruction tuning), optionally ``+encoder``.
        """
        selected = self._part_modules(parts)
        for module in self._part_modules("all"):
            self._set_trainable(module, any(module is s for s in selected))
        return self

    # -- checkpoints ------------------------------------------------------------------------
    def _components(self) -> Iterator[tuple[str, nn.Module]]:
        for modality, enc in self.encoders.items():
            yield f"encoders.{modality}", enc
        for modality, proj in self.projectors.items():
            yield f"projectors.{modality}", proj
        if self.image_decoder is not None:
            yield "image_decoder", self.image_decoder
        if self.output_projector is not None:
            yield "output_projector", self.output_projector
        for modality, dec in self.decoders.items():
            yield f"decoders.{modality}", dec
        for modality, proj in self.output_projectors.items():
            yield f"output_projectors.{modality}", proj

    def _component_spec(self, key: str, kind: str, module: nn.Module) -> dict[str, Any]:
        name = self.component_names.get(key) or _registered_name(kind, module)
        if name is None:
            raise ValueError(
                f"cannot save {key} ({type(module).__name__}): it is not a registered {kind}; "
                f"register its class with @register({kind!r}, NAME) or pass "
                f"component_names={{{key!r}: NAME}}"
            )
        if not hasattr(module, "config_dict"):
            raise ValueError(f"cannot save {key} ({type(module).__name__}): no config_dict()")
        return {"name": name, "config": module.config_dict()}

    def config_dict(self) -> dict[str, Any]:
        """The content of ``config.json``."""
        kinds = {
            "encoders": "encoder",
            "projectors": "projector",
            "decoders": "decoder",
            "output_projectors": "projector",
        }
        config: dict[str, Any] = {
            "architecture": ARCHITECTURE,
            "format_version": FORMAT_VERSION,
            "gpt": self.gpt.config.to_dict(),
            "tokenizer": self.tokenizer.config_dict(),
            "encoders": {},
            "projectors": {},
        }
        for key, module in self._components():
            group, _, modality = key.partition(".")
            if modality:  # decoders/output_projectors appear only when the model has them
                spec = self._component_spec(key, kinds[group], module)
                config.setdefault(group, {})[modality] = spec
            else:
                kind = "decoder" if key == "image_decoder" else "projector"
                config[key] = self._component_spec(key, kind, module)
        return config

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` (+ ``adapters/``) and the tokenizer."""
        path = Path(path)
        config = self.config_dict()  # first: an unsaveable component fails before any write
        try:
            json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"cannot save: a component's config_dict() is not JSON-serialisable ({exc})"
            ) from exc
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(path)
        save_model_files(self, path, config)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        map_location: str | torch.device = "cpu",
        adapter: str | Sequence[str] | None = "auto",
    ) -> MultimodalGPT:
        """Load a directory written by :meth:`save_pretrained`, or a Hugging Face LLaVA
        directory (``model_type: "llava"``, :mod:`mmgpt.interop.llava`), in eval mode.

        ``adapter``: ``"auto"`` loads the adapters saved with the model (the recorded one
        active), ``"all"`` every ``adapters/<name>/``, a name or names those, ``None`` none
        (the base model); see :mod:`mmgpt.adapters.directory`. A LLaVA directory has none.
        """
        path = Path(path)
        config = read_model_config(path)
        where = path / CONFIG_NAME
        if is_llava_config(config):
            return cls._from_llava(path, map_location)
        if config.get("architecture") != ARCHITECTURE:
            raise ValueError(
                f"{where}: architecture is {config.get('architecture')!r}, expected "
                f"{ARCHITECTURE!r}"
                + ("; load it with GPT.from_pretrained" if "gpt" in config else "")
            )
        try:
            gpt_cfg = GPTConfig.from_dict(config["gpt"])
            # the decoder's shapes against the weights file, before anything is allocated
            shapes = {f"gpt.{k}": v for k, v in GPT.parameter_shapes(gpt_cfg).items()}
            check_weights_file(shapes, path / WEIGHTS_NAME, where)
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"{where}: malformed multimodal config ({type(exc).__name__}: {exc})"
            ) from exc
        model = cls._from_config(config, path, where)
        return load_model_files(model, path, config, adapter=adapter, map_location=map_location)

    @classmethod
    def _from_config(cls, config: Mapping[str, Any], path: Path, where: Path) -> MultimodalGPT:
        """The model ``config`` (a ``config.json``) describes, random weights; its tokenizer
        read from ``path``."""
        try:
            gpt_cfg = GPTConfig.from_dict(config["gpt"])
            tok_cfg = dict(config["tokenizer"])
            tokenizer = registry.create("tokenizer", tok_cfg.pop("name"), path=path, **tok_cfg)
            gpt = GPT(gpt_cfg)
            names: dict[str, str] = {}
            built: dict[str, dict[str, nn.Module]] = {"encoders": {}, "projectors": {}}
            built["decoders"], built["output_projectors"] = {}, {}
            groups = (
                ("encoders", "encoder"),
                ("projectors", "projector"),
                ("decoders", "decoder"),
                ("output_projectors", "projector"),
            )
            for group, kind in groups:
                for modality, spec in config.get(group, {}).items():
                    built[group][modality] = registry.create(kind, spec["name"], **spec["config"])
                    names[f"{group}.{modality}"] = spec["name"]
            extras: dict[str, nn.Module | None] = {}
            for key, kind in (("image_decoder", "decoder"), ("output_projector", "projector")):
                spec = config.get(key)
                extras[key] = None
                if spec is not None:
                    extras[key] = registry.create(kind, spec["name"], **spec["config"])
                    names[key] = spec["name"]
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"{where}: malformed multimodal config ({type(exc).__name__}: {exc})"
            ) from exc
        return cls(
            gpt,
            tokenizer,
            built["encoders"],
            built["projectors"],
            image_decoder=extras["image_decoder"],
            output_projector=extras["output_projector"],
            component_names=names,
            decoders=built["decoders"],
            output_projectors=built["output_projectors"],
        )

    @classmethod
    def _from_llava(cls, path: Path, map_location: str | torch.device) -> MultimodalGPT:
        """A Hugging Face ``LlavaForConditionalGeneration`` directory: its vision tower
        (``clip``/``siglip``), ``mlp2x_gelu`` projector, language model and tokenizer, whose
        ``<image>`` token must be the checkpoint's image token."""
        where = path / CONFIG_NAME
        llava = read_llava(path)
        gpt_cfg = GPTConfig.from_dict(llava.config["gpt"])
        for name, shape in GPT.parameter_shapes(gpt_cfg).items():  # before allocating
            stored = llava.state.get(f"gpt.{name}")
            if stored is not None and tuple(stored.shape) != tuple(shape):
                raise ValueError(
                    f"{where}: text_config describes a language model whose {name!r} has "
                    f"shape {tuple(shape)}, but {llava.source} stores {tuple(stored.shape)}"
                )
        model = cls._from_config(llava.config, path, where)
        image_id = getattr(model.tokenizer, "image_token_id", None)
        if image_id != llava.image_token_id:
            raise ValueError(
                f"{path}: the tokenizer's '<image>' token has id {image_id}, but config.json's "
                f"image_token_index is {llava.image_token_id}; the tokenizer files must be the "
                "checkpoint's own (with its '<image>' token)"
            )
        load_model_state(model, llava.state, llava.source)
        return model.to(map_location).eval()


def _takes_argument(factory: Any, name: str) -> bool:
    """Whether ``factory`` has a parameter called ``name`` (not merely ``**kwargs``)."""
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _output_projector(
    name: str, kwargs: Mapping[str, Any] | None, decoder: Any, n_embd: int, k: int
) -> nn.Module:
    """An output projector ``name``: ``in_dim=n_embd`` and, where its signature names them,
    ``out_dim``/``num_condition_tokens`` from ``decoder`` and ``num_signal_tokens=k``, unless
    ``kwargs`` gives them."""
    kwargs = dict(kwargs or {})
    kwargs.setdefault("in_dim", n_embd)
    defaults = {
        "out_dim": getattr(decoder, "condition_dim", None),
        "num_condition_tokens": getattr(decoder, "num_condition_tokens", None),
        "num_signal_tokens": k or None,
    }
    factory = registry.get("projector", name)
    for key, value in defaults.items():
        if value is not None and _takes_argument(factory, key):
            kwargs.setdefault(key, value)
    return registry.create("projector", name, **kwargs)


def _check_output_decoders(
    tokenizer: Tokenizer, decoders: Mapping[str, nn.Module], projectors: Mapping[str, nn.Module]
) -> None:
    """Each non-image decoder: keyed by its modality, with an output projector and signal
    tokens in the tokenizer that the projector reads."""
    if set(decoders) != set(projectors):
        raise ValueError(
            f"every output decoder needs an output projector of the same modality: decoders "
            f"for {sorted(decoders)}, output projectors for {sorted(projectors)}"
        )
    for modality, dec in decoders.items():
        declared = getattr(dec, "modality", None)
        if declared != modality:
            raise ValueError(
                f"decoder under key {modality!r} declares modality {declared!r}; key decoders "
                "by their modality"
            )
        ids = getattr(tokenizer, "output_signal_token_ids", None)
        ids = ids(modality) if callable(ids) else []
        if not ids:
            raise ValueError(
                f"the tokenizer has no signal tokens for output modality {modality!r}; build "
                "the model with MultimodalGPT.build(decoders=...), which adds them"
            )
        reads = getattr(projectors[modality], "num_signal_tokens", len(ids))
        if reads != len(ids):
            raise ValueError(
                f"the {modality!r} output projector reads {reads} signal tokens but the "
                f"tokenizer has {len(ids)} for {modality!r}"
            )


def _slots(modality: str, encoder: nn.Module, projector: nn.Module) -> int:
    """Slots per item: the encoder's ``num_tokens``, through the projector's
    ``output_tokens`` when it has one (a projector that merges tokens)."""
    num_tokens = int(encoder.num_tokens)
    output_tokens = getattr(projector, "output_tokens", None)
    if not callable(output_tokens):
        return num_tokens
    slots = output_tokens(num_tokens)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots <= 0:
        raise ValueError(
            f"the {modality!r} projector's output_tokens({num_tokens}) must be a positive "
            f"integer, got {slots!r}"
        )
    return slots


def _check_loader_placeholder(modality: str, encoder: nn.Module) -> None:
    """Files of ``modality`` are marked in data by its loader's placeholder and read by the
    model at its encoder's: they must be the same text."""
    if modality == "image" or modality not in registry.names("loader"):
        return
    ours = getattr(encoder, "placeholder", None) or f"<{modality}>"
    theirs = placeholder_of(modality)
    if ours != theirs:
        raise ValueError(
            f"the {modality!r} encoder's placeholder is {ours!r} but the {modality!r} loader's "
            f"is {theirs!r}; give both the same placeholder (default '<{modality}>')"
        )


def _registered_name(kind: str, module: nn.Module) -> str | None:
    """The registry name whose entry is ``module``'s class (or an explicit ``registry_name``)."""
    explicit = getattr(module, "registry_name", None)
    if isinstance(explicit, str):
        return explicit
    for entry in registry.entries(kind):
        if entry.obj is type(module):
            return entry.name
    return None


__all__ = [
    "ARCHITECTURE",
    "DEFAULT_OUTPUT_PROJECTOR",
    "DEFAULT_OUTPUT_SIGNAL_TOKENS",
    "MultimodalGPT",
]
