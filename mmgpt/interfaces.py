"""Plugin contracts as ``typing.Protocol``s.

A plugin satisfies a contract by shape, not by inheritance (beyond ``nn.Module`` for things
with weights). ``mmgpt.testing`` checks these contracts for any registered entry.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.trainer import TrainConfig, Trainer


@runtime_checkable
class Tokenizer(Protocol):
    """Text ↔ ids. Special tokens: ``<bos> <eos> <pad> <image>`` and signal tokens ``[IMG0]..``."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def save(self, directory: str | Path) -> None: ...
    def config_dict(self) -> dict[str, Any]:
        """What a model's config.json records to rebuild this tokenizer with ``create``."""
        ...


@runtime_checkable
class ModalityEncoder(Protocol):
    """Turns items of one modality into a fixed number of feature vectors each.

    ``num_tokens`` is how many sequence slots one item occupies; the processor expands each
    placeholder into that many slots. ``forward`` maps a preprocessed batch to
    ``(N, num_tokens, output_dim)``. An encoder may also set ``placeholder``, the text that
    marks an item in a conversation (default ``f"<{modality}>"``; images always use
    ``"<image>"``).
    """

    modality: str
    num_tokens: int
    output_dim: int

    def preprocess(self, items: Sequence[Any]) -> torch.Tensor: ...
    def forward(self, inputs: torch.Tensor) -> torch.Tensor: ...
    def config_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class Projector(Protocol):
    """Maps encoder features ``(…, in_dim)`` to the decoder's width ``(…, out_dim)``.

    :class:`~mmgpt.multimodal.MultimodalGPT` builds one with ``create("projector", name,
    in_dim=encoder.output_dim, out_dim=n_embd)``, checks ``in_dim``/``out_dim`` against the
    encoder and the GPT, saves ``config_dict()`` in ``config.json`` and rebuilds the projector
    on load with ``create("projector", name, **config_dict())``. An output projector (signal
    tokens → decoder conditions) may also declare ``num_signal_tokens`` and
    ``num_condition_tokens``: it then maps ``(B, num_signal_tokens, in_dim)`` to
    ``(B, num_condition_tokens, out_dim)``.
    """

    in_dim: int
    out_dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...
    def config_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class OutputDecoder(Protocol):
    """Turns conditioning vectors (from the GPT's signal-token hidden states) into items of one
    output modality (registry kind ``decoder``).

    A model holds at most one decoder per ``modality``. Its signal tokens: ``[IMG0]..`` for
    ``"image"`` (the tokenizer's own), else ``[{signal_prefix}0]..[{signal_prefix}{k-1}]``
    with ``k = num_signal_tokens`` (optional attributes; defaults: the modality's first three
    letters upper-cased, and 4), added to the tokenizer when the model is built. The GPT's
    final hidden states at those ``k`` tokens ``(M, k, n_embd)`` go through the modality's
    output projector into ``condition`` ``(M, num_condition_tokens, condition_dim)``.

    ``training_loss(condition, targets)`` is the decoder's own loss (a scalar) against
    ``targets``, the batch of target items made by ``preprocess(items)`` (the items are what
    the modality's loader ``load`` returns). ``generate(condition, seed=…)`` returns one item
    per row of ``condition``, as the modality's loader ``save(item, path)`` writes it (the
    image decoder takes more sampling options and returns PIL images).
    """

    modality: str
    condition_dim: int
    num_condition_tokens: int

    def preprocess(self, items: Sequence[Any]) -> torch.Tensor: ...
    def training_loss(self, condition: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...
    def generate(self, condition: torch.Tensor, **kwargs: Any) -> Any: ...
    def config_dict(self) -> dict[str, Any]: ...


# The earlier name of the same contract.
ModalityDecoder = OutputDecoder


@runtime_checkable
class ModalityLoader(Protocol):
    """Reads the files of one modality (registry kind ``loader``, registered under the modality's
    name: ``@register("loader", "audio")``).

    ``extensions`` (lower case, with the dot: ``(".wav",)``) are the files it reads; datasets,
    ``mmgpt data check``, ``mmgpt generate --input`` and the chat demo route a file to it by
    modality name or extension. ``load(path)`` returns one item as the modality's encoder's
    ``preprocess`` takes it, or raises ``ValueError`` saying what is wrong; mmgpt checks that
    the file exists and fits ``max_bytes`` first (see :mod:`mmgpt.data.loaders`). Optional:
    ``placeholder`` (default ``f"<{modality}>"``, as the encoder's), ``max_bytes``, and, for an
    output modality, ``save(item, path) -> Path`` (writes an item; the suffix is the loader's).
    """

    modality: str
    extensions: tuple[str, ...]

    def load(self, path: Path) -> Any: ...


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    # number of items the loss averages over (tokens, pairs, …), for exact accumulation
    weight: float = 1.0


@runtime_checkable
class Objective(Protocol):
    """A training objective: the loss of ``model`` on ``batch``."""

    def __call__(self, model: Any, batch: Any) -> ObjectiveOutput: ...


@runtime_checkable
class BuildsTrainer(Objective, Protocol):
    """An objective whose run needs more than the standard loop over ``model``: its own model
    wrapper, collation or precomputed data (reward, DPO, PPO).

    ``mmgpt train`` calls ``build_trainer`` with the recipe's model, data and ``train``
    section instead of building a :class:`~mmgpt.trainer.Trainer` itself, then calls the
    trainer's ``fit``. ``truncation`` is the data section's: cut over-long samples rather than
    reject them.
    """

    def build_trainer(
        self,
        model: MultimodalGPT,
        train_data: Dataset,
        config: TrainConfig | dict[str, Any],
        *,
        eval_data: Dataset | None = None,
        out_dir: str | os.PathLike,
        truncation: bool = False,
    ) -> Trainer: ...


@runtime_checkable
class Adapter(Protocol):
    """Injects trainable parameters into a model and manages them by name."""

    def apply(self, model: Any, name: str = "default") -> Any: ...
