"""Recipes: YAML files that name registry entries and set their arguments.

A recipe has the sections

- ``model``: ``preset`` plus :class:`~mmgpt.config.GPTConfig` overrides, or ``from: DIR``;
- ``tokenizer``: ``name`` plus training arguments (``vocab_size``, …) or ``from: PATH``;
- ``data``: ``name`` of a dataset entry plus its arguments;
- ``objective``: ``name`` of an objective entry plus its arguments;
- ``train``: :class:`~mmgpt.trainer.TrainConfig` fields;
- ``adapter`` (optional): a LoRA/DoRA adapter on the model (``method``, ``r``, ``alpha``,
  ``targets``…; :mod:`mmgpt.adapters.training`); ``adapter=lora`` is ``adapter.method=lora``;

and an optional ``description``. Shipped recipes live in ``mmgpt/recipes/NAME.yaml``.
``key=value`` overrides address nested keys with dots (``train.lr=1e-3``); values are YAML
scalars. Recipes hold no code: building things is the job of the registry entries they name.

``python -m mmgpt.recipe RECIPE [--data PATH] [--out DIR] [--resume] [key=value ...]`` runs one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "apply_overrides",
    "build_model",
    "build_multimodal_model",
    "build_tokenizer",
    "conversation_text",
    "load_recipe",
    "main",
    "recipe_names",
    "run_training",
    "trainable_parts",
    "validate_recipe",
]

RECIPE_DIR = Path(__file__).parent / "recipes"
SECTIONS = ("description", "model", "tokenizer", "data", "objective", "train", "adapter")
TOKENIZER_DIR = "tokenizer"
# Arguments the recipe supplies to a dataset factory (when its signature accepts them).
DATASET_CONTEXT = ("tokenizer", "block_size", "split")
DATA_PATH_ARGS = ("paths", "path", "root")
ARCHITECTURES = ("gpt", "multimodal")
# Multimodal recipes: model components ({type: registry name, **its arguments}) by the registry
# kind of their type, the recipe-level keys of `train` that choose what trains, and the keys
# of `data` the recipe handles itself (not passed to the dataset).
COMPONENTS = {
    "encoder": "encoder",
    "projector": "projector",
    "image_decoder": "decoder",
    "output_projector": "projector",
}
STAGES = ("full", "align", "finetune")
STAGE_KEYS = ("stage", "train_encoder")
MULTIMODAL_DATA_KEYS = ("eval_fraction", "truncation")
MULTIMODAL_FORMATS = ("imagefolder", "llava")
# file datasets of the RLHF recipes (reward, dpo, ppo): --data is their file, whatever it holds
RLHF_DATASETS = ("preference", "prompts")
TOKENIZER_CORPUS = "tokenizer_corpus.txt"
_REQUIRED = object()


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    """A YAML scalar (or flow list/map): ``"1e-3"`` → 0.001, ``"true"`` → True, ``"[1, 2]"``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot parse override value {text!r} as YAML ({exc})") from None


# --------------------------------------------------------------------------------------
# Loading, overriding, validating
# --------------------------------------------------------------------------------------


