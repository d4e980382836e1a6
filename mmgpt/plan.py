"""``mmgpt plan RECIPE --gpus N``: memory per GPU and step time of a recipe, before renting GPUs.

The model is built on the ``meta`` device (shapes only, no memory), its parameters counted,
and the memory of one GPU estimated for DDP and for FSDP2 from these terms (bytes, ``N`` all
parameters, ``N_t`` the trainable ones, ``G`` GPUs, ``a`` bytes of a compute activation: 2 for
bf16/fp16, 4 for fp32):

* **parameters** ``4 N`` (fp32; they are the master weights, autocast computes in bf16);
  FSDP: ``4 N / G``.
* **gradients** ``4 N_t`` (DDP's buckets are views of them); FSDP ``4 N_t / G``, plus the
  unsharded gradients ``4 N_t`` kept between micro-batches when ``grad_accum_steps > 1``
  (gradient sync is skipped until the last micro-batch).
* **optimizer** AdamW: ``exp_avg`` + ``exp_avg_sq`` = ``8 N_t`` plus a 4-byte ``step`` per
  parameter tensor; FSDP shards the first part (``/ G``).
* **compute copies** with bf16/fp16: DDP keeps an autocast copy of every matmul weight until
  backward, ``2 N_mm``; FSDP all-gathers units in ``a`` bytes: the root unit (embeddings, head,
  encoders) during the whole step plus two decoder blocks (current + prefetched) and one
  block's unsharded gradients.
* **activations** (tensors saved for backward), per sequence of ``T`` tokens, width ``C``,
  ``H`` heads, MLP width ``r C``, fused attention kernels (flash / memory-efficient, no
  ``T x T`` matrix): each decoder block keeps
  ``2 * 4 T C`` (its two norm inputs, the fp32 residual stream)
  ``+ a (6 + 2 r) T C`` (inputs of c_attn and c_fc, q/k/v, the attention output which is also
  c_proj's input, GELU input and output)
  ``+ 16 T + 4 H T`` (norm statistics, attention log-sum-exp);
  dropout > 0 adds two 1-byte masks ``2 T C``. Outside the blocks: the final norm input
  ``4 T C``, the head input ``a T C``, the fp32 log-softmax of the logits ``4 T V`` and the
  token ids. With activation checkpointing a block keeps only its input ``4 T C`` and one
  block is recomputed at a time (its full activations added once). Times the micro-batch.
* **logit gradients** ``8 B T V`` at the start of backward (gradient of the log-softmax and of
  the logits, fp32).

With ``train.tensor_parallel: P`` (FSDP over ``G / P`` data-parallel ranks, each decoder
block split over ``P``: :mod:`mmgpt.tensor_parallel`) the FSDP column is the 2-D layout: the
block projections' parameters, gradients and moments (``N_split``) are divided by ``P`` before
FSDP's ``G / P``, the rest (embeddings, head, norms, encoders) by ``G / P`` only; a block's
activations keep the two replicated projection inputs whole and divide the rest (q/k/v, the
attention output, the MLP hidden states, the attention statistics) by ``P``; the block
FLOPs are divided by ``P``. Each block then all-reduces its ``B x T x C`` output twice forward
and twice backward over the ``P`` ranks (reported, not timed).

A GPU is taken to fit when the total plus 1 GiB (CUDA context, allocator slack) is below its
memory. The step time is ``6 N_mm + 12 L T C`` FLOPs per token (forward + backward of the
matmuls and of attention; ``8 N_mm + 16 L T C`` with checkpointing, which repeats the
forward) at an assumed model-FLOPs utilisation (MFU, default 40%) of the GPU's peak.
Communication is not modelled: FSDP's all-gathers overlap compute on NVLink-class links.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmgpt import registry
from mmgpt.config import CONFIG_NAME, GPT_PRESETS, GPTConfig, gpt_config, read_model_config
from mmgpt.distributed import transformer_blocks
from mmgpt.interop import hf_gpt_config, is_hf_config, is_llava_config
from mmgpt.model import GPT
from mmgpt.multimodal import MultimodalGPT
from mmgpt.pretrained import architecture, resolve_model_dir
from mmgpt.recipe.build import component_kwargs, gpt_overrides, trainable_parts
from mmgpt.recipe.spec import STAGE_KEYS, apply_overrides, load_recipe, recipe_architecture
from mmgpt.tensor_parallel import check_tensor_parallel
from mmgpt.trainer import TrainConfig

__all__ = [
    "DEFAULT_MFU",
    "MemoryEstimate",
    "Plan",
    "activation_bytes",
    "estimate",
    "plan_training",
    "state_bytes",
]

GIB = 1024**3
DEFAULT_MFU = 0.40
CONTEXT_RESERVE = 1 * GIB  # CUDA context + allocator slack assumed per GPU


# --------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------


def block_activation_bytes(
    tokens: int,
    width: int,
    heads: int,
    mlp_ratio: float,
    act: int,
    dropout: bool,
    *,
    kv_heads: int | None = None,
    gated: bool = False,
    rotary: bool = False,
    rmsnorm: bool = False,
    tensor_parallel: int = 1,
) -> float:
    """Bytes one transformer block saves for backward, per sequence (see the module doc).

    The Llama family's features change what is saved: grouped-query attention keeps keys and
    values of ``kv_heads`` heads only; a gated MLP keeps gate, up and their product (4 rather
    than 2 hidden-width tensors); rotary positions keep the rotated halves of q and k; torch's
    RMSNorm keeps its normalised output besides its input (measured with saved-tensor hooks).
    With ``tensor_parallel`` P a rank keeps the inputs of c_attn and c_fc whole and 1 / P of
    everything computed from the split heads and MLP columns.
    """
    T, C = tokens, width
    kv = 1.0 if kv_heads is None else kv_heads / heads
    residual = 2 * 4 * T * C
    attention = 4 + 2 * kv + (2 if rotary else 0)
    mlp = (4 if gated else 2) * mlp_ratio
    replicated = 2  # the inputs of c_attn and c_fc (every TP rank holds them whole)
    matmuls = act * (replicated + (attention - replicated + mlp) / tensor_parallel) * T * C
    stats = 2 * 2 * 4 * T + 4 * heads * T / tensor_parallel
    norms = 2 * 4 * T * C if rmsnorm else 0
    masks = 2 * T * C if dropout else 0
    return residual + matmuls + stats + norms + masks


def head_activation_bytes(
    tokens: int, width: int, vocab: int, act: int, *, rmsnorm: bool = False
) -> float:
    """Bytes saved outside the blocks per sequence: final norm, head input, log-softmax, ids."""
    T, C = tokens, width
    norm = 4 * T * C if rmsnorm else 0
    return 4 * T * C + norm + 2 * 4 * T + act * T * C + 4 * T * vocab + 3 * 8 * T


def activation_bytes(
    config: Any,
    batch_size: int,
    *,
    act: int,
    checkpointing: bool = False,
    tokens: int | None = None,
    tensor_parallel: int = 1,
) -> float:
    """Activations of a micro-batch of the GPT decoder with ``config`` (a GPTConfig), on one
    GPU (with ``tensor_parallel`` P: one rank of a group that computes the micro-batch)."""
    T = config.block_size if tokens is None else tokens
    ratio = config.mlp_hidden / config.n_embd
    rmsnorm = config.norm == "rmsnorm"
    block = block_activation_bytes(
        T,
        config.n_embd,
        config.n_head,
        ratio,
        act,
        dropout=config.dropout > 0,
        kv_heads=config.kv_heads,
        gated=config.gated_mlp,
        rotary=config.pos_encoding == "rotary",
        rmsnorm=rmsnorm,
        tensor_parallel=tensor_parallel,
    )
    head = head_activation_bytes(T, config.n_embd, config.vocab_size, act, rmsnorm=rmsnorm)
    if checkpointing:
        per_sequence = config.n_layer * 4 * T * config.n_embd + block + head
    else:
        per_sequence = config.n_layer * block + head
    return batch_size * per_sequence


def state_bytes(
    n_params: int,
    n_trainable: int,
    n_trainable_tensors: int,
    *,
    strategy: str,
    gpus: int,
    grad_accum_steps: int = 1,
    tensor_parallel: int = 1,
    n_split: int = 0,
    n_split_trainable: int = 0,
) -> dict[str, float]:
    """Parameter, gradient and AdamW-state bytes on one GPU (exact for DDP; FSDP: ``/ G``).

    ``tensor_parallel`` P > 1 (FSDP only): ``n_split`` (``n_split_trainable``) of the
    parameters are the decoder blocks' projections, divided by P; FSDP shards over ``G / P``.
    """
    tp = tensor_parallel
    if tp > 1 and strategy != "fsdp":
        raise ValueError(f"tensor_parallel={tp} needs strategy 'fsdp', got {strategy!r}")
    shards = gpus // tp if strategy == "fsdp" else 1
    params = n_params - n_split + n_split / tp  # what one TP rank holds before FSDP
    trainable = n_trainable - n_split_trainable + n_split_trainable / tp
    grads = 4 * trainable / shards
    if strategy == "fsdp" and grad_accum_steps > 1:
        grads += 4 * trainable  # unsharded gradients held until the last micro-batch
    return {
        "parameters": 4 * params / shards,
        "gradients": grads,
        "optimizer": 8 * trainable / shards + 4 * n_trainable_tensors,
    }


# --------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes per GPU for one strategy."""

    strategy: str
    parameters: float
    gradients: float
    optimizer: float
    compute_copies: float
    activations: float
    logit_gradients: float

    @property
    def total(self) -> float:
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.compute_copies
            + self.activations
            + self.logit_gradients
        )

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total + CONTEXT_RESERVE <= gpu_memory_gb * 1e9


