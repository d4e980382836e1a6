"""Distributed settings in one process: activation checkpointing, a world of one, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmgpt import distributed
from mmgpt.config import gpt_config
from mmgpt.model import GPT
from mmgpt.objectives.lm import LMObjective
from mmgpt.trainer import TrainConfig, Trainer


def tiny_gpt(**overrides: object) -> GPT:
    torch.manual_seed(0)
    config = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    return GPT(gpt_config("gpt-nano", **{**config, **overrides}))


def gradients(model: GPT, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks for both runs
    LMObjective()(model, {"input_ids": ids}).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_activation_checkpointing_gives_the_same_gradients(pos_encoding: str) -> None:
    ids = torch.randint(0, 64, (3, 17))
    model = tiny_gpt(dropout=0.1, pos_encoding=pos_encoding).train()
    plain = gradients(model, ids)
    assert distributed.apply_activation_checkpointing(model) == 2
    checkpointed = gradients(model, ids)
    assert plain.keys() == checkpointed.keys()
    for name in plain:  # recomputation replays the same ops and dropout masks: bit-identical
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
    # the names (state dict, optimizer groups) are unchanged and eval skips the checkpoint
    assert set(model.state_dict()) == set(tiny_gpt(pos_encoding=pos_encoding).state_dict())
    model.eval()
    with torch.no_grad():
        model(ids[:, :16])


def test_activation_checkpointing_needs_decoder_blocks() -> None:
    with pytest.raises(ValueError, match="activation_checkpointing"):
        distributed.apply_activation_checkpointing(torch.nn.Linear(2, 2))


def test_config_validates_the_distributed_fields() -> None:
    with pytest.raises(ValueError, match=r"TrainConfig\.strategy: expected one of"):
        TrainConfig(strategy="zero3")
    with pytest.raises(ValueError, match=r"TrainConfig\.activation_checkpointing"):
        TrainConfig(activation_checkpointing="yes")
    assert TrainConfig().strategy == "none"


def test_strategy_none_refuses_a_multi_process_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="train.strategy=ddp or train.strategy=fsdp"):
        distributed.setup("none")
    monkeypatch.delenv("RANK")
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        distributed.setup("ddp")


class Windows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.data = torch.randint(0, 64, (12, 17), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i]}


def test_ddp_and_fsdp_without_torchrun_run_as_a_world_of_one(tmp_path: Path) -> None:
    """No launcher: the same code path in a one-process group (HashStore, gloo)."""
    import torch.distributed as dist

    config = dict(max_steps=2, warmup_steps=1, batch_size=2, save_every=0, eval_every=0)
    config.update(log_every=1, progress=False, tensorboard=False, device="cpu", seed=0)
    created = not dist.is_initialized()
    try:
        losses = {}
        for strategy in ("none", "ddp", "fsdp"):
            trainer = Trainer(
                tiny_gpt(),
                "lm",
                Windows(),
                {**config, "strategy": strategy, "compile": strategy == "ddp"},
                out_dir=tmp_path / strategy,
            )
            if strategy == "ddp":  # compile is lazy: each block is compiled in place
                assert all(b._compiled_call_impl is not None for b in trainer.model.transformer.h)
                trainer.wrapped_model.module.transformer.h.apply(_uncompile)
            trainer.fit()
            lines = (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()
            losses[strategy] = [json.loads(line)["loss"] for line in lines]
            assert (tmp_path / strategy / "model" / "model.safetensors").is_file()
        assert dist.is_initialized() and dist.get_world_size() == 1
        for strategy in ("ddp", "fsdp"):
            assert losses[strategy] == pytest.approx(losses["none"], rel=1e-6)
        # the FSDP run's checkpoint is sharded even in a world of one
        assert (tmp_path / "fsdp" / "checkpoints" / "step_00000002" / "dcp").is_dir()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _uncompile(module: torch.nn.Module) -> None:
    # compiling needs a C++ toolchain and takes tens of seconds on CPU: run eagerly here
    if hasattr(module, "_compiled_call_impl"):
        module._compiled_call_impl = None
