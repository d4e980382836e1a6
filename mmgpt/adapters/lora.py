"""LoRA and DoRA adapters over peft's injection API.

peft's ``inject_adapter_in_model`` wraps the targeted ``nn.Linear`` layers in place, so the
model keeps its own classes and module names; we add what a multimodal model needs on top:
targets by component (decoder, ViT, projector, UNet), several named adapters with switching,
merge/unmerge, a "disabled" context (the RLHF reference model), and adapter-only checkpoints
in the exact format peft's own ``PeftModel.from_pretrained`` reads, plus a fingerprint of the
base weights so an adapter is never silently loaded onto a base it was not trained for.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmgpt.adapters.nf4 import quiet_bitsandbytes_import
from mmgpt.adapters.quantized import is_quantized
from mmgpt.files import atomic_write_bytes, load_tensors, save_tensors
from mmgpt.registry import register

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MMGPT_ADAPTER_META = "mmgpt_adapter.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of every key

# Name patterns (re.fullmatch over full module names) of the Linear layers each component
# exposes. The optional leading "anything." lets the same pattern find a bare GPT's layers and
# those of a GPT inside MultimodalGPT ("gpt.transformer.h.0…").
COMPONENT_TARGETS: dict[str, str] = {
    "decoder": r"(.*\.)?transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)",
    "decoder_attention": r"(.*\.)?transformer\.h\.\d+\.attn\.(c_attn|c_proj)",
    "decoder_mlp": r"(.*\.)?transformer\.h\.\d+\.mlp\.(c_fc|c_proj)",
    "vit": r"(.*\.)?blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",
    "projector": r"(.*\.)?projectors\..*",
    "output_projector": r"(.*\.)?output_projector\..*",
    "unet": r"(.*\.)?attn\d\.(to_q|to_k|to_v|to_out\.0)",
}
# Components whose parameters are trained in full when named in ``train_extra``.
COMPONENT_MODULES: dict[str, str] = {
    "projector": "projectors",
    "output_projector": "output_projector",
    "decoder": "gpt",
    "lm_head": "lm_head",
}


@dataclass
class AdapterConfig:
    """What to adapt and how; saved beside the weights."""

    method: str = "lora"  # lora | dora
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["decoder"])  # components or regexes
    train_extra: list[str] = field(default_factory=list)  # modules trained in full

    def __post_init__(self) -> None:
        if self.method not in ("lora", "dora"):
            raise ValueError(
                f"AdapterConfig.method: expected 'lora' or 'dora', got {self.method!r}"
            )
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"AdapterConfig.r: expected a positive integer rank, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"AdapterConfig.alpha: expected > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(
                f"AdapterConfig.dropout: expected 0 <= dropout < 1, got {self.dropout}"
            )
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.train_extra, str):
            self.train_extra = [t.strip() for t in self.train_extra.split(",") if t.strip()]
        if not self.targets:
            raise ValueError("AdapterConfig.targets: name at least one component or pattern")


@functools.cache
def _peft():
    try:
        with quiet_bitsandbytes_import():  # peft imports bitsandbytes when installed
            import peft
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError('adapters need peft: pip install "mmgpt[adapters]"') from exc
    return peft


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    _peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the ``nn.Linear`` layers matched by component names or regexes."""
    patterns = [re.compile(COMPONENT_TARGETS.get(t, t)) for t in targets]
    found = []
    for name, module in model.named_modules():
        if ".base_layer" in name or "lora_" in name:
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, nn.Linear) and any(p.fullmatch(name) for p in patterns):
            found.append(name)
    if not found:
        raise ValueError(
            f"adapter targets {list(targets)} match no Linear layer of {type(model).__name__}; "
            f"components: {', '.join(COMPONENT_TARGETS)} (or give a regex over module names)"
        )
    return found


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "peft_config", {}) or {})


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default") -> list[str]:
    """Inject a new named adapter; it becomes the active one. Returns the adapted layer names."""
    peft = _peft()
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists on this model; pick another name")
    if any(getattr(m, "merged", False) for m in tuner_layers(model)):
        raise ValueError("unmerge adapters before adding another one")
    modules = resolve_targets(model, config.targets)
    lora_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=modules,
        use_dora=config.method == "dora",
        bias="none",
    )
    with warnings.catch_warnings():
        # peft warns when a second adapter is injected into the same model: that is the point.
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        peft.inject_adapter_in_model(lora_config, model, adapter_name=name)
    model._mmgpt_adapter_configs = {**getattr(model, "_mmgpt_adapter_configs", {}), name: config}
    set_active_adapter(model, name)
    return modules


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Route every adapted layer through ``name``; only its parameters (+ extras) train."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"no adapter {name!r} on this model; adapters: {names or '(none)'}")
    for layer in tuner_layers(model):
        layer.set_adapter(name)
        layer.enable_adapters(True)
    mark_trainable(model, name)


