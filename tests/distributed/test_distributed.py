"""Two CPU processes (torchrun, gloo) against one: DDP, FSDP2, multimodal, resume, consolidation.

One torchrun launch runs every two-process scenario (process start-up dominates the cost);
the single-process references and the 2 -> 1 resume run in this process. Tolerance: each
logged loss and gradient norm within rtol 1e-5 of the single-process run with the same global
batch (measured differences are below 3e-7: only the order of floating-point sums differs).
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
pytest.importorskip("timm")
pytest.importorskip("mmgpt_text")

pytestmark = pytest.mark.slow  # one torchrun launch (~30 s of CPU) shared by the module
HERE = Path(__file__).parent
RTOL = 1e-5
CORPUS = "".join(
    f"The {c} {k} sits {p} the grid, and the model learns to name it.\n"
    for c in ("red", "green", "blue", "yellow")
    for k in ("circle", "square", "triangle")
    for p in ("left of", "right of", "above", "below")
)
CLI_OVERRIDES = [
    "model.n_layer=1",
    "model.block_size=16",
    "tokenizer.vocab_size=300",
    "train.strategy=fsdp",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.batch_size=2",
    "train.eval_every=0",
    "train.save_every=0",
    "train.log_every=1",
    "train.device=cpu",
    "train.progress=false",
    "train.tensorboard=false",
]


def _load_worker() -> Any:
    spec = importlib.util.spec_from_file_location("mmgpt_dist_worker", HERE / "_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


def metrics(out: Path, split: str = "train") -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["split"] == split}


def copy_checkpoint(source: Path, step: int, target: Path) -> None:
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    shutil.copy(source / "metrics.jsonl", target / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = root / "tokenizer"
    worker.train_tokenizer(tokenizer)
    result: dict[str, Any] = {"root": root}
    # single-process references: the same global batch (4 = 2 ranks x 2)
    result["ref_gpt"] = worker.run_gpt(root / "ref_gpt")
    result["ref_mm"] = worker.run_multimodal(root / "ref_mm", tokenizer)
    copy_checkpoint(root / "ref_gpt", 2, root / "resume_1to2")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)

    scenarios = [
        {"kind": "gpt", "out": "ddp", "strategy": "ddp", "activation_checkpointing": True},
        {"kind": "gpt", "out": "fsdp", "strategy": "fsdp"},
        {
            "kind": "multimodal",
            "out": "mm_fsdp",
            "strategy": "fsdp",
            "activation_checkpointing": True,
        },
        {"kind": "multimodal", "out": "mm_ddp", "strategy": "ddp"},
        {"kind": "gpt", "out": "resume_1to2", "strategy": "fsdp", "resume": True},
        {"kind": "cli", "out": "cli", "data": str(corpus), "overrides": CLI_OVERRIDES},
    ]
    for s in scenarios:
        s["out"] = str(root / s["out"])
    spec = root / "spec.json"
    spec.write_text(json.dumps({"tokenizer": str(tokenizer), "scenarios": scenarios}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(HERE / "_worker.py"), str(spec)]
    proc = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    result["stdout"] = proc.stdout
    for name in ("ddp", "fsdp", "resume_1to2", "mm_fsdp", "mm_ddp"):
        result[name] = [json.loads((root / name / f"rank{r}.json").read_text()) for r in (0, 1)]

    # 2 -> 1: the FSDP run's sharded step-2 checkpoint, resumed by one process without a
    # process group (batch_size 4: the same global batch)
    copy_checkpoint(root / "fsdp", 2, root / "resume_2to1")
    result["resume_2to1"] = worker.run_gpt(root / "resume_2to1", resume=True)
    return result


def assert_curves_match(out: Path, reference: Path, steps: range, split: str = "train") -> None:
    got, want = metrics(out, split), metrics(reference, split)
    assert sorted(got) == list(steps), f"{out.name}: logged {split} steps {sorted(got)}"
    for step in steps:
        for key in ("loss", "grad_norm", "tokens") if split == "train" else ("loss", "tokens"):
            assert got[step][key] == pytest.approx(want[step][key], rel=RTOL), (out.name, step, key)


def test_ddp_and_fsdp_give_the_single_process_loss_curve(runs: dict[str, Any]) -> None:
    root = runs["root"]
    for name in ("ddp", "fsdp"):
        assert_curves_match(root / name, root / "ref_gpt", range(1, 5))
        # eval on 7 windows: rank 0 gets 4, rank 1 gets 3 (padded with an uncounted batch)
        assert_curves_match(root / name, root / "ref_gpt", range(2, 5, 2), split="eval")
    # learning happened, so equality is not trivially of constants
    losses = [r["loss"] for r in metrics(root / "ref_gpt").values()]
    assert len(set(losses)) == len(losses)


def test_multimodal_model_gives_the_single_process_loss_curve(runs: dict[str, Any]) -> None:
    root = runs["root"]
    for name in ("mm_fsdp", "mm_ddp"):  # FSDP with activation checkpointing, and DDP
        # half the samples are text-only: some micro-batch of a rank had no image at all
        # (its encoder unused there) while the other rank's had images
        counts = [rank["images_per_batch"] for rank in runs[name]]
        assert any(0 in c for c in counts) and any(n > 0 for c in counts for n in c)
        assert_curves_match(root / name, root / "ref_mm", range(1, 4))
        assert_curves_match(root / name, root / "ref_mm", range(2, 4), split="eval")
        for step, record in metrics(root / name).items():
            want = metrics(root / "ref_mm")[step]["token_accuracy"]
            assert record["token_accuracy"] == pytest.approx(want, rel=RTOL, abs=1e-9)


def test_ranks_read_disjoint_samples_that_make_up_the_single_process_batches(
    runs: dict[str, Any],
) -> None:
    per_step = 4 * 2  # global batch x accumulation
    reference = runs["ref_gpt"]["indices"]
    assert len(reference) == 4 * per_step
    for name in ("ddp", "fsdp"):
        ranks = [r["indices"] for r in runs[name]]
        for step in range(4):
            mine = [set(r[step * per_step // 2 : (step + 1) * per_step // 2]) for r in ranks]
            assert not mine[0] & mine[1], f"{name} step {step}: a sample on both ranks"
            assert mine[0] | mine[1] == set(reference[step * per_step : (step + 1) * per_step])
    # 26 windows, 4 per micro-batch: an epoch is 6 micro-batches (3 steps), 2 windows are left
    # out; the epoch reads each of its 24 windows once, then step 4 starts a new order
    epoch = reference[: 3 * per_step]
    assert len(set(epoch)) == 24
    assert reference[3 * per_step :] != epoch[:per_step]


def test_logs_and_final_model_come_from_rank_zero_only(runs: dict[str, Any]) -> None:
    root = runs["root"]
    for name in ("ddp", "fsdp"):
        lines = (root / name / "metrics.jsonl").read_text().splitlines()
        steps = [(json.loads(x)["step"], json.loads(x)["split"]) for x in lines]
        assert len(steps) == len(set(steps)) == 6  # 4 train + 2 eval records, none twice
    # once per GPT scenario (ddp, fsdp, resume_1to2): rank 0 prints, rank 1 does not
    assert runs["stdout"].count("parameters: 28,032 trainable") == 3


def test_fsdp_checkpoint_is_sharded_with_per_rank_rng(runs: dict[str, Any]) -> None:
    path = runs["root"] / "fsdp" / "checkpoints" / "step_00000004"
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(manifest)
    assert {"rng.safetensors", "rng_rank1.safetensors", "rng_rank1.json"} <= set(manifest)
    assert "model/config.json" in manifest and not (path / "model.safetensors").exists()
    state = json.loads((path / "trainer_state.json").read_text())
    assert (state["world_size"], state["strategy"], state["sharded"]) == (2, "fsdp", True)
    ddp = runs["root"] / "ddp" / "checkpoints" / "step_00000004"
    assert (ddp / "model.safetensors").is_file() and (ddp / "rng_rank1.safetensors").is_file()


def test_resume_on_another_world_size_continues_the_same_run(runs: dict[str, Any]) -> None:
    root = runs["root"]
    # 2 (FSDP, sharded checkpoint) -> 1 process, and 1 process -> 2 (FSDP, full checkpoint)
    for name in ("resume_2to1", "resume_1to2"):
        assert_curves_match(root / name, root / "ref_gpt", range(1, 5))
        assert_curves_match(root / name, root / "ref_gpt", range(2, 5, 2), split="eval")
    # the data position is global: steps 3-4 read the reference's samples
    assert runs["resume_2to1"]["indices"][:16] == runs["ref_gpt"]["indices"][16:]
    ranks = [set(r["indices"][:8]) for r in runs["resume_1to2"]]
    assert ranks[0] | ranks[1] == set(runs["ref_gpt"]["indices"][16:])


def test_consolidated_checkpoint_is_a_model_directory_with_the_trained_logits(
    runs: dict[str, Any],
) -> None:
    from mmgpt.distributed import main as distributed_main
    from mmgpt.model import GPT

    root = runs["root"]
    out = root / "consolidated"
    checkpoint = root / "fsdp" / "checkpoints" / "step_00000004"
    assert distributed_main(["consolidate", str(checkpoint), str(out)]) == 0
    consolidated = GPT.from_pretrained(out).eval()
    gathered = GPT.from_pretrained(root / "fsdp" / "model").eval()  # written by the trainer
    reference = GPT.from_pretrained(root / "ref_gpt" / "model").eval()
    ids = torch.randint(0, worker.VOCAB, (2, worker.BLOCK))
    with torch.no_grad():
        logits = consolidated(ids).logits
        torch.testing.assert_close(logits, gathered(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    assert consolidated.lm_head.weight is consolidated.transformer.wte.weight  # still tied


def test_fsdp_shards_hold_what_the_plan_predicts(runs: dict[str, Any]) -> None:
    from mmgpt.plan import state_bytes

    model = worker.gpt_model()
    n = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    ddp = state_bytes(n, n, tensors, strategy="ddp", gpus=2)
    fsdp = state_bytes(n, n, tensors, strategy="fsdp", gpus=2)
    for rank in runs["ddp"]:
        assert rank["bytes"] == ddp  # exact: every rank holds everything
    measured = [rank["bytes"] for rank in runs["fsdp"]]
    for key in ("parameters", "gradients"):
        assert sum(m[key] for m in measured) == 2 * fsdp[key]  # the shards add up exactly
    # each rank holds its step counters in full, the moments sharded
    assert sum(m["optimizer"] for m in measured) == 2 * fsdp["optimizer"]
    for m in measured:  # dim-0 shards differ by at most a row per tensor
        for key, value in m.items():
            assert value == pytest.approx(fsdp[key], rel=0.05)


def test_consolidate_a_full_checkpoint_needs_a_config_source(runs: dict[str, Any]) -> None:
    from mmgpt.distributed import consolidate
    from mmgpt.model import GPT

    root = runs["root"]
    checkpoint = root / "ref_gpt" / "checkpoints" / "step_00000004"  # single-process: no model/
    with pytest.raises(FileNotFoundError, match="--config-from"):
        consolidate(checkpoint, root / "full")
    out = consolidate(checkpoint, root / "full", config_from=str(root / "ref_gpt" / "model"))
    ids = torch.randint(0, worker.VOCAB, (2, worker.BLOCK))
    with torch.no_grad():
        got = GPT.from_pretrained(out).eval()(ids).logits
        want = GPT.from_pretrained(root / "ref_gpt" / "model").eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mmgpt_train_under_torchrun_trains_one_tokenizer_and_one_model(
    runs: dict[str, Any],
) -> None:
    from mmgpt.model import GPT
    from mmgpt_text import TextTokenizer

    out = runs["root"] / "cli"
    tokenizer = TextTokenizer.from_file(out / "tokenizer")  # trained by rank 0 only
    model = GPT.from_pretrained(out / "model")
    assert model.config.vocab_size == tokenizer.vocab_size and model.config.n_layer == 1
    assert sorted(metrics(out)) == [1, 2]
    final = out / "checkpoints" / "step_00000002"
    assert (final / "dcp" / "__1_0.distcp").is_file()  # written by both ranks
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2


def test_consolidate_refuses_a_checkpoint_with_adapter_layers(tmp_path: Path) -> None:
    from mmgpt.checkpoint import write_checkpoint_dir
    from mmgpt.distributed import consolidate

    state = {
        "transformer.h.0.attn.c_attn.base_layer.weight": torch.zeros(6, 2),
        "transformer.h.0.attn.c_attn.lora_A.default.weight": torch.zeros(1, 2),
    }
    checkpoint = write_checkpoint_dir(
        tmp_path / "step_00000001", tensors={"model.safetensors": state}, json_files={}, step=1
    )
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"with adapters.*OUT/model"):
        consolidate(checkpoint, tmp_path / "out", config_from=str(tmp_path / "cfg"))
    assert not (tmp_path / "out").exists()