@dataclass
class Plan:
    """What :func:`plan_training` reports, as numbers."""

    recipe: str
    gpus: int
    gpu_memory_gb: float | None
    n_params: int
    n_trainable: int
    n_matmul: int  # parameters of matrix multiplications (FLOPs per token ~ 6 x this)
    config: Any  # the decoder's GPTConfig
    batch_size: int
    grad_accum_steps: int
    precision: str
    checkpointing: bool
    ddp: MemoryEstimate
    fsdp: MemoryEstimate
    fsdp_checkpointed: MemoryEstimate
    flops_per_step: float  # per GPU
    step_seconds: float | None
    mfu: float
    notes: list[str] = field(default_factory=list)
    tensor_parallel: int = 1  # the FSDP estimates are then the (G / P) x P layout's


def _units(model: nn.Module) -> tuple[int, int]:
    """(parameters of the largest decoder block, parameters outside the blocks)."""
    blocks = transformer_blocks(model)
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = sum(p.numel() for p in model.parameters())
    return (max(sizes) if sizes else 0), total - sum(sizes)


def _matmul_params(model: nn.Module) -> tuple[int, int]:
    """(decoder matmul parameters incl. the head, encoder matmul parameters)."""
    gpt = next((m for m in model.modules() if isinstance(m, GPT)), None)
    decoder = 0
    if gpt is not None:
        decoder = sum(m.weight.numel() for m in gpt.modules() if isinstance(m, nn.Linear))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return decoder, total - decoder


