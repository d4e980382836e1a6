"""Model directories of every kind: the one place that decides which model class a directory
holds and that saves, loads, merges and converts whole directories.

Kinds it reads (``config.json`` decides): an mmgpt text model (``"architecture": "gpt"``), an
mmgpt multimodal model (``"multimodal"``), a Hugging Face directory whose ``model_type`` is
one of :data:`mmgpt.interop.HF_MODEL_TYPES` (gpt2, llama, mistral, qwen2), each with the
adapters saved beside it, and a Hugging Face LLaVA directory (``model_type: "llava"``: a
multimodal model, :mod:`mmgpt.interop.llava`). The model classes load
their own layout (``GPT.from_pretrained``, ``MultimodalGPT.from_pretrained``); callers that
do not know which class they face (the CLI, recipes, evaluation, demos) come here.

Every loader returns the model in eval mode; a trainer switches it to train mode.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from mmgpt.adapters.directory import CONFIG_KEY, AdapterChoice, adapter_dirs, has_adapters
from mmgpt.adapters.lora import fold_adapters
from mmgpt.adapters.quantized import check_method, is_quantized
from mmgpt.config import CONFIG_NAME, WEIGHTS_NAME, read_model_config
from mmgpt.files import atomic_directory, save_json
from mmgpt.interfaces import Tokenizer
from mmgpt.interop import hf_family, hf_model_type, is_hf_config, write_hf
from mmgpt.interop.gpt2 import is_hf_gpt2_config, write_hf_gpt2
from mmgpt.interop.llama import LLAMA_MODEL_TYPES
from mmgpt.interop.llava import LLAVA_TOKENIZER, is_llava_config, llava_blockers, write_llava
from mmgpt.model import ARCHITECTURE as GPT_ARCHITECTURE
from mmgpt.model import GPT
from mmgpt.multimodal import ARCHITECTURE as MULTIMODAL_ARCHITECTURE
from mmgpt.multimodal import MultimodalGPT
from mmgpt.quantization import QUANTIZATION_KEY, quantize_model
from mmgpt.registry import create
from mmgpt.weights import model_state_dict

__all__ = [
    "ARCHITECTURES",
    "architecture",
    "export_hf",
    "load_hf_gpt2",
    "load_model",
    "load_tokenizer",
    "merge_and_save",
    "model_config",
    "quantize_directory",
    "require_architecture",
    "resolve_model_dir",
    "save_hf",
    "save_hf_gpt2",
    "save_model",
]

ARCHITECTURES = (GPT_ARCHITECTURE, MULTIMODAL_ARCHITECTURE)
_CLASSES: dict[str, type[nn.Module]] = {
    GPT_ARCHITECTURE: GPT,
    MULTIMODAL_ARCHITECTURE: MultimodalGPT,
}


# A Hugging Face Hub id ("org/name"): downloaded only when named and no such local path exists.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a model directory needs: configs, weights, tokenizer files, chat templates.
HUB_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt")


def resolve_model_dir(name: str | os.PathLike) -> Path:
    """The local directory of a model: ``name`` itself when it exists (mmgpt never downloads
    what is on disk), else, when ``name`` is a Hugging Face Hub id (``org/model``) and
    ``huggingface_hub`` is installed, the snapshot it downloads (configs, safetensors weights
    and tokenizer files only; never pickled weights)."""
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    if not _HUB_ID.fullmatch(text):
        raise FileNotFoundError(f"{text}: not a model directory")
    try:
        from huggingface_hub import snapshot_download  # deferred: optional, needs a network
    except ImportError:
        raise FileNotFoundError(
            f"{text}: not a model directory; to download it from the Hugging Face Hub, "
            "install huggingface_hub (pip install huggingface_hub) or pass a local directory"
        ) from None
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=list(HUB_FILES)))
    except Exception as exc:  # offline, unknown repo, gated model: all say why in their text
        raise OSError(
            f"{text}: not a local directory, and downloading it from the Hugging Face Hub "
            f"failed ({type(exc).__name__}: {exc})"
        ) from exc


def architecture(config: Mapping[str, Any], source: str | os.PathLike = CONFIG_NAME) -> str:
    """The architecture a ``config.json`` describes: ``"gpt"`` (mmgpt text models and Hugging
    Face directories of a supported ``model_type``) or ``"multimodal"`` (mmgpt's, and Hugging
    Face LLaVA directories); anything else is an error naming ``source`` (for a Hugging Face
    config, its model_type and the supported ones)."""
    if is_llava_config(config):
        return MULTIMODAL_ARCHITECTURE
    if is_hf_config(config):
        hf_model_type(config, source)
        return GPT_ARCHITECTURE
    arch = config.get("architecture", GPT_ARCHITECTURE if "gpt" in config else None)
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{source}: not an mmgpt model directory (architecture {arch!r}; expected one of "
            f"{', '.join(ARCHITECTURES)}, or a Hugging Face config with a model_type)"
        )
    return arch


def require_architecture(model_dir: str | os.PathLike, expected: str, purpose: str) -> None:
    """Raise, naming ``purpose`` (e.g. ``"--task caption"``), when ``model_dir`` holds another
    architecture than ``expected``."""
    model_dir = Path(model_dir)
    found = architecture(read_model_config(model_dir), model_dir / CONFIG_NAME)
    if found != expected:
        article = "an" if expected[0] in "aeiou" else "a"
        raise ValueError(
            f"{model_dir}: {purpose} needs {article} {expected} model, this one is {found!r}"
        )


def load_model(
    path: str | os.PathLike,
    *,
    adapter: AdapterChoice = "auto",
    map_location: str = "cpu",
) -> GPT | MultimodalGPT:
    """The model of any directory mmgpt reads (see the module docstring), in eval mode."""
    path = Path(path)
    arch = architecture(read_model_config(path), path / CONFIG_NAME)
    return _CLASSES[arch].from_pretrained(path, map_location=map_location, adapter=adapter)


def load_tokenizer(model_dir: str | os.PathLike, config: Mapping[str, Any] | None = None) -> Any:
    """The tokenizer of a model directory, built by the registry entry its config names."""
    model_dir = Path(model_dir)
    config = read_model_config(model_dir) if config is None else config
    section = config.get("tokenizer")
    if section is None and is_llava_config(config):
        section = dict(LLAVA_TOKENIZER)  # its <image> token is the image token; no additions
    if section is None:
        # A Hugging Face directory has no mmgpt section; its tokenizer.json loads as "bpe".
        if not (model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{model_dir}: no tokenizer (config.json has no 'tokenizer' section and there "
                "is no tokenizer.json)"
            )
        section = {"name": "bpe"}
    if not isinstance(section, dict) or not isinstance(section.get("name"), str):
        raise ValueError(
            f"{model_dir / CONFIG_NAME}: 'tokenizer' must be an object with a 'name', "
            f"got {section!r}"
        )
    args = {k: v for k, v in section.items() if k != "name"}
    return create("tokenizer", section["name"], path=model_dir, **args)


def model_config(model: nn.Module, tokenizer: Tokenizer | None = None) -> dict[str, Any] | None:
    """The ``config.json`` of ``model`` (a text GPT's names ``tokenizer``), or ``None`` for a
    model mmgpt cannot describe."""
    if isinstance(model, GPT):
        return model.config_dict(tokenizer)
    if hasattr(model, "config_dict"):
        return model.config_dict()
    return None


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    save_fn: Callable[[nn.Module, Path], None] | None = None,
) -> Path:
    """Write the model directory ``path`` atomically: it is assembled beside ``path`` and
    swapped in, so ``path`` is always either the previous complete directory or the new one.

    A text GPT records ``tokenizer`` (its config section and files); a multimodal model saves
    its own. ``save_fn(model, staging_dir)`` replaces the default writer (models mmgpt cannot
    describe).
    """
    path = Path(path)
    with atomic_directory(path) as staging:
        if save_fn is not None:
            save_fn(model, staging)
        elif isinstance(model, GPT):
            model.save_pretrained(staging, tokenizer=tokenizer)
        elif hasattr(model, "save_pretrained"):
            model.save_pretrained(staging)
        else:
            raise TypeError(f"{type(model).__name__} has no save_pretrained(); pass save_fn")
        if tokenizer is not None and not isinstance(model, GPT):
            tokenizer.save(staging)
    return path


def merge_and_save(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    adapter: str | None = None,
) -> Path:
    """Write ``out_dir``: the model of ``model_dir`` with ``adapter`` (default: the active one
    its config.json records, else its only adapter) folded into the weights: a plain model
    directory, no ``adapters/``, for deployment (faster: no adapter matmuls at inference).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = read_model_config(model_dir)
    if adapter is None:
        record = config.get(CONFIG_KEY) or {}
        found = adapter_dirs(model_dir)
        adapter = record.get("active") or (next(iter(found)) if len(found) == 1 else None)
        if adapter is None:
            raise ValueError(
                f"{model_dir}: name the adapter to merge (adapters: {', '.join(found) or 'none'})"
            )
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"{out_dir}: write the merged model to another directory")
    model = load_model(model_dir, adapter=adapter)
    fold_adapters(model, [adapter])
    # a text GPT keeps the tokenizer of the directory it came from (mmgpt's or Hugging Face's)
    has_tokenizer = config.get("tokenizer") or (model_dir / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(model_dir, config) if has_tokenizer else None
    return save_model(model, out_dir, tokenizer=tokenizer if isinstance(model, GPT) else None)


def quantize_directory(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str,
    group_size: int | None = None,
) -> dict[str, Any]:
    """Write ``out_dir``: the model of ``model_dir`` with its decoder quantised weight-only
    (:func:`mmgpt.quantization.quantize_model`; adapters are folded in first), a directory
    every loader reads; the function behind ``mmgpt quantize``. Returns a report:
    ``{"out", "method", "group_size", "layers", "weights_bytes_before", "weights_bytes_after"}``.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"{out_dir}: write the quantised model to another directory (--out)")
    config = read_model_config(model_dir)
    if config.get(QUANTIZATION_KEY) is not None:
        raise ValueError(
            f"{model_dir} (--model) is already quantised "
            f"({config[QUANTIZATION_KEY].get('method')}); quantise its float original"
        )
    check_method(method, group_size)  # before the model loads
    model = load_model(model_dir)
    if has_adapters(model):
        fold_adapters(model)  # the active adapter, merged into the weights it then quantises
    record = quantize_model(model, method, group_size)
    has_tokenizer = config.get("tokenizer") or (model_dir / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(model_dir, config) if has_tokenizer else None
    save_model(model, out_dir, tokenizer=tokenizer if isinstance(model, GPT) else None)
    return {
        "out": str(out_dir),
        "method": record["method"],
        "group_size": record["group_size"],
        "layers": len(record["modules"]),
        "weights_bytes_before": _weights_bytes(model_dir / WEIGHTS_NAME),
        "weights_bytes_after": (out_dir / WEIGHTS_NAME).stat().st_size,
    }


def _weights_bytes(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None  # a sharded HF directory: unknown


def load_hf_gpt2(path: str | os.PathLike, map_location: str = "cpu") -> GPT:
    """Load a local Hugging Face GPT-2 directory into a :class:`GPT` (in eval mode)."""
    path = Path(path)
    if not is_hf_gpt2_config(read_model_config(path)):
        raise ValueError(f"{path / CONFIG_NAME}: not a Hugging Face GPT-2 config (model_type)")
    return GPT.from_pretrained(path, map_location=map_location, adapter=None)


def save_hf_gpt2(
    model: GPT,
    path: str | os.PathLike,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Write ``model`` as a Hugging Face GPT-2 directory that ``GPT2LMHeadModel`` loads."""
    write_hf_gpt2(
        model.state_dict(),
        model.config,
        path,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def save_hf(
    model: GPT,
    path: str | os.PathLike,
    *,
    family: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> str:
    """Write ``model`` as a Hugging Face directory that ``AutoModelForCausalLM`` loads, of
    ``family`` (gpt2, llama, mistral, qwen2; default: the one its features call for, see
    :func:`mmgpt.interop.hf_family`); return the family written."""
    return write_hf(
        model.state_dict(),
        model.config,
        path,
        family=family,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def export_hf(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    family: str | None = None,
    adapter: AdapterChoice = "auto",
) -> dict[str, Any]:
    """Write ``out_dir``: the model of ``model_dir`` as a Hugging Face directory that
    transformers loads (the function behind ``mmgpt export``). Adapters (``adapter``: the saved
    ones by default) are merged first.

    Any mmgpt language model exports — trained from scratch or from a Hugging Face start — in
    the family its features call for (``family`` names one explicitly); transformers'
    ``AutoModelForCausalLM`` and ``AutoTokenizer`` load it. A multimodal model whose parts are
    LLaVA's — the image encoder ``clip`` or ``siglip``, the projector ``mlp2x_gelu`` (depth 2)
    and a Llama-family language model (``family``: llama, mistral or qwen2), as a model read
    from a LLaVA directory and any model fine-tuned from one — exports as a LLaVA directory
    that ``LlavaForConditionalGeneration`` and ``AutoProcessor`` load. Of any other multimodal
    model, the language model and tokenizer are exported; the report lists the components
    that have no place in a causal language model (they stay in ``model_dir``). Returns the
    report: ``{"out", "family", "files", "not_exported"}`` (a LLaVA export: family ``llava``,
    and ``text_family``, its language model's).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"{out_dir}: export to another directory than the model's")
    config = read_model_config(model_dir)
    model = load_model(model_dir, adapter=adapter)
    if is_quantized(model):
        raise ValueError(f"{model_dir}: a quantised model does not export; export its original")
    if has_adapters(model):
        fold_adapters(model)  # the active adapter, merged into the weights
    if isinstance(model, MultimodalGPT) and not llava_blockers(model.config_dict()):
        text_family = family or hf_family(model.gpt.config)
        if text_family in LLAMA_MODEL_TYPES:
            return _export_llava(model, out_dir, text_family)
    if isinstance(model, MultimodalGPT):
        language_model, tokenizer = model.gpt, model.tokenizer
        left = [key for key, _ in model.named_children() if key not in ("gpt",)]
        left = [key for key in left if any(True for _ in getattr(model, key).parameters())]
    else:
        language_model, left = model, []
        has_tokenizer = config.get("tokenizer") or (model_dir / "tokenizer.json").is_file()
        tokenizer = load_tokenizer(model_dir, config) if has_tokenizer else None
    ids = _special_ids(tokenizer)
    with atomic_directory(out_dir) as staging:
        written = save_hf(language_model, staging, family=family, **ids)
        files = _write_tokenizer_files(staging, tokenizer, ids)
    return {
        "out": str(out_dir),
        "family": written,
        "files": files,
        "not_exported": left,
    }


def _export_llava(model: MultimodalGPT, out_dir: Path, text_family: str) -> dict[str, Any]:
    """Write ``model`` (LLaVA's parts) as a LLaVA directory with its tokenizer."""
    tokenizer = model.tokenizer
    ids = _special_ids(tokenizer)
    with atomic_directory(out_dir) as staging:
        write_llava(
            model_state_dict(model),
            model.config_dict(),
            staging,
            family=text_family,
            image_token_id=int(tokenizer.image_token_id),
            image_token=getattr(tokenizer, "image_token", "<image>"),
            **ids,
        )
        files = _write_tokenizer_files(staging, tokenizer, ids)
    return {
        "out": str(out_dir),
        "family": "llava",
        "text_family": text_family,
        "files": files,
        "not_exported": [],
    }


def _write_tokenizer_files(
    staging: Path, tokenizer: Tokenizer | None, ids: dict[str, int | None]
) -> list[str]:
    """The tokenizer and ``generation_config.json`` beside exported weights; all the files."""
    if tokenizer is not None:
        tokenizer.save(staging)
    generation = {k: v for k, v in ids.items() if v is not None}
    stops = list(getattr(tokenizer, "stop_ids", None) or [])
    if stops:  # chat models end a turn with their own token(s)
        generation["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    save_json({**generation, "_from_model_config": False}, staging / "generation_config.json")
    return sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())


def _special_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
