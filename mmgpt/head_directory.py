"""Directories of a MultimodalGPT *backbone* plus a wrapper's heads: the reward model's scalar
head, the contrastive towers, the tagging heads. Each is the backbone's own model directory
(so ``model.from=DIR`` and ``model.encoder.from=DIR`` read it as any model), plus a
safetensors file of the heads and a JSON config whose ``architecture`` names the wrapper.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from mmgpt.files import atomic_write_bytes, load_tensors, save_tensors
from mmgpt.multimodal import MultimodalGPT

__all__ = ["HeadDirectory", "check_head_state", "read_head_config", "write_head_directory"]


def write_head_directory(
    backbone: MultimodalGPT,
    path: str | Path,
    heads: Mapping[str, Tensor],
    config: Mapping[str, Any],
    *,
    head_name: str,
    config_name: str,
) -> None:
    """``backbone.save_pretrained(path)``, then the heads' tensors and the config beside it."""
    path = Path(path)
    backbone.save_pretrained(path)
    save_tensors(
        {k: v.detach().contiguous() for k, v in heads.items()},
        path / head_name,
        metadata={"format": "pt"},
    )
    atomic_write_bytes(path / config_name, (json.dumps(config, indent=2) + "\n").encode())


def read_head_config(
    path: str | Path, *, config_name: str, architecture: str, what: str, recipe: str
) -> dict[str, Any]:
    """The config of a head directory, checked: present, JSON, of ``architecture``. ``what``
    and ``recipe`` name the directory's kind and how to make one, for the errors."""
    path = Path(path)
    config_path = path / config_name
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path}: no {config_name}; not a {what} directory (train one with `mmgpt train "
            f"{recipe}`)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{config_path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("architecture") != architecture:
        found = config.get("architecture") if isinstance(config, dict) else config
        raise ValueError(f"{config_path}: architecture is {found!r}, expected {architecture!r}")
    return config


def check_head_state(
    file: Path, expected: Mapping[str, Tensor], map_location: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """The tensors of ``file``, which must be exactly ``expected``'s names and shapes."""
    state = load_tensors(file, map_location)
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(
            f"{file}: expected { {k: tuple(v.shape) for k, v in expected.items()} }, got "
            f"{ {k: tuple(v.shape) for k, v in state.items()} }"
        )
    return state


class HeadDirectory:
    """What a wrapper ``nn.Module`` with a ``backbone`` MultimodalGPT and its own heads needs to
    save and load itself as a head directory. A subclass sets the class attributes and
    defines ``config_dict()`` and ``_from_config(backbone, config)``; ``from_pretrained``
    then checks the config, rebuilds the wrapper and loads the heads strictly."""

    head_file: ClassVar[str]  # e.g. "tagging_head.safetensors"
    config_file: ClassVar[str]  # e.g. "tagging_config.json"
    architecture: ClassVar[str]  # the config's "architecture"
    kind: ClassVar[str]  # "tagging model", for the errors
    recipe: ClassVar[str]  # the recipe that trains one, for the errors

    def head_state_dict(self) -> dict[str, Tensor]:
        """Everything but the backbone."""
        state = self.state_dict()  # type: ignore[attr-defined]
        return {k: v for k, v in state.items() if not k.startswith("backbone.")}

    def save_pretrained(self, path: str | Path) -> None:
        """The backbone's directory + the heads' tensors + the config."""
        write_head_directory(
            self.backbone,  # type: ignore[attr-defined]
            path,
            self.head_state_dict(),
            self.config_dict(),  # type: ignore[attr-defined]
            head_name=self.head_file,
            config_name=self.config_file,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
        """Load a directory written by :meth:`save_pretrained` (in eval mode)."""
        path = Path(path)
        config = read_head_config(
            path,
            config_name=cls.config_file,
            architecture=cls.architecture,
            what=cls.kind,
            recipe=cls.recipe,
        )
        backbone = MultimodalGPT.from_pretrained(path, map_location=map_location)
        try:
            model = cls._from_config(backbone, config)  # type: ignore[attr-defined]
        except KeyError as exc:
            raise ValueError(f"{path / cls.config_file}: missing key {exc}") from None
        state = check_head_state(path / cls.head_file, model.head_state_dict(), map_location)
        model.load_state_dict(state, strict=False)  # the backbone is loaded already
        return model.to(map_location).eval()
