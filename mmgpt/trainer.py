"""The one training loop: model + objective + dataset (+ collate) → trained weights.

Every training flavour of mmgpt (language modelling, multimodal SFT, diffusion, RLHF, LoRA)
is an *objective* run by this loop. The loop owns what is common: AdamW with decoupled weight
decay on matrices only, linear warmup + cosine decay (scaled, and warmed up on their own,
for the parts of a multimodal model named in ``lr_multipliers``/``warmup_steps_by_part``),
gradient accumulation weighted by the objective's ``weight`` (exact token averaging),
global-norm clipping, autocast, evaluation, JSONL/TensorBoard logging, and checkpoints that
resume bit-exactly (weights, optimizer, scheduler, RNG states and the data position; no
pickle).

Scale-out (DDP/FSDP) extends the small hooks: ``_setup_distributed``, ``_wrap_model``,
``_make_loader``, ``_accumulation_context``, ``_reduce_sum``, ``_reduce_metrics``,
``_model_state_dict``, ``_load_model_state``, ``_barrier`` and ``is_main_process``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmgpt import distributed
from mmgpt.checkpoint import (
    capture_rng_state,
    checkpoint_name,
    latest_valid_checkpoint,
    list_checkpoints,
    optimizer_state_from_files,
    optimizer_state_to_files,
    prune_checkpoints,
    restore_rng_state,
    staging_dir,
    verify_checkpoint_dir,
    write_checkpoint_dir,
)
from mmgpt.compiled_step import missing_compiler
from mmgpt.config import from_dict
from mmgpt.data.loader import ResumableLoader
from mmgpt.distributed import STRATEGIES
from mmgpt.files import (
    CorruptCheckpointError,
    atomic_write_bytes,
    exclusive_lock,
    load_tensors,
    remove_stale_temp_dirs,
    save_json,
    save_tensors,
)
from mmgpt.interfaces import Tokenizer
from mmgpt.pretrained import save_model
from mmgpt.registry import create
from mmgpt.weights import load_model_state, model_state_dict

__all__ = [
    "LR_PARTS",
    "TrainConfig",
    "Trainer",
    "check_no_checkpoints",
    "learning_rate",
    "lr_factor",
    "parameter_part",
    "seed_everything",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METRICS_NAME = "metrics.jsonl"
SUPERSEDED_NAME = "metrics.superseded.jsonl"  # records past the step a run resumed from
# Objective metrics that are counts (summed over micro-batches); all others are averaged,
# weighted by each micro-batch's ObjectiveOutput.weight.
SUM_METRICS = frozenset({"tokens", "samples", "pairs"})
STATE_FORMAT = 1
# The parts of a multimodal model that may have their own learning rate (``lr_multipliers``,
# ``warmup_steps_by_part``), each with the attribute its parameters' names go through
# (``encoders.image.model.blocks.0…``); mmgpt.multimodal.PARTS names the same attributes.
LR_PARTS = {
    "encoder": "encoders",
    "projector": "projectors",
    "gpt": "gpt",
    "image_decoder": "image_decoder",
    "output_projector": "output_projector",
}
_PART_OF_ATTRIBUTE = {attribute: part for part, attribute in LR_PARTS.items()}


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyperparameters and run settings of :class:`Trainer` (validated on creation)."""

    lr: float = 3e-4  # peak learning rate, reached after warmup
    min_lr: float = 3e-5  # the cosine ends here at max_steps
    weight_decay: float = 0.1  # on ≥2-D parameters only
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 100
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # samples per micro-batch (per process)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 1337
    eval_every: int = 200  # steps between evaluations; 0: only at the end
    eval_batches: int = 20  # batches per evaluation; 0: the whole eval set
    save_every: int = 500  # steps between checkpoints; 0: only at the end
    keep_last: int = 3  # checkpoints kept on disk
    log_every: int = 10  # steps between metrics.jsonl records
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (bf16/fp16 on CUDA, fp32 on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0  # DataLoader worker processes
    # training batches of similar length: each window of this many batches is sorted by the
    # samples' token length and cut again (less padding; see mmgpt.data.loader); 0: off.
    # Batches alike in length can be alike in content and learn slower (docs/benchmarks.md)
    length_grouping: int = 0
    compile: bool = False  # torch.compile the model (ddp/fsdp: each decoder block)
    strategy: str = "none"  # none | ddp | fsdp (run under torchrun; see docs/distributed.md)
    tensor_parallel: int = 1  # processes each decoder block is split over (fsdp: 2-D mesh)
    activation_checkpointing: bool = False  # recompute decoder blocks in backward
    save_frozen: bool = True  # checkpoints hold frozen weights too (False: trainable + buffers)
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # also log to out_dir/tensorboard when tensorboard is installed
    # Per-part learning rates of a multimodal model (keys: LR_PARTS): the part's lr follows
    # the same schedule scaled by its multiplier (e.g. {"encoder": 0.1}), warming up over
    # its own number of steps when given; parts not named follow lr and warmup_steps.
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    warmup_steps_by_part: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):  # YAML and JSON give lists
            self.betas = tuple(self.betas)
        _check_number(self, "lr", positive=True)
        _check_number(self, "min_lr", minimum=0.0)
        if self.min_lr > self.lr:
            _fail("min_lr", f"must not exceed lr={self.lr}, got {self.min_lr}")
        _check_number(self, "weight_decay", minimum=0.0)
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(_is_number(b) and 0.0 <= b < 1.0 for b in self.betas)
        ):
            _fail("betas", f"expected two numbers in [0, 1), got {self.betas!r}")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "keep_last", "log_every"):
            _check_int(self, name, minimum=1)
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "save_every",
            "num_workers",
            "length_grouping",
        ):
            _check_int(self, name, minimum=0)
        _check_int(self, "seed", minimum=0)
        _check_number(self, "grad_clip", minimum=0.0)
        if self.precision not in PRECISIONS:
            _fail("precision", f"expected one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            _fail("device", f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.strategy not in STRATEGIES:
            _fail("strategy", f"expected one of {STRATEGIES}, got {self.strategy!r}")
        _check_int(self, "tensor_parallel", minimum=1)
        if self.tensor_parallel > 1 and self.strategy != "fsdp":
            _fail("tensor_parallel", f"> 1 needs strategy 'fsdp', got {self.strategy!r}")
        for name in (
            "compile",
            "save_frozen",
            "progress",
            "tensorboard",
            "activation_checkpointing",
        ):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"expected true or false, got {getattr(self, name)!r}")
        for name in ("lr_multipliers", "warmup_steps_by_part"):
            _check_parts(self, name)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, data)