def _extra_prefixes(train_extra: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{COMPONENT_MODULES.get(e, e)}." for e in train_extra)


def mark_trainable(model: nn.Module, name: str) -> None:
    config: AdapterConfig = model._mmgpt_adapter_configs[name]
    extra = _extra_prefixes(config.train_extra)
    for pname, p in model.named_parameters():
        own = f".{name}." in pname and ("lora_" in pname)
        p.requires_grad_(own or (bool(extra) and _under(pname, extra)))


def _under(pname: str, prefixes: tuple[str, ...]) -> bool:
    return any(pname.startswith(p) or f".{p}" in pname for p in prefixes) and "lora_" not in pname


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: the RLHF reference policy without a second copy in memory."""
    layers = tuner_layers(model)
    if any(getattr(m, "merged", False) for m in layers):
        raise ValueError("cannot disable merged adapters; unmerge them first")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merge_adapters(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Fold adapters into the base weights (faster inference); ``unmerge_adapters`` undoes it."""
    _refuse_quantized(model, "merge adapters into")
    names = list(names) if names is not None else [active_adapter(model)]
    for layer in tuner_layers(model):
        layer.merge(adapter_names=names)


def _refuse_quantized(model: nn.Module, action: str) -> None:
    if is_quantized(model):
        raise ValueError(
            f"cannot {action} a quantised base; load the adapter onto the float base model"
        )


def unmerge_adapters(model: nn.Module) -> None:
    for layer in tuner_layers(model):
        layer.unmerge()


def fold_adapters(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Merge adapters (default: the active one) into the base weights and remove every adapter
    layer, leaving a plain model with every parameter trainable again.

    The model then saves and loads like one that never had adapters: what deployment wants,
    and the base a new adapter or a full fine-tune starts from.
    """
    layers = [(n, m) for n, m in model.named_modules() if _is_tuner_layer(m)]
    if not layers:
        raise ValueError("this model has no adapters to fold")
    if any(getattr(m, "merged", False) for _, m in layers):
        raise ValueError("unmerge adapters before folding them (fold merges what it is asked to)")
    _refuse_quantized(model, "fold adapters into")
    names = list(names) if names is not None else [active_adapter(model)]
    unknown = [n for n in names if n not in adapter_names(model)]
    if unknown:
        raise ValueError(
            f"no adapter {unknown[0]!r} on this model; adapters: {adapter_names(model)}"
        )
    for module_name, layer in layers:
        layer.merge(adapter_names=names)
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    for attr in ("peft_config", "_mmgpt_adapter_configs", "_mmgpt_adapter_sources"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.requires_grad_(True)
    return model


def _is_tuner_layer(module: nn.Module) -> bool:
    _peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def active_adapter(model: nn.Module) -> str:
    layers = tuner_layers(model)
    if not layers:
        raise ValueError("this model has no adapters")
    return layers[0].active_adapters[0]


# -- checkpoints ---------------------------------------------------------------------------


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under their original names (adapters stripped, unmerged)."""
    if any(getattr(m, "merged", False) for m in tuner_layers(model)):
        raise ValueError("unmerge adapters before saving the base weights")
    _refuse_quantized(model, "save the weights of")
    tied = set(getattr(model, "tied_weight_keys", []))
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        if key not in tied:
            out[key] = value
    return out


def base_fingerprint(model: nn.Module, exclude: Sequence[str] = ()) -> str:
    """A cheap, order-stable digest of the base weights' names, shapes and values.

    ``exclude``: components (``train_extra`` names) left out: an adapter carries its own copy
    of the modules it trains in full, so they are not part of the base it needs.
    """
    stored = getattr(model, "_mmgpt_base_fingerprints", {}).get(tuple(sorted(exclude)))
    if stored is not None:  # taken before the base was quantised
        return stored
    prefixes = _extra_prefixes(exclude)
    digest = hashlib.sha256()
    for key, value in sorted(base_state_dict(model).items()):
        if prefixes and _under(key, prefixes):
            continue
        v = value.detach().double()
        stats = (v.sum().item(), v.abs().sum().item()) if v.numel() else (0.0, 0.0)
        digest.update(f"{key}:{tuple(v.shape)}:{stats[0]:.6e}:{stats[1]:.6e};".encode())
    return digest.hexdigest()[:32]


def save_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` in peft's own format."""
    peft = _peft()
    name = name or active_adapter(model)
    directory = Path(directory)
    state = peft.get_peft_model_state_dict(model, adapter_name=name)
    config: AdapterConfig = model._mmgpt_adapter_configs[name]
    extra = _extra_prefixes(config.train_extra)
    if extra:  # fully trained extras (e.g. the projector) travel with the adapter
        for key, value in model.state_dict().items():
            key = key.replace(".base_layer.", ".")
            if _under(key, extra):
                state[key] = value
    save_tensors(
        {PEFT_PREFIX + k: v for k, v in state.items()},
        directory / ADAPTER_WEIGHTS,
        metadata={"format": "pt"},
    )
    peft_cfg = model.peft_config[name].to_dict()
    peft_cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_cfg.items()}
    peft_cfg["base_model_name_or_path"] = None
    _write_json(directory / ADAPTER_CONFIG, peft_cfg)
    _write_json(
        directory / MMGPT_ADAPTER_META,
        {
            "name": name,
            "config": config.__dict__,
            "base_fingerprint": base_fingerprint(model, config.train_extra),
        },
    )
    return directory


def load_adapter(
    model: nn.Module, directory: str | Path, name: str | None = None, *, check_base: bool = True
) -> str:
    """Inject and fill an adapter saved by ``save_adapter`` (or by peft for this model)."""
    peft = _peft()
    directory = Path(directory)
    for required in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (directory / required).is_file():
            raise FileNotFoundError(f"{directory}: missing {required} (not an adapter directory)")
    meta_path = directory / MMGPT_ADAPTER_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    fingerprint = meta.get("base_fingerprint")
    extras = (meta.get("config") or {}).get("train_extra") or []
    if check_base and fingerprint and fingerprint != (ours := base_fingerprint(model, extras)):
        raise ValueError(
            f"{directory}: this adapter was trained on a different base model "
            f"(fingerprint {fingerprint} != {ours}); "
            "load it onto the base it was trained from, or pass check_base=False"
        )
    name = name or meta.get("name") or directory.name
    cfg_dict = json.loads((directory / ADAPTER_CONFIG).read_text())
    config = (
        AdapterConfig(**meta["config"])
        if "config" in meta
        else AdapterConfig(
            method="dora" if cfg_dict.get("use_dora") else "lora",
            r=cfg_dict["r"],
            alpha=cfg_dict["lora_alpha"],
            targets=list(cfg_dict["target_modules"]),
        )
    )
    lora_config = peft.LoraConfig(
        r=cfg_dict["r"],
        lora_alpha=cfg_dict["lora_alpha"],
        lora_dropout=cfg_dict.get("lora_dropout", 0.0),
        target_modules=list(cfg_dict["target_modules"]),
        use_dora=bool(cfg_dict.get("use_dora")),
        bias="none",
    )
    if name in adapter_names(model):
        if getattr(model, "_mmgpt_adapter_sources", {}).get(name) == str(directory.resolve()):
            set_active_adapter(model, name)  # already loaded from this very directory
            return name
        raise ValueError(f"adapter {name!r} already exists on this model; pass another name")
    # peft stores a long list of full names as the shortest suffixes that match exactly them
    module_names = [n for n, _ in model.named_modules()]
    missing_targets = [
        t
        for t in sorted(lora_config.target_modules)
        if not any(n == t or n.endswith("." + t) for n in module_names)
    ]
    if missing_targets:
        raise ValueError(
            f"{directory}: adapter targets {missing_targets[:4]} do not exist in this model "
            "(it was trained for a different architecture)"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        peft.inject_adapter_in_model(lora_config, model, adapter_name=name)
    model._mmgpt_adapter_configs = {**getattr(model, "_mmgpt_adapter_configs", {}), name: config}
    state = {
        k.removeprefix(PEFT_PREFIX): v for k, v in load_tensors(directory / ADAPTER_WEIGHTS).items()
    }
    adapter_state = {k: v for k, v in state.items() if "lora_" in k}
    extra_state = {k: v for k, v in state.items() if "lora_" not in k}
    result = peft.set_peft_model_state_dict(model, adapter_state, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS}: unexpected adapter tensors {unexpected[:4]}"
        )
    if extra_state:
        _load_extra(model, extra_state, directory / ADAPTER_WEIGHTS)
    model._mmgpt_adapter_sources = {
        **getattr(model, "_mmgpt_adapter_sources", {}),
        name: str(directory.resolve()),
    }
    set_active_adapter(model, name)
    return name


def _load_extra(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for key, value in state.items():
            target = params.get(key)
            if target is None:
                target = params.get(_to_wrapped_name(key))
            if target is None or target.shape != value.shape:
                raise ValueError(f"{source}: tensor {key!r} does not fit this model")
            target.copy_(value)


def _to_wrapped_name(key: str) -> str:
    module, _, leaf = key.rpartition(".")
    return f"{module}.base_layer.{leaf}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(
        path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()
    )


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# -- registry entries ------------------------------------------------------------------------


class LoraAdapter:
    """Registry entry: ``create("adapter", "lora", r=8).apply(model, name)``."""

    method = "lora"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("method", self.method)
        self.config = AdapterConfig(**kwargs)

    def apply(self, model: nn.Module, name: str = "default") -> nn.Module:
        add_adapter(model, self.config, name)
        return model


class DoraAdapter(LoraAdapter):
    """Weight-decomposed LoRA (DoRA): magnitude and direction adapted separately."""

    method = "dora"


register("adapter", "lora", LoraAdapter)
register("adapter", "dora", DoraAdapter)
