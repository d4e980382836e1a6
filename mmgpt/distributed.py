"""Data-parallel training on PyTorch's own engine: process groups, DDP/FSDP2, sharded checkpoints.

The :class:`~mmgpt.trainer.Trainer` calls into this module when ``train.strategy`` is ``ddp``
or ``fsdp``; a single-process run (``strategy: none``) never touches ``torch.distributed``.

* **Process group** — :func:`setup` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and initialises ``gloo`` on CPU or ``nccl``
  on GPU. Without torchrun a ``ddp``/``fsdp`` strategy runs as a world of one process.
* **Wrapping** — :func:`wrap_model`: DDP, or FSDP2 (``fully_shard`` on every decoder block,
  then on the root); optional activation checkpointing and per-block ``torch.compile``.
* **Sharded checkpoints** — an FSDP checkpoint stores model and AdamW state with
  ``torch.distributed.checkpoint`` (DCP) under ``dcp/``: every rank writes only its shards,
  and DCP reshards on load, so a run resumes on any number of processes (or on one, with no
  process group at all). :func:`consolidate` turns one into an ordinary model directory::

      python -m mmgpt.distributed consolidate runs/x/checkpoints/step_00001000 runs/x/model-1000

DCP writes tensors with ``torch.save`` and reads them back with ``weights_only=True``, but its
``.metadata`` file is a plain pickle: treat training checkpoints as trusted local artifacts
(your own runs), never as files to download. Released models are model directories
(safetensors), which :func:`consolidate` produces.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import os
import shutil
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmgpt.checkpoint import finalize_checkpoint_dir as finalize_training_checkpoint
from mmgpt.checkpoint import verify_checkpoint_dir
from mmgpt.config import CONFIG_NAME, WEIGHTS_NAME
from mmgpt.files import atomic_directory, load_tensors, save_json, save_tensors
from mmgpt.model import Block
from mmgpt.pretrained import model_config

__all__ = [
    "DCP_DIR",
    "MODEL_CONFIG_DIR",
    "STRATEGIES",
    "DistInfo",
    "apply_activation_checkpointing",
    "clip_grad_norm",
    "consolidate",
    "env_world",
    "finalize_checkpoint_dir",
    "gather_full_state_dict",
    "load_full_into_sharded",
    "load_sharded",
    "materialize",
    "meta_copy",
    "on_main_process",
    "save_sharded",
    "setup",
    "transformer_blocks",
    "unwrap_model",
    "wrap_model",
    "write_model_config",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, at
    any depth: what an objective reads its components (decoders, encoders) from."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return unwrap_model(inner)
    return model


STRATEGIES = ("none", "ddp", "fsdp")
DCP_DIR = "dcp"  # sharded model + optimizer state inside a checkpoint directory
MODEL_CONFIG_DIR = "model"  # config.json + tokenizer files of the model, for consolidation
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def env_world() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment (0, 1, 0 without it)."""

    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

    return DistInfo(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _ENV)


def uses_cuda(device: str) -> bool:
    """Whether the trainer's ``device`` setting resolves to CUDA."""
    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


