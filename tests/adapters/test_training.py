"""Adapters through the recipes: `mmgpt train ... --adapter lora`, model dirs, exact resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmgpt_text")

from mmgpt.adapters import adapter_names
from mmgpt.files import load_tensors
from mmgpt.model import GPT
from mmgpt.pretrained import merge_and_save
from mmgpt.recipe import apply_overrides, load_recipe, run_training, validate_recipe

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "tokenizer.vocab_size=300",
    "train.batch_size=4",
    "train.eval_batches=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
    "train.log_every=1",
]
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    words = [
        "the",
        "red",
        "circle",
        "is",
        "left",
        "of",
        "the",
        "blue",
        "square",
        "and",
        "a",
        "green",
        "star",
        "sits",
        "on",
        "top",
    ]
    lines = [" ".join(words[i % 7 :] + words[: i % 7]) for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("base")
    run_training("lm", data=corpus, out=out, overrides=[*TINY, "train.max_steps=4"])
    return out / "model"


def finetune(corpus: Path, base: Path, out: Path, *extra: str, resume: bool = False) -> dict:
    overrides = [*TINY, f"model.from={base}", "train.warmup_steps=0", *extra]
    return run_training("lm", data=corpus, out=out, resume=resume, overrides=overrides)


def test_cli_trains_an_adapter_that_peft_loads_onto_the_base(corpus, base, tmp_path, capsys):
    from peft import PeftModel

    from mmgpt.cli import main

    out = tmp_path / "lora"
    args = ["train", "lm", "--data", str(corpus), "--out", str(out), "--adapter", "lora"]
    args += [*TINY, f"model.from={base}", "train.max_steps=3", "adapter.r=1", "train.lr=1e-2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    trainable, total = (
        int(n.replace(",", ""))
        for n in re.search(r"parameters: ([\d,]+) trainable / ([\d,]+) total", printed).groups()
    )
    assert 0 < trainable / total < 0.05

    model_dir = out / "model"
    assert (model_dir / "adapters" / "default" / "adapter_model.safetensors").is_file()
    assert json.loads((model_dir / "config.json").read_text())["adapters"]["active"] == "default"
    # the base weights are the base's, untouched by training
    ours, theirs = (
        load_tensors(model_dir / "model.safetensors"),
        load_tensors(base / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    tuned = GPT.from_pretrained(model_dir).eval()
    plain = GPT.from_pretrained(model_dir, adapter=None).eval()
    expected = tuned(IDS).logits
    assert not torch.allclose(expected, plain(IDS).logits, atol=1e-4)  # the adapter learned
    peft_model = PeftModel.from_pretrained(plain, model_dir / "adapters" / "default").eval()
    torch.testing.assert_close(peft_model(IDS).logits, expected, rtol=0, atol=0)

    generate = ["generate", "--model", str(model_dir), "--prompt", "the red", "--temperature", "0"]
    generate += ["--max-new-tokens", "3"]
    assert main([*generate, "--adapter", "none"]) == 0
    assert main([*generate, "--adapter", "nope"]) == 2
    assert "no such adapter (adapters in" in capsys.readouterr().err

    merged = merge_and_save(model_dir, tmp_path / "merged")
    torch.testing.assert_close(
        GPT.from_pretrained(merged)(IDS).logits, expected, atol=1e-5, rtol=1e-5
    )

    # a run from this LoRA model starts from it with the adapter folded in
    again = finetune(
        corpus,
        model_dir,
        tmp_path / "second",
        "train.max_steps=1",
        "adapter=dora",
        "adapter.name=second",
    )
    second = GPT.from_pretrained(again["model_dir"], adapter=None).eval()
    torch.testing.assert_close(second(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert adapter_names(GPT.from_pretrained(again["model_dir"])) == ["second"]


@pytest.mark.parametrize("save_frozen", [True, False])
def test_resume_with_an_adapter_is_bit_identical(corpus, base, tmp_path, save_frozen):
    # a constant learning rate: the interrupted run may have a smaller max_steps
    settings = [
        "adapter.method=lora",
        "adapter.r=2",
        "adapter.dropout=0.1",
        "train.lr=5e-3",
        "train.min_lr=5e-3",
        "train.save_every=3",
        f"train.save_frozen={save_frozen}",
    ]
    whole = finetune(corpus, base, tmp_path / "whole", *settings, "train.max_steps=6")
    finetune(corpus, base, tmp_path / "cut", *settings, "train.max_steps=3")
    with pytest.warns(RuntimeWarning, match="changed recipe"):
        resumed = finetune(
            corpus, base, tmp_path / "cut", *settings, "train.max_steps=6", resume=True
        )
    assert resumed["step"] == whole["step"] == 6

    checkpoint = load_tensors(
        tmp_path / "cut" / "checkpoints" / "step_00000003" / "model.safetensors"
    )
    assert any("lora_A" in k for k in checkpoint)
    assert ("transformer.wte.weight" in checkpoint) is save_frozen
    for name in ("model.safetensors", "adapters/default/adapter_model.safetensors"):
        a = load_tensors(Path(whole["model_dir"]) / name)
        b = load_tensors(Path(resumed["model_dir"]) / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    changed = load_tensors(Path(whole["model_dir"]) / "adapters/default/adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in changed.items())


def test_adapter_section_in_recipes_and_its_errors(corpus, base, tmp_path):
    recipe = apply_overrides(load_recipe("lm"), ["adapter=dora", "adapter.targets=decoder_mlp"])
    validate_recipe(recipe)
    assert recipe["adapter"] == {"method": "dora", "targets": "decoder_mlp"}
    with pytest.raises(ValueError, match=r"'adapter.alpah'.*did you mean adapter.alpha\?"):
        apply_overrides(load_recipe("lm"), ["adapter.alpah=2"])
    with pytest.raises(ValueError, match="need an adapter: set adapter.method=lora"):
        finetune(corpus, base, tmp_path / "a", "adapter.r=2", "train.max_steps=1")
    with pytest.raises(ValueError, match="'adapter.method' must be one of lora, dora"):
        finetune(corpus, base, tmp_path / "b", "adapter.method=ia3", "train.max_steps=1")
    with pytest.raises(ValueError, match="recipe section 'adapter'.*match no Linear layer"):
        finetune(
            corpus, base, tmp_path / "c", "adapter=lora", "adapter.targets=vit", "train.max_steps=1"
        )


def test_multimodal_recipe_with_an_adapter(tmp_path):
    pytest.importorskip("timm")
    from mmgpt.multimodal import MultimodalGPT

    out = tmp_path / "cap"
    overrides = [
        "adapter=lora",
        "adapter.r=2",
        "adapter.targets=decoder,projector",
        "adapter.train_extra=output_projector",  # not in this model: trains nothing extra
        "model.n_layer=1",
        "model.block_size=64",
        "tokenizer.vocab_size=300",
        "data.size=24",
        "data.max_shapes=1",
        "data.eval_fraction=0.2",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.eval_batches=1",
        "train.progress=false",
        "train.tensorboard=false",
        "train.device=cpu",
    ]
    result = run_training("caption", out=out, overrides=overrides)
    model = MultimodalGPT.from_pretrained(result["model_dir"])
    assert adapter_names(model) == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(n.startswith("projectors.image.") for n in trainable)
    assert any(n.startswith("gpt.transformer.h.0.") for n in trainable)
