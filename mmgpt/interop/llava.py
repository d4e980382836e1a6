"""LLaVA checkpoints and their CLIP / SigLIP vision towers ⇄ mmgpt: configs and tensors only.

Nothing here builds a model or needs ``transformers``; :class:`~mmgpt.multimodal.MultimodalGPT`
and the ``clip`` / ``siglip`` encoders (``mmgpt_vit.hf_towers``) build from what it returns.

**Vision towers.** :func:`read_vision_tower` reads a local Hugging Face directory of a
``CLIPVisionModel`` / ``CLIPModel`` (``model_type`` ``clip_vision_model`` / ``clip``) or a
``SiglipVisionModel`` / ``SiglipModel`` (``siglip_vision_model`` / ``siglip``): the vision
config (transformers' defaults filled in), the image preprocessing of its
``preprocessor_config.json`` (:func:`image_processor_from_hf`) and the vision tensors, named as
transformers 5 names them inside the vision model (``embeddings.*``, ``pre_layrnorm.*``,
``encoder.layers.{i}.*``, ``post_layernorm.*``, ``head.*``; a ``CLIPModel``'s text tower is
left out).

**LLaVA.** :func:`read_llava` reads a ``LlavaForConditionalGeneration`` directory
(``model_type: "llava"``) as the ``config.json`` of an mmgpt multimodal model and its state
dict; :func:`write_llava` writes the reverse. The parts map one to one:

==================================================  ==============================================
Hugging Face ``LlavaForConditionalGeneration``      mmgpt ``MultimodalGPT``
==================================================  ==============================================
``vision_config`` + ``vision_tower.*``              encoder ``clip`` / ``siglip``
                                                    (``encoders.image.*``)
``vision_feature_layer``                            the encoder's ``select_layer``
``vision_feature_select_strategy`` default / full   ``select_feature`` ``patch`` / ``cls_patch``
``multi_modal_projector.linear_1`` / ``linear_2``   projector ``mlp2x_gelu`` (``projectors.image.0``
                                                    / ``.2``; ``projector_hidden_act`` gelu)
``text_config`` + ``language_model.*``              the GPT (``gpt.*``, :mod:`mmgpt.interop.llama`)
``image_token_index`` (``image_token_id``)          the tokenizer's ``<image>`` token
``preprocessor_config.json``                        the encoder's ``image_processor``
==================================================  ==============================================

Tensors are read in every layout transformers has written (``language_model.model.*`` or
``model.language_model.*``; ``vision_tower.vision_model.*`` or ``vision_tower.*``; with or
without a ``model.`` prefix) and written in the one every version loads
(``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*``).

The tokenizer of a LLaVA directory is read with no signal tokens (``num_signal_tokens=0``):
its ``<image>`` token is the image token, so the vocabulary stays the checkpoint's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmgpt.config import CONFIG_NAME, FORMAT_VERSION, GPTConfig, read_model_config
from mmgpt.files import load_json, save_json
from mmgpt.interop.hf_files import read_hf_weights, write_hf_checkpoint
from mmgpt.interop.llama import (
    LLAMA_MODEL_TYPES,
    gpt_config_from_hf,
    gpt_state_to_hf,
    hf_config_from_gpt,
    hf_state_to_gpt,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ACTIVATIONS",
    "IMAGE_PROCESSOR_DEFAULTS",
    "LLAVA_MODEL_TYPE",
    "LLAVA_TOKENIZER",
    "PREPROCESSOR_NAME",
    "TOWER_FAMILIES",
    "VISION_DEFAULTS",
    "LlavaCheckpoint",
    "VisionTower",
    "image_processor_from_hf",
    "image_processor_output_size",
    "image_processor_to_hf",
    "is_llava_config",
    "llava_blockers",
    "read_llava",
    "read_vision_tower",
    "vision_config_from_hf",
    "write_llava",
]

LLAVA_MODEL_TYPE = "llava"
PREPROCESSOR_NAME = "preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"
TOWER_FAMILIES = ("clip", "siglip")
# the tokenizer section of a model read from a LLaVA directory (its <image> is the image token)
LLAVA_TOKENIZER: dict[str, Any] = {"name": "bpe", "num_signal_tokens": 0}

_VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_DUAL_TYPES = {"clip": "clip", "siglip": "siglip"}  # CLIPModel / SiglipModel: vision + text
_HF_VISION_TYPE = {family: model_type for model_type, family in _VISION_TYPES.items()}
_IMAGE_PROCESSOR_TYPES = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}
# the activations the towers compute (transformers' ACT2FN names)
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new")
# transformers' CLIPVisionConfig / SiglipVisionConfig defaults, for fields a config leaves out
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=512,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
    ),
    "siglip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        vision_use_head=True,
    ),
}
# what a saved config holds besides the architecture (dropped on read)
_FILE_KEYS = ("_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version")
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# transformers' CLIPImageProcessor / SiglipImageProcessor defaults
IMAGE_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=3,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    ),
    "siglip": dict(
        do_resize=True,
        size={"height": 224, "width": 224},
        resample=3,
        do_center_crop=False,
        crop_size=None,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    ),
}
# PIL resampling filters the preprocessing implements: nearest (as torchvision's
# nearest-exact), bilinear and bicubic (antialiased, as transformers resizes)
RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
# preprocessor_config.json keys that do not change the pixels
_HARMLESS_KEYS = (
    "image_processor_type",
    "feature_extractor_type",
    "processor_class",
    "input_data_format",
    "data_format",
    "return_tensors",
    "device",
    "disable_grouping",
    "image_seq_length",
)
# top-level module names of a vision tower's state dict
_TOWER_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.", "head.")


# --------------------------------------------------------------------------------------
# Vision towers
# --------------------------------------------------------------------------------------


@dataclass
class VisionTower:
    """What :func:`read_vision_tower` returns."""

    family: str  # "clip" or "siglip"
    vision_config: dict[str, Any]  # the HF vision config, defaults filled, file keys dropped
    image_processor: dict[str, Any]  # normalised preprocessor_config.json
    state: dict[str, torch.Tensor] | None  # tensors named inside the vision model; None: skipped
    source: Path  # the weights file (or index) the tensors came from


def _positive_int(value: Any, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def vision_config_from_hf(
    hf: dict[str, Any], family: str, source: Path | str = CONFIG_NAME
) -> dict[str, Any]:
    """A CLIP or SigLIP vision config (a ``vision_config`` dict) with transformers' defaults
    filled in and the file's own keys (versions, dtype, names) dropped; what the towers cannot
    compute is a ``ValueError`` naming ``source`` and the field."""
    if family not in TOWER_FAMILIES:
        raise ValueError(f"vision tower family must be one of {TOWER_FAMILIES}, got {family!r}")
    config = {k: v for k, v in hf.items() if k not in (*_FILE_KEYS, "model_type")}
    for key, value in VISION_DEFAULTS[family].items():
        if config.get(key) is None:
            config[key] = value
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
    ):
        _positive_int(config[key], source, key)
    if config["num_channels"] != 3:
        raise ValueError(
            f"{source}: num_channels={config['num_channels']} is not supported (the image "
            "preprocessing gives RGB images)"
        )
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ValueError(
            f"{source}: hidden_size={config['hidden_size']} is not divisible by "
            f"num_attention_heads={config['num_attention_heads']}"
        )
    if config["image_size"] < config["patch_size"]:
        raise ValueError(
            f"{source}: image_size={config['image_size']} is smaller than "
            f"patch_size={config['patch_size']}"
        )
    if config["hidden_act"] not in ACTIVATIONS:
        raise ValueError(
            f"{source}: hidden_act {config['hidden_act']!r} is not supported; expected one of "
            f"{', '.join(ACTIVATIONS)}"
        )
    eps = config["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{source}: layer_norm_eps must be a number > 0, got {eps!r}")
    dropout = config["attention_dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{source}: attention_dropout must be in [0, 1), got {dropout!r}")
    if family == "siglip" and not isinstance(config["vision_use_head"], bool):
        raise ValueError(
            f"{source}: vision_use_head must be true or false, got {config['vision_use_head']!r}"
        )
    return config


def _size_dict(value: Any, square: bool, where: str, name: str) -> dict[str, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {name} must be an object, got {value!r}")
    value = {k: v for k, v in value.items() if v is not None}
    if set(value) not in ({"shortest_edge"}, {"height", "width"}):
        raise ValueError(
            f"{where}: {name} {value} is not supported; expected {{'shortest_edge': N}} or "
            "{'height': H, 'width': W}"
        )
    for key, v in value.items():
        _positive_int(v, where, f"{name}.{key}")
    return dict(sorted(value.items()))


def image_processor_from_hf(
    hf: dict[str, Any], family: str, source: Path | str = PREPROCESSOR_NAME
) -> dict[str, Any]:
    """The image preprocessing of a ``preprocessor_config.json`` in one normal form (the
    family's defaults filled in, sizes as dicts): ``do_resize``, ``size``, ``resample``,
    ``do_center_crop``, ``crop_size``, ``do_rescale``, ``rescale_factor``, ``do_normalize``,
    ``image_mean``, ``image_std``, ``do_convert_rgb``. Settings the towers' preprocessing does
    not implement (padding, image splitting, longest-edge sizes, other resampling filters) are
    a ``ValueError`` naming ``source`` and the key."""
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: expected a JSON object")
    defaults = IMAGE_PROCESSOR_DEFAULTS[family]
    out = {k: hf.get(k, v) for k, v in defaults.items()}
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
        if out[key] is None:
            out[key] = defaults[key]
        if not isinstance(out[key], bool):
            raise ValueError(f"{source}: {key} must be true or false, got {out[key]!r}")
    unknown = sorted(
        k for k, v in hf.items() if k not in (*defaults, *_HARMLESS_KEYS, "default_to_square") and v
    )
    if unknown:
        raise ValueError(
            f"{source}: {', '.join(unknown)} not supported by the vision tower's preprocessing "
            f"(it implements {', '.join(defaults)})"
        )
    square = bool(hf.get("default_to_square", family == "siglip"))
    out["size"] = _size_dict(out["size"], square, str(source), "size")
    out["crop_size"] = _size_dict(out["crop_size"], True, str(source), "crop_size")
    if out["crop_size"] is not None and "shortest_edge" in out["crop_size"]:
        raise ValueError(f"{source}: crop_size must be {{'height': H, 'width': W}}")
    if out["resample"] not in RESAMPLE:
        raise ValueError(
            f"{source}: resample={out['resample']!r} is not supported; expected one of "
            f"{sorted(RESAMPLE)} (PIL nearest, bilinear, bicubic)"
        )
    factor = out["rescale_factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"{source}: rescale_factor must be a number > 0, got {factor!r}")
    out["rescale_factor"] = float(factor)
    for key in ("image_mean", "image_std"):
        value = out[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        if not (isinstance(value, list) and len(value) == 3) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"{source}: {key} must be 3 numbers, got {out[key]!r}")
        if key == "image_std" and not all(v > 0 for v in value):
            raise ValueError(f"{source}: image_std must be positive, got {value!r}")
        out[key] = [float(v) for v in value]
    if out["do_resize"] and out["size"] is None:
        raise ValueError(f"{source}: do_resize needs a size")
    if out["do_center_crop"] and out["crop_size"] is None:
        raise ValueError(f"{source}: do_center_crop needs a crop_size")
    return out


def image_processor_output_size(processor: dict[str, Any]) -> tuple[int, int] | None:
    """``(height, width)`` of every preprocessed image, or None when it depends on the image
    (a shortest-edge resize without a centre crop, or no resize at all)."""
    if processor["do_center_crop"]:
        crop = processor["crop_size"]
        return crop["height"], crop["width"]
    size = processor["size"] if processor["do_resize"] else None
    if size is not None and "height" in size:
        return size["height"], size["width"]
    return None


def image_processor_to_hf(processor: dict[str, Any], family: str) -> dict[str, Any]:
    """The ``preprocessor_config.json`` transformers' image processor of ``family`` reads."""
    out = {k: v for k, v in processor.items() if v is not None}
    return {
        **out,
        "image_processor_type": _IMAGE_PROCESSOR_TYPES[family],
        "processor_class": "LlavaProcessor",
    }


def _tower_state(
    raw: dict[str, torch.Tensor], prefixes: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The tensors under one of ``prefixes`` that belong to a vision tower, named inside it
    (a legacy ``vision_model.`` level removed), and the raw keys taken."""
    state: dict[str, torch.Tensor] = {}
    taken: set[str] = set()
    for key, tensor in raw.items():
        for prefix in prefixes:
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :].removeprefix("vision_model.")
            if name == "embeddings.position_ids":  # a buffer old checkpoints store
                taken.add(key)
            elif name.startswith(_TOWER_ROOTS):
                state[name] = tensor
                taken.add(key)
            break
    return state, taken


def read_vision_tower(
    path: str | Path, family: str | None = None, *, weights: bool = True
) -> VisionTower:
    """The vision tower of a local Hugging Face CLIP or SigLIP directory (a vision model or a
    dual-encoder one: ``config.json`` with ``model_type`` ``clip_vision_model``, ``clip``,
    ``siglip_vision_model`` or ``siglip``) and its ``preprocessor_config.json``. ``family``,
    when given, must be the directory's; ``weights=False`` reads the configs only."""
    path = Path(path)
    where = path / CONFIG_NAME
    config = read_model_config(path)
    model_type = config.get("model_type")
    if model_type in _VISION_TYPES:
        found, vision, prefixes = _VISION_TYPES[model_type], config, ("",)
    elif model_type in _DUAL_TYPES:
        found, prefixes = _DUAL_TYPES[model_type], ("vision_model.",)
        vision = config.get("vision_config") or {}
        if not isinstance(vision, dict):
            raise ValueError(f"{where}: vision_config must be an object")
    else:
        known = ", ".join([*_VISION_TYPES, *_DUAL_TYPES])
        hint = " (a LLaVA model: load it with load_model)" if model_type == LLAVA_MODEL_TYPE else ""
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a CLIP or SigLIP model{hint}; "
            f"expected one of {known}"
        )
    if family is not None and found != family:
        raise ValueError(
            f"{where}: a {found} model (model_type {model_type!r}), not a {family} one; "
            f"use the encoder {found!r}"
        )
    vision_config = vision_config_from_hf(vision, found, where)
    processor_path = path / PREPROCESSOR_NAME
    if not processor_path.is_file():
        raise FileNotFoundError(
            f"{processor_path}: not found; a vision tower needs its image preprocessing "
            "(copy preprocessor_config.json from the model's repository)"
        )
    processor = image_processor_from_hf(load_json(processor_path), found, processor_path)
    if not weights:
        return VisionTower(found, vision_config, processor, None, path)
    raw, source = read_hf_weights(path)
    state, _ = _tower_state(raw, prefixes)
    if not state:
        raise ValueError(f"{source}: no vision tower tensors found (expected 'embeddings.*')")
    return VisionTower(found, vision_config, processor, state, source)


# --------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------


@dataclass
class LlavaCheckpoint:
    """What :func:`read_llava` returns: an mmgpt multimodal ``config.json`` (its tokenizer
    section :data:`LLAVA_TOKENIZER`), the state dict in mmgpt's names, the weights file, and
    the id the checkpoint gives its image token."""

    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    source: Path
    image_token_id: int


def is_llava_config(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a Hugging Face LLaVA one."""
    return config.get("model_type") == LLAVA_MODEL_TYPE and "gpt" not in config


def _llava_parts(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields of a LLaVA config.json mmgpt reads, validated."""
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    if text["model_type"] not in LLAMA_MODEL_TYPES:
        raise ValueError(
            f"{where}: text_config.model_type {text['model_type']!r} is not supported; mmgpt "
            f"reads {', '.join(LLAMA_MODEL_TYPES)} language models"
        )
    # transformers ties the head when either config says so
    text["tie_word_embeddings"] = bool(
        hf.get("tie_word_embeddings") or text.get("tie_word_embeddings")
    )
    vision = dict(hf.get("vision_config") or {})
    vision_type = vision.get("model_type", "clip_vision_model")
    if vision_type not in _VISION_TYPES:
        raise ValueError(
            f"{where}: vision_config.model_type {vision_type!r} is not supported; expected one "
            f"of {', '.join(_VISION_TYPES)}"
        )
    family = _VISION_TYPES[vision_type]
    vision_config = vision_config_from_hf(vision, family, f"{where} (vision_config)")
    layer = hf.get("vision_feature_layer", -2)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(
            f"{where}: vision_feature_layer={layer!r} is not supported; mmgpt reads one layer "
            "(an integer), not a concatenation of several"
        )
    depth = vision_config["num_hidden_layers"]
    if not -(depth + 1) <= layer <= depth:
        raise ValueError(
            f"{where}: vision_feature_layer={layer} is out of range for a {depth}-layer tower"
        )
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(
            f"{where}: vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}"
        )
    if family == "siglip" and strategy == "default":
        raise ValueError(
            f"{where}: vision_feature_select_strategy 'default' drops the first token, which a "
            "SigLIP tower (no class token) needs: only 'full' is supported with SigLIP"
        )
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(
            f"{where}: projector_hidden_act {act!r} is not supported; the mlp2x_gelu projector "
            "computes 'gelu'"
        )
    bias = hf.get("multimodal_projector_bias", True)
    if not isinstance(bias, bool):
        raise ValueError(f"{where}: multimodal_projector_bias must be true or false")
    image_token = hf.get("image_token_index", hf.get("image_token_id", 32000))
    if isinstance(image_token, bool) or not isinstance(image_token, int) or image_token < 0:
        raise ValueError(f"{where}: image_token_index must be an integer id, got {image_token!r}")
    return dict(
        text=text,
        family=family,
        vision_config=vision_config,
        layer=layer,
        select_feature="cls_patch" if family == "clip" and strategy == "full" else "patch",
        bias=bias,
        image_token=image_token,
    )


_PROJECTOR = {
    "linear_1.weight": "0.weight",
    "linear_1.bias": "0.bias",
    "linear_2.weight": "2.weight",
    "linear_2.bias": "2.bias",
}
_LM_PREFIXES = ("language_model.model.", "model.language_model.")
_LM_HEADS = ("language_model.lm_head.weight", "lm_head.weight")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
_VISION_PREFIXES = ("vision_tower.", "model.vision_tower.")


def read_llava(path: str | Path) -> LlavaCheckpoint:
    """A local ``LlavaForConditionalGeneration`` directory as an mmgpt multimodal config and
    state dict (see the module docstring); needs its ``preprocessor_config.json``."""
    path = Path(path)
    where = path / CONFIG_NAME
    hf = read_model_config(path)
    if not is_llava_config(hf):
        raise ValueError(f"{where}: model_type is {hf.get('model_type')!r}, not 'llava'")
    parts = _llava_parts(hf, str(where))
    gpt = gpt_config_from_hf(parts["text"], f"{where} (text_config)")
    processor_path = path / PREPROCESSOR_NAME
    if not processor_path.is_file():
        raise FileNotFoundError(
            f"{processor_path}: not found; a LLaVA directory needs its image preprocessing "
            "(copy preprocessor_config.json from the model's repository)"
        )
    processor = image_processor_from_hf(load_json(processor_path), parts["family"], processor_path)
    raw, source = read_hf_weights(path)

    vision, taken = _tower_state(raw, _VISION_PREFIXES)
    language: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key in taken:
            continue
        if key in _LM_HEADS:
            language["lm_head.weight"] = tensor
            continue
        lm_prefix = next((p for p in _LM_PREFIXES if key.startswith(p)), None)
        if lm_prefix is not None:
            language[key[len(lm_prefix) :]] = tensor
            continue
        proj_prefix = next((p for p in _PROJECTOR_PREFIXES if key.startswith(p)), None)
        if proj_prefix is not None and key[len(proj_prefix) :] in _PROJECTOR:
            state[f"projectors.image.{_PROJECTOR[key[len(proj_prefix) :]]}"] = tensor
            continue
        state[key] = tensor  # unknown: the loader names it as unexpected
    state.update({f"encoders.image.{k}": v for k, v in vision.items()})
    state.update({f"gpt.{k}": v for k, v in hf_state_to_gpt(language, gpt, source).items()})

    tower = {
        "vision_config": parts["vision_config"],
        "image_processor": processor,
        "select_layer": parts["layer"],
        "select_feature": parts["select_feature"],
        "trainable": False,
        "source": str(path),
    }
    projector = {
        "in_dim": parts["vision_config"]["hidden_size"],
        "out_dim": gpt.n_embd,
        "depth": 2,
        "bias": parts["bias"],
    }
    config = {
        "architecture": "multimodal",
        "format_version": FORMAT_VERSION,
        "gpt": gpt.to_dict(),
        "tokenizer": dict(LLAVA_TOKENIZER),
        "encoders": {"image": {"name": parts["family"], "config": tower}},
        "projectors": {"image": {"name": "mlp2x_gelu", "config": projector}},
    }
    return LlavaCheckpoint(config, state, source, parts["image_token"])


def llava_blockers(config: dict[str, Any]) -> list[str]:
    """Why an mmgpt multimodal ``config.json`` has no LLaVA equivalent (empty: it has one):
    LLaVA is one image encoder ``clip``/``siglip``, the projector ``mlp2x_gelu`` of depth 2 and
    no image decoder."""
    problems = []
    encoders, projectors = config.get("encoders") or {}, config.get("projectors") or {}
    encoder = encoders.get("image") or {}
    projector = projectors.get("image") or {}
    if set(encoders) != {"image"} or encoder.get("name") not in TOWER_FAMILIES:
        found = {m: e.get("name") for m, e in encoders.items()}
        problems.append(f"the encoders are {found} (LLaVA: one image encoder, clip or siglip)")
    if projector.get("name") != "mlp2x_gelu" or (projector.get("config") or {}).get("depth") != 2:
        problems.append(
            f"the image projector is {projector.get('name')!r} "
            f"{projector.get('config') or {}} (LLaVA: mlp2x_gelu of depth 2)"
        )
    for key in ("image_decoder", "output_projector"):
        if config.get(key):
            problems.append(f"it has an {key} (LLaVA reads images, it does not draw them)")
    return problems


def write_llava(
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    path: str | Path,
    *,
    family: str,
    image_token_id: int,
    image_token: str = "<image>",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Write an mmgpt multimodal model (``state`` in mmgpt's names, ``config`` its
    ``config.json``) as a ``LlavaForConditionalGeneration`` directory: ``config.json``,
    ``model.safetensors``, ``preprocessor_config.json`` and ``processor_config.json``; the
    language model as Hugging Face ``family`` (llama, mistral or qwen2). The tokenizer files are
    the caller's."""
    problems = llava_blockers(config)
    if problems:
        raise ValueError("cannot write a LLaVA checkpoint: " + "; ".join(problems))
    path = Path(path)
    encoder = config["encoders"]["image"]
    tower, tower_family = encoder["config"], encoder["name"]
    vision_config = vision_config_from_hf(tower["vision_config"], tower_family)
    gpt = GPTConfig.from_dict(config["gpt"])
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    text_config = hf_config_from_gpt(gpt, family, **ids)
    text_config.pop("architectures", None)
    feature = tower.get("select_feature", "patch")
    strategy = "default" if tower_family == "clip" and feature == "patch" else "full"
    grid = vision_config["image_size"] // vision_config["patch_size"]
    extra_tokens = 1 if tower_family == "clip" else 0
    num_tokens = grid * grid + (extra_tokens if strategy == "full" else 0)
    projector = config["projectors"]["image"]["config"]
    hf = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": LLAVA_MODEL_TYPE,
        "text_config": text_config,
        "vision_config": {**vision_config, "model_type": _HF_VISION_TYPE[tower_family]},
        "image_token_index": image_token_id,
        "image_seq_length": num_tokens,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": tower.get("select_layer", -2),
        "vision_feature_select_strategy": strategy,
        "multimodal_projector_bias": projector.get("bias", True),
        "tie_word_embeddings": gpt.tie_embeddings,
        **ids,
    }
    gpt_state = {k.removeprefix("gpt."): v for k, v in state.items() if k.startswith("gpt.")}
    hf_state: dict[str, torch.Tensor] = {}
    for key, tensor in gpt_state_to_hf(gpt_state, gpt, family).items():
        if key == "lm_head.weight":
            hf_state["language_model.lm_head.weight"] = tensor
        else:
            hf_state[f"language_model.model.{key.removeprefix('model.')}"] = tensor
    ours = {ours: theirs for theirs, ours in _PROJECTOR.items()}
    for key, tensor in state.items():
        if key.startswith("encoders.image."):
            hf_state[f"vision_tower.vision_model.{key.removeprefix('encoders.image.')}"] = tensor
        elif key.startswith("projectors.image."):
            name = key.removeprefix("projectors.image.")
            if name not in ours:
                raise ValueError(f"no LLaVA projector tensor corresponds to {key!r}")
            hf_state[f"multi_modal_projector.{ours[name]}"] = tensor
        elif not key.startswith("gpt."):
            raise ValueError(f"no LLaVA tensor corresponds to {key!r}")
    hf_state = {k: v.detach() for k, v in hf_state.items()}
    write_hf_checkpoint(hf, hf_state, path)
    save_json(
        image_processor_to_hf(tower["image_processor"], tower_family), path / PREPROCESSOR_NAME
    )
    save_json(
        {
            "processor_class": "LlavaProcessor",
            "image_token": image_token,
            "patch_size": vision_config["patch_size"],
            "vision_feature_select_strategy": strategy,
            "num_additional_image_tokens": extra_tokens,
        },
        path / PROCESSOR_NAME,
    )
