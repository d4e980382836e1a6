"""Hugging Face LLaVA ⇄ mmgpt: ours-vs-theirs logits and greedy decoding on tiny random
``LlavaForConditionalGeneration`` directories built here (CLIP and SigLIP towers, Llama and
Qwen2 language models, each feature layer and selection strategy), LLaVA export read back by
transformers, the command line end to end (generate, LoRA training, export; a CLIP tower around
a pretrained Llama in LLaVA's two stages), and the errors of what mmgpt cannot compute."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
pytest.importorskip("mmgpt_text")

from mmgpt import cli  # noqa: E402
from mmgpt.adapters.lora import fold_adapters  # noqa: E402
from mmgpt.config import read_model_config  # noqa: E402
from mmgpt.generation import GenerationConfig  # noqa: E402
from mmgpt.hf_fixtures import (  # noqa: E402
    add_special_token,
    build_hf_dir,
    build_hf_model_dir,
    build_hf_vision_dir,
    build_llava_dir,
)
from mmgpt.model import GPT  # noqa: E402
from mmgpt.multimodal import MultimodalGPT  # noqa: E402
from mmgpt.pretrained import architecture, export_hf, load_model, load_tokenizer  # noqa: E402
from mmgpt.registry import create  # noqa: E402

ATOL = 1e-4
FAST = ["train.progress=false", "train.tensorboard=false", "train.eval_every=0"]
# name → build_llava_dir arguments
CASES = {
    "clip-default": dict(),  # LLaVA-1.5: layer -2, the class token dropped
    "clip-full-last": dict(vision_feature_layer=-1, vision_feature_select_strategy="full"),
    "siglip-full": dict(vision="siglip", vision_feature_layer=-2),
    "qwen2-tied-padded": dict(
        text="qwen2",
        text_config={"tie_word_embeddings": True},
        extra_vocab=5,  # released checkpoints pad the vocabulary past the tokenizer's
        vision_feature_layer=1,
        multimodal_projector_bias=False,
    ),
}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            built[case] = build_llava_dir(root / case, seed=1, **CASES[case])
        return built[case]

    return get


def images(n: int = 2, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 57), (71, 33), (32, 32)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i], 3), dtype=np.uint8)) for i in range(n)]


def theirs(path: Path):
    return transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()


def their_pixels(path: Path, items) -> torch.Tensor:
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    return processor(items, return_tensors="pt")["pixel_values"]


CONVERSATION = [{"role": "user", "text": "<image> and <image>\nWhich one is brighter?"}]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(llava, case) -> None:
    path = llava(case)
    model = load_model(path)
    assert isinstance(model, MultimodalGPT) and not model.training
    tower = model.encoders["image"]
    family = CASES[case].get("vision", "clip")
    assert model.component_names == {"encoders.image": family, "projectors.image": "mlp2x_gelu"}
    config = json.loads((path / "config.json").read_text())
    assert tower.select_layer == config["vision_feature_layer"]
    tokens = 16 + (config["vision_feature_select_strategy"] == "full" and family == "clip")
    assert tower.num_tokens == model.num_slots("image") == tokens
    assert model.tokenizer.image_token_id == config["image_token_index"]
    assert model.config.vocab_size == config["text_config"]["vocab_size"]

    items = images()
    batch = model.processor().prompt_batch([CONVERSATION], [items])
    assert int((batch.input_ids == config["image_token_index"]).sum()) == 2 * tokens
    pixels = their_pixels(path, items)
    torch.testing.assert_close(batch.images, pixels, rtol=0, atol=1e-5)
    with torch.no_grad():
        ours = model(batch).logits
        expected = theirs(path)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels
        ).logits
    assert ours.shape == expected.shape
    assert expected.abs().max() > 1.0  # O(1) logits: a wrong tensor would show
    torch.testing.assert_close(ours, expected, rtol=ATOL, atol=ATOL)


@pytest.mark.parametrize("case", ["clip-default", "qwen2-tied-padded"])
def test_greedy_decoding_equals_transformers(llava, case) -> None:
    path = llava(case)
    model = load_model(path)
    items = images()
    config = GenerationConfig(max_new_tokens=8, temperature=0)
    out = model.generate([CONVERSATION], [items], config, stop_at_eos=False)
    batch = model.processor().prompt_batch([CONVERSATION], [items])
    with torch.no_grad():
        ids = theirs(path).generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=their_pixels(path, items),
            generation_config=transformers.GenerationConfig(
                max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0
            ),
        )
    assert out.tokens[0] == ids[0, batch.input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("case", ["clip-default", "siglip-full", "qwen2-tied-padded"])
def test_export_writes_the_llava_checkpoint_back(llava, case, tmp_path) -> None:
    path = llava(case)
    report = export_hf(path, tmp_path / "out")
    assert report["family"] == "llava" and report["not_exported"] == []
    assert report["text_family"] == CASES[case].get("text", "llama")
    assert {"preprocessor_config.json", "processor_config.json", "tokenizer.json"} <= set(
        report["files"]
    )
    original, exported = theirs(path).state_dict(), theirs(tmp_path / "out").state_dict()
    assert set(original) == set(exported)
    for key, tensor in original.items():
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=0, msg=key)
    before = json.loads((path / "config.json").read_text())
    after = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in (
        "image_token_index",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "multimodal_projector_bias",
        "projector_hidden_act",
    ):
        assert after[key] == before[key], key
    for section, keys in (
        ("vision_config", ["hidden_size", "num_hidden_layers", "image_size", "hidden_act"]),
        ("text_config", ["model_type", "vocab_size", "hidden_size", "tie_word_embeddings"]),
    ):
        assert {k: after[section][k] for k in keys} == {k: before[section][k] for k in keys}
    # transformers' processor of the export expands "<image>" as mmgpt's does
    model = load_model(path)
    items = images(1)
    ours = model.processor().prompt_batch(["<image>\nWhat is it?"], [items])
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    their = processor(images=items, text="<image>\nWhat is it?", return_tensors="pt")
    assert their["input_ids"].tolist() == ours.input_ids.tolist()
    torch.testing.assert_close(their["pixel_values"], ours.images, rtol=0, atol=1e-5)


def test_loading_dispatch_and_tokenizer(llava) -> None:
    path = llava("clip-default")
    config = read_model_config(path)
    assert architecture(config, path / "config.json") == "multimodal"
    tokenizer = load_tokenizer(path)
    reference = transformers.AutoTokenizer.from_pretrained(path)
    assert tokenizer.vocab_size == len(reference)  # the checkpoint's, nothing appended
    assert tokenizer.image_token_id == reference.convert_tokens_to_ids("<image>")
    assert tokenizer.signal_token_ids == []
    text = "<image>\nWhat colour is the circle?"
    assert tokenizer.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="a LLaVA vision-language model.*load_model"):
        GPT.from_pretrained(path)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_command_line_generate_lora_training_and_export(llava, tmp_path, capsys) -> None:
    path = llava("clip-default")
    image = tmp_path / "x.png"
    images(1)[0].save(image)
    prompt = "What is in the picture?"
    argv = ["generate", "--model", str(path), "--image", str(image), "--prompt", prompt]
    code, out, err = run([*argv, "--temperature", "0", "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    model = load_model(path)
    conversation = [{"role": "user", "text": f"<image>\n{prompt}"}]
    greedy = GenerationConfig(max_new_tokens=6, temperature=0)
    assert out.rstrip("\n") == model.generate_text(conversation, [Image.open(image)], greedy)

    run_dir = tmp_path / "run"
    code, _, err = run(
        [
            "train",
            "vqa",
            "--model",
            str(path),
            "--adapter",
            "lora",
            "--out",
            str(run_dir),
            "train.max_steps=2",
            "train.batch_size=2",
            "data.size=16",
            "data.eval_fraction=0",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    saved = read_model_config(run_dir / "model")
    assert saved["encoders"]["image"]["name"] == "clip"
    assert saved["encoders"]["image"]["config"]["source"] == str(path)
    assert saved["tokenizer"] == {"name": "bpe", "num_signal_tokens": 0}
    tuned = load_model(run_dir / "model")
    base = load_model(path)
    changed = [
        n
        for n, p in tuned.named_parameters()
        if "lora_B" in n and not torch.equal(p, torch.zeros_like(p))
    ]
    assert changed, "the adapter did not train"
    fold_adapters(tuned)
    for (name, p), q in zip(tuned.encoders.named_parameters(), base.encoders.parameters()):
        assert torch.equal(p, q), f"the frozen tower changed: {name}"

    code, out, err = run(
        ["export", "--model", str(run_dir / "model"), "--out", str(tmp_path / "hf")], capsys
    )
    assert code == 0, err
    assert json.loads(out)["family"] == "llava"
    items = images(2, seed=5)
    batch = tuned.processor().prompt_batch([CONVERSATION], [items])
    with torch.no_grad():
        expected = tuned(batch).logits
        got = theirs(tmp_path / "hf")(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=their_pixels(tmp_path / "hf", items),
        ).logits
    torch.testing.assert_close(got, expected, rtol=ATOL, atol=ATOL)
    with torch.no_grad():
        assert not torch.allclose(base(batch).logits, expected, atol=1e-3)  # the LoRA is in


def square_folder(folder: Path, n: int = 16) -> Path:
    folder.mkdir()
    rng = random.Random(0)
    rows = []
    for i in range(n):
        name = ("red", "blue")[i % 2]
        colour = (220, 30, 30) if name == "red" else (30, 30, 220)
        image = Image.new("RGB", (40, 40), (rng.randint(90, 160),) * 3)
        image.paste(colour, (rng.randint(0, 20), rng.randint(0, 20), 30, 30))
        image.save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {name} square"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_clip_tower_around_a_pretrained_llama_trains_in_two_stages_and_exports_as_llava(
    tmp_path, capsys
) -> None:
    """The guide's path: a downloaded CLIP tower and language model, LLaVA's alignment then
    fine-tuning stage, an exported LLaVA checkpoint transformers reads with the same logits."""
    clip = build_hf_vision_dir(tmp_path / "clip", "clip", seed=2)
    lm = build_hf_model_dir(tmp_path / "llama", "llama")
    data = square_folder(tmp_path / "images")
    recipe = tmp_path / "llava.yaml"
    recipe.write_text(
        "\n".join(
            [
                "model:",
                "  architecture: multimodal",
                "  encoder:",
                "    type: clip",
                f"    path: {clip}",
                "  projector:",
                "    type: mlp2x_gelu",
                "tokenizer:",
                "  name: bpe",
                "data:",
                "  name: imagefolder",
                "objective:",
                "  name: sft",
                "train:",
                "  batch_size: 4",
                "  lr: 1.0e-3",
                "  warmup_steps: 1",
                "",
            ]
        )
    )
    common = ["--data", str(data), "train.max_steps=2", "data.eval_fraction=0", *FAST]
    align, finetune = tmp_path / "align", tmp_path / "finetune"
    argv = ["train", str(recipe), "--model", str(lm), "--out", str(align), "train.stage=align"]
    code, _, err = run([*argv, *common], capsys)
    assert code == 0, err
    aligned = load_model(align / "model")
    tower = dict(create("encoder", "clip", path=clip).named_parameters())
    for name, p in aligned.encoders["image"].named_parameters():  # stage 1: the projector only
        assert torch.equal(p, tower[name]), name
    lm_weights = dict(GPT.from_pretrained(lm).named_parameters())
    for name, p in aligned.gpt.named_parameters():  # the embeddings grew by mmgpt's tokens
        assert torch.equal(p[: lm_weights[name].shape[0]], lm_weights[name]), name
    argv = ["train", str(recipe), "--model", str(align / "model"), "--out", str(finetune)]
    code, _, err = run([*argv, "train.stage=finetune", *common], capsys)
    assert code == 0, err

    code, out, err = run(
        ["export", "--model", str(finetune / "model"), "--out", str(tmp_path / "hf")], capsys
    )
    assert code == 0, err
    assert json.loads(out)["family"] == "llava"
    model = load_model(finetune / "model")
    items = images(2, seed=3)
    batch = model.processor().prompt_batch([CONVERSATION], [items])
    with torch.no_grad():
        expected = model(batch).logits
        got = theirs(tmp_path / "hf")(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=their_pixels(tmp_path / "hf", items),
        ).logits
    torch.testing.assert_close(got, expected, rtol=ATOL, atol=ATOL)


def _edit_config(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[section] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_what_mmgpt_cannot_compute_is_an_error_naming_the_field(llava, tmp_path) -> None:
    path = llava("clip-default")
    cases = {
        "layers": (dict(vision_feature_layer=[-2, -1]), "vision_feature_layer=\\[-2, -1\\]"),
        "act": (dict(projector_hidden_act="relu"), "projector_hidden_act 'relu'"),
        "text": (dict(text_config__model_type="gemma"), "text_config.model_type 'gemma'"),
        "range": (dict(vision_feature_layer=-5), "vision_feature_layer=-5 is out of range"),
        "mlp": (dict(text_config__intermediate_size=80), "text_config describes a language model"),
    }
    for name, (changes, message) in cases.items():
        bad = _edit_config(path, tmp_path / name, **changes)
        with pytest.raises(ValueError, match=message):
            load_model(bad)
    siglip = _edit_config(
        llava("siglip-full"), tmp_path / "siglip", vision_feature_select_strategy="default"
    )
    with pytest.raises(ValueError, match="only 'full' is supported with SigLIP"):
        load_model(siglip)

    # tokenizer files whose <image> token is not the checkpoint's image token
    retokenized = tmp_path / "tokenizer"
    shutil.copytree(llava("qwen2-tied-padded"), retokenized)  # room in the vocabulary
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (retokenized / name).unlink()
    build_hf_dir(retokenized, "qwen2")
    add_special_token(retokenized, "<video>")
    image_id = add_special_token(retokenized, "<image>")
    expected = json.loads((retokenized / "config.json").read_text())["image_token_index"]
    assert image_id == expected + 1
    message = (
        f"'<image>' token has id {image_id}, but config.json's image_token_index is {expected}"
    )
    with pytest.raises(ValueError, match=message):
        load_model(retokenized)
    (retokenized / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json: not found"):
        load_model(retokenized)
