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
    return float(loss.detach()), float(norm)


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


def local_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (local shards)."""

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    return {
        "parameters": sum(size(p) for p in params),
        "gradients": sum(size(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(
            size(v) for state in optimizer.state.values() for v in state.values() if v.dim() > 0
        )
        + sum(4 for state in optimizer.state.values() if "step" in state),
    }


def saved_activation_bytes(model: Any, batch: torch.Tensor) -> int:
    """Bytes of the distinct (local) storages a forward saves for backward, parameters excluded."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = local(t).untyped_storage()
        # FSDP's all-gathered weights are storages of their own: the plan counts them as
        # weight copies, not activations (saved as parameters, or transposed for a matmul)
        weight = isinstance(t, torch.nn.Parameter) or type(t.grad_fn).__name__ == "TBackward0"
        if storage.data_ptr() not in params and not weight:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(model, batch)
    return sum(seen.values())


def next_loss(kind: str, model: Any, optimizer: Any) -> float:
    """The loss of one more step after the trained ones (the same batch for every run)."""
    return step(model, optimizer, batches(STEPS + 1)[-1])[0]


# -- torchrun entry point ---------------------------------------------------------------------


def main(spec_path: str) -> None:
    from mmgpt import distributed
    from mmgpt.files import load_tensors, save_tensors

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
        record["bytes"] = local_bytes(model, optimizer)
        record["activations"] = saved_activation_bytes(model, batches(1)[0])
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
        # the full (single-process format) weights, loaded into a split model: its loss on the
        # next batch is the trained model's before its next step (``next_loss``)
        distributed.barrier()
        from_full = wrap(gpt(kind))
        full_optimizer = optimizer_for(from_full)
        names = [name for name, _ in from_full.named_parameters()]
        distributed.load_full_into_sharded(
            from_full,
            full_optimizer,
            load_tensors(out / "full.safetensors"),
            {"state": {}, "param_groups": full_optimizer.state_dict()["param_groups"]},
            names,
        )
        with torch.no_grad():
            record["full_loaded_loss"] = float(loss_of(from_full, batches(STEPS + 1)[-1]))
        result[kind] = record
    if spec.get("trainer"):  # the Trainer with train.tensor_parallel=2 (``run_gpt``'s run)
        import _worker

        out = Path(spec["trainer"])
        overrides = {"strategy": "fsdp", "tensor_parallel": 2, "batch_size": _worker.GLOBAL_BATCH}
        train_data = _worker.Windows(_worker.TRAIN_WINDOWS, 1)
        from mmgpt.trainer import Trainer

        trainer = Trainer(
            _worker.gpt_model(),
            "lm",
            train_data,
            _worker.train_config(1, **overrides),
            eval_data=_worker.Windows(_worker.EVAL_WINDOWS, 2),
            out_dir=out,
        )
        trainer.fit()
        # every rank of the tensor-parallel group must have read the same samples
        (out / f"indices_rank{info.rank}.json").write_text(json.dumps(train_data.seen))
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