def recipe_names() -> list[str]:
    """Names of the recipes shipped with mmgpt."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(recipe: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A recipe as a dict from a shipped name, a YAML path, or a mapping (deep-copied)."""
    if isinstance(recipe, Mapping):
        data: Any = copy.deepcopy(dict(recipe))
        source = "<recipe dict>"
    else:
        path = Path(recipe)
        if not path.is_file():
            shipped = RECIPE_DIR / f"{recipe}.yaml"
            if not shipped.is_file():
                raise FileNotFoundError(
                    f"recipe {str(recipe)!r} is neither a file nor a shipped recipe; "
                    f"shipped recipes: {', '.join(recipe_names()) or '(none)'}"
                )
            path = shipped
        source = str(path)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a recipe must be a mapping of sections, got {type(data)}")
    if isinstance(data.get("adapter"), str):  # `adapter: lora`
        data["adapter"] = {"method": data["adapter"]}
    for section in SECTIONS[1:]:
        if data.get(section) is None:
            data[section] = {}
        elif not isinstance(data[section], dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
    return data


def _as_pairs(overrides: Sequence[str] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    if isinstance(overrides, Mapping):
        return [
            (key, parse_scalar(value) if isinstance(value, str) else value)
            for key, value in overrides.items()
        ]
    pairs = []
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key=value")
        pairs.append((key.strip(), parse_scalar(value)))
    return pairs


def apply_overrides(
    recipe: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]
) -> dict[str, Any]:
    """Set dotted keys (``["train.lr=1e-3"]`` or ``{"train.lr": "1e-3"}``); validates them."""
    recipe = copy.deepcopy(recipe)
    for key, value in _as_pairs(overrides):
        parts = ["adapter", "method"] if key == "adapter" else key.split(".")
        if any(not p for p in parts):
            raise ValueError(f"override key {key!r} is malformed")
        if len(parts) == 1 and parts[0] != "description":
            raise ValueError(
                f"override {key!r} must name a key inside a section, e.g. '{key}.NAME=VALUE' "
                f"or 'train.lr=1e-3'; sections: {', '.join(SECTIONS[1:])}"
            )
        _check_key(recipe, parts)
        node = recipe
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {key!r}: {part!r} is not a section of mappings")
            node = child
        node[parts[-1]] = value
    return recipe


def _section_keys(recipe: dict[str, Any], section: str) -> set[str] | None:
    """Valid keys of a section, or None when any key is accepted."""
    from mmgpt.config import GPTConfig
    from mmgpt.trainer import TrainConfig

    body = recipe.get(section) or {}
    multimodal = _architecture(recipe) == "multimodal"
    if section == "adapter":
        from mmgpt.adapters.training import ADAPTER_KEYS

        return set(ADAPTER_KEYS)
    if section == "train":
        return {f.name for f in dataclasses.fields(TrainConfig)} | (
            set(STAGE_KEYS) if multimodal else set()
        )
    if section == "model":
        keys = {"architecture", "preset", "from"} | {f.name for f in dataclasses.fields(GPTConfig)}
        return keys | (set(COMPONENTS) if multimodal else set())
    kind = {"tokenizer": "tokenizer", "data": "dataset", "objective": "objective"}[section]
    extra = {"name", "from"} if section == "tokenizer" else {"name"}
    if section == "data" and multimodal:
        extra |= set(MULTIMODAL_DATA_KEYS)
    name = body.get("name")
    if name is None:
        return None
    from mmgpt.registry import get

    params = _parameters(get(kind, name))
    if params is None:
        return None
    hidden = set(DATASET_CONTEXT) if section == "data" else {"path", "files"}
    return extra | (params - hidden)


def _parameters(factory: Any) -> set[str] | None:
    """Keyword parameters of a factory; None if it takes ``**kwargs`` or has no signature."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {
        n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)
    }


def _check_key(recipe: dict[str, Any], parts: list[str]) -> None:
    dotted = ".".join(parts)
    if parts[0] not in SECTIONS:
        raise ValueError(f"unknown recipe key {dotted!r}: valid sections are {', '.join(SECTIONS)}")
    if len(parts) < 2 or parts[0] == "description":
        return
    if parts[1] == "name":
        return  # the registry names the known entries when it is looked up
    if parts[0] == "model" and parts[1] in COMPONENTS and len(parts) > 2:
        _check_component_key(recipe, parts)
        return
    valid = _section_keys(recipe, parts[0])
    if valid is not None and parts[1] not in valid:
        import difflib

        close = difflib.get_close_matches(parts[1], sorted(valid), n=1)
        hint = f" (did you mean {parts[0]}.{close[0]}?)" if close else ""
        raise ValueError(
            f"unknown recipe key {dotted!r}{hint}; valid keys of {parts[0]!r}: "
            f"{', '.join(sorted(valid))}"
        )


def validate_recipe(recipe: dict[str, Any]) -> None:
    """Check every section and key; an unknown one is an error listing the valid ones."""
    _architecture(recipe)  # an unknown architecture is an error
    for section, body in recipe.items():
        _check_key(recipe, [section])
        if section != "description" and isinstance(body, dict):
            for key in body:
                _check_key(recipe, [section, str(key)])
    for component in COMPONENTS:
        body = recipe.get("model", {}).get(component)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ValueError(
                f"recipe key 'model.{component}' must be a mapping with a 'type' (a registry "
                f"entry) and its arguments, got {body!r}"
            )
        for key in body:
            _check_key(recipe, ["model", component, str(key)])
    for section in ("data", "objective"):
        if not recipe.get(section, {}).get("name"):
            raise ValueError(f"recipe section {section!r} needs a 'name' (a registry entry)")


# --------------------------------------------------------------------------------------
# Building the parts
# --------------------------------------------------------------------------------------


def default_corpus() -> Path:
    """The example corpus shipped in ``mmgpt/assets/corpus``."""
    return Path(__file__).parent / "assets" / "corpus"


def build_tokenizer(
    section: dict[str, Any],
    *,
    data_paths: Any = None,
    model_from: str | os.PathLike | None = None,
) -> Any:
    """Load (``from``), take the model's (``model.from``), or train on the text at ``data_paths``.

    ``data_paths`` is what the text dataset takes: a glob, a directory, a file or a list.
    """
    from mmgpt.registry import create

    args = {k: v for k, v in section.items() if k not in ("name", "from")}
    if section.get("from"):
        return create("tokenizer", section.get("name", "bpe"), path=str(section["from"]), **args)
    if model_from is not None:
        # A model loaded from a directory keeps its own tokenizer: training a new one would
        # give ids that do not match its embeddings.
        from mmgpt.checkpoint import read_model_config

        config = read_model_config(Path(model_from)).get("tokenizer") or {}
        name = config.get("name")
        if not name:
            raise ValueError(
                f"{model_from}: config.json has no 'tokenizer' section; give recipe "
                "tokenizer.name and tokenizer.from"
            )
        return create("tokenizer", name, path=str(model_from))
    if not section.get("name"):
        raise ValueError("recipe section 'tokenizer' needs a 'name' (e.g. bpe)")
    if data_paths is None:
        raise ValueError(
            "training a tokenizer needs text files: the data section has no paths; "
            "set tokenizer.from to an existing tokenizer"
        )
    from mmgpt.data.text import resolve_text_files

    files = [str(p) for p in resolve_text_files(data_paths)]
    return create("tokenizer", section["name"], files=files, **args)


def build_model(section: dict[str, Any], tokenizer: Any = None) -> Any:
    """A GPT from ``preset`` + overrides (vocab_size follows the tokenizer) or ``from: DIR``."""
    from mmgpt.checkpoint import load_model_state, model_state_dict
    from mmgpt.config import gpt_config
    from mmgpt.model import GPT

    overrides = {k: v for k, v in section.items() if k not in ("preset", "from")}
    if section.get("from"):
        from mmgpt.adapters.training import fold_loaded_adapters

        # a LoRA run's directory: its adapter folded in, the base this run starts from
        model = fold_loaded_adapters(GPT.from_pretrained(section["from"]))
        if overrides:  # e.g. a different dropout for fine-tuning; shapes must stay
            config = dataclasses.replace(model.config, **overrides)
            tuned = GPT(config)
            load_model_state(tuned, model_state_dict(model), Path(section["from"]))
            model = tuned
    else:
        if not section.get("preset"):
            raise ValueError("recipe section 'model' needs 'preset' (e.g. gpt-nano) or 'from'")
        if tokenizer is not None:
            needed = tokenizer.vocab_size
            given = overrides.get("vocab_size")
            if given is not None and given < needed:
                raise ValueError(
                    f"model.vocab_size={given} is smaller than the tokenizer's vocabulary "
                    f"({needed})"
                )
            overrides.setdefault("vocab_size", needed)
        model = GPT(gpt_config(section["preset"], **overrides))
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
            f"{model.config.vocab_size} embeddings"
        )
    return model


def _dataset_kwargs(factory: Any, args: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    params = _parameters(factory)
    supplied = {k: v for k, v in context.items() if params is None or k in params}
    if "tokenizer" in supplied and supplied["tokenizer"] is None:
        if params is not None and _default(factory, "tokenizer", _REQUIRED) is _REQUIRED:
            raise ValueError("this dataset needs a tokenizer: give the recipe a tokenizer section")
        del supplied["tokenizer"]
    return {**supplied, **args}


def _data_path_arg(factory: Any) -> str:
    params = _parameters(factory)
    for name in DATA_PATH_ARGS:
        if params is None or name in params:
            return name
    raise ValueError(f"this dataset takes no path argument ({', '.join(DATA_PATH_ARGS)}): --data")


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


def run_training(
    recipe: str | os.PathLike | Mapping[str, Any],
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> dict[str, Any]:
    """Train what ``recipe`` describes; the function behind ``mmgpt train``.

    Args:
        recipe: a shipped recipe name (``"lm"``), a YAML path, or a recipe mapping.
        data: training data; sets the dataset's ``paths``/``path``/``root`` argument.
        out: output directory (default ``runs/<recipe name>``).
        resume: continue from the newest valid checkpoint in ``out``.
        overrides: ``["train.lr=1e-3", ...]`` or ``{"train.lr": "1e-3"}``.

    Returns ``{"out_dir", "model_dir", "step", "train", "eval"}`` (last metrics).
    """
    from mmgpt import distributed
    from mmgpt.adapters.training import apply_adapter
    from mmgpt.registry import create, get
    from mmgpt.trainer import TrainConfig, Trainer, check_no_checkpoints, seed_everything

    name = "recipe" if isinstance(recipe, Mapping) else Path(recipe).stem
    spec = apply_overrides(load_recipe(recipe), overrides)
    validate_recipe(spec)
    multimodal = _architecture(spec) == "multimodal"
    train_section = dict(spec["train"])
    stage = {k: train_section.pop(k) for k in STAGE_KEYS if k in train_section}
    train_config = TrainConfig.from_dict(train_section)
    # under torchrun: join the process group now, so that one rank alone trains the tokenizer
    distributed.setup(train_config.strategy, train_config.device)
    out_dir = Path(out) if out is not None else Path("runs") / name
    if not resume:  # before anything is written there (recipe, tokenizer)
        check_no_checkpoints(out_dir)
    if multimodal:
        return _run_multimodal(spec, train_config, stage, data=data, out_dir=out_dir, resume=resume)
    out_dir.mkdir(parents=True, exist_ok=True)

    data_section = dict(spec["data"])
    dataset_name = data_section.pop("name")
    factory = get("dataset", dataset_name)
    if data is not None:
        data_section[_data_path_arg(factory)] = str(data)
    path_arg = next((k for k in DATA_PATH_ARGS if data_section.get(k) is not None), None)
    if path_arg is None and "paths" in (_parameters(factory) or {"paths"}):
        corpus = default_corpus()
        if not corpus.is_dir():
            raise ValueError(f"no training data: pass --data PATH ({corpus} is not installed)")
        data_section["paths"] = str(corpus)
        path_arg = "paths"
    spec["data"] = {"name": dataset_name, **data_section}
    _record_recipe(out_dir / "recipe.yaml", spec, resume)

    # tokenizer: a resumed run reuses the one it trained, so ids cannot change under it
    saved_tokenizer = out_dir / TOKENIZER_DIR
    tok_section = dict(spec["tokenizer"])
    model_from = spec["model"].get("from")
    if resume and (saved_tokenizer / "tokenizer.json").is_file() and tok_section.get("name"):
        tokenizer = create("tokenizer", tok_section["name"], path=str(saved_tokenizer))
    elif tok_section or model_from:
        data_paths = data_section[path_arg] if path_arg is not None else None

        def make_tokenizer() -> Any:
            made = build_tokenizer(tok_section, data_paths=data_paths, model_from=model_from)
            made.save(saved_tokenizer)
            return made

        tokenizer = distributed.on_main_process(make_tokenizer)
    else:
        tokenizer = None

    seed_everything(train_config.seed)  # model init is part of the reproducible run
    model = build_model(dict(spec["model"]), tokenizer)
    apply_adapter(model, spec.get("adapter"))  # then only the adapter (+ extras) trains

    context = {"tokenizer": tokenizer, "block_size": model.config.block_size}
    train_data = factory(**_dataset_kwargs(factory, data_section, {**context, "split": "train"}))
    eval_data = None
    params = _parameters(factory)
    wants_eval = data_section.get("eval_fraction", _default(factory, "eval_fraction", True))
    if (params is None or "split" in params) and wants_eval:
        eval_data = factory(**_dataset_kwargs(factory, data_section, {**context, "split": "eval"}))

    objective_section = dict(spec["objective"])
    objective = create("objective", objective_section.pop("name"), **objective_section)
    trainer = Trainer(
        model,
        objective,
        train_data,
        train_config,
        eval_data=eval_data,
        collate_fn=getattr(train_data, "collate_fn", None),
        out_dir=out_dir,
        tokenizer=tokenizer,
    )
    result = trainer.fit(resume=resume)
    return {"out_dir": str(out_dir), **result}


def _default(factory: Any, name: str, fallback: Any) -> Any:
    try:
        param = inspect.signature(factory).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    if param is None or param.default is inspect.Parameter.empty:
        return fallback
    return param.default


def _record_recipe(path: Path, spec: dict[str, Any], resume: bool) -> None:
    """Write the resolved recipe next to the run; on resume, warn if it changed."""
    from mmgpt.checkpoint import atomic_write_bytes

    text = yaml.safe_dump(spec, sort_keys=False)
    if resume and path.is_file():
        before = _flatten(yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {})
        now = _flatten(spec)
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            warnings.warn(
                f"resuming {path.parent} with a changed recipe ({', '.join(changed)}); the run "
                "will not match an uninterrupted one",
                RuntimeWarning,
                stacklevel=3,
            )
    atomic_write_bytes(path, text.encode())


# --------------------------------------------------------------------------------------
# Multimodal recipes (model.architecture: multimodal)
# --------------------------------------------------------------------------------------


def _architecture(recipe: Mapping[str, Any]) -> str:
    """``model.architecture`` of a recipe: ``"gpt"`` (default) or ``"multimodal"``."""
    model = recipe.get("model")
    arch = model.get("architecture") if isinstance(model, Mapping) else None
    arch = "gpt" if arch is None else arch
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"recipe key 'model.architecture' must be one of {', '.join(ARCHITECTURES)}, "
            f"got {arch!r}"
        )
    return arch


def _check_component_key(recipe: dict[str, Any], parts: list[str]) -> None:
    """``model.<component>.<key>``: ``type`` or an argument of the registry entry it names."""
    dotted = ".".join(parts)
    component, key = parts[1], parts[2]
    if _architecture(recipe) != "multimodal":
        raise ValueError(
            f"unknown recipe key {dotted!r}: model components need model.architecture=multimodal"
        )
    body = recipe.get("model", {}).get(component)
    type_name = body.get("type") if isinstance(body, Mapping) else None
    if key == "type" or type_name is None:
        return
    from mmgpt.registry import get

    params = _parameters(get(COMPONENTS[component], type_name))
    if params is None or key in params:
        return
    import difflib

    close = difflib.get_close_matches(key, sorted(params), n=1)
    hint = f" (did you mean model.{component}.{close[0]}?)" if close else ""
    raise ValueError(
        f"unknown recipe key {dotted!r}{hint}; {COMPONENTS[component]} {type_name!r} takes: "
        f"type, {', '.join(sorted(params))}"
    )


def trainable_parts(stage: str | None = "full", train_encoder: bool | None = None) -> str:
    """The parts of a :class:`~mmgpt.multimodal.MultimodalGPT` a training stage updates.

    ``full``: everything (the encoder unless ``train_encoder`` is false); ``align`` (LLaVA
    stage 1): the projector only; ``finetune`` (LLaVA stage 2): projector + GPT, plus the
    encoder when ``train_encoder`` is true.
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
    if stage == "finetune":
        return "projector+gpt" + ("+encoder" if train_encoder else "")
    if train_encoder is False:
        return "gpt+projector+image_decoder+output_projector"
    return "all"


def _components(section: Mapping[str, Any]) -> dict[str, Any]:
    """``MultimodalGPT.build`` arguments from the model section's component mappings."""
    kwargs: dict[str, Any] = {"encoder": None}
    for component, kind in COMPONENTS.items():
        body = section.get(component)
        if body is None:
            continue
        body = dict(body)
        type_name = body.pop("type", None)
        if not type_name:
            raise ValueError(
                f"recipe key 'model.{component}' needs a 'type' (a registry {kind} entry)"
            )
        kwargs[component] = type_name
        kwargs[f"{component}_kwargs"] = body
    return kwargs


def _gpt_overrides(section: Mapping[str, Any]) -> dict[str, Any]:
    from mmgpt.config import GPTConfig

    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    return {k: v for k, v in section.items() if k in fields}


def _override_gpt(gpt: Any, overrides: Mapping[str, Any], source: Path) -> Any:
    """``gpt`` with config ``overrides`` (e.g. dropout for fine-tuning), weights kept."""
    from mmgpt.checkpoint import load_model_state, model_state_dict
    from mmgpt.config import GPTConfig
    from mmgpt.model import GPT

    changed = {k: v for k, v in overrides.items() if getattr(gpt.config, k) != v}
    if not changed:
        return gpt
    tuned = GPT(GPTConfig.from_dict({**gpt.config.to_dict(), **changed}))
    try:
        load_model_state(tuned, model_state_dict(gpt), source)
    except ValueError as exc:
        raise ValueError(
            f"model.from={source}: the recipe's model settings {changed} change the shapes of "
            f"its weights ({exc}); drop them or match the saved model"
        ) from exc
    return tuned


def build_multimodal_model(section: Mapping[str, Any], tokenizer: Any = None) -> Any:
    """A :class:`~mmgpt.multimodal.MultimodalGPT` from a recipe's model section.

    - ``from: DIR`` of a multimodal model: that model (its tokenizer, encoder and projector;
      the section's components are not used), with GPT overrides such as ``dropout``.
    - ``from: DIR`` of a text GPT: that GPT and its tokenizer, with the section's encoder and
      projector built around it (LLaVA's start: a pretrained language model).
    - ``preset``: a new GPT of that preset (``vocab_size`` follows ``tokenizer``) + components.
    """
    from mmgpt.checkpoint import read_model_config
    from mmgpt.model import GPT
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.registry import create

    overrides = _gpt_overrides(section)
    components = _components(section)
    if section.get("from"):
        path = Path(section["from"])
        config = read_model_config(path)
        if config.get("architecture") == "multimodal":
            from mmgpt.adapters.training import fold_loaded_adapters

            model = fold_loaded_adapters(MultimodalGPT.from_pretrained(path))
            model.gpt = _override_gpt(model.gpt, overrides, path)
            return model
        from mmgpt.adapters.training import fold_loaded_adapters

        gpt = _override_gpt(fold_loaded_adapters(GPT.from_pretrained(path)), overrides, path)
        tok_config = config.get("tokenizer") or {"name": "bpe"}
        tokenizer = create("tokenizer", tok_config["name"], path=str(path))
        return _build(MultimodalGPT, gpt, tokenizer, components, {})
    if not section.get("preset"):
        raise ValueError("recipe section 'model' needs 'preset' (e.g. gpt-nano) or 'from'")
    if tokenizer is None:
        raise ValueError("a multimodal model built from a preset needs a tokenizer")
    return _build(MultimodalGPT, section["preset"], tokenizer, components, overrides)


def _build(cls: Any, gpt: Any, tokenizer: Any, components: dict[str, Any], overrides: Any) -> Any:
    try:
        return cls.build(gpt, tokenizer, **components, **overrides)
    except TypeError as exc:  # a component argument its registry entry does not take
        names = ", ".join(f"model.{c}.type={components[c]}" for c in COMPONENTS if c in components)
        raise ValueError(f"recipe section 'model' ({names}): {exc}") from exc


def conversation_text(dataset: Any, limit: int = 5000) -> str:
    """The text of a dataset's conversations, rendered like the chat template, for training a
    tokenizer (file datasets: every record, read without loading images; others: the first
    ``limit`` samples)."""
    from mmgpt.data.sample import IMAGE_OUT_PLACEHOLDER, IMAGE_PLACEHOLDER
    from mmgpt.processor import DEFAULT_TEMPLATE as t

    records = getattr(dataset, "records", None)
    if records is not None:
        conversations = [record.data for record in records]
    else:
        conversations = [dataset[i].conversation for i in range(min(len(dataset), limit))]
    lines = []
    for turns in conversations:
        for turn in turns:
            text = turn.text.replace(IMAGE_PLACEHOLDER, "").replace(IMAGE_OUT_PLACEHOLDER, "")
            text = text.strip()
            if turn.role == "user":
                lines.append(f"{t.user_prefix}{text}{t.user_suffix}")
            else:
                lines.append(
                    f"{t.assistant_prefix}{t.assistant_separator}{text}{t.assistant_suffix}"
                )
    return "".join(lines)


def _multimodal_data_source(
    section: dict[str, Any], data: str | os.PathLike | None
) -> tuple[str, dict[str, Any]]:
    """(dataset name, its arguments); ``--data`` switches to the detected file format, keeping
    only the arguments that format takes."""
    from mmgpt.data.check import detect_format
    from mmgpt.registry import get

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
            "an imagefolder directory (metadata.jsonl) or a LLaVA conversation JSON"
        )
    params = _parameters(get("dataset", fmt))
    kept = {k: v for k, v in args.items() if params is None or k in params}
    return fmt, {**kept, "path": str(target)}


