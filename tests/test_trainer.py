"""The training loop: learning, schedule, weight-decay groups, accumulation, clipping, outputs."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, default_collate

from mmgpt.checkpoint import verify_checkpoint_dir
from mmgpt.config import GPTConfig
from mmgpt.data.text import TextDataset
from mmgpt.files import load_tensors
from mmgpt.model import GPT
from mmgpt.objectives.lm import LMObjective
from mmgpt.processor import MultimodalBatch
from mmgpt.trainer import TrainConfig, Trainer, _count_tokens, learning_rate

V = 40


class CharTokenizer:
    """Characters of a fixed alphabet after <pad> <bos> <eos>."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, alphabet: str = "abcdefghijklmnopqrstuvwxyz .,") -> None:
        self.alphabet = alphabet

    @property
    def vocab_size(self) -> int:
        return 3 + len(self.alphabet)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return [3 + self.alphabet.index(c) for c in text if c in self.alphabet]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)

    def token_to_id(self, token: str) -> int | None:
        return 3 + self.alphabet.index(token) if token in self.alphabet else None

    def save(self, directory) -> None:
        Path(directory, "tokenizer.json").write_text(json.dumps({"alphabet": self.alphabet}))

    def config_dict(self) -> dict:
        return {"name": "chars"}


class RandomLabelled(Dataset):
    """Random sequences whose number of trained-on targets varies a lot between samples."""

    def __init__(self, n: int = 16, T: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, T), generator=g)
        self.labels = self.ids.clone()
        for i in range(n):
            self.labels[i, : int(torch.randint(0, T - 1, (1,), generator=g))] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_gpt(dropout: float = 0.0, vocab_size: int = V, bias: bool = True) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32,
                       dropout=dropout, bias=bias)  # fmt: skip
    return GPT(config)


def config(**overrides) -> TrainConfig:
    base = dict(
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=2,
        max_steps=6,
        batch_size=4,
        eval_every=0,
        save_every=0,
        log_every=1,
        progress=False,
        tensorboard=False,
        device="cpu",
    )
    return TrainConfig(**{**base, **overrides})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- TrainConfig --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lr", 0.0, "TrainConfig.lr: expected a positive number"),
        ("lr", "3e-4", "TrainConfig.lr: expected a number"),
        ("min_lr", 1.0, "TrainConfig.min_lr: must not exceed lr"),
        ("betas", (0.9,), "TrainConfig.betas"),
        ("max_steps", 0, "TrainConfig.max_steps: expected an integer >= 1"),
        ("batch_size", 2.5, "TrainConfig.batch_size"),
        ("grad_accum_steps", 0, "TrainConfig.grad_accum_steps"),
        ("precision", "fp8", "TrainConfig.precision: expected one of"),
        ("device", "tpu", "TrainConfig.device"),
        ("compile", "yes", "TrainConfig.compile"),
        ("warmup_steps", -1, "TrainConfig.warmup_steps"),
    ],
)
def test_config_validation_names_the_field(field: str, value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_config_from_dict() -> None:
    cfg = TrainConfig.from_dict({"lr": 1e-3, "betas": [0.8, 0.9]})
    assert cfg.betas == (0.8, 0.9) and cfg.to_dict()["betas"] == [0.8, 0.9]
    with pytest.raises(ValueError, match="unknown field.*'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})


def test_compile_without_a_cpp_compiler_fails_up_front(tmp_path, monkeypatch) -> None:
    import mmgpt.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "missing_compiler", lambda: "no C++ compiler (test)")
    with pytest.raises(RuntimeError, match=r"train.compile=true: no C\+\+ compiler \(test\)"):
        Trainer(tiny_gpt(), LMObjective(), RandomLabelled(), config(compile=True), out_dir=tmp_path)


# -- learning -------------------------------------------------------------------------------


def test_loss_drops_on_a_repeated_corpus(tmp_path: Path, capsys) -> None:
    text = "the cat sat on the mat. the dog sat on the log. " * 12
    (tmp_path / "c.txt").write_text(text)
    tok = CharTokenizer()
    args = dict(paths=tmp_path / "c.txt", tokenizer=tok, block_size=16, eval_fraction=0.1)
    train, held = TextDataset(split="train", **args), TextDataset(split="eval", **args)
    model = tiny_gpt(dropout=0.1, vocab_size=tok.vocab_size)
    cfg = config(lr=5e-3, min_lr=5e-4, warmup_steps=5, max_steps=60, batch_size=8,
                 eval_every=30, log_every=1)  # fmt: skip
    trainer = Trainer(model, LMObjective(), train, cfg, eval_data=held, out_dir=tmp_path / "run")
    result = trainer.fit()
    out = capsys.readouterr().out
    n = sum(p.numel() for p in model.parameters())
    assert f"parameters: {n:,} trainable / {n:,} total" in out

    records = read_metrics(tmp_path / "run")
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [30, 60]
    assert math.log(tok.vocab_size) - 0.3 < train_losses[0]  # starts near uniform
    assert train_losses[-1] < 0.3 * train_losses[0]
    assert evals[-1]["loss"] < min(1.0, evals[0]["loss"])
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["loss"]))
    assert result["eval"] == {k: v for k, v in evals[-1].items() if k not in ("step", "split")}
    for r in records:
        if r["split"] == "train":
            assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(r)
            assert r["tokens"] == 8 * 16


