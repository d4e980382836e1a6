"""QLoRA: an int4 base trains exact gradients, and recipes train on a quantised base
(`--adapter lora adapter.quantize=int8|int4|nf4`) and still write a float model directory."""

from __future__ import annotations

import json
import re
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from mmgpt.adapters import AdapterConfig, adapter_names, add_adapter
from mmgpt.adapters.quantize import quantize_base
from mmgpt.adapters.quantized import is_quantized
from mmgpt.config import gpt_config
from mmgpt.files import load_tensors
from mmgpt.model import GPT
from mmgpt.quantization import quantize_model

NEEDS_BNB = pytest.mark.skipif(find_spec("bitsandbytes") is None, reason="nf4 needs bitsandbytes")
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
TARGET = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(9))


def base_model() -> GPT:
    torch.manual_seed(0)
    config = gpt_config("gpt-nano", n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=64)
    return GPT(config).eval()


def test_int4_base_gives_the_gradients_of_its_dequantised_weights_and_saves_float(tmp_path):
    model = base_model()
    add_adapter(model, AdapterConfig(r=4, alpha=8))
    float_logits = model(IDS).logits.detach()
    float_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    layers = quantize_base(model, "int4", 32, float_base=tmp_path / "float_base.safetensors")
    assert len(layers) == 8 and is_quantized(model)
    # a float twin holding the dequantised weights: same loss, same adapter gradients
    twin = base_model()
    add_adapter(twin, AdapterConfig(r=4, alpha=8))
    with torch.no_grad():
        for name in layers:
            twin.get_submodule(name).base_layer.weight.copy_(
                model.get_submodule(name).base_layer.weight
            )
        g = torch.Generator().manual_seed(2)
        twin_params = dict(twin.named_parameters())
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                twin_params[n].copy_(p)
    for m in (model, twin):
        loss = torch.nn.functional.cross_entropy(m(IDS).logits.flatten(0, 1), TARGET.flatten())
        loss.backward()
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 8
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4)

    # the model directory holds the FLOAT base (from float_base) and the adapter
    model.save_pretrained(tmp_path / "dir")
    saved = load_tensors(tmp_path / "dir" / "model.safetensors")
    expected = {k.replace(".base_layer.", "."): v for k, v in float_state.items()}
    expected.pop("lm_head.weight")  # tied to the embeddings: stored once
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert "quantization" not in json.loads((tmp_path / "dir" / "config.json").read_text())
    loaded = GPT.from_pretrained(tmp_path / "dir")
    assert adapter_names(loaded) == ["default"] and not is_quantized(loaded)
    with torch.no_grad():
        ours = model(IDS).logits
        plain = GPT.from_pretrained(tmp_path / "dir", adapter=None)(IDS).logits
    torch.testing.assert_close(plain, float_logits)
    # the adapter on the float base ≈ the adapter on the int4 base it trained with
    deployed = loaded(IDS).logits.detach()
    assert ((deployed - ours).norm() / ours.norm()).item() < 0.15
    # `mmgpt quantize` of that directory quantises base + adapter merged: Q(W + BA), close
    # to (not equal to) the Q(W) + BA it trained with: two independent int4 roundings apart,
    # about sqrt(2) times one (< 0.15 above)
    from mmgpt.pretrained import load_model, quantize_directory

    quantize_directory(tmp_path / "dir", tmp_path / "q4", "int4", 32)
    with torch.no_grad():
        again = load_model(tmp_path / "q4")(IDS).logits
    assert ((again - ours).norm() / ours.norm()).item() < 0.25


def test_quantize_base_errors(tmp_path):
    model = base_model()
    add_adapter(model, AdapterConfig(r=4, targets=["decoder_mlp"]))
    with pytest.raises(ValueError, match=r"--group-size\) 128 does not divide the 64 input"):
        quantize_base(model, "int4")
    assert not is_quantized(model)  # checked before any layer is replaced
    quantize_base(model, "int8")  # no float_base: the adapter saves alone, not the model
    with pytest.raises(ValueError, match="cannot save the weights of a quantised base"):
        model.save_pretrained(tmp_path / "dir")
    plain = base_model()
    quantize_model(plain, "int8")  # a quantised model (no adapter) takes no adapter base
    with pytest.raises(ValueError, match="add an adapter first"):
        quantize_base(plain, "int8")


pytest.importorskip("mmgpt_text")

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=32",
    "tokenizer.vocab_size=300",
    "train.batch_size=4",
    "train.eval_batches=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.device=cpu",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    words = ["the", "red", "circle", "is", "left", "of", "the", "blue", "square", "and"]
    path.write_text("\n".join(" ".join(words[i % 7 :] + words[: i % 7]) for i in range(200)))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus) -> Path:
    from mmgpt.recipe import run_training

    out = tmp_path_factory.mktemp("base")
    run_training("lm", data=corpus, out=out, overrides=[*TINY, "train.max_steps=4"])
    return out / "model"


