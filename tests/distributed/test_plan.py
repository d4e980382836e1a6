"""`mmgpt plan`: its memory formulas against measured CPU runs, its advice and its output.

States (parameters, gradients, AdamW moments and step counters) are compared exactly with the
tensors after one optimizer step. Activations are measured with
``torch.autograd.graph.saved_tensors_hooks`` (bytes of distinct storages saved for backward,
parameters and autocast's weight copies excluded) and must be within 15% of the estimate
(measured: within 0.1%).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from mmgpt.config import gpt_config
from mmgpt.distributed import apply_activation_checkpointing
from mmgpt.model import GPT
from mmgpt.objectives.lm import LMObjective
from mmgpt.plan import (
    CONTEXT_RESERVE,
    activation_bytes,
    block_activation_bytes,
    estimate,
    format_plan,
    plan,
    plan_training,
    state_bytes,
)

ACTIVATION_TOLERANCE = 0.15


def _is_weight_copy(t: torch.Tensor) -> bool:
    """autocast's low-precision copy of a parameter (possibly through a view)."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in ("TBackward0", "ViewBackward0"):
        fn = fn.next_functions[0][0]
    return (
        fn is not None
        and type(fn).__name__ == "ToCopyBackward0"
        and type(fn.next_functions[0][0]).__name__ == "AccumulateGrad"
    )


