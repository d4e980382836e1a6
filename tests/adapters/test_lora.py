"""LoRA/DoRA over peft: trainable counts, merge equivalence, switching, peft interop."""

from __future__ import annotations

import pytest
import torch

from mmgpt import registry
from mmgpt.adapters import (
    AdapterConfig,
    adapters_disabled,
    add_adapter,
    base_state_dict,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapter,
    trainable_summary,
    unmerge_adapters,
)
from mmgpt.config import gpt_config
from mmgpt.model import GPT


def base_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(gpt_config("gpt-nano", n_layer=2, block_size=32, vocab_size=64)).eval()


def randomise_adapters(model: torch.nn.Module, seed: int) -> None:
    """peft initialises lora_B to zero (a no-op adapter); give it weight so tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def test_only_adapter_parameters_train_and_fraction_is_small():
    model = GPT(gpt_config("gpt-mini", n_layer=2))
    trainable_before, total = trainable_summary(model)
    assert trainable_before == total
    registry.create("adapter", "lora", r=4).apply(model)
    trainable, total_after = trainable_summary(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # 2 layers × (c_attn 384→1152, c_proj 384→384, c_fc 384→1536, c_proj 1536→384), rank 4
    expected = 2 * 4 * ((384 + 1152) + (384 + 384) + (384 + 1536) + (1536 + 384))
    assert trainable == expected
    assert trainable / total_after < 0.05


def test_new_adapter_is_a_no_op_until_trained():
    model = base_model()
    reference = model(IDS).logits
    add_adapter(model, AdapterConfig(r=4))
    torch.testing.assert_close(model(IDS).logits, reference)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_and_unmerge_are_equivalent(method):
    model = base_model()
    base = model(IDS).logits
    add_adapter(model, AdapterConfig(method=method, r=4, targets=["decoder"]))
    randomise_adapters(model, 0)
    adapted = model(IDS).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    merge_adapters(model)
    torch.testing.assert_close(model(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(model(IDS).logits, adapted, atol=1e-5, rtol=1e-5)
    with adapters_disabled(model):
        torch.testing.assert_close(model(IDS).logits, base, atol=1e-5, rtol=1e-5)


def test_switching_between_named_adapters(tmp_path):
    model = base_model()
    add_adapter(model, AdapterConfig(r=4), name="a")
    randomise_adapters(model, 1)
    out_a = model(IDS).logits
    add_adapter(model, AdapterConfig(r=2, targets=["decoder_attention"]), name="b")
    randomise_adapters(model, 2)
    out_b = model(IDS).logits
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    set_active_adapter(model, "a")
    torch.testing.assert_close(model(IDS).logits, out_a)
    assert all(".a." in n for n, p in model.named_parameters() if p.requires_grad)
    set_active_adapter(model, "b")
    torch.testing.assert_close(model(IDS).logits, out_b)
    with pytest.raises(ValueError, match="no adapter 'c'"):
        set_active_adapter(model, "c")


def test_adapter_checkpoint_loads_with_peft_itself(tmp_path):
    from peft import PeftModel

    model = base_model()
    add_adapter(model, AdapterConfig(r=4, alpha=8))
    randomise_adapters(model, 3)
    expected = model(IDS).logits
    save_adapter(model, tmp_path / "adapters" / "default")
    assert (tmp_path / "adapters/default/adapter_model.safetensors").is_file()
    assert (tmp_path / "adapters/default/adapter_config.json").is_file()

    theirs = PeftModel.from_pretrained(base_model(), tmp_path / "adapters" / "default").eval()
    torch.testing.assert_close(theirs(IDS).logits, expected)

    ours = base_model()
    load_adapter(ours, tmp_path / "adapters" / "default")
    torch.testing.assert_close(ours(IDS).logits, expected)


def test_loading_onto_the_wrong_base_is_a_clear_error(tmp_path):
    model = base_model(seed=0)
    add_adapter(model, AdapterConfig(r=4))
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(base_model(seed=1), tmp_path / "ad")
    other = GPT(gpt_config("gpt-nano", n_layer=1, block_size=32, vocab_size=64))
    with pytest.raises(ValueError, match="different base model|do not exist"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        (tmp_path / "ad" / "adapter_config.json").unlink()
        load_adapter(base_model(), tmp_path / "ad")


def test_base_state_dict_restores_the_plain_model():
    model = base_model()
    add_adapter(model, AdapterConfig(r=4))
    randomise_adapters(model, 4)
    plain = base_model(seed=5)
    plain.load_state_dict(base_state_dict(model), strict=False)
    torch.testing.assert_close(plain(IDS).logits, base_model()(IDS).logits)


def test_training_extra_modules_and_bad_targets():
    model = base_model()
    add_adapter(model, AdapterConfig(r=4, train_extra=["transformer.ln_f"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias"} <= trainable
    assert not any(n.startswith("transformer.wte") for n in trainable)
    with pytest.raises(ValueError, match="match no Linear layer"):
        add_adapter(base_model(), AdapterConfig(targets=["vit"]))
    with pytest.raises(ValueError, match="AdapterConfig.method"):
        AdapterConfig(method="ia3")


def test_lora_learns_where_the_base_is_frozen():
    model = base_model()
    # A tiny frozen head caps how peaked logits can get, so the final norm trains too.
    add_adapter(model, AdapterConfig(r=8, alpha=16, train_extra=["transformer.ln_f"]))
    base_weights = {k: v.clone() for k, v in base_state_dict(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(9))
    model.train()
    losses = []
    for _ in range(60):
        logits = model(IDS).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for k, v in base_state_dict(model).items():
        if not k.startswith("transformer.ln_f"):
            assert torch.equal(v, base_weights[k]), k
