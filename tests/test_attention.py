"""Attention weights on request: ``output_attentions=True`` gives each layer's softmax weights
without changing the model's outputs, and ``mmgpt attention`` draws them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgpt import cli
from mmgpt.config import GPTConfig
from mmgpt.model import GPT, KVCache

CORPUS = "The red square sits left of the blue circle. A green triangle is above the square. " * 8


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    options = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return GPT(GPTConfig(**{**options, **overrides})).eval()


def ids(B: int = 2, T: int = 9) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_kv_head": 2, "pos_encoding": "rotary"}, {"n_kv_head": 1, "pos_encoding": "rotary"}],
    ids=["mha", "gqa", "mqa"],
)
def test_weights_are_causal_rows_of_a_softmax_and_leave_logits_unchanged(overrides) -> None:
    model = tiny_gpt(**overrides)
    x = ids()
    with torch.no_grad():
        plain = model(input_ids=x)
        out = model(input_ids=x, output_attentions=True)
    assert plain.attentions is None
    assert len(out.attentions) == model.config.n_layer
    for w in out.attentions:
        assert w.shape == (2, 4, 9, 9)  # (B, H, T, S)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9))
        assert bool((w.triu(1) == 0).all())  # no position reads a later one
        lower = torch.ones(9, 9, dtype=torch.bool).tril()
        assert bool((w[..., lower] > 0).all())  # and every earlier one gets some weight
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden_states, plain.hidden_states, atol=1e-5, rtol=0)


def test_weights_equal_softmax_of_q_and_k_taken_by_a_hook() -> None:
    """Layer 1's q and k recomputed from its c_attn input (caught by a hook), repeated per
    group of query heads, rotated, then softmax(q kᵀ/√d) with the causal mask."""
    model = tiny_gpt(n_kv_head=2, pos_encoding="rotary")
    attn = model.transformer.h[1].attn
    seen = {}
    handle = attn.c_attn.register_forward_hook(lambda m, i, o: seen.update(qkv=o))
    x = ids(1, 7)
    with torch.no_grad():
        out = model(input_ids=x, output_attentions=True)
    handle.remove()
    H, Hkv, D, C = 4, 2, attn.head_dim, 32
    q, k, _ = seen["qkv"].split((C, Hkv * D, Hkv * D), dim=2)
    q = q.view(1, 7, H, D).transpose(1, 2)
    k = k.view(1, 7, Hkv, D).transpose(1, 2)
    from mmgpt.model import apply_rotary

    cos_sin = model.rotary(torch.arange(7)[None])
    q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
    k = k.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out.attentions[1], scores.softmax(-1), atol=1e-6, rtol=0)


def test_padding_mask_and_kv_cache() -> None:
    model = tiny_gpt(n_kv_head=2, pos_encoding="rotary")
    x = ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        full = model(input_ids=x, attention_mask=mask, output_attentions=True)
        plain = model(input_ids=x, attention_mask=mask)
        torch.testing.assert_close(full.logits, plain.logits, atol=1e-5, rtol=0)
        assert bool((full.attentions[0][1, :, 3:, :3] == 0).all())  # padding is never read
        # prefill 5 positions, then 3 more against the cache: S = cached + T
        cache = KVCache.for_model(model.config, capacity=8)
        first = model(
            input_ids=x[:, :5], attention_mask=mask[:, :5], past_key_values=cache,
            output_attentions=True,
        )  # fmt: skip
        step = model(
            input_ids=x[:, 5:], attention_mask=mask, past_key_values=first.past_key_values,
            output_attentions=True,
        )  # fmt: skip
        # one token at a time with no padding: the mask-free path of the cache
        cache2 = KVCache.for_model(model.config, capacity=8)
        model(input_ids=x[:1, :7], past_key_values=cache2)
        last = model(input_ids=x[:1, 7:], past_key_values=cache2, output_attentions=True)
        last_plain = model(input_ids=x[:1], output_attentions=True)
    for layer in range(2):
        assert step.attentions[layer].shape == (2, 4, 3, 8)
        torch.testing.assert_close(
            step.attentions[layer], full.attentions[layer][:, :, 5:], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            first.attentions[layer], full.attentions[layer][:, :, :5, :5], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            last.attentions[layer][0, :, 0],
            last_plain.attentions[layer][0, :, 7],
            atol=1e-5,
            rtol=0,
        )
    torch.testing.assert_close(step.logits, full.logits[:, 5:], atol=1e-5, rtol=0)


# -- the command --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    mmgpt_text = pytest.importorskip("mmgpt_text")
    path = tmp_path_factory.mktemp("attention-corpus") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return mmgpt_text.TextTokenizer.train([path], vocab_size=300)


def test_attention_command_on_a_text_model(
    tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_gpt(vocab_size=tokenizer.vocab_size, n_head=2)
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    out = tmp_path / "maps"
    argv = ["attention", "--model", str(tmp_path / "model"), "--prompt", "The red square"]
    code = cli.main([*argv, "--out-dir", str(out), "--layers", "1"])
    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
    summary = json.loads((out / "attention.json").read_text())
    T = len(summary["tokens"])
    assert T > 1 and summary["layers"] == [1] and summary["heads"] == 2
    assert summary["shape"] == [2, T, T]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(summary["files"]) == [
        "layer1_head0.png", "layer1_head1.png", "layer1_mean.png",
    ]  # fmt: skip
    with Image.open(out / "layer1_mean.png") as im:
        assert im.size[0] == im.size[1] >= T
    # the recorded map is the model's own, averaged over heads
    ids_ = torch.tensor([tokenizer.encode("The red square", add_bos=True)])
    with torch.no_grad():
        weights = model(input_ids=ids_, output_attentions=True).attentions[1][0].mean(0)
    assert ids_.size(1) == T
    torch.testing.assert_close(
        torch.tensor(summary["mean_attention"]["1"]), weights, atol=1e-5, rtol=0
    )

    code = cli.main([*argv, "--out-dir", str(out), "--layers", "2"])
    assert code == 2 and "--layers [2]: the model has layers 0..1" in capsys.readouterr().err


class PatchEncoder(torch.nn.Module):
    """4 patch tokens (a 2×2 grid) of an 8×8 RGB image."""

    modality = "image"
    num_tokens = 4

    def __init__(self, output_dim: int = 6) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.patch = torch.nn.Conv2d(3, output_dim, kernel_size=4, stride=4)

    def preprocess(self, images: list) -> torch.Tensor:
        import numpy as np

        arrays = [np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # (N, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch(x).flatten(2).transpose(1, 2)  # (N, 4, output_dim)

    def config_dict(self) -> dict:
        return {"output_dim": self.output_dim}


def test_attention_command_on_a_multimodal_model_with_an_image(
    tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmgpt.data.images import load_image
    from mmgpt.eval.attention import prompt_attentions
    from mmgpt.multimodal import MultimodalGPT
    from mmgpt.registry import REGISTRY

    REGISTRY.register("encoder", "_test-attention-patches", PatchEncoder)
    try:
        torch.manual_seed(0)
        gpt = dict(block_size=64, n_layer=2, n_head=2, n_embd=32)
        model = MultimodalGPT.build(
            gpt, tokenizer, encoder="_test-attention-patches", projector="linear"
        )
        model.save_pretrained(tmp_path / "mm")
        image_path = tmp_path / "red.png"
        Image.new("RGB", (20, 12), (200, 30, 30)).save(image_path)
        out = tmp_path / "maps"
        argv = ["attention", "--model", str(tmp_path / "mm"), "--image", str(image_path)]
        code = cli.main([*argv, "--prompt", "What shape?", "--out-dir", str(out)])
        captured = capsys.readouterr()
        assert (code, captured.err) == (0, "")
        summary = json.loads((out / "attention.json").read_text())
        assert summary["tokens"].count("<image>") == 4 and summary["layers"] == [0, 1]
        expected = {f"layer{layer}_{kind}.png" for layer in (0, 1) for kind in
                    ("head0", "head1", "mean")}  # fmt: skip
        expected |= {f"image0_layer{layer}{s}.png" for layer in (0, 1) for s in ("", "_grid")}
        assert {p.name for p in out.glob("*.png")} == set(summary["files"]) == expected
        with Image.open(out / "image0_layer1.png") as im:
            assert im.size == (20, 12)  # drawn over the image itself
        # the scores are the last prompt token's attention to the 4 slots, on a 2×2 grid
        result = prompt_attentions(
            model, tokenizer, cli._user_turn("What shape?", 1), [load_image(image_path)]
        )
        ((first, count),) = result.image_slots
        assert count == 4 and result.tokens[first : first + 4] == ["<image>"] * 4
        grid = summary["image_attention"][1]
        assert (grid["layer"], grid["grid"], grid["first_slot"]) == (1, [2, 2], first)
        expected_scores = result.weights[1].mean(0)[-1, first : first + 4].reshape(2, 2)
        torch.testing.assert_close(torch.tensor(grid["scores"]), expected_scores, atol=1e-5, rtol=0)
        # the model's logits do not change when weights are asked for
        batch = model.processor().prompt_batch(
            [cli._user_turn("What shape?", 1)], [[load_image(image_path)]]
        )
        with torch.no_grad():
            torch.testing.assert_close(
                model(batch, output_attentions=True).logits, model(batch).logits, atol=1e-5, rtol=0
            )
    finally:
        REGISTRY.unregister("encoder", "_test-attention-patches")