def _split_params(model: nn.Module) -> tuple[int, int, int]:
    """(parameters, trainable parameters, matmul weights) that tensor parallelism splits: the
    block projections, less the row-wise layers' biases (replicated)."""
    split = trainable = matmul = 0
    for block in transformer_blocks(model):
        for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            matmul += linear.weight.numel()
            for name, p in linear.named_parameters():
                if name == "bias" and linear in (block.attn.c_proj, block.mlp.c_proj):
                    continue
                split += p.numel()
                trainable += p.numel() if p.requires_grad else 0
    return split, trainable, matmul


def estimate(
    model: nn.Module,
    config: Any,
    *,
    gpus: int,
    batch_size: int,
    grad_accum_steps: int = 1,
    precision: str = "bf16",
    checkpointing: bool = False,
    gpu_memory_gb: float | None = None,
    flops: float | None = None,
    mfu: float = DEFAULT_MFU,
    encoder_tokens: int = 0,
    recipe: str = "",
    tensor_parallel: int = 1,
) -> Plan:
    """Estimate memory and step time for ``model`` (any device, meta is fine); with
    ``tensor_parallel`` P > 1 the FSDP estimates are those of FSDP x P-way TP."""
    if gpus < 1:
        raise ValueError(f"gpus: expected a positive integer, got {gpus}")
    tp = tensor_parallel
    if tp > 1:
        check_tensor_parallel(model, tp, gpus)  # whole heads, and P divides the GPUs
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu: expected a fraction in (0, 1], got {mfu}")
    act = 4 if precision == "fp32" else 2
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_dec, n_enc = _matmul_params(model)
    block, root = _units(model)
    n_split, n_split_trainable, n_split_mm = _split_params(model) if tp > 1 else (0, 0, 0)

    def memory(strategy: str, ckpt: bool) -> MemoryEstimate:
        p = tp if strategy == "fsdp" else 1
        states = state_bytes(
            n_params,
            n_trainable,
            len(trainable),
            strategy=strategy,
            gpus=gpus,
            grad_accum_steps=grad_accum_steps,
            tensor_parallel=p,
            n_split=n_split if p > 1 else 0,
            n_split_trainable=n_split_trainable if p > 1 else 0,
        )
        if strategy == "ddp":
            copies = 2 * (n_dec + n_enc) if act == 2 else 0.0
        else:
            copies = act * (root + 2 * block / p) + 4 * block / p
        activations = activation_bytes(
            config, batch_size, act=act, checkpointing=ckpt, tensor_parallel=p
        )
        logits = 8 * batch_size * config.block_size * config.vocab_size
        return MemoryEstimate(
            strategy,
            **states,
            compute_copies=copies,
            activations=activations,
            logit_gradients=logits,
        )

    T, L, C = config.block_size, config.n_layer, config.n_embd
    # per GPU: the split projections' and attention's work is shared by the TP group
    n_dec_gpu = n_dec - n_split_mm + n_split_mm / tp
    per_token = (8 if checkpointing else 6) * n_dec_gpu
    per_token += (16 if checkpointing else 12) * L * T * C / tp
    tokens = batch_size * grad_accum_steps * T
    step_flops = per_token * tokens + 6 * n_enc * encoder_tokens * batch_size * grad_accum_steps
    seconds = step_flops / (flops * 1e12 * mfu) if flops else None
    notes = []
    if config.dropout > 0:
        notes.append(
            f"dropout={config.dropout}: attention dropout can fall back to the unfused attention "
            "kernel, which also stores B x H x T x T probabilities (not included)"
        )
    if tp > 1:
        volume = 4 * L * batch_size * T * C * act * grad_accum_steps
        notes.append(
            f"tensor_parallel={tp}: each GPU all-reduces {volume / GIB:.3g} GiB of activations "
            f"per step within its group of {tp} (keep a group on one NVLink-connected machine)"
        )
    return Plan(
        recipe=recipe,
        gpus=gpus,
        gpu_memory_gb=gpu_memory_gb,
        n_params=n_params,
        n_trainable=n_trainable,
        n_matmul=n_dec + n_enc,
        config=config,
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        precision=precision,
        checkpointing=checkpointing,
        ddp=memory("ddp", checkpointing),
        fsdp=memory("fsdp", checkpointing),
        fsdp_checkpointed=memory("fsdp", True),
        flops_per_step=step_flops,
        step_seconds=seconds,
        mfu=mfu,
        notes=notes,
        tensor_parallel=tp,
    )


