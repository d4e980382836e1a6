"""Weight-only int8/int4 models: numerics against float, the decode kernels against the
dequantised matmul, exact save/load round trips, `mmgpt quantize`, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from mmgpt.adapters.int4 import Int4Linear, pack_int4, unpack_int4
from mmgpt.adapters.int8 import Int8Linear
from mmgpt.config import gpt_config
from mmgpt.files import read_safetensors_header
from mmgpt.model import GPT
from mmgpt.pretrained import load_model, quantize_directory, save_model
from mmgpt.quantization import quantization_record, quantize_model

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_gpt(tie: bool = True, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = gpt_config(
        "gpt-nano",
        n_layer=2,
        n_head=4,
        n_embd=64,
        block_size=32,
        vocab_size=100,
        tie_embeddings=tie,
    )
    return GPT(config).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_int4_pack_unpack_is_exact_and_two_per_byte():
    q = torch.randint(0, 16, (7, 10), generator=torch.Generator().manual_seed(3))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 5)
    assert torch.equal(unpack_int4(packed).long(), q)
    # column 2j in the low nibble, 2j + 1 in the high one: the documented file layout
    assert packed[0, 0].item() == q[0, 0].item() | (q[0, 1].item() << 4)
    with pytest.raises(ValueError, match="must be even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.long))


def test_layers_dequantise_to_the_nearest_grid_point():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48)
    w = linear.weight.detach()
    int8 = Int8Linear.from_linear(linear)
    # per-row symmetric: every weight within half a step of its value
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((int8.weight - w).abs() <= step / 2 + 1e-7).all()
    int4 = Int4Linear.from_linear(linear, group_size=32)
    groups = w.reshape(48, 2, 32)
    step4 = (groups.amax(-1) - groups.amin(-1)) / 15  # (48, 2)
    error = (int4.weight - w).reshape(48, 2, 32).abs()
    assert (error <= step4[..., None] / 2 + 1e-6).all()
    torch.testing.assert_close(int4.bias, linear.bias.detach())


@pytest.mark.parametrize(
    ("method", "group_size", "bound"),
    [
        # per-row int8: a weight's error is uniform within +-max|w_row|/254, an rms of
        # max|w|/(127*sqrt(12)) ~ 0.8% of a Gaussian row's std (max ~ 3.5 std at width 64-256);
        # errors of 8 matmuls over 2 layers add in quadrature, plus bf16 activations in the
        # kernel (2^-8): 2% is several times the expected ~0.6%
        ("int8", None, 0.02),
        # int4 with 32 per group: steps of range/15 ~ 4.1 std/15, an rms error of ~8% of the
        # std per weight; 15% allows the same compounding (a packing bug gives > 100%)
        ("int4", 32, 0.15),
    ],
)
# a head of 100 rows (quantised, padded for the int4 kernel), untied or tied to the embeddings
@pytest.mark.parametrize("tie", [False, True])
def test_quantised_logits_are_close_to_float_and_round_trip_exactly(
    tmp_path, method, group_size, bound, tie
):
    model = tiny_gpt(tie=tie)
    table = model.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        reference = model(IDS).logits
    record = quantize_model(model, method, group_size)
    layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    expected = [f"transformer.h.{i}.{m}" for i in range(2) for m in layers] + ["lm_head"]
    assert record == {"method": method, "group_size": group_size, "modules": sorted(expected)}
    with torch.no_grad():
        prefill = model(IDS).logits  # 24 rows: the dequantising path
        decode = model(IDS[:, :1]).logits  # 2 rows: the fused CPU kernel
    assert relative_error(prefill, reference) < bound
    # the kernel (bf16 activations) computes what the dequantised fp32 matmul does
    assert relative_error(decode, prefill[:, :1]) < 0.01

    save_model(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == record
    header = read_safetensors_header(tmp_path / "q" / "model.safetensors")
    qweight = header["transformer.h.0.mlp.c_fc.qweight"]
    assert "transformer.h.0.mlp.c_fc.weight" not in header
    if method == "int4":  # packed two per byte: 64 inputs → 32 bytes per row
        assert (qweight["dtype"], qweight["shape"]) == ("U8", [256, 32])
        assert header["transformer.h.0.mlp.c_fc.scale"]["shape"] == [256, 2]
    else:
        assert (qweight["dtype"], qweight["shape"]) == ("I8", [256, 64])
    if tie:  # the float table once, the head's quantised copy beside it
        assert "transformer.wte.weight" in header and "lm_head.weight" not in header
        assert config["gpt"]["tie_embeddings"] is True
    loaded = load_model(tmp_path / "q")
    assert type(loaded.lm_head) is type(model.lm_head)
    # the embedding lookup stays float and exact; a tied head is a copy of that table
    assert torch.equal(loaded.transformer.wte.weight, table)
    if tie:
        assert relative_error(loaded.lm_head.weight, table) < bound
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, prefill)
        assert torch.equal(loaded(IDS[:, :1]).logits, decode)
    assert (
        GPT.from_pretrained(tmp_path / "q")
        .transformer.h[1]
        .attn.c_attn.extra_repr()
        .endswith(method if method == "int8" else f"int4, group_size={group_size}")
    )


def test_decoding_uses_the_kernels_and_generation_runs(monkeypatch):
    from mmgpt.generation import GenerationConfig, generate

    calls = {"int8": 0, "int4": 0}
    int8_mm, int4_mm = torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu

    def count8(*args):
        calls["int8"] += 1
        return int8_mm(*args)

    def count4(*args):
        calls["int4"] += 1
        return int4_mm(*args)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", count8)
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", count4)
    for method, group_size in (("int8", None), ("int4", 64)):
        model = tiny_gpt()
        greedy = GenerationConfig(max_new_tokens=4, temperature=0.0)
        float_tokens = generate(model, IDS[:1, :6], greedy, pad_id=0)
        quantize_model(model, method, group_size)
        tokens = generate(model, IDS[:1, :6], greedy, pad_id=0)
        assert len(tokens[0]) == len(float_tokens[0]) == 4
        # 8 quantised matmuls and the (tied) head per decoded token
        assert calls[method] >= 9 * 3, calls


def test_multimodal_model_quantises_its_gpt_only(tmp_path):
    pytest.importorskip("timm")
    mmgpt_text = pytest.importorskip("mmgpt_text")
    from PIL import Image

    from mmgpt.data.sample import Sample, Turn
    from mmgpt.multimodal import MultimodalGPT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("User: what colour?\nAssistant: a red square on grey.\n" * 20)
    tok = mmgpt_text.TextTokenizer.train([corpus], vocab_size=300)
    torch.manual_seed(0)
    model = MultimodalGPT.build("gpt-nano", tok, n_embd=64, n_head=4, block_size=64).eval()
    save_model(model, tmp_path / "float")
    report = quantize_directory(tmp_path / "float", tmp_path / "q", "int4", 32)
    assert report["layers"] == 3 * 4 + 1  # gpt-nano's 3 blocks and the (tied) head
    assert report["weights_bytes_after"] < report["weights_bytes_before"]
    quantized = load_model(tmp_path / "q")
    assert isinstance(quantized, MultimodalGPT)
    record = quantization_record(quantized)
    assert all(
        name.startswith("gpt.transformer.h.") or name == "gpt.lm_head" for name in record["modules"]
    )
    assert "gpt.lm_head" in record["modules"]
    encoder_linears = [m for m in quantized.encoders.modules() if isinstance(m, torch.nn.Linear)]
    assert encoder_linears and all(type(m) is torch.nn.Linear for m in encoder_linears)
    float_model = load_model(tmp_path / "float")
    sample = Sample([Turn("user", "<image> what colour?")], images=[Image.new("RGB", (32, 32))])
    batch = float_model.processor()([sample])
    with torch.no_grad():
        ours, theirs = quantized(batch).logits, float_model(batch).logits
    assert relative_error(ours, theirs) < 0.15


def test_quantize_errors_name_the_argument(tmp_path):
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"method \(--method\) must be one of int8, int4"):
        quantize_model(model, "nf4")
    with pytest.raises(ValueError, match=r"--group-size\) must be one of 32, 64, 128, 256"):
        quantize_model(model, "int4", 48)
    with pytest.raises(ValueError, match=r"--group-size\) 128 does not divide the 64 input"):
        quantize_model(model, "int4", 128)
    with pytest.raises(ValueError, match=r"--group-size\) applies to int4 only"):
        quantize_model(model, "int8", 64)
    assert quantization_record(model) is None  # nothing was swapped by the failed calls
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match=r"model \(--model\) is already quantised"):
        quantize_model(model, "int4", 32)
    save_model(model, tmp_path / "q8")
    with pytest.raises(ValueError, match=r"\(--model\) is already quantised \(int8\)"):
        quantize_directory(tmp_path / "q8", tmp_path / "again", "int4", 32)
    with pytest.raises(ValueError, match="to another directory"):
        quantize_directory(tmp_path / "q8", tmp_path / "q8", "int8")
    # a damaged record is named with its file before any weight loads
    config_path = tmp_path / "q8" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization"]["modules"].append("transformer.h.7.attn.c_attn")
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: 'quantization' names 'transformer.h.7"):
        load_model(tmp_path / "q8")


def test_cli_quantize_then_generate_and_eval(tmp_path, capsys):
    pytest.importorskip("mmgpt_text")
    from mmgpt.cli import main
    from mmgpt.recipe import run_training

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the red circle is left of the blue square\n" * 60)
    tiny = [
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=64",
        "model.block_size=32",
        "tokenizer.vocab_size=300",
        "train.batch_size=4",
        "train.max_steps=30",
        "train.eval_every=0",
        "train.progress=false",
        "train.tensorboard=false",
        "train.device=cpu",
    ]
    run_training("lm", data=corpus, out=tmp_path / "run", overrides=tiny)
    model_dir = tmp_path / "run" / "model"
    capsys.readouterr()
    args = ["quantize", "--model", str(model_dir), "--out", str(tmp_path / "q4")]
    assert main([*args, "--method", "int4", "--group-size", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "int4" and report["layers"] == 8 + 1  # and the tied head
    assert main(["eval", "--model", str(model_dir), "--data", str(corpus), "--task", "lm"]) == 0
    float_ppl = json.loads(capsys.readouterr().out)["perplexity"]
    q4 = str(tmp_path / "q4")
    assert main(["eval", "--model", q4, "--data", str(corpus), "--task", "lm"]) == 0
    int4_ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert float_ppl < 20  # the model learned the sentence, so the comparison means something
    assert abs(int4_ppl / float_ppl - 1) < 0.1
    generate = ["generate", "--model", q4, "--prompt", "the red", "--temperature", "0"]
    assert main([*generate, "--max-new-tokens", "4"]) == 0
    assert main([*args, "--method", "int4", "--group-size", "48"]) == 2
    assert "--group-size) must be one of 32, 64, 128, 256" in capsys.readouterr().err
    assert main(["quantize", "--model", q4, "--out", str(tmp_path / "x"), "--method", "int8"]) == 2
    assert "already quantised" in capsys.readouterr().err


@pytest.mark.parametrize(("method", "group_size"), [("int8", None), ("int4", 32)])
def test_kernel_tensors_are_prepared_for_a_compiled_graph(monkeypatch, method, group_size):
    """Inside a compiled graph the layers use kernel tensors built beforehand (dynamo cannot
    trace their cache check): unprepared is a clear error, prepared computes the eager result,
    and new weights loaded afterwards are picked up by the next prepare_kernels."""
    from mmgpt.adapters.quantized import prepare_kernels, quantize_linear

    torch.manual_seed(0)
    first, second = torch.nn.Linear(64, 48), torch.nn.Linear(64, 48)
    layer = quantize_linear(first, method, group_size, "layer")
    x = torch.randn(1, 64)
    with torch.no_grad():
        eager = layer(x)
        layer._kernel_scale = layer._kernel_weights = None  # as freshly built
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        with pytest.raises(RuntimeError, match="prepare_kernels"):
            layer(x)
        prepare_kernels(layer)
        assert torch.equal(layer(x), eager)
        layer.load_state_dict(quantize_linear(second, method, group_size, "layer").state_dict())
        prepare_kernels(layer)
        monkeypatch.undo()
        assert relative_error(layer(x), second(x)) < (0.02 if method == "int8" else 0.15)