QUANTIZE = [
    ["adapter.quantize=int8"],
    ["adapter.quantize=int4", "adapter.group_size=32"],
    pytest.param(["adapter.quantize=nf4"], marks=NEEDS_BNB),  # its default block size, 64
]


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_cli_qlora_trains_and_writes_the_float_base_with_the_adapter(
    corpus, base, tmp_path, capsys, quantize
):
    from mmgpt.cli import main

    out = tmp_path / "qlora"
    args = ["train", "lm", "--data", str(corpus), "--out", str(out), "--adapter", "lora"]
    args += [*TINY, f"model.from={base}", "train.max_steps=12", "train.lr=1e-2", *quantize]
    args += ["train.warmup_steps=0", "train.eval_every=0"]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("split") == "train" and "loss" in r]
    assert losses[-1] < losses[0]  # the adapter learns through the quantised base
    printed = capsys.readouterr().out
    trainable = int(re.search(r"parameters: ([\d,]+) trainable", printed)[1].replace(",", ""))
    assert trainable > 0

    model_dir = out / "model"
    # the final directory's base is the float file written before quantising, byte for byte
    float_base = (out / "float_base.safetensors").read_bytes()
    assert (model_dir / "model.safetensors").read_bytes() == float_base
    ours = load_tensors(model_dir / "model.safetensors")
    theirs = load_tensors(base / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    tuned = GPT.from_pretrained(model_dir)
    assert adapter_names(tuned) == ["default"] and not is_quantized(tuned)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = GPT.from_pretrained(model_dir, adapter=None)(ids).logits
        assert not torch.allclose(tuned(ids).logits, plain, atol=1e-4)  # the adapter learned
    generate = ["generate", "--model", str(model_dir), "--prompt", "the red", "--temperature", "0"]
    assert main([*generate, "--max-new-tokens", "3"]) == 0


def test_recipe_quantize_errors(corpus, base, tmp_path):
    from mmgpt.recipe import run_training

    def run(*extra: str) -> None:
        overrides = [*TINY, f"model.from={base}", "train.max_steps=1", *extra]
        run_training("lm", data=corpus, out=tmp_path / "x", overrides=overrides)

    with pytest.raises(ValueError, match=r"'adapter.quantize': method \(--method\) must be one"):
        run("adapter=lora", "adapter.quantize=fp4")
    with pytest.raises(ValueError, match=r"must be one of int8, int4, nf4, got 'fp4'"):
        run("adapter=lora", "adapter.quantize=fp4")
    with pytest.raises(ValueError, match=r"--group-size\) must be one of 32, 64, 128, 256 for nf4"):
        run("adapter=lora", "adapter.quantize=nf4", "adapter.group_size=512")
    with pytest.raises(ValueError, match="'adapter.group_size' needs adapter.quantize=int4"):
        run("adapter=lora", "adapter.group_size=32")
    with pytest.raises(ValueError, match="need an adapter: set adapter.method=lora"):
        run("adapter.quantize=int8")
    from mmgpt.pretrained import quantize_directory

    quantize_directory(base, tmp_path / "q8", "int8")
    for extra in ([], ["adapter=lora"]):
        with pytest.raises(ValueError, match="model.from is a quantised model"):
            run(f"model.from={tmp_path / 'q8'}", *extra)


@pytest.mark.parametrize("quantize", ["int8", pytest.param("nf4", marks=NEEDS_BNB)])
def test_qlora_resume_is_bit_identical(corpus, base, tmp_path, quantize):
    from mmgpt.recipe import run_training

    settings = [*TINY, f"model.from={base}", "adapter=lora", f"adapter.quantize={quantize}"]
    settings += ["train.lr=5e-3", "train.min_lr=5e-3", "train.save_every=2", "train.eval_every=0"]
    whole = run_training(
        "lm", data=corpus, out=tmp_path / "whole", overrides=[*settings, "train.max_steps=4"]
    )
    run_training(
        "lm", data=corpus, out=tmp_path / "cut", overrides=[*settings, "train.max_steps=2"]
    )
    with pytest.warns(RuntimeWarning, match="changed recipe"):
        resumed = run_training(
            "lm",
            data=corpus,
            out=tmp_path / "cut",
            resume=True,
            overrides=[*settings, "train.max_steps=4"],
        )
    assert resumed["step"] == whole["step"] == 4
    name = "adapters/default/adapter_model.safetensors"
    a = load_tensors(Path(whole["model_dir"]) / name)
    b = load_tensors(Path(resumed["model_dir"]) / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in a.items())


@pytest.mark.parametrize("quantize", ["int4", pytest.param("nf4", marks=NEEDS_BNB)])
def test_multimodal_recipe_with_a_4_bit_base(tmp_path, quantize):
    pytest.importorskip("timm")
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.recipe import run_training

    overrides = [
        "adapter=lora",
        "adapter.r=2",
        "adapter.targets=decoder,projector",
        f"adapter.quantize={quantize}",
        "adapter.group_size=32",
        "model.n_layer=1",
        "model.n_embd=64",
        "model.n_head=2",
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
    result = run_training("caption", out=tmp_path / "cap", overrides=overrides)
    model_dir = Path(result["model_dir"])
    # the base of the final directory is the float model the run quantised, byte for byte
    float_base = (tmp_path / "cap" / "float_base.safetensors").read_bytes()
    assert (model_dir / "model.safetensors").read_bytes() == float_base
    model = MultimodalGPT.from_pretrained(model_dir)
    assert adapter_names(model) == ["default"] and not is_quantized(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("projectors.image.") and "lora_" in n for n in trainable)