# --------------------------------------------------------------------------------------
# From a recipe
# --------------------------------------------------------------------------------------


@dataclass
class _ShapeTokenizer:
    """Stands in for a tokenizer when only its vocabulary size matters (planning)."""

    vocab_size: int
    num_signal_tokens: int = 8

    @property
    def image_token_id(self) -> int:
        return 0

    @property
    def signal_token_ids(self) -> list[int]:
        return list(range(1, 1 + self.num_signal_tokens))

    def token_to_id(self, token: str) -> int:
        return 0


def _vocab_size(spec: Mapping[str, Any], preset_vocab: int) -> int:
    model, tok = spec.get("model") or {}, spec.get("tokenizer") or {}
    if model.get("vocab_size"):
        return int(model["vocab_size"])
    if tok.get("from"):
        return int(
            registry.create("tokenizer", tok.get("name", "bpe"), path=str(tok["from"])).vocab_size
        )
    if tok.get("vocab_size"):  # a tokenizer trained to this size (an upper bound)
        return int(tok["vocab_size"])
    return preset_vocab


def _meta_model(spec: dict[str, Any]) -> tuple[nn.Module, Any, int]:
    """(model on the meta device, its GPTConfig, encoder tokens per sample)."""
    section = dict(spec["model"])
    arch = recipe_architecture(spec)
    if arch not in ("gpt", "multimodal"):
        # judge and autoencoder recipes train small image models on one device: nothing to plan
        raise ValueError(
            f"mmgpt plan estimates GPT and multimodal recipes; this recipe's model.architecture "
            f"is {arch!r} (a small image model that trains on one device)"
        )
    multimodal = arch == "multimodal"
    overrides = gpt_overrides(section)
    with torch.device("meta"):
        if section.get("from"):
            source = resolve_model_dir(section["from"])
            saved, where = read_model_config(source), source / CONFIG_NAME
            if "gpt" in saved:
                config = GPTConfig.from_dict(saved["gpt"])
            elif is_hf_config(saved) and not is_llava_config(saved):
                config = hf_gpt_config(saved, where)  # a Hugging Face language model
            else:
                raise ValueError(
                    f"{where}: cannot plan from this directory's config; plan the recipe with "
                    "model.preset and the language model's shape as overrides instead"
                )
            # as training does: the model keeps its architecture; block_size is the window
            window = min(int(overrides.get("block_size", config.block_size)), config.block_size)
            dropout = overrides.get("dropout", config.dropout)
            config = dataclasses.replace(config, block_size=window, dropout=dropout)
            if architecture(saved, where) == "multimodal":
                parts = nn.ModuleDict({"gpt": GPT(config)})
                for group, kind in (("encoders", "encoder"), ("projectors", "projector")):
                    for modality, item in (saved.get(group) or {}).items():
                        parts[f"{group}_{modality}"] = registry.create(
                            kind, item["name"], **item["config"]
                        )
                model: nn.Module = parts
            else:
                model = GPT(config)
        else:
            preset = section.get("preset")
            if not preset:
                raise ValueError("recipe section 'model' needs 'preset' (e.g. gpt-nano) or 'from'")
            if preset not in GPT_PRESETS:
                gpt_config(preset)  # raises the error naming the presets
            vocab = _vocab_size(spec, GPT_PRESETS[preset]["vocab_size"])
            config = gpt_config(preset, **{**overrides, "vocab_size": vocab})
            if multimodal:
                tokenizer = _ShapeTokenizer(
                    vocab, int(spec["tokenizer"].get("num_signal_tokens", 8))
                )
                model = MultimodalGPT.build(config, tokenizer, **component_kwargs(section))
            else:
                model = GPT(config)
    tokens = 0
    for module in model.modules():
        if hasattr(module, "num_tokens") and hasattr(module, "output_dim"):
            tokens += int(module.num_tokens)
    if multimodal and hasattr(model, "trainable"):
        train = spec.get("train") or {}
        model.trainable(trainable_parts(train.get("stage"), train.get("train_encoder")))
    return model, config, tokens


