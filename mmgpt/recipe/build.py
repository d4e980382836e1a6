"""The parts a recipe names, built: tokenizer, model (text or multimodal), datasets."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Subset

from mmgpt.adapters.training import fold_loaded_adapters
from mmgpt.config import WEIGHTS_NAME, GPTConfig, gpt_config, read_model_config
from mmgpt.data.check import detect_format
from mmgpt.data.loader import StreamDataset
from mmgpt.data.loaders import placeholders
from mmgpt.data.sample import IMAGE_OUT_PLACEHOLDER, IMAGE_PLACEHOLDER
from mmgpt.data.text import is_heldout, resolve_text_files
from mmgpt.files import atomic_write_bytes, load_tensors
from mmgpt.interfaces import Tokenizer
from mmgpt.model import GPT
from mmgpt.multimodal import MultimodalGPT
from mmgpt.pretrained import architecture, load_tokenizer, resolve_model_dir
from mmgpt.processor import DEFAULT_TEMPLATE
from mmgpt.recipe.spec import (
    COMPONENTS,
    DATA_PATH_ARGS,
    MODALITY_COMPONENTS,
    MULTIMODAL_FORMATS,
    STAGES,
    factory_parameters,
)
from mmgpt.registry import create, get
from mmgpt.weights import load_model_state, model_state_dict

TOKENIZER_DIR = "tokenizer"
TOKENIZER_CORPUS = "tokenizer_corpus.txt"
# file datasets of the RLHF recipes (reward, dpo, ppo): --data is their file, whatever it holds
RLHF_DATASETS = ("preference", "prompts")
_REQUIRED = object()


def default_corpus() -> Path:
    """The example corpus shipped in ``mmgpt/assets/corpus``."""
    return Path(__file__).resolve().parent.parent / "assets" / "corpus"


def build_tokenizer(
    section: dict[str, Any],
    *,
    data_paths: Any = None,
    model_from: str | os.PathLike | None = None,
) -> Tokenizer:
    """Load (``from``), take the model's (``model.from``), or train on the text at ``data_paths``.

    ``data_paths`` is what the text dataset takes: a glob, a directory, a file or a list.
    """
    if section.get("from"):
        # training arguments (vocab_size, min_frequency) do not apply to a loaded tokenizer
        args = {k: v for k, v in section.items() if k not in ("name", "from", *TRAINING_ONLY)}
        return create("tokenizer", section.get("name", "bpe"), path=str(section["from"]), **args)
    if model_from is not None:
        # A model loaded from a directory keeps its own tokenizer: training a new one would
        # give ids that do not match its embeddings.
        return pretrained_tokenizer(model_from, section)
    if not section.get("name"):
        raise ValueError("recipe section 'tokenizer' needs a 'name' (e.g. bpe)")
    if data_paths is None:
        raise ValueError(
            "training a tokenizer needs text files: the data section has no paths; "
            "set tokenizer.from to an existing tokenizer"
        )
    args = {k: v for k, v in section.items() if k not in ("name", "from")}
    files = [str(p) for p in resolve_text_files(data_paths)]
    return create("tokenizer", section["name"], files=files, **args)


def pretrained_tokenizer(model_dir: str | os.PathLike, section: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer of a model directory a run starts from: an mmgpt directory's own, or a
    Hugging Face directory's ``tokenizer.json`` (its special tokens and chat template) with
    the tokens mmgpt adds (``<image>``, the signal tokens) appended."""
    model_dir = resolve_model_dir(model_dir)
    config = read_model_config(model_dir)
    if config.get("tokenizer"):
        return load_tokenizer(model_dir, config)
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no tokenizer.json beside the model; copy the model's tokenizer files "
            "there (tokenizer.json, tokenizer_config.json) or give tokenizer.from=DIR"
        )
    args = {k: v for k, v in section.items() if k == "num_signal_tokens"}
    return create("tokenizer", section.get("name") or "bpe", path=str(model_dir), **args)


