"""Adapters in model directories: base + adapters/<name>/, auto-loading, folding, merging."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mmgpt.adapters import (
    AdapterConfig,
    adapter_dirs,
    adapter_names,
    add_adapter,
    fold_adapters,
    load_adapter,
    load_adapters,
    trainable_summary,
)
from mmgpt.config import gpt_config
from mmgpt.files import load_tensors
from mmgpt.model import GPT
from mmgpt.pretrained import merge_and_save

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def base_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(gpt_config("gpt-nano", n_layer=2, block_size=32, vocab_size=64)).eval()


def randomise_adapters(model: torch.nn.Module, seed: int) -> None:
    """peft initialises lora_B to zero (a no-op); give every trainable tensor weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def adapted(method: str = "lora", seed: int = 3, **kwargs) -> GPT:
    model = base_model()
    add_adapter(model, AdapterConfig(method=method, r=4, alpha=8, **kwargs))
    randomise_adapters(model, seed)
    return model


def test_model_dir_holds_the_base_and_the_adapter_and_loads_both_ways(tmp_path):
    from peft import PeftModel

    model = adapted()
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["adapters"] == {"names": ["default"], "active": "default"}
    assert set(adapter_dirs(tmp_path)) == {"default"}
    # model.safetensors: the untouched base under its original names
    weights = load_tensors(tmp_path / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    base = base_model()
    torch.testing.assert_close(
        weights["transformer.h.0.attn.c_attn.weight"], base.transformer.h[0].attn.c_attn.weight
    )

    torch.testing.assert_close(GPT.from_pretrained(tmp_path).eval()(IDS).logits, expected)  # auto
    plain = GPT.from_pretrained(tmp_path, adapter=None).eval()
    assert not adapter_names(plain)
    torch.testing.assert_close(plain(IDS).logits, base(IDS).logits)
    theirs = PeftModel.from_pretrained(plain, tmp_path / "adapters" / "default").eval()
    torch.testing.assert_close(theirs(IDS).logits, expected)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_and_save_writes_an_equivalent_plain_model(tmp_path, method):
    model = adapted(method)
    expected = model(IDS).logits
    model.save_pretrained(tmp_path / "run")
    out = merge_and_save(tmp_path / "run", tmp_path / "merged")
    assert not (out / "adapters").exists()
    assert "adapters" not in json.loads((out / "config.json").read_text())
    merged = GPT.from_pretrained(out).eval()
    assert not adapter_names(merged)
    torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="another directory"):
        merge_and_save(tmp_path / "run", tmp_path / "run")


def test_choosing_adapters_when_loading(tmp_path):
    model = adapted(seed=3)
    out_a = model(IDS).logits
    add_adapter(model, AdapterConfig(r=2, targets=["decoder_attention"]), name="b")
    randomise_adapters(model, 4)
    out_b = model(IDS).logits
    model.save_pretrained(tmp_path)  # "b" is active
    assert json.loads((tmp_path / "config.json").read_text())["adapters"]["active"] == "b"

    auto = GPT.from_pretrained(tmp_path).eval()
    assert adapter_names(auto) == ["default", "b"]
    torch.testing.assert_close(auto(IDS).logits, out_b)
    only_a = GPT.from_pretrained(tmp_path, adapter="default").eval()
    assert adapter_names(only_a) == ["default"]
    torch.testing.assert_close(only_a(IDS).logits, out_a)
    listed = GPT.from_pretrained(tmp_path, adapter=["default", "b"]).eval()
    torch.testing.assert_close(listed(IDS).logits, out_a)  # the first named is active
    with pytest.raises(FileNotFoundError, match="no such adapter.*b, default"):
        GPT.from_pretrained(tmp_path, adapter="c")
    # a directory whose config records no adapters loads none by default, all on request
    config = json.loads((tmp_path / "config.json").read_text())
    del config["adapters"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not adapter_names(GPT.from_pretrained(tmp_path))
    assert adapter_names(GPT.from_pretrained(tmp_path, adapter="all")) == ["b", "default"]


def test_reloading_the_same_adapter_is_a_no_op_and_another_is_an_error(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path / "one")
    adapted(seed=5).save_pretrained(tmp_path / "two")
    loaded = GPT.from_pretrained(tmp_path / "one")
    # e.g. a demo that loads every adapter of a directory from_pretrained already loaded
    assert load_adapter(loaded, tmp_path / "one" / "adapters" / "default") == "default"
    assert load_adapters(loaded, tmp_path / "one", "all") == ["default"]
    with pytest.raises(ValueError, match="already exists"):
        load_adapter(loaded, tmp_path / "two" / "adapters" / "default")


def test_an_adapter_of_another_base_is_refused_from_a_model_dir(tmp_path):
    adapted().save_pretrained(tmp_path / "run")
    other = base_model(seed=1)
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "adapters").symlink_to(tmp_path / "run" / "adapters")
    with pytest.raises(ValueError, match="different base model"):
        GPT.from_pretrained(tmp_path / "other", adapter="default")


def test_fold_gives_a_plain_trainable_model():
    model = adapted(train_extra=["transformer.ln_f"])
    expected = model(IDS).logits
    fold_adapters(model)
    assert not adapter_names(model)
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    trainable, total = trainable_summary(model)
    assert trainable == total
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no adapters"):
        fold_adapters(model)


# -- a multimodal model: adapters on the decoder, the ViT and the projector ----------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    mmgpt_text = pytest.importorskip("mmgpt_text")
    pytest.importorskip("timm")
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("User: Describe the image.\nAssistant: a red square on the left\n" * 30)
    return mmgpt_text.TextTokenizer.train([path], vocab_size=300)


def test_multimodal_adapters_on_decoder_vit_and_projector(tokenizer, tmp_path):
    from PIL import Image

    from mmgpt.data.sample import Sample, Turn
    from mmgpt.multimodal import MultimodalGPT

    torch.manual_seed(0)
    model = MultimodalGPT.build("gpt-nano", tokenizer, block_size=64).eval()
    rng = random.Random(0)
    image = Image.new("RGB", (32, 32), tuple(rng.randint(0, 255) for _ in range(3)))
    batch = model.processor()(
        [
            Sample(
                [Turn("user", "<image>\nDescribe the image."), Turn("assistant", "a red")],
                images=[image],
            )
        ]
    )
    base_logits = model(batch).logits
    modules = add_adapter(model, AdapterConfig(r=2, targets=["decoder", "vit", "projector"]))
    assert any(m.startswith("gpt.transformer.h.") for m in modules)
    assert any(m.startswith("encoders.image.") and ".blocks." in m for m in modules)
    assert any(m.startswith("projectors.image.") for m in modules)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    randomise_adapters(model, 7)
    expected = model(batch).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)

    model.save_pretrained(tmp_path)
    loaded = MultimodalGPT.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(batch).logits, expected)
    plain = MultimodalGPT.from_pretrained(tmp_path, adapter=None).eval()
    torch.testing.assert_close(plain(batch).logits, base_logits)
    merged = MultimodalGPT.from_pretrained(merge_and_save(tmp_path, tmp_path / "merged")).eval()
    torch.testing.assert_close(merged(batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_an_adapter_with_trained_extras_loads_onto_the_original_base(tmp_path):
    model = adapted(train_extra=["transformer.ln_f"])  # ln_f trained (randomised) too
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    # the directory's base holds the trained ln_f; the adapter carries it as well, and its
    # fingerprint leaves it out, so the untouched original base accepts the adapter
    original = base_model()
    load_adapter(original, tmp_path / "adapters" / "default")
    torch.testing.assert_close(original(IDS).logits, expected)