def _make_dataset(name: str, args: Mapping[str, Any], image_size: int | None) -> Any:
    from mmgpt.registry import get

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
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(
            f"dataset {name!r} with {args} is not map-style (endless?); give it a size "
            "(e.g. data.size=20000)"
        )
    return dataset


def _split_dataset(dataset: Any, fraction: Any) -> tuple[Any, Any]:
    """(train, held-out) subsets; sample ``i`` is held out when ``is_heldout(i, fraction)``."""
    from torch.utils.data import Subset

    from mmgpt.data.text import is_heldout

    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 <= fraction < 1
    ):
        raise ValueError(f"recipe key 'data.eval_fraction' must be in [0, 1), got {fraction!r}")
    held = [i for i in range(len(dataset)) if is_heldout(i, fraction)]
    if not held:
        return dataset, None
    kept = set(held)
    return Subset(dataset, [i for i in range(len(dataset)) if i not in kept]), Subset(dataset, held)


def _multimodal_tokenizer(
    section: Mapping[str, Any], text_dataset: Any, out_dir: Path, resume: bool
) -> Any:
    """Load ``tokenizer.from``, reuse the run's own on resume, or train one on the data's text."""
    from mmgpt.checkpoint import atomic_write_bytes
    from mmgpt.registry import create

    args = {k: v for k, v in section.items() if k not in ("name", "from")}
    name = section.get("name") or "bpe"
    if section.get("from"):
        # training arguments (vocab_size, min_frequency) do not apply to a loaded tokenizer
        loading = {k: v for k, v in args.items() if k not in ("vocab_size", "min_frequency")}
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