def test_tokens_counted_are_the_unpadded_ones_of_any_batch() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    ids = torch.zeros(2, 4, dtype=torch.long)
    assert _count_tokens({}, MultimodalBatch(input_ids=ids, attention_mask=mask)) == 5
    assert _count_tokens({}, {"input_ids": ids, "attention_mask": mask}) == 5
    assert _count_tokens({}, {"input_ids": ids}) == 8  # packed windows: no padding
    assert _count_tokens({"tokens": 3.0}, {"input_ids": ids}) == 3  # the objective's own count


# -- schedule -------------------------------------------------------------------------------


def expected_lr(s: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    if s < warmup:
        return lr * (s + 1) / (warmup + 1)
    progress = (s - warmup) / (max_steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_warmup_then_cosine_schedule(tmp_path: Path) -> None:
    cfg = config(lr=1e-2, min_lr=1e-3, warmup_steps=4, max_steps=12)
    trainer = Trainer(tiny_gpt(), LMObjective(), RandomLabelled(), cfg, out_dir=tmp_path)
    trainer.fit()
    lrs = [r["lr"] for r in read_metrics(tmp_path)]
    assert len(lrs) == 12
    for step, lr in enumerate(lrs):  # the record of step k holds the lr of update k
        assert lr == pytest.approx(expected_lr(step, 1e-2, 1e-3, 4, 12), rel=1e-12)
        assert lr == pytest.approx(learning_rate(step, cfg), rel=1e-12)
    assert lrs[4] == pytest.approx(1e-2)  # peak right after warmup
    assert lrs[0] == pytest.approx(1e-2 / 5)
    assert learning_rate(12, cfg) == pytest.approx(1e-3)  # ends at min_lr
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))  # decays monotonically


# -- parameter groups ---------------------------------------------------------------------


def test_weight_decay_only_on_matrices_and_frozen_parameters_excluded(tmp_path: Path) -> None:
    model = tiny_gpt()
    model.transformer.wpe.weight.requires_grad_(False)
    cfg = config(weight_decay=0.05)
    trainer = Trainer(model, LMObjective(), RandomLabelled(), cfg, out_dir=tmp_path)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.05
    assert groups["no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert "transformer.wte.weight" in decay and "transformer.h.0.attn.c_attn.weight" in decay
    assert "transformer.h.0.attn.c_attn.bias" in no_decay
    assert "transformer.h.1.ln_1.weight" in no_decay and "transformer.ln_f.bias" in no_decay
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert all(p.dim() < 2 for p in groups["no_decay"]["params"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert "transformer.wpe.weight" not in trainable

    frozen_before = model.transformer.wpe.weight.detach().clone()
    wte_before = model.transformer.wte.weight.detach().clone()
    trainer.fit()
    assert torch.equal(model.transformer.wpe.weight, frozen_before)
    assert not torch.equal(model.transformer.wte.weight, wte_before)


def test_nothing_trainable_is_an_error(tmp_path: Path) -> None:
    model = tiny_gpt().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        Trainer(model, LMObjective(), RandomLabelled(), config(), out_dir=tmp_path)


# -- accumulation and clipping -------------------------------------------------------------


def test_grad_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    data = RandomLabelled(n=16)
    # no biases: the key bias has an exactly-zero true gradient (softmax is shift-invariant),
    # and Adam would blow its rounding noise up to lr-sized updates
    base = tiny_gpt(bias=False)
    # a small lr: Adam divides by sqrt(v) + eps, which turns float rounding in near-zero
    # gradients into lr-sized differences; with lr=1e-4 the runs must agree to 1e-6 while
    # weights move by ~6e-4
    cfg = dict(lr=1e-4, min_lr=1e-5)
    big = Trainer(
        copy.deepcopy(base), "lm", data, config(batch_size=4, **cfg), out_dir=tmp_path / "a"
    )
    small = Trainer(
        copy.deepcopy(base),
        "lm",
        data,
        config(batch_size=2, grad_accum_steps=2, **cfg),
        out_dir=tmp_path / "b",
    )
    samples = [data[i] for i in range(4)]
    m_big = big.compute_gradients([default_collate(samples)])
    m_small = small.compute_gradients([default_collate(samples[:2]), default_collate(samples[2:])])
    assert m_big["tokens"] == m_small["tokens"]
    assert m_big["loss"] == pytest.approx(m_small["loss"], rel=1e-6)
    grads_big = [p.grad for p in big.model.parameters()]
    grads_small = [p.grad for p in small.model.parameters()]
    for a, b in zip(grads_big, grads_small):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    # a mean of the two micro-batch means would be a different gradient
    naive = copy.deepcopy(base)
    lm = LMObjective()
    loss = sum(lm(naive, default_collate(s)).loss for s in (samples[:2], samples[2:])) / 2
    loss.backward()
    diff = max((a - p.grad).abs().max().item() for a, p in zip(grads_big, naive.parameters()))
    assert diff > 1e-4

    # whole runs: the same weights after several steps (data order is shared)
    big.optimizer.zero_grad(set_to_none=True)
    small.optimizer.zero_grad(set_to_none=True)
    big.fit()
    small.fit()
    for (name, a), b in zip(big.model.state_dict().items(), small.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    moved = max(
        (a - b).abs().max().item() for a, b in zip(big.model.parameters(), base.parameters())
    )
    assert moved > 1e-4
    losses = lambda d: [r["loss"] for r in read_metrics(d)]  # noqa: E731
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)


def test_clipping_by_global_norm(tmp_path: Path) -> None:
    data = RandomLabelled()
    trainer = Trainer(tiny_gpt(), "lm", data, config(grad_clip=1e-3), out_dir=tmp_path)
    trainer.compute_gradients([default_collate([data[i] for i in range(4)])])
    before = trainer.clip_gradients()
    after = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in trainer.model.parameters()])
    )
    assert before > 1e-2
    assert float(after) == pytest.approx(1e-3, rel=1e-4)

    unclipped = Trainer(tiny_gpt(), "lm", data, config(grad_clip=0.0), out_dir=tmp_path / "u")
    unclipped.compute_gradients([default_collate([data[i] for i in range(4)])])
    norm = unclipped.clip_gradients()
    assert norm == pytest.approx(before, rel=1e-6)
    total = torch.stack([p.grad.norm() for p in unclipped.model.parameters()]).norm()
    assert float(total) == pytest.approx(norm, rel=1e-5)