def plan(
    recipe: str | os.PathLike | Mapping[str, Any],
    *,
    gpus: int,
    gpu_memory: float | None = None,
    flops: float | None = None,
    mfu: float = DEFAULT_MFU,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> Plan:
    """The :class:`Plan` of a recipe (name, YAML path or mapping) on ``gpus`` GPUs."""
    name = "recipe" if isinstance(recipe, Mapping) else Path(recipe).stem
    spec = apply_overrides(load_recipe(recipe), overrides)
    train = {k: v for k, v in (spec.get("train") or {}).items() if k not in STAGE_KEYS}
    cfg = TrainConfig.from_dict(train)
    precision = "bf16" if cfg.precision == "auto" else cfg.precision  # auto on a modern GPU
    model, config, encoder_tokens = _meta_model(spec)
    return estimate(
        model,
        config,
        gpus=gpus,
        batch_size=cfg.batch_size,
        grad_accum_steps=cfg.grad_accum_steps,
        precision=precision,
        checkpointing=cfg.activation_checkpointing,
        gpu_memory_gb=gpu_memory,
        flops=flops,
        mfu=mfu,
        encoder_tokens=encoder_tokens,
        recipe=name,
        tensor_parallel=cfg.tensor_parallel,
    )


def _in(value: float, unit: int) -> str:
    return f"{value / unit:8.2f}"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _advice(p: Plan) -> list[str]:
    if p.gpu_memory_gb is None:
        return ["pass --gpu-memory GB to check the fit"]
    gb = p.gpu_memory_gb
    if p.ddp.fits(gb):
        return [f"DDP fits in {gb:g} GB per GPU: train.strategy=ddp (FSDP fits too)"]
    if p.fsdp.fits(gb):
        return [f"DDP does not fit in {gb:g} GB; FSDP does: train.strategy=fsdp"]
    lines = [f"neither DDP nor FSDP fits in {gb:g} GB per GPU with this micro-batch"]
    if not p.checkpointing and p.fsdp_checkpointed.fits(gb):
        lines.append("FSDP with train.activation_checkpointing=true fits")
        return lines
    # the largest micro-batch that fits with FSDP + checkpointing; keep the global batch
    fixed = p.fsdp_checkpointed.total - p.fsdp_checkpointed.activations
    fixed -= p.fsdp_checkpointed.logit_gradients
    per_sample = (p.fsdp_checkpointed.activations + p.fsdp_checkpointed.logit_gradients) / (
        p.batch_size
    )
    room = gb * 1e9 - CONTEXT_RESERVE - fixed
    fitting = int(room // per_sample) if room > 0 else 0
    if fitting >= 1:
        accum = math.ceil(p.batch_size * p.grad_accum_steps / fitting)
        lines.append(
            f"FSDP + activation checkpointing fits with train.batch_size={fitting} "
            f"train.grad_accum_steps={accum} (about the same global batch)"
        )
    else:
        states = p.fsdp_checkpointed.parameters + p.fsdp_checkpointed.optimizer
        need = math.ceil(p.gpus * states / max(gb * 1e9 - CONTEXT_RESERVE, 1))
        lines.append(
            f"even one sequence does not fit: the sharded states alone need "
            f"{states / GIB:.1f} GiB per GPU; use more GPUs (about {need}+) or a smaller model"
        )
    return lines


def format_plan(p: Plan) -> str:
    """The text ``mmgpt plan`` prints."""
    c = p.config
    tokens = p.batch_size * c.block_size
    replicas = p.gpus // p.tensor_parallel  # data-parallel ranks of the FSDP layout
    lines = [
        f"plan: recipe {p.recipe!r} on {p.gpus} GPU(s)"
        + (f" with {p.gpu_memory_gb:g} GB each" if p.gpu_memory_gb is not None else ""),
        f"model: {_count(p.n_params)} parameters ({_count(p.n_trainable)} trainable); decoder "
        f"{c.n_layer} layers x {c.n_embd} wide, {c.n_head} heads, vocab {c.vocab_size}, "
        f"context {c.block_size}",
        f"batch: {p.batch_size} x {c.block_size} tokens per GPU per micro-batch, "
        f"grad_accum_steps {p.grad_accum_steps}: global batch "
        f"{p.batch_size * p.grad_accum_steps * replicas} sequences "
        f"({tokens * p.grad_accum_steps * replicas:,} tokens) per step"
        + (
            f" (FSDP over {replicas} x tensor_parallel {p.tensor_parallel}; DDP column: "
            f"{p.gpus} replicas)"
            if p.tensor_parallel > 1
            else ""
        ),
        f"precision: {p.precision}; activation checkpointing: {'on' if p.checkpointing else 'off'}",
        "",
    ]
    unit, unit_name = (GIB, "GiB") if p.ddp.total >= GIB else (1024**2, "MiB")
    fsdp_name = "FSDP" if p.tensor_parallel == 1 else f"FSDPxTP{p.tensor_parallel}"
    lines.append(f"memory per GPU ({unit_name})       {'DDP':>8} {fsdp_name:>8}")
    rows = [
        ("parameters (fp32)", "parameters"),
        ("gradients (fp32)", "gradients"),
        ("AdamW state (2 x fp32)", "optimizer"),
        ("weight copies / gathers", "compute_copies"),
        ("activations", "activations"),
        ("logit gradients", "logit_gradients"),
        ("total", "total"),
    ]
    for label, attr in rows:
        ddp, fsdp = _in(getattr(p.ddp, attr), unit), _in(getattr(p.fsdp, attr), unit)
        lines.append(f"  {label:<24} {ddp} {fsdp}")
    if p.gpu_memory_gb is not None:
        yes = {True: "yes", False: "NO"}
        lines.append(
            f"  {'fits (+1 GiB reserve)':<24} {yes[p.ddp.fits(p.gpu_memory_gb)]:>8} "
            f"{yes[p.fsdp.fits(p.gpu_memory_gb)]:>8}"
        )
    if not p.checkpointing:
        lines.append(
            f"  with activation checkpointing, FSDP total: {p.fsdp_checkpointed.total / GIB:.2f} "
            f"GiB (activations {p.fsdp_checkpointed.activations / GIB:.2f})"
        )
    lines.append("")
    lines.append(
        f"compute: {p.flops_per_step / 1e12:.3g} TFLOP per GPU per step "
        f"(6 x {_count(p.n_matmul)} matmul parameters + attention, per token)"
    )
    if p.step_seconds is not None:
        lines.append(
            f"step time: ~{p.step_seconds * 1e3:.3g} ms at {p.mfu:.0%} MFU of the given peak "
            "(communication not modelled)"
        )
    else:
        lines.append("step time: pass --flops TFLOPS (the GPU's dense bf16 peak) to estimate it")
    lines.append("")
    lines += [f"advice: {line}" for line in _advice(p)]
    lines += [f"note: {line}" for line in p.notes]
    return "\n".join(lines)


def plan_training(
    recipe: str | os.PathLike | Mapping[str, Any],
    *,
    gpus: int,
    gpu_memory: float | None = None,
    flops: float | None = None,
    mfu: float = DEFAULT_MFU,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> str:
    """The report of ``mmgpt plan RECIPE --gpus N [--gpu-memory GB] [--flops TFLOPS]``."""
    return format_plan(
        plan(recipe, gpus=gpus, gpu_memory=gpu_memory, flops=flops, mfu=mfu, overrides=overrides)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmgpt.plan", description=__doc__.split("\n")[0]
    )
    parser.add_argument("recipe")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-memory", type=float, metavar="GB")
    parser.add_argument("--flops", type=float, metavar="TFLOPS")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    print(
        plan_training(
            args.recipe,
            gpus=args.gpus,
            gpu_memory=args.gpu_memory,
            flops=args.flops,
            mfu=args.mfu,
            overrides=args.overrides,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