def _fail(name: str, message: str) -> None:
    raise ValueError(f"TrainConfig.{name}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(
    cfg: TrainConfig, name: str, *, positive: bool = False, minimum: float | None = None
) -> None:
    value = getattr(cfg, name)
    if not _is_number(value):
        _fail(name, f"expected a number, got {value!r}")
    if positive and value <= 0:
        _fail(name, f"expected a positive number, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(name, f"expected >= {minimum}, got {value!r}")


def _check_int(cfg: TrainConfig, name: str, *, minimum: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(name, f"expected an integer >= {minimum}, got {value!r}")


def _check_parts(cfg: TrainConfig, name: str) -> None:
    """``lr_multipliers`` (positive numbers) or ``warmup_steps_by_part`` (integers >= 0),
    keyed by the parts of :data:`LR_PARTS`."""
    value = getattr(cfg, name)
    valid = ", ".join(LR_PARTS)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        _fail(name, f"expected a mapping of part to value (parts: {valid}), got {value!r}")
    for part, item in value.items():
        if part not in LR_PARTS:
            close = difflib.get_close_matches(str(part), list(LR_PARTS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(name, f"unknown part {part!r}{hint}; valid parts: {valid}")
        if name == "lr_multipliers":
            if not _is_number(item) or item <= 0:
                _fail(
                    name,
                    f"{part}: expected a positive number, got {item!r} (to keep a part fixed, "
                    "freeze it: train.stage / train.train_encoder)",
                )
        elif not isinstance(item, int) or isinstance(item, bool) or item < 0:
            _fail(name, f"{part}: expected an integer >= 0, got {item!r}")
    setattr(cfg, name, dict(value))


def parameter_part(name: str) -> str | None:
    """The part (a key of :data:`LR_PARTS`) a parameter belongs to, from its name: the first
    component of the dotted name that is a part's attribute, so wrappers (DDP's ``module.``,
    a reward or contrastive model's ``backbone.``) are seen through; None for the rest (a
    text GPT's parameters, heads a wrapper adds)."""
    for component in name.split("."):
        part = _PART_OF_ATTRIBUTE.get(component)
        if part is not None:
            return part
    return None


# --------------------------------------------------------------------------------------
# Schedule and seeding
# --------------------------------------------------------------------------------------


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update after ``step`` completed optimizer steps.

    Linear warmup ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``, then a cosine
    from 1 down to ``min_ratio`` at ``max_steps``: ``min_ratio + (1 - min_ratio) *
    0.5 * (1 + cos(pi * p))`` with ``p = (step - warmup_steps) / (max_steps - warmup_steps)``
    clamped to [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate(step: int, config: TrainConfig, part: str | None = None) -> float:
    """The lr of the update after ``step`` completed steps (what the scheduler sets), for the
    parameters of ``part`` (a key of :data:`LR_PARTS`; None: the others)."""
    return config.lr * _part_factor(step, config, part)


def _part_factor(step: int, config: TrainConfig, part: str | None) -> float:
    """``lr_factor`` with ``part``'s warmup, times its multiplier."""
    factor = lr_factor(
        step,
        warmup_steps=config.warmup_steps_by_part.get(part, config.warmup_steps)
        if part is not None
        else config.warmup_steps,
        max_steps=config.max_steps,
        min_ratio=config.min_lr / config.lr,
    )
    if part is None or part not in config.lr_multipliers:
        return factor
    return config.lr_multipliers[part] * factor


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


@dataclass
class _Accumulator:
    """Sums over the micro-batches of one step (or one evaluation)."""

    weight: float = 0.0
    loss: float = 0.0  # sum of weight * loss
    metrics: dict[str, float] = field(default_factory=dict)  # weighted sums / plain sums

    def add(self, loss: float, weight: float, metrics: dict[str, float]) -> None:
        self.weight += weight
        self.loss += loss * weight
        for key, value in metrics.items():
            if key == "loss":
                continue
            value = float(value)
            self.metrics[key] = self.metrics.get(key, 0.0) + (
                value if key in SUM_METRICS else value * weight
            )

    def sums(self) -> dict[str, float]:
        return {"__weight": self.weight, "__loss": self.loss, **self.metrics}

    @staticmethod
    def result(sums: dict[str, float]) -> dict[str, float]:
        weight = sums["__weight"]
        out = {"loss": sums["__loss"] / weight if weight > 0 else float("nan")}
        for key, value in sums.items():
            if key.startswith("__"):
                continue
            out[key] = value if key in SUM_METRICS else (value / weight if weight > 0 else 0.0)
        return out


class Trainer:
    """Train ``model`` with ``objective`` on ``train_data``.

    Args:
        model: an ``nn.Module``; only parameters with ``requires_grad`` are optimized.
        objective: a callable ``(model, batch) -> ObjectiveOutput``, or a registered name.
        train_data: a map-style dataset (``__len__`` + ``__getitem__``).
        config: a :class:`TrainConfig` (or a dict of its fields).
        eval_data: optional held-out dataset; evaluated every ``eval_every`` steps and at the end.
        collate_fn: list of samples → batch (default: ``torch.utils.data.default_collate``).
        out_dir: where ``metrics.jsonl``, ``checkpoints/`` and the final ``model/`` go.
        save_model_fn: ``fn(model, directory)`` writing the final model directory; default
            ``save_pretrained`` (plus ``tokenizer`` when given).
        tokenizer: saved with the final model when ``save_model_fn`` is not given.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Callable[[Any, Any], Any] | str,
        train_data: Any,
        config: TrainConfig | dict[str, Any],
        *,
        eval_data: Any = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        out_dir: str | os.PathLike,
        save_model_fn: Callable[[nn.Module, Path], None] | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        if isinstance(objective, str):
            objective = create("objective", objective)
        if not callable(objective):
            raise TypeError(f"objective must be callable (model, batch), got {objective!r}")
        self.objective = objective
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.model_dir = self.out_dir / "model"
        self.metrics_path = self.out_dir / METRICS_NAME
        self.save_model_fn = save_model_fn
        self.tokenizer = tokenizer
        self.collate_fn = collate_fn
        self.train_data = train_data
        self.eval_data = eval_data

        self.rank, self.world_size = self._setup_distributed()
        self.device = self._resolve_device()
        self.precision = self._resolve_precision()
        self.model = model.to(self.device)
        self.wrapped_model = self._wrap_model(self.model)
        self.optimizer = self._build_optimizer()
        # one lambda per parameter group: its part's warmup and multiplier
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            [functools.partial(self._lr_lambda, part=part) for part, _ in self._group_specs],
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.train_loader = self._make_loader(train_data, train=True)
        self.eval_loader = None if eval_data is None else self._make_loader(eval_data, train=False)

        self.step = 0
        self.tokens_seen = 0.0  # for throughput: reported target tokens, else input ids
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self._metrics_file: Any = None
        self._tb_writer: Any = None

    # -- hooks for scale-out ----------------------------------------------------------
    def _setup_distributed(self) -> tuple[int, int]:
        """(rank, world_size) of this process; initialises the process group for ddp/fsdp."""
        info = distributed.setup(self.config.strategy, self.config.device)
        self.local_rank = info.local_rank
        return info.rank, info.world_size

    @property
    def data_rank(self) -> int:
        """This process's data-parallel rank: the ranks of a tensor-parallel group read the
        same batches (and share random streams, so replicated dropout agrees)."""
        return self.rank // self.config.tensor_parallel

    @property
    def data_world_size(self) -> int:
        return self.world_size // self.config.tensor_parallel

    @property
    def is_main_process(self) -> bool:
        """Only the main process writes logs, checkpoints and the final model."""
        return self.rank == 0

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        """The module the objective calls (DDP/FSDP wrap here); compiled when asked."""
        cfg = self.config
        if cfg.compile and self.device.type == "cpu":
            missing = missing_compiler()
            if missing is not None:
                # inductor fails only at the first step, deep in its stack: say it up front
                raise RuntimeError(f"train.compile=true: {missing}; set train.compile=false")
        # FSDP shards the model in place: keep a weightless skeleton to write full models
        self._template = distributed.meta_copy(model) if cfg.strategy == "fsdp" else None
        return distributed.wrap_model(
            model,
            strategy=cfg.strategy,
            device=self.device,
            precision=self.precision,
            activation_checkpointing=cfg.activation_checkpointing,
            compile=cfg.compile,
            tensor_parallel=cfg.tensor_parallel,
        )

    def _make_loader(self, dataset: Any, *, train: bool) -> ResumableLoader:
        return ResumableLoader(
            dataset,
            self.config.batch_size,
            shuffle=train,
            drop_last=train,
            seed=self.config.seed,
            collate_fn=self.collate_fn,
            rank=self.data_rank,
            world_size=self.data_world_size,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            length_grouping=self.config.length_grouping if train else 0,
        )

    def _accumulation_context(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Wraps forward + backward of a micro-batch: gradients are only communicated on the
        last one (DDP ``no_sync``, FSDP ``set_requires_gradient_sync(False)`` before)."""
        return distributed.set_gradient_sync(
            self.wrapped_model, self.config.strategy, last_micro_batch
        )

    def _reduce_sum(self, value: float) -> float:
        """Sum of ``value`` over processes."""
        if self.world_size == 1:
            return value
        # a tensor-parallel group holds one data-parallel rank's value tp times
        return distributed.all_reduce_sum([value], self.device)[0] / self.config.tensor_parallel

    def _reduce_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Element-wise sum of metric sums over processes (every rank must have the same keys)."""
        if self.world_size == 1:
            return sums
        keys = sorted(sums)
        # a checksum of the key names catches ranks whose objectives report different metrics
        check = float(zlib.crc32("\0".join(keys).encode()) % (1 << 24))
        *values, total_check = distributed.all_reduce_sum(
            [sums[k] for k in keys] + [check], self.device
        )
        if total_check != check * self.world_size:
            raise RuntimeError(
                f"rank {self.rank}: the objective's metrics differ between processes "
                f"(this rank has {keys}); every rank must report the same metric names"
            )
        tp = self.config.tensor_parallel  # each data-parallel rank's sums counted tp times
        return {k: v / tp for k, v in zip(keys, values, strict=True)}

    def _barrier(self) -> None:
        """Wait for every process (no-op in a single process)."""
        if self.world_size > 1:
            distributed.barrier()

    def _model_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores."""
        state = model_state_dict(self.model)
        if self.config.save_frozen:
            return state
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        return {k: v for k, v in state.items() if k not in frozen}

    def _load_model_state(
        self, state: dict[str, torch.Tensor], source: Path, model: nn.Module | None = None
    ) -> None:
        model = self.model if model is None else model
        if self.config.save_frozen:
            load_model_state(model, state, source)
            return
        expected = model_state_dict(model)
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise ValueError(f"{source}: weights the model does not have: {unexpected[:8]}")
        for key, value in state.items():
            if expected[key].shape != value.shape:
                raise ValueError(
                    f"{source}: tensor {key!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(expected[key].shape)}"
                )
        model.load_state_dict(state, strict=False)

    # -- setup ------------------------------------------------------------------------
    def _resolve_device(self) -> torch.device:
        name = self.config.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device: {name!r} requested but CUDA is not available")
        if name == "cuda" and self.config.strategy != "none":
            name = f"cuda:{getattr(self, 'local_rank', 0)}"  # one GPU per process
        return torch.device(name)

    def _resolve_precision(self) -> str:
        precision = self.config.precision
        cuda = self.device.type == "cuda"
        if precision == "auto":
            if not cuda:
                return "fp32"
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("TrainConfig.precision: bf16 is not supported by this GPU; use fp16")
        if precision == "fp16" and self.config.strategy == "fsdp":
            # the loss scaler would skip steps per shard, not per model
            raise ValueError(
                "TrainConfig.precision: fp16 is not supported with strategy 'fsdp'; use bf16 "
                "(or fp32)"
            )
        return precision

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.wrapped_model.named_parameters() if p.requires_grad]

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on matrices and embeddings (≥2-D), none on biases and norms.

        The parts named in ``lr_multipliers`` or ``warmup_steps_by_part`` get their own pair of
        groups (``"encoder.decay"``, ``"encoder.no_decay"``), after the groups of everything
        else (``"decay"``, ``"no_decay"``); ``self._group_specs`` holds each group's
        ``(part, decays)``.
        """
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
        scheduled = self._scheduled_parts()
        buckets: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
        for name, p in params:
            part = parameter_part(name)
            key = (part if part in scheduled else None, p.dim() >= 2)
            buckets.setdefault(key, []).append(p)
        groups, self._group_specs = [], []
        for part in (None, *scheduled):
            for decays in (True, False):
                group = buckets.get((part, decays))
                if not group:
                    continue
                name = "decay" if decays else "no_decay"
                groups.append(
                    {
                        "params": group,
                        "weight_decay": self.config.weight_decay if decays else 0.0,
                        "name": name if part is None else f"{part}.{name}",
                    }
                )
                self._group_specs.append((part, decays))
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=self.config.betas)

    def _scheduled_parts(self) -> list[str]:
        """The parts with their own lr schedule, in :data:`LR_PARTS` order; a part the model
        does not have is an error naming the config field."""
        cfg = self.config
        named = set(cfg.lr_multipliers) | set(cfg.warmup_steps_by_part)
        if not named:
            return []
        present = {parameter_part(n) for n, _ in self.wrapped_model.named_parameters()}
        for field_name in ("lr_multipliers", "warmup_steps_by_part"):
            missing = sorted(set(getattr(cfg, field_name)) - present)
            if missing:
                have = ", ".join(p for p in LR_PARTS if p in present) or "none"
                _fail(
                    field_name,
                    f"this model ({type(self.model).__name__}) has no {', '.join(missing)} "
                    f"(parameters named {', '.join(LR_PARTS[m] + '.*' for m in missing)}); "
                    f"its parts: {have}",
                )
        return [part for part in LR_PARTS if part in named]

    def _lr_lambda(self, step: int, part: str | None = None) -> float:
        # a bound method, not a stateful object: the schedule always follows the current
        # config (so a resumed run may extend max_steps), and LambdaLR stores nothing for it
        return _part_factor(step, self.config, part)

    def group_lrs(self) -> dict[str, float]:
        """The current lr of each part with its own schedule, as ``{"lr_encoder": …}``."""
        lrs: dict[str, float] = {}
        for (part, _), group in zip(self._group_specs, self.optimizer.param_groups):
            if part is not None:
                lrs.setdefault(f"lr_{part}", group["lr"])
        return lrs

    # -- one optimizer step -----------------------------------------------------------
    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        to = getattr(batch, "to", None)
        if callable(to) and not isinstance(batch, nn.Module):
            # batch objects such as MultimodalBatch move their own tensors
            return to(self.device, non_blocking=True)
        return batch

    def compute_gradients(self, micro_batches: Sequence[Any]) -> dict[str, float]:
        """Accumulate gradients over ``micro_batches``, normalized by the total weight.

        Each micro-batch contributes ``weight * loss`` and the sum is divided by the total
        weight, so the gradient equals that of one batch holding all of them (for ``lm``:
        sum of token losses / number of tokens). Returns the step's metrics.
        """
        self.wrapped_model.train()
        acc = _Accumulator()
        n = len(micro_batches)
        reference = 0.0
        tokens = 0.0  # this process's; summed over processes with the metrics
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            with self._accumulation_context(last_micro_batch=i == n - 1):
                with self._autocast():
                    out = self.objective(self.wrapped_model, batch)
                weight = float(out.weight)
                if not weight >= 0:
                    raise ValueError(f"objective returned weight {weight}; expected >= 0")
                if i == 0:
                    # Backward weight / reference rather than weight: same result after the
                    # final rescale, but gradients keep the size of a mean loss's (fp16 needs
                    # that). Every process must use the same reference.
                    reference = self._reduce_sum(weight) / self.data_world_size or 1.0
                self.scaler.scale(out.loss * (weight / reference)).backward()
            acc.add(float(out.loss.detach()), weight, out.metrics)
            tokens += _count_tokens(out.metrics, batch)
        sums = self._reduce_metrics({**acc.sums(), "__tokens": tokens})
        self.tokens_seen += sums.pop("__tokens")
        self.scaler.unscale_(self.optimizer)
        total = sums["__weight"]
        if total > 0:
            # DDP/FSDP average gradients over the data-parallel ranks: times their number
            # gives the sum
            scale = reference * self.data_world_size / total
            if scale != 1.0:
                for _, p in self.trainable_parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return _Accumulator.result(sums)

    def clip_gradients(self) -> float:
        """Clip to ``grad_clip`` (if > 0); return the global gradient norm before clipping."""
        params = [p for _, p in self.trainable_parameters() if p.grad is not None]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        if not params:
            return 0.0
        # torch's clip_grad_norm_, or per device mesh when tensor parallelism mixes two
        return distributed.clip_grad_norm(params, max_norm)

    def train_step(self, micro_batches: Sequence[Any]) -> dict[str, float]:
        """Gradients, clipping, optimizer and scheduler step; returns the step's metrics."""
        metrics = self.compute_gradients(micro_batches)
        grad_norm = self.clip_gradients()
        lrs = self.group_lrs()
        # the lr of the parameters without a part schedule (the first group when there are any)
        lr = (
            self.optimizer.param_groups[0]["lr"]
            if self._group_specs[0][0] is None
            else self.config.lr * self._lr_lambda(self.scheduler.last_epoch)
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**metrics, "lr": lr, **lrs, "grad_norm": grad_norm}

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Held-out loss (and perplexity for token objectives) on the first batches of eval_data.

        Runs under forked RNG states, so evaluating never changes the training trajectory.
        """
        if self.eval_loader is None:
            return {}
        max_batches = self.config.eval_batches if max_batches is None else max_batches
        was_training = self.wrapped_model.training
        self.wrapped_model.eval()
        acc = _Accumulator()
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = []
        if self.device.type == "cuda":
            index = self.device.index
            devices = [torch.cuda.current_device() if index is None else index]
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.config.seed)
                for batch, counted in self._eval_batches(max_batches):
                    with self._autocast():
                        out = self.objective(self.wrapped_model, self._to_device(batch))
                    if counted:
                        acc.add(float(out.loss), float(out.weight), out.metrics)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            self.wrapped_model.train(was_training)
        result = _Accumulator.result(self._reduce_metrics(acc.sums()))
        if "tokens" in result and math.isfinite(result["loss"]):
            result["perplexity"] = math.exp(min(result["loss"], 700.0))
        return result

    def _eval_batches(self, max_batches: int) -> Iterator[tuple[Any, bool]]:
        """``(batch, counted)``: the first ``max_batches`` eval batches (0: all) of this rank.

        Ranks must run the same number of forwards (FSDP gathers weights in each), but the
        eval split need not divide evenly: a rank with fewer batches repeats its last one
        (or sample 0) uncounted. Together the ranks cover exactly the samples one process
        with ``batch_size * world_size`` would see.
        """
        loader = self.eval_loader
        total = len(loader)
        if self.data_world_size > 1:  # rank 0 holds the most samples of the strided split
            per_rank = len(range(0, loader.num_samples, self.data_world_size))
            total = -(-per_rank // loader.batch_size)
        if max_batches:
            total = min(total, max_batches)
        done, last = 0, None
        for batch in loader.iter_epoch(0):
            if done >= total:
                break
            yield batch, True
            done, last = done + 1, batch
        for _ in range(done, total):
            if last is None:
                last = loader.collate_fn([loader.dataset[0]])
            yield last, False

    # -- the loop ---------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``max_steps``; with ``resume`` continue from the newest valid checkpoint.

        Returns ``{"step", "train": last train metrics, "eval": last eval metrics,
        "model_dir"}``.
        """
        # The lock comes first: a second run must not sweep this one's staging directories.
        lock = exclusive_lock(self.out_dir) if self.is_main_process else contextlib.nullcontext()
        with lock:
            return self._fit(resume)

    def _fit(self, resume: bool) -> dict[str, Any]:
        cfg = self.config
        resumed = self._start(resume)
        if self.is_main_process:
            total = sum(p.numel() for p in self.model.parameters())
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            where = f"resuming at step {self.step}" if resumed else "starting"
            print(
                f"parameters: {trainable:,} trainable / {total:,} total; {where} "
                f"(max_steps={cfg.max_steps}, device={self.device}, precision={self.precision})",
                flush=True,
            )
        bar = self._progress_bar()
        stream = self.train_loader.forever() if self.step < cfg.max_steps else iter(())
        window_tokens, window_start = self.tokens_seen, time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                metrics = self.train_step(self._next_micro_batches(stream))
                bar.update(1)
                step = self.step
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    metrics["tokens_per_s"] = (self.tokens_seen - window_tokens) / elapsed
                    window_tokens, window_start = self.tokens_seen, time.perf_counter()
                    self.last_train = metrics
                    self._log({"step": step, "split": "train", **metrics})
                    shown = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
                    if metrics["tokens_per_s"] > 0:  # objectives without tokens: it/s says it
                        shown["tok_s"] = f"{metrics['tokens_per_s']:.0f}"
                    bar.set_postfix(**shown)
                # eval before save: a checkpoint at step N implies the log up to N is complete
                if self.eval_loader is not None and (
                    (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps
                ):
                    self.last_eval = self.evaluate()
                    self._log({"step": step, "split": "eval", **self.last_eval})
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            self._close_logs()
        self.save_model()
        return {
            "step": self.step,
            "train": self.last_train,
            "eval": self.last_eval,
            "model_dir": str(self.model_dir),
        }

    def _next_micro_batches(self, stream: Iterator[Any]) -> list[Any]:
        return [next(stream) for _ in range(self.config.grad_accum_steps)]

    def _start(self, resume: bool) -> bool:
        """Prepare out_dir, restore or seed state, open the logs. True if resumed."""
        if self.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_dirs(self.out_dir)  # e.g. a final model/ being replaced
            remove_stale_temp_dirs(self.checkpoint_dir)
            if not resume:
                check_no_checkpoints(self.out_dir)
        self._barrier()
        path = None
        if resume:
            if self.is_main_process:
                path = latest_valid_checkpoint(self.checkpoint_dir)
            if self.world_size > 1:  # rank 0 verified (and quarantined); everyone loads that
                path = distributed.broadcast_object(path)
            if path is None and self.is_main_process:
                print(f"no checkpoint in {self.checkpoint_dir}; starting from step 0", flush=True)
        if path is not None:
            self.load_checkpoint(path)
        else:
            self.step = 0
            # distinct streams per process (dropout masks); rank 0's is the single-process one
            seed_everything(self.config.seed + self.data_rank)
        if self.is_main_process:
            self._open_logs(keep_until=self.step if path is not None else None)
        return path is not None

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_{N:08d}`` (atomic, with manifest); keep the last K."""
        self._barrier()
        if self.world_size > 1 or self.config.strategy == "fsdp":
            return self._save_distributed_checkpoint()
        if not self.is_main_process:
            return None
        opt_tensors, opt_meta = optimizer_state_to_files(self.optimizer.state_dict())
        rng_tensors, rng_meta = capture_rng_state()
        target = self.checkpoint_dir / checkpoint_name(self.step)
        try:
            path = write_checkpoint_dir(
                target,
                tensors={
                    "model.safetensors": self._model_state_dict(),
                    "optimizer.safetensors": opt_tensors,
                    "rng.safetensors": rng_tensors,
                },
                json_files={
                    "optimizer.json": opt_meta,
                    "scheduler.json": self._scheduler_state(),
                    "trainer_state.json": self._trainer_state(rng_meta, sharded=False),
                },
                step=self.step,
            )
        except OSError as exc:  # e.g. a full disk: say what survived
            raise OSError(exc.errno, _write_failure(target, self.checkpoint_dir, exc)) from exc
        prune_checkpoints(self.checkpoint_dir, self.config.keep_last)
        return path

    def _trainer_state(self, rng_meta: dict[str, Any], *, sharded: bool) -> dict[str, Any]:
        return {
            "format_version": STATE_FORMAT,
            "step": self.step,
            "data": self.train_loader.state_dict(),
            "rng": rng_meta,  # rank 0's; other ranks' are in rng_rank{r}.*
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "world_size": self.world_size,
            "strategy": self.config.strategy,
            "sharded": sharded,
            "config": self.config.to_dict(),
            "extra": self._extra_state(),
        }

    def _scheduler_state(self) -> dict[str, Any]:
        return {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}

    def _save_distributed_checkpoint(self) -> Path | None:
        """Every rank writes its RNG state (and, for FSDP, its weight and optimizer shards
        with DCP) into one staging directory; rank 0 adds the rest and renames it into place.

        The staging directory must be visible to every rank: on several machines, ``out_dir``
        lives on a shared filesystem.
        """
        final = self.checkpoint_dir / checkpoint_name(self.step)
        staging = staging_dir(final)  # one name every rank knows
        if self.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self._barrier()
        rng_tensors, rng_meta = capture_rng_state()
        if self.rank > 0:
            save_tensors(rng_tensors, staging / f"rng_rank{self.rank}.safetensors")
            atomic_write_bytes(staging / f"rng_rank{self.rank}.json", json.dumps(rng_meta).encode())
        sharded = self.config.strategy == "fsdp"
        if sharded:
            distributed.save_sharded(
                staging / distributed.DCP_DIR,
                self.model,
                self.optimizer,
                exclude=self._excluded_state_keys(),
            )
        self._barrier()
        path = None
        if self.is_main_process:
            # hyperparameters and non-tensor values as JSON (with FSDP the tensors are in dcp/)
            opt_tensors, opt_meta = optimizer_state_to_files(self.optimizer.state_dict())
            tensors = {"rng.safetensors": rng_tensors}
            if sharded:
                distributed.write_model_config(
                    self._template, self.tokenizer, staging / distributed.MODEL_CONFIG_DIR
                )
            else:
                tensors["model.safetensors"] = self._model_state_dict()
                tensors["optimizer.safetensors"] = opt_tensors
            json_files = {
                "optimizer.json": opt_meta,
                "scheduler.json": self._scheduler_state(),
                "trainer_state.json": self._trainer_state(rng_meta, sharded=sharded),
            }
            for name, tensor_dict in tensors.items():
                save_tensors(tensor_dict, staging / name, metadata={"format": "pt"})
            for name, obj in json_files.items():
                save_json(obj, staging / name)
            path = distributed.finalize_checkpoint_dir(staging, final, self.step)
            prune_checkpoints(self.checkpoint_dir, self.config.keep_last)
        self._barrier()
        return path

    def _excluded_state_keys(self) -> set[str]:
        """State-dict keys a sharded checkpoint leaves out: tied aliases (and frozen weights
        when ``save_frozen`` is off)."""
        exclude = set(getattr(self.model, "tied_weight_keys", []))
        if not self.config.save_frozen:
            exclude |= {n for n, p in self.model.named_parameters() if not p.requires_grad}
        return exclude

    def _optimizer_param_names(self) -> list[str]:
        """The name of each parameter of the optimizer, in its state-dict (index) order."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def _verify_checkpoint(self, path: Path) -> None:
        """Check the manifest once (on rank 0); every rank raises the same error."""
        if self.world_size == 1:
            verify_checkpoint_dir(path)
            return
        error = None
        if self.is_main_process:
            try:
                verify_checkpoint_dir(path)
            except (CorruptCheckpointError, OSError) as exc:
                error = str(exc)
        error = distributed.broadcast_object(error)
        if error is not None:
            raise CorruptCheckpointError(error)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore weights, optimizer, scheduler, RNG states, data position and step.

        Any checkpoint loads into any strategy and world size: sharded (FSDP) checkpoints are
        resharded by DCP, full ones are sharded on load; the data position is global.
        """
        path = Path(path)
        self._verify_checkpoint(path)
        state = _read_json(path / "trainer_state.json")
        opt_meta = _read_json(path / "optimizer.json")
        saved_groups = [g.get("name") for g in opt_meta["param_groups"]]
        groups = [g.get("name") for g in self.optimizer.param_groups]
        if len(saved_groups) != len(groups):
            raise ValueError(
                f"{path}: the optimizer has {len(saved_groups)} parameter groups, "
                f"this run {len(groups)} (different trainable parameters, or other "
                "train.lr_multipliers / train.warmup_steps_by_part parts?)"
            )
        if saved_groups != groups and all(saved_groups):
            raise ValueError(
                f"{path}: the optimizer's parameter groups are {saved_groups}, this run's "
                f"{groups}; resume with the train.lr_multipliers and train.warmup_steps_by_part "
                "parts the checkpoint was written with"
            )
        if (path / distributed.DCP_DIR).is_dir():
            distributed.load_sharded(
                path / distributed.DCP_DIR,
                self.model,
                self.optimizer,
                exclude=self._excluded_state_keys(),
            )
        else:
            source = path / "model.safetensors"
            # FSDP: the full weights stay on the CPU; each rank copies its shard to the device
            sharding = self.config.strategy == "fsdp"
            model_state = load_tensors(source, "cpu" if sharding else self.device)
            opt_state = optimizer_state_from_files(
                load_tensors(path / "optimizer.safetensors"), opt_meta
            )
            if sharding:
                with warnings.catch_warnings():  # checking shapes against the meta skeleton
                    warnings.simplefilter("ignore", UserWarning)
                    self._load_model_state(model_state, source, model=self._template)
                distributed.load_full_into_sharded(
                    self.model,
                    self.optimizer,
                    model_state,
                    opt_state,
                    self._optimizer_param_names(),
                )
            else:
                self._load_model_state(model_state, source)
                self.optimizer.load_state_dict(opt_state)
        scheduler_state = _read_json(path / "scheduler.json")
        scheduler_state["lr_lambdas"] = [None] * len(self.optimizer.param_groups)
        self.scheduler.load_state_dict(scheduler_state)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        saved_world = int(state.get("world_size", 1))
        self.train_loader.load_state_dict(self._data_position(state["data"], path))
        self._load_extra_state(state.get("extra") or {})
        self.step = int(state["step"])
        self._apply_config_hyperparameters()
        self._warn_config_changes(path, state.get("config", {}), saved_world)
        self._restore_rng(path, state, saved_world)

    def _data_position(self, saved: dict[str, Any], path: Path) -> dict[str, Any]:
        """The saved position for this loader: ``index`` batches of ``batch_size`` on each of
        ``world_size`` ranks is a global count of samples, the same on any world size."""
        bs, ws = int(saved.get("batch_size", self.config.batch_size)), int(saved["world_size"])
        if (bs, ws) == (self.config.batch_size, self.data_world_size):
            return saved
        consumed = int(saved["index"]) * bs * ws
        global_batch = self.config.batch_size * self.data_world_size
        if consumed % global_batch:
            raise ValueError(
                f"{path}: cannot resume the data position on this layout: {consumed} samples of "
                f"epoch {saved['epoch']} were consumed ({ws} rank(s) x batch_size {bs}), not a "
                f"multiple of {self.data_world_size} rank(s) x batch_size "
                f"{self.config.batch_size}; "
                "keep batch_size x world_size the same (or a divisor of the consumed count)"
            )
        return {
            **saved,
            "index": consumed // global_batch,
            "batch_size": self.config.batch_size,
            "world_size": self.world_size,
        }

    def _restore_rng(self, path: Path, state: dict[str, Any], saved_world: int) -> None:
        """This rank's RNG states; a rank the checkpoint has none for is seeded afresh."""
        if self.rank == 0:
            restore_rng_state(load_tensors(path / "rng.safetensors"), state["rng"])
            if saved_world < self.world_size:
                print(
                    f"{path.name} holds RNG states for {saved_world} process(es); ranks "
                    f">= {saved_world} start new streams",
                    flush=True,
                )
            return
        tensors = path / f"rng_rank{self.rank}.safetensors"
        if tensors.is_file():
            restore_rng_state(load_tensors(tensors), _read_json(tensors.with_suffix(".json")))
        else:
            seed_everything(self.config.seed + self.data_rank + 1_000_003 * self.step)

    def _extra_state(self) -> dict[str, Any]:
        """JSON state a subclass adds to every checkpoint (e.g. PPO's KL controller)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved."""

    def _apply_config_hyperparameters(self) -> None:
        """The current config wins over hyperparameters stored in the optimizer state.

        For an unchanged config this reproduces the stored values exactly (same formula).
        """
        cfg = self.config
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        # what LambdaLR computes: base_lr * lambda(last_epoch), group by group
        lrs = [cfg.lr * fn(self.scheduler.last_epoch) for fn in self.scheduler.lr_lambdas]
        for group, lr, (_, decays) in zip(self.optimizer.param_groups, lrs, self._group_specs):
            group["initial_lr"] = cfg.lr
            group["lr"] = lr
            group["betas"] = cfg.betas
            if decays:
                group["weight_decay"] = cfg.weight_decay
        self.scheduler._last_lr = lrs

    def _warn_config_changes(self, path: Path, saved: dict[str, Any], saved_world: int = 1) -> None:
        neutral = {"max_steps", "eval_every", "eval_batches", "save_every", "keep_last"}
        neutral |= {"log_every", "progress", "tensorboard", "num_workers", "device"}
        # how the work is laid out, not what is computed
        neutral |= {"strategy", "activation_checkpointing", "compile", "tensor_parallel"}
        current = self.config.to_dict()
        if saved.get("batch_size", 0) * saved_world == current["batch_size"] * self.world_size:
            neutral.add("batch_size")  # the same global batch
        changed = sorted(k for k in current if k in saved and saved[k] != current[k])
        changed = [k for k in changed if k not in neutral]
        if changed and self.is_main_process:
            details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
            warnings.warn(
                f"resuming {path.name} with a changed config ({details}); the run will not "
                "match an uninterrupted one",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- final model ------------------------------------------------------------------
    def save_model(self, directory: str | os.PathLike | None = None) -> Path | None:
        """Write the model directory (default ``out_dir/model``) atomically.

        With FSDP every rank must call it: the weights are gathered to rank 0's CPU and
        written from an unsharded copy of the model.
        """
        self._barrier()
        model = self.model
        if self.config.strategy == "fsdp":
            full = distributed.gather_full_state_dict(self.model)  # collective
            if self.is_main_process:
                model = distributed.materialize(self._template, full)
        if not self.is_main_process:
            return None
        target = Path(directory) if directory is not None else self.model_dir
        return save_model(model, target, tokenizer=self.tokenizer, save_fn=self.save_model_fn)

    # -- logging ----------------------------------------------------------------------
    def _open_logs(self, keep_until: int | None) -> None:
        """Open metrics.jsonl; on resume drop records past the resumed step."""
        if keep_until is None:
            self.metrics_path.write_text("")
        else:
            _truncate_metrics(self.metrics_path, keep_until)
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional (the `logging` extra)
                warnings.warn(
                    "train.tensorboard is on but the tensorboard package is not installed "
                    "(pip install 'mmgpt[logging]'); metrics go to metrics.jsonl only",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._tb_writer = None
            else:
                purge = self.step + 1 if keep_until is not None else None
                self._tb_writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main_process or self._metrics_file is None:
            return
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tb_writer is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self._tb_writer.add_scalar(f"{split}/{key}", value, record["step"])

    def _close_logs(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None

    def _progress_bar(self) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=self.config.max_steps,
            initial=self.step,
            desc="train",
            disable=not (self.config.progress and self.is_main_process),
            dynamic_ncols=True,
            file=sys.stderr,
        )


def _count_tokens(metrics: dict[str, float], batch: Any) -> float:
    """The tokens a micro-batch put through the model, for ``tokens_per_s``: the objective's
    own count when it reports one, else the batch's real (unpadded) tokens: its attention
    mask's sum, or all of ``input_ids`` when it has no mask (packed text windows). Batches
    are dicts (text) or objects with the same fields (a multimodal batch)."""
    if "tokens" in metrics:
        return float(metrics["tokens"])

    def member(name: str) -> Any:
        return batch.get(name) if isinstance(batch, dict) else getattr(batch, name, None)

    mask = member("attention_mask")
    if isinstance(mask, torch.Tensor):
        return float(mask.sum())
    ids = member("input_ids")
    return float(ids.numel()) if isinstance(ids, torch.Tensor) else 0.0


def check_no_checkpoints(out_dir: str | os.PathLike) -> None:
    """Refuse to start a fresh run in ``out_dir`` when it holds checkpoints of another run."""
    checkpoint_dir = Path(out_dir) / "checkpoints"
    existing = list_checkpoints(checkpoint_dir)
    if existing:
        raise FileExistsError(
            f"{checkpoint_dir} already holds checkpoints (newest {existing[-1][1].name}); "
            "resume to continue that run (--resume), or choose another output directory"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: unreadable ({exc})") from exc


def _write_failure(target: Path, checkpoint_dir: Path, exc: OSError) -> str:
    """The message of a checkpoint that could not be written: nothing was half-written, and
    the newest complete checkpoint (if any) is what a resume will use."""
    done = [p for _, p in list_checkpoints(checkpoint_dir) if p != target]
    kept = (
        f"the previous checkpoint {done[-1]} is intact; resume from it with --resume"
        if done
        else "no earlier checkpoint exists"
    )
    return f"{target}: could not write the checkpoint ({exc.strerror or exc}); {kept}"


def _truncate_metrics(path: Path, keep_until: int) -> None:
    """Keep the records with ``step <= keep_until`` (and drop a half-written last line); the
    records a resume recomputes are moved to ``metrics.superseded.jsonl``, never lost."""
    if not path.is_file():
        return
    kept, superseded = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= keep_until:
            kept.append(line + "\n")
        else:
            superseded.append(line + "\n")
    if superseded:
        with open(path.with_name(SUPERSEDED_NAME), "a", encoding="utf-8") as f:
            f.writelines(superseded)
    atomic_write_bytes(path, "".join(kept).encode())