def _run_multimodal(
    spec: dict[str, Any],
    train_config: Any,
    stage: Mapping[str, Any],
    *,
    data: str | os.PathLike | None,
    out_dir: Path,
    resume: bool,
) -> dict[str, Any]:
    """``run_training`` for ``model.architecture: multimodal`` (the caption and vqa recipes)."""
    from mmgpt import distributed
    from mmgpt.adapters.training import apply_adapter
    from mmgpt.registry import create
    from mmgpt.trainer import Trainer, seed_everything

    parts = trainable_parts(stage.get("stage"), stage.get("train_encoder"))
    data_section = dict(spec["data"])
    own = {k: data_section.pop(k) for k in MULTIMODAL_DATA_KEYS if k in data_section}
    dataset_name, dataset_args = _multimodal_data_source(data_section, data)
    spec["data"] = {"name": dataset_name, **dataset_args, **own}
    dataset = _make_dataset(dataset_name, dataset_args, None)  # bad data fails before any write
    out_dir.mkdir(parents=True, exist_ok=True)
    _record_recipe(out_dir / "recipe.yaml", spec, resume)

    model_section = dict(spec["model"])
    if model_section.get("from"):
        if spec["tokenizer"].get("from"):
            raise ValueError(
                "model.from brings the model's own tokenizer; remove tokenizer.from "
                f"(got {spec['tokenizer']['from']!r})"
            )
        tokenizer = None
    else:
        tokenizer = distributed.on_main_process(
            _multimodal_tokenizer, spec["tokenizer"], dataset, out_dir, resume
        )
    seed_everything(train_config.seed)  # model init is part of the reproducible run
    model = build_multimodal_model(model_section, tokenizer)
    model.trainable(parts)
    apply_adapter(model, spec.get("adapter"))  # with an adapter, it decides what trains

    encoder = dict(model.encoders.items()).get("image")
    input_size = getattr(encoder, "input_size", None)
    if input_size and "image_size" in dataset_args and dataset_args["image_size"] is None:
        dataset = _make_dataset(dataset_name, dataset_args, input_size[-1])
    train_data, eval_data = _split_dataset(dataset, own.get("eval_fraction", 0.02))

    objective_section = dict(spec["objective"])
    objective = create("objective", objective_section.pop("name"), **objective_section)
    truncation = bool(own.get("truncation", False))
    build_trainer = getattr(objective, "build_trainer", None)
    if build_trainer is not None:  # reward, dpo, ppo: a reward head, cached references, PPO
        trainer = build_trainer(
            model,
            train_data,
            train_config,
            eval_data=eval_data,
            out_dir=out_dir,
            truncation=truncation,
        )
    else:
        trainer = Trainer(
            model,
            objective,
            train_data,
            train_config,
            eval_data=eval_data,
            collate_fn=model.processor(truncation=truncation),
            out_dir=out_dir,
        )
    result = trainer.fit(resume=resume)
    return {"out_dir": str(out_dir), **result}


# --------------------------------------------------------------------------------------
# python -m mmgpt.recipe
# --------------------------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat or {prefix: {}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmgpt.recipe", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "recipe", help=f"a shipped recipe ({', '.join(recipe_names())}) or a YAML file"
    )
    parser.add_argument("--data", help="training data (glob, directory or file)")
    parser.add_argument("--out", help="output directory (default runs/RECIPE)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=1e-3")
    args = parser.parse_intermixed_args(argv)
    result = run_training(
        args.recipe, data=args.data, out=args.out, resume=args.resume, overrides=args.overrides
    )
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