def setup(strategy: str, device: str = "auto") -> DistInfo:
    """Initialise the default process group for ``strategy`` (idempotent); return this rank.

    ``none`` initialises nothing and refuses to run under a multi-process launcher (every
    process would train alone and write to the same directory). ``ddp``/``fsdp`` use NCCL
    when ``device`` resolves to CUDA, gloo otherwise; without torchrun they form a world of one.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy: expected one of {STRATEGIES}, got {strategy!r}")
    env = env_world()
    if strategy == "none":
        if env.world_size > 1:
            raise RuntimeError(
                f"launched as {env.world_size} processes (torchrun) but train.strategy is "
                "'none'; set train.strategy=ddp or train.strategy=fsdp"
            )
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"train.strategy={strategy!r} needs torch.distributed, not built in")
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank)
    cuda = uses_cuda(device)
    kwargs: dict[str, Any] = {}
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device: {device!r} requested but CUDA is not available")
        torch.cuda.set_device(env.local_rank)
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    backend = "nccl" if cuda else "gloo"
    if launched_by_torchrun():
        dist.init_process_group(backend, **kwargs)  # env:// rendezvous
    elif env.world_size > 1:
        missing = [name for name in _ENV if name not in os.environ]
        raise RuntimeError(
            f"WORLD_SIZE={env.world_size} but {', '.join(missing)} not set; launch with torchrun"
        )
    else:  # a world of one: same code path, no launcher needed
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    atexit.register(_destroy_process_group)
    return DistInfo(dist.get_rank(), dist.get_world_size(), env.local_rank)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum over processes, in float64 (exact for counts up to 2**53)."""
    if not _initialized():
        return [float(v) for v in values]
    import torch.distributed as dist

    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (between our own processes only)."""
    if not _initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main_process(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run by rank 0 only; every rank gets its result.

    For work that must happen once and agree everywhere, such as training a tokenizer.
    """
    if not _initialized():
        return fn(*args, **kwargs)
    import torch.distributed as dist

    result = fn(*args, **kwargs) if dist.get_rank() == 0 else None
    return broadcast_object(result)


# --------------------------------------------------------------------------------------
# Blocks, activation checkpointing, wrapping
# --------------------------------------------------------------------------------------


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The GPT decoder blocks of ``model`` (:class:`mmgpt.model.Block`), in order.

    Encoder blocks are deliberately not included: an encoder runs only for batches that hold
    its modality, and an FSDP unit must run on every rank at every step.
    """
    return [m for m in model.modules() if isinstance(m, Block)]


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        # non-reentrant: works with kwargs, FSDP hooks and torch.compile; the RNG state is
        # restored for the recomputation, so dropout masks are the same
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each decoder block in backward instead of keeping its activations.

    Keeps module names (no wrapper module), so state dicts and optimizer groups are unchanged.
    Returns the number of blocks; raises if the model has none.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            "train.activation_checkpointing: the model has no decoder blocks "
            "(mmgpt.model.Block) to checkpoint"
        )
    for block in blocks:
        if "forward" not in vars(block):
            block.forward = types.MethodType(_checkpointed_forward, block)
    return len(blocks)


def may_skip_parameters(model: nn.Module) -> bool:
    """Whether some parameters may get no gradient in a step (an encoder with no inputs)."""
    encoders = getattr(model, "encoders", None)
    return bool(encoders) or getattr(model, "image_decoder", None) is not None


class _DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """DDP that also answers the wrapped model's attributes (``model.config``, ``.tokenizer``)
    so objectives work unchanged. Objectives must still *call* the model for gradients to
    be synchronised."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def wrap_model(
    model: nn.Module,
    *,
    strategy: str,
    device: torch.device,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
    compile: bool = False,
    tensor_parallel: int = 1,
) -> nn.Module:
    """The module the objective calls.

    ``none``: the model (``torch.compile``-d whole when asked). ``ddp``: a DDP wrapper
    (buffers are not re-synced each forward: they are constants here; gradients are bucket views, which
    saves one copy of the gradients). ``fsdp``: FSDP2 applied in place, one unit per decoder
    block plus the root (embeddings, head, encoders, projectors); with ``bf16`` the
    all-gathered weights are bf16 and gradients are reduced in fp32. With ``compile`` the
    decoder blocks are compiled one by one (in place), which composes with both wrappers.
    ``tensor_parallel`` > 1 (``fsdp`` only): the processes form a ``(dp, tp)`` mesh; each
    decoder block is split over ``tp`` (:mod:`mmgpt.tensor_parallel`) and FSDP shards over
    ``dp`` (2-D parallelism).
    """
    if tensor_parallel != 1 and strategy != "fsdp":
        raise ValueError(
            f"train.tensor_parallel={tensor_parallel} needs train.strategy=fsdp (which then "
            f"shards over the data-parallel dimension), got strategy {strategy!r}"
        )
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if strategy == "none":
        return torch.compile(model) if compile else model
    if compile:
        for block in transformer_blocks(model):
            block.compile()
    if strategy == "ddp":
        return _DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,
            gradient_as_bucket_view=True,
            find_unused_parameters=may_skip_parameters(model),
        )
    if strategy != "fsdp":
        raise ValueError(f"train.strategy: expected one of {STRATEGIES}, got {strategy!r}")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _broadcast_module_states(model)
    # explicit: FSDP's default mesh follows the accelerator even for a CPU (gloo) run
    if tensor_parallel == 1:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    else:
        from mmgpt import tensor_parallel as tp

        tp.check_tensor_parallel(model, tensor_parallel, dist.get_world_size())
        mesh_2d = tp.make_mesh(device.type, dist.get_world_size(), tensor_parallel)
        tp.parallelize_blocks(model, mesh_2d["tp"])
        mesh = mesh_2d["dp"]
    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if may_skip_parameters(model):
        # a rank whose batch has no image still joins the reduce-scatter (with zeros)
        model.set_reduce_scatter_unused_params(True)
    return model


