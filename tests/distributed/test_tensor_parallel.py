"""Tensor parallelism (tp=2 on two gloo CPU processes) against one process, and its plan.

One torchrun launch (``_tp_worker.py``) runs every two-process scenario: a learned-position
multi-head model and a rotary grouped-query gated-MLP model trained with a manual AdamW loop,
their sharded checkpoints reloaded into fresh split models, and the Trainer with
``train.tensor_parallel=2`` (``strategy: fsdp`` on a 1 x 2 mesh). Tolerance: losses and
gradient norms within rtol 1e-5 of one process on the same batches (measured: below 3e-7).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

pytestmark = pytest.mark.slow  # one torchrun launch (~25 s of CPU) shared by the module
HERE = Path(__file__).parent
RTOL = 1e-5


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"mmgpt_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tp_worker = _load("_tp_worker")
worker = _load("_worker")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tensor_parallel")
    spec = root / "spec.json"
    spec.write_text(json.dumps({"root": str(root), "kinds": ["mha", "gqa"], "trainer": "tp"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(HERE / "_tp_worker.py"), str(spec)]
    proc = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    result = json.loads((root / "result.json").read_text())
    result["root"] = root
    for kind in ("mha", "gqa"):  # single-process references on the same batches
        model, optimizer, record = tp_worker.train(kind)
        record["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record["next_loss"] = tp_worker.next_loss(kind, model, optimizer)
        result[f"ref_{kind}"] = record
    worker.run_gpt(root / "ref_trainer")
    # the tensor-parallel run's sharded step-2 checkpoint, resumed by one plain process
    (root / "resumed" / "checkpoints").mkdir(parents=True)
    step2 = Path("checkpoints") / "step_00000002"
    shutil.copytree(root / "tp" / step2, root / "resumed" / step2)
    worker.run_gpt(root / "resumed", resume=True)
    return result


def metrics(out: Path, split: str = "train") -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_split_model_trains_like_one_process(runs: dict[str, Any], kind: str) -> None:
    got, want = runs[kind], runs[f"ref_{kind}"]
    for key in ("loss", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=RTOL)
    # each rank computes half the heads (GQA: 2 of 4 query heads, 1 of 2 key/value heads)
    config = tp_worker.MODELS[kind]
    heads, kv_heads = config["n_head"], config.get("n_kv_head", config["n_head"])
    assert got["local_heads"] == [heads // 2, kv_heads // 2]
    head_dim = config["n_embd"] // heads
    assert got["local_c_attn_rows"] == (heads + 2 * kv_heads) * head_dim // 2


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_sharded_checkpoint_round_trips_and_gathers_to_the_plain_layout(
    runs: dict[str, Any], kind: str
) -> None:
    from mmgpt.distributed import read_sharded_model_state
    from mmgpt.files import load_tensors

    got, want = runs[kind], runs[f"ref_{kind}"]
    # a fresh split model restored from the checkpoint takes exactly the step the trained one
    # takes (weights and AdamW moments), which is also the single-process step
    assert got["resumed_next_loss"] == got["next_loss"]
    # and full weights in the ordinary layout (a one-process checkpoint) load into one too
    assert got["full_loaded_loss"] == pytest.approx(got["next_loss"], rel=RTOL)
    assert got["next_loss"] == pytest.approx(want["next_loss"], rel=RTOL)
    # on disk and gathered, the fused q/k/v and gate/up rows are in the ordinary order:
    # the single-process model's state dict, key for key
    reference = want["state"]
    directory = runs["root"] / kind
    for state in (
        load_tensors(directory / "full.safetensors"),
        read_sharded_model_state(directory / "dcp"),
    ):
        assert set(state) == set(reference)
        for name, value in state.items():
            # atol: AdamW turns float noise in near-zero gradients (the key bias has none in
            # exact arithmetic) into updates of ~2e-5; a misplaced row of weights ~0.02 in size
            # would be off by far more
            torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-4, msg=name)


def test_trainer_with_tensor_parallel_matches_one_process(runs: dict[str, Any]) -> None:
    from mmgpt.distributed import consolidate
    from mmgpt.model import GPT

    root = runs["root"]
    for split in ("train", "eval"):
        got, want = metrics(root / "tp", split), metrics(root / "ref_trainer", split)
        assert got.keys() == want.keys()
        for step in got:
            for key in ("loss", "grad_norm", "tokens"):
                if key in want[step]:
                    assert got[step][key] == pytest.approx(want[step][key], rel=RTOL), (step, key)
    # both ranks of the tensor-parallel group read the same samples
    indices = [json.loads((root / "tp" / f"indices_rank{r}.json").read_text()) for r in (0, 1)]
    assert indices[0] == indices[1]
    # the final model, a consolidated checkpoint, and a one-process resume of the split run's
    # checkpoint are all ordinary: they load and compute the single-process logits
    out = consolidate(root / "tp" / "checkpoints" / "step_00000004", root / "consolidated")
    ids = torch.randint(
        0, worker.VOCAB, (2, worker.BLOCK), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        want_logits = GPT.from_pretrained(root / "ref_trainer" / "model").eval()(ids).logits
        for directory in (root / "tp" / "model", out, root / "resumed" / "model"):
            got_logits = GPT.from_pretrained(directory).eval()(ids).logits
            torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    assert metrics(root / "resumed")[4]["loss"] == pytest.approx(
        metrics(root / "ref_trainer")[4]["loss"], rel=RTOL
    )


def test_tensor_parallel_must_divide_the_processes(runs: dict[str, Any]) -> None:
    for message in runs["errors"].values():
        assert "must divide the number of processes (2)" in message


def test_tensor_parallel_must_split_whole_heads() -> None:
    from mmgpt.config import gpt_config
    from mmgpt.model import GPT
    from mmgpt.tensor_parallel import check_tensor_parallel

    def model(**kw: Any) -> GPT:
        return GPT(gpt_config("gpt-nano", n_layer=1, n_embd=24, block_size=8, vocab_size=16, **kw))

    with pytest.raises(
        ValueError, match=r"tensor_parallel=2 must divide the model's n_kv_head \(1\)"
    ):
        check_tensor_parallel(model(n_head=4, n_kv_head=1), 2, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel=2 must divide the model's n_head \(3\)"):
        check_tensor_parallel(model(n_head=3), 2, 2)
    with pytest.raises(ValueError, match="MLP hidden size"):
        check_tensor_parallel(model(n_head=2, intermediate_size=25), 2, 2)
    assert len(check_tensor_parallel(model(n_head=4, n_kv_head=2), 2, 4)) == 1


def test_tensor_parallel_needs_fsdp() -> None:
    from mmgpt.distributed import wrap_model
    from mmgpt.trainer import TrainConfig

    with pytest.raises(ValueError, match="TrainConfig.tensor_parallel: > 1 needs strategy 'fsdp'"):
        TrainConfig(strategy="ddp", tensor_parallel=2)
    with pytest.raises(ValueError, match="TrainConfig.tensor_parallel"):
        TrainConfig(strategy="fsdp", tensor_parallel=0)
    with pytest.raises(ValueError, match="needs train.strategy=fsdp"):
        wrap_model(
            torch.nn.Linear(2, 2), strategy="ddp", device=torch.device("cpu"), tensor_parallel=2
        )


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_plan_predicts_what_a_tensor_parallel_rank_holds(runs: dict[str, Any], kind: str) -> None:
    from mmgpt.plan import _split_params, activation_bytes, state_bytes

    model = tp_worker.gpt(kind)
    n = sum(p.numel() for p in model.parameters())
    split, split_trainable, _ = _split_params(model)
    predicted = state_bytes(
        n,
        n,
        len(list(model.parameters())),
        strategy="fsdp",
        gpus=2,
        tensor_parallel=2,
        n_split=split,
        n_split_trainable=split_trainable,
    )
    assert runs[kind]["bytes"] == predicted  # exact: the split halves, the rest stays whole
    config = model.config
    tokens = tp_worker.BLOCK
    split_estimate = activation_bytes(
        config, tp_worker.BATCH, act=4, tokens=tokens, tensor_parallel=2
    )
    assert runs[kind]["activations"] == pytest.approx(split_estimate, rel=0.05)
    whole = activation_bytes(config, tp_worker.BATCH, act=4, tokens=tokens)
    assert runs[kind]["activations"] < 0.8 * whole


def test_mmgpt_plan_reads_tensor_parallel_from_the_recipe() -> None:
    from mmgpt.plan import format_plan, plan

    overrides = ["model.n_head=4", "train.strategy=fsdp"]
    base = plan("lm", gpus=4, gpu_memory=24, overrides=overrides)
    split = plan("lm", gpus=4, gpu_memory=24, overrides=[*overrides, "train.tensor_parallel=2"])
    assert split.tensor_parallel == 2
    assert split.ddp.total == base.ddp.total  # DDP cannot split blocks: unchanged
    assert split.fsdp.activations < base.fsdp.activations
    # the same FSDP sharding (over 2), and the blocks halved on top of it
    halves = plan("lm", gpus=2, overrides=overrides).fsdp
    for key in ("parameters", "gradients", "optimizer", "compute_copies"):
        assert getattr(split.fsdp, key) < getattr(halves, key)
    assert split.flops_per_step < base.flops_per_step  # each GPU does part of every block
    text = format_plan(split)
    assert "FSDPxTP2" in text and "FSDP over 2 x tensor_parallel 2" in text
    assert "all-reduces" in text
    with pytest.raises(ValueError, match=r"must divide the model's n_head \(3\)"):
        plan("lm", gpus=4, overrides=["train.strategy=fsdp", "train.tensor_parallel=2"])
    with pytest.raises(ValueError, match=r"must divide the number of processes \(3\)"):
        plan("lm", gpus=3, overrides=[*overrides, "train.tensor_parallel=2"])
