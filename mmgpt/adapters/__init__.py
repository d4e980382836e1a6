"""Parameter-efficient adapters (LoRA, DoRA) over peft, and adapters in model directories.

Adapters work on any ``nn.Module`` and know nothing of mmgpt's model classes; loading a whole
model directory with its adapters, and merging one for deployment, is
:mod:`mmgpt.pretrained`'s job (``load_model``, ``merge_and_save``).
"""

from mmgpt.adapters.directory import adapter_dirs, has_adapters, load_adapters
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
    "has_adapters",
    "load_adapter",
    "load_adapters",
    "merge_adapters",
    "save_adapter",
    "set_active_adapter",
    "trainable_summary",
    "unmerge_adapters",
]