def fit_vocabulary(gpt: GPT, tokenizer: Tokenizer, source: str | os.PathLike) -> GPT:
    """Grow ``gpt``'s embedding (and an untied head) to cover ``tokenizer``: the tokens mmgpt
    adds to a pretrained vocabulary start at the mean of the existing rows."""
    have, need = gpt.config.vocab_size, tokenizer.vocab_size
    if need > have:
        gpt.resize_token_embeddings(need)
        print(
            f"{source}: the embedding grew from {have} to {need} rows for the tokens mmgpt adds",
            flush=True,
        )
    return gpt


def build_model(
    section: dict[str, Any],
    tokenizer: Tokenizer | None = None,
    *,
    explicit: Collection[str] = (),
) -> GPT:
    """A GPT from ``preset`` + overrides (vocab_size follows the tokenizer) or ``from: DIR``
    (any directory :meth:`GPT.from_pretrained` reads, Hugging Face ones included);
    ``explicit``: the dotted keys the user set (see ``_override_gpt``)."""
    overrides = {k: v for k, v in section.items() if k not in ("preset", "from")}
    if section.get("from"):
        source = resolve_model_dir(section["from"])
        # a LoRA run's directory: its adapter folded in, the base this run starts from
        loaded = fold_loaded_adapters(GPT.from_pretrained(source))
        model = _override_gpt(loaded, overrides, source, explicit)
        if tokenizer is not None:
            model = fit_vocabulary(model, tokenizer, source)
        return model
    if not section.get("preset"):
        raise ValueError("recipe section 'model' needs 'preset' (e.g. gpt-nano) or 'from'")
    if tokenizer is not None:
        needed = tokenizer.vocab_size
        given = overrides.get("vocab_size")
        if given is not None and given < needed:
            raise ValueError(
                f"model.vocab_size={given} is smaller than the tokenizer's vocabulary ({needed})"
            )
        overrides.setdefault("vocab_size", needed)
    return GPT(gpt_config(section["preset"], **overrides))


def context_length(section: Mapping[str, Any], gpt: GPT) -> int:
    """The length of the text windows a language-model run trains on: the recipe's
    ``block_size``, capped by the model's context (a model the run starts from keeps its own
    context; the recipe's is the window)."""
    wanted = section.get("block_size")
    return gpt.config.block_size if wanted is None else min(int(wanted), gpt.config.block_size)