def _broadcast_module_states(model: nn.Module) -> None:
    """Rank 0's weights everywhere (DDP does this itself; FSDP shards what each rank holds)."""
    if not _initialized():
        return
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def clip_grad_norm(parameters: Sequence[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of ``parameters`` to a global norm of ``max_norm``; return the norm
    before clipping (over every rank's shards).

    ``torch.nn.utils.clip_grad_norm_`` when the gradients share one device mesh (or none);
    with tensor parallelism the split block weights live on the 2-D mesh and the rest on the
    data-parallel one, which that function cannot stack together, so each mesh's norm is
    reduced on its own and the squares are summed here.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        by_mesh.setdefault(getattr(g, "device_mesh", None), []).append(g)
    if len(by_mesh) == 1:
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    squares = 0.0
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group)
        squares += float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm) ** 2
    total = squares**0.5
    coef = max_norm / (total + 1e-6)  # the same rule as clip_grad_norm_
    if coef < 1.0:
        with torch.no_grad():
            for g in grads:
                g.mul_(coef)
    return total


def set_gradient_sync(wrapped: nn.Module, strategy: str, sync: bool) -> Any:
    """A context for one micro-batch: no gradient communication unless ``sync``."""
    import contextlib

    if strategy == "ddp" and not sync:
        return wrapped.no_sync()
    if strategy == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# Full models from sharded ones
# --------------------------------------------------------------------------------------


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with parameters on the meta device (no memory) and buffers on CPU.

    Taken before FSDP shards the model, it is the skeleton :func:`materialize` fills with
    gathered weights to write a model directory with the model's own ``save_pretrained``.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(
            torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
        )
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo)