def saved_bytes(model: GPT, batch_size: int, *, autocast: bool) -> tuple[int, int]:
    """(activation bytes, weight-copy bytes) the lm objective's forward saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations: dict[int, int] = {}
    copies: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            (copies if _is_weight_copy(t) else activations)[ptr] = storage.nbytes()
        return t

    config = model.config
    ids = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        LMObjective()(model, {"input_ids": ids})
    return sum(activations.values()), sum(copies.values())


SHAPES = [
    dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=100),
    dict(n_layer=3, n_head=3, n_embd=48, block_size=24, vocab_size=300, bias=False),
    # the Llama family: grouped-query attention, SwiGLU, RMSNorm, rotary, untied head
    dict(
        n_layer=2,
        n_head=4,
        n_kv_head=1,
        n_embd=64,
        block_size=32,
        vocab_size=100,
        activation="silu",
        gated_mlp=True,
        intermediate_size=96,
        norm="rmsnorm",
        pos_encoding="rotary",
        bias=False,
        tie_embeddings=False,
    ),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_activation_estimate_matches_saved_tensors(shape: dict[str, Any], autocast: bool) -> None:
    torch.manual_seed(0)
    config = gpt_config("gpt-nano", **shape)
    model = GPT(config).train()
    batch = 3
    measured, copies = saved_bytes(model, batch, autocast=autocast)
    act = 2 if autocast else 4
    predicted = activation_bytes(config, batch, act=act)
    assert measured == pytest.approx(predicted, rel=ACTIVATION_TOLERANCE)
    # the DDP "weight copies" term: a bf16 copy of every matmul weight (tied head included)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert copies == (2 * matmul if autocast else 0)

    # with checkpointing a block keeps only its input (the saved_tensors hooks see it) ...
    apply_activation_checkpointing(model)
    checkpointed, _ = saved_bytes(model, batch, autocast=autocast)
    per_block = batch * block_activation_bytes(
        config.block_size,
        config.n_embd,
        config.n_head,
        config.mlp_hidden / config.n_embd,
        act,
        dropout=False,
        kv_heads=config.kv_heads,
        gated=config.gated_mlp,
        rotary=config.pos_encoding == "rotary",
        rmsnorm=config.norm == "rmsnorm",
    )
    inputs = batch * config.n_layer * 4 * config.block_size * config.n_embd
    assert measured - checkpointed == pytest.approx(
        config.n_layer * per_block - inputs, rel=ACTIVATION_TOLERANCE
    )
    # ... and backward recomputes one block at a time on top of that
    with_ckpt = activation_bytes(config, batch, act=act, checkpointing=True)
    assert with_ckpt == pytest.approx(checkpointed + per_block, rel=ACTIVATION_TOLERANCE)


def test_state_estimate_is_exact_after_an_optimizer_step() -> None:
    torch.manual_seed(0)
    model = GPT(
        gpt_config("gpt-nano", n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=64)
    )
    model.transformer.h[0].requires_grad_(False)  # frozen weights have no grad nor state
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    LMObjective()(model, {"input_ids": torch.randint(0, 64, (2, 17))}).loss.backward()
    optimizer.step()

    def nbytes(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    measured = {
        "parameters": nbytes(model.parameters()),
        "gradients": nbytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": nbytes(v for s in optimizer.state.values() for v in s.values()),
    }
    n = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    assert measured == state_bytes(n, n_trainable, len(trainable), strategy="ddp", gpus=1)
    # FSDP shards everything but the step counters; accumulation keeps unsharded gradients
    fsdp = state_bytes(n, n_trainable, len(trainable), strategy="fsdp", gpus=4, grad_accum_steps=2)
    assert fsdp["parameters"] == measured["parameters"] / 4
    assert fsdp["gradients"] == measured["gradients"] * (1 / 4 + 1)


def test_plan_of_the_lm_recipe_builds_the_model_on_the_meta_device() -> None:
    p = plan("lm", gpus=2, gpu_memory=16, flops=100)
    config = gpt_config("gpt-nano", block_size=128, vocab_size=512, dropout=0.1)
    assert p.n_params == p.n_trainable == GPT(config).num_parameters()
    assert (p.config.n_layer, p.config.block_size, p.batch_size) == (3, 128, 16)
    tokens = 16 * 128
    n_mm = 3 * (4 * 48 * 48 + 2 * 48 * 192) + 512 * 48  # blocks + the (tied) head
    assert p.n_matmul == n_mm
    assert p.flops_per_step == 6 * n_mm * tokens + 12 * 3 * 128 * 48 * tokens
    assert p.step_seconds == pytest.approx(p.flops_per_step / (100e12 * 0.4))
    assert p.ddp.fits(16) and p.fsdp.total < p.ddp.total


def test_plan_of_a_multimodal_recipe_counts_the_encoder() -> None:
    pytest.importorskip("timm")
    p = plan("caption", gpus=8)
    text = plan("lm", gpus=8, overrides=["model.dropout=0.0"])
    assert p.n_params > text.n_params  # ViT + projector on top of the same decoder shape
    assert "pass --gpu-memory" in format_plan(p)


def test_advice_follows_what_fits() -> None:
    big = ["model.preset=gpt2-medium", "model.block_size=1024", "tokenizer.vocab_size=50257"]
    big += ["model.dropout=0.0", "train.batch_size=8"]
    p = plan("lm", gpus=8, overrides=big)
    assert p.fsdp.total < p.ddp.total and p.fsdp_checkpointed.total < p.fsdp.total

    def advice(gb: float) -> str:
        p.gpu_memory_gb = gb
        return format_plan(p)

    reserve = CONTEXT_RESERVE / 1e9
    assert "DDP fits" in advice(p.ddp.total / 1e9 + reserve + 0.01)
    assert "train.strategy=fsdp" in advice(p.fsdp.total / 1e9 + reserve + 0.01)
    text = advice(p.fsdp_checkpointed.total / 1e9 + reserve + 0.01)
    assert "NO" in text and "train.activation_checkpointing=true fits" in text
    assert "train.batch_size=" in advice(p.fsdp_checkpointed.total / 1e9 + reserve - 0.5)
    states = (p.fsdp.parameters + p.fsdp.optimizer) / 1e9
    assert "use more GPUs" in advice(states / 2 + reserve)


def test_mmgpt_plan_command_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    from mmgpt.cli import main

    assert main(["plan", "lm", "--gpus", "4", "--gpu-memory", "24", "--flops", "312"]) == 0
    out = capsys.readouterr().out
    assert "on 4 GPU(s) with 24 GB each" in out and "DDP" in out and "FSDP" in out
    assert "step time: ~" in out and "advice: DDP fits" in out
    assert plan_training("lm", gpus=4).count("\n") > 10
    # recipe overrides after the options, as for `mmgpt train`
    assert main(["plan", "lm", "--gpus", "2", "model.n_layer=5", "train.batch_size=3"]) == 0
    out = capsys.readouterr().out
    assert "decoder 5 layers" in out and "batch: 3 x 128 tokens" in out


def test_estimate_rejects_bad_arguments() -> None:
    model = GPT(gpt_config("gpt-nano"))
    with pytest.raises(ValueError, match="gpus"):
        estimate(model, model.config, gpus=0, batch_size=1)
    with pytest.raises(ValueError, match="mfu"):
        estimate(model, model.config, gpus=1, batch_size=1, mfu=1.5)


def test_plan_of_a_run_from_a_hugging_face_model(tmp_path) -> None:
    pytest.importorskip("transformers")
    from mmgpt.hf_fixtures import build_hf_model_dir

    source = build_hf_model_dir(tmp_path / "llama", "llama")  # 2 layers, 64 wide, 256 positions
    p = plan("lm", gpus=1, overrides=[f"model.from={source}"])
    # as training does: the model keeps its architecture; the recipe's block_size (128) is
    # the training window
    assert (p.config.n_layer, p.config.n_embd, p.config.n_kv_head) == (2, 64, 2)
    assert p.config.gated_mlp and p.config.block_size == 128


@pytest.mark.parametrize("recipe", ["judge", "autoencoder"])
def test_plan_refuses_image_model_recipes_by_name(recipe: str) -> None:
    # these recipes have no GPT preset: the error must say why, not "needs 'preset'"
    with pytest.raises(ValueError, match=f"model.architecture is '{recipe}'"):
        plan_training(recipe, gpus=2)