def dataset_kwargs(factory: Any, args: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    params = factory_parameters(factory)
    supplied = {k: v for k, v in context.items() if params is None or k in params}
    if "tokenizer" in supplied and supplied["tokenizer"] is None:
        if params is not None and factory_default(factory, "tokenizer", _REQUIRED) is _REQUIRED:
            raise ValueError("this dataset needs a tokenizer: give the recipe a tokenizer section")
        del supplied["tokenizer"]
    return {**supplied, **args}


def data_path_arg(factory: Any) -> str:
    params = factory_parameters(factory)
    for name in DATA_PATH_ARGS:
        if params is None or name in params:
            return name
    raise ValueError(f"this dataset takes no path argument ({', '.join(DATA_PATH_ARGS)}): --data")


def factory_default(factory: Any, name: str, fallback: Any) -> Any:
    try:
        param = inspect.signature(factory).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    if param is None or param.default is inspect.Parameter.empty:
        return fallback
    return param.default


def trainable_parts(stage: str | None = "full", train_encoder: bool | None = None) -> str:
    """The parts of a :class:`~mmgpt.multimodal.MultimodalGPT` a training stage updates.

    ``full``: everything (the encoder unless ``train_encoder`` is false); ``align`` (LLaVA
    stage 1): the projector only; ``finetune`` (LLaVA stage 2): projector + GPT, plus the
    encoder when ``train_encoder`` is true; ``decoder`` (NExT-GPT's decoding-side alignment):
    the output side only (output projectors and decoders), on a frozen GPT and encoder.
    """
    stage = "full" if stage is None else stage
    if stage not in STAGES:
        raise ValueError(
            f"recipe key 'train.stage' must be one of {', '.join(STAGES)}, got {stage!r}"
        )
    if train_encoder is not None and not isinstance(train_encoder, bool):
        raise ValueError(
            f"recipe key 'train.train_encoder' must be true or false, got {train_encoder!r}"
        )
    if stage == "align":
        if train_encoder:
            raise ValueError(
                "train.stage=align trains the projector only; train.train_encoder=true needs "
                "train.stage=finetune (or full)"
            )
        return "projector"
    if stage == "decoder":
        if train_encoder:
            raise ValueError(
                "train.stage=decoder trains the output projectors and decoders only; "
                "train.train_encoder=true needs train.stage=finetune (or full)"
            )
        return "image_decoder+output_projector+decoders+output_projectors"
    if stage == "finetune":
        return "projector+gpt" + ("+encoder" if train_encoder else "")
    if train_encoder is False:
        return "gpt+projector+image_decoder+output_projector+decoders+output_projectors"
    return "all"


def component_kwargs(section: Mapping[str, Any]) -> dict[str, Any]:
    """``MultimodalGPT.build`` arguments from the model section's component mappings."""
    kwargs: dict[str, Any] = {"encoder": None}
    for component, kind in COMPONENTS.items():
        body = section.get(component)
        if body is None:
            continue
        body = dict(body)
        if component == "encoder":
            body.pop("from", None)  # weights, loaded after the build (encoder_sources)
        type_name = body.pop("type", None)
        if not type_name:
            raise ValueError(
                f"recipe key 'model.{component}' needs a 'type' (a registry {kind} entry)"
            )
        kwargs[component] = type_name
        kwargs[f"{component}_kwargs"] = body
    for group, kind in MODALITY_COMPONENTS.items():
        bodies = section.get(group)
        if not bodies:
            continue
        built = {}
        for modality, body in dict(bodies).items():
            body = dict(body)
            if group == "encoders":
                body.pop("from", None)
            type_name = body.pop("type", None)
            if not type_name:
                raise ValueError(
                    f"recipe key 'model.{group}.{modality}' needs a 'type' (a registry {kind})"
                )
            built[str(modality)] = (type_name, body)
        kwargs[group] = built
    return kwargs


def gpt_overrides(section: Mapping[str, Any]) -> dict[str, Any]:

    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    return {k: v for k, v in section.items() if k in fields}


# What a recipe may change on a model it starts from (``model.from``): nothing that changes
# its architecture. ``block_size`` is the training window there (see context_length).
_PRETRAINED_SETTINGS = ("dropout", "block_size")
TRAINING_ONLY = ("vocab_size", "min_frequency")  # tokenizer arguments of training only


def _override_gpt(
    gpt: GPT, overrides: Mapping[str, Any], source: Path, explicit: Collection[str] = ()
) -> GPT:
    """``gpt`` (loaded from ``source``) with the recipe's ``dropout``; weights kept.

    Other architecture settings describe a model built from a preset: those the recipe file
    carries are left out with a note (the loaded model keeps its own), and those the user set
    explicitly (``explicit``: dotted override keys) are an error.
    """
    changed = {k: v for k, v in overrides.items() if getattr(gpt.config, k) != v}
    others = sorted(k for k in changed if k not in _PRETRAINED_SETTINGS)
    refused = [k for k in others if f"model.{k}" in explicit]
    if refused:
        listed = ", ".join(f"model.{k}={changed[k]!r}" for k in refused)
        have = ", ".join(f"{k}={getattr(gpt.config, k)!r}" for k in refused)
        raise ValueError(
            f"model.from={source}: {listed} would change the architecture of the model this run "
            f"starts from (it has {have}); only model.dropout and model.block_size (the "
            "training window) apply to it"
        )
    if others:
        listed = ", ".join(f"{k}={changed[k]!r}" for k in others)
        print(f"{source}: keeps its own architecture; the recipe's {listed} not used", flush=True)
    if "dropout" not in changed:
        return gpt
    tuned = GPT(GPTConfig.from_dict({**gpt.config.to_dict(), "dropout": changed["dropout"]}))
    load_model_state(tuned, model_state_dict(gpt), source)
    return tuned.train(gpt.training)


def build_autoencoder(section: Mapping[str, Any]) -> Any:
    """The image autoencoder of a recipe with ``model.architecture: autoencoder``: the
    registry ``model`` entry ``preset`` (e.g. ``autoencoder-kl``) called with the section's
    other keys."""
    preset = section.get("preset")
    if not preset:
        raise ValueError(
            "recipe section 'model' (architecture: autoencoder) needs 'preset', a registry "
            "model entry that builds an autoencoder (e.g. autoencoder-kl)"
        )
    args = {k: v for k, v in section.items() if k not in ("architecture", "preset")}
    model = create("model", preset, **args)
    if not (hasattr(model, "encode") and hasattr(model, "decode")):
        raise ValueError(
            f"recipe key 'model.preset': {preset!r} built a {type(model).__name__}, not an "
            "image autoencoder (encode/decode); use e.g. autoencoder-kl"
        )
    return model


def build_multimodal_model(
    section: Mapping[str, Any],
    tokenizer: Tokenizer | None = None,
    *,
    tokenizer_section: Mapping[str, Any] | None = None,
    explicit: Collection[str] = (),
) -> MultimodalGPT:
    """A :class:`~mmgpt.multimodal.MultimodalGPT` from a recipe's model section.

    - ``from: DIR`` of a multimodal model: that model (its tokenizer, encoder and projector;
      the section's components are not used), with GPT overrides such as ``dropout``.
    - ``from: DIR`` of a text GPT (mmgpt's or a Hugging Face one): that GPT and its
      tokenizer, grown by the tokens mmgpt adds, with the section's encoder and projector
      built around it (LLaVA's start: a pretrained language model).
    - ``preset``: a new GPT of that preset (``vocab_size`` follows ``tokenizer``) + components.
    """
    overrides = gpt_overrides(section)
    components = component_kwargs(section)
    if section.get("from"):
        path = resolve_model_dir(section["from"])
        config = read_model_config(path)
        if architecture(config, path) == "multimodal":
            model = fold_loaded_adapters(MultimodalGPT.from_pretrained(path))
            model.gpt = _override_gpt(model.gpt, overrides, path, explicit)
            return model
        gpt = fold_loaded_adapters(GPT.from_pretrained(path))
        gpt = _override_gpt(gpt, overrides, path, explicit)
        tokenizer = pretrained_tokenizer(path, tokenizer_section or {})
        model = _build(
            MultimodalGPT, fit_vocabulary(gpt, tokenizer, path), tokenizer, components, {}
        )
        load_encoder_weights(model, encoder_sources(section))
        return model
    if not section.get("preset"):
        raise ValueError("recipe section 'model' needs 'preset' (e.g. gpt-nano) or 'from'")
    if tokenizer is None:
        raise ValueError("a multimodal model built from a preset needs a tokenizer")
    model = _build(MultimodalGPT, section["preset"], tokenizer, components, overrides)
    load_encoder_weights(model, encoder_sources(section))
    return model


def encoder_sources(section: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """``model.encoder.from`` / ``model.encoders.<modality>.from``: the model directory each
    encoder starts from, by modality, with the recipe key that named it."""
    sources: dict[str, tuple[str, str]] = {}
    single = section.get("encoder")
    if isinstance(single, Mapping) and single.get("from"):
        modality = getattr(get("encoder", single.get("type")), "modality", None)
        sources[str(modality)] = (str(single["from"]), "model.encoder.from")
    for modality, body in dict(section.get("encoders") or {}).items():
        if isinstance(body, Mapping) and body.get("from"):
            sources[str(modality)] = (str(body["from"]), f"model.encoders.{modality}.from")
    return sources


def load_encoder_weights(model: MultimodalGPT, sources: Mapping[str, tuple[str, str]]) -> None:
    """Start each encoder named in ``sources`` from the same modality's encoder of another
    model directory (e.g. a ``clip`` run's): its tensors only, strictly, so that an encoder
    pretrained in one recipe carries into another whose GPT, projector or decoders differ."""
    for modality, (where, key) in sources.items():
        if modality not in model.encoders:
            raise ValueError(f"{key}={where}: this model has no {modality!r} encoder")
        source = resolve_model_dir(where)
        config = read_model_config(source)
        theirs = (config.get("encoders") or {}).get(modality)
        ours = model.config_dict()["encoders"][modality]
        if theirs is None:
            raise ValueError(f"{key}={source}: that model has no {modality!r} encoder")
        if theirs.get("name") != ours.get("name"):
            raise ValueError(
                f"{key}={source}: its {modality} encoder is {theirs.get('name')!r}, this "
                f"recipe's is {ours.get('name')!r}"
            )
        prefix = f"encoders.{modality}."
        state = load_tensors(source / WEIGHTS_NAME, prefix=prefix)
        own = {k[len(prefix) :]: v for k, v in state.items()}
        # strict: a different architecture names its missing, unexpected or mis-shaped tensors
        load_model_state(model.encoders[modality], own, source / WEIGHTS_NAME)
        print(f"{key}={source}: the {modality} encoder starts from its weights", flush=True)


def _build(cls: Any, gpt: Any, tokenizer: Any, components: dict[str, Any], overrides: Any) -> Any:
    try:
        return cls.build(gpt, tokenizer, **components, **overrides)
    except TypeError as exc:  # a component argument its registry entry does not take
        names = ", ".join(
            [f"model.{c}.type={components[c]}" for c in COMPONENTS if c in components]
            + [
                f"model.{g}.{m}.type={name}"
                for g in MODALITY_COMPONENTS
                for m, (name, _) in components.get(g, {}).items()
            ]
        )
        raise ValueError(f"recipe section 'model' ({names}): {exc}") from exc


def conversation_text(dataset: Any, limit: int = 5000) -> str:
    """The text of a dataset's conversations, rendered like the chat template, for training a
    tokenizer (file datasets: every record, read without loading images; others: the first
    ``limit`` samples)."""
    t = DEFAULT_TEMPLATE
    records = getattr(dataset, "records", None)
    if records is not None:
        conversations = [record.data for record in records]
    elif is_stream(dataset):
        conversations = stream_conversations(dataset, limit)
    else:
        conversations = [dataset[i].conversation for i in range(min(len(dataset), limit))]
    # every modality's placeholder, longest first so that none is cut inside another
    marks = sorted({IMAGE_OUT_PLACEHOLDER, IMAGE_PLACEHOLDER, *placeholders().values()}, key=len)
    marks.reverse()
    lines = []
    for turns in conversations:
        for turn in turns:
            text = turn.text
            for mark in marks:  # items' places are slots, not text the tokenizer learns
                text = text.replace(mark, "")
            text = text.strip()
            if turn.role == "user":
                lines.append(f"{t.user_prefix}{text}{t.user_suffix}")
            else:
                lines.append(
                    f"{t.assistant_prefix}{t.assistant_separator}{text}{t.assistant_suffix}"
                )
    return "".join(lines)


def multimodal_data_source(
    section: dict[str, Any], data: str | os.PathLike | None
) -> tuple[str, dict[str, Any]]:
    """(dataset name, its arguments); ``--data`` switches to the detected file format, keeping
    only the arguments that format takes."""

    args = dict(section)
    name = args.pop("name")
    if data is None:
        return name, args
    if name in RLHF_DATASETS:  # a prompt dataset also reads preference files
        return name, {**args, "path": str(data)}
    fmt, target = detect_format(data)
    if fmt not in MULTIMODAL_FORMATS:
        raise ValueError(
            f"{data}: detected a {fmt} dataset, but multimodal recipes train on image-text data: "
            "an imagefolder directory (metadata.jsonl), a LLaVA conversation JSON, parquet "
            "files, a datasets directory (save_to_disk) or tar shards"
        )
    params = factory_parameters(get("dataset", fmt))
    kept = {k: v for k, v in args.items() if params is None or k in params}
    return fmt, {**kept, "path": str(target)}


def make_dataset(name: str, args: Mapping[str, Any], image_size: int | None) -> Any:

    args = dict(args)
    if "image_size" in args and args["image_size"] is None:
        # null follows the image encoder's input size; without one, the dataset's default
        if image_size is None:
            del args["image_size"]
        else:
            args["image_size"] = image_size
    try:
        dataset = get("dataset", name)(**args)
    except TypeError as exc:  # an argument the dataset does not take
        raise ValueError(f"recipe section 'data' (dataset {name!r}): {exc}") from exc
    map_style = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    if not (map_style or is_stream(dataset)):
        raise ValueError(
            f"dataset {name!r} with {args} is not map-style (endless?); give it a size "
            "(e.g. data.size=20000)"
        )
    return dataset


def split_dataset(dataset: Any, fraction: Any) -> tuple[Any, Any]:
    """(train, held-out) subsets; sample ``i`` is held out when ``is_heldout(i, fraction)``."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 <= fraction < 1
    ):
        raise ValueError(f"recipe key 'data.eval_fraction' must be in [0, 1), got {fraction!r}")
    if is_stream(dataset):
        return stream_split(dataset, fraction)
    held = [i for i in range(len(dataset)) if is_heldout(i, fraction)]
    if not held:
        return dataset, None
    kept = set(held)
    return Subset(dataset, [i for i in range(len(dataset)) if i not in kept]), Subset(dataset, held)


def multimodal_tokenizer(
    section: Mapping[str, Any], text_dataset: Any, out_dir: Path, resume: bool
) -> Any:
    """Load ``tokenizer.from``, reuse the run's own on resume, or train one on the data's text."""

    args = {k: v for k, v in section.items() if k not in ("name", "from")}
    name = section.get("name") or "bpe"
    if section.get("from"):
        # training arguments (vocab_size, min_frequency) do not apply to a loaded tokenizer
        loading = {k: v for k, v in args.items() if k not in TRAINING_ONLY}
        return create("tokenizer", name, path=str(section["from"]), **loading)
    if not section.get("name"):
        raise ValueError("recipe section 'tokenizer' needs a 'name' (e.g. bpe) or 'from'")
    saved = out_dir / TOKENIZER_DIR
    if resume and (saved / "tokenizer.json").is_file():
        return create("tokenizer", name, path=str(saved))
    corpus = out_dir / TOKENIZER_CORPUS
    text = conversation_text(text_dataset)
    if not text.strip():
        raise ValueError("the training data has no text to train a tokenizer on")
    atomic_write_bytes(corpus, text.encode("utf-8"))
    tokenizer = create("tokenizer", name, files=[str(corpus)], **args)
    tokenizer.save(saved)
    return tokenizer


# -- streamed datasets (tar shards, parquet read row group by row group) -----------------------
def is_stream(dataset: Any) -> bool:
    """A dataset read as a stream (:class:`~mmgpt.data.loader.StreamDataset`): no random
    access; the trainer's loader batches it from a resumable stream position."""
    return isinstance(dataset, StreamDataset)


def stream_conversations(dataset: StreamDataset, limit: int) -> list[Any]:
    """The conversations of a stream's first ``limit`` samples, images not loaded."""
    return list(itertools.islice(dataset.iter_conversations(), limit))


def stream_split(dataset: StreamDataset, fraction: float) -> tuple[Any, None]:
    """A stream trains whole: it has no held-out split (its size is not known up front)."""
    if fraction:
        print(
            f"{dataset.source}: a streamed dataset has no held-out split; "
            f"data.eval_fraction={fraction} is not used (evaluate on held-out data with mmgpt eval)",
            flush=True,
        )
    return dataset, None
