"""Starting from the language models people have: a Hugging Face Llama or GPT-2 directory
(tiny, random, built here with its own tokenizer files) fine-tuned through the command line —
text and multimodal, full and LoRA — resumed exactly, exported, and read back by transformers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("mmgpt_text")

from PIL import Image  # noqa: E402

from mmgpt import cli  # noqa: E402
from mmgpt.files import load_tensors  # noqa: E402
from mmgpt.hf_fixtures import build_hf_model_dir  # noqa: E402
from mmgpt.recipe import run_training  # noqa: E402

FAST = ["train.batch_size=2", "train.progress=false", "train.tensorboard=false"]
SENTENCES = ["the red circle is on the left.", "the blue square is small.", "a green dot."]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    rng = random.Random(0)
    path.write_text("\n".join(rng.choice(SENTENCES) for _ in range(600)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return build_hf_model_dir(tmp_path_factory.mktemp("hf") / "llama", "llama")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return build_hf_model_dir(tmp_path_factory.mktemp("hf") / "gpt2", "gpt2")


def transformers_greedy(directory: Path, prompt: str, new_tokens: int) -> str:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fine_tune_export_and_transformers_continue_the_same(
    family, request, corpus, tmp_path, capsys
) -> None:
    source = request.getfixturevalue(family)
    out = tmp_path / "run"
    argv = ["train", "lm", "--model", str(source), "--data", str(corpus), "--out", str(out)]
    adapter = ["--adapter", "lora"] if family == "gpt2" else []
    code, _, err = run([*argv, *adapter, "train.max_steps=3", *FAST], capsys)
    assert code == 0, err
    config = json.loads((out / "model" / "config.json").read_text())
    # the tokenizer kept the pretrained ids and appended mmgpt's tokens; the embedding grew
    assert config["gpt"]["vocab_size"] == 314 and config["gpt"]["n_kv_head"] in (None, 2)
    assert (out / "model" / "adapters" / "default").is_dir() == bool(adapter)

    exported = tmp_path / "exported"
    code, stdout, err = run(
        ["export", "--model", str(out / "model"), "--out", str(exported)], capsys
    )
    assert code == 0, err
    assert json.loads(stdout)["family"] == family
    code, ours, err = run(
        [
            "generate",
            "--model",
            str(out / "model"),
            "--prompt",
            "the red",
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
        ],
        capsys,
    )
    assert code == 0, err
    assert ours.rstrip("\n") == transformers_greedy(exported, "the red", 8)


def test_training_from_a_pretrained_model_resumes_exactly(llama, corpus, tmp_path) -> None:
    common = {"model.from": str(llama), **dict(o.split("=") for o in FAST)}
    common.update({"train.save_every": "2", "train.eval_every": "0", "train.seed": "3"})
    # all four steps in warm-up: the learning rate does not depend on max_steps
    common["train.warmup_steps"] = "10"
    straight = run_training(
        "lm", data=corpus, out=tmp_path / "a", overrides=common | {"train.max_steps": "4"}
    )
    run_training("lm", data=corpus, out=tmp_path / "b", overrides=common | {"train.max_steps": "2"})
    with pytest.warns(RuntimeWarning, match=r"changed recipe \(train\.max_steps\)"):
        resumed = run_training(
            "lm",
            data=corpus,
            out=tmp_path / "b",
            resume=True,
            overrides=common | {"train.max_steps": "4"},
        )
    assert straight["step"] == resumed["step"] == 4
    a = load_tensors(tmp_path / "a" / "model" / "model.safetensors")
    b = load_tensors(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_settings_that_would_change_a_pretrained_architecture_are_refused(
    llama, corpus, tmp_path
) -> None:
    with pytest.raises(ValueError, match=r"model\.n_layer=5 would change the architecture"):
        run_training(
            "lm",
            data=corpus,
            out=tmp_path / "run",
            overrides={"model.from": str(llama), "model.n_layer": "5"},
        )
    assert not (tmp_path / "run").exists()


def square(colour: tuple[int, int, int], rng: random.Random) -> Image.Image:
    grey = rng.randint(100, 160)
    image = Image.new("RGB", (32, 32), (grey, grey, grey))
    x, y = rng.randint(0, 14), rng.randint(0, 14)
    image.paste(colour, (x, y, x + 16, y + 16))
    return image


def test_caption_model_on_a_hugging_face_llama_reads_the_images(llama, tmp_path, capsys) -> None:
    """A LLaVA-style start: the Llama directory becomes the language model of a captioner,
    trained through the CLI on an imagefolder; the captions it learns depend on the image."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = random.Random(0)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    rows = []
    for i in range(48):
        name = "red" if i % 2 else "blue"
        square(colours[name], rng).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {name} square"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code, _, err = run(
        [
            "train",
            "caption",
            "--model",
            str(llama),
            "--data",
            str(folder),
            "--out",
            str(out),
            "train.max_steps=60",
            "train.lr=3e-3",
            "train.warmup_steps=5",
            "train.batch_size=8",
            "train.eval_every=0",
            "data.eval_fraction=0",
            *FAST[1:],
        ],
        capsys,
    )
    assert code == 0, err
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architecture"] == "multimodal" and config["gpt"]["gated_mlp"] is True
    # the model's own chat template frames the training and the prompts
    assert "chat_template" in json.loads((out / "model" / "tokenizer_config.json").read_text())
    answers = {}
    for name, colour in colours.items():
        image = tmp_path / f"{name}.png"
        square(colour, random.Random(99)).save(image)
        argv = ["generate", "--model", str(out / "model"), "--image", str(image)]
        code, text, err = run(
            [*argv, "--prompt", "Describe the image.", "--temperature", "0"], capsys
        )
        assert code == 0, err
        answers[name] = text.strip()
    assert answers == {"red": "a red square", "blue": "a blue square"}, answers

    code, stdout, err = run(
        ["export", "--model", str(out / "model"), "--out", str(tmp_path / "lm")], capsys
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["family"] == "llama" and {"encoders", "projectors"} <= set(report["not_exported"])
    assert "not exported" in err


def test_a_recipe_written_for_scratch_training_runs_on_a_pretrained_model(
    gpt2, corpus, tmp_path, capsys
) -> None:
    """Architecture settings in the recipe file describe a model built from a preset: on a
    model the run starts from they are left out, with a note; the user's own are errors."""
    from mmgpt.recipe import load_recipe

    recipe = load_recipe("lm")
    recipe["model"].update(pos_encoding="rotary", init_std=0.2, n_layer=7)
    result = run_training(
        recipe,
        data=corpus,
        out=tmp_path / "run",
        overrides=[f"model.from={gpt2}", "train.max_steps=1", *FAST],
    )
    assert result["step"] == 1
    out = capsys.readouterr().out
    assert "keeps its own architecture" in out and "pos_encoding='rotary'" in out
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["gpt"]["pos_encoding"] == "learned" and config["gpt"]["n_layer"] == 2


def test_an_adapter_beside_a_hugging_face_directory_loads_merges_and_exports(
    tmp_path, capsys
) -> None:
    """``adapters/<name>/`` next to a downloaded model: loaded by name, merged (with the
    directory's tokenizer), and folded into an export."""
    import mmgpt.adapters as adapters
    from mmgpt.pretrained import load_model, merge_and_save

    source = build_hf_model_dir(tmp_path / "hf", "llama")
    model = load_model(source)
    adapters.add_adapter(model, adapters.AdapterConfig(r=4, targets="decoder_attention"), "a1")
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    adapters.save_adapter(model, source / "adapters" / "a1", "a1")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        tuned = model.eval()(ids).logits
        assert not torch.allclose(tuned, load_model(source)(ids).logits)  # the base differs
        torch.testing.assert_close(load_model(source, adapter="a1")(ids).logits, tuned)
    merged = merge_and_save(source, tmp_path / "merged", adapter="a1")
    assert (merged / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged)(ids).logits, tuned, atol=1e-5, rtol=1e-5)
    code, _, err = run(
        ["export", "--model", str(source), "--out", str(tmp_path / "exp"), "--adapter", "a1"],
        capsys,
    )
    assert code == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, tuned, atol=1e-4, rtol=1e-4)
