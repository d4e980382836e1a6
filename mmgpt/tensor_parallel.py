"""Tensor parallelism of the GPT decoder blocks (``torch.distributed.tensor.parallel``).

Megatron's split, applied with :func:`~torch.distributed.tensor.parallel.parallelize_module`
on the ``tp`` dimension of a ``(dp, tp)`` device mesh: the input projections (``attn.c_attn``,
``mlp.c_fc``) are column-wise parallel and the output projections (``attn.c_proj``,
``mlp.c_proj``) row-wise, so each block costs one all-reduce in attention and one in the MLP,
forward and backward. Norms, embeddings, the LM head, encoders and projectors stay replicated
on the ``tp`` ranks (FSDP, when it runs on the ``dp`` dimension, shards them there).

The fused projections need care. ``c_attn`` holds ``[q; k; v]`` row blocks and a gated
``c_fc`` ``[gate; up]``, and a plain column split would hand rank 0 all of q and none of v.
Before splitting, their rows are put in *TP layout* — rank r's contiguous chunk is
``[q heads of r; k heads of r; v heads of r]`` (and ``[gate_r; up_r]``) — so every rank holds
whole heads and the attention code runs unchanged on its local heads
(``CausalSelfAttention.n_head``/``n_kv_head`` are set to the local counts). The layout is an
in-memory detail: :func:`to_canonical` and :func:`to_tp_layout` convert the weights and their
optimizer state at the edges (sharded checkpoints, full state dicts), so every file on disk
has the ordinary layout and any checkpoint loads at any ``tp`` (or none).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mmgpt.model import MLP, Block, CausalSelfAttention

__all__ = [
    "LAYOUT_ATTR",
    "check_tensor_parallel",
    "make_mesh",
    "parallelize_blocks",
    "to_canonical",
    "to_tp_layout",
]

# set on the root module by parallelize_blocks: {parameter name: TP-layout row order}
LAYOUT_ATTR = "_mmgpt_tp_row_order"


def check_tensor_parallel(model: nn.Module, tp: int, world_size: int) -> list[Block]:
    """The decoder blocks of ``model``, after checking that ``tp`` splits them into whole
    heads and whole MLP columns and divides ``world_size``; a clear error otherwise."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"train.tensor_parallel: expected an integer >= 1, got {tp!r}")
    if world_size % tp:
        raise ValueError(
            f"train.tensor_parallel={tp} must divide the number of processes ({world_size}): "
            f"the processes form a (data parallel x {tp}) mesh"
        )
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError("train.tensor_parallel: the model has no decoder blocks to split")
    attn, mlp = blocks[0].attn, blocks[0].mlp
    sizes = {
        "n_head": attn.n_head,
        "n_kv_head": attn.n_kv_head,
        "MLP hidden size": mlp.c_proj.in_features,
    }
    for name, size in sizes.items():
        if size % tp:
            raise ValueError(
                f"train.tensor_parallel={tp} must divide the model's {name} ({size}): each "
                "rank holds whole heads and an equal share of the MLP"
            )
    return blocks


def make_mesh(device_type: str, world_size: int, tp: int) -> Any:
    """The ``(dp, tp)`` device mesh; ``tp`` is the inner dimension, so a TP group is made of
    consecutive ranks (one machine under torchrun, where the all-reduces are cheapest)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def _attention_row_order(attn: CausalSelfAttention, tp: int) -> Tensor:
    """Rows of the canonical ``[q; k; v]`` in TP layout: rank by rank, its q, k, v heads."""
    q_dim, kv_dim = attn.n_head * attn.head_dim, attn.kv_dim
    q, k, v = (
        torch.arange(q_dim),
        torch.arange(kv_dim) + q_dim,
        torch.arange(kv_dim) + q_dim + kv_dim,
    )
    parts = zip(q.chunk(tp), k.chunk(tp), v.chunk(tp), strict=True)
    return torch.cat([torch.cat(ranks) for ranks in parts])


def _gated_row_order(mlp: MLP, tp: int) -> Tensor:
    """Rows of the canonical ``[gate; up]`` in TP layout: rank by rank, its gate and up rows."""
    hidden = mlp.c_proj.in_features
    gate, up = torch.arange(hidden), torch.arange(hidden) + hidden
    return torch.cat([torch.cat(ranks) for ranks in zip(gate.chunk(tp), up.chunk(tp), strict=True)])


@torch.no_grad()
def parallelize_blocks(model: nn.Module, tp_mesh: Any) -> int:
    """Split every decoder block of ``model`` over ``tp_mesh`` (in place); return the number
    of blocks. Every rank must hold the same (full, canonical) weights when it is called."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    blocks = check_tensor_parallel(model, tp, tp)
    names = {id(m): name for name, m in model.named_modules()}
    order: dict[str, Tensor] = {}
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        fused = [(attn.c_attn, _attention_row_order(attn, tp))]
        if mlp.gated:
            fused.append((mlp.c_fc, _gated_row_order(mlp, tp)))
        for linear, rows in fused:
            for pname, param in linear.named_parameters():
                param.copy_(param.index_select(0, rows.to(param.device)))
                order[f"{names[id(linear)]}.{pname}"] = rows
        parallelize_module(
            block,
            tp_mesh,
            {
                "attn.c_attn": ColwiseParallel(),
                "attn.c_proj": RowwiseParallel(),
                "mlp.c_fc": ColwiseParallel(),
                "mlp.c_proj": RowwiseParallel(),
            },
        )
        # the attention reshapes by these: this rank's heads only
        attn.n_head //= tp
        attn.n_kv_head //= tp
        attn.kv_dim //= tp
    setattr(model, LAYOUT_ATTR, order)
    return len(blocks)


def _reorder(value: Any, rows: Tensor) -> Any:
    """``value`` with its rows (dim 0) in the order ``rows``; a DTensor is gathered, reordered
    and laid out again with its own placements (one fused weight at a time in memory)."""
    if not isinstance(value, Tensor) or value.dim() == 0 or value.size(0) != rows.numel():
        return value  # e.g. Adam's step counter
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(value, DTensor):
        full = value.full_tensor().index_select(0, rows.to(value.device))
        # every rank holds the same full tensor: each takes its own shard, no scatter
        return distribute_tensor(full, value.device_mesh, value.placements, src_data_rank=None)
    return value.index_select(0, rows.to(value.device))


def _convert(
    model: nn.Module,
    model_state: dict[str, Any],
    optim_state: dict[str, Any] | None,
    inverse: bool,
) -> None:
    order: dict[str, Tensor] = getattr(model, LAYOUT_ATTR, {})
    for name, rows in order.items():
        if inverse:
            rows = torch.argsort(rows)
        if name in model_state:
            model_state[name] = _reorder(model_state[name], rows)
        if optim_state is not None and name in optim_state:
            optim_state[name] = {k: _reorder(v, rows) for k, v in optim_state[name].items()}


def to_canonical(
    model: nn.Module, model_state: dict[str, Any], optim_state: dict[str, Any] | None = None
) -> None:
    """Put the fused rows of ``model``'s state (by parameter name; optimizer state by name
    too, as ``get_state_dict`` gives it) back in the ordinary layout, in place of the dicts'
    values. A no-op for a model :func:`parallelize_blocks` has not split. Collective for
    DTensors."""
    _convert(model, model_state, optim_state, inverse=True)


def to_tp_layout(
    model: nn.Module, model_state: dict[str, Any], optim_state: dict[str, Any] | None = None
) -> None:
    """The inverse of :func:`to_canonical`: ordinary rows → ``model``'s TP layout."""
    _convert(model, model_state, optim_state, inverse=False)