def materialize(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A CPU copy of ``template`` (from :func:`meta_copy`) holding the weights in ``state``.

    Tied parameters stay tied: each parameter object is filled once, under whichever of its
    names ``state`` has.
    """
    memo: dict[int, Any] = {}
    aliases: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in template.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), (p, []))[1].append(name)
    for key, (p, names) in aliases.items():
        found = next((n for n in names if n in state), None)
        if found is None:
            raise ValueError(f"the gathered weights lack {names[0]!r}")
        value = state[found]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{found}: gathered shape {tuple(value.shape)} != {tuple(p.shape)}")
        memo[key] = nn.Parameter(value.detach().to("cpu", p.dtype), requires_grad=p.requires_grad)
    for name, b in template.named_buffers(remove_duplicate=False):
        if name in state and id(b) not in memo:
            memo[id(b)] = state[name].detach().to("cpu", b.dtype)
    return copy.deepcopy(template, memo)


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0's CPU; empty on other ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mmgpt.tensor_parallel import to_canonical

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    to_canonical(model, state)  # tensor parallel: the fused rows in their ordinary order
    return state


def write_model_config(model: nn.Module, tokenizer: Any, directory: Path) -> bool:
    """Write the ``config.json`` (and tokenizer files) a model directory of ``model`` has.

    Returns False for a model mmgpt cannot describe (then :func:`consolidate` needs
    ``config_from``).
    """
    config = model_config(model, tokenizer)
    if config is None:
        return False
    tokenizer = getattr(model, "tokenizer", None) or tokenizer
    directory.mkdir(parents=True, exist_ok=True)
    save_json(config, directory / CONFIG_NAME)
    if tokenizer is not None:
        tokenizer.save(directory)
    return True


# --------------------------------------------------------------------------------------
# Sharded (DCP) checkpoints
# --------------------------------------------------------------------------------------


def _state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, exclude: set[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    model_state = {k: v for k, v in model_state.items() if k not in exclude}
    return model_state, optim_state


def _optimizer_tensors(optim_state: dict[str, Any]) -> dict[str, Any]:
    """The per-parameter optimizer state, every value checked to be a tensor."""
    for fqn, values in optim_state["state"].items():
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"optimizer state {fqn}.{name} is a {type(value).__name__}; sharded "
                    "checkpoints store tensors only"
                )
    return optim_state["state"]


def save_sharded(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, exclude: set[str]
) -> None:
    """Write model weights (minus ``exclude``, e.g. tied aliases) and optimizer state with DCP.

    Collective: every rank calls it and writes its own shards. Only tensors are stored (the
    optimizer's hyperparameters go to JSON), so reading needs no unpickling of objects.
    """
    import torch.distributed.checkpoint as dcp

    from mmgpt.tensor_parallel import to_canonical

    model_state, optim_state = _state_dicts(model, optimizer, exclude)
    optim_tensors = dict(_optimizer_tensors(optim_state))
    to_canonical(model, model_state, optim_tensors)  # files hold the ordinary layout
    dcp.save({"model": model_state, "optim": optim_tensors}, checkpoint_id=directory)


def _dcp_load(state: dict[str, Any], **kwargs: Any) -> None:
    """``dcp.load``; reading in a single process is intended here, not worth a warning."""
    import torch.distributed.checkpoint as dcp

    kwargs.setdefault("no_dist", not _initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, **kwargs)


def load_sharded(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, exclude: set[str]
) -> None:
    """Load a :func:`save_sharded` checkpoint into ``model``/``optimizer``, any world size.

    Works for FSDP (each rank reads its shards), DDP and plain modules (each process reads
    everything; without a process group DCP reads locally).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from mmgpt.tensor_parallel import to_tp_layout

    model_state, optim_state = _state_dicts(model, optimizer, exclude)
    state = {"model": model_state, "optim": optim_state["state"]}
    try:
        _dcp_load(state, checkpoint_id=directory)
    except Exception as exc:  # DCP raises CheckpointException with per-rank details
        raise ValueError(f"{directory}: cannot load the sharded checkpoint ({exc})") from exc
    # the files hold the ordinary layout; a tensor-parallel model wants its own
    to_tp_layout(model, state["model"], state["optim"])
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict={"state": state["optim"], "param_groups": optim_state["param_groups"]},
        options=StateDictOptions(strict=False),  # tied aliases are restored through their twin
    )


def load_full_into_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    param_names: Sequence[str],
) -> None:
    """Load a full (single-process or DDP) checkpoint into an FSDP model and its optimizer.

    ``optim_state`` is ``optimizer.state_dict()``-shaped (parameters by index);
    ``param_names[i]`` is the name of the optimizer's ``i``-th parameter.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from mmgpt.tensor_parallel import to_tp_layout

    options = StateDictOptions(full_state_dict=True, strict=False)
    state = {param_names[int(i)]: dict(values) for i, values in optim_state["state"].items()}
    model_state = dict(model_state)
    to_tp_layout(model, model_state, state)  # full tensors in ordinary layout → TP layout
    set_model_state_dict(model, model_state, options=options)
    groups = [
        {**group, "params": [param_names[int(i)] for i in group["params"]]}
        for group in optim_state["param_groups"]
    ]
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": groups}, options=options
    )


def finalize_checkpoint_dir(tmp: Path, directory: Path, step: int) -> Path:
    """Write ``manifest.json`` over every file under ``tmp`` (shards included), then rename
    it to ``directory``: :func:`mmgpt.checkpoint.finalize_checkpoint_dir`, so the layout
    matches single-process checkpoints and ``verify_checkpoint_dir`` applies."""
    return finalize_training_checkpoint(tmp, directory, step)


# --------------------------------------------------------------------------------------
# Consolidation: sharded checkpoint → model directory
# --------------------------------------------------------------------------------------


def read_sharded_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP checkpoint, full size, on CPU, without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    metadata = reader.read_metadata()
    state = {
        key[len("model.") :]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise ValueError(f"{directory}: the sharded checkpoint holds no model weights")
    _dcp_load({"model": state}, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=True)
    return state


def consolidate(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, config_from: str | None = None
) -> Path:
    """Write the model directory (``config.json``, ``model.safetensors``, tokenizer files) of a
    training checkpoint, on one process with no process group.

    ``checkpoint``: a ``step_N`` directory, sharded (``dcp/``) or full (``model.safetensors``).
    ``config_from``: a model directory whose ``config.json`` and tokenizer files to use when the
    checkpoint has no ``model/`` config (e.g. a model mmgpt cannot describe).
    The result loads with ``GPT.from_pretrained`` / ``MultimodalGPT.from_pretrained``.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: not a checkpoint directory")
    verify_checkpoint_dir(checkpoint)
    state_file = checkpoint / "trainer_state.json"
    if state_file.is_file():
        saved = json.loads(state_file.read_text(encoding="utf-8")).get("config", {})
        if saved.get("save_frozen") is False:
            raise ValueError(
                f"{checkpoint}: saved with train.save_frozen=false, it holds the trainable "
                "weights only; the run's final model directory has them all"
            )
    source = Path(config_from) if config_from is not None else checkpoint / MODEL_CONFIG_DIR
    if not (source / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{source / CONFIG_NAME}: no model config; pass config_from=DIR (--config-from) "
            "naming a model directory of the same architecture"
        )
    if (checkpoint / DCP_DIR).is_dir():
        state = read_sharded_model_state(checkpoint / DCP_DIR)
    elif (checkpoint / WEIGHTS_NAME).is_file():
        state = load_tensors(checkpoint / WEIGHTS_NAME)
    else:
        raise ValueError(f"{checkpoint}: neither {DCP_DIR}/ nor {WEIGHTS_NAME}: not a checkpoint")
    adapter_keys = [k for k in state if ".lora_" in k or ".base_layer." in k]
    if adapter_keys:  # a plain model directory cannot hold injected adapter layers
        raise ValueError(
            f"{checkpoint}: the checkpoint of a run with adapters (e.g. {adapter_keys[0]}); "
            "consolidating it into a model directory is not supported yet: use the run's "
            "final model directory (OUT/model, base weights + adapters/<name>/)"
        )
    with atomic_directory(out) as staging:
        shutil.copytree(
            source,
            staging,
            ignore=shutil.ignore_patterns(WEIGHTS_NAME, "adapters"),
            dirs_exist_ok=True,
        )
        save_tensors(state, staging / WEIGHTS_NAME, metadata={"format": "pt"})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmgpt.distributed", description="tools for distributed training runs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("consolidate", help="sharded training checkpoint -> model directory")
    p.add_argument("checkpoint", help="a checkpoints/step_N directory")
    p.add_argument("out", help="the model directory to write")
    p.add_argument("--config-from", metavar="DIR", help="take config.json + tokenizer from DIR")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = consolidate(args.checkpoint, args.out, config_from=args.config_from)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
