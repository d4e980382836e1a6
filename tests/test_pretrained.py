"""mmgpt.pretrained: the one dispatch between model directories, and the guarantees every
loader shares (eval mode, config checked against the weights before allocation, atomic saves)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest
import torch

from mmgpt.config import CONFIG_NAME, WEIGHTS_NAME, gpt_config
from mmgpt.files import load_json, save_json
from mmgpt.model import GPT
from mmgpt.pretrained import (
    architecture,
    load_model,
    load_tokenizer,
    require_architecture,
    save_hf_gpt2,
    save_model,
)

mmgpt_text = pytest.importorskip("mmgpt_text")

IDS = torch.tensor([[1, 5, 9, 3, 7]])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("User: what is it?\nAssistant: a red square on grey.\n" * 30)
    return mmgpt_text.TextTokenizer.train([path], vocab_size=280, num_signal_tokens=2)


def tiny_gpt(vocab: int = 300, **overrides) -> GPT:
    return GPT(gpt_config("gpt-nano", vocab_size=vocab, block_size=16, dropout=0.1, **overrides))


def test_architecture_of_each_kind_and_a_clear_error_otherwise() -> None:
    assert architecture({"architecture": "gpt", "gpt": {}}) == "gpt"
    assert architecture({"gpt": {}}) == "gpt"  # early directories had no architecture key
    assert architecture({"architecture": "multimodal"}) == "multimodal"
    assert architecture({"model_type": "gpt2"}) == "gpt"  # Hugging Face GPT-2
    assert architecture({"model_type": "qwen2"}) == "gpt"  # and the Llama family
    with pytest.raises(ValueError, match=r"dir/config\.json.*'gemma'.*gpt2, llama, mistral"):
        architecture({"model_type": "gemma"}, "dir/config.json")
    with pytest.raises(ValueError, match=r"dir/config\.json.*'llava'.*gpt, multimodal"):
        architecture({"architecture": "llava"}, "dir/config.json")


def test_every_loader_returns_eval_mode(tmp_path: Path, tok) -> None:
    from mmgpt.multimodal import MultimodalGPT

    pytest.importorskip("timm")
    gpt = tiny_gpt(vocab=tok.vocab_size)
    gpt.save_pretrained(tmp_path / "gpt", tokenizer=tok)
    mm = MultimodalGPT.build("gpt-nano", tok, block_size=48)
    mm.save_pretrained(tmp_path / "mm")
    save_hf_gpt2(tiny_gpt(), tmp_path / "hf")
    for name, cls in (("gpt", GPT), ("mm", MultimodalGPT), ("hf", GPT)):
        model = load_model(tmp_path / name)
        assert type(model) is cls
        assert not any(m.training for m in model.modules()), f"{name} loaded in train mode"
        assert not any(m.training for m in cls.from_pretrained(tmp_path / name).modules())


def test_load_model_matches_the_saved_model_and_its_tokenizer(tmp_path: Path, tok) -> None:
    model = tiny_gpt(vocab=tok.vocab_size).eval()
    model.save_pretrained(tmp_path, tokenizer=tok)
    loaded = load_model(tmp_path)
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    assert load_json(tmp_path / CONFIG_NAME)["tokenizer"] == tok.config_dict()
    assert load_tokenizer(tmp_path).encode("a red square") == tok.encode("a red square")


def test_require_architecture_names_the_purpose(tmp_path: Path) -> None:
    tiny_gpt().save_pretrained(tmp_path)
    require_architecture(tmp_path, "gpt", "--task lm")
    with pytest.raises(ValueError, match=r"--task caption needs a multimodal model.*'gpt'"):
        require_architecture(tmp_path, "multimodal", "--task caption")


def test_config_is_checked_against_the_weights_before_allocating(tmp_path: Path) -> None:
    tiny_gpt().save_pretrained(tmp_path)
    config = load_json(tmp_path / CONFIG_NAME)
    # a damaged config.json: a GPT this wide and deep would need about 40 GB of memory
    config["gpt"].update(n_embd=12288, n_head=96, n_layer=24)
    save_json(config, tmp_path / CONFIG_NAME)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert str(tmp_path / CONFIG_NAME) in message and str(tmp_path / WEIGHTS_NAME) in message
    assert "transformer.wte.weight" in message and "(300, 12288)" in message
    assert time.perf_counter() - start < 10
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500, f"{grown_mib:.0f} MiB allocated before the mismatch was found"


def test_save_model_replaces_a_directory_atomically(tmp_path: Path, tok) -> None:
    out = tmp_path / "model"
    first = tiny_gpt(vocab=tok.vocab_size)
    save_model(first, out, tokenizer=tok)
    (out / "notes.txt").write_text("from the first save")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(model, staging: Path) -> None:
        model.save_pretrained(staging)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_model(tiny_gpt(vocab=tok.vocab_size), out, save_fn=broken)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    second = tiny_gpt(vocab=tok.vocab_size, n_layer=1)
    save_model(second, out, tokenizer=tok)
    assert not (out / "notes.txt").exists()  # a new directory, not files written over the old
    assert json.loads((out / CONFIG_NAME).read_text())["gpt"]["n_layer"] == 1
    torch.testing.assert_close(load_model(out)(IDS).logits, second.eval()(IDS).logits)


def test_a_hub_id_downloads_only_when_named_and_not_on_disk(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    from mmgpt.pretrained import HUB_FILES, resolve_model_dir

    calls = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert resolve_model_dir("org/local") == Path("org/local")  # on disk: never downloaded
    assert resolve_model_dir("org/remote") == tmp_path / "cache"
    assert calls == [("org/remote", list(HUB_FILES))]
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in HUB_FILES)  # no pickles
    with pytest.raises(FileNotFoundError, match=r"runs/a/model: not a model directory"):
        resolve_model_dir("runs/a/model")  # a path, not an id: an error, not a download
    assert len(calls) == 1
