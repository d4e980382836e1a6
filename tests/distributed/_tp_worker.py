"""Tensor-parallel scenarios for ``test_tensor_parallel.py``, run in one process or under torchrun.

The test computes the single-process reference with :func:`train` and launches

    torchrun --standalone --nproc_per_node 2 _tp_worker.py SPEC.json

for the two-process runs (``strategy: fsdp`` with ``tensor_parallel: 2``: a 1 x 2 mesh, FSDP
on the data-parallel dimension of size 1). Each scenario trains a few AdamW steps on fixed
batches (every rank of a tensor-parallel group reads the same batch), writes a sharded
checkpoint, gathers the full weights, then reloads the checkpoint into a fresh split model
and takes one more step; rank 0 writes what it saw to ``result.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from mmgpt.distributed import clip_grad_norm

VOCAB, BLOCK, BATCH, STEPS = 64, 16, 4, 3
MODELS = {
    # GPT-2 style: learned positions, multi-head attention, plain MLP, tied embeddings
    "mha": dict(n_layer=2, n_head=4, n_embd=32),
    # Llama style: rotary positions, grouped-query attention, gated SiLU MLP, RMSNorm
    "gqa": dict(
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        pos_encoding="rotary",
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        intermediate_size=48,
        bias=False,
        tie_embeddings=False,
    ),
}


def gpt(kind: str) -> Any:
    from mmgpt.config import gpt_config
    from mmgpt.model import GPT

    torch.manual_seed(0)
    return GPT(gpt_config("gpt-nano", block_size=BLOCK, vocab_size=VOCAB, **MODELS[kind]))


def batches(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, BLOCK + 1), generator=generator) for _ in range(n)]


def loss_of(model: Any, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1]).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def step(model: Any, optimizer: Any, batch: torch.Tensor) -> tuple[float, float]:
    """One AdamW step; (loss, gradient norm before clipping)."""
    optimizer.zero_grad()
    loss = loss_of(model, batch)
    loss.backward()
    norm = clip_grad_norm(list(model.parameters()), 1.0)
    optimizer.step()
    return float(loss), float(norm)


def optimizer_for(model: Any) -> Any:
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(kind: str, wrap: Any = None) -> tuple[Any, Any, dict[str, list[float]]]:
    """``STEPS`` steps of the ``kind`` model (``wrap``: how to split it); its losses, norms."""
    model = gpt(kind)
    if wrap is not None:
        model = wrap(model)
    optimizer = optimizer_for(model)
    record: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    for batch in batches(STEPS):
        loss, norm = step(model, optimizer, batch)
        record["loss"].append(loss)
        record["grad_norm"].append(norm)
    return model, optimizer, record


def next_loss(kind: str, model: Any, optimizer: Any) -> float:
    """The loss of one more step after the trained ones (the same batch for every run)."""
    return step(model, optimizer, batches(STEPS + 1)[-1])[0]


# -- torchrun entry point ---------------------------------------------------------------------


def main(spec_path: str) -> None:
    from mmgpt import distributed
    from mmgpt.files import save_tensors

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    info = distributed.setup("fsdp", "cpu")
    cpu = torch.device("cpu")

    def wrap(model: Any) -> Any:
        return distributed.wrap_model(model, strategy="fsdp", device=cpu, tensor_parallel=2)

    result: dict[str, Any] = {}
    for kind in spec["kinds"]:
        out = Path(spec["root"]) / kind
        model, optimizer, record = train(kind, wrap)
        attn = model.transformer.h[0].attn
        record["local_heads"] = [attn.n_head, attn.n_kv_head]
        record["local_c_attn_rows"] = attn.c_attn.weight.to_local().shape[0]
        distributed.save_sharded(out / "dcp", model, optimizer, exclude=set())
        full = distributed.gather_full_state_dict(model)
        if info.rank == 0:
            save_tensors({k: v.contiguous() for k, v in full.items()}, out / "full.safetensors")
        record["next_loss"] = next_loss(kind, model, optimizer)
        # a fresh split model, restored from the sharded checkpoint, takes the same step
        fresh = wrap(gpt(kind))
        fresh_optimizer = optimizer_for(fresh)
        distributed.load_sharded(out / "dcp", fresh, fresh_optimizer, exclude=set())
        record["resumed_next_loss"] = next_loss(kind, fresh, fresh_optimizer)
        result[kind] = record
    errors = {}
    for name, tp in (("heads", 3), ("world", 4)):
        try:
            wrap_tp = distributed.wrap_model(
                gpt("gqa"), strategy="fsdp", device=cpu, tensor_parallel=tp
            )
            errors[name] = f"no error ({wrap_tp})"
        except ValueError as exc:
            errors[name] = str(exc)
    result["errors"] = errors
    if info.rank == 0:
        (Path(spec["root"]) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
