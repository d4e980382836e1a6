"""Tiny Hugging Face directories built offline: byte-level BPE tokenizers in the layout of a
Llama-3 or a Qwen2 repository (special tokens, chat template), small random causal language
models of the families mmgpt reads, CLIP and SigLIP vision towers and LLaVA models (with their
``preprocessor_config.json``), and a CLIP model with its processor (for CLIP scores). For
tests — mmgpt's own and a plugin's — that must not download anything. Needs ``tokenizers``
(always installed) and, for models, ``transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import trainers as tk_trainers

__all__ = [
    "CHATML_TEMPLATE",
    "CONVERSATION",
    "LLAMA3_TEMPLATE",
    "STRINGS",
    "add_special_token",
    "build_hf_clip_dir",
    "build_hf_dir",
    "build_hf_model_dir",
    "build_hf_vision_dir",
    "build_llava_dir",
    "randomize_",
]

LINES = [
    "Hello there, how are you today?",
    "The red circle is on the left of the blue square.",
    "I am fine, thank you! 123 4567",
    "naïve café 日本語",
    "What colour is the circle?",
] * 3
# the pre-tokenizer regexes of Llama-3 and Qwen2 (numbers: up to 3 digits / one digit)
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_QWEN2 = SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOL_TEMPLATE = "{{ raise_exception('tools are not supported here') }}"
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
STRINGS = [
    "Hello there, how are you?",
    " the red circle\n\nis on the left",
    "<|begin_of_text|>x<|eot_id|> y <|im_start|>z<|im_end|>\n",
    "naïve café 日本語 😀 123456",
    "",
]
CONVERSATION = [
    {"role": "user", "content": "What colour is the circle?"},
    {"role": "assistant", "content": "The circle is red."},
    {"role": "user", "content": "And the square?"},
]


def _added(token_ids: dict[str, int]) -> dict[str, Any]:
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {str(i): {"content": t, **flags, "special": True} for t, i in token_ids.items()}


def build_hf_dir(
    path: Path,
    style: str,
    *,
    config: dict[str, Any] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """A tiny byte-level BPE tokenizer in the layout of a Llama-3 or a Qwen2 model repository."""
    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(SPLIT if style == "llama3" else SPLIT_QWEN2), behavior="isolated"
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = tk_trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(LINES, trainer)
    specials = LLAMA3_SPECIALS if style == "llama3" else QWEN2_SPECIALS
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    ids = {s: tok.token_to_id(s) for s in specials}
    if style == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])]
                ),
            ]
        )
        base = {
            "bos_token": bos,
            "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True},
            "chat_template": LLAMA3_TEMPLATE,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 8192,
        }
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        base = {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": [
                {"name": "default", "template": CHATML_TEMPLATE},
                {"name": "tool_use", "template": TOOL_TEMPLATE},
            ],
            "tokenizer_class": "Qwen2Tokenizer",
            "add_prefix_space": False,
        }
    base["added_tokens_decoder"] = _added(ids)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({**base, **(config or {})}))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


def build_hf_model_dir(
    path: Path,
    family: str = "llama",
    *,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    **config: Any,
) -> Path:
    """A tiny random causal LM of ``family`` (``llama``, ``qwen2``, ``mistral`` or ``gpt2``)
    saved by transformers into ``path`` with a matching tokenizer directory (Llama-3 style for
    llama/mistral/gpt2, Qwen2 style for qwen2), its vocabulary sized to the tokenizer."""
    import torch
    import transformers  # deferred: an optional extra (interop)

    style = "qwen2" if family == "qwen2" else "llama3"
    build_hf_dir(path, style)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    vocab = len(tokenizer.get_vocab())
    roles = (
        {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"}
        if style == "qwen2"
        else {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None}
    )
    ids = {f"{k}_token_id": tokenizer.token_to_id(v) if v else None for k, v in roles.items()}
    if family == "gpt2":
        cls, cfg = transformers.GPT2LMHeadModel, transformers.GPT2Config
        base = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}
    else:
        names = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
        cls = getattr(transformers, f"{names[family]}ForCausalLM")
        cfg = getattr(transformers, f"{names[family]}Config")
        base = {
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        }
    torch.manual_seed(seed)
    settings = {**base, **ids, **config}
    model = cls(cfg(vocab_size=vocab, tie_word_embeddings=tie_word_embeddings, **settings))
    model.save_pretrained(path)
    return path


def add_special_token(path: Path, token: str) -> int:
    """Append ``token`` as a special token to the tokenizer directory ``path`` (its
    ``tokenizer.json`` and ``tokenizer_config.json``'s ``added_tokens_decoder``), as a model
    repository that adds one (LLaVA's ``<image>``) has it; return its id."""
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    token_id = tok.token_to_id(token)
    tok.save(str(path / "tokenizer.json"))
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.setdefault("added_tokens_decoder", {}).update(_added({token: token_id}))
    config_path.write_text(json.dumps(config))
    return token_id


def randomize_(model: Any, seed: int = 0) -> None:
    """Every tensor of ``model`` drawn anew at O(1) scale (norm weights near 1, other vectors
    near 0): a swapped, misnamed or unused weight changes the outputs visibly, which the
    small default initialisation of a tiny model might hide."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def _vision_config(family: str, **config: Any) -> dict[str, Any]:
    base = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    model_type = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[family]
    return {**base, **config, "model_type": model_type}


def _save_image_processor(path: Path, family: str, image_size: int) -> None:
    import transformers

    if family == "clip":
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
    else:
        processor = transformers.SiglipImageProcessor(
            size={"height": image_size, "width": image_size}
        )
    processor.save_pretrained(str(path))


def build_hf_vision_dir(
    path: Path, family: str = "clip", *, dual: bool = False, seed: int = 0, **config: Any
) -> Path:
    """A tiny random CLIP or SigLIP vision tower saved by transformers into ``path`` with its
    ``preprocessor_config.json``: a ``CLIPVisionModel`` / ``SiglipVisionModel``, or with
    ``dual=True`` a ``CLIPModel`` / ``SiglipModel`` (a text tower beside it). ``config``
    overrides the vision config (3 layers, width 32, 32×32 images, 8×8 patches)."""
    import torch
    import transformers

    vision = _vision_config(family, **config)
    names = {"clip": "CLIP", "siglip": "Siglip"}
    torch.manual_seed(seed)
    if dual:
        text = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=99,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        cfg = getattr(transformers, f"{names[family]}Config")(
            vision_config={k: v for k, v in vision.items() if k != "model_type"}, text_config=text
        )
        model = getattr(transformers, f"{names[family]}Model")(cfg)
    else:
        cfg = getattr(transformers, f"{names[family]}VisionConfig")(
            **{k: v for k, v in vision.items() if k != "model_type"}
        )
        model = getattr(transformers, f"{names[family]}VisionModel")(cfg)
    randomize_(model, seed)
    model.save_pretrained(str(path))
    _save_image_processor(path, family, vision["image_size"])
    return path


def build_hf_clip_dir(path: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random ``CLIPModel`` (text and vision towers, 32 wide) with its
    ``CLIPProcessor`` (a character-level CLIP tokenizer: lowercase letters and digits, no
    merges; the image processor at ``image_size``), saved by transformers into ``path`` as
    ``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained`` read them."""
    import string

    import transformers

    build_hf_vision_dir(path, "clip", dual=True, seed=seed, image_size=image_size)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}  # the ids the text config names
    for suffix in ("", "</w>"):  # CLIP marks a word's last character with </w>
        for ch in string.ascii_lowercase + string.digits:
            vocab[ch + suffix] = len(vocab)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(str(path))
    return path


def build_llava_dir(
    path: Path,
    *,
    vision: str = "clip",
    text: str = "llama",
    seed: int = 0,
    vision_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None,
    extra_vocab: int = 0,
    **config: Any,
) -> Path:
    """A tiny random ``LlavaForConditionalGeneration`` saved by transformers into ``path``: a
    ``vision`` (clip or siglip) tower, a ``text`` (llama, mistral or qwen2) language model,
    a Llama-3-style tokenizer (Qwen2-style for qwen2) with an ``<image>`` token — the image
    token — and the ``preprocessor_config.json``. ``config`` sets LlavaConfig fields
    (``vision_feature_layer``, ``vision_feature_select_strategy``…); ``extra_vocab`` pads the
    text vocabulary past the tokenizer's, as released checkpoints do. Weights: see
    :func:`randomize_`."""
    import torch
    import transformers

    build_hf_dir(path, "qwen2" if text == "qwen2" else "llama3")
    image_id = add_special_token(path, "<image>")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    vocab = len(tokenizer.get_vocab()) + extra_vocab
    vision_cfg = _vision_config(vision, **(vision_config or {}))
    text_cfg = dict(
        model_type=text,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        vocab_size=vocab,
        **(text_config or {}),
    )
    if vision == "siglip":
        config.setdefault("vision_feature_select_strategy", "full")
    cfg = transformers.LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=image_id,
        image_seq_length=(vision_cfg["image_size"] // vision_cfg["patch_size"]) ** 2,
        **config,
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg)
    randomize_(model, seed)
    model.save_pretrained(str(path))
    _save_image_processor(path, vision, vision_cfg["image_size"])
    return path
