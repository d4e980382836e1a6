"""Parameter-efficient adapters (LoRA, DoRA) over peft."""

from mmgpt.adapters.lora import (  # noqa: F401  (registers "lora" and "dora")
    AdapterConfig,
    adapter_names,
    adapters_disabled,
    add_adapter,
    base_state_dict,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapter,
    trainable_summary,
    unmerge_adapters,
)
