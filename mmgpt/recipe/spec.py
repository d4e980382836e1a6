"""Recipes: YAML files that name registry entries and set their arguments.

A recipe has the sections

- ``model``: ``preset`` plus :class:`~mmgpt.config.GPTConfig` overrides, or ``from: DIR``;
  with ``architecture: autoencoder`` (``mmgpt train autoencoder``) the ``preset`` names a
  registry ``model`` entry that builds an image autoencoder, the other keys its arguments;
- ``tokenizer``: ``name`` plus training arguments (``vocab_size``, …) or ``from: PATH``;
- ``data``: ``name`` of a dataset entry plus its arguments;
- ``objective``: ``name`` of an objective entry plus its arguments;
- ``train``: :class:`~mmgpt.trainer.TrainConfig` fields;
- ``adapter`` (optional): a LoRA/DoRA adapter on the model (``method``, ``r``, ``alpha``,
  ``targets``…; :mod:`mmgpt.adapters.training`); ``adapter=lora`` is ``adapter.method=lora``;

and an optional ``description``. Shipped recipes live in ``mmgpt/recipes/NAME.yaml``.
``key=value`` overrides address nested keys with dots (``train.lr=1e-3``); values are YAML
scalars. Recipes hold no code: building things is the job of the registry entries they name.

The package is split by job: :mod:`mmgpt.recipe.spec` (this format: loading, overrides,
validation), :mod:`mmgpt.recipe.build` (the parts a recipe names) and
:mod:`mmgpt.recipe.run` (one runner per flavour over one trainer set-up).

``python -m mmgpt.recipe RECIPE [--data PATH] [--out DIR] [--resume] [key=value ...]`` runs one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mmgpt.adapters.training import ADAPTER_KEYS
from mmgpt.config import GPTConfig
from mmgpt.eval.judge_training import JUDGE_SECTION_KEYS
from mmgpt.files import YamlLoader, atomic_write_bytes, parse_scalar
from mmgpt.registry import get
from mmgpt.trainer import TrainConfig

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
SECTIONS = (
    "description",
    "model",
    "tokenizer",
    "data",
    "objective",
    "train",
    "adapter",
    "encoder_pretraining",
    "stages",
)
# ``encoder_pretraining: {recipe: clip, overrides: {...}}``: a run that trains the image encoder
# first (into OUT/encoder_pretraining); this run's encoder starts from its model directory
ENCODER_PRETRAINING_KEYS = ("recipe", "overrides")
# ``stages: {NAME: {recipe keys}, ...}``: a curriculum, the recipe trained once per stage, each
# from the whole model of the one before (mmgpt.recipe.stages); a stage name is a folder name
# Arguments the recipe supplies to a dataset factory (when its signature accepts them).
DATASET_CONTEXT = ("tokenizer", "block_size", "split")
DATA_PATH_ARGS = ("paths", "path", "root")
# judge: an image classifier on labelled images (mmgpt.eval.judge_training), no GPT
# autoencoder: an image autoencoder (a registry `model` entry) on the images of image data
ARCHITECTURES = ("gpt", "multimodal", "judge", "autoencoder")
# Multimodal recipes: model components ({type: registry name, **its arguments}) by the registry
# kind of their type, the recipe-level keys of `train` that choose what trains, and the keys
# of `data` the recipe handles itself (not passed to the dataset).
COMPONENTS = {
    "encoder": "encoder",
    "projector": "projector",
    "image_decoder": "decoder",
    "output_projector": "projector",
}
# Components by modality: ``model.encoders: {image: {type: vit}, audio: {type: spectrogram}}``
# (each encoder with its projector, ``model.projectors.<modality>``, else ``model.projector``);
# output decoders likewise, ``model.decoders: {image: {type: diffusion}, audio: {...}}``, each
# with ``model.output_projectors.<modality>`` (else ``model.output_projector`` for the image,
# ``signal_mlp`` for the others).
MODALITY_COMPONENTS = {
    "encoders": "encoder",
    "projectors": "projector",
    "decoders": "decoder",
    "output_projectors": "projector",
}
STAGES = ("full", "align", "finetune", "decoder")
STAGE_KEYS = ("stage", "train_encoder")
MULTIMODAL_DATA_KEYS = ("eval_fraction", "truncation")
# the file formats `--data` selects for a multimodal recipe (detected from the path)
MULTIMODAL_FORMATS = ("imagefolder", "llava", "parquet", "hf_dataset", "shards")


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
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader)
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
        items = [(str(key), value) for key, value in overrides.items()]
    else:
        items = []
        for item in overrides:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise ValueError(f"override {item!r} is not of the form key=value")
            items.append((key.strip(), value))
    pairs = []
    for key, value in items:
        if isinstance(value, str):
            try:
                value = parse_scalar(value)
            except ValueError as exc:
                raise ValueError(f"override {key!r}: {exc}") from None
        pairs.append((key, value))
    return pairs


def override_keys(overrides: Sequence[str] | Mapping[str, Any]) -> frozenset[str]:
    """The dotted keys ``overrides`` set (``adapter=lora`` sets ``adapter.method``)."""
    keys = (
        overrides
        if isinstance(overrides, Mapping)
        else [str(o).partition("=")[0] for o in overrides]
    )
    return frozenset("adapter.method" if k.strip() == "adapter" else k.strip() for k in keys)


def apply_overrides(
    recipe: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]
) -> dict[str, Any]:
    """Set dotted keys (``["train.lr=1e-3"]`` or ``{"train.lr": "1e-3"}``); validates them.

    An override that changes a model component's ``type`` (``model.encoder.type=clip``)
    replaces that component: the recipe file's arguments belong to the old type and are
    dropped, and the component's other overrides apply to the new one, whatever their order.
    """
    recipe = copy.deepcopy(recipe)
    pairs = _as_pairs(overrides)
    # component types first, so that their arguments land on the new component
    pairs.sort(key=lambda kv: not _is_component_type(kv[0]))
    for key, value in pairs:
        if _is_component_type(key):
            path = key.split(".")[1:-1]  # [component] or [group, modality]
            parent = recipe.get("model", {})
            for part in path[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            body = parent.get(path[-1]) if isinstance(parent, dict) else None
            if isinstance(body, dict) and body.get("type") != value:
                parent[path[-1]] = {}
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


def _is_component_type(key: str) -> bool:
    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "model" and parts[1] in MODALITY_COMPONENTS:
        return parts[3] == "type"
    return len(parts) == 3 and parts[0] == "model" and parts[1] in COMPONENTS and parts[2] == "type"


def section_keys(recipe: dict[str, Any], section: str) -> set[str] | None:
    """Valid keys of a section, or None when any key is accepted."""
    body = recipe.get(section) or {}
    multimodal = recipe_architecture(recipe) == "multimodal"
    if recipe_architecture(recipe) == "judge" and section in JUDGE_SECTION_KEYS:
        return set(JUDGE_SECTION_KEYS[section])
    if section == "adapter":
        return set(ADAPTER_KEYS)
    if section == "stages":
        return None
    if section == "encoder_pretraining":
        if not multimodal:
            raise ValueError(
                "recipe section 'encoder_pretraining' needs model.architecture=multimodal (it "
                "trains the model's encoder first)"
            )
        return set(ENCODER_PRETRAINING_KEYS)
    if section == "train":
        return {f.name for f in dataclasses.fields(TrainConfig)} | (
            set(STAGE_KEYS) if multimodal else set()
        )
    autoencoder = recipe_architecture(recipe) == "autoencoder"
    if section == "model" and autoencoder:
        params = factory_parameters(get("model", body["preset"])) if body.get("preset") else None
        return None if params is None else {"architecture", "preset"} | params
    if section == "model":
        keys = {"architecture", "preset", "from"} | {f.name for f in dataclasses.fields(GPTConfig)}
        return keys | (set(COMPONENTS) | set(MODALITY_COMPONENTS) if multimodal else set())
    kind = {"tokenizer": "tokenizer", "data": "dataset", "objective": "objective"}[section]
    extra = {"name", "from"} if section == "tokenizer" else {"name"}
    image_data = multimodal or autoencoder  # image-text data: --data picks a file format
    if section == "data" and image_data:
        extra |= set(MULTIMODAL_DATA_KEYS)
    name = body.get("name")
    if name is None:
        return None

    params = factory_parameters(get(kind, name))
    if params is None:
        return None
    if section == "data" and image_data:
        # --data may switch a multimodal recipe to a file format: its options are valid too
        for fmt in MULTIMODAL_FORMATS:
            params |= factory_parameters(get("dataset", fmt)) or set()
    hidden = set(DATASET_CONTEXT) if section == "data" else {"path", "files"}
    return extra | (params - hidden)


def factory_parameters(factory: Any) -> set[str] | None:
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
    if parts[0] == "model" and parts[1] in MODALITY_COMPONENTS and len(parts) > 3:
        _check_modality_key(recipe, parts)
        return
    valid = section_keys(recipe, parts[0])
    if valid is not None and parts[1] not in valid:
        close = difflib.get_close_matches(parts[1], sorted(valid), n=1)
        hint = f" (did you mean {parts[0]}.{close[0]}?)" if close else ""
        raise ValueError(
            f"unknown recipe key {dotted!r}{hint}; valid keys of {parts[0]!r}: "
            f"{', '.join(sorted(valid))}"
        )


def _check_component_key(recipe: dict[str, Any], parts: list[str]) -> None:
    """``model.<component>.<key>``: ``type`` or an argument of the registry entry it names."""
    dotted = ".".join(parts)
    component, key = parts[1], parts[2]
    if recipe_architecture(recipe) != "multimodal":
        raise ValueError(
            f"unknown recipe key {dotted!r}: model components need model.architecture=multimodal"
        )
    body = recipe.get("model", {}).get(component)
    type_name = body.get("type") if isinstance(body, Mapping) else None
    if key == "type" or type_name is None or (key == "from" and component == "encoder"):
        return  # ``from``: the model directory whose encoder weights it starts from

    params = factory_parameters(get(COMPONENTS[component], type_name))
    if params is None or key in params:
        return

    close = difflib.get_close_matches(key, sorted(params), n=1)
    hint = f" (did you mean model.{component}.{close[0]}?)" if close else ""
    raise ValueError(
        f"unknown recipe key {dotted!r}{hint}; {COMPONENTS[component]} {type_name!r} takes: "
        f"type, {', '.join(sorted(params))}"
    )


def _check_modality_key(recipe: dict[str, Any], parts: list[str]) -> None:
    """``model.encoders.<modality>.<key>``: ``type`` or an argument of the entry it names."""
    dotted = ".".join(parts)
    group, modality, key = parts[1], parts[2], parts[3]
    if recipe_architecture(recipe) != "multimodal":
        raise ValueError(
            f"unknown recipe key {dotted!r}: model components need model.architecture=multimodal"
        )
    bodies = recipe.get("model", {}).get(group)
    body = bodies.get(modality) if isinstance(bodies, Mapping) else None
    type_name = body.get("type") if isinstance(body, Mapping) else None
    if key == "type" or type_name is None or len(parts) > 4:
        return
    if key == "from" and group == "encoders":
        return
    kind = MODALITY_COMPONENTS[group]
    params = factory_parameters(get(kind, type_name))
    if params is None or key in params:
        return
    close = difflib.get_close_matches(key, sorted(params), n=1)
    hint = f" (did you mean model.{group}.{modality}.{close[0]}?)" if close else ""
    raise ValueError(
        f"unknown recipe key {dotted!r}{hint}; {kind} {type_name!r} takes: "
        f"type, {', '.join(sorted(params))}"
    )


def validate_recipe(recipe: dict[str, Any]) -> None:
    """Check every section and key; an unknown one is an error listing the valid ones."""
    recipe_architecture(recipe)  # an unknown architecture is an error
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
    for group in MODALITY_COMPONENTS:
        bodies = recipe.get("model", {}).get(group)
        if bodies is None:
            continue
        if not isinstance(bodies, dict):
            raise ValueError(
                f"recipe key 'model.{group}' must map modalities to components, e.g. "
                f"{{audio: {{type: NAME, ...}}}}, got {bodies!r}"
            )
        for modality, body in bodies.items():
            if not isinstance(body, dict) or not body.get("type"):
                raise ValueError(
                    f"recipe key 'model.{group}.{modality}' must be a mapping with a 'type' (a "
                    f"registry {MODALITY_COMPONENTS[group]} entry) and its arguments, got {body!r}"
                )
            for key in body:
                _check_key(recipe, ["model", group, str(modality), str(key)])
    for section in ("data", "objective"):
        if not recipe.get(section, {}).get("name"):
            raise ValueError(f"recipe section {section!r} needs a 'name' (a registry entry)")


def recipe_architecture(recipe: Mapping[str, Any]) -> str:
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


def changed_recipe_keys(path: Path, spec: Mapping[str, Any]) -> list[str]:
    """The dotted keys in which ``spec`` differs from the recipe recorded at ``path`` (none
    when nothing is recorded there)."""
    if not path.is_file():
        return []
    before = _flatten(yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader) or {})
    now = _flatten(dict(spec))
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))


def record_recipe(path: Path, spec: dict[str, Any], resume: bool) -> None:
    """Write the resolved recipe next to the run; on resume, warn if it changed."""
    text = yaml.safe_dump(spec, sort_keys=False)
    if resume:
        changed = changed_recipe_keys(path, spec)
        if changed:
            warnings.warn(
                f"resuming {path.parent} with a changed recipe ({', '.join(changed)}); the run "
                "will not match an uninterrupted one",
                RuntimeWarning,
                stacklevel=3,
            )
    atomic_write_bytes(path, text.encode())


def flatten_keys(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{train: {max_steps: 5}}`` → ``{"train.max_steps": 5}`` (overrides as dotted keys)."""
    return {k: v for k, v in _flatten(dict(tree)).items() if k}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.removesuffix("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat or {prefix.removesuffix("."): {}}
