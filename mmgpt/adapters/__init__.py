"""Parameter-efficient adapters (LoRA, DoRA) over peft, and adapters in model directories."""

from mmgpt.adapters.directory import (
    adapter_dirs,
    load_adapters,
    load_model_dir,
    merge_and_save,
)
from mmgpt.adapters.lora import (  # importing lora registers "lora" and "dora"
    AdapterConfig,
    adapter_names,
    adapters_disabled,
    add_adapter,
    base_state_dict,
    fold_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapter,
    trainable_summary,
    unmerge_adapters,
)

__all__ = [
    "AdapterConfig",
    "adapter_dirs",
    "adapter_names",
    "adapters_disabled",
    "add_adapter",
    "base_state_dict",
    "fold_adapters",
    "load_adapter",
    "load_adapters",
    "load_model_dir",
    "merge_adapters",
    "merge_and_save",
    "save_adapter",
    "set_active_adapter",
    "trainable_summary",
    "unmerge_adapters",
]