# -- evaluation, outputs, checkpoints -------------------------------------------------------


def test_evaluate_leaves_rng_untouched(tmp_path: Path) -> None:
    data = RandomLabelled()
    trainer = Trainer(tiny_gpt(0.2), "lm", data, config(), eval_data=data, out_dir=tmp_path)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    first = trainer.evaluate()
    assert torch.equal(torch.rand(4), expected)
    assert trainer.model.training  # back in train mode
    assert trainer.evaluate() == first
    assert first["tokens"] == float((data.labels[:, 1:] != -100).sum())  # all 4 batches


def test_outputs_checkpoints_and_final_model(tmp_path: Path) -> None:
    tok = CharTokenizer()
    model = tiny_gpt(vocab_size=tok.vocab_size)
    data = RandomLabelled()
    data.ids %= tok.vocab_size
    data.labels = torch.where(data.labels == -100, data.labels, data.ids)
    cfg = config(save_every=2, keep_last=2, tensorboard=True)
    trainer = Trainer(model, "lm", data, cfg, out_dir=tmp_path, tokenizer=tok)
    trainer.fit()

    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000006"]  # keep_last=2
    last = tmp_path / "checkpoints" / "step_00000006"
    manifest = verify_checkpoint_dir(last)
    names = {p.name for p in last.iterdir()}
    assert names == set(manifest["files"]) | {"manifest.json"}
    assert all(n.endswith((".json", ".safetensors")) for n in names)  # no pickle anywhere
    opt = load_tensors(last / "optimizer.safetensors")
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(opt)
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"]["index"] == 6 % 4 and state["data"]["epoch"] == 1
    assert set(state["rng"]) == {"python", "numpy"}
    assert "torch_cpu" in load_tensors(last / "rng.safetensors")

    loaded = GPT.from_pretrained(tmp_path / "model")
    ids = torch.randint(0, tok.vocab_size, (1, 8))
    model.eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    config_json = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config_json["tokenizer"] == {"name": "chars"}
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    assert any((tmp_path / "tensorboard").iterdir())

    again = Trainer(tiny_gpt(vocab_size=tok.vocab_size), "lm", data, cfg, out_dir=tmp_path)
    with pytest.raises(FileExistsError, match="already holds checkpoints .*step_00000006"):
        again.fit()


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    cfg = config(precision="bf16", max_steps=2)
    trainer = Trainer(tiny_gpt(), "lm", RandomLabelled(), cfg, out_dir=tmp_path)
    assert trainer.precision == "bf16"
    result = trainer.fit()
    assert math.isfinite(result["train"]["loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_auto_precision_is_fp32_on_cpu(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_gpt(), "lm", RandomLabelled(), config(precision="auto"), out_dir=tmp_path
    )
    assert trainer.precision == "fp32" and trainer.device.type == "cpu"
